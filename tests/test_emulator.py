"""The engine emulator: the timing model (no sockets), its real-time driver, and the HTTP server
against the official openai SDK."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.support import http_get, until, wait_until
from wwwserve_gateway.backends.vllm import VLLMBackend, load_from_metrics
from wwwserve_gateway.emulator.engine import EngineModel, RequestTooLong, SeqState, simulate
from wwwserve_gateway.emulator.profiles import PROFILES, EngineProfile, load_profile
from wwwserve_gateway.emulator.runtime import EngineRuntime

TOY = EngineProfile(
    name="toy",
    model="toy",
    decode_base_ms=10.0,
    decode_per_seq_ms=2.0,
    decode_per_kv_token_us=5.0,
    prefill_tokens_per_s=1000.0,
    kv_capacity_tokens=1000,
    max_batch=8,
    max_model_len=1000,
)


def first_step_seconds(p: EngineProfile, n: int, prompt: int) -> float:
    """The step that admits n requests: it prefills their prompts in the same forward pass as it
    decodes, so it costs the larger of the memory time and the prefill's compute time."""
    memory = p.decode_base_ms / 1e3 + p.decode_per_kv_token_us / 1e6 * n * prompt
    return p.decode_per_seq_ms * n / 1e3 + max(memory, p.prefill_seconds(n * prompt))


def modelled_batch_seconds(p: EngineProfile, n: int, prompt: int, output: int) -> float:
    """n identical requests admitted together: the first step (with the prefill), then one decode
    step per further token; each step reads the KV held at its start."""
    kv = n * prompt
    rest = sum(p.step_seconds(n, kv + n * i) for i in range(1, output))
    return first_step_seconds(p, n, prompt) + rest


# -- the timing model -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_a_batch_of_n_requests_takes_the_modelled_time(n: int) -> None:
    seqs = simulate(TOY, [(0.0, 50, 40)] * n)
    expected = modelled_batch_seconds(TOY, n, 50, 40)
    assert all(s.state is SeqState.FINISHED for s in seqs)
    assert [s.finished_at for s in seqs] == pytest.approx([expected] * n, rel=1e-9)
    first_step = first_step_seconds(TOY, n, 50)
    assert [s.first_token_at for s in seqs] == pytest.approx([first_step] * n, rel=1e-9)


def test_a_bigger_batch_is_slower_per_request_but_faster_in_total() -> None:
    one = simulate(TOY, [(0.0, 20, 100)])[0].finished_at
    eight = max(s.finished_at for s in simulate(TOY, [(0.0, 20, 100)] * 8))
    assert one < eight < 8 * one


def test_a_late_arrival_joins_at_the_next_step_boundary() -> None:
    engine = EngineModel(TOY)
    first = engine.submit(10, 200, at=0.0)
    engine.advance(0.5)
    late = engine.submit(10, 5, at=0.5)
    engine.advance(float("inf"))
    # It was admitted at the end of the step in progress at 0.5, not at 0.5 itself.
    assert late.admitted_at is not None and late.admitted_at >= 0.5
    assert late.admitted_at - 0.5 < TOY.step_seconds(2, 300) + TOY.prefill_seconds(10)
    assert first.finished_at > late.finished_at


def test_kv_exhaustion_makes_a_request_wait() -> None:
    engine = EngineModel(TOY)
    big = engine.submit(600, 300, at=0.0)  # will hold up to 900 of the 1000 tokens
    blocked = engine.submit(500, 10, at=0.0)  # 600 + 500 does not fit
    engine.advance(1.0)
    assert engine.load().running == 1 and engine.load().waiting == 1
    assert engine.load().kv_usage > 0.6
    engine.advance(float("inf"))
    assert blocked.admitted_at == pytest.approx(big.finished_at)
    alone = simulate(TOY, [(0.0, 500, 10)])[0].finished_at
    assert blocked.finished_at == pytest.approx(big.finished_at + alone)


def test_growing_sequences_that_outrun_the_kv_cache_preempt_the_newest() -> None:
    engine = EngineModel(TOY)
    older = engine.submit(100, 500, at=0.0)
    newer = engine.submit(100, 500, at=0.0)  # together they would need 1200 tokens
    engine.advance(float("inf"))
    assert older.preemptions == 0 and newer.preemptions == 1
    assert older.finished_at < newer.finished_at
    assert engine.kv_used == 0 and engine.load().running == 0


def test_a_request_longer_than_the_engine_holds_is_refused() -> None:
    with pytest.raises(RequestTooLong):
        EngineModel(TOY).submit(900, 200, at=0.0)


def test_cancelling_frees_the_kv_cache() -> None:
    engine = EngineModel(TOY)
    seq = engine.submit(100, 500, at=0.0)
    engine.advance(1.0)
    engine.cancel(seq, at=1.0)
    engine.advance(2.0)
    assert seq.state is SeqState.CANCELLED and engine.kv_used == 0


def test_built_in_profiles_and_profile_files(tmp_path) -> None:
    for profile in PROFILES.values():
        assert profile.kv_capacity_tokens >= profile.max_model_len
        assert 0.005 < profile.step_seconds(1, 1000) < 0.05
    path = tmp_path / "p.yaml"
    path.write_text(TOY.model_dump_json())  # JSON is YAML
    assert load_profile(str(path)) == TOY
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("no-such-profile")


# -- real time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [50.0, 200.0])
async def test_the_time_scale_divides_durations(scale: float) -> None:
    runtime = EngineRuntime(TOY, time_scale=scale)
    await runtime.start()
    try:
        modelled = modelled_batch_seconds(TOY, 1, 50, 400)  # about 6 engine seconds
        t0 = time.monotonic()
        seq = runtime.submit(50, 400)
        assert await runtime.wait(seq, within_s=30)
        wall = time.monotonic() - t0
    finally:
        await runtime.stop()
    assert seq.finished_at - seq.arrival == pytest.approx(modelled, rel=1e-6)
    assert modelled / scale <= wall < modelled / scale + 0.5


# -- HTTP, with the official openai SDK -----------------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    cmd = [sys.executable, "-m", "wwwserve_gateway", "emulate-engine", "--profile", "qwen3-8b-rtx3090"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--time-scale", "1000", "--model", "qwen3-8b", "--seed", "3"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    try:
        assert line.startswith("listening http://"), line
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


def test_openai_sdk_against_the_emulator(emulator: str) -> None:
    client = openai.OpenAI(base_url=emulator + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()] == ["qwen3-8b"]
    messages = [{"role": "user", "content": "x" * 400}]  # 100 tokens + 3 for the template

    capped = client.chat.completions.create(model="qwen3-8b", messages=messages, max_tokens=50)
    assert capped.choices[0].finish_reason == "length"
    assert capped.choices[0].message.content == "tok " * 50
    assert (capped.usage.prompt_tokens, capped.usage.completion_tokens) == (103, 50)

    told = client.chat.completions.create(
        model="qwen3-8b",
        messages=messages,
        max_tokens=100,
        extra_body={"x-emulator-output-tokens": 7, "x-emulator-prompt-tokens": 900},
    )
    assert told.choices[0].finish_reason == "stop"
    assert (told.usage.prompt_tokens, told.usage.completion_tokens, told.usage.total_tokens) == (900, 7, 907)

    stream = client.chat.completions.create(
        model="qwen3-8b",
        messages=messages,
        max_tokens=300,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok " * 300
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 300

    done = client.completions.create(model="qwen3-8b", prompt="y" * 40, max_tokens=12)
    assert done.choices[0].text == "tok " * 12 and done.usage.prompt_tokens == 10

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=messages, max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen3-8b", messages=messages, max_tokens=40_000)


def test_metrics_carry_the_gauges_the_vllm_backend_reads(emulator: str) -> None:
    def load():
        text = http_get(emulator + "/metrics")[1].decode()
        b = VLLMBackend
        return load_from_metrics(text, b.running_metric, b.waiting_metric, b.usage_metrics)

    idle = load()
    assert idle is not None and (idle.running, idle.waiting, idle.usage) == (0, 0, 0.0)
    # 20,000 tokens take about 600 engine seconds: 0.6 s at time scale 1000.
    client = openai.OpenAI(base_url=emulator + "/v1", api_key="none", max_retries=0)
    body = {"x-emulator-output-tokens": 20_000}
    worker = threading.Thread(
        target=client.chat.completions.create,
        kwargs={
            "model": "qwen3-8b",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 30_000,
            "extra_body": body,
        },
    )
    worker.start()
    busy = wait_until(lambda: (lambda x: x if x and x.running == 1 else None)(load()), 10, what="running 1")
    assert 0 < busy.usage < 1
    worker.join(30)
    assert not worker.is_alive()
    assert load().running == 0


async def test_a_client_that_leaves_cancels_its_request(emulator: str) -> None:
    gauge = 'vllm:num_requests_running{engine="0",model_name="qwen3-8b"}'

    def running(n: int) -> bool:
        return f"{gauge} {float(n)!r}" in http_get(emulator + "/metrics")[1].decode()

    async with httpx.AsyncClient(base_url=emulator, timeout=5) as client:
        # 30,000 tokens: about a second at time scale 1000.
        body = {"model": "qwen3-8b", "messages": [{"role": "user", "content": "go"}], "max_tokens": 30_000}
        request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        await until(lambda: running(1), 5, what="the engine has the request")
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    # Well before the request would have finished, the engine has dropped it.
    await until(lambda: running(0), 0.5, what="the engine dropped the request")


def test_on_a_cpu_prefill_and_decode_add_up() -> None:
    cpu = TOY.model_copy(update={"prefill_overlaps_decode": False})
    first = simulate(cpu, [(0.0, 50, 1)])[0].finished_at
    memory = cpu.decode_base_ms / 1e3 + cpu.decode_per_kv_token_us / 1e6 * 50
    assert first == pytest.approx(cpu.decode_per_seq_ms / 1e3 + memory + cpu.prefill_seconds(50))
    assert simulate(TOY, [(0.0, 50, 1)])[0].finished_at < first
