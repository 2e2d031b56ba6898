"""What the overhead benchmarks share: their command line, progress bar and run facts (machine, package
versions, load average), the backends' command lines, the client's HTTP sessions, py-spy, and the
pieces of a report (added latency, targets, the targets table).

The benchmarks run as scripts (`python benchmarks/NAME.py`): this folder is then on sys.path, and
they import this module as `bench_common`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

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
# backends and the client


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


def tiny_llama_command(parallel: int, *extra: str) -> list[str]:
    """A llama.cpp server (alias "tiny") on a free port with the tiny random model, pulled if missing."""
    from wwwserve_gateway.model_store import TINY_MODEL, find_model, models_dir, pull

    model = find_model(TINY_MODEL) or pull(TINY_MODEL, models_dir())
    return [
        sys.executable,
        "-m",
        "wwwserve_gateway.backends.llamacpp_server",
        "--model",
        str(model),
        "--alias",
        "tiny",
        "--port",
        "0",
        "--parallel",
        str(parallel),
        *extra,
    ]


def client_session(limit: int, total_s: float) -> aiohttp.ClientSession:
    """The benchmark client's keep-alive session: at most `limit` connections, `total_s` per request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=total_s),
        skip_auto_headers=("User-Agent",),
    )


# --------------------------------------------------------------------------------------------
# py-spy


def find_py_spy() -> Path | None:
    for spy in (REPO / ".venv" / "bin" / "py-spy", Path(sys.executable).parent / "py-spy"):
        if spy.exists():
            return spy
    return None


async def start_py_spy(spy: Path, pid: int, raw: Path, rate: int) -> asyncio.subprocess.Process:
    """py-spy recording `pid` without stopping it, collapsed stacks with full file names to `raw`."""
    cmd = [
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
        "--full-filenames",
        "--function",
    ]
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


# --------------------------------------------------------------------------------------------
# the report


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


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
