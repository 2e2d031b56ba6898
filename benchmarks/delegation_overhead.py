"""What delegation adds on top of serving locally: latency, time to first token, throughput, CPU.

    python benchmarks/delegation_overhead.py [--quick] [--out DIR] [--no-llama] [--profile]

Everything runs on loopback, side by side in one run, with the paths interleaved round by round
(order rotated each round) so that load from other jobs on the machine hits them alike:

  direct           aiohttp client -> instant stub (benchmarks/stub_server.py)
  local            client -> node A (openai/ pass-through, its policy serves locally) -> stub
  delegated        client -> entry node E (never serves locally) -> encrypted websocket overlay
                   -> executor node X (accepts everything) -> stub
  llama-direct     client -> llama.cpp server (tiny random model, 1 thread)
  llama-local      client -> node A (llamacpp/tiny-random, api_base) -> llama.cpp
  llama-delegated  client -> E -> overlay -> X (llamacpp/tiny-random, api_base) -> llama.cpp

E, X and A are `wwwserve node` processes; E and X form one network (a genesis file, X bootstraps
through E and bonds stake), A runs alone. Every answer's `x-wwwserve-route` header is checked:
a delegated answer must name two hops (E, then X), a local one a single hop (A).

Streams: the stub's ordinary stream has 1 content chunk (sent at once); its "long" stream has
LONG_CHUNKS content chunks, one every GAP_MS (like a backend generating tokens). The streamed
settings use the long stream; the 1-chunk stream at the same concurrency is the baseline of the
per-chunk CPU figure: (CPU per long stream - CPU per 1-chunk stream) / (LONG_CHUNKS - 1), for each
process (each hop), after taking off each process's idle (background) CPU rate over the same wall time.

The client is this process (uvloop, keep-alive); the nodes, the stub and llama.cpp are separate
processes whose CPU time is read with psutil around each measured round. Writes
delegation_overhead.json and delegation_overhead.png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import httpx
import numpy as np
import psutil
import uvloop
import yaml
from bench_common import (
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
    cpu_s,
    figure_title,
    find_py_spy,
    fmt,
    founding_allocations,
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
    wait_until,
)
from rich.columns import Columns
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROUTE = "x-wwwserve-route"
LONG_CHUNKS = 128  # content chunks of a streamed stub answer, one every GAP_MS
GAP_MS = 1.0
LLAMA_MAX_TOKENS = 16
# llama.cpp closes idle keep-alive connections' HTTP threads slowly (see gateway_overhead.py): every
# pool towards it (the client's, A's, X's, E's) is capped at this, and llama paths run at c=1 and c=4.
LLAMA_POOL = 4
# More slots than concurrent requests, so the executor's policy (usage < target 1.0, usage = busy
# slots / slots) always finds llama.cpp idle and accepts: this benchmark measures the relay, not the policy.
LLAMA_SLOTS = 8
# The stub is "infinitely parallel": with the default capacity of 1 the policies would see any
# concurrent request as overload (A would try to offload, X would decline).
STUB_CAPACITY = 1024
BOND = 100
EXPECTED_HOPS = {"direct": 0, "local": 1, "delegated": 2}

console = Console(stderr=True)

TARGETS = {
    "added_p50_ms": 2.0,  # delegated - local, non-streamed p50
    "added_ttft_ms": 3.0,  # delegated - local, streamed TTFT p50
    "cpu_ms_per_chunk_per_hop": 0.05,
}

POLICIES = {
    "A": {"target_usage": 1.0},
    "E": {"target_usage": -1, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0},
    "X": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND},
}
HOPS = {"local": ("A",), "delegated": ("E", "X"), "direct": ()}
PROC_LABEL = {
    "A": "local node A",
    "E": "entry E",
    "X": "executor X",
    "stub": "stub",
    "llama": "llama.cpp",
    "client": "client (aiohttp)",
}


@dataclass(frozen=True)
class Plan:
    c1: int  # non-stream and 1-chunk stream requests per path at c=1
    c32: int  # ... at c=32
    s1: int  # long streams per path at c=1
    s32: int  # long streams per path at c=32
    rounds: int
    warmup: int
    llama_c1: int
    llama_cn: int
    idle_s: float
    llama: bool

    @classmethod
    def make(cls, quick: bool, llama: bool) -> Plan:
        if quick:
            return cls(150, 640, 6, 64, 2, 30, 0, 0, 1.5, False)
        return cls(800, 3200, 24, 256, 4, 100, 120, 240, 3.0, llama)


def setting(key: str, concurrency: int, stream: bool, label: str) -> Setting:
    return Setting(key, concurrency, stream, label)


SETTINGS = {
    s.key: s
    for s in (
        setting("c1", 1, False, "c=1"),
        setting("c1-stream1", 1, True, "c=1 stream 1 chunk"),
        setting("c1-stream", 1, True, f"c=1 stream {LONG_CHUNKS}x{GAP_MS:g}ms"),
        setting("c32", 32, False, "c=32"),
        setting("c32-stream1", 32, True, "c=32 stream 1 chunk"),
        setting("c32-stream", 32, True, f"c=32 stream {LONG_CHUNKS}x{GAP_MS:g}ms"),
        setting("llama-c1", 1, False, "c=1 (llama)"),
        setting("llama-c1-stream", 1, True, f"c=1 stream {LLAMA_MAX_TOKENS} tok (llama)"),
        setting(f"llama-c{LLAMA_POOL}", LLAMA_POOL, False, f"c={LLAMA_POOL} (llama)"),
        setting(
            f"llama-c{LLAMA_POOL}-stream",
            LLAMA_POOL,
            True,
            f"c={LLAMA_POOL} stream {LLAMA_MAX_TOKENS} tok (llama)",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# processes


class Node(BenchNode):
    """A `wwwserve node` with a network, bootstrap peers and policy settings; `id` once started."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        model_list: list[dict[str, Any]],
        policy: dict[str, Any],
        network: Path,
        bootstrap: list[str],
    ) -> None:
        super().__init__(
            workdir, name, model_list, network=str(network), bootstrap=bootstrap, request_timeout=60
        )
        self.config["policy"] = {"settings": policy}
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.id = ""

    def start_measured(self) -> float:
        """Start; seconds from the spawn until /health/ready answered (polled every 10 ms)."""
        self.start(ready_timeout=60, interval=0.01)
        self.id = self.own_id()
        assert self.ready_s is not None
        return self.ready_s

    def counters(self, prefix: str = "wwwserve_") -> dict[str, float]:
        out: dict[str, float] = {}
        with contextlib.suppress(httpx.HTTPError):
            for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
                if line.startswith(prefix) and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    wanted = ("delegation", "failover", "peer_requests", "bad_receipts")
                    if "_created" not in name and any(w in name for w in wanted):
                        with contextlib.suppress(ValueError):
                            out[name] = float(value)
        return out

    def log_findings(self) -> dict[str, Any]:
        """Warnings, errors and tracebacks in the node's log (structlog console format)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
        levels: Counter = Counter()
        examples: list[str] = []
        events: Counter = Counter()
        for line in plain.splitlines():
            m = re.search(r"\[(warning|error|critical|exception)\s*\]\s+(.*?)(\s{2,}|$)", line)
            if m:
                levels[m.group(1)] += 1
                events[f"{m.group(1)}: {m.group(2).strip()}"] += 1
                if len(examples) < 5:
                    examples.append(line.strip()[:300])
            elif line.startswith("Traceback"):
                levels["traceback"] += 1
        return {"levels": dict(levels), "events": dict(events.most_common(10)), "examples": examples}


def stub_entries(stub_base: str) -> list[dict[str, Any]]:
    return [
        {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{name}",
                "api_base": stub_base,
                "api_key": "x",
                "max_parallel_requests": STUB_CAPACITY,
            },
        }
        for name in ("stub", "stub-long")
    ]


def llama_entry(llama_url: str) -> dict[str, Any]:
    return {
        "model_name": "tiny",
        "litellm_params": {
            "model": "llamacpp/tiny-random",
            "api_base": llama_url + "/v1",
            "max_connections": LLAMA_POOL,
            "n_parallel": LLAMA_SLOTS,
        },
    }


def filesystem(path: Path) -> str:
    """The type of the file system holding `path` (ext4, tmpfs, ...)."""
    best = ("", "?")
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") + "/"
        if (str(path.resolve()) + "/").startswith(mount) and len(mount) > len(best[0]):
            best = (mount, part.fstype)
    return best[1]


def wait_network(entry: Node, executor: Node, timeout: float) -> float:
    """Seconds until the entry sees the executor alive with stake > 0 and its bond in the ledger."""
    t0 = time.monotonic()
    seen: dict[str, Any] = {}

    def staked() -> bool:
        x = entry.peers().get(executor.id, {})
        seen.update(state=x.get("state"), stake=x.get("stake"))
        seen["bonded"] = entry.balances().get(executor.id, {}).get("bonded")
        return seen["state"] == "alive" and (seen["stake"] or 0) > 0 and seen["bonded"] == BOND

    try:
        wait_until(staked, timeout, 0.2, what="executor alive and staked at the entry")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc} (last seen: {seen})") from None
    return time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# load


class RouteTarget(HttpTarget):
    """HttpTarget that also counts the hops named in each answer's x-wwwserve-route header (a wrong
    route is counted, not failed: the answer itself is fine)."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, model: str, expect: int, **extra: Any
    ) -> None:
        super().__init__(session, base, model, **extra)
        self.expect = expect
        self.hops: Counter = Counter()
        self.executors: Counter = Counter()

    def answered(self, resp: aiohttp.ClientResponse) -> None:
        route = resp.headers.get(ROUTE)
        hops = route.split(",") if route else []
        self.hops[len(hops)] += 1
        if hops:
            self.executors[hops[-1]] += 1


def hop_summary(targets: list[RouteTarget]) -> dict[str, Any]:
    hops: Counter = Counter()
    executors: Counter = Counter()
    expect = targets[0].expect if targets else 0
    for t in targets:
        hops += t.hops
        executors += t.executors
    total = sum(hops.values())
    return {
        "expected_hops": expect,
        "answers": total,
        "by_hops": {str(k): v for k, v in sorted(hops.items())},
        "wrong_route": total - hops.get(expect, 0),
        "last_hop": dict(executors),
    }


async def idle_rates(procs: dict[str, psutil.Process], seconds: float) -> dict[str, float]:
    """Each process's CPU ms per second with no requests (gossip, load polls, ledger)."""
    before = {k: cpu_s(p) for k, p in procs.items()}
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    wall = time.perf_counter() - t0
    return {k: (cpu_s(p) - before[k]) / wall * 1e3 for k, p in procs.items()}


async def profile_nodes(
    progress: Progress, nodes: dict[str, Node], target: RouteTarget, setting: Setting, n: int, out_dir: Path
) -> dict[str, Any]:
    """py-spy (non-blocking) on E and X at once during a delegated load."""
    spy = find_py_spy()
    if spy is None:
        return {"error": "py-spy is not installed"}
    raws = {name: out_dir / f"delegation_profile_{setting.key}_{name}.txt" for name in nodes}
    spies = {}
    for name, node in nodes.items():
        spies[name] = await start_py_spy(spy, node.ps.pid, raws[name], 250)
    await asyncio.sleep(0.5)
    task = progress.add_task(f"profile {setting.label:<22} E, X", total=n)
    await run_load(target, setting.stream, n, setting.concurrency, lambda k: progress.advance(task, k), 300)
    out: dict[str, Any] = {}
    for name, proc in spies.items():
        err = await stop_py_spy(proc)
        raw = raws[name]
        if raw.exists():
            out[name] = summarize_profile(raw)  # the summary goes into the JSON; the raw file is not kept
            raw.unlink()
        else:
            out[name] = {"error": err.decode(errors="replace")[-500:]}
    return out


async def measure(
    plan: Plan,
    progress: Progress,
    stub: Child,
    llama: Llama | None,
    nodes: dict[str, Node],
    profile: bool,
    out_dir: Path,
) -> tuple[dict[str, dict[str, Acc]], dict[str, Any], dict[str, float], dict[str, Any]]:
    procs = {"A": nodes["A"].ps, "E": nodes["E"].ps, "X": nodes["X"].ps, "stub": stub.ps}
    if llama is not None:
        procs["llama"] = llama.ps
    idle = await idle_rates(procs, plan.idle_s)
    bench = Bench(progress, procs)
    routes: dict[str, dict[str, list[RouteTarget]]] = {}
    profiles: dict[str, Any] = {}

    def target(
        path: str, key: str, s: aiohttp.ClientSession, base: str, model: str, **extra: Any
    ) -> RouteTarget:
        kind = path.removeprefix("llama-")
        t = RouteTarget(s, base, model, EXPECTED_HOPS[kind], **extra)
        routes.setdefault(path, {}).setdefault(key, []).append(t)
        return t

    bases = {"direct": stub.url, "local": nodes["A"].url, "delegated": nodes["E"].url}
    async with (
        client_session(64, 120) as s_direct,
        client_session(64, 120) as s_local,
        client_session(64, 120) as s_deleg,
        client_session(LLAMA_POOL, 120) as s_llama,
    ):
        sessions = {"direct": s_direct, "local": s_local, "delegated": s_deleg}
        p = plan
        for key in ("c1", "c1-stream1", "c1-stream", "c32", "c32-stream1", "c32-stream"):
            st = SETTINGS[key]
            long = key.endswith("-stream")
            model = "stub-long" if long else "stub"
            if long:
                n = p.s1 if st.concurrency == 1 else p.s32
                warm = max(2, min(st.concurrency, n // 4))
            else:
                n = p.c1 if st.concurrency == 1 else p.c32
                warm = p.warmup
            paths = [(name, target(name, key, sessions[name], bases[name], model), n) for name in bases]
            await bench.compare(st, paths, p.rounds, warm)
        if llama is not None:
            lbases = {
                "llama-direct": llama.url,
                "llama-local": nodes["A"].url,
                "llama-delegated": nodes["E"].url,
            }
            lsessions = {"llama-direct": s_llama, "llama-local": s_local, "llama-delegated": s_deleg}
            for key in ("llama-c1", "llama-c1-stream", f"llama-c{LLAMA_POOL}", f"llama-c{LLAMA_POOL}-stream"):
                st = SETTINGS[key]
                n = p.llama_c1 if st.concurrency == 1 else p.llama_cn
                paths = [
                    (
                        name,
                        target(name, key, lsessions[name], lbases[name], "tiny", max_tokens=LLAMA_MAX_TOKENS),
                        n,
                    )
                    for name in lbases
                ]
                await bench.compare(st, paths, p.rounds, 16)
        if profile:
            for key, n in (("c1", p.c1), ("c32", p.c32), ("c32-stream", p.s32)):
                st = SETTINGS[key]
                model = "stub-long" if key.endswith("-stream") else "stub"
                t = target("delegated", f"profile-{key}", s_deleg, nodes["E"].url, model)
                profiles[key] = await profile_nodes(
                    progress, {"E": nodes["E"], "X": nodes["X"]}, t, st, n, out_dir
                )
    hops = {path: {key: hop_summary(ts) for key, ts in by.items()} for path, by in routes.items()}
    return bench.acc, hops, idle, profiles


# --------------------------------------------------------------------------------------------
# figures


def net_cpu_ms_per_req(acc: Acc, idle: dict[str, float]) -> dict[str, float]:
    """Each process's CPU per request, less its idle rate over the rounds' wall time."""
    per = max(acc.n, 1)
    return {k: (v * 1e3 - idle.get(k, 0.0) * acc.wall) / per for k, v in acc.cpu.items()}


def derive(results: dict[str, dict[str, dict[str, Any]]], plan: Plan) -> dict[str, Any]:
    def get(path: str, key: str) -> dict[str, Any] | None:
        return results.get(path, {}).get(key)

    added: dict[str, dict[str, Any]] = {}
    for path, base in (
        ("delegated", "local"),
        ("local", "direct"),
        ("llama-delegated", "llama-local"),
        ("llama-local", "llama-direct"),
    ):
        for key in SETTINGS:
            row, ref = get(path, key), get(base, key)
            e = added_latency(row, ref)
            if e is None:
                continue
            if row and ref and "added_ttft_p50_ms" in e:
                e["added_ttft_p99_ms"] = row["ttft_p99_ms"] - ref["ttft_p99_ms"]
            added.setdefault(path, {})[key] = {"vs": base, **e}

    per_chunk: dict[str, dict[str, dict[str, float]]] = {}
    per_chunk_raw: dict[str, dict[str, dict[str, float]]] = {}
    for path in ("direct", "local", "delegated"):
        for conc in ("c1", "c32"):
            long, one = get(path, f"{conc}-stream"), get(path, f"{conc}-stream1")
            if not long or not one:
                continue
            for proc in ("A", "E", "X", "stub", "client"):
                if proc == "client":
                    a, b = long["client_cpu_ms_per_req"], one["client_cpu_ms_per_req"]
                    na, nb = a, b
                else:
                    a, b = long["process_cpu_ms_per_req"][proc], one["process_cpu_ms_per_req"][proc]
                    na, nb = long["net_cpu_ms_per_req"][proc], one["net_cpu_ms_per_req"][proc]
                if proc in HOPS[path] or proc in ("stub", "client"):
                    per_chunk.setdefault(path, {}).setdefault(proc, {})[conc] = (na - nb) / (LONG_CHUNKS - 1)
                    per_chunk_raw.setdefault(path, {}).setdefault(proc, {})[conc] = (a - b) / (
                        LONG_CHUNKS - 1
                    )
    # Delegation leaves work for later (paying receipts in batches; the executor pulls, verifies and
    # folds the pay operations): some of its CPU lands in the next path's rounds. Charged to the
    # delegated requests: E's and X's CPU over every path's rounds of a setting, per delegated request.
    deferred: dict[str, dict[str, dict[str, float]]] = {}
    for prefix in ("", "llama-"):
        for key in SETTINGS:
            rows = [get(prefix + p, key) for p in ("direct", "local", "delegated")]
            if not all(rows):
                continue
            n = rows[2]["requests"] or 1
            for proc in ("E", "X"):
                total = sum(r["net_cpu_ms_per_req"].get(proc, 0.0) * r["requests"] for r in rows)
                entry = deferred.setdefault(prefix + "delegated", {}).setdefault(key, {})
                entry[proc] = total / n
                entry[proc + " in own rounds"] = rows[2]["net_cpu_ms_per_req"].get(proc, 0.0)
    return {
        "added": added,
        "cpu_ms_per_chunk": per_chunk,
        "cpu_ms_per_chunk_raw": per_chunk_raw,
        "cpu_ms_per_delegated_req_incl_deferred": deferred,
    }


def evaluate(results: dict, derived: dict, hops: dict) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, unit: str, note: str = "") -> None:
        targets.append(target_result(name, value, limit, "<=", unit, note))

    d = derived["added"].get("delegated", {})
    for suffix, field, what, limit in (
        ("", "p50_ms", "added p50 over local, non-stream", TARGETS["added_p50_ms"]),
        ("-stream", "ttft_p50_ms", "added TTFT p50 over local, stream", TARGETS["added_ttft_ms"]),
    ):
        for conc in ("c1", "c32"):
            key = conc + suffix
            loc = results.get("local", {}).get(key, {})
            dl = results.get("delegated", {}).get(key, {})
            note = f"local {fmt(loc.get(field))} ms, delegated {fmt(dl.get(field))} ms"
            add(f"{what} ({conc})", d.get(key, {}).get(f"added_{field}"), limit, "ms", note)
    pc = derived["cpu_ms_per_chunk"]
    raw = derived["cpu_ms_per_chunk_raw"]
    for path, proc in (("delegated", "E"), ("delegated", "X"), ("local", "A")):
        for conc in ("c1", "c32"):
            v = pc.get(path, {}).get(proc, {}).get(conc)
            r = raw.get(path, {}).get(proc, {}).get(conc)
            ref = pc.get("direct", {})
            note = (
                f"without idle correction {fmt(r, 4)} ms; for scale, on the direct path the stub "
                f"{fmt(ref.get('stub', {}).get(conc), 4)} ms and the client {fmt(ref.get('client', {}).get(conc), 4)} ms"
                + ("; the local path's one hop" if proc == "A" else "")
            )
            add(
                f"CPU per chunk, {PROC_LABEL[proc]} ({conc}, chunks {GAP_MS:g} ms apart)",
                v,
                TARGETS["cpu_ms_per_chunk_per_hop"],
                "ms",
                note,
            )
    wrong = sum(h.get("wrong_route", 0) for by in hops.values() for k, h in by.items())
    add("answers with the wrong number of hops (all paths)", wrong, 0, "")
    return targets


# --------------------------------------------------------------------------------------------
# output


ORDER = ["direct", "local", "delegated", "llama-direct", "llama-local", "llama-delegated"]
PATH_PROCS = {
    "direct": ("stub",),
    "local": ("A", "stub"),
    "delegated": ("E", "X", "stub"),
    "llama-direct": ("llama",),
    "llama-local": ("A", "llama"),
    "llama-delegated": ("E", "X", "llama"),
}


def print_tables(report: dict[str, Any]) -> None:
    out = Console() if Console().is_terminal else Console(width=200)
    results, derived, hops = report["results"], report["derived"], report["hops"]
    table = Table(title="delegation overhead: latency (ms), throughput, CPU ms per request (net of idle)")
    cols = (
        "path",
        "setting",
        "n",
        "err",
        "hops ok/bad",
        "p50",
        "p99",
        "TTFT p50",
        "TTFT p99",
        "req/s",
        "+p50 vs local",
        "+TTFT vs local",
        "CPU A",
        "CPU E",
        "CPU X",
        "CPU backend",
        "CPU client",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("path", "setting") else "right")
    for key, st in SETTINGS.items():
        any_row = False
        for path in ORDER:
            row = results.get(path, {}).get(key)
            if not row:
                continue
            any_row = True
            h = hops.get(path, {}).get(key, {})
            add = derived["added"].get(path, {}).get(key, {}) if path.endswith("delegated") else {}
            cpu = row["net_cpu_ms_per_req"]
            procs = PATH_PROCS[path]

            def c(proc: str, cpu=cpu, procs=procs) -> str:
                return fmt(cpu.get(proc), 3) if proc in procs else ""

            backend = "llama" if path.startswith("llama") else "stub"
            bad = h.get("wrong_route", 0)
            table.add_row(
                path,
                st.label,
                str(row["requests"]),
                f"{row['errors']}",
                f"{h.get('answers', 0) - bad}/" + (f"[red]{bad}[/red]" if bad else "0"),
                fmt(row["p50_ms"]),
                fmt(row["p99_ms"]),
                fmt(row["ttft_p50_ms"]),
                fmt(row["ttft_p99_ms"]),
                fmt(row["rps"], 0),
                fmt(add.get("added_p50_ms")),
                fmt(add.get("added_ttft_p50_ms")),
                c("A"),
                c("E"),
                c("X"),
                fmt(cpu.get(backend), 3),
                fmt(row["client_cpu_ms_per_req"], 3),
            )
        if any_row:
            table.add_section()
    out.print(table)

    chunks = Table(
        title=f"CPU ms per streamed chunk per hop ({LONG_CHUNKS} chunks {GAP_MS:g} ms apart, net of the 1-chunk stream)"
    )
    chunks.add_column("path")
    chunks.add_column("process")
    for col in ("c1", "c32", "c1 raw", "c32 raw"):
        chunks.add_column(col, justify="right")
    for path, by in derived["cpu_ms_per_chunk"].items():
        for proc, vals in by.items():
            raw = derived["cpu_ms_per_chunk_raw"][path][proc]
            chunks.add_row(
                path,
                PROC_LABEL.get(proc, proc),
                fmt(vals.get("c1"), 4),
                fmt(vals.get("c32"), 4),
                fmt(raw.get("c1"), 4),
                fmt(raw.get("c32"), 4),
            )
    out.print(chunks)

    dt = Table(
        title="CPU ms per delegated request: in its own rounds / incl. work deferred into other paths' rounds"
    )
    for col in ("path", "setting", "E own", "E incl. deferred", "X own", "X incl. deferred"):
        dt.add_column(col, justify="left" if col in ("path", "setting") else "right")
    for path, by in derived["cpu_ms_per_delegated_req_incl_deferred"].items():
        for key, v in by.items():
            dt.add_row(
                path,
                SETTINGS[key].label,
                fmt(v["E in own rounds"], 3),
                fmt(v["E"], 3),
                fmt(v["X in own rounds"], 3),
                fmt(v["X"], 3),
            )
    out.print(dt)

    out.print(targets_table(report["targets"], lambda v: fmt(v, 4) if isinstance(v, float) else str(v)))
    m = report["meta"]
    out.print(
        f"{machine_line(m)}; idle CPU ms/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in m["idle_cpu_ms_per_s"].items())
        + f"; run took {m['duration_s']:.0f} s"
    )
    for name, f in m["node_logs"].items():
        if f["levels"]:
            out.print(f"node {name} log: {f['levels']} {f['events']}")
    for key, by in report.get("profile", {}).items():
        tables = []
        for name, prof in by.items():
            if "error" in prof:
                out.print(f"profile {key} {name}: {prof['error']}")
                continue
            pt = Table(title=f"{PROC_LABEL[name]}, {key}, {prof['samples']} samples: self %")
            pt.add_column("%", justify="right")
            pt.add_column("innermost frame")
            for fn, share in prof["self_pct"][:12]:
                pt.add_row(f"{share:.1f}", fn[:90])
            for fn, share in prof["inclusive_pct_by_function"][:10]:
                pt.add_row(f"[dim]{share:.1f}[/dim]", f"[dim]incl. {fn[:84]}[/dim]")
            tables.append(pt)
        out.print(Columns(tables))


def plot(report: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    results, derived = report["results"], report["derived"]
    colors = {
        "direct": "#9467bd",
        "local": "#1f77b4",
        "delegated": "#d62728",
        "llama-direct": "#c5b0d5",
        "llama-local": "#aec7e8",
        "llama-delegated": "#ff9896",
    }
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))

    def grouped(ax, keys: list[str], labels: list[str], value, paths: list[str], annotate: bool = True):
        x = np.arange(len(keys))
        width = 0.8 / max(len(paths), 1)
        for i, p in enumerate(paths):
            vals = [value(p, k) for k in keys]
            bars = ax.bar(x + i * width, [v or 0 for v in vals], width, label=p, color=colors.get(p))
            if annotate:
                for bar, v in zip(bars, vals, strict=True):
                    if v:
                        ax.annotate(
                            f"{v:.2g}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=6,
                        )
        ax.set_xticks(x + width * (len(paths) - 1) / 2, labels, fontsize=8)

    def val(p: str, k: str, f: str) -> float | None:
        return (results.get(p, {}).get(k) or {}).get(f)

    stub_paths = [p for p in ("direct", "local", "delegated") if p in results]
    llama_paths = [p for p in ("llama-direct", "llama-local", "llama-delegated") if p in results]

    # 1: p50 / p99 latency
    ax = axes[0][0]
    keys = ["c1", "c1-stream", "c32", "c32-stream"]
    lk = [
        k
        for k in ("llama-c1", "llama-c1-stream", f"llama-c{LLAMA_POOL}", f"llama-c{LLAMA_POOL}-stream")
        if any(k in results.get(p, {}) for p in llama_paths)
    ]
    for q, hatch, alpha in (("p99_ms", "//", 0.35), ("p50_ms", None, 1.0)):
        x = np.arange(len(keys) + len(lk))
        width = 0.8 / 3
        for i, name in enumerate(("direct", "local", "delegated")):
            vals = [val(name, k, q) for k in keys] + [val("llama-" + name, k, q) for k in lk]
            ax.bar(
                x + i * width,
                [v or 0 for v in vals],
                width,
                color=colors[name],
                alpha=alpha,
                hatch=hatch,
                edgecolor="k",
                lw=0.2,
                label=f"{name} {q[:3]}",
            )
    ax.set_xticks(
        np.arange(len(keys) + len(lk)) + 0.8 / 3,
        [SETTINGS[k].label.replace(" stream", "\nstream") for k in keys + lk],
        fontsize=7,
        rotation=20,
    )
    ax.set_yscale("log")
    ax.set_ylabel("latency ms (log); solid p50, hatched p99")
    ax.set_title("Latency per path (llama.cpp paths to the right)")
    ax.legend(fontsize=7, ncol=2)

    # 2: TTFT
    ax = axes[0][1]
    keys = ["c1-stream1", "c1-stream", "c32-stream1", "c32-stream"]
    grouped(
        ax,
        keys,
        [SETTINGS[k].label.replace(" stream", "\nstream") for k in keys],
        lambda p, k: val(p, k, "ttft_p50_ms"),
        stub_paths,
    )
    if llama_paths:
        lkeys = [
            k
            for k in ("llama-c1-stream", f"llama-c{LLAMA_POOL}-stream")
            if any(k in results[p] for p in llama_paths)
        ]
        x0 = len(keys)
        width = 0.8 / 3
        for i, p in enumerate(llama_paths):
            vals = [val(p, k, "ttft_p50_ms") or 0 for k in lkeys]
            ax.bar(np.arange(x0, x0 + len(lkeys)) + i * width, vals, width, color=colors[p], label=p)
        ticks = list(np.arange(len(keys) + len(lkeys)) + width)
        ax.set_xticks(
            ticks,
            [SETTINGS[k].label.replace(" stream", "\nstream").replace(" (", "\n(") for k in keys + lkeys],
            fontsize=7,
        )
    ax.set_yscale("log")
    ax.set_ylabel("time to first byte of the body, p50 ms (log)")
    ax.set_title("Time to first token")
    ax.legend(fontsize=7)

    # 3: added by delegation over local
    ax = axes[1][0]
    add = derived["added"]
    labels, vals, cols = [], [], []
    for path in ("delegated", "llama-delegated"):
        for key, e in add.get(path, {}).items():
            labels.append(
                f"{'llama ' if path.startswith('llama') else ''}{SETTINGS[key].label.replace(' (llama)', '')}\np50"
            )
            vals.append(e["added_p50_ms"])
            cols.append(colors[path])
            if "added_ttft_p50_ms" in e:
                labels.append(labels[-1].replace("\np50", "\nTTFT"))
                vals.append(e["added_ttft_p50_ms"])
                cols.append(colors[path])
    x = np.arange(len(labels))
    bars = ax.bar(x, [max(v, 0.1) for v in vals], color=cols, edgecolor="k", lw=0.3)
    for bar, v in zip(bars, vals, strict=True):
        ax.annotate(
            f"{v:.2f}",
            (bar.get_x() + bar.get_width() / 2, max(v, 0.1)),
            ha="center",
            va="bottom",
            fontsize=6,
        )
    ax.axhline(TARGETS["added_p50_ms"], ls="--", c="k", lw=0.8, label="target p50 2 ms")
    ax.axhline(TARGETS["added_ttft_ms"], ls=":", c="k", lw=0.8, label="target TTFT 3 ms")
    ax.set_xticks(x, labels, fontsize=6, rotation=60)
    ax.set_yscale("log")
    ax.set_ylabel("delegated - local (ms, log; values <= 0.1 drawn at 0.1)")
    ax.set_title("What delegation adds over serving locally (p50 and TTFT p50)")
    ax.legend(fontsize=7)

    # 4: CPU per chunk per hop
    ax = axes[1][1]
    pc = derived["cpu_ms_per_chunk"]
    rows = [
        (f"{PROC_LABEL[proc]}\n({path})", pc[path][proc])
        for path, proc in (
            ("delegated", "E"),
            ("delegated", "X"),
            ("local", "A"),
            ("direct", "stub"),
            ("direct", "client"),
        )
        if proc in pc.get(path, {})
    ]
    x = np.arange(len(rows))
    for j, conc in enumerate(("c1", "c32")):
        vs = [r[1].get(conc) for r in rows]
        bars = ax.bar(
            x + j * 0.4,
            [max(v or 0, 1e-4) for v in vs],
            0.4,
            label=f"c={conc[1:]}",
            color=("#ff7f0e", "#2ca02c")[j],
        )
        for bar, v in zip(bars, vs, strict=True):
            ax.annotate(
                "-" if v is None else f"{v:.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(TARGETS["cpu_ms_per_chunk_per_hop"], ls="--", c="k", lw=0.8, label="target 0.05 ms per hop")
    ax.set_xticks(x + 0.2, [r[0] for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("CPU ms per chunk (log), net of idle CPU")
    ax.set_title(f"CPU per streamed chunk per hop ({LONG_CHUNKS} chunks {GAP_MS:g} ms apart)")
    ax.legend(fontsize=7)

    save_figure(fig, figure_title("delegation overhead", report["meta"]), out)


# --------------------------------------------------------------------------------------------
# the run


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "fewer requests, stub only: about a minute")
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp paths")
    parser.add_argument("--profile", action="store_true", help="also profile E and X with py-spy")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the nodes' data (ledger database) goes (default: the system temp dir); "
        "e.g. /dev/shm to see what the ledger's fsync'd commits cost",
    )
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick, not args.no_llama)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    run = RunStart.now()
    children: list[Child | Llama] = []
    nodes: dict[str, Node] = {}
    workdir = Path(tempfile.mkdtemp(prefix="delegation-overhead-", dir=args.data_dir))
    try:
        from wwwserve_gateway.network.genesis import (
            DuelParams,
            GossipParams,
            LedgerParams,
            NetworkGenesis,
            write_genesis,
        )

        with progress_bar(console) as progress:
            setup = progress.add_task("start stub", total=None)
            stub = Child("stub", stub_command(1, LONG_CHUNKS, GAP_MS))
            children.append(stub)
            llama = None
            if plan.llama:
                progress.update(setup, description="start llama.cpp (tiny model, 1 thread)")
                llama = tiny_llama(LLAMA_SLOTS, "--threads", "1")
                children.append(llama)

            # Gossip a little faster than the defaults so that X's stake reaches E within seconds;
            # probe and suspect timeouts stay at their defaults (a loaded 2-core machine is slow).
            # A large allocation to each node (to E above all), so that E never runs out of credits.
            genesis = workdir / "network.yaml"
            gossip = GossipParams(interval_s=0.5, refresh_s=2.0)
            allocations = founding_allocations(workdir, ["E", "X", "A"], 10_000_000)
            # Duels off: this benchmark measures one delegated hop, not the quality incentive.
            ledger = LedgerParams(
                allocations=allocations, price_per_request=1.0, duels=DuelParams(rate=0.0, canary_rate=0.0)
            )
            write_genesis(NetworkGenesis(name="delegation-bench", gossip=gossip, ledger=ledger), genesis)
            model_list = stub_entries(stub.url + "/v1")
            if llama is not None:
                model_list.append(llama_entry(llama.url))
            ready_s: dict[str, float] = {}
            for name in ("E", "X", "A"):
                progress.update(setup, description=f"start node {name}")
                bootstrap = [nodes["E"].url] if name == "X" else []
                node = Node(workdir, name, model_list, POLICIES[name], genesis, bootstrap)
                nodes[name] = node
                ready_s[name] = node.start_measured()
            progress.update(setup, description="wait until E sees X alive and staked")
            network_s = wait_network(nodes["E"], nodes["X"], 60)
            rss = {n: rss_mb(node.ps) for n, node in nodes.items()}
            progress.update(setup, description="setup done", total=1, completed=1)

            acc, hops, idle, profiles = uvloop.run(
                measure(plan, progress, stub, llama, nodes, args.profile, out_dir)
            )
            rss_after = {n: rss_mb(node.ps) for n, node in nodes.items()}
            counters = {n: node.counters() for n, node in nodes.items()}
            with contextlib.suppress(OSError, RuntimeError):
                balances = nodes["E"].balances()
                counters["ledger_at_E"] = {
                    n: balances.get(node.id) for n, node in nodes.items() if node.id in balances
                }

        results: dict[str, dict[str, Any]] = {}
        for path, by in acc.items():
            for key, a in by.items():
                row = summarize(a)
                row["net_cpu_ms_per_req"] = net_cpu_ms_per_req(a, idle)
                results.setdefault(path, {})[key] = row
        derived = derive(results, plan)
        targets = evaluate(results, derived, hops)
        report = {
            "meta": {
                **run.meta(args.quick, plan),
                "stream": {"chunks": LONG_CHUNKS, "gap_ms": GAP_MS, "baseline_chunks": 1},
                "llama": None
                if llama is None
                else {
                    "model": "tiny-random",
                    "threads": 1,
                    "slots": LLAMA_SLOTS,
                    "pool": LLAMA_POOL,
                    "max_tokens": LLAMA_MAX_TOKENS,
                },
                "policies": POLICIES,
                "genesis": {"gossip": gossip.model_dump(), "ledger": ledger.model_dump()},
                "node_ids": {n: node.id for n, node in nodes.items()},
                "node_data": {"dir": str(workdir), "filesystem": filesystem(workdir)},
                "node_ready_s": ready_s,
                "network_ready_s": network_s,
                "rss_mb": {"after_start": rss, "after_run": rss_after},
                "idle_cpu_ms_per_s": idle,
                "node_logs": {n: node.log_findings() for n, node in nodes.items()},
                "node_counters": counters,
                "cpu_per_chunk_method": (
                    f"per process (hop): (CPU ms per request of a {LONG_CHUNKS}-chunk stream - CPU ms per request "
                    f"of a 1-chunk stream at the same concurrency) / {LONG_CHUNKS - 1}; each round's CPU is taken "
                    "less the process's idle rate (idle_cpu_ms_per_s, measured before the load) x the round's "
                    "wall time ('raw': without that correction). The long stream's chunks are written one "
                    f"every {GAP_MS:g} ms (the stub's timer; in practice ~1.2 ms), as a generating backend would; "
                    "the 1-chunk stream is written at once. Same two-setting difference as gateway_overhead's "
                    "'spaced' figure, with the 1-chunk stream instead of a non-streamed request as baseline."
                ),
                "notes": [
                    "latencies are client-observed (aiohttp client in the benchmark process, uvloop, keep-alive)",
                    "TTFT = time to the first body bytes of a streamed answer (the stream's first event)",
                    "added = delegated - local (same setting, same run, interleaved rounds)",
                    "CPU per request: user+system CPU of each process per request, net of its idle rate "
                    "(results[..]['process_cpu_ms_per_req'] is without the correction)",
                    "delegation defers work (receipts paid in batches; X pulls, verifies and re-folds the pay "
                    "operations), which lands partly in other paths' rounds: "
                    "derived.cpu_ms_per_delegated_req_incl_deferred charges E's and X's CPU over all three "
                    "paths' rounds of a setting to the delegated requests",
                    "hops: the number of node ids in each answer's x-wwwserve-route header; delegated answers "
                    "must name 2 (E, X), local ones 1 (A); E has the models too (as in the tests), so a "
                    "delegation nobody accepts falls back to E's backend and shows up as 1 hop",
                    f"stub models have max_parallel_requests {STUB_CAPACITY} and llama.cpp {LLAMA_SLOTS} slots "
                    "(n_parallel), so that the policies see their backends idle: A always serves locally, X "
                    "always accepts",
                    f"llama paths: c=1 and c={LLAMA_POOL}, every pool towards llama.cpp capped at {LLAMA_POOL} "
                    "connections (llama.cpp's HTTP threads, see gateway_overhead.py); the client retries writes "
                    "on connections llama.cpp closed after a stream ('retries')",
                    "c=32 on this machine saturates its CPUs: latency there is mostly queueing behind CPU, and "
                    "the delegated path spends CPU in two node processes instead of one",
                ],
            },
            "results": results,
            "hops": hops,
            "derived": derived,
            "targets": targets,
            "profile": profiles,
        }
        (out_dir / "delegation_overhead.json").write_text(json.dumps(report, indent=2, default=str))
        plot(report, out_dir / "delegation_overhead.png")
        print_tables(report)
        console.print(
            f"wrote {out_dir / 'delegation_overhead.json'} and {out_dir / 'delegation_overhead.png'}"
        )
        return 0
    finally:
        tear_down([*nodes.values(), *reversed(children)], workdir)


if __name__ == "__main__":
    sys.exit(main())
