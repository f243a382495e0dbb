"""Filter expressions: parsing, clear errors, and SQL that selects what a plain Python predicate selects."""

from __future__ import annotations

import json
import sqlite3

import pytest

from lipkit.index.errors import FilterError
from lipkit.index.filters import Clause, parse_filter

KINDS = {"source": "text", "width": "number", "lang": "text"}
ROWS = [
    {"source": "emoji", "width": 120, "lang": "en"},
    {"source": "tuxpaint", "width": 640, "lang": "fr"},
    {"source": "photo", "width": 200, "lang": "en"},
    {"source": "emoji", "width": 512},  # no lang
    {"source": "tux paint", "width": 80, "lang": "12"},
    {"width": 300, "lang": "de"},  # no source
]


def select(where: str) -> list[int]:
    """Row numbers (0-based) that ``where`` selects, evaluated in SQLite as the index does."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE items (vid INTEGER, key TEXT, meta TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?, ?)", [(i, f"k{i}", json.dumps(r)) for i, r in enumerate(ROWS)])
    condition, params = parse_filter(where).to_sql(KINDS)
    return [r[0] for r in db.execute(f"SELECT vid FROM items WHERE {condition} ORDER BY vid", params)]


def test_parsing_gives_the_clauses():
    parsed = parse_filter("source in (emoji, 'tux paint') AND width >= 200 and lang not in (\"en\")")
    assert parsed.clauses == (
        Clause("source", "in", ("emoji", "tux paint")),
        Clause("width", ">=", ("200",)),
        Clause("lang", "not in", ("en",)),
    )
    assert parse_filter("  source=emoji ").clauses == (Clause("source", "=", ("emoji",)),)


@pytest.mark.parametrize(
    ("where", "predicate"),
    [
        ("source = emoji", lambda r: r.get("source") == "emoji"),
        ("source != tuxpaint", lambda r: "source" in r and r["source"] != "tuxpaint"),
        ("width >= 200", lambda r: r["width"] >= 200),
        ("width > 200 and width <= 640", lambda r: 200 < r["width"] <= 640),
        ("width < 200.5", lambda r: r["width"] < 200.5),
        ("source in (emoji, photo)", lambda r: r.get("source") in ("emoji", "photo")),
        ("source in ('tux paint')", lambda r: r.get("source") == "tux paint"),
        ("lang not in (en, fr)", lambda r: "lang" in r and r["lang"] not in ("en", "fr")),
        ("lang = 12", lambda r: r.get("lang") == "12"),  # a number-like word compares as text in a text column
        ("source = emoji and lang = en", lambda r: r.get("source") == "emoji" and r.get("lang") == "en"),
        ("key in (k1, k2)", lambda r: ROWS.index(r) in (1, 2)),
    ],
)
def test_sql_selects_what_the_python_predicate_selects(where, predicate):
    assert select(where) == [i for i, r in enumerate(ROWS) if predicate(r)]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("", "filter is empty"),
        ("source", "expected one of =, !=, >=, <=, >, <, in, not in after 'source' at the end"),
        ("source =", "expected a value after source ="),
        ("source = emoji or source = photo", "expected 'and' before 'or'"),
        ("source in emoji", "'in' takes a list in brackets"),
        ("source in (emoji", "'in' takes a list in brackets"),
        ("= emoji", "expected a column name at '='"),
        ("source = 'emoji", "cannot read"),
        ("sorce = emoji", "no column 'sorce'; the index has: key, lang, source, width. Did you mean: source?"),
        ("width >= wide", "column 'width' holds numbers, not 'wide'"),
    ],
)
def test_bad_filters_raise_one_clear_line(where, message):
    with pytest.raises(FilterError) as exc:
        parse_filter(where).to_sql(KINDS)
    assert message in str(exc.value) and "\n" not in str(exc.value)
