"""Filter expressions for search (``where=``): parsed here, evaluated in SQLite to the set of matching items.

Grammar (keywords in any case)::

    expression := clause (" and " clause)*
    clause     := COLUMN OP VALUE | COLUMN ["not"] "in" "(" VALUE ("," VALUE)* ")"
    OP         := "=" | "!=" | ">=" | "<=" | ">" | "<"
    VALUE      := a 'quoted' or "quoted" string, or a bare word (no spaces, commas or brackets)

Examples: ``source = emoji``, ``source != tuxpaint``, ``width >= 200``, ``source in (emoji, tuxpaint) and
lang = en``. ``key`` names the item's key; every other column is a metadata field of the indexed items. A
column holds numbers when every stored value of it is a number, and is compared as numbers then; otherwise
as text. An item without the column matches no clause on it (not even ``!=``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from lipkit.errors import suggest
from lipkit.index.errors import FilterError

OPERATORS = ("=", "!=", ">=", "<=", ">", "<", "in", "not in")
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>'[^']*'|"[^"]*")|(?P<op>!=|>=|<=|=|>|<)|(?P<punct>[(),])|(?P<word>[^\s(),=!<>'"]+))"""
)


@dataclass(frozen=True)
class Clause:
    """One comparison: ``column op values`` (one value, or several for ``in`` and ``not in``)."""

    column: str
    op: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Filter:
    """A parsed expression: its clauses, all of which must hold."""

    text: str
    clauses: tuple[Clause, ...]

    def to_sql(self, kinds: Mapping[str, str]) -> tuple[str, list[str | float]]:
        """The SQL condition over table ``items`` (columns ``key`` and JSON ``meta``) and its parameters.

        Args:
            kinds: Each known metadata column's kind, ``"number"`` or ``"text"``.

        Raises:
            FilterError: A column the index does not have, or a text value compared with a number column.
        """
        parts, params = [], []
        for clause in self.clauses:
            sql, values = _clause_sql(clause, kinds, self.text)
            parts.append(sql)
            params.extend(values)
        return " AND ".join(parts), params


def parse_filter(text: str) -> Filter:
    """Parse a ``where`` expression (grammar in the module docstring).

    Raises:
        FilterError: One line naming the expression and what is wrong with it.
    """
    tokens = _tokenize(text)
    clauses, i = [], 0
    while True:
        clause, i = _parse_clause(tokens, i, text)
        clauses.append(clause)
        if i == len(tokens):
            return Filter(text, tuple(clauses))
        if tokens[i] != ("word", "and"):
            raise FilterError(f"filter {text!r}: expected 'and' before {tokens[i][1]!r}")
        i += 1


def _tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; keywords in lower case, quoted strings without their quotes."""
    tokens, pos = [], 0
    text_end = len(text.rstrip())
    while pos < text_end:
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise FilterError(f"filter {text!r}: cannot read {text[pos:].strip()!r}")
        kind = match.lastgroup or "word"
        value = match.group(kind)
        if kind == "str":
            value = value[1:-1]
        elif kind == "word" and value.lower() in ("and", "in", "not"):
            value = value.lower()
        tokens.append((kind, value))
        pos = match.end()
    if not tokens:
        raise FilterError("filter is empty: write e.g. 'source = emoji'")
    return tokens


def _parse_clause(tokens: list[tuple[str, str]], i: int, text: str) -> tuple[Clause, int]:
    """The clause starting at token ``i``, and the index after it."""
    if i >= len(tokens) or tokens[i][0] != "word":
        raise FilterError(f"filter {text!r}: expected a column name" + _at(tokens, i))
    column = tokens[i][1]
    i += 1
    if i < len(tokens) and tokens[i] == ("word", "not") and i + 1 < len(tokens) and tokens[i + 1] == ("word", "in"):
        values, i = _parse_list(tokens, i + 2, text)
        return Clause(column, "not in", values), i
    if i < len(tokens) and tokens[i] == ("word", "in"):
        values, i = _parse_list(tokens, i + 1, text)
        return Clause(column, "in", values), i
    if i >= len(tokens) or tokens[i][0] != "op":
        raise FilterError(f"filter {text!r}: expected one of {', '.join(OPERATORS)} after {column!r}" + _at(tokens, i))
    op = tokens[i][1]
    if i + 1 >= len(tokens) or tokens[i + 1][0] not in ("word", "str"):
        raise FilterError(f"filter {text!r}: expected a value after {column} {op}")
    return Clause(column, op, (_value(tokens[i + 1]),)), i + 2


def _parse_list(tokens: list[tuple[str, str]], i: int, text: str) -> tuple[tuple[str, ...], int]:
    """The values of ``(a, b, ...)`` starting at token ``i``, and the index after the closing bracket."""
    if i >= len(tokens) or tokens[i] != ("punct", "("):
        raise FilterError(f"filter {text!r}: 'in' takes a list in brackets, e.g. in (a, b)")
    values, i = [], i + 1
    while i < len(tokens) and tokens[i][0] in ("word", "str"):
        values.append(_value(tokens[i]))
        i += 1
        if i < len(tokens) and tokens[i] == ("punct", ","):
            i += 1
        elif i < len(tokens) and tokens[i] == ("punct", ")"):
            return tuple(values), i + 1
        else:
            break
    raise FilterError(f"filter {text!r}: 'in' takes a list in brackets, e.g. in (a, b)")


def _value(token: tuple[str, str]) -> str:
    """The value as written (without quotes); the column's kind decides later how it compares."""
    return token[1]


def _at(tokens: list[tuple[str, str]], i: int) -> str:
    return f" at {tokens[i][1]!r}" if i < len(tokens) else " at the end"


def _clause_sql(clause: Clause, kinds: Mapping[str, str], text: str) -> tuple[str, list[str | float]]:
    """One clause as SQL over ``items``, with its parameters."""
    if clause.column == "key":
        field, kind = "key", "text"
    elif clause.column in kinds:
        kind = kinds[clause.column]
        path = '$."' + clause.column.replace('"', "").replace("'", "''") + '"'
        field = f"json_extract(meta, '{path}')"
        if kind == "text":
            field = f"CAST({field} AS TEXT)"
    else:
        known = sorted(["key", *kinds])
        raise FilterError(
            f"filter {text!r}: no column {clause.column!r}; the index has: {', '.join(known)}."
            + suggest(clause.column, known)
        )
    values = [_typed(value, kind, clause, text) for value in clause.values]
    if clause.op in ("in", "not in"):
        marks = ", ".join("?" * len(values))
        return f"({field} IS NOT NULL AND {field} {clause.op.upper()} ({marks}))", values
    return f"({field} {clause.op} ?)", values


def _typed(value: str, kind: str, clause: Clause, text: str) -> str | float:
    """``value`` as the column compares it: a number for number columns, text for text ones."""
    if kind == "text":
        return value
    try:
        return float(value)
    except ValueError:
        raise FilterError(f"filter {text!r}: column {clause.column!r} holds numbers, not {value!r}") from None
