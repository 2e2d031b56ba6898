"""paper_eval at scale: the same policy and router code, driven by a discrete-event simulation.

    python benchmarks/paper_eval_sim.py [--sizes 4,100,1000] [--quick] [--duration S] [--seed K]
                                        [--variants single,centralized,frequency,...] [--out DIR]

No sockets and no processes: every node is a `NodeAPI` holding its policy plugin (`frequency`,
`completion_time` or `least_loaded`, built from their entry points with validated settings, exactly
as a node builds them) and the proof-of-stake router (`pos`), in front of the emulator's timing model
(`wwwserve_gateway.emulator.engine.EngineModel`, profile qwen3-8b-rtx3090) run in virtual time. The
workload is setting 1's shifting load (paper_eval_workload.py) over N worker nodes: half of them busy
first, half second.

What the simulation stands in for, and how:
- A request's way through a node is the dispatcher's (wwwserve_gateway/dispatch.py): the policy's
  `decide()`; LOCAL queues it in the own engine; DELEGATE asks the router for up to `max_attempts`
  candidates and each candidate's policy `accept()` in turn, the first LOCAL serves it, and when
  none accepts it is served locally (the node's NoExecutor fallback); RETRY asks again after the
  policy's `retry_after_s`. Network delays are zero.
- Load probes are instantaneous: `backend.state.load` is the engine's running, waiting and KV usage
  at the moment the policy reads it, and `state.in_flight` the requests the node has sent it.
- Gossip: every node sees the same snapshot of every node's record (each policy's `node_meta()`,
  plus the coarse `load` summary a node publishes), rebuilt every `view_period` paper seconds: one
  gossip round (1 s) per hop of an epidemic's spread, ceil(log2 N) rounds, so a large network acts
  on older news. By default a node leaves no peer out: membership is complete, as SWIM's is. With
  `--view-size K` each node sees a random K of its peers instead, redrawn at every refresh (a partial
  view, as in Cyclon or HyParView): the policies and the router then cost O(K) per request instead of
  O(N), which is what lets a pure-Python run of 1,000 nodes finish on a shared 2-core machine.
- The ledger: every node has 1,000 credits and bonds what its policy asks (100); payments are not
  simulated (no node runs short of credit within a run).
- Baselines: single-node, the reference's centralized dispatcher (keep local below KV usage 0.6,
  else the engine with the lowest (usage, running + waiting)), and the ideal scheduler (join the
  shortest queue with exact counts), all over the same engines.

Writes paper_eval_scale.json and paper_eval_scale.png (SLO attainment per size) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np
import structlog
from bench_common import RunStart, figure_title, machine_line, progress_bar, pyplot, save_figure
from paper_eval_report import COLOURS, attainment, threshold_for
from paper_eval_workload import (
    BUSY_RATE,
    IDLE_RATE,
    MAX_TOKENS,
    build_requests,
    reasoning_lengths,
    shifting_poisson,
)
from rich.console import Console
from rich.table import Table

from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.emulator.engine import EngineModel, Sequence
from wwwserve_gateway.emulator.profiles import load_profile
from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.plugin_api import Account, NodeAPI, PeerState, PeerView, RequestInfo
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext, BackendLoad, BackendSettings
from wwwserve_gateway.plugin_api.loading import load_entry_point, validate_settings
from wwwserve_gateway.plugin_api.policy import Decision

console = Console(stderr=True)

MODEL = "qwen3-8b"
PROFILE = "qwen3-8b-rtx3090"
ALLOCATION = 1000.0
POLICIES: dict[str, dict[str, Any]] = {  # as paper_eval_cluster.VARIANTS sets them
    "frequency": {
        "offload_frequency": 0.8,
        "queue_frequency": 0.2,
        "accept_frequency": 0.8,
        "target_usage": 0.7,
        "retry_after_s": 0.5,
    },
    "completion_time": {},
    "least_loaded": {},
}
BASELINES = ("single", "centralized", "ideal")
VARIANTS = ("single", "centralized", "frequency", "completion_time", "least_loaded", "ideal")
KEEP_LOCAL_BELOW = 0.6  # the reference's centralized threshold
EPSILON_S = 1e-6


# -- stand-ins for a node's surroundings -----------------------------------------------------------


class SimBackend(Backend):
    """A node's engine as its policy sees it: `state.load` reads the engine model now."""

    async def complete(self, endpoint: Any, body: dict[str, Any]) -> Any:
        raise NotImplementedError


class LiveState:
    """BackendState whose `load` is the engine's, read when asked (an instantaneous probe)."""

    def __init__(self, engine: EngineModel, clock: Callable[[], float]) -> None:
        self.engine, self.clock = engine, clock
        self.in_flight = 0

    @property
    def load(self) -> BackendLoad:
        self.engine.advance(self.clock())
        load = self.engine.load()
        return BackendLoad(running=load.running, waiting=load.waiting, usage=load.kv_usage)


class SimLedger:
    def __init__(self, accounts: dict[str, Account], owner: str) -> None:
        self.accounts, self.owner = accounts, owner

    def account(self, node_id: str) -> Account:
        return self.accounts.get(node_id, Account())

    def can_delegate(self, node_id: str) -> bool:
        return True

    def quality(self, node_id: str, model: str) -> float:
        return 1500.0

    async def append_own(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "bond":
            a = self.account(self.owner)
            self.accounts[self.owner] = Account(a.liquid - body["amount"], a.bonded + body["amount"])


class SimGossip:
    """A node's view: the shared snapshot of all records, or its partial view of them."""

    def __init__(self, world: World, index: int) -> None:
        self.world, self.index = world, index
        self._indexed: list[PeerView] | None = None
        self._by_id: dict[str, PeerView] = {}

    def peers(self) -> list[PeerView]:
        partial = self.world.partial
        return partial[self.index] if partial else self.world.views

    def peer(self, node_id: str) -> PeerView | None:
        peers = self.peers()
        if peers is not self._indexed:  # the view was rebuilt since the last lookup
            self._indexed, self._by_id = peers, {p.id: p for p in peers}
        return self._by_id.get(node_id)


@dataclass
class Pending:
    """A request the simulation is carrying."""

    id: int
    node: int  # whose users sent it
    at: float  # submit time
    prompt: int
    output: int
    info: RequestInfo
    executor: int | None = None
    seq: Sequence | None = None
    finish: float | None = None


@dataclass
class SimNode:
    index: int
    id: str
    engine: EngineModel
    backend: SimBackend
    api: NodeAPI
    policy: Any = None
    router: Any = None
    running: list[Pending] = field(default_factory=list)
    wake_at: float | None = None  # the pending wake event's time


class World:
    def __init__(self, n: int, variant: str, seed: int, view_period: float, view_size: int = 0) -> None:
        self.now = 0.0
        self.variant = variant
        self.view_period = view_period
        self.view_size = view_size if 0 < view_size < n - 1 else 0
        self.views: list[PeerView] = []
        self.partial: list[list[PeerView]] = []
        self.view_rng = random.Random(seed * 7919 + n)
        self.events: list[tuple[float, int, str, Any]] = []
        self._order = itertools.count()
        self.accounts: dict[str, Account] = {}
        self.nodes: list[SimNode] = []
        self.profile = load_profile(PROFILE)
        self.done: list[Pending] = []
        self.errors = 0
        policy_cls = load_entry_point("wwwserve.policies", variant) if variant in POLICIES else None
        router_cls = load_entry_point("wwwserve.routers", "pos")
        for i in range(n):
            node_id = f"{i:064x}"
            self.accounts[node_id] = Account(ALLOCATION, 0.0)
            engine = EngineModel(self.profile)
            entry = ModelEntry(model_name=MODEL, litellm_params={"model": f"sim/{MODEL}"})
            backend = SimBackend(
                entry,
                BackendSettings(model=f"sim/{MODEL}"),
                BackendContext(data_dir=Path("."), request_timeout=600.0),
            )
            backend.state = LiveState(engine, lambda: self.now)  # type: ignore[assignment]
            backend._ready.set()
            api = NodeAPI(
                identity=SimpleNamespace(node_id=node_id),  # type: ignore[arg-type]
                genesis=NetworkGenesis(),
                overlay=None,  # type: ignore[arg-type]
                backends=[backend],
                metrics=None,  # type: ignore[arg-type]
                public_url=f"http://{node_id}",
                data_dir=Path("."),
            )
            api.bind(gossip=SimGossip(self, i), ledger=SimLedger(self.accounts, node_id))
            node = SimNode(i, node_id, engine, backend, api)
            if policy_cls is not None:
                settings = {**POLICIES[variant], "seed": seed * 100_003 + i}
                node.policy = _build(policy_cls, api, settings)
                node.router = _build(router_cls, api, {"seed": seed * 100_019 + i})
                api.bind(policy=node.policy, router=node.router)
            self.nodes.append(node)
        self.by_id = {node.id: node for node in self.nodes}

    # -- the event loop ---------------------------------------------------------------------------
    def at(self, t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self._order), kind, payload))

    async def start(self) -> None:
        for node in self.nodes:
            if node.policy is not None:
                await node.policy.start()  # bonds stake
        self.refresh_views()

    def refresh_views(self) -> None:
        views = []
        for node in self.nodes:
            record: dict[str, Any] = {"models": [{"name": MODEL}]}
            load = node.engine.load()
            record["load"] = {
                "running": load.running,
                "waiting": load.waiting,
                "usage": round(load.kv_usage, 2),
            }
            if node.policy is not None:
                record.update(node.policy.node_meta())
            models, peer_load, stake = PeerView.parse_fields(record)
            views.append(PeerView(node.id, "", PeerState.ALIVE, 1, 1, 0.0, models, peer_load, stake, record))
        self.views = views
        if self.view_size:  # each node: a fresh random sample of its peers (itself left out)
            n, k = len(views), self.view_size
            self.partial = [
                [views[j if j < i else j + 1] for j in self.view_rng.sample(range(n - 1), k)]
                for i in range(n)
            ]

    def run(self, requests: list[Any], on_done: Callable[[int], None]) -> list[Pending]:
        """Until every request is answered or rejected; `on_done(completed)` after each completion."""
        for r in requests:
            self.at(r.at, "arrive", r)
        if self.nodes[0].policy is not None:
            self.at(self.view_period, "gossip")
        expected = len(requests)
        while self.events and len(self.done) + self.errors < expected:
            t, _, kind, payload = heapq.heappop(self.events)
            self.now = t
            if kind == "arrive":
                info = RequestInfo(
                    id=f"{payload.id:032x}",
                    model=MODEL,
                    endpoint="chat/completions",
                    stream=False,
                    route=(),
                    max_tokens=MAX_TOKENS,
                )
                pending = Pending(
                    payload.id, int(payload.node), t, payload.prompt_tokens, payload.output_tokens, info
                )
                self.dispatch(pending)
            elif kind == "retry":
                self.dispatch(payload)
            elif kind == "wake":
                if payload.wake_at != t:
                    continue  # superseded by an earlier wake
                payload.wake_at = None
                before = len(self.done)
                self.wake(payload)
                if len(self.done) // 100 != before // 100:
                    on_done(len(self.done))
            elif kind == "gossip":
                self.refresh_views()
                self.at(t + self.view_period, "gossip")
        on_done(len(self.done))
        return self.done

    # -- a request's way --------------------------------------------------------------------------
    def dispatch(self, p: Pending) -> None:
        home = self.nodes[p.node]
        if self.variant == "single":
            return self.serve(p, home)
        if self.variant == "ideal":
            best = min(self.nodes, key=lambda n: (n.backend.state.in_flight, n is not home, n.index))
            return self.serve(p, best)
        if self.variant == "centralized":
            loads = {n.index: n.backend.state.load for n in self.nodes}
            if loads[home.index].usage < KEEP_LOCAL_BELOW:
                return self.serve(p, home)
            best = min(
                self.nodes,
                key=lambda n: (loads[n.index].usage, loads[n.index].running + loads[n.index].waiting),
            )
            return self.serve(p, best)
        decision = home.policy.decide(p.info)
        if decision is Decision.DELEGATE:
            for candidate in home.router.candidates(p.info):
                peer = self.by_id[candidate]
                asked = RequestInfo(
                    p.info.id, MODEL, p.info.endpoint, False, (home.id,), max_tokens=p.info.max_tokens
                )
                if peer.policy.accept(asked) is Decision.LOCAL:
                    return self.serve(p, peer)
            return self.serve(p, home)  # nobody accepted: the node's fallback
        if decision is Decision.LOCAL:
            return self.serve(p, home)
        if decision is Decision.RETRY:
            p.info = RequestInfo(
                p.info.id,
                MODEL,
                p.info.endpoint,
                False,
                (),
                max_tokens=MAX_TOKENS,
                attempt=p.info.attempt + 1,
            )
            return self.at(self.now + home.policy.retry_after_s, "retry", p)
        self.errors += 1  # REJECT: a 429 to the app
        return None

    def serve(self, p: Pending, node: SimNode) -> None:
        p.executor = node.index
        p.seq = node.engine.submit(p.prompt, p.output, self.now)
        node.backend.state.in_flight += 1
        node.running.append(p)
        self.schedule_wake(node)

    def schedule_wake(self, node: SimNode) -> None:
        """One pending wake per engine: the earliest its model asks for (later ones are dropped)."""
        nxt = node.engine.next_event()
        if nxt is None:
            return
        nxt = max(nxt, self.now)
        if node.wake_at is None or nxt < node.wake_at:
            node.wake_at = nxt
            self.at(nxt, "wake", node)

    def wake(self, node: SimNode) -> None:
        # A step boundary due now is begun only by advancing past it: the engine waits for every
        # arrival at the same instant before it schedules the next step.
        node.engine.advance(self.now + EPSILON_S)
        still = []
        for p in node.running:
            if p.seq is not None and p.seq.done:
                p.finish = p.seq.finished_at
                node.backend.state.in_flight -= 1
                self.done.append(p)
                if node.policy is not None or self.nodes[p.node].policy is not None:
                    home = self.nodes[p.node]
                    where = "local" if node is home else node.id
                    home.policy.on_request_done(p.info, where, (p.finish or self.now) - p.at, True)
            else:
                still.append(p)
        node.running = still
        self.schedule_wake(node)


def _build(cls: type, api: NodeAPI, settings: dict[str, Any]) -> Any:
    valid, problems = validate_settings(cls.Settings, settings, ("settings",))
    if valid is None:
        raise SystemExit(f"{cls.__name__}: " + "; ".join(map(str, problems)))
    return cls(api, valid)


# -- the workload and a run -----------------------------------------------------------------------


def shifting_workload(n: int, seed: int, horizon: float) -> list[Any]:
    """Setting 1's arrivals and lengths over n nodes (node index as the name): the first half busy
    first, the second half busy second."""
    rng = random.Random(seed)
    plan = [(str(i), [MODEL], shifting_poisson(rng, horizon, i < n // 2)) for i in range(n)]
    return build_requests(rng, plan, reasoning_lengths)


def run_one(
    n: int,
    variant: str,
    requests: list[Any],
    seed: int,
    on_done: Callable[[int], None],
    view_size: int = 0,
) -> dict[str, Any]:
    view_period = max(1.0, math.ceil(math.log2(max(n, 2))))
    world = World(n, variant, seed, view_period, view_size)
    asyncio.run(world.start())
    t0 = time.perf_counter()
    done = world.run(requests, on_done)
    wall = time.perf_counter() - t0
    lat = np.full(len(requests), math.inf)
    elsewhere = 0
    for p in done:
        lat[p.id] = (p.finish or math.inf) - p.at
        elsewhere += p.executor != p.node
    ok = lat[np.isfinite(lat)]
    return {
        "variant": variant,
        "nodes": n,
        "view_period_s": view_period,
        "view_size": world.view_size or n - 1,
        "requests": len(requests),
        "completed": len(ok),
        "errors": world.errors,
        "served_elsewhere": int(elsewhere),
        "mean_s": float(ok.mean()) if len(ok) else None,
        "p99_s": float(np.quantile(ok, 0.99)) if len(ok) else None,
        "wall_s": wall,
        "latencies": [None if not math.isfinite(v) else round(float(v), 2) for v in lat],
    }


def analyse(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    lat = {v: np.array([x if x is not None else math.inf for x in r["latencies"]]) for v, r in runs.items()}
    out: dict[str, Any] = {}
    if "single" not in lat:
        return out
    thr = threshold_for(lat["single"], 0.5)
    att = {v: attainment(x, thr) for v, x in lat.items()}
    out["threshold_s"] = thr
    out["attainment"] = att
    ours = {v: att[v] for v in POLICIES if v in att}
    if ours:
        best = max(ours, key=lambda v: ours[v])
        out["best_policy"] = best
        if att.get("ideal"):
            out["best_over_ideal"] = ours[best] / att["ideal"]
        if att.get("centralized"):
            out["best_over_centralized"] = ours[best] / att["centralized"]
    if "frequency" in att and att["single"]:
        out["frequency_over_single"] = att["frequency"] / att["single"]
    return out


def plot(report: dict[str, Any], path: str, title: str) -> None:
    plt = pyplot()
    sizes = report["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes.flat, sizes, strict=True):
        runs = report["runs"][str(n)]
        finite = [x for r in runs.values() for x in r["latencies"] if x is not None]
        top = float(np.quantile(finite, 0.995)) * 1.05 if finite else 1.0
        grid = np.linspace(0, top, 200)
        for v, r in runs.items():
            lat = np.array([x if x is not None else math.inf for x in r["latencies"]])
            ax.plot(grid, [attainment(lat, g) for g in grid], label=v, color=COLOURS.get(v))
        thr = report["analysis"][str(n)].get("threshold_s")
        if thr is not None:
            ax.axvline(thr, color="k", lw=0.8, ls=":")
        ax.set_title(f"{n} nodes ({next(iter(runs.values()))['requests']} requests)")
        ax.set_xlabel("SLO threshold (paper s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    save_figure(fig, title + ": SLO attainment (dotted: single-node's 50 % threshold)", path)


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=None, help="comma-separated node counts (default 4,100,1000)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--duration", type=float, default=None, help="paper seconds of arrivals")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 and 100 nodes, 300 paper seconds")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument(
        "--view-size",
        type=int,
        default=0,
        help="peers each node sees, a random sample redrawn every view period (0: all of them)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add these sizes to the paper_eval_scale.json already in --out (same horizon and seed)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("4,100" if args.quick else "4,100,1000")).split(",")]
    horizon = args.duration or (300.0 if args.quick else 600.0)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    run = RunStart.now()
    report: dict[str, Any] = {
        "workload": f"setting 1's shifting load over N nodes: half at {BUSY_RATE:.3f} req/s then "
        f"{IDLE_RATE:.3f}, half the reverse, swapping at the midpoint; reasoning lengths",
        "profile": PROFILE,
        "horizon_s": horizon,
        "sizes": sizes,
        "runs": {},
        "analysis": {},
    }
    with progress_bar(console) as progress:
        for n in sizes:
            requests = shifting_workload(n, args.seed, horizon)
            report["runs"][str(n)] = {}
            for v in variants:
                task = progress.add_task(f"{n} nodes: {v}", total=len(requests))

                def tick(done: int, task: Any = task) -> None:
                    progress.update(task, completed=done)

                report["runs"][str(n)][v] = run_one(n, v, requests, args.seed, tick, args.view_size)
            report["analysis"][str(n)] = analyse(report["runs"][str(n)])
    report["meta"] = run.meta(args.quick, SimpleNamespace(sizes=sizes, horizon=horizon, seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    old_path = args.out / "paper_eval_scale.json"
    if args.merge and old_path.exists():
        old = json.loads(old_path.read_text())
        if old["horizon_s"] != horizon or old["meta"]["plan"]["seed"] != args.seed:
            raise SystemExit(f"{old_path} has another horizon or seed: not merged")
        runs_meta = old.get("runs_meta") or {str(n): old["meta"] for n in old["sizes"]}
        report["runs_meta"] = runs_meta | {str(n): report["meta"] for n in sizes}
        report["runs"] = old["runs"] | report["runs"]
        report["analysis"] = old["analysis"] | report["analysis"]
        report["sizes"] = sorted({*old["sizes"], *sizes})
        sizes = report["sizes"]
    (args.out / "paper_eval_scale.json").write_text(json.dumps(report, indent=1))
    plot(
        report,
        str(args.out / "paper_eval_scale.png"),
        figure_title("paper_eval at scale (simulated)", report["meta"]),
    )
    table = Table(title="mean s / p99 s / SLO attainment at single-node's 50 % threshold")
    table.add_column("variant")
    for n in sizes:
        table.add_column(f"{n} nodes")
    for v in VARIANTS:
        cells = []
        for n in sizes:
            r, att = report["runs"][str(n)].get(v), report["analysis"][str(n)].get("attainment", {}).get(v)
            ok = r is not None and att is not None
            cells.append(f"{r['mean_s']:.0f} / {r['p99_s']:.0f} / {att:.2f}" if ok else "-")
        table.add_row(v, *cells)
    ratios = [report["analysis"][str(n)] for n in sizes]
    table.add_row(
        "best / ideal",
        *(
            f"{a['best_over_ideal']:.2f} ({a['best_policy']})" if "best_over_ideal" in a else "-"
            for a in ratios
        ),
    )
    Console(width=160).print(table)
    console.print(machine_line(report["meta"]))


if __name__ == "__main__":
    main()
