"""Options that mean the same in every subcommand, and the old spellings they replace.

The conventions (docs/guide.md, "Command-line conventions"): ``--out FILE`` names a file and
``--out-dir DIR`` a folder; ``--set KEY=VALUE ...`` overrides a config; ``--quiet`` turns progress bars
off; ``--seed N`` seeds the command's random choices; ``--limit N`` uses at most N items of each input;
``--batch-size N`` sets the batch size (also in ``benchmarks/``). An old spelling still works for one
release and prints one line on stderr naming the new one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new option's destination and says so on stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_deprecated(parser.prog, str(option_string), self.new)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def warn_deprecated(prog: str, old: str, new: str) -> None:
    """Print the one-line deprecation notice for an old spelling."""
    print(f"{prog}: {old} is deprecated, use {new}", file=sys.stderr)


def add_alias(p: argparse._ActionsContainer, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a deprecated spelling of ``new`` (same destination, hidden from --help).

    Args:
        p: The parser (or an argument group of it).
        old: The old option, e.g. ``--max-samples``.
        new: The option to use instead, e.g. ``--limit``.
        dest: The destination both options store into.
        **kwargs: ``type``, ``metavar``...; ``flag=True`` for an option that takes no value.
    """
    nargs = 0 if kwargs.pop("flag", False) else None
    p.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, nargs=nargs, **kwargs)


def add_quiet(p: argparse.ArgumentParser, old: str | None = None) -> None:
    """``--quiet``: no progress bars; results, warnings and errors still print."""
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (results and errors still print)")
    if old:
        add_alias(p, old, "--quiet", "quiet", flag=True)


def add_seed(p: argparse.ArgumentParser, what: str, default: int | None = None) -> None:
    """``--seed N``: the seed of the command's random choices, described by ``what``."""
    shown = f" (default: {default})" if default is not None else ""
    p.add_argument("--seed", type=int, default=default, metavar="N", help=f"seed of {what}{shown}")


def add_limit(p: argparse.ArgumentParser, what: str, old: str | None = None, default: int | None = None) -> None:
    """``--limit N``: use at most N items, described by ``what``; ``old`` is a deprecated spelling."""
    shown = f" (default: {default})" if default is not None else ""
    p.add_argument("--limit", type=int, default=default, metavar="N", help=f"use at most N {what}{shown}")
    if old:
        add_alias(p, old, "--limit", "limit", type=int, metavar="N")


def add_set(p: argparse.ArgumentParser, help: str, metavar: str = "KEY=VALUE") -> None:
    """``--set KEY=VALUE ...``: config overrides (repeatable; the values collect in ``args.set``)."""
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar=metavar, help=help)
