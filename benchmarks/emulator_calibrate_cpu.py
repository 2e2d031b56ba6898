"""Calibrate the emulator's CPU profile against the real embedded llama.cpp server, then check it.

    python benchmarks/emulator_calibrate_cpu.py [--quick] [--out DIR]

1. Measures llama.cpp (SmolLM2-135M-Instruct Q4_1, 1 thread, 4 slots of 512 tokens) from its own
   per-request `timings`: prefill tokens/s (300-token prompts), the decode time per token with 1 to 4
   requests decoding at once (short prompts), and with a long context (the KV-read cost).
2. Fits the profile: step(batch, kv) = base + per_seq x batch + per_kv x kv (least squares).
3. Replays one small open-loop workload (Poisson arrivals at 0.25/s, mixed lengths) against
   llama.cpp and against the emulator with the fitted profile (time scale 1), and compares latencies.

Writes emulator_calibration_cpu.json to --out (default benchmarks/results/). The machine is shared:
the load average is recorded, and the fitted numbers move with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import numpy as np
from bench_common import RunStart, bench_parser, client_session
from rich.console import Console

from tests.support import LlamaServer
from wwwserve_gateway.emulator.profiles import EngineProfile

os.environ.setdefault("WWWSERVE_MODELS_DIR", str(Path.home() / ".cache" / "wwwserve" / "models"))

console = Console(stderr=True)
SLOTS = 4
CTX = 2048  # llama.cpp splits it over the slots: 512 tokens each
WORDS = "time river stone light garden number window paper music orange silver market".split()
_rng = random.Random(1)


def prompt_text(words: int) -> str:
    """Fresh random words: llama.cpp's prompt cache must not make prefill look free."""
    return " ".join(_rng.choice(WORDS) for _ in range(words))


@dataclass(frozen=True)
class Plan:
    reps: int  # repetitions of each measurement
    replay: int  # requests in the replayed workload


async def chat(
    session: aiohttp.ClientSession, base: str, model: str, words: int, n: int, prompt_tokens: int = 0
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(words)}],
        "max_tokens": n,
        "ignore_eos": True,  # llama.cpp: generate exactly n tokens
        "cache_prompt": False,
        "x-emulator-output-tokens": n,
    }
    if prompt_tokens:  # the emulator is told the real tokenizer's count
        body["x-emulator-prompt-tokens"] = prompt_tokens
    t0 = time.perf_counter()
    async with session.post(base + "/chat/completions", json=body) as resp:
        data = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {data}")
    data["_wall_s"] = time.perf_counter() - t0
    return data


async def measure_llama(base: str, reps: int) -> dict[str, Any]:
    async with client_session(16, 300) as s:
        for _ in range(2):  # warm-up
            await chat(s, base, "smollm2", 50, 8)
        prefill = []
        for _ in range(reps):
            r = await chat(s, base, "smollm2", 300, 1)
            prefill.append(r["timings"]["prompt_per_second"])
        decode: dict[int, list[float]] = {}
        for batch in range(1, SLOTS + 1):
            for _ in range(reps):
                rs = await asyncio.gather(*(chat(s, base, "smollm2", 10, 64) for _ in range(batch)))
                decode.setdefault(batch, []).extend(r["timings"]["predicted_per_token_ms"] for r in rs)
        long_ctx = []
        long_prompt = 0
        for _ in range(reps):
            r = await chat(s, base, "smollm2", 380, 64)
            long_ctx.append(r["timings"]["predicted_per_token_ms"])
            long_prompt = r["usage"]["prompt_tokens"]
        short = await chat(s, base, "smollm2", 10, 1)
    return {
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_ms_by_batch": {b: statistics.median(v) for b, v in decode.items()},
        "decode_ms_long_context": statistics.median(long_ctx),
        "long_context_tokens": long_prompt + 32,  # mean context while decoding 64 tokens
        "short_context_tokens": short["usage"]["prompt_tokens"] + 32,
    }


def fit(m: dict[str, Any]) -> EngineProfile:
    batches = sorted(m["decode_ms_by_batch"])
    kv_short = m["short_context_tokens"]
    rows = np.array([[1.0, b, b * kv_short] for b in batches] + [[1.0, 1, m["long_context_tokens"]]])
    ms = np.array([m["decode_ms_by_batch"][b] for b in batches] + [m["decode_ms_long_context"]])
    (base, per_seq, per_kv), *_ = np.linalg.lstsq(rows, ms, rcond=None)
    return EngineProfile(
        name="smollm2-cpu",
        description="SmolLM2-135M-Instruct Q4_1 in llama.cpp, 1 CPU thread, 4 slots (calibrated here)",
        model="smollm2",
        decode_base_ms=round(max(0.1, float(base)), 2),
        decode_per_seq_ms=round(max(0.0, float(per_seq)), 2),
        decode_per_kv_token_us=round(max(0.0, float(per_kv)) * 1e3, 2),
        prefill_tokens_per_s=round(m["prefill_tokens_per_s"]),
        kv_capacity_tokens=CTX,
        max_batch=SLOTS,
        max_model_len=CTX // SLOTS,
        prefill_overlaps_decode=False,  # one CPU thread: prompt and decode tokens share its compute
    )


REPLAY_RATE = 0.25  # requests per second: about 75 % busy, so queues come and go without diverging


def workload(n: int, seed: int) -> list[tuple[float, int, int]]:
    """(arrival s, prompt words, output tokens): Poisson at REPLAY_RATE, mixed lengths."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(REPLAY_RATE)
        out.append((t, rng.choice([20, 100, 250]), rng.choice([16, 48, 96])))
    return out


async def replay(
    base: str, model: str, plan: list[tuple[float, int, int]], prompt_tokens: list[int] | None = None
) -> list[dict[str, Any]]:
    """Send the plan open-loop; each answer with its wall-clock latency in `_wall_s`."""
    tokens = prompt_tokens or [0] * len(plan)
    async with client_session(32, 300) as s:
        t0 = time.perf_counter()

        async def one(at: float, words: int, n: int, prompt: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            return await chat(s, base, model, words, n, prompt)

        return list(await asyncio.gather(*(one(*p, k) for p, k in zip(plan, tokens, strict=True))))


def start_emulator(profile_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [sys.executable, "-m", "wwwserve_gateway", "emulate-engine", "--profile", str(profile_path)]
    proc = subprocess.Popen([*cmd, "--port", "0"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("listening "):
        proc.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return proc, line.split()[1] + "/v1"


async def main() -> None:
    parser = bench_parser(__doc__, "fewer repetitions and a shorter replay")
    args = parser.parse_args()
    run = RunStart.now()
    plan_ = Plan(2, 12) if args.quick else Plan(5, 40)
    reps, n_replay = plan_.reps, plan_.replay
    from wwwserve_gateway.model_store import find_model, models_dir, pull

    model = find_model("smollm2") or pull("smollm2", models_dir())
    llama = LlamaServer(model, "smollm2", parallel=SLOTS)
    try:
        console.print("measuring llama.cpp ...")
        measured = await measure_llama(llama.base_url, reps)
        profile = fit(measured)
        console.print(profile.model_dump())
        plan = workload(n_replay, seed=7)
        console.print(f"replaying {n_replay} requests against llama.cpp ...")
        real_answers = await replay(llama.base_url, "smollm2", plan)
    finally:
        llama.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    profile_path = args.out / "emulator_profile_smollm2_cpu.json"
    profile_path.write_text(profile.model_dump_json(indent=1))
    emulator, base = start_emulator(profile_path)
    try:
        console.print("replaying against the emulator ...")
        counts = [a["usage"]["prompt_tokens"] for a in real_answers]
        emulated = [a["_wall_s"] for a in await replay(base, "smollm2", plan, counts)]
    finally:
        emulator.terminate()
        emulator.wait(10)
    real = [a["_wall_s"] for a in real_answers]
    report = {
        "meta": run.meta(args.quick, plan_),
        "measured": measured,
        "profile": profile.model_dump(),
        "replay": {
            "requests": n_replay,
            "llama_mean_s": statistics.mean(real),
            "emulator_mean_s": statistics.mean(emulated),
            "llama_p90_s": float(np.quantile(real, 0.9)),
            "emulator_p90_s": float(np.quantile(emulated, 0.9)),
            "mean_abs_error_s": statistics.mean(abs(a - b) for a, b in zip(real, emulated, strict=True)),
        },
    }
    (args.out / "emulator_calibration_cpu.json").write_text(json.dumps(report, indent=1))
    console.print(report["replay"])


if __name__ == "__main__":
    asyncio.run(main())
