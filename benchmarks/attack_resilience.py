"""The network under attack: honest apps' service, credits, membership and memory while hostile
members and clients do their worst, one attack at a time (docs/security.md).

    python benchmarks/attack_resilience.py [--quick] [--out DIR] [--attacks KEY,KEY,...]

The network: five real `wwwserve node` processes on loopback, founded by one genesis (founding
credits for all five; gossip as fast as in tests/test_hostile_peers.py; no duels: a duel pays a
second executor and judges, which would blur what an attacker is paid, and duels are measured by
benchmarks/quality_incentive.py). Two entries, E1 and E2, serve no shared model themselves: every
app request for it is delegated. Three executors, X1..X3, bond 100 and serve it from the instant stub
(benchmarks/stub_server.py). The entries have a local model of their own (`local-long`) only for
the slow readers' comparison.

The attackers are tests/hostile.py's HostileMember (a real key, a real overlay, in this process):
H, a fresh unfunded key, makes the gossip, ledger and entry attacks; H4, H5 and H6, funded in the
genesis like an honest founding executor, bond 900 (so routers draw them first, mostly) and act as
executors, one attack each (an entry avoids an executor it caught for a while: a second attack by
the same key would measure nothing). Attacks from other addresses use 127.0.0.2.

The apps: an open-loop load (an attack that slows answers cannot lower what is sent) of `rate`
requests/s, alternately to E1 and E2, every other pair streamed, bounded in number and time. An
answer counts as served when it is an OpenAI answer: HTTP 200, a chat.completion whose first choice
has a message with text, and usage; or SSE events that parse as chunks with text, end with
`data: [DONE]` and carry no error event. A request whose kept-alive connection the node closed
before any answer is retried (twice at most, as the openai SDK would) and counted.

Phases, one after the other: a baseline window without attack, then for each attack its setup
(not measured: a staked attacker declines until its window), its window, its stop, and a heal
observation (at least `heal_min_s`, until every honest node has seen every honest node alive for
a second, at most `heal_max_s`). Meanwhile a thread polls every honest node's peer view, the
entries' RSS, buffered overlay bytes and kernel send queues, and every process's CPU time.

  1 forged-eviction   H sends every honest node dead records about each executor at incarnation
                      2^62-1, re-sent every second
  2 accusation-spam   H sends suspect and dead records about each executor citing its real
                      incarnation (read from the node's view), 4 a second per executor and node
  3 sybil-mint        H serves 20 fresh keys' chains to every node, every second: 10 joins claiming
                      a founding grant, 10 zero joins that pay, transfer to one and bond 5,000
  4 inflated-receipts H4 answers correctly but its receipts claim 100,000 + 5,000 tokens
  5 garbage-answers   H5 answers with non-JSON or non-OpenAI shapes (in turn), receipts matching
  6 silent-executor   H6 accepts and never answers (not even a heartbeat)
  7 non-paying-entry  H sends requests straight to the executors (a few a second each) and never
                      pays; at the end a fresh key asks once more
  8 slow-readers      apps open long streams (the stub's "long" model, about 7 MB) through a 4 KB
                      receive buffer and read 1 KB/s: 16 delegated through E1 and, at the same time,
                      16 served locally by E2
  9 floods            from 127.0.0.2: silent overlay handshakes to every node (twice the per-source
                      cap, reopened as they close) and slowloris header trickles to both entries
                      (over the per-source connection cap); a genuine peer joins meanwhile

Per attack: served (ok / sent in the window, and as a fraction of the baseline's success rate;
target >= 99%); credits moved to the attacker (its keys' liquid + bonded + unbonding on the honest
ledgers, the highest over the five, minus their genesis allocations, after the run settles; target
0 beyond work verifiably done, which for attack 4 is the price of what the entries could verify of
the answers H4 sent); honest nodes evicted: declared dead (or lost) in some honest node's view during
the window or the heal observation (target 0), and, beside it, those only suspected, and for how long
not every honest node was alive everywhere; for the slow readers, E1's RSS growth over E2's
(target <= 2x; a local growth under 1 MB counts as 1 MB); the time from the attack's stop until
every honest node is alive everywhere and every 1-second bucket of requests succeeds at least at
the baseline's rate (0 when both already held at the stop). The JSON also has, per phase, each
node's counters that changed (the defences at work), CPU seconds per process, failed answers'
first bytes, and the attack's own tallies.

Writes attack_resilience.json and attack_resilience.png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import bench_common as bench
import numpy as np
import psutil
import uvloop
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tests.hostile import HostileMember
from tests.support import NodeProcess, http_get
from wwwserve_gateway.delegation.answers import AnswerReader, MalformedAnswer, prompt_bound
from wwwserve_gateway.logs import configure_logging
from wwwserve_gateway.network.genesis import (
    DuelParams,
    GossipParams,
    LedgerParams,
    NetworkGenesis,
    write_genesis,
)
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import request_hash, sign_receipt, text_hash
from wwwserve_gateway.overlay import overlay_url
from wwwserve_gateway.overlay.errors import OverlayError
from wwwserve_gateway.plugin_api.backend import Endpoint
from wwwserve_gateway.plugin_api.requests import max_tokens
from wwwserve_gateway.plugins.ledger.rules import MICRO, item_price_micro

console = Console(stderr=True)

MODEL = "stub"  # what the apps ask for: only the executors serve it
LONG_MODEL = "stub-long"  # the stub's long stream, served by the executors
LOCAL_LONG = "local-long"  # the same long stream, served by the entries themselves
ENTRIES = ("E1", "E2")
EXECUTORS = ("X1", "X2", "X3")
HONEST = ENTRIES + EXECUTORS
STAKED = ("H4", "H5", "H6")  # hostile executors' keys, funded in the genesis
ATTACKER_SOURCE = "127.0.0.2"
GOSSIP = GossipParams(interval_s=0.3, probe_timeout_s=0.25, suspect_timeout_s=1.5, refresh_s=2.0)
CREDITS = 1000  # a founding executor's allocation (and each staked attacker's)
ENTRY_CREDITS = 10_000_000  # the entries pay for every request of the run
BOND = 100
HOSTILE_BOND = 900
STUB_CAPACITY = 1024  # the stub is "infinitely parallel": the executors' policies always accept
# A long stream: about 7 MB, more than a loopback socket's send buffer grows to (4 MB) plus an overlay
# stream window (2 MiB), so that a slow reader's stream fills both.
LONG_CHUNKS = 40_000
GAP_MS = 0.01  # written as fast as the stub can
FORGED_INCARNATION = 2**62 - 1
SPAM_HZ = 4.0  # accusations per second per executor and per receiving node
INFLATED_TOKENS = (100_000, 5_000)
SLOW_READ = (256, 0.25)  # a slow reader takes 256 bytes every 0.25 s
RSS_FLOOR_MB = 1.0  # local growth below this is counted as this (RSS sampling noise)
ROUTE = "x-wwwserve-route"

TARGETS = {"served_fraction": 0.99, "credits_beyond_work": 0.0, "honest_evicted": 0, "rss_ratio": 2.0}


@dataclass(frozen=True)
class Plan:
    window_s: float  # each attack's window (and the baseline's)
    heal_min_s: float
    heal_max_s: float
    rate: float  # app requests per second, both entries together
    slow_readers: int  # per side (delegated through E1, local on E2)
    slowloris: int  # header-trickling connections per entry
    handshakes: int  # silent overlay handshakes held per honest node
    unpaid_rate: float  # the non-paying entry's requests per second per executor
    settle_s: float  # at most, for the honest ledgers to agree at the end

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(4.0, 3.0, 15.0, 20.0, 16, 280, 16, 4.0, 20.0)
        return cls(20.0, 8.0, 45.0, 25.0, 16, 300, 16, 5.0, 40.0)


# --------------------------------------------------------------------------------------------
# the network


class Honest(bench.Measured, NodeProcess):
    """An honest `wwwserve node` of the network, measured with psutil; `id` once started."""

    id = ""


def stub_deployment(name: str, stub: bench.Child) -> dict[str, Any]:
    params = {"model": f"openai/{name}", "api_base": stub.url + "/v1", "api_key": "x"}
    return {"model_name": name, "litellm_params": {**params, "max_parallel_requests": STUB_CAPACITY}}


def role_config(name: str, stub: bench.Child, genesis: Path, bootstrap: list[str]) -> dict[str, Any]:
    """An entry (delegates everything, shares nothing, accepts nothing) or an executor."""
    if name in ENTRIES:
        models = [LOCAL_LONG]
        policy = {
            "target_usage": {LOCAL_LONG: 1.0},
            "offload_frequency": 1.0,
            "accept_frequency": 0.0,
            "bond": 0,
            "share_models": [],
        }
    else:
        models = [MODEL, LONG_MODEL]
        policy = {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND}
    return {
        "node": {"network": str(genesis), "bootstrap": bootstrap, "request_timeout": 20},
        "model_list": [stub_deployment(m, stub) for m in models],
        "policy": {"settings": policy},
        "router": {"settings": {"explore": 0.0}},
    }


def write_network(workdir: Path, staked: dict[str, NodeIdentity]) -> tuple[NetworkGenesis, Path]:
    allocations = {
        **bench.founding_allocations(workdir, ENTRIES, ENTRY_CREDITS),
        **bench.founding_allocations(workdir, EXECUTORS, CREDITS),
        **{key.node_id: CREDITS for key in staked.values()},
    }
    # No duels (issue 11): a duel pays a second executor and judges, which the credits count would
    # take for moved credits; tests/test_duels.py and benchmarks/quality_incentive.py cover duels.
    ledger = LedgerParams(
        allocations=allocations,
        payment_batch_window_s=0.3,
        price_per_1k_tokens=1.0,
        max_price_per_request=50,
        duels=DuelParams(rate=0.0, canary_rate=0.0),
    )
    genesis = NetworkGenesis(name="attack-resilience", gossip=GOSSIP, ledger=ledger)
    path = workdir / "network.yaml"
    write_genesis(genesis, path)
    return genesis, path


def send_queue_mb(port: int) -> float:
    """Bytes the kernel holds unsent on the sockets of local `port` (Linux's /proc/net/tcp): what a
    slow reader makes a server keep outside its RSS."""
    total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                total += int(fields[4].split(":")[0], 16)
    return total / 2**20


def network_ready(nodes: dict[str, Honest]) -> bool:
    """Every honest node sees every other alive, and the entries see the executors staked."""
    ids = {n.id for n in nodes.values()}
    for name, node in nodes.items():
        view = node.peers()
        if any(view.get(i, {}).get("state") != "alive" for i in ids):
            return False
        if name in ENTRIES:
            balances = node.balances()
            for x in EXECUTORS:
                peer = view[nodes[x].id]
                if (peer.get("stake") or 0) <= 0 or balances.get(nodes[x].id, {}).get("bonded") != BOND:
                    return False
    return True


COUNTED = (
    "wwwserve_gossip_events_total",
    "wwwserve_bad_receipts_total",
    "wwwserve_peer_requests_total",
    "wwwserve_http_rejected_total",
    "wwwserve_overlay_rejected_total",
    "wwwserve_failovers_total",
    "wwwserve_delegation_attempts_total",
    "wwwserve_delegations_total",
    "wwwserve_ledger_rejected_total",
)


def counters(node: NodeProcess) -> dict[str, float]:
    """The node's counters of interest ({name{labels}: value}); empty if it does not answer."""
    try:
        text = http_get(node.url + "/metrics", timeout=10)[1].decode()
    except OSError:
        return {}
    pairs = (line.rpartition(" ") for line in text.splitlines() if line.startswith(COUNTED))
    return {name: float(value) for name, _, value in pairs}


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def summed(deltas: dict[str, dict[str, float]], needle: str) -> float:
    """A counter's change summed over nodes and over the label sets containing `needle`."""
    return sum(v for per in deltas.values() for k, v in per.items() if needle in k)


# --------------------------------------------------------------------------------------------
# watching the honest nodes


class Watch(threading.Thread):
    """Every `every` s until halted (at most a day): each honest node's view of the network, the
    entries' RSS and buffered overlay bytes, and every process's CPU time. Blocking calls, on a
    thread of their own: the hostile members live on the event loop and must answer probes meanwhile.
    What needs no HTTP call (CPU times, RSS, kernel send queues) is sampled on a second thread, so
    that a node slow to answer its peer view (5 s at most, each) leaves no gap in those series."""

    def __init__(self, nodes: dict[str, Honest], procs: dict[str, psutil.Process], every: float) -> None:
        super().__init__(name="watch", daemon=True)
        self.nodes = nodes
        self.procs = procs
        self.every = every
        self.honest = {n.id for n in nodes.values()}
        # (time, observer, {node id: (state, incarnation)} or None when it did not answer)
        self.views: list[tuple[float, str, dict[str, tuple[str, int]] | None]] = []
        self.latest: dict[str, dict[str, tuple[str, int]]] = {}
        self.rss: list[tuple[float, str, float]] = []
        self.buffered: list[tuple[float, str, float]] = []
        self.kernel: list[tuple[float, str, float]] = []
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self.halt = threading.Event()
        self.gauges = threading.Thread(target=self.sample_gauges, name="watch-gauges", daemon=True)

    def run(self) -> None:
        self.gauges.start()
        deadline = time.monotonic() + 86_400
        for i in itertools.count():
            if self.halt.is_set() or time.monotonic() > deadline:
                return
            t = time.monotonic()
            for name, node in self.nodes.items():
                view = None
                with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError):
                    peers = node.get_json("/wwwserve/peers", timeout=5)
                    view = {p["id"]: (p["state"], p["incarnation"]) for p in peers}
                    self.latest[name] = view
                self.views.append((t, name, view))
            if i % 2 == 0:
                for name in ENTRIES:
                    with contextlib.suppress(OSError, ValueError):
                        value = self.nodes[name].metric("wwwserve_overlay_buffered_bytes")
                        self.buffered.append((t, name, value))
            self.halt.wait(max(0.0, self.every - (time.monotonic() - t)))

    def sample_gauges(self) -> None:
        deadline = time.monotonic() + 86_400
        while not self.halt.is_set() and time.monotonic() < deadline:
            t = time.monotonic()
            with contextlib.suppress(psutil.Error):
                self.cpu.append((t, {name: bench.cpu_s(p) for name, p in self.procs.items()}))
            for name in ENTRIES:
                with contextlib.suppress(psutil.Error):
                    self.rss.append((t, name, bench.rss_mb(self.nodes[name].ps)))
                self.kernel.append((t, name, send_queue_mb(self.nodes[name].port)))
            self.halt.wait(max(0.0, self.every - (time.monotonic() - t)))

    def rounds(
        self, t0: float, t1: float
    ) -> list[tuple[float, dict[str, dict[str, tuple[str, int]] | None]]]:
        """The polling rounds that started in [t0, t1]: (time, {observer: view})."""
        out: dict[float, dict[str, Any]] = {}
        for t, observer, view in list(self.views):
            if t0 <= t <= t1:
                out.setdefault(t, {})[observer] = view
        return sorted(out.items())

    def all_alive(self, views: dict[str, Any]) -> bool:
        return len(views) == len(self.nodes) and all(
            v is not None and all(v.get(i, ("missing",))[0] == "alive" for i in self.honest)
            for v in views.values()
        )

    def cpu_between(self, t0: float, t1: float) -> dict[str, float]:
        """Each process's CPU seconds from the last sample before `t0` to the first after `t1`."""
        samples = list(self.cpu)
        first = next((c for t, c in reversed(samples) if t <= t0), None)
        last = next((c for t, c in samples if t >= t1), samples[-1][1] if samples else None)
        if first is None or last is None:
            return {}
        return {name: round(last[name] - first[name], 3) for name in first if name in last}

    def alive_since(self, t: float) -> bool:
        rounds = self.rounds(t, float("inf"))
        return bool(rounds) and all(self.all_alive(v) for _, v in rounds)


# --------------------------------------------------------------------------------------------
# the apps


@dataclass
class Sample:
    t0: float
    t1: float
    entry: str
    stream: bool
    error: str | None
    executor: str | None  # the route's last hop
    detail: str = ""  # the start of a failed answer
    retries: int = 0  # connection errors before any answer, retried (as the openai SDK does)


def whole_problem(data: bytes) -> str | None:
    """Why a non-streamed answer is not an OpenAI chat completion (None when it is)."""
    try:
        answer = json.loads(data)
        message = answer["choices"][0]["message"]
        usage = answer["usage"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "not a chat completion"
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        return "no message text"
    if not isinstance(usage, dict) or not all(isinstance(v, int) for v in usage.values()):
        return "no usage"
    return None


def stream_problem(data: bytes) -> str | None:
    """Why a streamed answer is not OpenAI's SSE chunks ending with [DONE] (None when it is)."""
    events = [e for e in data.decode(errors="replace").split("\n\n") if e and not e.startswith(":")]
    if not events or events[-1] != "data: [DONE]":
        return "stream did not end with [DONE]"
    text = False
    for event in events[:-1]:
        try:
            chunk = json.loads(event.removeprefix("data: "))
            if "error" in chunk:
                return "an error event"
            for choice in chunk["choices"]:
                text = text or isinstance(choice["delta"].get("content"), str)
        except (ValueError, KeyError, TypeError, AttributeError):
            return "a chunk that is not OpenAI's"
    return None if text else "no text in the stream"


class AppLoad:
    """Apps' requests at a fixed rate (open loop, so an attack that slows answers cannot lower what
    is sent), alternately to each entry, every other pair streamed; each checked on arrival."""

    def __init__(self, nodes: dict[str, Honest], rate: float, max_s: float) -> None:
        self.urls = {name: nodes[name].url + "/v1/chat/completions" for name in ENTRIES}
        self.rate = rate
        self.max_s = max_s
        self.samples: list[Sample] = []
        self.stop = asyncio.Event()
        body = {"model": MODEL, "messages": bench.MESSAGES, "max_tokens": 16}
        self.bodies = {False: json.dumps(body).encode(), True: json.dumps({**body, "stream": True}).encode()}

    async def run(self) -> None:
        cap = 256  # requests in flight at most; beyond, a request is counted as failed
        flying: set[asyncio.Task[None]] = set()
        async with bench.client_session(cap, 30) as session:
            start = time.monotonic()
            for i in range(int(self.rate * self.max_s)):
                if self.stop.is_set():
                    break
                entry, stream = ENTRIES[i % 2], (i // 2) % 2 == 1
                if len(flying) >= cap:
                    now = time.monotonic()
                    self.samples.append(Sample(now, now, entry, stream, "client: too many in flight", None))
                else:
                    task = asyncio.create_task(self.one(session, entry, stream))
                    flying.add(task)
                    task.add_done_callback(flying.discard)
                await asyncio.sleep(max(0.0, start + (i + 1) / self.rate - time.monotonic()))
            await asyncio.gather(*flying, return_exceptions=True)

    async def one(self, session: aiohttp.ClientSession, entry: str, stream: bool) -> None:
        t0 = time.monotonic()
        executor, data, retries = None, b"", 0
        while True:
            try:
                async with session.post(
                    self.urls[entry], data=self.bodies[stream], headers=bench.JSON_HEADERS
                ) as resp:
                    data = await resp.read()
                    executor = (resp.headers.get(ROUTE) or "").split(",")[-1] or None
                    if resp.status != 200:
                        error = f"HTTP {resp.status}"
                    else:
                        error = stream_problem(data) if stream else whole_problem(data)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                # A kept-alive connection the node closed as the request went out (its idle
                # timeout): no answer came. Retried twice at most, and counted.
                error = type(exc).__name__
                if retries < 2 and not data:
                    retries += 1
                    continue
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            break
        detail = data[:240].decode(errors="replace") if error else ""
        self.samples.append(Sample(t0, time.monotonic(), entry, stream, error, executor, detail, retries))


# --------------------------------------------------------------------------------------------
# attacks


@dataclass
class Ctx:
    genesis: NetworkGenesis
    nodes: dict[str, Honest]
    h: HostileMember  # the unfunded attacker, connected to every honest node
    staked: dict[str, NodeIdentity]
    watch: Watch
    plan: Plan

    @property
    def ids(self) -> dict[str, str]:
        return {name: node.id for name, node in self.nodes.items()}


async def repeat(deadline: float, period: float, action: Callable[[], Awaitable[None]]) -> int:
    """`action()` every `period` s until `deadline` (at most 100,000 times); how many times."""
    count = 0
    while time.monotonic() < deadline and count < 100_000:
        await action()
        count += 1
        await asyncio.sleep(max(0.0, min(period, deadline - time.monotonic())))
    return count


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


def read_answer(request: dict[str, Any], text: str) -> AnswerReader:
    """The entry's own reader (wwwserve_gateway/delegation/answers.py) run over `text` as the answer
    to `request`: what the entry will measure of it (as far as it parses)."""
    body = request["body"]
    reader = AnswerReader(Endpoint(request["endpoint"]), "x", body["model"])
    with contextlib.suppress(MalformedAnswer):
        reader.events(text) if body.get("stream") else reader.whole(text)
    return reader


def receipt_for(
    signer: NodeIdentity,
    net: str,
    request: dict[str, Any],
    text: str,
    tokens: tuple[int, int],
    stake: float = 0.0,
) -> dict[str, Any]:
    """A receipt signed by `signer` for `request`, over exactly `text` (and the answer text the
    entry reads in it), claiming `tokens` and committing `stake`."""
    now = time.time()
    about = {
        "entry": request["route"][0],
        "request": request_hash(request["id"], request["endpoint"], request["body"]),
        "response": hashlib.sha256(text.encode()).hexdigest(),
        "text": text_hash(read_answer(request, text).text),
        "model": request["body"]["model"],
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
    }
    return sign_receipt(signer, net=net, **about, started=now, finished=now, stake=stake)


def chunk_event(delta: dict[str, Any], finish: str | None = None, usage: dict | None = None) -> str:
    chunk: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    chunk["choices"] = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage:
        chunk["usage"] = usage
    return "data: " + json.dumps(chunk) + "\n\n"


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
GOOD_WHOLE = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi there!"}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
    }
)
GOOD_STREAM = (
    chunk_event({"role": "assistant", "content": ""})
    + chunk_event({"content": "Hi there!"})
    + chunk_event({}, "stop")
    + chunk_event({}, usage=USAGE)
)
# What the garbage executor sends, in turn: (whole answer, stream events).
GARBAGE = [
    ("I am not JSON at all", "data: not json either\n\n"),
    ('{"choices": "none of your business"}', 'data: {"choices": 7}\n\n'),
    ("[1, 2, 3]", "data: [1, 2, 3]\n\n"),
    ('{"object": "chat.completion", "choices": [{"index": 0, "message": "hi"}]}', "event: nothing\n\n"),
    ('{"id": "x", "object": "chat.completion", "choices": []}', 'data: {"choices": [{"delta": 5}]}\n\n'),
]


class Attack:
    key = ""
    label = ""
    # The node counters (label values) that show the defence at work, summed over honest nodes.
    evidence: tuple[str, ...] = ()

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.facts: dict[str, Any] = {}
        self.allowed_credits = 0.0  # credits for work verifiably done

    def attacker_ids(self) -> list[str]:
        return [self.ctx.h.id]

    async def prepare(self) -> None:
        """Before the window (not measured)."""

    async def run(self, deadline: float) -> None:
        raise NotImplementedError

    async def finish(self) -> None:
        """The attack stops."""


class ForgedEviction(Attack):
    key, label = "forged-eviction", "1 forged eviction"
    evidence = ("rejected.uncited",)

    async def run(self, deadline: float) -> None:
        h, victims = self.ctx.h, [self.ctx.ids[x] for x in EXECUTORS]
        tally: Counter = Counter()

        async def send() -> None:
            records = [h.accusation(v, FORGED_INCARNATION) for v in victims]
            for to in self.ctx.ids.values():
                try:
                    await h.gossip(to, *records)
                    tally["records sent"] += len(records)
                except OverlayError:
                    tally["send failed"] += 1

        tally["rounds"] = await repeat(deadline, 1.0, send)
        self.facts.update(tally)


class AccusationSpam(Attack):
    key, label = "accusation-spam", "2 accusation spam"
    evidence = ("accusations.heard", "accusations.of_me", "confirms", "refutes")

    async def run(self, deadline: float) -> None:
        h, victims = self.ctx.h, [self.ctx.ids[x] for x in EXECUTORS]
        kinds = itertools.cycle(("suspect", "dead"))
        tally: Counter = Counter()

        async def send() -> None:
            for name, to in self.ctx.ids.items():
                view = self.ctx.watch.latest.get(name, {})
                records = [h.accusation(v, view[v][1], next(kinds)) for v in victims if v in view]
                try:
                    await h.gossip(to, *records)
                    tally["records sent"] += len(records)
                except OverlayError:
                    tally["send failed"] += 1

        tally["rounds"] = await repeat(deadline, 1 / SPAM_HZ, send)
        self.facts.update(tally)


class SybilMint(Attack):
    key, label = "sybil-mint", "3 Sybil minting"
    evidence = ("wwwserve_ledger_rejected_total",)

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.greedy: list[str] = []
        self.swarm: list[str] = []

    def attacker_ids(self) -> list[str]:
        return [self.ctx.h.id, *self.greedy, *self.swarm]

    async def prepare(self) -> None:
        h, ledger, net = self.ctx.h, self.ctx.genesis.ledger, self.ctx.genesis.network_id
        self.greedy = [h.sybil() for _ in range(10)]
        self.swarm = [h.sybil() for _ in range(10)]
        for key in self.greedy:
            h.append(key, "join", {"grant": CREDITS})  # what only the genesis can grant
        boss = self.swarm[0]
        for key in self.swarm:
            h.append(key, "join", {"grant": 0})
        for n, key in enumerate(self.swarm[1:]):
            fake = {
                "id": f"{n:032x}",
                "endpoint": "chat/completions",
                "body": {"model": MODEL},
                "route": [key],
            }
            receipt = receipt_for(h.keys[boss], net, fake, f"fake {n}", (50, 50))
            item = [receipt["body"]["request"], 50, 50]
            payment = {"to": boss, "amount": item_price_micro(50, 50, ledger) / MICRO, "items": [item]}
            h.append(key, "pay", {"payments": [{**payment, "receipts": [receipt]}]})
            h.append(key, "transfer", {"to": boss, "amount": 500})
        h.append(boss, "bond", {"amount": 5000})
        self.facts["operations"] = sum(len(h.chains[k]) for k in self.greedy + self.swarm)

    async def run(self, deadline: float) -> None:
        h = self.ctx.h

        async def announce() -> None:
            for to in self.ctx.ids.values():
                with contextlib.suppress(OverlayError):
                    await h.announce_ledger(to)

        self.facts["announcements"] = await repeat(deadline, 1.0, announce)


class StakedExecutor(Attack):
    """A hostile executor with a founding member's credits: it joins, bonds 900 (the honest
    executors bond 100, so routers draw it first, mostly) and answers delegated requests."""

    name = ""

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.member = HostileMember(ctx.genesis, ctx.staked[self.name])
        self.release = asyncio.Event()
        self.active = False  # it declines until its window begins: setup is not measured
        self.served: Counter = Counter()  # by entry

    def attacker_ids(self) -> list[str]:
        return [self.member.id]

    async def prepare(self) -> None:
        m = self.member
        await m.start()
        m.serve_delegations(self.handle)
        m.append(m.id, "join", {"grant": CREDITS})
        m.append(m.id, "bond", {"amount": HOSTILE_BOND})
        for node in self.ctx.nodes.values():
            to = await m.connect(node.url)
            await m.announce_ledger(to)
            await m.gossip(to, m.alive(models=[{"name": MODEL}], stake=HOSTILE_BOND))
        t0 = time.monotonic()
        entries = [self.ctx.nodes[e] for e in ENTRIES]

        def staked() -> bool:
            try:
                return all(
                    e.peers().get(m.id, {}).get("state") == "alive"
                    and e.balances().get(m.id, {}).get("bonded") == HOSTILE_BOND
                    for e in entries
                )
            except OSError:  # an entry slow to answer (a loaded machine): ask again
                return False

        await asyncio.to_thread(
            bench.wait_until, staked, 60, 0.2, f"{self.name} staked and alive at the entries"
        )
        self.facts["staked_after_s"] = round(time.monotonic() - t0, 2)

    async def run(self, deadline: float) -> None:
        self.active = True
        await sleep_until(deadline)
        self.active = False
        self.facts["accepted_by_entry"] = dict(self.served)

    async def finish(self) -> None:
        self.release.set()
        await self.member.stop()

    async def handle(self, peer: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if not self.active:
            yield {"t": "decline", "reason": "not yet"}
            return
        yield {"t": "accept", "route": [*request["route"], self.member.id]}
        self.served[self.ctx_name(request["route"][0])] += 1
        async for item in self.answer(request):
            yield item

    def receipt(self, request: dict[str, Any], text: str, tokens: tuple[int, int]) -> dict[str, Any]:
        """A receipt as an honest executor signs it (committing all its stake), but for `tokens`."""
        net = self.ctx.genesis.network_id
        return receipt_for(self.member.identity, net, request, text, tokens, stake=HOSTILE_BOND)

    def ctx_name(self, node_id: str) -> str:
        return next((n for n, i in self.ctx.ids.items() if i == node_id), node_id[:12])

    def answer(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError


def verified_price(request: dict[str, Any], text: str, params: LedgerParams) -> float:
    """The most an entry can pay for `text` as the answer to `request`: the tokens it can verify,
    priced by the genesis (plugins/ledger/rules.py)."""
    body = request["body"]
    bound = (prompt_bound(body), read_answer(request, text).completion_bound(max_tokens(body)))
    return item_price_micro(*bound, params) / MICRO


class InflatedReceipts(StakedExecutor):
    key, label, name = "inflated-receipts", "4 inflated receipts", "H4"
    evidence = ("inflated_receipt",)

    async def answer(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        stream = bool(request["body"].get("stream"))
        text = GOOD_STREAM if stream else GOOD_WHOLE
        yield {"t": "sse" if stream else "json", "d": text}
        yield {"t": "receipt", "r": self.receipt(request, text, INFLATED_TOKENS)}
        self.allowed_credits += verified_price(request, text, self.ctx.genesis.ledger)
        self.facts["claimed_credits"] = self.facts.get("claimed_credits", 0.0) + (
            item_price_micro(*INFLATED_TOKENS, self.ctx.genesis.ledger) / MICRO
        )


class GarbageAnswers(StakedExecutor):
    key, label, name = "garbage-answers", "5 garbage answers", "H5"
    evidence = ('reason="garbage"', "failovers")

    def __init__(self, ctx: Ctx) -> None:
        super().__init__(ctx)
        self.turn = itertools.count()
        self.sent: Counter = Counter()

    async def answer(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        stream = bool(request["body"].get("stream"))
        variant = next(self.turn) % len(GARBAGE)
        text = GARBAGE[variant][1 if stream else 0]
        self.sent[f"{'stream' if stream else 'whole'} {text[:40]!r}"] += 1
        self.facts["variants_sent"] = dict(self.sent)
        yield {"t": "sse" if stream else "json", "d": text}
        yield {"t": "receipt", "r": self.receipt(request, text, (9, 4))}


class SilentExecutor(StakedExecutor):
    key, label, name = "silent-executor", "6 accept, never answer", "H6"
    evidence = ("failovers",)

    async def answer(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Nothing, until the attack stops (or the entry gives up and cancels it)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(600):
                await self.release.wait()
        for item in ():  # (an async generator that yields nothing)
            yield item


async def ask_executor(member: HostileMember, to: str, n: int) -> str:
    """One request straight to an executor, as an entry would send it; drains the answer. Returns
    'served' (a receipt came), 'refused: unpaid', 'declined', 'incomplete' or 'error'."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"free lunch {n}"}], "max_tokens": 4}
    request = {"id": uuid.uuid4().hex, "endpoint": "chat/completions", "body": body, "route": [member.id]}
    items = member.overlay.stream(to, "wwwserve.delegate", {**request, "continuation": False}, timeout=10)
    try:
        first = await anext(items)
        if first.get("t") != "accept":
            return "refused: unpaid" if "not paid" in str(first.get("reason")) else "declined"
        kinds = [item.get("t") async for item in items]  # a few items: a small answer and its receipt
        return "served" if kinds and kinds[-1] == "receipt" else "incomplete"
    except (OverlayError, StopAsyncIteration, TimeoutError):
        return "error"
    finally:
        await items.aclose()  # type: ignore[attr-defined]


class NonPayingEntry(Attack):
    key, label = "non-paying-entry", "7 non-paying entry"
    evidence = ('outcome="unpaid"',)

    async def run(self, deadline: float) -> None:
        h = self.ctx.h
        outcomes: dict[str, Counter] = {x: Counter() for x in EXECUTORS}
        first_refusal: dict[str, float] = {}
        t0 = time.monotonic()
        flying: set[asyncio.Task[None]] = set()

        async def one(x: str, n: int) -> None:
            outcome = await ask_executor(h, self.ctx.ids[x], n)
            outcomes[x][outcome] += 1
            if outcome.startswith("refused"):
                first_refusal.setdefault(x, round(time.monotonic() - t0, 2))

        for n in range(int(self.ctx.plan.unpaid_rate * (deadline - t0)) + 1):
            if time.monotonic() >= deadline:
                break
            for x in EXECUTORS:
                if len(flying) < 64:
                    task = asyncio.create_task(one(x, n))
                    flying.add(task)
                    task.add_done_callback(flying.discard)
            await asyncio.sleep(max(0.0, t0 + (n + 1) / self.ctx.plan.unpaid_rate - time.monotonic()))
        await asyncio.gather(*flying, return_exceptions=True)
        # Keys are free: a fresh one, which owes nothing yet, asks each executor once.
        fresh = HostileMember(self.ctx.genesis)
        await fresh.start()
        try:
            links = {x: await fresh.connect(self.ctx.nodes[x].url) for x in EXECUTORS}
            fresh_key = {x: await ask_executor(fresh, links[x], 0) for x in EXECUTORS}
        finally:
            await fresh.stop()
        served = sum(c["served"] for c in outcomes.values())
        self.facts.update(
            outcomes={x: dict(c) for x, c in outcomes.items()},
            served_unpaid=served,
            # at least the genesis' per-request price each
            unpaid_value_credits=round(served * item_price_micro(0, 0, self.ctx.genesis.ledger) / MICRO, 2),
            first_refusal_s=first_refusal,
            fresh_key_then=fresh_key,
        )


async def slow_stream(port: int, model: str, deadline: float, tally: Counter) -> None:
    """An app that opens a stream and reads it very slowly until `deadline`: a 4 KB receive buffer,
    SLOW_READ[0] bytes every SLOW_READ[1] s."""
    body = json.dumps({"model": model, "messages": bench.MESSAGES, "stream": True}).encode()
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    writer = None
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 10)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        writer.write(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        for i in itertools.count():
            if (left := deadline - time.monotonic()) <= 0 or i > 100_000:
                break
            with contextlib.suppress(TimeoutError):
                chunk = await asyncio.wait_for(reader.read(SLOW_READ[0]), left)
                if not chunk:
                    tally["ended"] += 1
                    break
                if i == 0:
                    tally["answered " + chunk[9:12].decode(errors="replace")] += 1
                tally["bytes read"] += len(chunk)
            await asyncio.sleep(min(SLOW_READ[1], max(0.0, deadline - time.monotonic())))
    except OSError:
        tally["error"] += 1
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()


class SlowReaders(Attack):
    key, label = "slow-readers", "8 slow readers"
    evidence = ("failovers", 'delegation_attempts_total{outcome="unreachable"}')

    def attacker_ids(self) -> list[str]:
        return []

    async def run(self, deadline: float) -> None:
        n = self.ctx.plan.slow_readers
        sides = {
            "delegated (E1)": (self.ctx.nodes["E1"].port, LONG_MODEL),
            "local (E2)": (self.ctx.nodes["E2"].port, LOCAL_LONG),
        }
        tallies = {side: Counter() for side in sides}
        await asyncio.gather(
            *(
                slow_stream(port, model, deadline, tallies[side])
                for side, (port, model) in sides.items()
                for _ in range(n)
            )
        )
        self.facts["readers"] = {side: dict(t) for side, t in tallies.items()}


class Floods(Attack):
    key, label = "floods", "9 handshake flood + slowloris"
    evidence = ("source_overloaded", "handshake_timeout", "source_connections", "header_timeout")

    def attacker_ids(self) -> list[str]:
        return []

    async def run(self, deadline: float) -> None:
        plan, nodes = self.ctx.plan, self.ctx.nodes
        shakes: Counter = Counter()
        loris: Counter = Counter()
        connector = aiohttp.TCPConnector(local_addr=(ATTACKER_SOURCE, 0), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            attackers = [
                hold_handshakes(session, overlay_url("127.0.0.1", node.port), deadline, shakes)
                for node in nodes.values()
                for _ in range(plan.handshakes)
            ]
            attackers += [
                trickle_headers(nodes[e].port, deadline, loris)
                for e in ENTRIES
                for _ in range(plan.slowloris)
            ]
            flood = asyncio.gather(*attackers, return_exceptions=True)
            await asyncio.sleep(min(1.0, (deadline - time.monotonic()) / 2))
            genuine = await self.genuine_join()
            failed = Counter(type(r).__name__ for r in await flood if isinstance(r, BaseException))
        self.facts.update(
            handshakes=dict(shakes),
            slowloris=dict(loris),
            attacker_tasks_failed=dict(failed),
            genuine_join_from_127_0_0_1=genuine,
        )

    async def genuine_join(self) -> dict[str, Any]:
        """A new member from 127.0.0.1 opens the overlay to every honest node meanwhile."""
        joiner = HostileMember(self.ctx.genesis)
        await joiner.start()
        out: dict[str, Any] = {}
        try:
            for name, node in self.ctx.nodes.items():
                t0 = time.monotonic()
                try:
                    ok = await asyncio.wait_for(joiner.connect(node.url), 10) == node.id
                    out[name] = round(time.monotonic() - t0, 3) if ok else "wrong id"
                except (OverlayError, TimeoutError) as exc:
                    out[name] = f"failed: {type(exc).__name__}"
        finally:
            await joiner.stop()
        return out


async def hold_handshakes(session: aiohttp.ClientSession, url: str, deadline: float, tally: Counter) -> None:
    """Silent overlay handshakes, one after another until `deadline` (at most 1,000): each held
    until the node closes it, a refused one retried 0.2 s later."""
    for _ in range(1000):
        if time.monotonic() >= deadline:
            return
        try:
            ws = await session.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=1))
        except aiohttp.WSServerHandshakeError:
            tally["refused"] += 1
            await asyncio.sleep(0.2)
            continue
        except (aiohttp.ClientError, OSError):
            tally["error"] += 1
            await asyncio.sleep(0.2)
            continue
        tally["admitted"] += 1
        while not ws.closed and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await ws.receive(timeout=min(0.5, left))
        tally["closed by the node" if ws.closed else "held to the end"] += 1
        await ws.close()


async def trickle_headers(port: int, deadline: float, tally: Counter) -> None:
    """Slowloris: a request's headers one byte a second, over and over until `deadline` (at most
    1,000 connections); notes how the node answered each (429 over the cap, 408 at the deadline)."""
    for _ in range(1000):
        if time.monotonic() >= deadline:
            return
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER_SOURCE, 0))
        except OSError:
            tally["connect failed"] += 1
            await asyncio.sleep(0.5)
            continue
        tally["opened"] += 1
        outcome = ""
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            while not outcome and (left := deadline - time.monotonic()) > 0:
                try:
                    answer = await asyncio.wait_for(reader.read(64), min(1.0, left))
                    outcome = "answered " + answer[9:12].decode(errors="replace") if answer else "closed"
                except TimeoutError:
                    if writer.is_closing():  # closed under us without a readable answer
                        outcome = "closed"
                    else:
                        writer.write(b"X")
        except (OSError, RuntimeError):  # reset, or written as the node closed it
            outcome = "reset"
        finally:
            writer.close()
        if outcome:  # the node cut it off: open the next one a little later
            tally[outcome] += 1
            await asyncio.sleep(0.5)


ATTACKS: list[type[Attack]] = [
    ForgedEviction,
    AccusationSpam,
    SybilMint,
    InflatedReceipts,
    GarbageAnswers,
    SilentExecutor,
    NonPayingEntry,
    SlowReaders,
    Floods,
]


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class Phase:
    key: str
    label: str
    prepared: float  # setup began
    start: float  # the window
    end: float
    stopped: float  # the attack stopped (its members closed)
    observed: float  # the heal observation ended
    attack: Attack | None = None
    counters: dict[str, dict[str, float]] = field(default_factory=dict)


async def observe_heal(ctx: Ctx, stopped: float) -> float:
    """At least HEAL_MIN, then until every honest node has seen every honest node alive for a
    second (at most HEAL_MAX); returns when it ended."""
    plan = ctx.plan
    while True:
        now = time.monotonic()
        if now - stopped >= plan.heal_min_s and ctx.watch.alive_since(now - 1.0):
            return now
        if now - stopped >= plan.heal_max_s:
            return now
        await asyncio.sleep(0.25)


async def all_counters(nodes: dict[str, Honest]) -> dict[str, dict[str, float]]:
    return {name: await asyncio.to_thread(counters, node) for name, node in nodes.items()}


async def run_phases(
    ctx: Ctx, attacks: list[type[Attack]], progress: Progress, skipped: list[dict[str, str]]
) -> tuple[list[Phase], AppLoad]:
    """The baseline, then each attack's setup, window, stop and heal observation. An attack whose
    setup fails (say, a staked attacker not seen staked within a minute on a loaded machine) is
    stopped and listed in `skipped` with the reason, and the run goes on with the next."""
    plan = ctx.plan
    total_max = (plan.window_s + plan.heal_max_s + 90) * (len(attacks) + 1)
    load = AppLoad(ctx.nodes, plan.rate, total_max)
    task = progress.add_task("baseline", total=len(attacks) + 1)
    loading = asyncio.create_task(load.run())
    phases: list[Phase] = []
    try:
        await asyncio.sleep(2.0)  # the apps' connections open; not measured
        t0 = time.monotonic()
        before = await all_counters(ctx.nodes)
        await asyncio.sleep(plan.window_s)
        t1 = time.monotonic()
        baseline = Phase("baseline", "0 baseline (no attack)", t0, t0, t1, t1, t1)
        baseline.counters = {
            n: counter_delta(before[n], c) for n, c in (await all_counters(ctx.nodes)).items()
        }
        phases.append(baseline)
        progress.advance(task)
        for kind in attacks:
            attack = kind(ctx)
            progress.update(task, description=f"{attack.label}: setup")
            before = await all_counters(ctx.nodes)
            prepared = time.monotonic()
            try:
                async with asyncio.timeout(120):
                    await attack.prepare()
            except (TimeoutError, OSError, OverlayError) as exc:
                skipped.append({"attack": attack.key, "label": attack.label, "setup_failed": repr(exc)})
                console.print(f"[red]{attack.label}: setup failed ({exc!r}); skipped")
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(60):
                        await attack.finish()
                progress.advance(task)
                continue
            start = time.monotonic()
            progress.update(task, description=f"{attack.label}: attack")
            async with asyncio.timeout(plan.window_s + 60):
                await attack.run(start + plan.window_s)
            end = time.monotonic()
            async with asyncio.timeout(60):
                await attack.finish()
            stopped = time.monotonic()
            progress.update(task, description=f"{attack.label}: heal")
            observed = await observe_heal(ctx, stopped)
            phase = Phase(attack.key, attack.label, prepared, start, end, stopped, observed, attack)
            phase.counters = {
                n: counter_delta(before[n], c) for n, c in (await all_counters(ctx.nodes)).items()
            }
            phases.append(phase)
            progress.advance(task)
    finally:
        load.stop.set()
        progress.update(task, description="the apps' last requests")
        await loading
    return phases, load


# --------------------------------------------------------------------------------------------
# the figures of each phase


def window_stats(samples: list[Sample], t0: float, t1: float, names: dict[str, str]) -> dict[str, Any]:
    mine = [s for s in samples if t0 <= s.t0 < t1]
    ok = [s for s in mine if s.error is None]
    lat = [s.t1 - s.t0 for s in ok]
    return {
        "sent": len(mine),
        "ok": len(ok),
        "success_rate": len(ok) / len(mine) if mine else None,
        "p50_ms": float(np.percentile(lat, 50)) * 1e3 if lat else None,
        "p99_ms": float(np.percentile(lat, 99)) * 1e3 if lat else None,
        "max_ms": max(lat) * 1e3 if lat else None,
        "errors": dict(Counter(s.error for s in mine if s.error).most_common(8)),
        "retried_connection_errors": sum(s.retries for s in mine),
        "slower_than_5s": sum(1 for s in ok if s.t1 - s.t0 > 5.0),
        "error_examples": [
            {
                "error": s.error,
                "entry": s.entry,
                "executor": names.get(s.executor or "", s.executor),
                "answer": s.detail,
            }
            for s in [s for s in mine if s.error][:4]
        ],
        "served_by": dict(Counter(names.get(s.executor or "", "none") for s in ok)),
    }


def not_alive(watch: Watch, t0: float, t1: float, names: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """Honest nodes some honest node saw in another state than alive in [t0, t1]: {subject:
    {observer: states}}."""
    seen: dict[str, dict[str, set[str]]] = {}
    for _, views in watch.rounds(t0, t1):
        for observer, view in views.items():
            if view is None:
                continue
            for subject in watch.honest:
                state = view.get(subject, ("missing",))[0]
                if state != "alive":
                    seen.setdefault(names[subject], {}).setdefault(observer, set()).add(state)
    return {s: {o: sorted(states) for o, states in by.items()} for s, by in seen.items()}


def disturbed_s(watch: Watch, t0: float, t1: float) -> float:
    """How long in [t0, t1] some honest node saw an honest node other than alive (polling rounds)."""
    rounds = watch.rounds(t0, t1)
    total = 0.0
    for (t, views), (t_next, _) in zip(rounds, [*rounds[1:], (t1, None)], strict=True):
        if not watch.all_alive(views):
            total += t_next - t
    return round(total, 2)


def members_heal_s(watch: Watch, phase: Phase) -> float | None:
    """From the stop until every later polling round of the observation saw all honest nodes alive
    (0 when none was seen otherwise during the window either); None if that never came."""
    rounds = watch.rounds(phase.start, phase.observed)
    if all(watch.all_alive(v) for _, v in rounds):
        return 0.0
    healed = None
    for t, views in rounds:
        if not watch.all_alive(views):
            healed = None
        elif healed is None:
            healed = t
    return None if healed is None else max(0.0, healed - phase.stopped)


def load_heal_s(samples: list[Sample], phase: Phase, baseline_rate: float) -> float | None:
    """From the stop until the first 1-second bucket from which every bucket of requests to the end
    of the observation succeeded at least at the baseline's rate; None if none did."""
    buckets: dict[int, list[bool]] = {}
    for s in samples:
        if phase.stopped <= s.t0 < phase.observed:
            buckets.setdefault(int(s.t0 - phase.stopped), []).append(s.error is None)
    rates = {k: sum(v) / len(v) for k, v in buckets.items()}
    healed = None
    for k in sorted(rates):
        if rates[k] + 1e-9 < baseline_rate:
            healed = None
        elif healed is None:
            healed = k
    return None if healed is None else float(healed)


def slow_reader_rss(watch: Watch, phase: Phase) -> dict[str, Any]:
    """Each entry's RSS growth over the window: the highest sample in it (or just after) less the
    last one before it."""
    out: dict[str, Any] = {}
    for name in ENTRIES:
        series = [(t, v) for t, n, v in watch.rss if n == name]
        before = [v for t, v in series if t < phase.start]
        during = [v for t, v in series if phase.start <= t <= phase.stopped + 1.0]
        peak_kernel = max(
            (v for t, n, v in watch.kernel if n == name and phase.start <= t <= phase.stopped), default=0.0
        )
        peak_buffered = max(
            (v for t, n, v in watch.buffered if n == name and phase.start <= t <= phase.stopped), default=0.0
        )
        out[name] = {
            "rss_before_mb": before[-1] if before else None,
            "rss_peak_mb": max(during) if during else None,
            "growth_mb": (max(during) - before[-1]) if before and during else None,
            "peak_overlay_buffered_mb": peak_buffered / 2**20,
            "peak_kernel_send_queue_mb": peak_kernel,
        }
    t0 = phase.start - 5.0
    out["series"] = {
        name: [
            (round(t - phase.start, 2), round(v, 2))
            for t, n, v in watch.rss
            if n == name and t0 <= t <= phase.observed
        ]
        for name in ENTRIES
    }
    delegated, local = out["E1"]["growth_mb"], out["E2"]["growth_mb"]
    out["ratio"] = None if delegated is None or local is None else delegated / max(local, RSS_FLOOR_MB)
    return out


def settle_ledgers(nodes: dict[str, Honest], within: float) -> tuple[dict[str, dict[str, Any]], bool]:
    """Every honest node's balances once they agree (or after `within` s): (by node, agreed)."""

    def read() -> dict[str, dict[str, Any]]:
        return {name: node.balances() for name, node in nodes.items()}

    def rounded(b: dict[str, Any]) -> dict[str, tuple]:
        return {
            k: (round(v["liquid"], 6), round(v["bonded"], 6), round(v["unbonding"], 6), v["barred"])
            for k, v in b.items()
        }

    views = read()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(rounded(v) == rounded(views["E1"]) for v in views.values()):
            return views, True
        time.sleep(0.5)
        views = read()
    return views, all(rounded(v) == rounded(views["E1"]) for v in views.values())


def credits_moved(
    views: dict[str, dict[str, Any]], ids: list[str], allocations: dict[str, int]
) -> dict[str, float]:
    """What the attacker's keys hold beyond their allocations, on each honest node's ledger."""
    out = {}
    for observer, balances in views.items():
        moved = 0.0
        for key in ids:
            if key in balances:
                b = balances[key]
                moved += b["liquid"] + b["bonded"] + b["unbonding"] - allocations.get(key, 0)
        out[observer] = round(moved, 6)
    return out


def analyse(ctx: Ctx, phases: list[Phase], load: AppLoad, views: dict, agreed: bool) -> dict[str, Any]:
    names = {node.id: name for name, node in ctx.nodes.items()}
    names |= {key.node_id: name for name, key in ctx.staked.items()} | {ctx.h.id: "H"}
    allocations = ctx.genesis.ledger.allocations
    base = window_stats(load.samples, phases[0].start, phases[0].end, names)
    base_rate = base["success_rate"] or 0.0
    rows = []
    for phase in phases:
        stats = window_stats(load.samples, phase.start, phase.end, names)
        rate = stats["success_rate"]
        row: dict[str, Any] = {
            "attack": phase.key,
            "label": phase.label,
            "times_s": {
                "setup": round(phase.start - phase.prepared, 2),
                "window": round(phase.end - phase.start, 2),
                "stop": round(phase.stopped - phase.end, 2),
                "observed_after_stop": round(phase.observed - phase.stopped, 2),
            },
            "requests": stats,
            "served_fraction": rate / base_rate if rate is not None and base_rate else None,
            "honest_not_alive": not_alive(ctx.watch, phase.start, phase.observed, names),
            "membership_disturbed_s": disturbed_s(ctx.watch, phase.start, phase.observed),
            # of them, those some honest node went as far as declaring dead (or lost from its view)
            "honest_seen_dead": sorted(
                subject
                for subject, by in not_alive(ctx.watch, phase.start, phase.observed, names).items()
                if any(set(states) - {"suspect"} for states in by.values())
            ),
            "cpu_s_in_window": ctx.watch.cpu_between(phase.start, phase.end),
            "counters": phase.counters,
        }
        if phase.attack is not None:
            attack = phase.attack
            moved = credits_moved(views, attack.attacker_ids(), allocations)
            worst = max(moved.values()) if moved and attack.attacker_ids() else 0.0
            row["attacker"] = {
                "keys": [names.get(k, k[:12]) for k in attack.attacker_ids()][:3]
                + (["+sybils"] if len(attack.attacker_ids()) > 3 else []),
                "credits_moved_by_observer": moved,
                "credits_moved": worst,
                "verified_work_credits": round(attack.allowed_credits, 6),
                "beyond_verified_work": round(worst - attack.allowed_credits, 6),
            }
            row["facts"] = attack.facts
            row["defence_counters"] = {needle: summed(phase.counters, needle) for needle in attack.evidence}
            row["attacker"]["keys_on_ledger"] = sum(k in views["E1"] for k in attack.attacker_ids())
            heal_stats = window_stats(load.samples, phase.stopped, phase.observed, names)
            row["requests_during_heal"] = {
                k: heal_stats[k] for k in ("sent", "ok", "errors", "error_examples")
            }
            members = members_heal_s(ctx.watch, phase)
            served = load_heal_s(load.samples, phase, base_rate)
            row["heal"] = {
                "members_s": members,
                "requests_s": served,
                "heal_s": None if members is None or served is None else max(members, served),
            }
            if isinstance(attack, SlowReaders):
                row["rss"] = slow_reader_rss(ctx.watch, phase)
        row["targets"] = evaluate(row)
        row["result"] = "PASS" if all(t["result"] == "PASS" for t in row["targets"]) else "MISS"
        rows.append(row)
    return {"baseline": base, "phases": rows}


def evaluate(row: dict[str, Any]) -> list[dict[str, Any]]:
    # The baseline's own success rate is held to the same bar: when the machine cannot serve the
    # load without an attack, the fractions of it below mean little, and the baseline row says so.
    baseline = row["attack"] == "baseline"
    out = [
        bench.target_result(
            "served (baseline: success rate)" if baseline else "served vs baseline",
            row["requests"]["success_rate"] if baseline else row["served_fraction"],
            TARGETS["served_fraction"],
            ">=",
            "",
            f"{row['requests']['ok']}/{row['requests']['sent']}",
        ),
        bench.target_result(
            "honest nodes evicted",
            len(row["honest_seen_dead"]),
            TARGETS["honest_evicted"],
            "<=",
            "",
            ",".join(row["honest_seen_dead"]),
        ),
    ]
    if "attacker" in row:
        a = row["attacker"]
        out.append(
            bench.target_result(
                "credits to the attacker beyond verified work",
                a["beyond_verified_work"],
                TARGETS["credits_beyond_work"] + 1e-6,
                "<=",
                "credits",
                f"moved {a['credits_moved']:g}, verified work {a['verified_work_credits']:g}",
            )
        )
    if "rss" in row:
        out.append(
            bench.target_result(
                "E1 (delegated) RSS growth / E2 (local)", row["rss"]["ratio"], TARGETS["rss_ratio"], "<=", "x"
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# the report


def fmt(v: float | None, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def down_text(down: dict[str, dict[str, list[str]]], seconds: float) -> str:
    """'2 for 1.2 s: X1 suspect@E1,E2; ...': who was seen in which state, by whom, for how long."""
    parts = []
    for subject, by in sorted(down.items()):
        states = sorted({state for seen in by.values() for state in seen})
        parts.append(f"{subject} {'/'.join(states)}@{','.join(sorted(by))}")
    return f"{len(down)} for {seconds:.1f} s: " + "; ".join(parts) if parts else "0"


def print_table(report: dict[str, Any]) -> None:
    table = Table(
        title="attack resilience (targets: served >= 99% of baseline, no credits beyond verified work, "
    )
    table.title += "no honest node evicted (seen dead), slow readers' RSS growth <= 2x local)"
    for name in (
        "attack",
        "served",
        "vs base",
        "p50/p99 ms",
        ">5 s",
        "attacker credits",
        "honest nodes not alive (evicted: dead)",
        "RSS",
    ):
        table.add_column(name, justify="left" if name == "attack" or name.startswith("honest") else "right")
    table.add_column("heal s", justify="right")
    table.add_column("")
    for row in report["results"]["phases"]:
        req, a, rss = row["requests"], row.get("attacker"), row.get("rss")
        credits = "-" if not a or not a["keys"] else f"{a['credits_moved']:.3f}"
        if a and a["verified_work_credits"]:
            credits += f" (verified {a['verified_work_credits']:.3f})"
        ratio = (
            f"{fmt(rss['E1']['growth_mb'], '.1f')}/{fmt(rss['E2']['growth_mb'], '.1f')} MB" if rss else "-"
        )
        heal = row.get("heal")
        served = None if row["served_fraction"] is None else 100 * row["served_fraction"]
        table.add_row(
            row["label"],
            f"{req['ok']}/{req['sent']}",
            fmt(served, ".1f") + "%",
            f"{fmt(req['p50_ms'], '.0f')}/{fmt(req['p99_ms'], '.0f')}",
            str(req["slower_than_5s"]),
            credits,
            down_text(row["honest_not_alive"], row["membership_disturbed_s"]),
            ratio + (f" = {fmt(rss['ratio'], '.1f')}x" if rss else ""),
            "-" if not heal else fmt(heal["heal_s"], ".1f", "never"),
            bench.verdict(row["result"] == "PASS"),
        )
    for skip in report["results"].get("skipped", []):
        failed = f"setup failed: {skip['setup_failed']}"
        table.add_row(skip["label"], *["-"] * 5, failed, "-", "-", bench.verdict(False))
    Console(stderr=True, width=max(console.width, 190)).print(table)


def bars(ax: Any, x: Any, values: list[Any], ok: list[bool], digits: str, width: float = 0.8) -> None:
    """Bars green where the value meets its target, red where it misses; each labelled."""
    heights = [v or 0.0 for v in values]
    ax.bar(x, heights, width, color=["#2ca02c" if good else "#d62728" for good in ok])
    for i, v in enumerate(values):
        ax.annotate(
            "-" if v is None else format(v, digits), (x[i], heights[i]), ha="center", va="bottom", fontsize=7
        )


def plot(report: dict[str, Any], samples: list[Sample], t_base: float, out: Path) -> None:
    plt = bench.pyplot()
    rows = report["results"]["phases"]
    labels = ["base" if r["attack"] == "baseline" else r["label"].split(" ", 1)[0] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))

    def passed(row: dict[str, Any], name: str) -> bool:
        return all(t["result"] == "PASS" for t in row["targets"] if t["target"].startswith(name))

    ax = axes[0][0]
    served = [None if r["served_fraction"] is None else 100 * r["served_fraction"] for r in rows]
    bars(ax, x, served, [passed(r, "served") for r in rows], ".1f")
    ax.axhline(
        100 * TARGETS["served_fraction"], ls="--", c="k", lw=0.8, label="target: 99% of the baseline's"
    )
    ax.set_ylim(max(0.0, min([90.0, *(v - 10 for v in served if v is not None)])), 102)
    ax.set_xticks(x, labels)
    ax.set_ylabel("success rate / the baseline's (%)")
    ax.set_title("Honest requests served during each attack")
    ax.legend(fontsize=7, loc="lower left")

    ax = axes[0][1]
    attacked = [r.get("attacker") or {} for r in rows]
    bars(
        ax,
        x - 0.2,
        [a.get("credits_moved") for a in attacked],
        [passed(r, "credits") for r in rows],
        ".2f",
        0.4,
    )
    verified = [a.get("verified_work_credits", 0.0) for a in attacked]
    ax.bar(x + 0.2, verified, 0.4, color="#7f7f7f", label="price of the work the entries could verify")
    ax.axhline(0, c="k", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set_ylabel("credits (its keys on the honest ledgers, less their allocations)")
    ax.set_title("Credits moved to the attacker (target: none beyond verified work)")
    ax.legend(fontsize=7)

    ax = axes[0][2]
    dead = np.array([len(r["honest_seen_dead"]) for r in rows])
    suspect = np.array([len(r["honest_not_alive"]) for r in rows]) - dead
    ax.bar(x, dead, color="#7f0000", label="seen dead by some honest node")
    ax.bar(x, suspect, bottom=dead, color="#ff7f0e", label="seen suspect only")
    for i, r in enumerate(rows):
        if r["honest_not_alive"]:
            seconds = f"{r['membership_disturbed_s']:.1f} s"
            ax.annotate(seconds, (i, dead[i] + suspect[i]), ha="center", va="bottom", fontsize=7)
    ax.axhline(TARGETS["honest_evicted"], c="k", lw=0.8, ls="--", label="target: none seen dead")
    ax.set_ylim(0, len(HONEST) + 0.5)
    ax.set_xticks(x, labels)
    ax.set_ylabel("honest nodes (of 5); label: for how long")
    ax.set_title("Honest nodes some honest node saw other than alive")
    ax.legend(fontsize=7, loc="upper left")

    ax = axes[1][0]
    heal = [(r.get("heal") or {}).get("heal_s") for r in rows[1:]]
    bars(ax, x[1:], heal, [h is not None for h in heal], ".1f")
    ax.set_xticks(x[1:], labels[1:])
    ax.set_ylabel("seconds after the attack stopped")
    ax.set_title("Time to heal: all alive everywhere, requests as in the baseline")

    ax = axes[1][1]
    slow = next((r for r in rows if "rss" in r), None)
    if slow is not None:
        rss = slow["rss"]
        what = (
            ("growth_mb", "RSS growth"),
            ("peak_overlay_buffered_mb", "overlay bytes buffered (peak)"),
            ("peak_kernel_send_queue_mb", "kernel send queues to apps (peak)"),
        )
        for j, (key, name) in enumerate(what):
            ax.bar(np.arange(2) + (j - 1) * 0.27, [rss[e][key] or 0 for e in ENTRIES], 0.27, label=name)
        limit = TARGETS["rss_ratio"] * max(rss["E2"]["growth_mb"] or 0, RSS_FLOOR_MB)
        ax.axhline(limit, ls="--", c="k", lw=0.8, label="target: RSS growth <= 2x the local one")
        ax.set_xticks([0, 1], ["E1: delegated streams", "E2: local streams"])
        ax.legend(fontsize=7)
    ax.set_ylabel("MB")
    ax.set_title("The entries under slow readers")

    ax = axes[1][2]
    starts = [s.t0 - t_base for s in samples]
    if starts:
        edges = np.arange(0.0, max(starts) + 1.0, 1.0)
        sent = np.histogram(starts, edges)[0]
        ok = np.histogram([s.t0 - t_base for s in samples if s.error is None], edges)[0]
        ax.plot(edges[:-1], np.where(sent > 0, 100 * ok / np.maximum(sent, 1), np.nan), lw=0.8, c="k")
    for r, label in zip(rows, labels, strict=True):
        w0, w1 = r["window_s"]
        ax.axvspan(w0, w1, color="#2ca02c" if r["attack"] == "baseline" else "#d62728", alpha=0.15)
        ax.annotate(label, ((w0 + w1) / 2, 101), ha="center", fontsize=7)
    ax.set_ylim(0, 104)
    ax.set_xlabel("seconds since the baseline began (shaded: the windows)")
    ax.set_ylabel("requests served, per 1 s of starts (%)")
    ax.set_title("Success rate over the run")

    bench.save_figure(fig, bench.figure_title("attack resilience", report["meta"]), out)


# --------------------------------------------------------------------------------------------
# main


async def attack_network(
    ctx_parts: dict[str, Any], plan: Plan, attacks: list[type[Attack]], progress: Progress
) -> tuple[Ctx, list[Phase], AppLoad]:
    h = HostileMember(ctx_parts["genesis"])
    await h.start()
    ctx = Ctx(ctx_parts["genesis"], ctx_parts["nodes"], h, ctx_parts["staked"], ctx_parts["watch"], plan)
    try:
        for node in ctx.nodes.values():
            await h.connect(node.url)
        phases, load = await run_phases(ctx, attacks, progress, ctx_parts["skipped"])
    finally:
        await h.stop()
    return ctx, phases, load


def main(argv: list[str] | None = None) -> int:
    configure_logging("warning")  # the hostile members' overlays log every connection at info
    parser = bench.bench_parser(__doc__, "windows of 4 s: about 2 minutes")
    keys = [a.key for a in ATTACKS]
    parser.add_argument(
        "--attacks", default=",".join(keys), help=f"which attacks, in order (default all: {','.join(keys)})"
    )
    args = parser.parse_args(argv)
    wanted = args.attacks.split(",")
    if unknown := set(wanted) - set(keys):
        parser.error(f"unknown attacks {sorted(unknown)}; known: {keys}")
    attacks = [next(a for a in ATTACKS if a.key == k) for k in wanted]
    plan = Plan.make(args.quick)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    run = bench.RunStart.now()
    workdir = Path(tempfile.mkdtemp(prefix="attack-resilience-"))
    children: list[bench.Child] = []
    nodes: dict[str, Honest] = {}
    watch: Watch | None = None
    try:
        with bench.progress_bar(console) as progress:
            setup = progress.add_task("start the stub", total=None)
            stub = bench.Child("stub", bench.stub_command(4, LONG_CHUNKS, GAP_MS))
            children.append(stub)
            staked = {name: NodeIdentity.generate() for name in STAKED}
            genesis, genesis_path = write_network(workdir, staked)
            for name in HONEST:
                progress.update(setup, description=f"start node {name}")
                bootstrap = [nodes["E1"].url] if nodes else []
                node = Honest(role_config(name, stub, genesis_path, bootstrap), workdir, name)
                nodes[name] = node
                node.start(ready_timeout=60)
                node.id = node.own_id()
            progress.update(
                setup, description="wait until every node sees every other alive, executors staked"
            )
            t0 = time.monotonic()
            bench.wait_until(lambda: network_ready(nodes), 90, 0.3, "the network formed")
            formed_s = time.monotonic() - t0
            progress.update(setup, description="network formed", total=1, completed=1)
            procs = {name: node.ps for name, node in nodes.items()} | {
                "stub": stub.ps,
                "bench": psutil.Process(),
            }
            watch = Watch(nodes, procs, 0.3)
            watch.start()
            skipped: list[dict[str, str]] = []  # attacks whose setup failed
            parts = {"genesis": genesis, "nodes": nodes, "staked": staked, "watch": watch, "skipped": skipped}
            ctx, phases, load = uvloop.run(attack_network(parts, plan, attacks, progress))
            progress.update(setup, description="the honest ledgers settle")
            views, agreed = settle_ledgers(nodes, plan.settle_s)
            watch.halt.set()
        results = analyse(ctx, phases, load, views, agreed)
        results["skipped"] = skipped
        t_base = phases[0].start
        for row, phase in zip(results["phases"], phases, strict=True):
            row["window_s"] = [round(phase.start - t_base, 2), round(phase.end - t_base, 2)]
        joined = {k: v for k, v in genesis.ledger.allocations.items() if k in views["E1"]}
        supply = sum(b["liquid"] + b["bonded"] + b["unbonding"] for b in views["E1"].values())
        report = {
            "meta": {
                **run.meta(args.quick, plan),
                "network_formed_s": formed_s,
                "genesis": {
                    "gossip": GOSSIP.model_dump(),
                    "ledger": {
                        **genesis.ledger.model_dump(),
                        "allocations": "founding: entries 10M, executors and H4..H6 1,000",
                    },
                },
                "node_ids": {n: node.id[:16] for n, node in nodes.items()}
                | {n: k.node_id[:16] for n, k in staked.items()}
                | {"H": ctx.h.id[:16]},
                "stub": {"long_chunks": LONG_CHUNKS, "gap_ms": GAP_MS},
                "honest_ledgers_agree": agreed,
                "credit_supply": {"held": round(supply, 6), "allocated_to_joined_keys": sum(joined.values())},
            },
            "results": results,
        }
        (out_dir / "attack_resilience.json").write_text(json.dumps(report, indent=2, default=str))
        plot(report, load.samples, t_base, out_dir / "attack_resilience.png")
        print_table(report)
        console.print(bench.machine_line(report["meta"]))
        console.print(f"wrote {out_dir / 'attack_resilience.json'} and {out_dir / 'attack_resilience.png'}")
        return 0
    finally:
        if watch is not None:
            watch.halt.set()
        bench.tear_down([*nodes.values(), *reversed(children)], workdir)


if __name__ == "__main__":
    sys.exit(main())
