"""examples/grafana/wwwserve.json against real nodes: every metric its PromQL names exists in the
/metrics of a real two-node network (an entry that delegates everything to an executor, both in front
of the instant stub backend), and is used as its type allows (rate() over counters and histogram
buckets, gauges read as they are).

A metric counts as existing when a node exposes samples of it, or declares its family (`# TYPE`) with
no samples yet: a labelled counter such as wwwserve_duels_total has no sample until its first duel,
yet its name and type are already on the page, which is what a Grafana panel depends on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.support import PAIR_MODEL as MODEL
from tests.support import REPO, NodeProcess, delegating_pair, http_get

DASHBOARD = REPO / "examples" / "grafana" / "wwwserve.json"
METRIC = re.compile(r"\b(wwwserve_[a-z0-9_]+)\b")
RATE_ARG = re.compile(r"rate\(\s*(wwwserve_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed(text: str) -> dict[str, str]:
    """Sample names a /metrics page has or declares, each with its family's type."""
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            for suffix in SUFFIXES.get(kind, ("",)):
                types[base + suffix] = kind
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            types.setdefault(name, "untyped")
    return types


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The union of both nodes' /metrics after a delegated request, streamed and not."""
    with delegating_pair(tmp_path_factory.mktemp("grafana"), "grafana-test") as (entry, executor):
        client = openai.OpenAI(base_url=entry.url + "/v1", api_key="none", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        for _ in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True):
            pass
        assert entry.metric("wwwserve_delegations_total", outcome="ok") == 2
        assert executor.metric("wwwserve_peer_requests_total", outcome="served") == 2
        pages = [metrics_page(node) for node in (entry, executor)]
        union: dict[str, str] = {}
        for page in pages:
            for name, kind in exposed(page).items():
                if union.get(name, "untyped") == "untyped":
                    union[name] = kind
        yield union


def metrics_page(node: NodeProcess) -> str:
    status, body = http_get(node.url + "/metrics")
    assert status == 200
    return body.decode()


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in (
        "Requests/s by status",
        "Request latency",
        "In flight",
        "Delegations/s by outcome",
        "Peer requests served/s",
        "Gossip members by state",
        "Balance",
        "Ledger operations",
        "Duels/s by outcome",
    ):
        assert wanted in titles


def test_every_metric_in_the_dashboard_is_exposed_by_a_real_node(scraped: dict[str, str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for expr in expressions(dashboard) for name in METRIC.findall(expr)}
    assert len(used) >= 25
    missing = sorted(used - scraped.keys())
    assert not missing, f"metrics the dashboard queries that no node exposes: {missing}"
    for expr in expressions(dashboard):
        rated = set(RATE_ARG.findall(expr))
        for name in rated:
            assert scraped[name] in ("counter", "histogram"), f"rate() over a {scraped[name]}: {expr}"
        for name in set(METRIC.findall(expr)) - rated:
            assert scraped[name] == "gauge", f"a {scraped[name]} read without rate(): {expr}"
        if "histogram_quantile" in expr:
            assert all(n.endswith("_bucket") for n in rated), expr
