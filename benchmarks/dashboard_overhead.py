"""What the dashboard costs the node: CPU with nobody watching vs with a page open.

    python benchmarks/dashboard_overhead.py [--quick] [--out DIR] [--rate 500]

One `wwwserve node` (operator key set) in front of the instant stub (benchmarks/stub_server.py) gets a
paced load of `--rate` chat requests per second. Rounds alternate two settings, side by side in one
run: **unwatched** (no dashboard subscriber: the dashboard's sampler does not run, and nothing it
owns is on the request path) and **watched** (one live-feed subscriber, as an open /ui page is:
a snapshot a second, built from the metrics and the access records). The node's CPU time (psutil)
over each phase gives CPU% and CPU per request; the target: a watcher adds <= 2% CPU (of one
core) at 500 req/s. The load generator shares the machine: `rate` in the JSON is what it reached.
Writes dashboard_overhead.json and .png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from bench_common import BenchNode, Child, bench_parser, cpu_s, machine_info, stub_command

KEY = "bench-operator-key"


class Watcher:
    """An open dashboard page: reads the live feed (reconnecting as EventSource does) on a thread."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
            try:
                conn.request("GET", "/ui/api/events", headers={"Authorization": f"Bearer {KEY}"})
                resp = conn.getresponse()
                while not self._stop.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    if line.startswith(b"data: "):
                        json.loads(line[6:])  # what the browser does with it
                        self.events += 1
            except OSError:
                pass
            finally:
                conn.close()


async def paced_load(url: str, rate: float, seconds: float) -> tuple[int, int]:
    """`rate` requests a second for `seconds`: (sent, failed)."""
    body = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}
    sent = failed = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one() -> None:
            nonlocal failed
            try:
                async with session.post(url + "/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    failed += resp.status != 200
            except aiohttp.ClientError:
                failed += 1

        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks: set[asyncio.Task[None]] = set()
        while (now := loop.time()) - start < seconds:
            due = int((now - start) * rate) + 1
            while sent < due:
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    return sent, failed


def phase(node: BenchNode, rate: float, seconds: float, watched: bool) -> dict[str, Any]:
    ps = node.ps
    watcher = Watcher("127.0.0.1", node.port) if watched else None
    if watcher:
        watcher.__enter__()
        deadline = time.monotonic() + 10
        while watcher.events == 0 and time.monotonic() < deadline:  # the page has its first snapshot
            time.sleep(0.05)
    cpu0, t0 = cpu_s(ps), time.monotonic()
    sent, failed = asyncio.run(paced_load(node.url, rate, seconds))
    cpu, wall = cpu_s(ps) - cpu0, time.monotonic() - t0
    events = 0
    if watcher:
        events = watcher.events
        watcher.__exit__(None, None, None)
    return {
        "setting": "watched" if watched else "unwatched",
        "requests": sent,
        "failed": failed,
        "rate": sent / wall,
        "cpu_s": cpu,
        "cpu_pct": 100 * cpu / wall,
        "cpu_ms_per_request": 1000 * cpu / max(sent, 1),
        "snapshots": events,
    }


def main() -> None:
    parser = bench_parser(__doc__, "2 rounds of 5 s phases instead of 4 of 15 s")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    args = parser.parse_args()
    rounds, seconds = (2, 5.0) if args.quick else (4, 15.0)
    workdir = Path(__import__("tempfile").mkdtemp(prefix="dash-bench-"))
    stub = Child("stub", stub_command(20, 200, 1.0))
    model_list = [
        {
            "model_name": "stub",
            "litellm_params": {"model": "openai/stub", "api_base": stub.url + "/v1", "api_key": "x"},
        }
    ]
    node = BenchNode(workdir, "node", model_list, operator_keys=[KEY], access_log=False)
    results: list[dict[str, Any]] = []
    try:
        node.start(ready_timeout=60)
        asyncio.run(paced_load(node.url, args.rate, 2.0))  # warm-up
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for watched in order:
                result = phase(node, args.rate, seconds, watched) | {"round": r}
                results.append(result)
                print(json.dumps(result))
    finally:
        node.stop()
        stub.stop()

    def median(setting: str, key: str) -> float:
        return statistics.median(x[key] for x in results if x["setting"] == setting)

    summary = {
        setting: {k: median(setting, k) for k in ("rate", "cpu_pct", "cpu_ms_per_request")}
        for setting in ("unwatched", "watched")
    }
    ratio = summary["watched"]["cpu_ms_per_request"] / summary["unwatched"]["cpu_ms_per_request"]
    # What a watcher adds, in CPU% of one core at the load reached: the "<= 2% CPU".
    added = (summary["watched"]["cpu_ms_per_request"] - summary["unwatched"]["cpu_ms_per_request"]) * (
        summary["unwatched"]["rate"] / 10
    )
    report = {
        "target": "a watcher adds <= 2% CPU (of one core) at ~500 req/s",
        "cpu_ratio_watched_vs_unwatched": ratio,
        "added_cpu_pct": added,
        "pass": added <= 2.0 and summary["unwatched"]["rate"] >= 0.9 * args.rate,
        "summary": summary,
        "phases": results,
        "rounds": rounds,
        "phase_s": seconds,
        "machine": machine_info(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dashboard_overhead.json").write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, setting in enumerate(("unwatched", "watched")):
            values = [x["cpu_ms_per_request"] for x in results if x["setting"] == setting]
            ax.scatter([i] * len(values), values, alpha=0.6)
            ax.bar(i, statistics.median(values), alpha=0.35, width=0.5)
        ax.set_xticks([0, 1], ["nobody watching", "/ui open (SSE)"])
        ax.set_ylabel("node CPU ms per request")
        ax.set_title(f"dashboard overhead at {args.rate:g} req/s: x{ratio:.3f}")
        fig.tight_layout()
        fig.savefig(args.out / "dashboard_overhead.png", dpi=120)
    except ImportError:
        pass
    print(
        json.dumps(
            {"cpu_ratio": round(ratio, 4), "added_cpu_pct": round(added, 2), "summary": summary}, indent=2
        )
    )


if __name__ == "__main__":
    main()
