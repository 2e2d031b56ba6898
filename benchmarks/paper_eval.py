"""The WWW.Serve paper's scheduling evaluation on the real system, with emulated GPUs.

    python benchmarks/paper_eval.py --setting N|all [--quick] [--out DIR] [--time-scale X]
                                    [--variants single,centralized,frequency,completion_time,least_loaded,ideal]
                                    [--duration S] [--seed K]

Every node is a real `wwwserve node` process on loopback, in front of its own engine emulator
(`wwwserve emulate-engine`, a vLLM-like timing model of a GPU; docs/emulator.md); clients are this
process (asyncio, aiohttp), one per node. Each setting (paper_eval_workload.py) runs once per
variant, one after the other, with the same seeded arrivals and lengths:

  single          each node serves only its own users (frequency: offload 0, queue 1, accept 0)
  centralized     the reference's metrics-polling dispatcher in front of those same nodes
  frequency       WWW.Serve, the paper's policy (offload 0.8, queue 0.2, accept 0.8, target 0.7)
  completion_time WWW.Serve, this project's completion-time policy (its defaults)
  least_loaded    WWW.Serve, decentralized join-the-shortest-queue on gossiped request counts
  ideal           join-the-shortest-queue with exact counts, straight to the engines (no gateways)

Per request it records submit and finish time (paper seconds), the route (x-wwwserve-route, as node
names) and the outcome. Writes paper_eval_setting{N}.json and PNGs (_slo, _latency, _credits) to
--out (default benchmarks/results/), prints the targets, and paper_eval_summary.md gathers the
targets of every setting found in --out.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import aiohttp
from bench_common import RunStart, bench_parser, figure_title, machine_line, progress_bar, tear_down
from paper_eval_clients import PaperClock, Sender, credits_probe, drive, load_probe, make_path, sample_every
from paper_eval_cluster import VARIANTS, Cluster, Variant
from paper_eval_report import latencies, plot_setting, recovery, setting_targets, summarize, threshold_for
from paper_eval_workload import SETTINGS, Event, Setting, shrink
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console(stderr=True)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # for the node processes

DRAIN_PAPER_S = 3000.0  # after the last arrival, how long answers are awaited before counting them lost
CREDIT_PERIOD_S = 10.0  # paper seconds between ledger samples
LOAD_PERIOD_S = 5.0


@dataclass(frozen=True)
class Plan:
    settings: list[int]
    variants: list[str]
    horizon: float  # paper seconds of arrivals
    time_scale: float
    seed: int
    quick: bool
    workers: int | None  # keep only the first N workers of each setting (smoke tests)
    merge: bool = False  # add this run's variants to the setting's report already in --out

    @classmethod
    def make(cls, args: Any) -> Plan:
        settings = list(SETTINGS) if args.setting == "all" else [int(args.setting)]
        variants = args.variants.split(",") if args.variants else list(VARIANTS)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        horizon = args.duration or (360.0 if args.quick else 600.0)
        scale = args.time_scale or (40.0 if args.quick else 10.0)
        return cls(settings, variants, horizon, scale, args.seed, args.quick, args.workers, args.merge)


class StartFailed(Exception):
    """The variant's network did not come up."""


START_ATTEMPTS = (
    2  # a network that does not converge (a node slow to start on a loaded machine) is retried once
)


async def run_variant(setting: Setting, variant: Variant, plan: Plan, progress: Progress) -> dict[str, Any]:
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            result = await run_variant_once(setting, variant, plan, progress)
        except StartFailed as exc:
            if attempt == START_ATTEMPTS:
                raise
            console.print(f"[yellow]  {variant.name}: {exc}; starting the network again[/]")
            continue
        result["start_attempts"] = attempt
        return result
    raise AssertionError("unreachable")


async def run_variant_once(
    setting: Setting, variant: Variant, plan: Plan, progress: Progress
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"paper_eval_s{setting.number}_{variant.name}_"))
    cluster = Cluster(setting, variant, plan.time_scale, workdir, plan.seed)
    t0 = time.monotonic()
    try:
        try:
            await cluster.start()
        except (TimeoutError, RuntimeError) as exc:  # a process did not start, or no convergence
            for name, node in cluster.nodes.items():  # say why, before the workdir goes
                tail = node.log_path.read_text(errors="replace")[-600:] if node.log_path.exists() else ""
                console.print(f"[yellow]  {name} log tail:[/] {tail}")
            raise StartFailed(str(exc)) from exc
        started_s = time.monotonic() - t0
        timeout = aiohttp.ClientTimeout(total=(setting.horizon + DRAIN_PAPER_S) / plan.time_scale + 60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            clock = PaperClock(plan.time_scale)
            path = make_path(variant.path, Sender(session, clock, cluster, setting.max_tokens))
            task = progress.add_task(f"S{setting.number} {variant.label}", total=len(setting.requests))
            samplers = [asyncio.create_task(sample_every(clock, LOAD_PERIOD_S, load_probe(session, cluster)))]
            if variant.has_nodes:
                samplers.append(
                    asyncio.create_task(sample_every(clock, CREDIT_PERIOD_S, credits_probe(session, cluster)))
                )
            drained = getattr(path, "drained", None)
            events = [asyncio.create_task(run_event(e, cluster, clock, drained)) for e in setting.events]
            try:
                records = await drive(
                    setting, path, clock, setting.horizon + DRAIN_PAPER_S, lambda: progress.advance(task)
                )
                event_log = await asyncio.gather(*events)
            finally:  # a failed event or run must not leave tasks behind on a closed session
                for t in (*samplers, *events):
                    t.cancel()
                done = await asyncio.gather(*samplers, *events, return_exceptions=True)
            loads, *credits = done[: len(samplers)]
        counters = await cluster.delegation_counters() if variant.has_nodes else {}
        logs = cluster.node_logs() if variant.has_nodes else {}
    finally:
        await cluster.stop()
        tear_down([], workdir)
    rows = [r.as_dict() for r in records]
    result: dict[str, Any] = {
        "label": variant.label,
        "policy": {"plugin": variant.policy, "settings": variant.settings} if variant.has_nodes else None,
        "startup_s": started_s,
        "summary": summarize(rows, [n.name for n in setting.workers]),
        "events": event_log,
        "credits": credits[0] if credits else [],
        "engine_load": loads,
        "node_logs": logs,
        "delegation_counters": counters,
        "records": rows,
    }
    if setting.events:
        result["recovery"] = [{**ev, **recovery(rows, ev["at"], setting.horizon)} for ev in event_log]
    return result


async def run_event(event: Event, cluster: Cluster, clock: PaperClock, drained: Any) -> dict[str, Any]:
    """At its time, carry out one join or leave (the cluster runs one node's events in order)."""
    await clock.sleep_until(event.at)
    started = await cluster.apply(event, clock.now, drained)
    return {
        "at": event.at,
        "node": event.node,
        "action": event.action,
        "started": started,
        "done": clock.now(),
    }


async def run_setting(number: int, plan: Plan, out: Path) -> dict[str, Any]:
    setting = SETTINGS[number](plan.seed, plan.horizon)
    if plan.workers:
        setting = shrink(setting, plan.workers)
    run = RunStart.now()
    console.rule(
        f"setting {number}: {setting.title} ({len(setting.requests)} requests, {plan.horizon:g} paper s)"
    )
    console.print(setting.description)
    variants: dict[str, dict[str, Any]] = {}
    with progress_bar(console) as progress:
        for name in plan.variants:
            variants[name] = await run_variant(setting, VARIANTS[name], plan, progress)
            s = variants[name]["summary"]
            console.print(
                f"  {name:<16} mean {fmt(s['mean_s'])} s  p99 {fmt(s['p99_s'])} s  outcomes {s['outcomes']}  "
                f"served elsewhere {s['served_elsewhere']}"
            )
    for v in variants.values():
        v["run"] = {"started": run.meta(plan.quick, plan)["started"], "time_scale": plan.time_scale}
    if plan.merge:
        variants = merged(number, plan, out, variants)
    threshold = threshold_for(latencies(variants["single"]["records"]), 0.5) if "single" in variants else None
    report: dict[str, Any] = {
        "meta": run.meta(plan.quick, plan),
        "setting": {
            "number": setting.number,
            "title": setting.title,
            "description": setting.description,
            "horizon_s": setting.horizon,
            "time_scale": plan.time_scale,
            "nodes": [
                {"name": n.name, "engines": [asdict(e) for e in n.engines], "starts": n.starts}
                for n in setting.nodes
            ],
            "events": [asdict(e) for e in setting.events],
            "requests": len(setting.requests),
        },
        "threshold_s": threshold,
        "targets": setting_targets(number, variants, setting.horizon),
        "variants": variants,
    }
    write_report(report, out, f"paper_eval setting {number}: {setting.title}")
    print_targets(report)
    console.print(machine_line(report["meta"]))
    return report


def merged(
    number: int, plan: Plan, out: Path, variants: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The variants of the report already in `out` for this setting, with this run's replacing or
    joining them: the same seeded workload (seed, horizon and time scale must match)."""
    path = out / f"paper_eval_setting{number}.json"
    if not path.exists():
        return variants
    old = json.loads(path.read_text())
    plan_old = old["meta"]["plan"]
    same = (plan_old["seed"], plan_old["horizon"], plan_old["time_scale"], plan_old.get("workers"))
    if same != (plan.seed, plan.horizon, plan.time_scale, plan.workers):
        raise SystemExit(
            f"{path} ran another workload (seed, horizon, time scale, workers {same}): not merged"
        )
    for v in old["variants"].values():
        v.setdefault("run", {"started": old["meta"]["started"], "time_scale": plan_old["time_scale"]})
    order = [*old["variants"], *(n for n in variants if n not in old["variants"])]
    both = old["variants"] | variants
    console.print(
        f"merged into {path}: {', '.join(variants)} from this run, the rest from {old['meta']['started']}"
    )
    return {n: both[n] for n in sorted(order, key=lambda n: list(VARIANTS).index(n) if n in VARIANTS else 99)}


def rereport(report: dict[str, Any], out: Path) -> None:
    """A report's threshold, targets and figures recomputed from its records."""
    s, variants = report["setting"], report["variants"]
    single = variants.get("single")
    report["threshold_s"] = threshold_for(latencies(single["records"]), 0.5) if single else None
    report["targets"] = setting_targets(s["number"], variants, s["horizon_s"])
    report.pop("figures", None)
    write_report(report, out, f"paper_eval setting {s['number']}: {s['title']}")
    print_targets(report)


def write_report(report: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prefix = str(out / f"paper_eval_setting{report['setting']['number']}")
    Path(prefix + ".json").write_text(json.dumps(report, indent=1))
    report["figures"] = plot_setting(report, prefix, figure_title(name, report["meta"]))


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def print_targets(report: dict[str, Any]) -> None:
    table = Table(title=f"setting {report['setting']['number']}: targets")
    for col in ("target", "value", "limit", "result", "note"):
        table.add_column(col)
    for t in report["targets"]:
        style = "green" if t["result"] == "PASS" else "red"
        value = t["value"]
        shown = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        table.add_row(
            t["target"], shown, f"{t['op']} {t['limit']:g}", f"[{style}]{t['result']}[/{style}]", t["note"]
        )
    Console().print(table)


def write_summary(out: Path) -> Path:
    """A markdown table of every setting's variants and targets found in `out`."""
    lines = [
        "| setting | variant | mean s | p99 s | completed | served elsewhere |",
        "|---|---|---|---|---|---|",
    ]
    target_lines = ["| target | value | limit | result | note |", "|---|---|---|---|---|"]
    targets: list[dict[str, Any]] = []
    for path in sorted(out.glob("paper_eval_setting*.json")):
        report = json.loads(path.read_text())
        s = report["setting"]
        for name, v in report["variants"].items():
            m = v["summary"]
            lines.append(
                f"| {s['number']} {s['title']} | {name} | {fmt(m['mean_s'])} | {fmt(m['p99_s'])} | "
                f"{m['completed']}/{m['requests']} | {m['served_elsewhere']} |"
            )
        for t in report["targets"]:
            targets.append(t)
            value = t["value"]
            shown = "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
            target_lines.append(
                f"| {t['target']} | {shown} | {t['op']} {t['limit']:g} | {t['result']} | {t['note']} |"
            )
    vs_central = [t for t in targets if "/ centralized" in t["target"]]
    if vs_central:
        wins = sum(t["result"] == "PASS" for t in vs_central)
        target_lines.append(
            f"| best policy >= centralized on at least 3 settings | {wins} of {len(vs_central)} | >= 3 | "
            f"{'PASS' if wins >= 3 else 'MISS'} | settings: "
            + ", ".join(
                f"{t['target'].split()[0]} {t['value']:.2f}" for t in vs_central if t["value"] is not None
            )
            + " |"
        )
    summary = out / "paper_eval_summary.md"
    summary.write_text("\n".join(lines) + "\n\n" + "\n".join(target_lines) + "\n")
    return summary


async def main() -> None:
    parser = bench_parser(__doc__, "360 paper seconds at time scale 40 (a few minutes per setting)")
    parser.add_argument("--setting", required=True, help="1 to 5, or all")
    parser.add_argument("--time-scale", type=float, default=None, help="paper seconds per wall second")
    parser.add_argument("--variants", default=None, help="comma-separated subset of: " + ",".join(VARIANTS))
    parser.add_argument("--duration", type=float, default=None, help="paper seconds of arrivals")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers", type=int, default=None, help="keep only the first N workers (smoke tests)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's variants to each setting's report already in --out (same seed, duration, "
        "time scale); the report says when each variant ran",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: recompute the targets and figures of the reports already in --out",
    )
    args = parser.parse_args()
    plan = Plan.make(args)
    if args.report_only:
        for number in plan.settings:
            path = args.out / f"paper_eval_setting{number}.json"
            if path.exists():
                rereport(json.loads(path.read_text()), args.out)
        console.print(f"summary: {write_summary(args.out)}")
        return
    # SIGTERM or Ctrl-C cancels the run, so that every node and emulator it started is stopped.
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, me.cancel)
    for number in plan.settings:
        await run_setting(number, plan, args.out)
    console.print(f"summary: {write_summary(args.out)}")


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
