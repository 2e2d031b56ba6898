"""How close the emulator's GPU profiles come to the published benchmarks they were built from.

    python benchmarks/emulator_check.py [--quick] [--out DIR]

Replays each published benchmark's workload through the timing model offline (virtual time, no
sockets; vLLM's benchmark clients are closed loops: C clients, each sending its next request when
the last one is answered) and prints the model's figure next to the published one. Writes
emulator_check.json to --out (default benchmarks/results/). Runs in about a second.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_common import RunStart, bench_parser
from rich.console import Console
from rich.table import Table

from wwwserve_gateway.emulator.engine import EngineModel
from wwwserve_gateway.emulator.profiles import EngineProfile, derive_profile


@dataclass(frozen=True)
class Published:
    source: str
    model: str
    gpu: str
    prompt: int
    output: int
    concurrency: int
    metric: str  # "req/s" or "output tok/s"
    value: float


PUBLISHED = [
    # gigagpu.com, "RTX 3090: Maximum LLM Throughput": LLaMA 3 8B FP16, 128 in / 256 out, vLLM.
    *(
        Published("gigagpu RTX 3090 sweep", "llama-3.1-8b", "rtx3090", 128, 256, c, "req/s", v)
        for c, v in ((1, 0.17), (4, 0.58), (8, 0.98), (16, 1.55), (32, 2.10), (64, 2.40))
    ),
    # johnmusgrave.com, "vLLM throughput-latency sweep on NVIDIA A100": Llama-3.1-8B-Instruct BF16,
    # A100 40GB, vLLM 0.23, 1024 in / 128 out: 75 tok/s at concurrency 1, 6.6x that at 8.
    Published("johnmusgrave A100 sweep", "llama-3.1-8b", "a100", 1024, 128, 1, "output tok/s", 75.0),
    Published("johnmusgrave A100 sweep", "llama-3.1-8b", "a100", 1024, 128, 8, "output tok/s", 6.6 * 75.0),
    # r/LocalLLaMA "Qwen3 throughput benchmarks on 2x 3090": vLLM, 4096 in / 1024 out, data parallel
    # over two cards (per card: half the figure); concurrency not stated, so saturated (64).
    Published("LocalLLaMA 2x3090 Qwen3", "qwen3-8b", "rtx3090", 4096, 1024, 64, "output tok/s", 387 / 2),
    Published("LocalLLaMA 2x3090 Qwen3", "qwen3-4b", "rtx3090", 4096, 1024, 64, "output tok/s", 749 / 2),
]


def closed_loop(profile: EngineProfile, concurrency: int, prompt: int, output: int, requests: int) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last one is answered."""
    engine = EngineModel(profile)
    live = [engine.submit(prompt, output, 0.0) for _ in range(concurrency)]
    done = 0
    while done < requests:
        engine.advance_to_next_event()
        finished = [s for s in live if s.done]
        for seq in finished:
            live.remove(seq)
            done += 1
            live.append(engine.submit(prompt, output, engine.now))
    seconds = engine.now
    return {"req/s": done / seconds, "output tok/s": done * output / seconds}


def main() -> None:
    parser = bench_parser(__doc__, "fewer requests per point")
    args = parser.parse_args()
    run = RunStart.now()
    rows = []
    for pub in PUBLISHED:
        profile = derive_profile(pub.model, pub.gpu)
        n = max(4 * pub.concurrency, 40 if args.quick else 200)
        got = closed_loop(profile, pub.concurrency, pub.prompt, pub.output, n)[pub.metric]
        rows.append(
            pub.__dict__ | {"profile": profile.name, "model_value": got, "error": got / pub.value - 1}
        )
    table = Table(title="emulator vs published vLLM figures")
    for col in ("source", "profile", "in/out", "C", "metric", "published", "model", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["source"],
            r["profile"],
            f"{r['prompt']}/{r['output']}",
            str(r["concurrency"]),
            r["metric"],
            f"{r['value']:.2f}",
            f"{r['model_value']:.2f}",
            f"{100 * r['error']:+.0f}%",
        )
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "emulator_check.json").write_text(
        json.dumps({"meta": run.meta(args.quick, args), "rows": rows}, indent=1, default=str)
    )


if __name__ == "__main__":
    main()
