"""The search routes' query parameters, read without FastAPI's per-field validation, and URL quoting."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from lipkit.serve.limits import ApiError, Limits
from lipkit.serve.params import SearchParams
from lipkit.serve.service import SearchOptions, quote_part

PARAMS = SearchParams(Limits(max_k=50, max_offset=100, max_text_chars=20))


def test_absent_options_take_their_defaults():
    assert PARAMS.search_options({}) == SearchOptions(k=10, offset=0, where=None, collapse=None)


def test_options_are_read_and_converted():
    query = {"k": " 7", "offset": "+20", "where": "source = emoji", "collapse": "0.95"}
    assert PARAMS.search_options(query) == SearchOptions(7, 20, "source = emoji", 0.95)
    assert PARAMS.search_options({"where": ""}).where is None  # an empty filter is no filter


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"k": "0"}, "query.k"),
        ({"k": "51"}, "query.k"),
        ({"k": "ten"}, "query.k"),
        ({"k": "5.5"}, "query.k"),
        ({"k": "1_0"}, "query.k"),
        ({"k": "\u0661\u0662"}, "query.k"),  # Arabic-Indic digits are digits to str.isdigit, not to an API
        ({"offset": "-1"}, "query.offset"),
        ({"offset": "101"}, "query.offset"),
        ({"where": "x" * 21}, "query.where"),
        ({"collapse": "0"}, "query.collapse"),
        ({"collapse": "1.01"}, "query.collapse"),
        ({"collapse": "nan"}, "query.collapse"),
        ({"collapse": "inf"}, "query.collapse"),
        ({"collapse": ""}, "query.collapse"),
    ],
)
def test_bad_options_are_a_422_naming_the_parameter(query, named):
    with pytest.raises(ApiError) as caught:
        PARAMS.search_options(query)
    assert caught.value.status == 422 and caught.value.code == "invalid_request"
    assert caught.value.detail.startswith(named + ": ")


def test_the_query_text_is_required_and_bounded():
    assert PARAMS.query_text({"q": "a red cat"}) == "a red cat"
    for query, message in [({}, "field required"), ({"q": ""}, "at least 1"), ({"q": "x" * 21}, "at most 20")]:
        with pytest.raises(ApiError, match=message) as caught:
            PARAMS.query_text(query)
        assert caught.value.status == 422


def test_the_openapi_parameters_carry_the_limits():
    spec = {p["name"]: p for p in PARAMS.openapi(with_text=True)["parameters"]}
    assert list(spec) == ["q", "k", "offset", "where", "collapse"]
    assert spec["q"]["required"] and spec["q"]["schema"] == {"type": "string", "minLength": 1, "maxLength": 20}
    assert spec["k"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 50, "default": 10}
    assert spec["offset"]["schema"] == {"type": "integer", "minimum": 0, "maximum": 100, "default": 0}
    assert spec["collapse"]["schema"] == {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    assert not spec["where"]["required"] and spec["where"]["schema"] == {"type": "string", "maxLength": 20}
    assert [p["name"] for p in PARAMS.openapi()["parameters"]] == ["k", "offset", "where", "collapse"]


@pytest.mark.parametrize(
    "text", ["item/1", "a b&c=d?e#f%g+h", "\u00fc/\u00f1 x", "".join(map(chr, range(128))), "A-Z_a.z~0", ""]
)
def test_quote_part_equals_urllib(text):
    assert quote_part(text) == quote(text, safe="")
