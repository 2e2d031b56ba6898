"""Duel-and-judge as a quality incentive: do stake and quality scores move to the better providers?

    python benchmarks/quality_incentive.py [--quick] [--out DIR] [--gamma G] [--rate R] [--seed K]

Real `wwwserve node` processes on loopback, real models on llama.cpp (one thread each), the official
`openai` SDK as the apps' client. Three provider classes serve the same model name ("smol"), two
executor nodes each, each class on its own llama.cpp server (the node's native `llamacpp/` backend):

  good      SmolLM2-135M-Instruct, the server's default temperature 0 (greedy)
  degraded  SmolLM2-135M-Instruct, the server's default temperature 1.5 (--degraded-temperature;
            llama.cpp's top-k 40 / top-p 0.95 / min-p 0.05 stay): the same weights, sampled carelessly
  random    the generated random-weight tiny model (garbage text), llama.cpp's default sampling

The apps send no temperature, so each provider's own defaults decide (a judge asks at temperature 0,
whatever the server's default). The classes' accuracy on the questions is measured (phase 1) and
reported. An entry E (no model, no stake, founding credit to pay) sends app traffic: checkable
questions (`network.canaries.make` + `question`: arithmetic, capitals, spelling, letter counts),
closed loop with `concurrency` clients, bounded in count and time, `max_tokens` 24. The executors are
also the judges (a duel's judges are drawn from the other bonded members by the seeded stake draw; E
has no stake).

The three networks below are spawned together (21 processes; idle once formed) and phase 1 runs in
process while they form; their app traffic then runs one network at a time, on the same servers:

1. judge agreement, in process: answers to fresh questions from each class's deployment (built as a
   node builds it), pairs of different answers (good/degraded, good/random, degraded/random), each
   pair judged by `ReferenceJudge` and, in both orders, by `LLMJudge` on SmolLM2 (what the good and
   degraded judges run) and on the tiny model (the random judges). Agreement with the reference
   excludes reference ties; position consistency is the same verdict for the same pair in both
   orders. Bounded by `agree_limit_s`: what is unfinished then abstains.
2. no duels: a network whose genesis has `duels.rate: 0`; the app traffic's first `base` questions:
   the latency baseline, and 1 execution per request.
3. reference judge: duels at `--rate` (default 1.0, the paper's) and `--gamma` (default 0.3; the
   paper's code uses 1.0, under which one lost duel takes a node's whole bond), every executor judging
   with `judge: {plugin: reference}`.
4. LLM judge: the same genesis duel parameters, every executor judging with `judge: {plugin: llm}`: its
   own deployment's model (SmolLM2 for good and degraded, the tiny model for random).

Every network: genesis with 1,000 founding credits per executor (each bonds 100) and 10^6 for E;
price 1 credit per request, judges' price 0.2, 3 judges per duel, judge timeout 60 s, Elo K 16, no
canaries (the app traffic itself is checkable); gossip probes patient enough for a loaded machine.
E's balances view is sampled every `sample_s` during the traffic and after it (until every duel is
settled). Stake share
= a class's bonded stake / all executors' bonded stake; credit share = (liquid + bonded) likewise.
Win rate = won / (won + lost) over the duels of the class's nodes: the paper's win rate as plotted
(paper-reference §6: wins over `transfer_stake` rows; a tie moves nothing and is not counted). The
score with ties at half, (won + tied / 2) / duels, is beside it: two executors of the same class
mostly tie, so it pulls every class towards 0.5. Work per app request: executions = the executors'
`wwwserve_peer_requests_total{outcome="served"}` / the app requests E answered; judgements = E's
`wwwserve_judge_requests_total` (voted, unreachable, invalid: each ran a judge) / app requests.

Targets (the issue's), each PASS or MISS with its numbers:
- win rates strictly ordered good > degraded > random, under each judge;
- the good class's stake share rises (smoothed: a moving average of 5 samples; its last value above
  its first) and ends above 50%, under each judge;
- the random class's stake share ends below 5%, under each judge;
- the SmolLM2 judge's agreement with the reference (decisive verdicts, reference ties excluded) and
  its position consistency, each >= 0.5 (better than a coin; the issue sets no number);
- the duel network's app p50 latency / the no-duel network's <= 1 (hedging), over the same questions;
- executions per app request within 10% of 1 + rate.

Writes quality_incentive.json and quality_incentive.png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bench
import numpy as np
import openai
import orjson
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tests.support import http_get
from wwwserve_gateway.config.schema import ModelEntry
from wwwserve_gateway.deployments import build_backend
from wwwserve_gateway.model_store import TINY_MODEL, find_model, models_dir, pull
from wwwserve_gateway.network import canaries
from wwwserve_gateway.network.genesis import (
    DuelParams,
    GossipParams,
    LedgerParams,
    NetworkGenesis,
    write_genesis,
)
from wwwserve_gateway.network.receipts import check_receipt, normalise_text
from wwwserve_gateway.network.votes import check_vote
from wwwserve_gateway.plugin_api.backend import Backend, BackendContext, Endpoint
from wwwserve_gateway.plugin_api.judge import JudgeCase, Verdict
from wwwserve_gateway.plugins.judges.llm import LLMJudge, LLMJudgeSettings
from wwwserve_gateway.plugins.judges.reference import ReferenceJudge, ReferenceJudgeSettings
from wwwserve_gateway.plugins.ledger.duels import decide

console = Console(stderr=True)

MODEL = "smol"  # the model name every executor serves and the apps ask for
CLASSES = ("good", "degraded", "random")
EXECUTORS = {"G1": "good", "G2": "good", "D1": "degraded", "D2": "degraded", "R1": "random", "R2": "random"}
COLORS = {"good": "#2ca02c", "degraded": "#ff7f0e", "random": "#d62728"}
MAX_TOKENS = 24  # the apps' max_tokens: the good class's answers take ~14 tokens
CREDITS = 1000  # each executor's founding allocation
ENTRY_CREDITS = 1_000_000  # E pays for every request, duel and vote of the run
BOND = 100
# Probes patient enough for a loaded 2-core machine (the tests' 0.25 s probes and 1.5 s suspicion make
# members flap there while seven nodes and two llama.cpp servers share the cores).
GOSSIP = GossipParams(interval_s=1.0, probe_timeout_s=2.0, suspect_timeout_s=10.0, refresh_s=5.0)
JUDGES = 3
JUDGE_TIMEOUT_S = 60.0  # the genesis default; SmolLM2 judging on a loaded machine needs it
FORM_S = 420.0  # at most, from spawning a network's nodes until every executor is alive and staked at E
SMOL_PARALLEL = 8
SERVER_ALIAS = {"good": "smol", "degraded": "smol-hot", "random": "tiny"}
TINY_PARALLEL = 8
SMOOTH = 5  # samples in the stake share's moving average
PAPER_WIN_RATES = {"Qwen3-8B": 0.57, "Qwen3-4B": 0.53, "Qwen3-0.6B": 0.39}
TARGETS = {"stake_share_best": 0.5, "stake_share_random": 0.05, "agreement": 0.5, "p50_ratio": 1.0}


@dataclass(frozen=True)
class Plan:
    agree_specs: int  # questions of the judge-agreement phase (up to 3 answer pairs each)
    agree_limit_s: float  # ... and at most this long (answers, then verdicts)
    base_requests: int  # app requests of the no-duel network (the duel networks' first ones)
    duel_requests: int  # app requests per duel network, at most
    duel_limit_s: float  # ... and at most this long
    base_limit_s: float
    concurrency: int  # closed-loop app clients
    sample_s: float  # E's balances sampled this often
    settle_s: float  # at most, after the traffic, until every duel is settled and the ledgers agree
    rate: float
    gamma: float
    degraded_temperature: float
    seed: int

    @classmethod
    def make(cls, quick: bool, rate: float, gamma: float, temperature: float, seed: int) -> Plan:
        if quick:
            return cls(2, 60.0, 16, 40, 25.0, 15.0, 3, 1.0, 25.0, rate, gamma, temperature, seed)
        return cls(12, 150.0, 60, 400, 170.0, 60.0, 3, 2.0, 45.0, rate, gamma, temperature, seed)


# --------------------------------------------------------------------------------------------
# the providers


def deployment(cls: str, servers: dict[str, bench.Llama]) -> dict[str, Any]:
    """A class's litellm_params: the native llama.cpp backend on its class's server (no LiteLLM: its
    import costs ~5 s of CPU per node, minutes on a loaded 2-core machine)."""
    # Two nodes share each server: each may keep half its slots busy (without a limit the backend's
    # capacity reads as 1, and a node declines every request while one is in flight).
    slots = TINY_PARALLEL if cls == "random" else SMOL_PARALLEL
    return {
        "model": f"llamacpp/{SERVER_ALIAS[cls]}",
        "api_base": servers[cls].base_url,
        "max_parallel_requests": slots // 2,
    }


class SampledLlama(bench.Llama):
    """A llama.cpp server (xllamacpp, one thread) whose *server-side* default temperature is set: what
    a request that names none gets (llama.cpp's top-k 40, top-p 0.95, min-p 0.05 stay). The good
    provider's is 0 (greedy), the degraded provider's hot: the same weights, sampled carelessly."""

    def __init__(self, model: Path, alias: str, parallel: int, temp: float) -> None:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-llama",
            json.dumps(
                {
                    "model": str(model),
                    "alias": alias,
                    "parallel": parallel,
                    "temp": temp,
                }
            ),
        ]
        bench.Child.__init__(self, f"llama.cpp {alias}", cmd, 120.0)
        try:
            bench.wait_until(lambda: self.answers("/health"), 120, what=f"llama.cpp {alias} /health")
        except BaseException:
            self.stop()
            raise


def serve_llama(spec: str) -> None:
    """The child of SampledLlama: backends/llamacpp_server.py's server, with sampling defaults."""
    import signal
    import threading

    import xllamacpp as xlc

    cfg = json.loads(spec)
    params = xlc.CommonParams()
    params.model.path = cfg["model"]
    params.hostnames = ["127.0.0.1"]
    params.port = 0
    params.n_ctx = 4096  # shared by the slots: 512 tokens each at 8
    params.n_parallel = cfg["parallel"]
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    params.model_alias = {cfg["alias"]}
    params.n_threads_http = 16
    params.endpoint_slots = True
    params.sampling.temp = cfg["temp"]
    params.verbosity = 1
    server = xlc.Server(params)
    print("listening", server.listening_address, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    stop.wait()
    del server


def start_servers(plan: Plan) -> dict[str, bench.Llama]:
    """One llama.cpp server per class, one thread each: SmolLM2 greedy by default for good, SmolLM2 hot
    by default for degraded (the apps send no temperature: each provider's defaults decide), the tiny
    random model (llama.cpp's defaults) for random."""
    smol_path = find_model("smollm2") or pull("smollm2", models_dir())
    servers: dict[str, bench.Llama] = {}
    try:
        servers["good"] = SampledLlama(smol_path, "smol", SMOL_PARALLEL, 0.0)
        servers["degraded"] = SampledLlama(smol_path, "smol-hot", SMOL_PARALLEL, plan.degraded_temperature)
        servers["random"] = bench.tiny_llama(TINY_PARALLEL)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def answer_text(body: bytes) -> str:
    try:
        return orjson.loads(body)["choices"][0]["message"]["content"] or ""
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""


# --------------------------------------------------------------------------------------------
# phase 1: the judges' agreement, in process


def case(spec: dict[str, Any], a: str, b: str) -> JudgeCase:
    request = {"model": MODEL, "messages": canaries.messages(spec)}
    return JudgeCase("00" * 32, MODEL, "chat/completions", request, (a, b))


SWAP = {
    Verdict.A: Verdict.B,
    Verdict.B: Verdict.A,
    Verdict.TIE: Verdict.TIE,
    Verdict.ABSTAIN: Verdict.ABSTAIN,
}


async def judge_agreement(
    servers: dict[str, bench.Llama], plan: Plan, workdir: Path, progress: Progress
) -> dict[str, Any]:
    """Answers from each class to fresh questions, pairs of them judged by the reference judge and
    (both orders) by the LLM judge on SmolLM2 and on the tiny model."""
    ctx = BackendContext(data_dir=workdir, request_timeout=300.0)
    backends: dict[str, Backend] = {}
    for cls in CLASSES:
        entry = ModelEntry(model_name=MODEL, litellm_params=deployment(cls, servers))
        backends[cls] = build_backend(entry, ctx)
        await backends[cls].start()
    try:
        judges = {
            "smollm2": LLMJudge(SimpleNamespace(backends=[backends["good"]]), LLMJudgeSettings()),
            "tiny": LLMJudge(SimpleNamespace(backends=[backends["random"]]), LLMJudgeSettings()),
        }
        reference = ReferenceJudge(SimpleNamespace(backends=[]), ReferenceJudgeSettings())
        rng = random.Random(plan.seed + 1000)
        specs = [canaries.make(rng) for _ in range(plan.agree_specs)]
        sem = asyncio.Semaphore(SMOL_PARALLEL // 2)
        task = progress.add_task("judge agreement: answers", total=len(specs) * len(CLASSES))

        failed: Counter = Counter()

        async def answer(cls: str, spec: dict[str, Any]) -> str:
            async with sem:
                body = {"model": MODEL, "messages": canaries.messages(spec), "max_tokens": MAX_TOKENS}
                try:
                    reply = await backends[cls].complete(Endpoint.CHAT, body)
                    text = normalise_text(answer_text(reply.body))
                except Exception:  # counted, and an empty (wrong) answer
                    failed[cls] += 1
                    text = ""
            progress.advance(task)
            return text

        # Bounded in time as well as count: on a loaded machine what is unanswered at the deadline
        # stays unanswered (an empty answer; counted).
        deadline = time.monotonic() + plan.agree_limit_s
        texts = [
            t if isinstance(t, str) else ""
            for t in await bounded(
                [answer(c, s) for s in specs for c in CLASSES], deadline / 2 + time.monotonic() / 2
            )
        ]
        failed["empty_or_unanswered_at_deadline"] = sum(1 for t in texts if t == "")
        answers = [dict(zip(CLASSES, texts[i * 3 : i * 3 + 3], strict=True)) for i in range(len(specs))]
        accuracy = {
            c: float(np.mean([canaries.is_right(s, a[c]) for s, a in zip(specs, answers, strict=True)]))
            for c in CLASSES
        }
        pairs = [
            (spec, x, y, a[x], a[y])
            for spec, a in zip(specs, answers, strict=True)
            for x, y in (("good", "degraded"), ("good", "random"), ("degraded", "random"))
            if a[x] != a[y]
        ]
        jtask = progress.add_task("judge agreement: verdicts", total=len(pairs) * 2 * len(judges))

        async def verdict(judge: LLMJudge, c: JudgeCase) -> Verdict:
            async with sem:
                try:
                    v = await judge.judge(c)
                except Exception:  # a failed call is an abstention, as in the node
                    v = Verdict.ABSTAIN
            progress.advance(jtask)
            return v

        rows: list[dict[str, Any]] = []
        calls = []
        for spec, x, y, tx, ty in pairs:
            ref = await reference.judge(case(spec, tx, ty))
            rows.append({"spec": spec, "pair": [x, y], "texts": [tx, ty], "reference": ref.value})
            for name, judge in judges.items():
                calls.append((len(rows) - 1, name, "ab", verdict(judge, case(spec, tx, ty))))
                calls.append((len(rows) - 1, name, "ba", verdict(judge, case(spec, ty, tx))))
        t0 = time.monotonic()
        raw = await bounded([c[3] for c in calls], deadline)
        late = sum(v is None for v in raw)  # unfinished at the deadline: abstentions, as in a node
        got = [v if isinstance(v, Verdict) else Verdict.ABSTAIN for v in raw]
        judge_s = time.monotonic() - t0
        for (i, name, order, _), v in zip(calls, got, strict=True):
            # In terms of the pair's own order: the swapped question's verdict swapped back.
            rows[i].setdefault(name, {})[order] = (v if order == "ab" else SWAP[v]).value
        return {
            "questions": len(specs),
            "pairs": len(pairs),
            "class_accuracy": accuracy,
            "answers_failed": dict(failed),
            "judge_wall_s": judge_s,
            "limit_s": plan.agree_limit_s,
            "verdicts_late": late,
            "judges": {name: agreement_stats(rows, name) for name in judges},
            "rows": rows,
        }
    finally:
        for b in backends.values():
            await b.aclose()


async def bounded(coros: list[Any], deadline: float) -> list[Any]:
    """Run the coroutines together until the monotonic `deadline`; those unfinished are cancelled and
    give None."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return [t.result() if t.done() and not t.cancelled() and t.exception() is None else None for t in tasks]


def agreement_stats(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    decisive = [r for r in rows if r["reference"] in ("A", "B")]
    judged = [(r, r[name][o]) for r in decisive for o in ("ab", "ba")]
    voted = [(r, v) for r, v in judged if v in ("A", "B")]
    every = [r[name][o] for r in rows for o in ("ab", "ba")]
    # As shown: the "ab" verdict is as shown; the "ba" verdict was swapped back, so swap again.
    shown = [r[name]["ab"] for r in rows] + [SWAP[Verdict(r[name]["ba"])].value for r in rows]
    both = [r for r in rows if r[name]["ab"] != "abstain" and r[name]["ba"] != "abstain"]
    shown_ab = [v for v in shown if v in ("A", "B")]
    return {
        "judgements": len(every),
        "abstain_share": every.count("abstain") / len(every) if every else None,
        "tie_share": every.count("tie") / len(every) if every else None,
        "reference_decisive_pairs": len(decisive),
        "agreement": sum(v == r["reference"] for r, v in voted) / len(voted) if voted else None,
        "agreement_decisive_votes": len(voted),
        "agreement_all": sum(v == r["reference"] for r, v in judged) / len(judged) if judged else None,
        "position_consistency": sum(r[name]["ab"] == r[name]["ba"] for r in both) / len(both)
        if both
        else None,
        "position_pairs": len(both),
        "first_shown_share": shown_ab.count("A") / len(shown_ab) if shown_ab else None,
    }


# --------------------------------------------------------------------------------------------
# a network


class Node(bench.Measured, bench.NodeProcess):
    id = ""


@dataclass
class Network:
    label: str
    genesis: NetworkGenesis
    nodes: dict[str, Node]
    started_s: float = 0.0  # from spawning the nodes until the network was usable
    spawned_at: float = 0.0
    names: dict[str, str] = field(default_factory=dict)  # node id -> name

    @property
    def e(self) -> Node:
        return self.nodes["E"]

    def executor_of(self, route: str) -> str | None:
        """The executor named by an answer's x-wwwserve-route (node ids, the executor last)."""
        for node_id in reversed([p for p in route.split(",") if p]):
            name = self.names.get(node_id)
            if name in EXECUTORS:
                return name
        return None

    def close(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.stop()


def spawn_network(
    label: str, workdir: Path, servers: dict[str, bench.Llama], duels: DuelParams, judge: str, plan: Plan
) -> Network:
    """Write the genesis and the configs, and spawn the seven nodes (all at once: they find each other
    through E); `form` waits until the network is usable."""
    workdir.mkdir(parents=True)
    allocations = {
        **bench.founding_allocations(workdir, ["E"], ENTRY_CREDITS),
        **bench.founding_allocations(workdir, list(EXECUTORS), CREDITS),
    }
    ledger = LedgerParams(allocations=allocations, payment_batch_window_s=0.3, duels=duels)
    genesis = NetworkGenesis(name=f"quality-{label}", gossip=GOSSIP, ledger=ledger)
    path = workdir / "network.yaml"
    write_genesis(genesis, path)
    nodes: dict[str, Node] = {}
    for name in ["E", *EXECUTORS]:
        node_cfg: dict[str, Any] = {
            "network": str(path),
            "bootstrap": [nodes["E"].url] if nodes else [],
            "request_timeout": 90,
        }
        if name == "E":
            model_list: list[dict[str, Any]] = []
            policy = {
                "target_usage": -1,
                "offload_frequency": 1.0,
                "accept_frequency": 0.0,
                "bond": 0,
                "seed": plan.seed,
            }
        else:
            params = deployment(EXECUTORS[name], servers)
            model_list = [{"model_name": MODEL, "litellm_params": params}]
            policy = {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND}
        config = {
            "node": node_cfg,
            "model_list": model_list,
            "policy": {"settings": policy},
            "router": {"settings": {"seed": plan.seed}} if name == "E" else {},
            "judge": {"plugin": judge},
        }
        nodes[name] = Node(config, workdir, name)
    net = Network(label, genesis, nodes)
    net.spawned_at = time.monotonic()
    try:
        for node in nodes.values():
            node.spawn()
    except BaseException:
        net.close()
        raise
    return net


def form(net: Network, deadline: float) -> None:
    """Wait (until the monotonic `deadline`) for every node to be ready and for E to see every executor
    alive, serving the model and staked; closes the network and raises if it does not happen."""
    label, nodes = net.label, net.nodes
    try:
        for node in nodes.values():
            bench.wait_until(
                lambda n=node: node_ready(n),
                max(1.0, deadline - time.monotonic()),
                0.2,
                what=f"{label}: {node.name} ready",
            )
            node.id = node.own_id()
        net.names = {node.id: name for name, node in nodes.items()}
        bench.wait_until(
            lambda: network_ready(net),
            max(1.0, deadline - time.monotonic()),
            0.5,
            what=f"{label}: every executor alive and staked at E",
        )
    except BaseException:
        for node in nodes.values():  # what the nodes said, for the failure's reader
            console.print(f"--- {label}/{node.name} log tail ---", style="dim")
            console.print(node.log()[-1200:], style="dim", markup=False, highlight=False)
        net.close()
        raise
    net.started_s = time.monotonic() - net.spawned_at


def node_ready(node: Node) -> bool:
    """/health/ready answers 200; a 5 s read timeout, as a loaded machine needs (the tests' 1 s is short
    when seven nodes start at once on two busy cores)."""
    if node.proc is not None and node.proc.poll() is not None:
        raise RuntimeError(f"node {node.name} exited with {node.proc.returncode}:\n{node.log()[-3000:]}")
    try:
        return http_get(node.url + "/health/ready", 5.0)[0] == 200
    except OSError:
        return False


def network_ready(net: Network) -> bool:
    try:
        peers = net.e.peers()
        balances = net.e.balances()
    except (OSError, RuntimeError):
        return False
    for name in EXECUTORS:
        node_id = net.nodes[name].id
        peer = peers.get(node_id, {})
        serves = any(m["name"] == MODEL for m in peer.get("models", []))
        if not (peer.get("state") == "alive" and serves and peer.get("stake", 0) > 0):
            return False
        if balances.get(node_id, {}).get("bonded") != BOND:
            return False
    return True


# --------------------------------------------------------------------------------------------
# the app traffic, E's balances over time, and the settling


@dataclass
class Traffic:
    records: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"t", "done", "balances"}
    wall_s: float = 0.0
    t0_wall: float = 0.0  # time.time() at the traffic's start (duel ops carry wall-clock ts)


async def sample_balances(net: Network, traffic: Traffic, t0: float, every: float) -> None:
    while True:
        try:
            view = await asyncio.to_thread(net.e.balances)
            traffic.samples.append(
                {"t": time.monotonic() - t0, "done": len(traffic.records), "balances": view}
            )
        except (OSError, RuntimeError):
            pass
        await asyncio.sleep(every)


async def app_traffic(
    net: Network, specs: list[dict[str, Any]], limit_s: float, plan: Plan, progress: Progress, settle: bool
) -> Traffic:
    traffic = Traffic(t0_wall=time.time())
    client = openai.AsyncOpenAI(base_url=net.e.url + "/v1", api_key="none", max_retries=0, timeout=120)
    todo = iter(enumerate(specs))
    t0 = time.monotonic()
    stop_at = t0 + limit_s
    task = progress.add_task(f"{net.label}: app requests", total=len(specs))

    async def worker() -> None:
        for i, spec in todo:
            if time.monotonic() > stop_at:
                break
            start = time.monotonic()
            rec: dict[str, Any] = {"i": i, "kind": spec["kind"], "t": start - t0}
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=canaries.messages(spec), max_tokens=MAX_TOKENS
                )
                rec["latency_s"] = time.monotonic() - start
                text = raw.parse().choices[0].message.content or ""
                executor = net.executor_of(raw.headers.get("x-wwwserve-route", ""))
                rec.update(
                    executor=executor,
                    cls=EXECUTORS.get(executor or ""),
                    right=canaries.is_right(spec, text),
                    text=text[:80],
                )
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traffic.records.append(rec)
            progress.advance(task)

    sampler = asyncio.create_task(sample_balances(net, traffic, t0, plan.sample_s))
    try:
        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        traffic.wall_s = time.monotonic() - t0
        progress.update(task, total=len(traffic.records), completed=len(traffic.records))
        if settle:
            await asyncio.to_thread(wait_settled, net, plan.settle_s)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await client.close()
    view = await asyncio.to_thread(net.e.balances)
    traffic.samples.append({"t": time.monotonic() - t0, "done": len(traffic.records), "balances": view})
    return traffic


def duels_finished(net: Network) -> bool:
    """Every duel E started has an outcome (settled, identical, no_second, failed, no_votes)."""
    return net.e.metric("wwwserve_duels_total") >= net.e.metric("wwwserve_duel_hedges_total")


def wait_settled(net: Network, limit_s: float) -> None:
    try:
        bench.wait_until(lambda: duels_finished(net), limit_s, 0.5, what="every duel finished")
    except TimeoutError:
        pass


def ledgers_agree(net: Network, limit_s: float) -> bool:
    def same() -> bool:
        views = [n.balances() for n in net.nodes.values()]
        return all(v == views[0] for v in views[1:])

    try:
        bench.wait_until(same, limit_s, 0.5, what="every node folds the same")
        return True
    except TimeoutError:
        return False


# --------------------------------------------------------------------------------------------
# reading a network: metrics, duel operations, class shares


def metric_samples(node: Node, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The node's /metrics samples of these metric names: {"name", "labels", "value"}."""
    out = []
    for line in http_get(node.url + "/metrics")[1].decode().splitlines():
        if line.startswith("#") or not line.startswith(names):
            continue
        head, _, value = line.rpartition(" ")
        name, _, rest = head.partition("{")
        if name not in names:
            continue
        labels = dict(
            (kv.split("=", 1)[0], kv.split("=", 1)[1].strip('"'))
            for kv in rest.rstrip("}").split(",")
            if "=" in kv
        )
        out.append({"name": name, "labels": labels, "value": float(value)})
    return out


def counter(samples: list[dict[str, Any]], name: str, label: str) -> dict[str, float]:
    found: Counter = Counter()
    for s in samples:
        if s["name"] == name:
            found[s["labels"].get(label, "")] += s["value"]
    return dict(found)


E_METRICS = (
    "wwwserve_duels_total",
    "wwwserve_duel_hedges_total",
    "wwwserve_judge_requests_total",
    "wwwserve_delegations_total",
    "wwwserve_delegation_attempts_total",
    "wwwserve_failovers_total",
    "wwwserve_bad_receipts_total",
)
X_METRICS = ("wwwserve_peer_requests_total",)


def duel_ops(net: Network) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    start = 1
    while True:
        page = net.e.get_json(f"/wwwserve/ledger/ops?author={net.e.id}&from={start}&limit=1000")
        ops += [op for op in page if op.get("kind") == "duel"]
        if len(page) < 1000:
            return ops
        start += len(page)


def read_duels(net: Network, t0_wall: float) -> dict[str, Any]:
    """E's duel operations as settled: per duel its classes, votes and outcome (every judge weighs
    1/2 without canaries), and the class-pair results."""
    netid = net.genesis.network_id
    duels = []
    choices: Counter = Counter()
    pairs: dict[str, Counter] = {}
    for op in duel_ops(net):
        ra, rb = (check_receipt(r, netid) for r in op["body"]["receipts"])
        ballots: dict[str, str] = {}
        for v in op["body"]["votes"]:
            body = check_vote(v, netid)
            choice = body["choice"]
            if choice in ("A", "B"):
                chosen = body["a"] if choice == "A" else body["b"]
                choice = "A" if chosen == ra["text"] else "B"
            ballots[body["id"]] = choice
            choices[choice] += 1
        outcome = decide(ballots, {}, None)
        ca, cb = (
            EXECUTORS[net.names.get(r["id"], "?")] if net.names.get(r["id"]) in EXECUTORS else "?"
            for r in (ra, rb)
        )
        counted = [c for c in ballots.values() if c != "abstain"]
        duels.append(
            {
                "t": op.get("ts", t0_wall) - t0_wall,
                "classes": [ca, cb],
                "executors": [net.names.get(ra["id"]), net.names.get(rb["id"])],
                "votes": len(ballots),
                "abstained": len(ballots) - len(counted),
                "unanimous": len(set(counted)) <= 1,
                "outcome": outcome,
            }
        )
        if outcome is not None:
            key = "/".join(sorted((ca, cb), key=CLASSES.index)) if ca in CLASSES and cb in CLASSES else "?"
            first = outcome if CLASSES.index(ca) <= CLASSES.index(cb) else SWAP[Verdict(outcome)].value
            pairs.setdefault(key, Counter())[{"A": "first_won", "B": "second_won", "tie": "tied"}[first]] += 1
    return {
        "ops": len(duels),
        "votes": dict(choices),
        "unanimous_share": float(np.mean([d["unanimous"] for d in duels])) if duels else None,
        "no_outcome": sum(d["outcome"] is None for d in duels),
        "class_pairs": {k: dict(v) for k, v in sorted(pairs.items())},
        "random_won": sum(
            1
            for d in duels
            if d["outcome"] in ("A", "B") and d["classes"][0 if d["outcome"] == "A" else 1] == "random"
        ),
        "duels": duels,
    }


def class_view(balances: dict[str, dict[str, Any]], net: Network) -> dict[str, dict[str, Any]]:
    """Per class: bonded and credit shares, duel record, win rates, mean Elo, from one balances view."""
    per: dict[str, dict[str, Any]] = {
        c: {"bonded": 0.0, "credit": 0.0, "won": 0, "lost": 0, "tied": 0, "elo": []} for c in CLASSES
    }
    for name, cls in EXECUTORS.items():
        acc = balances.get(net.nodes[name].id, {})
        row = per[cls]
        row["bonded"] += acc.get("bonded", 0.0)
        row["credit"] += acc.get("bonded", 0.0) + acc.get("liquid", 0.0)
        record = acc.get("duels") or {}
        for k in ("won", "lost", "tied"):
            row[k] += record.get(k, 0)
        row["elo"].append((acc.get("quality") or {}).get(MODEL, 1500.0))
    bonded = sum(r["bonded"] for r in per.values())
    credit = sum(r["credit"] for r in per.values())
    for row in per.values():
        n = row["won"] + row["lost"] + row["tied"]
        row["duels"] = n
        decided = row["won"] + row["lost"]
        row["win_rate"] = row["won"] / decided if decided else None
        row["score_with_ties"] = (row["won"] + row["tied"] / 2) / n if n else None
        row["stake_share"] = row["bonded"] / bonded if bonded > 0 else None
        row["credit_share"] = row["credit"] / credit if credit > 0 else None
        row["elo"] = float(np.mean(row["elo"]))
    return per


def smooth(values: list[float], k: int = SMOOTH) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(float(np.mean(window)))
    return out


def latency_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["latency_s"] for r in records if "latency_s" in r and "error" not in r]
    return {
        "requests": len(records),
        "answered": len(lat),
        "errors": sum("error" in r for r in records),
        "first_error": next((r["error"] for r in records if "error" in r), None),
        "p50_ms": bench.pct(lat, 50),
        "p95_ms": bench.pct(lat, 95),
        "mean_ms": float(np.mean(lat)) * 1e3 if lat else None,
        "app_accuracy": float(np.mean([r["right"] for r in records if "right" in r])) if lat else None,
        "served_by_class": dict(Counter(r.get("cls") or "?" for r in records if "error" not in r)),
        "p50_ms_by_class": {
            c: bench.pct([r["latency_s"] for r in records if r.get("cls") == c and "error" not in r], 50)
            for c in CLASSES
        },
    }


def analyse_network(net: Network, traffic: Traffic, plan: Plan, agree: bool) -> dict[str, Any]:
    e_samples = metric_samples(net.e, E_METRICS)
    served = {
        name: counter(metric_samples(net.nodes[name], X_METRICS), "wwwserve_peer_requests_total", "outcome")
        for name in EXECUTORS
    }
    answered = sum("error" not in r for r in traffic.records)
    executions = sum(s.get("served", 0.0) for s in served.values())
    judge_req = counter(e_samples, "wwwserve_judge_requests_total", "outcome")
    judged = sum(v for k, v in judge_req.items() if k != "declined")
    final = traffic.samples[-1]["balances"] if traffic.samples else {}
    timeline = []
    for s in traffic.samples:
        view = class_view(s["balances"], net)
        timeline.append(
            {
                "t": round(s["t"], 2),
                "done": s["done"],
                **{
                    c: {k: view[c][k] for k in ("stake_share", "credit_share", "win_rate", "duels", "elo")}
                    for c in CLASSES
                },
            }
        )
    return {
        "label": net.label,
        "network_start_s": net.started_s,
        "traffic_wall_s": traffic.wall_s,
        "latency": latency_stats(traffic.records),
        "classes": class_view(final, net),
        "per_node": {
            name: {
                "class": EXECUTORS[name],
                **{
                    k: final.get(net.nodes[name].id, {}).get(k)
                    for k in ("liquid", "bonded", "quality", "duels")
                },
                "peer_requests": served[name],
            }
            for name in EXECUTORS
        },
        "entry_metrics": {
            "duels": counter(e_samples, "wwwserve_duels_total", "outcome"),
            "hedges": counter(e_samples, "wwwserve_duel_hedges_total", "winner"),
            "judge_requests": judge_req,
            "delegations": counter(e_samples, "wwwserve_delegations_total", "outcome"),
            "attempts": counter(e_samples, "wwwserve_delegation_attempts_total", "outcome"),
            "failovers": counter(e_samples, "wwwserve_failovers_total", "stage"),
            "bad_receipts": counter(e_samples, "wwwserve_bad_receipts_total", "reason"),
        },
        "work": {
            "app_requests_answered": answered,
            "executions": executions,
            "executions_per_request": executions / answered if answered else None,
            "judgements": judged,
            "judgements_per_request": judged / answered if answered else None,
            "expected_executions_per_request": 1 + plan.rate if net.genesis.ledger.duels.rate > 0 else 1.0,
        },
        "ledgers_agree": ledgers_agree(net, 20.0) if agree else None,
        "timeline": timeline,
        "records": traffic.records,
    }


# --------------------------------------------------------------------------------------------
# targets, table, figure


def targets(report: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    out = []
    nets = report["networks"]
    for label in ("reference", "llm"):
        net = nets.get(label)
        if net is None:
            continue
        rates = [net["classes"][c]["win_rate"] for c in CLASSES]
        ordered = all(r is not None for r in rates) and rates[0] > rates[1] > rates[2]
        out.append(
            {
                "target": f"{label} judge: win rates good > degraded > random",
                "value": " / ".join(bench.fmt(r) for r in rates),
                "limit": "strictly decreasing",
                "result": "PASS" if ordered else "MISS",
                "note": "duels: " + " / ".join(str(net["classes"][c]["duels"]) for c in CLASSES),
            }
        )
        shares = [
            row["good"]["stake_share"] for row in net["timeline"] if row["good"]["stake_share"] is not None
        ]
        sm = smooth(shares)
        rises = len(sm) >= 2 and sm[-1] > sm[0]
        end = net["classes"]["good"]["stake_share"]
        ok = rises and end is not None and end > TARGETS["stake_share_best"]
        out.append(
            {
                "target": f"{label} judge: good stake share rises, ends > 50%",
                "value": f"{bench.fmt(sm[0] if sm else None)} -> {bench.fmt(end)}",
                "limit": "rises, > 0.5",
                "result": "PASS" if ok else "MISS",
                "note": f"smoothed over {SMOOTH} samples; max {bench.fmt(max(sm) if sm else None)}",
            }
        )
        rnd = net["classes"]["random"]["stake_share"]
        out.append(
            {
                "target": f"{label} judge: random stake share < 5%",
                "value": bench.fmt(rnd, 3),
                "limit": "< 0.05",
                "result": "PASS" if rnd is not None and rnd < TARGETS["stake_share_random"] else "MISS",
                "note": f"credit share {bench.fmt(net['classes']['random']['credit_share'], 3)}",
            }
        )
    agree = report.get("agreement")
    if agree is not None:
        j = agree["judges"]["smollm2"]
        for key, what in (
            ("agreement", "agreement with reference"),
            ("position_consistency", "position consistency"),
        ):
            v = j[key]
            out.append(
                {
                    "target": f"SmolLM2 judge: {what}",
                    "value": bench.fmt(v),
                    "limit": ">= 0.5",
                    "result": "PASS" if v is not None and v >= TARGETS["agreement"] else "MISS",
                    "note": (
                        f"{j['agreement_decisive_votes']} decisive votes, abstain {bench.fmt(j['abstain_share'])}"
                        if key == "agreement"
                        else f"{j['position_pairs']} pairs; 'first shown' chosen {bench.fmt(j['first_shown_share'])}"
                    ),
                }
            )
    base = nets.get("no_duels")
    for label in ("reference", "llm"):
        net = nets.get(label)
        if base is None or net is None:
            continue
        cmp = net.get("vs_no_duels") or {}
        p50 = cmp.get("p50_ratio")
        out.append(
            {
                "target": f"{label} judge: app p50 latency / no duels",
                "value": bench.fmt(p50),
                "limit": "<= 1",
                "result": "PASS" if p50 is not None and p50 <= TARGETS["p50_ratio"] else "MISS",
                "note": f"p95 ratio {bench.fmt(cmp.get('p95_ratio'))}; same {cmp.get('requests')} questions",
            }
        )
    for label in ("reference", "llm"):
        net = nets.get(label)
        if net is None:
            continue
        w = net["work"]
        v, want = w["executions_per_request"], w["expected_executions_per_request"]
        ok = v is not None and abs(v - want) <= 0.1 * want
        out.append(
            {
                "target": f"{label} judge: executions per app request ~ 1 + rate",
                "value": bench.fmt(v),
                "limit": f"{want:g} +- 10%",
                "result": "PASS" if ok else "MISS",
                "note": (
                    f"+ {bench.fmt(w['judgements_per_request'])} judgements per request; total work vs no "
                    f"duels {bench.fmt(w.get('relative_to_no_duels'))} (1 + rate + judges' generations: "
                    f"{bench.fmt(w.get('expected_relative'))})"
                ),
            }
        )
    return out


def print_table(report: dict[str, Any]) -> None:
    nets = report["networks"]
    table = Table(title="quality incentive: per class (final, E's ledger view)")
    for col in (
        "network",
        "class",
        "duels",
        "won/lost/tied",
        "win rate",
        "with ties",
        "stake share",
        "credit share",
        "Elo",
        "app served",
        "app p50 ms",
    ):
        table.add_column(col, justify="left" if col in ("network", "class") else "right")
    for label, net in nets.items():
        served = net["latency"]["served_by_class"]
        for c in CLASSES:
            row = net["classes"][c]
            table.add_row(
                label,
                c,
                str(row["duels"]),
                f"{row['won']}/{row['lost']}/{row['tied']}",
                bench.fmt(row["win_rate"]),
                bench.fmt(row["score_with_ties"]),
                bench.fmt(row["stake_share"], 3),
                bench.fmt(row["credit_share"], 3),
                f"{row['elo']:.0f}",
                str(served.get(c, 0)),
                bench.fmt(net["latency"]["p50_ms_by_class"][c], 0),
            )
    console.print(table)
    t2 = Table(title="per network")
    for col in (
        "network",
        "answered",
        "errors",
        "p50 ms",
        "p95 ms",
        "app accuracy",
        "exec/req",
        "judge/req",
        "duels (E)",
        "hedges",
        "judge requests",
        "strikes",
    ):
        t2.add_column(col, justify="left" if col == "network" else "right")
    for label, net in nets.items():
        lat, w, em = net["latency"], net["work"], net["entry_metrics"]
        t2.add_row(
            label,
            str(lat["answered"]),
            str(lat["errors"]),
            bench.fmt(lat["p50_ms"], 0),
            bench.fmt(lat["p95_ms"], 0),
            bench.fmt(lat["app_accuracy"]),
            bench.fmt(w["executions_per_request"]),
            bench.fmt(w["judgements_per_request"]),
            " ".join(f"{k}:{v:g}" for k, v in sorted(em["duels"].items())) or "-",
            " ".join(f"{k}:{v:g}" for k, v in sorted(em["hedges"].items())) or "-",
            " ".join(f"{k}:{v:g}" for k, v in sorted(em["judge_requests"].items())) or "-",
            " ".join(f"{k}:{v:g}" for k, v in sorted(em["bad_receipts"].items())) or "0",
        )
    console.print(t2)
    agree = report.get("agreement")
    if agree is not None:
        t3 = Table(
            title=f"judges in process: {agree['pairs']} answer pairs from {agree['questions']} questions"
        )
        for col in (
            "judge",
            "agreement",
            "agreement (all)",
            "position consistency",
            "abstain",
            "tie",
            "'first' chosen",
        ):
            t3.add_column(col, justify="left" if col == "judge" else "right")
        for name, j in agree["judges"].items():
            t3.add_row(
                name,
                f"{bench.fmt(j['agreement'])} ({j['agreement_decisive_votes']})",
                bench.fmt(j["agreement_all"]),
                f"{bench.fmt(j['position_consistency'])} ({j['position_pairs']})",
                bench.fmt(j["abstain_share"]),
                bench.fmt(j["tie_share"]),
                bench.fmt(j["first_shown_share"]),
            )
        console.print(t3)
        acc = agree["class_accuracy"]
        console.print("class accuracy on the questions: " + ", ".join(f"{c} {acc[c]:.2f}" for c in CLASSES))
    table = Table(
        title="targets" + (" (quick run: too short for the stake targets)" if report["meta"]["quick"] else "")
    )
    for col in ("target", "value", "limit", "result", "note"):
        table.add_column(col)
    for t in report["targets"]:
        style = "green" if t["result"] == "PASS" else "red"
        table.add_row(
            t["target"], str(t["value"]), str(t["limit"]), f"[{style}]{t['result']}[/{style}]", t["note"]
        )
    console.print(table)
    console.print("paper (Fig.): win rates " + ", ".join(f"{k} {v}" for k, v in PAPER_WIN_RATES.items()))


def plot(report: dict[str, Any], out: Path) -> None:
    plt = bench.pyplot()
    nets = report["networks"]
    fig, axes = plt.subplots(3, 4, figsize=(20, 12.5))
    for row, label in enumerate(("reference", "llm")):
        net = nets.get(label)
        if net is None:
            for ax in axes[row]:
                ax.set_visible(False)
            continue
        tl = net["timeline"]
        t = [r["t"] for r in tl]
        end = net["traffic_wall_s"]
        for col, (key, title, ylabel) in enumerate(
            (
                ("win_rate", "duel win rate (won / (won + lost))", "win rate"),
                ("stake_share", "bonded stake share", "share of executors' bonded stake"),
                ("credit_share", "credit share (liquid + bonded)", "share of executors' credit"),
                ("elo", "quality score (mean Elo of the class)", "Elo"),
            )
        ):
            ax = axes[row][col]
            for c in CLASSES:
                ys = [r[c][key] if r[c][key] is not None else np.nan for r in tl]
                ax.plot(t, ys, c=COLORS[c], lw=1.2, label=c)
                if key == "stake_share":
                    ok = [y for y in ys if not np.isnan(y)]
                    ax.plot(t[len(t) - len(ok) :], smooth(ok), c=COLORS[c], lw=0.8, ls=":")
            if key == "win_rate":
                ax.axhline(0.5, c="k", lw=0.6, ls=":")
                ax.set_ylim(0, 1)
            if key == "stake_share":
                ax.axhline(0.5, c="k", lw=0.6, ls="--")
                ax.axhline(0.05, c="k", lw=0.6, ls=":")
                ax.set_ylim(0, 1)
            if key == "credit_share":
                ax.set_ylim(0, 1)
            ax.axvline(end, c="grey", lw=0.6, ls="--")
            ax.set_title(f"{label} judge: {title}", fontsize=9)
            ax.set_xlabel("seconds since the app traffic began (dashed: traffic ends)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
    # row 3: latency, app accuracy, judges in process, work
    ax = axes[2][0]
    for label, net in nets.items():
        lat = sorted(r["latency_s"] * 1e3 for r in net["records"] if "latency_s" in r and "error" not in r)
        if lat:
            ax.plot(
                lat,
                np.arange(1, len(lat) + 1) / len(lat),
                label=f"{label} (p50 {net['latency']['p50_ms']:.0f} ms)",
            )
    ax.set_xscale("log")
    ax.set_xlabel("app latency (ms)")
    ax.set_ylabel("CDF")
    ax.set_title("app latency: no duels vs duel networks (hedged)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2][1]
    for label, net in nets.items():
        recs = sorted((r for r in net["records"] if "right" in r), key=lambda r: r["i"])
        if recs:
            ys = (
                np.convolve([float(r["right"]) for r in recs], np.ones(20) / 20, mode="valid")
                if len(recs) >= 20
                else []
            )
            ax.plot(np.arange(len(ys)) + 20, ys, label=label)
    ax.set_ylim(0, 1)
    ax.set_xlabel("app request (in order sent)")
    ax.set_ylabel("share right (moving window of 20)")
    ax.set_title("the app's answers: right per the reference", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2][2]
    agree = report.get("agreement")
    if agree is not None:
        keys = ("agreement", "agreement_all", "position_consistency", "abstain_share", "first_shown_share")
        x = np.arange(len(keys))
        for k, (name, j) in enumerate(agree["judges"].items()):
            vals = [j[key] or 0.0 for key in keys]
            ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=f"LLM judge on {name}")
        ax.axhline(0.5, c="k", lw=0.6, ls="--")
        ax.set_xticks(
            x,
            ["agree\n(decisive)", "agree\n(all)", "position\nconsistent", "abstain", "'first'\nchosen"],
            fontsize=7,
        )
        ax.set_ylim(0, 1)
        accs = ", ".join(f"{c} {v:.2f}" for c, v in agree["class_accuracy"].items())
        ax.set_title(f"judges vs reference, {agree['pairs']} pairs (accuracy: {accs})", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[2][3]
    labels = list(nets)
    x = np.arange(len(labels))
    ex = [nets[k]["work"]["executions_per_request"] or 0 for k in labels]
    jd = [nets[k]["work"]["judgements_per_request"] or 0 for k in labels]
    ax.bar(x, ex, 0.6, label="executions")
    ax.bar(x, jd, 0.6, bottom=ex, label="judgements")
    for i in range(len(labels)):
        ax.annotate(f"{ex[i]:.2f} + {jd[i]:.2f}", (x[i], ex[i] + jd[i]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels)
    ax.set_ylabel("per app request answered")
    ax.set_title(
        f"the network's work per app request (duel rate {report['meta']['plan']['rate']:g})", fontsize=9
    )
    ax.legend(fontsize=7)
    bench.save_figure(fig, bench.figure_title("quality incentive", report["meta"]), out)


# --------------------------------------------------------------------------------------------
# main


def compare_latency(base: dict[str, Any], net: dict[str, Any]) -> dict[str, Any]:
    """The duel network's latency over the questions the no-duel network was asked, as ratios."""
    asked = {r["i"] for r in base["records"]}
    same = [r for r in net["records"] if r["i"] in asked]
    a, b = latency_stats(base["records"]), latency_stats(same)
    whole = net["latency"]
    ratio = lambda x, y: x / y if x is not None and y else None  # noqa: E731
    return {
        "requests": len(same),
        "p50_ms": b["p50_ms"],
        "p95_ms": b["p95_ms"],
        "base_p50_ms": a["p50_ms"],
        "base_p95_ms": a["p95_ms"],
        "p50_ratio": ratio(b["p50_ms"], a["p50_ms"]),
        "p95_ratio": ratio(b["p95_ms"], a["p95_ms"]),
        "whole_run_p50_ratio": ratio(whole["p50_ms"], a["p50_ms"]),
        "whole_run_p95_ratio": ratio(whole["p95_ms"], a["p95_ms"]),
    }


def run_network(
    net: Network, specs: list[dict[str, Any]], limit_s: float, plan: Plan, progress: Progress
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The app traffic on a formed network, then its reading; closes the network."""
    duelling = net.genesis.ledger.duels.rate > 0
    try:
        traffic = asyncio.run(app_traffic(net, specs, limit_s, plan, progress, settle=duelling))
        result = analyse_network(net, traffic, plan, agree=duelling)
        ops = read_duels(net, traffic.t0_wall) if duelling else None
        return result, ops
    finally:
        net.close()


def main(argv: list[str] | None = None) -> int:
    parser = bench.bench_parser(
        __doc__, "small counts: about 2 minutes (the stake targets need the full run)"
    )
    parser.add_argument(
        "--rate", type=float, default=1.0, help="genesis duels.rate (default 1.0, the paper's)"
    )
    parser.add_argument("--gamma", type=float, default=0.3, help="genesis duels.gamma (default 0.3)")
    parser.add_argument(
        "--degraded-temperature",
        type=float,
        default=1.5,
        help="the degraded provider's default temperature (default 1.5)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick, args.rate, args.gamma, args.degraded_temperature, args.seed)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    run = bench.RunStart.now()
    workdir = Path(tempfile.mkdtemp(prefix="quality-incentive-"))
    duels = DuelParams(
        rate=plan.rate, judges=JUDGES, judge_timeout_s=JUDGE_TIMEOUT_S, canary_rate=0.0, gamma=plan.gamma
    )
    servers: dict[str, bench.Llama] = {}
    rng = random.Random(plan.seed)
    specs = [canaries.make(rng) for _ in range(plan.duel_requests)]
    networks: dict[str, Any] = {}
    duel_reads: dict[str, Any] = {}
    nets: dict[str, Network] = {}
    t_start = time.monotonic()
    try:
        with bench.progress_bar(console) as progress:
            setup = progress.add_task("start llama.cpp: SmolLM2 good, SmolLM2 degraded, tiny", total=None)
            servers = start_servers(plan)
            progress.update(setup, total=1, completed=1)
            # The three networks start together (21 processes; they are idle once formed), and the
            # in-process judge phase runs while they form: one formation wait instead of three.
            setup = progress.add_task("spawn 3 networks x 7 nodes", total=None)
            for label, genesis_duels, judge in (
                ("no_duels", DuelParams(rate=0.0, canary_rate=0.0), "reference"),
                ("reference", duels, "reference"),
                ("llm", duels, "llm"),
            ):
                nets[label] = spawn_network(label, workdir / label, servers, genesis_duels, judge, plan)
            progress.update(setup, total=1, completed=1)
            agreement = asyncio.run(judge_agreement(servers, plan, workdir, progress))
            deadline = time.monotonic() + FORM_S
            for label, net in nets.items():
                task = progress.add_task(f"{label}: forming", total=None)
                form(net, deadline)
                progress.update(
                    task,
                    description=f"{label}: formed {net.started_s:.0f} s after spawn",
                    total=1,
                    completed=1,
                )
            formed_s = time.monotonic() - t_start
            networks["no_duels"], _ = run_network(
                nets.pop("no_duels"), specs[: plan.base_requests], plan.base_limit_s, plan, progress
            )
            for label in ("reference", "llm"):
                networks[label], duel_reads[label] = run_network(
                    nets.pop(label), specs, plan.duel_limit_s, plan, progress
                )
        base_work = networks["no_duels"]["work"]["executions_per_request"]
        for label in ("reference", "llm"):
            networks[label]["vs_no_duels"] = compare_latency(networks["no_duels"], networks[label])
            w = networks[label]["work"]
            # Generations per app request, relative to the no-duel network's: executions, plus the
            # judgements that generate (the LLM judge's; the reference judge only compares strings).
            gen = (w["executions_per_request"] or 0.0) + (
                (w["judgements_per_request"] or 0.0) if label == "llm" else 0.0
            )
            w["generations_per_request"] = gen
            w["relative_to_no_duels"] = gen / base_work if base_work else None
            w["expected_relative"] = 1 + plan.rate + (plan.rate * JUDGES if label == "llm" else 0.0)
            networks[label]["duel_ops"] = duel_reads[label]
        report: dict[str, Any] = {
            "meta": {
                **run.meta(args.quick, plan),
                "genesis_duels": duels.model_dump(),
                "genesis": {
                    "price_per_request": 1.0,
                    "allocations": f"executors {CREDITS} (bond {BOND}), E {ENTRY_CREDITS}",
                    "gossip": GOSSIP.model_dump(),
                },
                "classes": {
                    "good": "SmolLM2-135M-Instruct Q4_1, server default temperature 0 (greedy)",
                    "degraded": (
                        f"SmolLM2-135M-Instruct Q4_1 on its own server, default temperature "
                        f"{plan.degraded_temperature} (llama.cpp's top-k 40, top-p 0.95, min-p 0.05)"
                    ),
                    "random": f"{TINY_MODEL} (random weights), llama.cpp's default sampling",
                },
                "servers": {
                    "smol_parallel": SMOL_PARALLEL,
                    "tiny_parallel": TINY_PARALLEL,
                    "threads": 1,
                    "backend": "llamacpp/ (native) on an external llama.cpp server per class",
                },
                "networks_formed_s": formed_s,
                "max_tokens": MAX_TOKENS,
                "paper_win_rates": PAPER_WIN_RATES,
            },
            "agreement": agreement,
            "networks": networks,
        }
        report["targets"] = targets(report, plan)
        (out_dir / "quality_incentive.json").write_text(json.dumps(report, indent=2, default=str))
        plot(report, out_dir / "quality_incentive.png")
        print_table(report)
        console.print(bench.machine_line(report["meta"]))
        console.print(f"wrote {out_dir / 'quality_incentive.json'} and {out_dir / 'quality_incentive.png'}")
        return 0
    finally:
        for net in nets.values():
            net.close()
        bench.tear_down(list(servers.values()), workdir)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-llama":  # SampledLlama's child
        serve_llama(sys.argv[2])
        sys.exit(0)
    sys.exit(main())
