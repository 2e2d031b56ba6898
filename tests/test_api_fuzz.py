"""API fuzzing: schemathesis generates requests from the node's own OpenAPI document (GET /openapi.json)
and sends them to a real `wwwserve node` process in front of the instant stub backend
(benchmarks/stub_server.py), over loopback.

Every answer must be one the document declares (status, content type, schema), requests that break
the document must be refused with a 4xx, and every error must have OpenAI's shape. No 5xx, except
the backend's own failures the API documents: 502 (unreachable, or not OpenAI's format), 503 (not
ready) and 504 (silent past request_timeout), each with its backend code. The stub answers every
chat and completion request at once and 404 for embeddings, which it does not serve, so with a
healthy stub none of those three is expected either; they are allowed only in that shape.

The document is built in-process from the same generator the node serves it with (schemathesis's lazy
fixture loader reads a pytest attribute pytest 9 removed); the test checks the node serves exactly it.
The examples are bounded (hypothesis settings below) so that the module runs in well under a minute.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import ListeningChild, NodeProcess
from wwwserve_gateway.web.openapi import openapi_document

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 50  # per operation and phase
# The backend failures the API documents (README, "HTTP API"); anything else at 5xx is a bug.
BACKEND_FAILURES = {
    502: {"backend_unreachable", "bad_backend_response"},
    503: {"backend_unavailable"},
    504: {"backend_timeout"},
}
seen: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    stub = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    config = {
        "node": {"api_keys": [KEY], "max_body_bytes": 65536, "request_timeout": 30},
        "model_list": [
            {
                "model_name": "stub",
                "litellm_params": {"model": "openai/stub", "api_base": stub.url + "/v1", "api_key": "x"},
            }
        ],
    }
    node = NodeProcess(config, Path(tmp_path_factory.mktemp("fuzz")))
    try:
        yield node.start()
    finally:
        node.stop()
        stub.stop()
        print(
            f"\nschemathesis: {sum(seen.values())} requests, by operation and status: {dict(sorted(seen.items()))}"
        )


DOCUMENT = openapi_document(["stub"], authenticated=True, admin=False)
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_node_serves_its_document(fuzz_node: NodeProcess) -> None:
    assert fuzz_node.get_json("/openapi.json") == json.loads(json.dumps(DOCUMENT))


def no_server_error(ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case):
    status = response.status_code
    if status >= 500:
        code = response.json().get("error", {}).get("code") if _is_json(response) else None
        assert code in BACKEND_FAILURES.get(status, set()), (
            f"{case.operation.label}: {status} {response.text[:300]}"
        )


def openai_error_shape(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
):
    if response.status_code < 400:
        return
    assert _is_json(response), f"{response.status_code} with {response.headers.get('content-type')}"
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error


def _is_json(response: schemathesis.Response) -> bool:
    content_type = response.headers.get("content-type", [""])
    value = content_type[0] if isinstance(content_type, list) else content_type
    return value.startswith("application/json")


CHECKS = [
    no_server_error,
    openai_error_shape,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_holds_to_its_document(case: schemathesis.Case, fuzz_node: NodeProcess) -> None:
    response = case.call(base_url=fuzz_node.url, headers=AUTH, timeout=30)
    seen[f"{case.operation.label} {response.status_code}"] += 1
    case.validate_response(response, checks=CHECKS, headers=AUTH)
