"""``lipkit``: the command-line entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lipkit import __version__
from lipkit.errors import LipkitError, describe_os_error

SUBCOMMANDS = (
    "quickstart", "models", "train", "eval", "data", "export", "tokenize", "embed", "index", "serve", "caption",
)  # fmt: skip

DESCRIPTION = """\
lipkit: language-image pre-training (CLIP / SigLIP dual encoders), from data to search.

Run `lipkit COMMAND --help` for the details of a command.
"""

EPILOG = """\
examples:
  lipkit models                                  list the model configs
  lipkit train tiny-tuxpaint                     train a tiny CLIP on the built-in Tux Paint pairs
  lipkit train tiny-synthetic --set steps=100 optim.lr=1e-3 data.batch_size=32
  lipkit export runs/tiny-tuxpaint/checkpoints/step_00000300.pt --out model_openclip.pt
"""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="lipkit", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lipkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lipkit.cli.{name}").add_parser(sub)
    return parser


def use_huge_pages() -> None:
    """Put large CPU tensors on transparent huge pages (PyTorch's ``THP_MEM_ALLOC_ENABLE``), unless set already.

    glibc maps every block over 32 MB afresh and the kernel faults it in 4 KB pages, so a CPU training loop
    that makes and frees large tensors spends much of its time in the kernel: ``lipkit quickstart`` took 174
    million page faults and 473 s of system time without it, 6.9 million and 357 s with it, and finished in
    10 min 5 s instead of 11 min 44 s with the same results (docs/benchmarks.md). Set the variable to 0 to
    turn it off. Only Linux has it; it must be set before PyTorch allocates.
    """
    if sys.platform.startswith("linux"):
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one clear line and return a non-zero code."""
    use_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LipkitError as exc:
        print(f"lipkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file-system error that no command turned into a LipkitError
        print(f"lipkit {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lipkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
