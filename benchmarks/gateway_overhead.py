"""What the gateway adds on top of a backend: latency, throughput, CPU, start-up time and memory.

    python benchmarks/gateway_overhead.py [--quick] [--out DIR] [--profile]

Everything runs on loopback, side by side in one run, with the paths interleaved round by round
so that load from other jobs on the machine hits them alike:

  direct         aiohttp client -> instant stub (benchmarks/stub_server.py)
  gateway        aiohttp client -> `wwwserve node` (openai/stub pass-through) -> stub
  gateway-nolog  the same with `node.access_log: false`: the access log's cost is the difference
  aiohttp-proxy  aiohttp client -> 30-line aiohttp proxy (benchmarks/aiohttp_proxy.py) -> stub
  litellm-sdk    litellm.Router(openai/stub).acompletion in the client process -> stub
  llama-direct   aiohttp client -> llama.cpp server (tiny random model)
  llama-gateway  aiohttp client -> `wwwserve node` (llamacpp/tiny-random, api_base) -> llama.cpp

The client is this process (uvloop, keep-alive); the gateway, the proxy, the stub and llama.cpp are
separate processes whose CPU time is read with psutil around each measured round. Writes
gateway_overhead.json and gateway_overhead.png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when imported

import numpy as np
import uvloop
from bench_common import (
    HERE,
    MESSAGES,
    Acc,
    Bench,
    BenchNode,
    Child,
    HttpTarget,
    Llama,
    RunStart,
    Setting,
    added_latency,
    bench_parser,
    client_session,
    figure_title,
    find_py_spy,
    fmt,
    machine_line,
    progress_bar,
    pyplot,
    rss_mb,
    run_load,
    save_figure,
    start_py_spy,
    stop_py_spy,
    stub_command,
    summarize,
    summarize_profile,
    target_result,
    targets_table,
    tear_down,
    tiny_llama,
)
from rich.columns import Columns
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

STREAM_CHUNKS = 20  # content chunks of an ordinary stub stream (sent at once)
LONG_CHUNKS = 200  # content chunks of a long stub stream (one every GAP_MS, like real generation)
GAP_MS = 1.0
LLAMA_MAX_TOKENS = 16
# llama.cpp's server gives each connection an HTTP thread (n_parallel + 2 of them here) and keeps an
# idle keep-alive connection's thread for up to 5 s: a client pool wider than that stalls new
# connections for 5-30 s. Both llama paths (the client's pool and the gateway's) are capped to this.
LLAMA_POOL = 4

console = Console(stderr=True)

TARGETS = {
    "added_p50_ms": 1.0,
    "added_p99_ms": 5.0,
    "rps_c32": 2000.0,
    "cpu_ratio_vs_litellm": 10.0,
    "cpu_ms_per_chunk": 0.05,
    "ready_s": 2.0,
    "idle_rss_mb": 150.0,
}


@dataclass(frozen=True)
class Plan:
    c1: int
    c32: int
    rounds: int
    warmup: int
    litellm_c1: int
    litellm_c32: int
    llama_c1: int
    llama_cn: int
    long: int
    litellm_long: int
    long_concurrency: int
    ready_runs: int
    profile_requests: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(300, 1000, 2, 40, 40, 96, 40, 64, 24, 8, 8, 2, 1500)
        return cls(2000, 6000, 4, 200, 200, 480, 240, 480, 96, 24, 8, 3, 6000)


# --------------------------------------------------------------------------------------------
# load generation


class LiteLLMTarget:
    def __init__(self, router: Any, model: str, **extra: Any) -> None:
        self.router = router
        self.model = model
        self.extra = extra
        self.retries = 0

    async def one(self, stream: bool) -> tuple[float | None, str | None]:
        if not stream:
            resp = await self.router.acompletion(model=self.model, messages=MESSAGES, **self.extra)
            return None, None if getattr(resp, "usage", None) else "answer without usage"
        resp = await self.router.acompletion(model=self.model, messages=MESSAGES, stream=True, **self.extra)
        first = None
        chunks = 0
        async for _ in resp:
            if first is None:
                first = time.perf_counter()
            chunks += 1
        return first, None if chunks else "empty stream"


SETTINGS = {
    s.key: s
    for s in (
        Setting("c1", 1, False, "c=1"),
        Setting("c1-stream", 1, True, f"c=1 stream {STREAM_CHUNKS}"),
        Setting("c32", 32, False, "c=32"),
        Setting("c32-stream", 32, True, f"c=32 stream {STREAM_CHUNKS}"),
        Setting("long-stream", 8, True, f"c=8 stream {LONG_CHUNKS}x{GAP_MS:g}ms"),
        # llama.cpp paths: as many concurrent requests as the server has slots (see LLAMA_POOL).
        Setting(f"c{LLAMA_POOL}", LLAMA_POOL, False, f"c={LLAMA_POOL} (llama)"),
        Setting(f"c{LLAMA_POOL}-stream", LLAMA_POOL, True, f"c={LLAMA_POOL} stream (llama)"),
    )
}


# --------------------------------------------------------------------------------------------
# profiling (optional)


async def profile_gateway(
    bench: Bench, gateway_pid: int, targets: dict[str, Any], out_dir: Path, n: int
) -> dict[str, Any]:
    """py-spy (non-blocking) on the gateway during a c=32 non-stream load and a long-stream load."""
    spy = find_py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    results: dict[str, Any] = {}
    for key, setting, count in (
        ("c32", SETTINGS["c32"], n),
        ("c32-stream", SETTINGS["c32-stream"], n // 2),
        ("long-stream", SETTINGS["long-stream"], max(16, n // 100)),
    ):
        raw = out_dir / f"gateway_profile_{key}.txt"
        spy_proc = await start_py_spy(spy, gateway_pid, raw, 500)
        await asyncio.sleep(0.5)
        task = bench.progress.add_task(f"profile {key:<16} gateway", total=count)
        await run_load(
            targets[key],
            setting.stream,
            count,
            setting.concurrency,
            lambda k, t=task: bench.progress.advance(t, k),
            300,
        )
        err = await stop_py_spy(spy_proc)
        if raw.exists():
            summary = summarize_profile(raw)
            packed = raw.with_name(raw.name + ".gz")
            packed.write_bytes(gzip.compress(raw.read_bytes()))
            raw.unlink()
            results[key] = {"raw": packed.name, **summary}
        else:
            results[key] = {"error": err.decode(errors="replace")[-500:]}
    return results


# --------------------------------------------------------------------------------------------
# the run


def start_node(node: BenchNode) -> float:
    """Start `node`; seconds from its spawn to its first 200 from /health/ready, polled every 10 ms."""
    node.start(ready_timeout=60, interval=0.01)
    assert node.ready_s is not None
    return node.ready_s


def stub_entry(name: str, api_base: str) -> dict[str, Any]:
    return {
        "model_name": name,
        "litellm_params": {"model": f"openai/{name}", "api_base": api_base, "api_key": "x"},
    }


async def measure(
    plan: Plan,
    progress: Progress,
    stub: Child,
    node: BenchNode,
    nolog: BenchNode,
    proxy: Child,
    llama: Llama | None,
    profile: bool,
    out_dir: Path,
) -> tuple[dict[str, dict[str, Acc]], dict[str, Any]]:
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    stub_base = stub.url + "/v1"
    router = litellm.Router(
        model_list=[
            {
                "model_name": "stub",
                "litellm_params": {"model": "openai/stub", "api_base": stub_base, "api_key": "x"},
            },
            {
                "model_name": "stub-long",
                "litellm_params": {"model": "openai/stub-long", "api_base": stub_base, "api_key": "x"},
            },
        ],
        num_retries=0,
        timeout=60,
    )
    procs = {"gateway": node.ps, "gateway-nolog": nolog.ps, "aiohttp-proxy": proxy.ps, "stub": stub.ps}
    if llama is not None:
        procs["llama"] = llama.ps
    bench = Bench(progress, procs)
    async with (
        client_session(64, 60) as direct_s,
        client_session(64, 60) as gateway_s,
        client_session(64, 60) as nolog_s,
        client_session(64, 60) as proxy_s,
        client_session(LLAMA_POOL, 60) as llama_s,
    ):
        direct = HttpTarget(direct_s, stub.url, "stub")
        gateway = HttpTarget(gateway_s, node.url, "stub")
        gateway_nolog = HttpTarget(nolog_s, nolog.url, "stub")
        proxied = HttpTarget(proxy_s, proxy.url, "stub")
        sdk = LiteLLMTarget(router, "stub")
        p = plan
        for key in ("c1", "c1-stream", "c32", "c32-stream"):
            s = SETTINGS[key]
            n = p.c1 if s.concurrency == 1 else p.c32
            n_sdk = p.litellm_c1 if s.concurrency == 1 else p.litellm_c32
            paths = [
                ("direct", direct, n),
                ("gateway", gateway, n),
                ("gateway-nolog", gateway_nolog, n),
                ("aiohttp-proxy", proxied, n),
                ("litellm-sdk", sdk, n_sdk),
            ]
            await bench.compare(s, paths, p.rounds, p.warmup)
        long_paths = [
            ("direct", HttpTarget(direct_s, stub.url, "stub-long"), p.long),
            ("gateway", HttpTarget(gateway_s, node.url, "stub-long"), p.long),
            ("aiohttp-proxy", HttpTarget(proxy_s, proxy.url, "stub-long"), p.long),
            ("litellm-sdk", LiteLLMTarget(router, "stub-long"), p.litellm_long),
        ]
        await bench.compare(SETTINGS["long-stream"], long_paths, 2, 4)
        if llama is not None:
            llama_direct = HttpTarget(llama_s, llama.url, "tiny", max_tokens=LLAMA_MAX_TOKENS)
            llama_gateway = HttpTarget(gateway_s, node.url, "tiny", max_tokens=LLAMA_MAX_TOKENS)
            for key in ("c1", "c1-stream", f"c{LLAMA_POOL}", f"c{LLAMA_POOL}-stream"):
                s = SETTINGS[key]
                n = p.llama_c1 if s.concurrency == 1 else p.llama_cn
                paths = [("llama-direct", llama_direct, n), ("llama-gateway", llama_gateway, n)]
                await bench.compare(s, paths, p.rounds, min(p.warmup, 20))
        profiles: dict[str, Any] = {}
        if profile:
            profiles = await profile_gateway(
                bench,
                node.ps.pid,
                {"c32": gateway, "c32-stream": gateway, "long-stream": long_paths[1][1]},
                out_dir,
                p.profile_requests,
            )
    with contextlib.suppress(Exception):
        router.retire() if hasattr(router, "retire") else None
    return bench.acc, profiles


def derive(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Added latency vs the direct path, and the CPU each path costs per request and per chunk."""

    def get(path: str, key: str) -> dict[str, Any] | None:
        return results.get(path, {}).get(key)

    added: dict[str, dict[str, Any]] = {}
    for path, base in (
        ("gateway", "direct"),
        ("gateway-nolog", "direct"),
        ("aiohttp-proxy", "direct"),
        ("litellm-sdk", "direct"),
        ("llama-gateway", "llama-direct"),
    ):
        for key in SETTINGS:
            entry = added_latency(get(path, key), get(base, key))
            if entry is not None:
                added.setdefault(path, {})[key] = entry

    # CPU per request of the component that each path adds.
    cpu: dict[str, dict[str, float]] = {}
    for key in SETTINGS:
        d = get("direct", key)
        client_direct = d["client_cpu_ms_per_req"] if d else None
        for path, proc in (
            ("gateway", "gateway"),
            ("gateway-nolog", "gateway-nolog"),
            ("aiohttp-proxy", "aiohttp-proxy"),
            ("llama-gateway", "gateway"),
        ):
            row = get(path, key)
            if row:
                cpu.setdefault(path, {})[key] = row["process_cpu_ms_per_req"][proc]
        row = get("litellm-sdk", key)
        if row and client_direct is not None:
            cpu.setdefault("litellm-sdk", {})[key] = row["client_cpu_ms_per_req"] - client_direct
        if d:
            cpu.setdefault("aiohttp-client", {})[key] = client_direct
            cpu.setdefault("stub", {})[key] = d["process_cpu_ms_per_req"]["stub"]
        row = get("llama-direct", key)
        if row and "llama" in row["process_cpu_ms_per_req"]:
            cpu.setdefault("llama.cpp", {})[key] = row["process_cpu_ms_per_req"]["llama"]

    per_chunk: dict[str, dict[str, float]] = {}
    for path, per_req in cpu.items():
        if path in ("stub", "llama.cpp", "llama-gateway", "aiohttp-client", "gateway-nolog"):
            continue
        for conc in ("c1", "c32"):
            if f"{conc}-stream" in per_req and conc in per_req:
                per_chunk.setdefault(path, {})[f"burst {conc}"] = (
                    per_req[f"{conc}-stream"] - per_req[conc]
                ) / STREAM_CHUNKS
        if "long-stream" in per_req and "c32" in per_req:
            per_chunk.setdefault(path, {})["spaced c8"] = (
                per_req["long-stream"] - per_req["c32"]
            ) / LONG_CHUNKS
    ratios = {}
    for key in ("c1", "c32", "c1-stream", "c32-stream", "long-stream"):
        g, sdk = cpu.get("gateway", {}).get(key), cpu.get("litellm-sdk", {}).get(key)
        if g and sdk:
            ratios[key] = sdk / g
    # The most requests/s one process could serve if it had a core to itself: 1 / CPU per request.
    ceiling = {
        path: {key: 1000 / v for key, v in per_req.items() if v and v > 0}
        for path, per_req in cpu.items()
        if path in ("gateway", "aiohttp-proxy", "litellm-sdk")
    }
    # The access log's cost: the same node with it on minus with it off, same settings, same run.
    access_log: dict[str, dict[str, float]] = {}
    for key in SETTINGS:
        on, off = cpu.get("gateway", {}).get(key), cpu.get("gateway-nolog", {}).get(key)
        lat_on = added.get("gateway", {}).get(key, {}).get("added_p50_ms")
        lat_off = added.get("gateway-nolog", {}).get(key, {}).get("added_p50_ms")
        if on is not None and off is not None:
            access_log[key] = {"cpu_ms_per_req": on - off}
            if lat_on is not None and lat_off is not None:
                access_log[key]["p50_ms"] = lat_on - lat_off
    return {
        "access_log": access_log,
        "added": added,
        "cpu_ms_per_req": cpu,
        "cpu_bound_rps_ceiling": ceiling,
        "cpu_ms_per_chunk": per_chunk,
        "litellm_over_gateway_cpu": ratios,
    }


def evaluate(results: dict, derived: dict, ready: list[float], rss: dict[str, float]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, op: str, unit: str, note: str = "") -> None:
        targets.append(target_result(name, value, limit, op, unit, note))

    nan = float("nan")
    g = derived["added"].get("gateway", {})
    px = derived["added"].get("aiohttp-proxy", {})
    for key, label in (("c1", "non-stream"), ("c1-stream", "stream, total")):
        for q in ("p50", "p99"):
            ref = px.get(key, {}).get(f"added_{q}_ms")
            note = f"aiohttp proxy: {ref:+.2f} ms" if ref is not None else ""
            value = g.get(key, {}).get(f"added_{q}_ms")
            add(f"added {q} at c=1 ({label})", value, TARGETS[f"added_{q}_ms"], "<=", "ms", note)
    gw = results.get("gateway", {})
    direct_rps = results.get("direct", {}).get("c32", {}).get("rps")
    proxy_rps = results.get("aiohttp-proxy", {}).get("c32", {}).get("rps")
    note = f"direct {direct_rps:.0f}/s, aiohttp proxy {proxy_rps:.0f}/s" if direct_rps and proxy_rps else ""
    busy = gw.get("c32", {}).get("process_busy", {}).get("gateway")
    ceiling = derived["cpu_bound_rps_ceiling"].get("gateway", {}).get("c32")
    if busy is not None and ceiling:
        note += f"; gateway CPU busy {busy:.0%}, 1/CPU-per-request = {ceiling:.0f}/s"
    rps = gw.get("c32", {}).get("rps")
    add("requests/s through one gateway process at c=32", rps, TARGETS["rps_c32"], ">=", "req/s", note)
    for key in ("c1", "c32"):
        ratio = derived["litellm_over_gateway_cpu"].get(key)
        name = f"LiteLLM SDK CPU / gateway CPU per request ({SETTINGS[key].label})"
        add(name, ratio, TARGETS["cpu_ratio_vs_litellm"], ">=", "x")
    chunk = derived["cpu_ms_per_chunk"].get("gateway", {})
    proxy_chunk = derived["cpu_ms_per_chunk"].get("aiohttp-proxy", {}).get("spaced c8", nan)
    note = f"aiohttp proxy {proxy_chunk:.4f} ms; burst (20 at once): {chunk.get('burst c32', nan):.4f} ms"
    name = "gateway CPU per streamed chunk (chunks 1 ms apart)"
    add(name, chunk.get("spaced c8"), TARGETS["cpu_ms_per_chunk"], "<=", "ms", note)
    median_ready = float(np.median(ready)) if ready else None
    note = "runs: " + ", ".join(f"{r:.2f}" for r in ready)
    add("node ready after start (median)", median_ready, TARGETS["ready_s"], "<=", "s", note)
    add("idle RSS after start", rss.get("after_start"), TARGETS["idle_rss_mb"], "<=", "MB")
    add("idle RSS after the run", rss.get("after_run"), TARGETS["idle_rss_mb"], "<=", "MB")
    return targets


def print_tables(report: dict[str, Any]) -> None:
    out = Console() if Console().is_terminal else Console(width=190)
    results, derived = report["results"], report["derived"]
    table = Table(title="gateway overhead: latency, throughput, CPU (ms per request)")
    for col in (
        "path",
        "setting",
        "n",
        "err/retry",
        "p50",
        "p99",
        "+p50",
        "+p99",
        "req/s",
        "TTFT p50",
        "+TTFT",
        "added CPU/req",
        "client CPU/req",
    ):
        table.add_column(col, justify="left" if col in ("path", "setting") else "right")
    order = [
        "direct",
        "gateway",
        "gateway-nolog",
        "aiohttp-proxy",
        "litellm-sdk",
        "llama-direct",
        "llama-gateway",
    ]
    for key, setting in SETTINGS.items():
        for path in order:
            row = results.get(path, {}).get(key)
            if not row:
                continue
            add = derived["added"].get(path, {}).get(key, {})
            cpu = derived["cpu_ms_per_req"].get(path, {}).get(key)
            table.add_row(
                path,
                setting.label,
                str(row["requests"]),
                f"{row['errors']}/{row['retries']}",
                fmt(row["p50_ms"]),
                fmt(row["p99_ms"]),
                fmt(add.get("added_p50_ms")),
                fmt(add.get("added_p99_ms")),
                fmt(row["rps"], 0),
                fmt(row["ttft_p50_ms"]),
                fmt(add.get("added_ttft_p50_ms")),
                fmt(cpu, 3),
                fmt(row["client_cpu_ms_per_req"], 3),
            )
        table.add_section()
    out.print(table)

    chunks = Table(title="CPU per streamed chunk (ms)")
    chunks.add_column("path")
    for col in ("burst c1", "burst c32", "spaced c8"):
        chunks.add_column(col, justify="right")
    for path, vals in derived["cpu_ms_per_chunk"].items():
        chunks.add_row(path, *(fmt(vals.get(c), 4) for c in ("burst c1", "burst c32", "spaced c8")))
    out.print(chunks)

    access = Table(title="access log cost (gateway minus gateway-nolog, same run)")
    for col in ("setting", "CPU ms/req", "p50 ms"):
        access.add_column(col, justify="left" if col == "setting" else "right")
    for key, vals in derived.get("access_log", {}).items():
        access.add_row(SETTINGS[key].label, fmt(vals.get("cpu_ms_per_req"), 4), fmt(vals.get("p50_ms"), 3))
    out.print(access)

    out.print(targets_table(report["targets"], lambda v: fmt(v, 3)))
    m = report["meta"]
    out.print(f"{machine_line(m)}; run took {m['duration_s']:.0f} s")
    for key, prof in report.get("profile", {}).items():
        if "error" in prof:
            out.print(f"profile {key}: {prof['error']}")
            continue
        title = f"gateway profile, {SETTINGS[key].label}, {prof['samples']} samples"
        pt = Table(title=f"{title}: self time")
        pt.add_column("%", justify="right")
        pt.add_column("innermost Python frame")
        for fn, share in prof["self_pct"][:14]:
            pt.add_row(f"{share:.1f}", fn)
        it = Table(title="inclusive")
        it.add_column("%", justify="right")
        it.add_column("package / function")
        for name, share in prof["inclusive_pct_by_package"][:8]:
            it.add_row(f"{share:.1f}", f"[bold]{name}[/bold]")
        for name, share in prof["inclusive_pct_by_function"][:10]:
            it.add_row(f"{share:.1f}", name)
        out.print(Columns([pt, it]))


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    results, derived = report["results"], report["derived"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    colors = {
        "gateway": "#1f77b4",
        "aiohttp-proxy": "#7f7f7f",
        "litellm-sdk": "#d62728",
        "llama-gateway": "#2ca02c",
        "direct": "#9467bd",
        "llama-direct": "#8c564b",
        "aiohttp-client": "#bcbd22",
        "stub": "#17becf",
        "llama.cpp": "#e377c2",
    }

    # 1: added latency at c=1
    ax = axes[0][0]
    paths = [p for p in ("gateway", "aiohttp-proxy", "litellm-sdk", "llama-gateway") if p in derived["added"]]
    labels = ["p50 c=1", "p99 c=1", "p50 c=1 stream", "p99 c=1 stream"]
    x = np.arange(len(labels))
    width = 0.8 / max(len(paths), 1)
    for i, p in enumerate(paths):
        a = derived["added"][p]
        vals = [
            a.get("c1", {}).get("added_p50_ms"),
            a.get("c1", {}).get("added_p99_ms"),
            a.get("c1-stream", {}).get("added_p50_ms"),
            a.get("c1-stream", {}).get("added_p99_ms"),
        ]
        vals = [v if v is not None else 0 for v in vals]
        ax.bar(x + i * width, vals, width, label=p, color=colors.get(p))
    ax.axhline(TARGETS["added_p50_ms"], ls="--", c="k", lw=0.8, label="target p50 1 ms")
    ax.axhline(TARGETS["added_p99_ms"], ls=":", c="k", lw=0.8, label="target p99 5 ms")
    ax.axhline(0, c="k", lw=0.5)
    ax.set_xticks(x + width * (len(paths) - 1) / 2, labels)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("added latency vs direct (ms, symlog: linear below 1 ms)")
    ax.set_title("Added latency at concurrency 1")
    ax.legend(fontsize=8)

    # 2: requests/s at c=32
    ax = axes[0][1]
    paths = [
        p
        for p in ("direct", "gateway", "aiohttp-proxy", "litellm-sdk", "llama-direct", "llama-gateway")
        if p in results
    ]
    x = np.arange(len(paths))
    for j, (key, hatch) in enumerate((("c32", None), ("c32-stream", "//"))):
        keys = [key.replace("c32", f"c{LLAMA_POOL}") if p.startswith("llama") else key for p in paths]
        vals = [(results[p].get(k) or {}).get("rps") or 0 for p, k in zip(paths, keys, strict=True)]
        bars = ax.bar(
            x + j * 0.4, vals, 0.4, hatch=hatch, color=[colors.get(p) for p in paths], edgecolor="k", lw=0.3
        )
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(
                f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7
            )
    from matplotlib.patches import Patch

    ax.axhline(TARGETS["rps_c32"], ls="--", c="k", lw=0.8)
    ax.legend(
        handles=[
            Patch(facecolor="white", edgecolor="k", label="non-stream"),
            Patch(facecolor="white", edgecolor="k", hatch="//", label=f"stream ({STREAM_CHUNKS} chunks)"),
            plt.Line2D([], [], ls="--", c="k", lw=0.8, label="target 2000/s (gateway)"),
        ],
        fontsize=8,
    )
    labels = [f"{p}\n(c={LLAMA_POOL})" if p.startswith("llama") else p for p in paths]
    ax.set_xticks(x + 0.2, labels, rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title(f"Throughput at concurrency 32 (llama.cpp: {LLAMA_POOL}), one process each")

    # 3: CPU per request
    ax = axes[1][0]
    cpu = derived["cpu_ms_per_req"]
    comps = [c for c in ("gateway", "aiohttp-proxy", "litellm-sdk", "aiohttp-client", "stub") if c in cpu]
    keys = ["c1", "c32", "c1-stream", "c32-stream"]
    x = np.arange(len(keys))
    width = 0.8 / max(len(comps), 1)
    for i, c in enumerate(comps):
        vals = [max(cpu[c].get(k) or 0, 1e-4) for k in keys]
        ax.bar(x + i * width, vals, width, label=c, color=colors.get(c))
    ax.set_xticks(x + width * (len(comps) - 1) / 2, [SETTINGS[k].label for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("CPU ms per request (log)")
    ax.set_title("CPU per request of each component (litellm-sdk: net of the aiohttp client)")
    ax.legend(fontsize=8)

    # 4: CPU per chunk
    ax = axes[1][1]
    pc = derived["cpu_ms_per_chunk"]
    comps = [c for c in ("gateway", "aiohttp-proxy", "litellm-sdk") if c in pc]
    kinds = ["burst c1", "burst c32", "spaced c8"]
    x = np.arange(len(kinds))
    width = 0.8 / max(len(comps), 1)
    for i, c in enumerate(comps):
        raw_vals = [pc[c].get(k) for k in kinds]
        vals = [max(v or 0, 1e-4) for v in raw_vals]
        bars = ax.bar(x + i * width, vals, width, label=c, color=colors.get(c))
        for bar, v in zip(bars, raw_vals, strict=True):
            text = "-" if v is None else (f"{v:.3f}" if v > 0 else "<=0 (noise)")
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if v is not None and v <= 0 else 0,
            )
    ax.axhline(TARGETS["cpu_ms_per_chunk"], ls="--", c="k", lw=0.8, label="target 0.05 ms")
    ax.set_xticks(
        x + width * (len(comps) - 1) / 2,
        [
            f"burst, c=1 ({STREAM_CHUNKS} at once)",
            f"burst, c=32 ({STREAM_CHUNKS} at once)",
            f"spaced, c=8 ({LONG_CHUNKS}, {GAP_MS:g} ms apart)",
        ],
    )
    ax.set_yscale("log")
    ax.set_ylabel("CPU ms per chunk (log)")
    ax.set_title("CPU per streamed chunk")
    ax.legend(fontsize=8)

    m = report["meta"]
    title = (
        f"{figure_title('gateway overhead', m)}; "
        f"node ready {m['ready_median_s']:.2f} s; idle RSS {m['rss_mb'].get('after_start', 0):.0f} MB"
    )
    save_figure(fig, title, path)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "fewer requests: finishes within a minute")
    parser.add_argument("--profile", action="store_true", help="also profile the gateway with py-spy")
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp paths")
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunStart.now()
    children: list[Child | Llama] = []
    nodes: list[BenchNode] = []
    workdir = Path(tempfile.mkdtemp(prefix="gateway-overhead-"))
    report: dict[str, Any] = {}
    try:
        with progress_bar(console) as progress:
            setup = progress.add_task("start stub", total=None)
            stub = Child("stub", stub_command(STREAM_CHUNKS, LONG_CHUNKS, GAP_MS))
            children.append(stub)
            stub_base = stub.url + "/v1"

            # Node ready time: a node with only the stub backend, spawned afresh each time.
            ready: list[float] = []
            ready_rss: list[float] = []
            for i in range(plan.ready_runs):
                progress.update(setup, description=f"node ready time, run {i + 1}/{plan.ready_runs}")
                probe = BenchNode(workdir, f"ready{i}", [stub_entry("stub", stub_base)])
                nodes.append(probe)
                ready.append(start_node(probe))
                ready_rss.append(rss_mb(probe.ps))
                probe.stop()

            llama = None
            if not args.no_llama:
                progress.update(setup, description="start llama.cpp (tiny model)")
                llama = tiny_llama(LLAMA_POOL)
                children.append(llama)

            progress.update(setup, description="start gateway node and aiohttp proxy")
            model_list = [stub_entry("stub", stub_base), stub_entry("stub-long", stub_base)]
            if llama is not None:
                model_list.append(
                    {
                        "model_name": "tiny",
                        "litellm_params": {
                            "model": "llamacpp/tiny-random",
                            "api_base": llama.url + "/v1",
                            "max_connections": LLAMA_POOL,
                        },
                    }
                )
            node = BenchNode(workdir, "gateway", model_list)
            nodes.append(node)
            node_ready = start_node(node)
            nolog = BenchNode(workdir, "gateway-nolog", model_list[:1], access_log=False)
            nodes.append(nolog)
            start_node(nolog)
            proxy = Child(
                "aiohttp-proxy",
                [sys.executable, str(HERE / "aiohttp_proxy.py"), "--upstream", stub.url, "--port", "0"],
            )
            children.append(proxy)

            progress.update(setup, description="import litellm")
            t0 = time.perf_counter()
            c0 = time.process_time()
            import litellm  # noqa: F401

            litellm_import = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            time.sleep(1.0)
            rss = {"after_start": rss_mb(node.ps)}
            progress.update(setup, description="setup done", total=1, completed=1)

            acc, profiles = uvloop.run(
                measure(plan, progress, stub, node, nolog, proxy, llama, args.profile, out_dir)
            )
            time.sleep(1.0)
            rss["after_run"] = rss_mb(node.ps)
            rss["ready_probe_at_ready"] = float(np.median(ready_rss))
            rss["aiohttp_proxy_after_run"] = rss_mb(proxy.ps)
            rss["stub_after_run"] = rss_mb(stub.ps)

        results = {path: {key: summarize(a) for key, a in by.items()} for path, by in acc.items()}
        derived = derive(results)
        targets = evaluate(results, derived, ready, rss)
        report = {
            "meta": {
                **run.meta(args.quick, plan),
                "stream_chunks": STREAM_CHUNKS,
                "long_stream": {"chunks": LONG_CHUNKS, "gap_ms": GAP_MS, "concurrency": 8},
                "ready_median_s": float(np.median(ready)),
                "rss_mb": rss,
                "litellm_import": litellm_import,
                "main_node_ready_s": node_ready,
                "notes": [
                    "latencies are client-observed (aiohttp client in the benchmark process, uvloop, keep-alive)",
                    "added = path minus direct (llama-gateway minus llama-direct), same setting, same run",
                    "added CPU/req: user+system CPU of the gateway / proxy process per request; for "
                    "litellm-sdk, this process's CPU per request minus the aiohttp client's per direct request",
                    f"CPU per chunk: (CPU per stream - CPU per non-stream request at c=32) / chunks; burst = "
                    f"{STREAM_CHUNKS} chunks written at once, spaced = {LONG_CHUNKS} chunks {GAP_MS:g} ms apart",
                    "paths are interleaved round by round; order rotates each round",
                    f"llama paths: the client's pool and the gateway's (max_connections) are capped at {LLAMA_POOL} "
                    "connections; with the default pool (256) llama.cpp stalls new connections for 5-30 s "
                    "(one HTTP thread per connection, 5 s keep-alive)",
                    "llama.cpp closes the connection after every streamed answer although it announces "
                    "keep-alive: the benchmark client retries such failed writes (column 'retries'); the "
                    "gateway does not, so its errors on llama streams are 502s from reusing those connections",
                ],
            },
            "node_ready_s": ready,
            "results": results,
            "derived": derived,
            "targets": targets,
            "profile": profiles,
        }
        (out_dir / "gateway_overhead.json").write_text(json.dumps(report, indent=2))
        plot(report, out_dir / "gateway_overhead.png")
        print_tables(report)
        console.print(f"wrote {out_dir / 'gateway_overhead.json'} and {out_dir / 'gateway_overhead.png'}")
        return 0
    finally:
        tear_down([*nodes, *reversed(children)], workdir)


if __name__ == "__main__":
    sys.exit(main())
