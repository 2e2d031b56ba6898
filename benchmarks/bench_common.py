"""What the benchmarks share: their command line, progress bar and run facts (machine, package versions,
load average), the processes they start (stub, proxy, llama.cpp, `wwwserve node`) and psutil's view of
them, the load generator and its accounting, py-spy, and the pieces of a report (added latency, targets,
the targets table, figures).

The benchmarks run as scripts (`python benchmarks/NAME.py`): this folder is then on sys.path, and they
import this module as `bench_common`. Importing it puts the repository root on sys.path (for
`tests.support`, whose loopback helpers the benchmarks share with the tests, and for `simulation/`), and
sets the defaults the benchmarks' child processes need: LITELLM_LOCAL_MODEL_COST_MAP and
WWWSERVE_MODELS_DIR (models persist between runs, as in the tests).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("WWWSERVE_MODELS_DIR", str(Path.home() / ".cache" / "wwwserve" / "models"))

from tests.support import ListeningChild, LlamaServer, NodeProcess  # noqa: E402
from tests.support import founding_allocations as founding_allocations  # noqa: E402
from tests.support import http_status as http_status  # noqa: E402  (re-exported for the benchmarks)
from tests.support import wait_until as wait_until  # noqa: E402

# --------------------------------------------------------------------------------------------
# the run


def bench_parser(description: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A parser with --quick and --out (default benchmarks/results/); the caller adds the rest."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    return parser


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        refresh_per_second=4,
    )


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("wwwserve", "litellm", "aiohttp", "uvicorn", "uvloop", "httptools", "starlette", "xllamacpp"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass(frozen=True)
class RunStart:
    """When a run started and the load average then: the head of the report's "meta"."""

    started: float
    t0: float
    loadavg_before: list[float]

    @classmethod
    def now(cls) -> RunStart:
        return cls(time.time(), time.monotonic(), loadavg())

    def meta(self, quick: bool, plan: Any) -> dict[str, Any]:
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "quick": quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "duration_s": time.monotonic() - self.t0,
            "machine": machine_info(),
            "loadavg_before": self.loadavg_before,
            "loadavg_after": loadavg(),
            "versions": versions(),
            "plan": plan.__dict__,
        }


class Stoppable(Protocol):
    def stop(self) -> None: ...


def verdict(ok: bool | None) -> str:
    """PASS or MISS, coloured for rich."""
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def tear_down(processes: Iterable[Stoppable], workdir: Path) -> None:
    """Stop the processes in order, then remove `workdir` and what is left in it."""
    for proc in processes:
        proc.stop()
    for f in sorted(workdir.rglob("*"), reverse=True):
        with contextlib.suppress(OSError):
            f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    with contextlib.suppress(OSError):
        workdir.rmdir()


# --------------------------------------------------------------------------------------------
# processes: the stub, the proxy, llama.cpp and nodes, and psutil's view of them


class Measured:
    """psutil's view of a child process (`ps`): its CPU times and memory."""

    proc: subprocess.Popen[bytes] | None

    @property
    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)


class Child(Measured, ListeningChild):
    """A child server that prints 'listening URL' and exits when its stdin closes (stub, proxy)."""


class Llama(Measured, LlamaServer):
    """A llama.cpp server (tests.support.LlamaServer), measured."""


class BenchNode(Measured, NodeProcess):
    """`wwwserve node` (tests.support.NodeProcess) serving `model_list`, measured. Start it with
    `start(ready_timeout=..., interval=0.01)`: `ready_s` is then the start-up time to within 10 ms."""

    def __init__(self, workdir: Path, name: str, model_list: list[dict[str, Any]], **node: Any) -> None:
        super().__init__({"node": node, "model_list": model_list}, workdir, name)


def cpu_s(ps: psutil.Process) -> float:
    t = ps.cpu_times()
    return t.user + t.system


def rss_mb(ps: psutil.Process) -> float:
    return ps.memory_info().rss / 2**20


def stub_command(chunks: int, long_chunks: int, gap_ms: float) -> list[str]:
    """benchmarks/stub_server.py on a free port: `chunks` content chunks per ordinary stream (sent at
    once), `long_chunks` per "stub-long" stream (one every `gap_ms`)."""
    return [
        sys.executable,
        str(HERE / "stub_server.py"),
        "--port",
        "0",
        "--chunks",
        str(chunks),
        "--long-chunks",
        str(long_chunks),
        "--gap-ms",
        str(gap_ms),
    ]


def tiny_llama(parallel: int, *extra: str) -> Llama:
    """A llama.cpp server (alias "tiny") on a free port with the tiny random model, pulled if missing;
    ready when returned."""
    from wwwserve_gateway.model_store import TINY_MODEL, find_model, models_dir, pull

    model = find_model(TINY_MODEL) or pull(TINY_MODEL, models_dir())
    return Llama(model, "tiny", parallel=parallel, extra=extra)


# --------------------------------------------------------------------------------------------
# load: the client, its targets and the accounting of each round

DONE = b"data: [DONE]\n\n"
JSON_HEADERS = {"Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "Say hi"}]


def client_session(limit: int, total_s: float) -> aiohttp.ClientSession:
    """The benchmark client's keep-alive session: at most `limit` connections, `total_s` per request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=total_s),
        skip_auto_headers=("User-Agent",),
    )


class HttpTarget:
    def __init__(self, session: aiohttp.ClientSession, base: str, model: str, **extra: Any) -> None:
        self.session = session
        self.url = f"{base}/v1/chat/completions"
        body = {"model": model, "messages": MESSAGES, **extra}
        self.body = json.dumps(body).encode()
        self.stream_body = json.dumps({**body, "stream": True}).encode()
        self.retries = 0

    async def one(self, stream: bool) -> tuple[float | None, str | None]:
        for _ in range(3):
            try:
                return await self._one(stream)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                # llama.cpp's server closes the connection after each streamed answer although it
                # announces keep-alive; a client that reuses it at once fails to write. Retry, and
                # count it: the retry's time stays in the latency.
                self.retries += 1
        return await self._one(stream)

    def answered(self, resp: aiohttp.ClientResponse) -> None:
        """Called with each 200 answer before its body is read (for subclasses that check headers)."""

    async def _one(self, stream: bool) -> tuple[float | None, str | None]:
        async with self.session.post(
            self.url, data=self.stream_body if stream else self.body, headers=JSON_HEADERS
        ) as resp:
            if resp.status != 200:
                return None, f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
            self.answered(resp)
            if not stream:
                data = await resp.read()
                return None, None if b'"usage"' in data else "answer without usage"
            first = None
            tail = b""
            async for data in resp.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                tail = (tail + data)[-32:]
            return first, None if tail.endswith(DONE) else "stream did not end with [DONE]"


@dataclass
class Load:
    lat: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    wall: float = 0.0


async def run_load(target: Any, stream: bool, n: int, concurrency: int, tick, limit_s: float) -> Load:
    load = Load()
    todo = iter(range(n))
    perf = time.perf_counter

    async def worker() -> None:
        done = 0
        for _ in todo:
            t0 = perf()
            try:
                first, err = await target.one(stream)
            except Exception as exc:
                first, err = None, f"{type(exc).__name__}: {exc}"
            t1 = perf()
            if err is None:
                load.lat.append(t1 - t0)
                if first is not None:
                    load.ttft.append(first - t0)
            else:
                load.errors += 1
                load.first_error = load.first_error or err
            done += 1
            if done == 16:
                tick(done)
                done = 0
        if done:
            tick(done)

    t0 = perf()
    async with asyncio.timeout(limit_s):
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    load.wall = perf() - t0
    return load


@dataclass
class Acc:
    """Everything measured for one path in one setting, summed over rounds."""

    lat: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)
    n: int = 0
    errors: int = 0
    retries: int = 0
    first_error: str | None = None
    wall: float = 0.0
    client_cpu: float = 0.0
    cpu: Counter = field(default_factory=Counter)  # per server process name


@dataclass(frozen=True)
class Setting:
    key: str
    concurrency: int
    stream: bool
    label: str


class Bench:
    """Runs paths side by side in one setting and sums what each costs, per path and setting (`acc`)."""

    def __init__(self, progress: Progress, procs: dict[str, psutil.Process]) -> None:
        self.progress = progress
        self.procs = procs
        self.acc: dict[str, dict[str, Acc]] = {}

    async def compare(
        self, setting: Setting, paths: list[tuple[str, Any, int]], rounds: int, warmup: int
    ) -> None:
        """Warm each path up, then run `rounds` rounds, each path in turn (order rotated per round)."""
        total = sum(n for _, _, n in paths) + warmup * len(paths)
        names = "/".join(p[0] for p in paths)
        task = self.progress.add_task(f"{setting.label:<22} {names}", total=total)

        def tick(k: int) -> None:
            self.progress.advance(task, k)

        timeout = 300.0
        for name, target, n in paths:
            w = min(warmup, n)
            load = await run_load(target, setting.stream, w, setting.concurrency, tick, timeout)
            if load.errors == w:
                raise RuntimeError(f"{name} {setting.key}: every warm-up request failed: {load.first_error}")
        for r in range(rounds):
            order = paths[r % len(paths) :] + paths[: r % len(paths)]
            for name, target, n in order:
                count = n // rounds + (1 if r < n % rounds else 0)
                before = {k: cpu_s(p) for k, p in self.procs.items()}
                r0 = target.retries
                c0 = time.process_time()
                load = await run_load(target, setting.stream, count, setting.concurrency, tick, timeout)
                c1 = time.process_time()
                after = {k: cpu_s(p) for k, p in self.procs.items()}
                acc = self.acc.setdefault(name, {}).setdefault(setting.key, Acc())
                acc.lat += load.lat
                acc.ttft += load.ttft
                if load.lat:
                    acc.round_p50.append(float(np.median(load.lat)) * 1e3)
                acc.n += count
                acc.errors += load.errors
                acc.retries += target.retries - r0
                acc.first_error = acc.first_error or load.first_error
                acc.wall += load.wall
                acc.client_cpu += c1 - c0
                for k in self.procs:
                    acc.cpu[k] += after[k] - before[k]
        self.progress.update(task, completed=total)


# --------------------------------------------------------------------------------------------
# py-spy


def find_py_spy() -> Path | None:
    for spy in (REPO / ".venv" / "bin" / "py-spy", Path(sys.executable).parent / "py-spy"):
        if spy.exists():
            return spy
    on_path = shutil.which("py-spy")
    return Path(on_path) if on_path else None


def py_spy_command(spy: Path, pid: int, raw: Path, rate: int, *extra: str) -> list[str]:
    """py-spy recording `pid` without stopping it, collapsed stacks (`raw` format) to `raw`."""
    return [
        str(spy),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--output",
        str(raw),
        "--rate",
        str(rate),
        "--nonblocking",
        *extra,
    ]


async def start_py_spy(spy: Path, pid: int, raw: Path, rate: int) -> asyncio.subprocess.Process:
    """py-spy on `pid` in the background, with full file names and function lines (summarize_profile)."""
    cmd = py_spy_command(spy, pid, raw, rate, "--full-filenames", "--function")
    return await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def stop_py_spy(proc: asyncio.subprocess.Process) -> bytes:
    """Interrupt py-spy (it then writes its output); returns what it printed on stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        err = b"py-spy did not stop"
    return err


def package_of(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if filename.startswith(str(REPO)):
        rel = Path(filename).relative_to(REPO)
        top = rel.parts[0]
        if top == "backends":
            return "wwwserve_gateway.backends." + rel.stem
        if top == "wwwserve_gateway":
            return ".".join(rel.with_suffix("").parts)
        return top
    name = Path(filename).parts
    if "lib" in name:
        rest = name[name.index("lib") + 2 :]  # .../lib/python3.11/<module>
        if rest:
            return rest[0].removesuffix(".py")
    return Path(filename).stem


# The process's entry chain: in every stack, so it says nothing about where the time goes.
WRAPPER_PACKAGES = {
    "<frozen runpy>",
    "runpy",
    "wwwserve_gateway.__main__",
    "typer",
    "click",
    "wwwserve_gateway.cli",
    "uvloop",
    "asyncio",
}
LOOP_FRAME = "Runner.run"  # a sample whose innermost Python frame is the loop runner is in uvloop's C code


def collapsed_stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """The samples in py-spy's raw (collapsed) output: each stack's frames, outermost first, without the
    entry that names the process, and how many samples it had."""
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[1:]
        if frames and count.isdigit():
            yield frames, int(count)


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's raw (collapsed stack) output."""
    self_counts: Counter = Counter()
    incl_pkg: Counter = Counter()
    incl_fn: Counter = Counter()
    total = 0
    for frames, count in collapsed_stacks(raw):
        total += count
        self_counts[frames[-1]] += count
        seen_pkg = set()
        seen_fn = set()
        for frame in frames:
            fn, _, where = frame.rpartition(" (")
            filename = where.rsplit(":", 1)[0]
            pkg = package_of(filename)
            if pkg in WRAPPER_PACKAGES:
                continue
            if pkg not in seen_pkg:
                seen_pkg.add(pkg)
                incl_pkg[pkg] += count
            key = f"{fn} [{pkg}]"
            if key not in seen_fn:
                seen_fn.add(key)
                incl_fn[key] += count

    def share(counter: Counter) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)] if total else []

    def short(frame: str) -> str:
        fn, _, where = frame.rpartition(" (")
        if fn == LOOP_FRAME:
            return "(event loop C code: epoll, socket reads/writes, callback dispatch)"
        filename, _, line = where.rstrip(")").rpartition(":")
        return f"{fn} [{package_of(filename)}:{Path(filename).name}:{line}]"

    return {
        "samples": total,
        "self_pct": [(short(k), v) for k, v in share(self_counts)],
        "inclusive_pct_by_package": share(incl_pkg),
        "inclusive_pct_by_function": share(incl_fn),
    }


# --------------------------------------------------------------------------------------------
# the report


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values else None


def summarize(acc: Acc) -> dict[str, Any]:
    ok = len(acc.lat)
    per = max(acc.n, 1)
    return {
        "requests": acc.n,
        "errors": acc.errors,
        "retries": acc.retries,
        "first_error": acc.first_error,
        "p50_ms": pct(acc.lat, 50),
        "p90_ms": pct(acc.lat, 90),
        "p99_ms": pct(acc.lat, 99),
        "mean_ms": float(np.mean(acc.lat)) * 1e3 if ok else None,
        "max_ms": float(np.max(acc.lat)) * 1e3 if ok else None,
        "round_p50_ms": acc.round_p50,
        "ttft_p50_ms": pct(acc.ttft, 50),
        "ttft_p99_ms": pct(acc.ttft, 99),
        "rps": ok / acc.wall if acc.wall else None,
        "wall_s": acc.wall,
        "client_cpu_ms_per_req": acc.client_cpu / per * 1e3,
        "process_cpu_ms_per_req": {k: v / per * 1e3 for k, v in acc.cpu.items()},
        "process_busy": {k: v / acc.wall for k, v in acc.cpu.items()} if acc.wall else {},
        "client_busy": acc.client_cpu / acc.wall if acc.wall else None,
    }


def added_latency(row: dict[str, Any] | None, ref: dict[str, Any] | None) -> dict[str, Any] | None:
    """What `row` adds over `ref` (the same setting on the reference path), or None when either has no
    latencies: p50, p99, requests/s ratio, and TTFT p50 where both streamed."""
    if not row or not ref or row["p50_ms"] is None or ref["p50_ms"] is None:
        return None
    entry = {
        "added_p50_ms": row["p50_ms"] - ref["p50_ms"],
        "added_p99_ms": row["p99_ms"] - ref["p99_ms"],
        "rps_ratio": row["rps"] / ref["rps"] if ref["rps"] else None,
    }
    if row["ttft_p50_ms"] is not None and ref["ttft_p50_ms"] is not None:
        entry["added_ttft_p50_ms"] = row["ttft_p50_ms"] - ref["ttft_p50_ms"]
    return entry


def target_result(
    name: str, value: float | None, limit: float, op: str, unit: str, note: str = ""
) -> dict[str, Any]:
    """One target of the report: PASS when `value` is `op` ("<=" or ">=") `limit`."""
    ok = value is not None and (value <= limit if op == "<=" else value >= limit)
    return {
        "target": name,
        "value": value,
        "limit": limit,
        "op": op,
        "unit": unit,
        "result": "PASS" if ok else "MISS",
        "note": note,
    }


def targets_table(targets: list[dict[str, Any]], value: Callable[[Any], str]) -> Table:
    table = Table(title="targets")
    for col in ("target", "value", "limit", "result", "note"):
        table.add_column(col, justify="right" if col in ("value", "limit") else "left")
    for t in targets:
        style = "green" if t["result"] == "PASS" else "red"
        table.add_row(
            t["target"],
            f"{value(t['value'])} {t['unit']}",
            f"{t['op']} {t['limit']:g}",
            f"[{style}]{t['result']}[/{style}]",
            t["note"],
        )
    return table


def machine_line(meta: dict[str, Any]) -> str:
    """'machine: N CPUs (model), load average [..] before, [..] after' from a report's meta."""
    return (
        f"machine: {meta['machine']['cpu_count']} CPUs ({meta['machine']['cpu_model']}), load average "
        f"{meta['loadavg_before']} before, {meta['loadavg_after']} after"
    )


def figure_title(name: str, meta: dict[str, Any]) -> str:
    """'wwwserve NAME (quick run, N CPUs, load A -> B)' from a report's meta."""
    return (
        f"wwwserve {name} ({'quick' if meta['quick'] else 'full'} run, {meta['machine']['cpu_count']} CPUs, "
        f"load {meta['loadavg_before'][0]:.2f} -> {meta['loadavg_after'][0]:.2f})"
    )


def save_figure(fig: Any, title: str, path: Path) -> None:
    """Title the figure, lay it out, write it to `path` (110 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
