"""The access log: one record per finished request in `node.requests` (recent and live), and one
structured log line per request, on by default and off with `node.access_log: false`.

A node runs in this process (records, subscriptions) and as `wwwserve node` (its log lines), in front
of a real llama.cpp server; the apps are the official openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import LlamaServer, NodeProcess
from wwwserve_gateway.access import RequestRecord, RequestRecords
from wwwserve_gateway.config.loading import parse_config
from wwwserve_gateway.node import Node


def tiny_config(llama_tiny: LlamaServer, data_dir: Path, **node: object) -> dict:
    return {
        "node": {"data_dir": str(data_dir), **node},
        "model_list": [
            {
                "model_name": "tiny",
                "litellm_params": {"model": "openai/tiny-ext", "api_base": llama_tiny.base_url},
                "model_info": {"id": "tiny-1"},
            }
        ],
    }


@pytest.fixture
async def node(llama_tiny: LlamaServer, tmp_path: Path) -> AsyncIterator[Node]:
    gateway = Node(parse_config(tiny_config(llama_tiny, tmp_path / "data")))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


def client(node: Node) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=node.app)
    return openai.AsyncOpenAI(
        base_url="http://node/v1",
        api_key="none",
        http_client=httpx.AsyncClient(transport=transport, base_url="http://node"),
        max_retries=0,
    )


async def test_each_request_leaves_one_record_seen_live(node: Node) -> None:
    app = client(node)
    messages = [{"role": "user", "content": "hi"}]
    with node.requests.subscribe() as live:
        answer = await app.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        stream = await app.chat.completions.create(model="tiny", messages=messages, max_tokens=4, stream=True)
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await app.chat.completions.create(model="nope", messages=messages)
        seen = [await asyncio.wait_for(anext(live), 10) for _ in range(3)]

    plain, streamed, missing = node.requests.recent()
    assert seen == [plain, streamed, missing]
    me = node.node_id
    assert plain.id != streamed.id
    assert (plain.model, plain.deployment, plain.route, plain.status) == ("tiny", "tiny-1", (me,), 200)
    assert plain.endpoint == "chat/completions"
    assert plain.completion_tokens == answer.usage.completion_tokens
    assert plain.prompt_tokens == answer.usage.prompt_tokens
    assert plain.ttft_s is None and plain.error is None and plain.latency_s > 0
    assert streamed.status == 200 and streamed.completion_tokens > 0
    assert streamed.ttft_s is not None and 0 < streamed.ttft_s <= streamed.latency_s
    assert (missing.status, missing.deployment, missing.route) == (404, None, ())
    assert "nope" in (missing.error or "")
    assert json.dumps(plain.as_dict())  # plain data, ready for a JSON view


async def test_a_slow_subscriber_loses_records_and_requests_go_on() -> None:
    records = RequestRecords(keep=3, access_log=False)
    slow = records.subscribe(maxsize=2)
    fast = records.subscribe()
    made = [
        RequestRecord(str(i), 0.0, "chat/completions", "m", "d", ("n",), 200, 1, 1, 0.1, None, None)
        for i in range(5)
    ]
    for record in made:
        records.add(record)
    assert [r.id for r in records.recent()] == ["2", "3", "4"]  # the last `keep`
    assert records.recent(1) == [made[-1]]
    assert slow.dropped == 3 and slow.queue.qsize() == 2
    assert [await anext(fast) for _ in made] == made
    slow.close()
    records.add(made[0])
    assert slow.queue.qsize() == 2  # closed: no longer fed


@pytest.mark.parametrize("access_log", [True, False])
def test_one_log_line_per_request_unless_turned_off(
    llama_tiny: LlamaServer, tmp_path: Path, access_log: bool
) -> None:
    config = tiny_config(llama_tiny, tmp_path / "data", log_format="json", access_log=access_log)
    node = NodeProcess(config, tmp_path).start()
    try:
        app = openai.OpenAI(base_url=node.url + "/v1", api_key="none", max_retries=0)
        answer = app.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        route = answer.headers["x-wwwserve-route"]
    finally:
        node.stop()
    lines = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    access = [e for e in lines if e.get("event") == "request"]
    if not access_log:
        assert access == []
        return
    [line] = access
    assert line["status"] == 200 and line["model"] == "tiny" and line["deployment"] == "tiny-1"
    assert line["route"] == route and line["completion_tokens"] > 0 and line["latency_ms"] > 0
    assert len(line["id"]) == 32 and line["error"] is None
