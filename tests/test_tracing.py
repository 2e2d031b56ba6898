"""Tracing (node.otel, the wwwserve[otel] extra) across two real node processes: an entry that
delegates every request to an executor, both in front of the instant stub backend. Each node runs
the OpenTelemetry SDK with the `file` exporter, which appends every span as a JSON line as it ends
(the SDK's own JSON form); the test reads both files and checks that one trace spans both nodes:

    entry     wwwserve.request (server) -> wwwserve.policy, wwwserve.delegation.attempt (client)
    executor  wwwserve.overlay.hop (server, child of the attempt) -> wwwserve.backend (client)

Also: the wire's `trace` field is validated (peers may lie), config errors name their key, and a
node without node.otel (or without the extra) imports nothing of OpenTelemetry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.support import PAIR_MODEL as MODEL
from tests.support import PAIR_POLICIES, REPO, NodeProcess, delegating_pair, wait_until
from wwwserve_gateway.config.loading import load_config
from wwwserve_gateway.config.problems import ConfigError
from wwwserve_gateway.delegation import wire
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugin_api.backend import Endpoint


@dataclass
class Traced:
    entry: NodeProcess
    executor: NodeProcess
    spans_at: dict[str, Path]

    def spans(self, name: str) -> list[dict[str, Any]]:
        path = self.spans_at[name]
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    workdir = tmp_path_factory.mktemp("tracing")
    spans_at = {name: workdir / f"{name}-spans.jsonl" for name in PAIR_POLICIES}

    def otel(name: str) -> dict[str, Any]:
        return {"otel": {"exporter": "file", "path": str(spans_at[name]), "service_name": f"wwwserve-{name}"}}

    with delegating_pair(workdir, "tracing-test", otel) as (entry, executor):
        yield Traced(entry, executor, spans_at)


def ask(node: NodeProcess, stream: bool) -> tuple[str, str]:
    """(answer id, route header) of one chat request, streamed or not."""
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "trace me"}]
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, max_tokens=8, stream=True
        ) as raw:
            chunks = list(raw.parse())
            return chunks[0].id, raw.headers["x-wwwserve-route"]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=8)
    return raw.parse().id, raw.headers["x-wwwserve-route"]


def hex_id(value: str | None) -> str | None:
    return None if value is None else value.removeprefix("0x")


def trace_of(traced: Traced, request_id: str) -> dict[str, list[dict[str, Any]]]:
    """The spans of the trace whose request span names `request_id`, per node, once the executor's
    hop span has ended too (each node writes its spans as they end)."""

    def collect() -> dict[str, list[dict[str, Any]]] | None:
        roots = [
            s
            for s in traced.spans("E")
            if s["name"] == "wwwserve.request" and s["attributes"].get("wwwserve.request_id") == request_id
        ]
        if not roots:
            return None
        trace_id = roots[0]["context"]["trace_id"]
        found = {n: [s for s in traced.spans(n) if s["context"]["trace_id"] == trace_id] for n in ("E", "X")}
        return found if any(s["name"] == "wwwserve.overlay.hop" for s in found["X"]) else None

    return wait_until(collect, 30, interval=0.1, what=f"the spans of request {request_id}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_one_trace_spans_the_entry_and_the_executor(traced: Traced, stream: bool) -> None:
    answer_id, route = ask(traced.entry, stream)
    request_id = answer_id.removeprefix("chatcmpl-")
    spans = trace_of(traced, request_id)
    by_name = {n: {s["name"]: s for s in spans[n]} for n in spans}
    entry_id, executor_id = route.split(",")

    request = by_name["E"]["wwwserve.request"]
    assert request["kind"] == "SpanKind.SERVER" and request["parent_id"] is None
    assert request["attributes"]["http.response.status_code"] == 200
    assert request["attributes"]["wwwserve.route"] == route
    assert request["attributes"]["wwwserve.stream"] is stream
    assert request["resource"]["attributes"]["service.name"] == "wwwserve-E"
    assert request["resource"]["attributes"]["service.instance.id"] == entry_id
    root = hex_id(request["context"]["span_id"])

    policy = by_name["E"]["wwwserve.policy"]
    assert hex_id(policy["parent_id"]) == root
    assert policy["attributes"]["wwwserve.decision"] == "delegate"

    attempt = by_name["E"]["wwwserve.delegation.attempt"]
    assert attempt["kind"] == "SpanKind.CLIENT" and hex_id(attempt["parent_id"]) == root
    assert attempt["attributes"]["wwwserve.peer"] == executor_id
    assert attempt["attributes"]["wwwserve.outcome"] == "accepted"
    assert attempt["attributes"]["wwwserve.route"] == route

    hop = by_name["X"]["wwwserve.overlay.hop"]
    assert hop["kind"] == "SpanKind.SERVER"
    assert hex_id(hop["parent_id"]) == hex_id(attempt["context"]["span_id"]), "the hop continues the attempt"
    assert hop["attributes"]["wwwserve.peer"] == entry_id
    assert hop["attributes"]["wwwserve.outcome"] == "accepted"
    assert hop["resource"]["attributes"]["service.instance.id"] == executor_id

    backend = by_name["X"]["wwwserve.backend"]
    assert backend["kind"] == "SpanKind.CLIENT"
    assert hex_id(backend["parent_id"]) == hex_id(hop["context"]["span_id"])
    assert backend["attributes"]["wwwserve.deployment"]
    assert all(s["status"]["status_code"] != "ERROR" for n in spans for s in spans[n])
    # Nested in time as in the tree: the attempt holds the executor's whole answer.
    assert request["start_time"] <= attempt["start_time"] and attempt["end_time"] <= request["end_time"]


def delegated(**extra: Any) -> dict[str, Any]:
    raw = {
        "id": "0" * 32,
        "endpoint": Endpoint.CHAT.value,
        "body": {"model": MODEL, "messages": []},
        "route": [SENDER],
        "continuation": False,
    }
    return {**raw, **extra}


SENDER = NodeIdentity.generate().node_id
ME = NodeIdentity.generate().node_id
TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


def test_the_wire_carries_a_valid_traceparent_and_refuses_a_lie() -> None:
    assert wire.parse_request(SENDER, ME, delegated()).trace is None
    request = wire.parse_request(SENDER, ME, delegated(trace=TRACEPARENT))
    assert request.trace == TRACEPARENT
    assert request.to_wire()["trace"] == TRACEPARENT
    assert "trace" not in wire.parse_request(SENDER, ME, delegated()).to_wire(), "untraced: the old format"
    for lie in (
        TRACEPARENT + "0",  # longer
        TRACEPARENT.upper(),
        "01" + TRACEPARENT[2:],  # another version
        "x" * 100_000,
        {"traceparent": TRACEPARENT},
        55,
    ):
        with pytest.raises(wire.WireError, match="traceparent"):
            wire.parse_request(SENDER, ME, delegated(trace=lie))
    with pytest.raises(wire.WireError):
        wire.parse_request(SENDER, ME, delegated(tracestate="x"))


def write_config(tmp_path: Path, otel: Any) -> Path:
    path = tmp_path / "node.yaml"
    config = {"node": {"data_dir": str(tmp_path / "data"), "otel": otel}, "model_list": []}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("otel", "key", "words"),
    [
        ({"exporter": "file"}, "node.otel.path", "needs a path"),
        ({"endpoint": "collector:4318"}, "node.otel.endpoint", "http"),
        ({"sample_ratio": 2}, "node.otel.sample_ratio", "less than or equal"),
        ({"exporter": "zipkin"}, "node.otel.exporter", "otlp"),
        ({"servicename": "x"}, "node.otel.servicename", "service_name"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, otel: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, otel))
    problems = {str(p.key): p.message for p in caught.value.problems}
    assert key in problems and words in problems[key], problems


# Run in a child: which modules a node imports can only be seen in a fresh interpreter.
NODE_IMPORTS = """
import sys
from pathlib import Path
from wwwserve_gateway.config.loading import load_config
from wwwserve_gateway.node import Node
node = Node(load_config(Path(sys.argv[1])), Path(sys.argv[1]))
print(sorted({m.split(".")[0] for m in sys.modules if m.startswith("opentelemetry")}))
"""
# Makes the extra look uninstalled: every opentelemetry import fails as it would without it.
NO_EXTRA = """
import sys
class NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoOtel())
"""


def run_child(tmp_path: Path, args: list[str], without_extra: bool) -> subprocess.CompletedProcess[str]:
    paths = [str(REPO)]
    if without_extra:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(NO_EXTRA)
        paths.insert(0, str(site))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "300"}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )


def test_without_node_otel_nothing_of_opentelemetry_is_imported(tmp_path: Path) -> None:
    done = run_child(tmp_path, ["-c", NODE_IMPORTS, str(write_config(tmp_path, None))], without_extra=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_node_otel_without_the_extra_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"endpoint": "http://127.0.0.1:4318"})
    done = run_child(tmp_path, ["-m", "wwwserve_gateway", "check-config", str(config)], without_extra=True)
    assert done.returncode != 0
    assert "node.otel" in done.stderr and "pip install 'wwwserve[otel]'" in done.stderr, done.stderr
    done = run_child(tmp_path, ["-c", NODE_IMPORTS, str(write_config(tmp_path, None))], without_extra=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
