"""Schemathesis against the server's own OpenAPI spec: generated requests, valid and invalid, never get a 5xx,
and every answer fits the spec (statuses declared, bodies of the declared shape, wrong types refused)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from serve_helpers import TOKEN, serve

EXAMPLES = 8  # per operation and mode: ~15 operations x 2 modes stay within ~20 s


@pytest.fixture(scope="module")
def api_schema(corpus, tmp_path_factory):
    server, _ = serve(corpus, tmp_path_factory.mktemp("fuzz") / "corpus")
    with server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_server_error_and_fit_the_spec(api_schema, mode):
    found = operations(api_schema)
    assert {op.path for op in found} >= {"/api/indexes/{index}/search", "/knn-service", "/api/indexes/{index}/items"}
    fuzzed = [operation.path for operation in found if fuzz(operation, mode)]
    assert len(fuzzed) >= 10  # in negative mode, routes without inputs (/healthz) have nothing to get wrong


def fuzz(operation, mode: GenerationMode) -> bool:
    """Send generated requests to one operation (with the token on the write routes) and check the answers.

    Returns:
        False for an operation that takes no input to get wrong (negative mode), else True.
    """
    auth = {"Authorization": f"Bearer {TOKEN}"} if "/items" in operation.path else None

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:
        # Every other default check runs. Not "schema-valid request accepted": whether a filter parses, names a
        # column of this index, or a base64 string holds a picture is not a matter of the spec (those get 400/415).
        case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        return False
    return True
