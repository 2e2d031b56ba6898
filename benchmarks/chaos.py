"""Chaos: real nodes killed, stopped, frozen and restarted under load; nothing may be lost, hang or be
corrupted.

    python benchmarks/chaos.py [--quick] [--slow-links] [--out DIR] [--seed K] [--keep]

The network: 2 entry nodes (E1, the seed with no bootstrap; E2) that serve no model and delegate every
request, and 4 executors (X1..X4), each in front of its own continuation stub
(benchmarks/continuation_stub.py): answers are a pure function of the prompt, one token per SSE event,
and a request that carries the answer so far (an assistant prefix, or a completion prompt extended by
it) gets exactly the rest. So a stream that breaks mid-way and is continued at another executor must
join to the uninterrupted text, byte for byte; the client checks every answer against
`expected_text`. The genesis turns duels off (payments are then exactly one credit per delegated
answer) and gives the entries plenty of credit.

The load: worker tasks in this process, each a closed loop through the official openai SDK
(AsyncOpenAI, max_retries=0) against its home entry: chat and completions, streamed and not, with and
without max_tokens (seeded). A worker whose entry refuses the connection sends to the other entry for
a second (what a load balancer's health check does). Bounded in count and time; each request has a
client-side deadline (`hung` beyond it).

The schedule (offsets from the start of the load): kill -9, SIGTERM, SIGSTOP/SIGCONT of executors,
two executors killed together (2 of 6 nodes, 33 %), SIGTERM of the seed entry and kill -9 of the other,
and a restart after each stop. A monitor polls every node's /wwwserve/peers (membership as each node
sees it). After the load every stopped node is restarted and the ledger must converge: every node's
balances identical and no receipt left unpaid; then credits are summed (conservation) and each
executor's pay is set against the work it served.

--slow-links: every overlay link between nodes passes through benchmarks/slow_link_proxy.py: one proxy
in front of each node (its public_url, and the bootstrap address), which learns from the overlay
handshake who dialled, so each pair of nodes has its own round-trip time (seeded, 20-250 ms, +-20 %
jitter) whoever dialled, plus occasional stalls of a connection. Reported against the RTT: delegation
overhead per (entry, executor) pair, gossip convergence and failure-detection times. The client's
link to its entry and each executor's link to its stub stay direct.

Outcomes of a request: ok (the exact text and finish reason), clean_error (an OpenAI-shaped 5xx with
Retry-After), error (any other HTTP error), refused (the entry's port was closed: it was down),
conn_lost (the connection broke before an answer), hung (client deadline), broken (a stream that
raised or ended without a finish reason after some text), corrupted (an answer whose text or finish
reason differs from the uninterrupted one).

Writes chaos.json and chaos.png (chaos_slow_links.* with --slow-links) to --out (default
benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import httpx
import numpy as np
import openai
import yaml
from bench_common import (
    BenchNode,
    Child,
    RunStart,
    bench_parser,
    figure_title,
    fmt,
    founding_allocations,
    machine_line,
    progress_bar,
    pyplot,
    save_figure,
    target_result,
    targets_table,
)
from continuation_stub import MARK, answer_length, chat_seed, completion_seed, expected_finish, expected_text
from rich.console import Console
from rich.table import Table
from slow_link_proxy import Link, LinkSpec, ProxyProcess

from tests.support import free_port
from wwwserve_gateway.network.receipts import decode_receipt

console = Console(stderr=True, width=None if sys.stderr.isatty() else 180)

ENTRIES = ("E1", "E2")
EXECUTORS = ("X1", "X2", "X3", "X4")
NODES = ENTRIES + EXECUTORS
MODEL = "stub"
BOND = 100
ENTRY_CREDITS = 10_000_000
EXECUTOR_CREDITS = 1_000
PRICE = 1.0
GAP_MS = 10.0  # the stubs' time per token
STUB_CAPACITY = 1024
POLICIES = {
    "entry": {"target_usage": -1, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0},
    "executor": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": BOND},
}
ROUTE = "x-wwwserve-route"
RECEIPT = "x-wwwserve-receipt"
# A request counts as disturbed when it took this much longer than its answer's own duration (its
# tokens x GAP_MS), or more than 3x the calm p99 of that excess if larger.
DISTURBED_S = 1.0
TAIL_S = 10.0
STOPS = ("kill9", "term", "stop")
SETTLE_S = 8.0  # a restarted node serves this long after ready before the schedule hits it again  # the load goes on this long after the schedule's last action finished
RECOVERY_WINDOW_S = 10.0  # requests disturbed this long after an event count towards its recovery
TARGETS = {"success": 0.999, "recovery_s": 2.0}
SLOW = {"rtt_ms": (20.0, 250.0), "jitter": 0.2, "stall_every_s": 90.0, "stall_s": (0.5, 1.5)}


# --------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class Step:
    at: float  # seconds after the load started
    action: str  # kill9 | term | stop | cont | start
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    load_s: float
    workers: int
    max_requests: int
    hung_s: float
    converge_s: float
    steps: tuple[Step, ...]

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            steps = (
                Step(5, "kill9", ("X1",)),
                Step(11, "start", ("X1",)),
                Step(17, "term", ("X2",)),
                Step(23, "start", ("X2",)),
                Step(29, "stop", ("X3",)),
                Step(35, "cont", ("X3",)),
                Step(41, "kill9", ("X1", "X2")),
                Step(51, "start", ("X1", "X2")),
                Step(57, "kill9", ("E2",)),
                Step(62, "start", ("E2",)),
            )
            return cls(70.0, 8, 20_000, 30.0, 45.0, steps)
        steps = (
            Step(10, "kill9", ("X1",)),
            Step(22, "start", ("X1",)),
            Step(35, "term", ("X2",)),
            Step(47, "start", ("X2",)),
            Step(60, "stop", ("X3",)),
            Step(70, "cont", ("X3",)),
            Step(85, "kill9", ("X1", "X2")),
            Step(105, "start", ("X1", "X2")),
            Step(118, "term", ("E1",)),
            Step(130, "start", ("E1",)),
            Step(143, "kill9", ("E2",)),
            Step(155, "start", ("E2",)),
        )
        return cls(175.0, 10, 100_000, 30.0, 60.0, steps)


# --------------------------------------------------------------------------------------------
# processes


class Node(BenchNode):
    def __init__(
        self,
        workdir: Path,
        name: str,
        model_list: list[dict[str, Any]],
        role: str,
        network: Path,
        port: int,
        public_url: str | None,
        bootstrap: list[str],
    ) -> None:
        extra = {"public_url": public_url} if public_url else {}
        super().__init__(
            workdir, name, model_list, network=str(network), bootstrap=bootstrap, port=port, **extra
        )
        self.config["policy"] = {"settings": POLICIES[role]}
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.role = role
        self.id = ""
        self.frozen = False
        self.starts = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_findings(self) -> dict[str, Any]:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", self.log())
        events: Counter = Counter()
        examples: dict[str, str] = {}
        tracebacks = 0
        for line in plain.splitlines():
            m = re.search(r"\[(warning|error|critical|exception)\s*\]\s+(.*?)(\s{2,}|$)", line)
            if m:
                key = f"{m.group(1)}: {m.group(2).strip()}"
                events[key] += 1
                examples.setdefault(key, line.strip()[:400])
            elif line.startswith("Traceback"):
                tracebacks += 1
        return {
            "events": dict(events.most_common(20)),
            "examples": [examples[k] for k, _ in events.most_common(12)],
            "tracebacks": tracebacks,
        }


def stub_model_list(stub_url: str) -> list[dict[str, Any]]:
    return [
        {
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/{MODEL}",
                "api_base": stub_url + "/v1",
                "api_key": "x",
                "max_parallel_requests": STUB_CAPACITY,
            },
        }
    ]


def pair_rtts(ids: dict[str, str], seed: int) -> dict[tuple[str, str], float]:
    """A symmetric round-trip time (ms) per pair of nodes, spread over SLOW['rtt_ms']."""
    rng = random.Random(seed)
    lo, hi = SLOW["rtt_ms"]
    pairs = [(a, b) for i, a in enumerate(NODES) for b in NODES[i + 1 :]]
    values = list(np.linspace(lo, hi, len(pairs)))
    rng.shuffle(values)
    out: dict[tuple[str, str], float] = {}
    for (a, b), v in zip(pairs, values, strict=True):
        out[(a, b)] = out[(b, a)] = round(float(v), 1)
    return out


# --------------------------------------------------------------------------------------------
# the client


@dataclass
class Req:
    i: int
    worker: int
    entry: str
    endpoint: str
    stream: bool
    max_tokens: int | None
    tokens: int  # the answer's length
    start: float
    end: float = 0.0
    outcome: str = ""
    detail: str = ""
    status: int | None = None
    executor: str = ""  # the route's last hop (streams: the first executor)
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt: str = ""
    receipt: str = ""  # non-streamed answers: the request hash in the x-wwwserve-receipt header

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def nominal(self) -> float:
        return self.tokens * GAP_MS / 1000

    @property
    def excess(self) -> float:
        return self.latency - self.nominal


class Load:
    def __init__(self, plan: Plan, entries: dict[str, Node], t0: float, seed: int, ids: dict[str, str]):
        self.plan = plan
        self.t0 = t0
        self.rng = random.Random(seed)
        self.names = {v: k for k, v in ids.items()}
        self.clients = {
            name: openai.AsyncOpenAI(
                base_url=node.url + "/v1",
                api_key="x",
                max_retries=0,
                timeout=httpx.Timeout(plan.hung_s + 10, connect=5.0),
                http_client=httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
                    timeout=httpx.Timeout(plan.hung_s + 10, connect=5.0),
                ),
            )
            for name, node in entries.items()
        }
        self.reqs: list[Req] = []
        self.down_until: dict[str, float] = {}
        self.stop_at = t0 + plan.load_s
        self.count = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def worker(self, w: int, tick: Any) -> None:
        home = ENTRIES[w % len(ENTRIES)]
        other = ENTRIES[(w + 1) % len(ENTRIES)]
        while time.monotonic() < self.stop_at and self.count < self.plan.max_requests:
            i = self.count
            self.count += 1
            entry = home if self.down_until.get(home, 0) <= self.now() else other
            req = self.make(i, w, entry)
            self.reqs.append(req)
            await self.send(req)
            if req.outcome == "refused":
                self.down_until[entry] = self.now() + 1.0
            tick()

    def make(self, i: int, w: int, entry: str) -> Req:
        r = self.rng
        endpoint = "chat" if r.random() < 0.75 else "completion"
        stream = r.random() < 0.7
        max_tokens = None if r.random() < 0.5 else r.randint(4, 90)
        req = Req(i, w, entry, endpoint, stream, max_tokens, 0, self.now())
        req.prompt = f"chaos request {i} {r.random():.6f}"
        return req

    async def send(self, req: Req) -> None:
        client = self.clients[req.entry]
        extra = {} if req.max_tokens is None else {"max_tokens": req.max_tokens}
        if req.endpoint == "chat":
            messages = [{"role": "user", "content": req.prompt}]
            seed = chat_seed(messages)[0]
            call = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, stream=req.stream, **extra
            )
        else:
            prompt = req.prompt + MARK
            seed = completion_seed(prompt)[0]
            call = client.completions.with_raw_response.create(
                model=MODEL, prompt=prompt, stream=req.stream, **extra
            )
        req.tokens = answer_length(seed, req.max_tokens)
        want_text = expected_text(seed, req.max_tokens)
        want_finish = expected_finish(seed, req.max_tokens)
        req.start = self.now()
        got_text = False
        try:
            async with asyncio.timeout(self.plan.hung_s):
                raw = await call
                route = (raw.headers.get(ROUTE) or "").split(",")
                req.executor = self.names.get(route[-1], route[-1][:8]) if route[-1] else ""
                token = raw.headers.get(RECEIPT)
                if token:
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        record = decode_receipt(token)
                        req.receipt = str(record.get("body", record).get("request", ""))
                parsed = raw.parse()
                if not req.stream:
                    choice = parsed.choices[0]
                    text = choice.message.content if req.endpoint == "chat" else choice.text
                    finish = choice.finish_reason
                else:
                    parts: list[str] = []
                    finish = None
                    ids: set[str] = set()
                    async for chunk in parsed:
                        ids.add(chunk.id)
                        for choice in chunk.choices:
                            piece = choice.delta.content if req.endpoint == "chat" else choice.text
                            if piece:
                                parts.append(piece)
                                got_text = True
                                t = self.now()
                                req.chunk_times.append(t)
                                if req.ttft is None:
                                    req.ttft = t - req.start
                            finish = finish or choice.finish_reason
                    text = "".join(parts)
                    if len(ids) > 1:
                        req.outcome, req.detail = "corrupted", f"{len(ids)} different chunk ids"
                if not req.outcome:
                    if req.stream and finish is None:
                        req.outcome, req.detail = "broken", "the stream ended without a finish reason"
                    elif text != want_text or finish != want_finish:
                        req.outcome = "corrupted"
                        req.detail = (
                            f"text {len(text or '')}/{len(want_text)} chars, finish {finish}/{want_finish}"
                        )
                        if text != want_text:
                            at = next(
                                (
                                    k
                                    for k, (a, b) in enumerate(zip(text or "", want_text, strict=False))
                                    if a != b
                                ),
                                min(len(text or ""), len(want_text)),
                            )
                            req.detail += f", first difference at {at}: {(text or '')[at : at + 30]!r}"
                    else:
                        req.outcome, req.detail = "ok", ""
        except TimeoutError:
            req.outcome, req.detail = "hung", f"no end within {self.plan.hung_s:g} s"
        except openai.APIStatusError as exc:
            req.status = exc.status_code
            shaped = isinstance(exc.body, dict) and "message" in exc.body
            retry = exc.response.headers.get("retry-after")
            clean = exc.status_code >= 500 and shaped and retry is not None
            req.outcome = "clean_error" if clean else "error"
            req.detail = f"HTTP {exc.status_code} retry-after={retry}: {str(exc.message)[:160]}"
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            if isinstance(cause, httpx.ConnectError):
                req.outcome, req.detail = "refused", f"{type(cause).__name__}: {cause}"[:200]
            elif got_text:
                req.outcome, req.detail = "broken", f"{type(cause).__name__}: {cause}"[:200]
            else:
                req.outcome, req.detail = "conn_lost", f"{type(cause).__name__}: {cause}"[:200]
        except openai.APIError as exc:  # an error event in a stream
            req.outcome = "broken" if req.stream else "error"
            req.detail = f"{type(exc).__name__}: {str(exc.message)[:200]}"
        except (httpx.HTTPError, aiohttp.ClientError, OSError) as exc:
            req.outcome = "broken" if got_text else "conn_lost"
            req.detail = f"{type(exc).__name__}: {exc}"[:200]
        req.end = self.now()

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.close()


# --------------------------------------------------------------------------------------------
# the run: membership monitor, schedule, convergence


class Monitor:
    """Every node's view of every other (/wwwserve/peers), polled while the run lasts: state changes
    per (observer, subject), with their times."""

    def __init__(self, nodes: dict[str, Node], t0: float, interval: float) -> None:
        self.nodes = nodes
        self.t0 = t0
        self.interval = interval
        self.names: dict[str, str] = {}
        self.last: dict[tuple[str, str], str] = {}
        self.changes: list[tuple[float, str, str, str]] = []  # (t, observer, subject, state)
        self.alive_seen: list[tuple[float, str, int]] = []  # (t, observer, executors alive)
        self.stopped = False

    async def run(self, session: aiohttp.ClientSession) -> None:
        while not self.stopped:
            tick = time.monotonic()
            await asyncio.gather(*(self.poll(session, n) for n in self.nodes.values()))
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - tick)))

    async def poll(self, session: aiohttp.ClientSession, node: Node) -> None:
        if not node.running:  # a restarted node's views are new ones: each is recorded as a change
            for subject in NODES:
                self.last.pop((node.name, subject), None)
            return
        if node.frozen:
            return
        try:
            async with session.get(
                node.url + "/wwwserve/peers", timeout=aiohttp.ClientTimeout(total=1.5)
            ) as r:
                peers = await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        if peers is None:
            return
        t = time.monotonic() - self.t0
        seen = {}
        for p in peers:
            name = self.names.get(p["id"])
            if name and name != node.name:
                seen[name] = p["state"]
        for subject in NODES:
            if subject == node.name:
                continue
            state = seen.get(subject, "absent")
            key = (node.name, subject)
            if self.last.get(key) != state:
                self.last[key] = state
                self.changes.append((t, node.name, subject, state))
        self.alive_seen.append((t, node.name, sum(1 for x in EXECUTORS if seen.get(x) == "alive")))

    def state_at(self, observer: str, subject: str, t: float) -> str | None:
        state = None
        for tc, o, s, st in self.changes:
            if tc > t:
                break
            if o == observer and s == subject:
                state = st
        return state

    def first_change(
        self, subject: str, after: float, states: set[str], observers: list[str]
    ) -> dict[str, float]:
        """Per observer, the first time after `after` it saw `subject` in one of `states`."""
        out: dict[str, float] = {}
        for tc, o, s, st in self.changes:
            if tc >= after and s == subject and o in observers and o not in out and st in states:
                out[o] = tc - after
        return out


class Chaos:
    """Runs the schedule. A step waits for the previous action on its nodes to finish (a restart
    until the node is ready, a SIGTERM until the process exited), and keeps its planned distance to
    the step before: on a slow machine the schedule stretches instead of bunching up."""

    def __init__(self, plan: Plan, nodes: dict[str, Node], t0: float, progress: Any) -> None:
        self.plan = plan
        self.nodes = nodes
        self.t0 = t0
        self.progress = progress
        self.events: list[dict[str, Any]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> None:
        pending: dict[str, asyncio.Task[None]] = {}
        prev_planned = prev_fired = 0.0
        for k, step in enumerate(self.plan.steps):
            await asyncio.sleep(max(0.0, prev_fired + (step.at - prev_planned) - self.now()))
            # a step that stops nodes waits until every restart so far has finished (so no more nodes
            # are down than the plan says), and a restarted node serves SETTLE_S after ready first
            stops = step.action in STOPS
            await asyncio.gather(*(t for n, t in pending.items() if stops or n in step.nodes))
            ready = [
                e.get("ready") or 0.0
                for e in self.events
                if e["action"] == "start" and (stops or e["node"] in step.nodes)
            ]
            await asyncio.sleep(max(0.0, max(ready, default=0.0) + SETTLE_S - self.now()))
            prev_planned, prev_fired = step.at, self.now()
            task = asyncio.create_task(self.step(k, step))
            for n in step.nodes:
                pending[n] = task
        await asyncio.gather(*pending.values())

    async def step(self, k: int, step: Step) -> None:
        await asyncio.gather(*(self.act(k, step, name) for name in step.nodes))

    async def act(self, k: int, step: Step, name: str) -> None:
        node = self.nodes[name]
        ev: dict[str, Any] = {
            "step": k,
            "action": step.action,
            "node": name,
            "role": node.role,
            "planned": step.at,
            "together_with": [n for n in step.nodes if n != name],
        }
        self.events.append(ev)
        self.progress.console.log(f"t={self.now():6.1f}s  {step.action} {name}")
        assert node.proc is not None
        if step.action in ("kill9", "term"):
            if node.frozen:  # a frozen process gets the signal when it runs again
                node.proc.send_signal(signal.SIGCONT)
                node.frozen = False
            ev["t"] = self.now()
            node.proc.send_signal(signal.SIGKILL if step.action == "kill9" else signal.SIGTERM)
            ev["exit_s"] = await wait_exit(node, 60.0)
            ev["exit_code"] = node.proc.poll()
        elif step.action == "stop":
            ev["t"] = self.now()
            node.proc.send_signal(signal.SIGSTOP)
            node.frozen = True
        elif step.action == "cont":
            ev["t"] = self.now()
            node.proc.send_signal(signal.SIGCONT)
            node.frozen = False
        elif step.action == "start":
            if node.running:
                ev["note"] = "still running: killed first"
                node.proc.kill()
                await wait_exit(node, 30.0)
            ev["t"] = self.now()
            ev.update(await start_node(node, self.t0))


async def wait_exit(node: Node, within: float) -> float | None:
    """Seconds until the node's process exited (None: still running after `within`)."""
    assert node.proc is not None
    t = time.monotonic()
    while node.proc.poll() is None:
        if time.monotonic() - t > within:
            return None
        await asyncio.sleep(0.02)
    return time.monotonic() - t


async def start_node(node: Node, t0: float, within: float = 90.0) -> dict[str, Any]:
    """Spawn and wait for /health/ready: the ready time (run clock) and the start-up seconds."""
    node.spawn()
    node.starts += 1
    t = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t < within:
            if node.proc is not None and node.proc.poll() is not None:
                return {"ready": None, "error": f"exited with {node.proc.returncode}"}
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with s.get(node.url + "/health/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return {"ready": time.monotonic() - t0, "startup_s": time.monotonic() - t}
            await asyncio.sleep(0.05)
    return {"ready": None, "error": f"not ready within {within:g} s"}


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
        if r.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {r.status}")
        return await r.json()


async def metric(session: aiohttp.ClientSession, node: Node, name: str) -> dict[str, float]:
    """The node's /metrics samples of `name` (by label string)."""
    async with session.get(node.url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and "_created" not in line:
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key.removeprefix(name)] = float(value)
    return out


async def converge(nodes: dict[str, Node], t0: float, within: float) -> dict[str, Any]:
    """Wait until every node holds the same balances and no entry has receipts left to pay."""
    t = time.monotonic()
    last: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t < within:
            try:
                views = {
                    n: await get_json(s, node.url + "/wwwserve/ledger/balances") for n, node in nodes.items()
                }
                pending = {
                    n: sum((await metric(s, node, "wwwserve_ledger_pending_receipts")).values())
                    for n, node in nodes.items()
                }
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                last = {"error": str(exc)}
                await asyncio.sleep(0.25)
                continue
            canon = {n: json.dumps(credit_view(v), sort_keys=True) for n, v in views.items()}
            last = {"pending": pending, "distinct_views": len(set(canon.values()))}
            if len(set(canon.values())) == 1 and not any(pending.values()):
                return {
                    "converged": True,
                    "at": time.monotonic() - t0,
                    "waited_s": time.monotonic() - t,
                    **last,
                }
            await asyncio.sleep(0.25)
    return {"converged": False, "at": None, "waited_s": time.monotonic() - t, **last}


def credit_view(view: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [round(v.get("liquid", 0), 6), round(v.get("bonded", 0), 6), round(v.get("unbonding", 0), 6)]
        for k, v in view.items()
    }


async def ledger_payments(node: Node, author: str) -> list[dict[str, Any]]:
    """Every payment in `author`'s chain as `node` holds it: {to, items, amount, ts}."""
    out: list[dict[str, Any]] = []
    start = 1
    async with aiohttp.ClientSession() as s:
        while True:
            ops = await get_json(s, f"{node.url}/wwwserve/ledger/ops?author={author}&from={start}&limit=1000")
            for op in ops:
                if op.get("kind") == "pay":
                    for p in op["body"]["payments"]:
                        out.append(
                            {
                                "to": p["to"],
                                "items": len(p["items"]),
                                "requests": [item[0] for item in p["items"]],
                                "amount": p["amount"],
                                "ts": op["ts"],
                            }
                        )
            if len(ops) < 1000:
                return out
            start += 1000


# --------------------------------------------------------------------------------------------
# analysis


def analyse(
    plan: Plan,
    reqs: list[Req],
    events: list[dict[str, Any]],
    monitor: Monitor,
    ids: dict[str, str],
    rtts: dict[tuple[str, str], float] | None,
) -> dict[str, Any]:
    outcomes = Counter(r.outcome for r in reqs)
    kills = [(e["t"], e["node"]) for e in events if e["action"] == "kill9" and e["role"] == "entry"]
    lost_with_entry = [
        r
        for r in reqs
        if r.outcome != "ok" and any(n == r.entry and r.start <= t <= r.end + 0.05 for t, n in kills)
    ]
    for r in lost_with_entry:
        r.detail = "[its entry was killed -9] " + r.detail
    refused = outcomes.get("refused", 0)
    reached = len(reqs) - refused - len(lost_with_entry)
    ok = outcomes.get("ok", 0)
    lo, hi = kill_window(events)
    lost_ids = {r.i for r in lost_with_entry}
    window = [r for r in reqs if lo <= r.start < hi and r.outcome != "refused" and r.i not in lost_ids]
    first_event = min((e["t"] for e in events), default=plan.load_s)
    calm = [r.excess for r in reqs if r.outcome == "ok" and r.end < first_event]
    calm_p99 = float(np.percentile(calm, 99)) if calm else 0.0
    calm_p50 = float(np.percentile(calm, 50)) if calm else 0.0
    threshold = max(DISTURBED_S, 3 * calm_p99)

    def late(rs: list[Req], ref: float) -> float | None:
        """How much later than in calm times the first of these answers came, counted from `ref`:
        min over them of (end - ref - their calm latency), at least 0; None without any."""
        return min((max(0.0, r.end - ref - (r.nominal + calm_p50)) for r in rs), default=None)

    def disturbed(r: Req) -> bool:
        return r.outcome not in ("ok", "refused") or r.excess > threshold

    times = sorted(e["t"] for e in events)
    rows = []
    for e in events:
        t = e["t"]
        nxt = min((x for x in times if x > t + 1e-6), default=plan.load_s + 60)
        ref = (e.get("ready") or t) if e["action"] == "start" else t
        horizon = min(RECOVERY_WINDOW_S, nxt - t) if e["action"] != "start" else RECOVERY_WINDOW_S
        hit = [r for r in reqs if r.start < t + horizon and r.end > t and disturbed(r)]
        row: dict[str, Any] = {
            "action": e["action"],
            "node": e["node"],
            "t": round(t, 3),
            "disturbed": len(hit),
            "disturbed_failed": sum(1 for r in hit if r.outcome != "ok"),
            "max_excess_s": round(max((r.excess for r in hit if r.outcome == "ok"), default=0.0), 3),
        }
        for k in ("exit_s", "exit_code", "startup_s", "error", "note"):
            if k in e:
                row[k] = round(e[k], 3) if isinstance(e[k], float) else e[k]
        node = e["node"]
        until = min((x["t"] for x in events if x["node"] == node and x["t"] > t + 1e-6), default=float("inf"))
        if e["node"] in EXECUTORS:
            if e["action"] in ("start", "cont"):
                path_s = late(
                    [r for r in reqs if r.outcome == "ok" and r.executor == node and r.end > ref], ref
                )
                row["path"] = (
                    f"first answer served by {node} after it was {'ready' if e['action'] == 'start' else 'resumed'}"
                )
            else:
                path_s = late([r for r in reqs if r.outcome == "ok" and r.start >= t], t)
                row["path"] = "first success among requests sent after the event"
                resumed = []
                for r in reqs:
                    if r.stream and r.executor == node and r.start < t < r.end and r.chunk_times:
                        later = [c for c in r.chunk_times if c > t]
                        if later and r.outcome == "ok":
                            resumed.append(later[0] - t)
                row["streams_on_node"] = len(
                    [r for r in reqs if r.stream and r.executor == node and r.start < t < r.end]
                )
                row["stream_resume_s"] = round(max(resumed), 3) if resumed else None
        else:
            if e["action"] == "start":
                path_s = late(
                    [r for r in reqs if r.outcome == "ok" and r.entry == node and ref < r.end < until], ref
                )
                row["path"] = f"first success through {node} after it was ready"
            else:
                homes = {r.worker for r in reqs if r.entry == node and r.start < t}
                path_s = late(
                    [r for r in reqs if r.outcome == "ok" and r.worker in homes and r.start >= t], t
                )
                row["path"] = f"first success of a client of {node} (through the other entry)"
                inflight = [r for r in reqs if r.entry == node and r.start < t < r.end]
                row["in_flight_at_entry"] = len(inflight)
                row["in_flight_ok"] = sum(1 for r in inflight if r.outcome == "ok")
        row["path_s"] = None if path_s is None else round(path_s, 3)
        last_hit = max((r.end - ref for r in hit), default=0.0)
        row["recovery_s"] = None if path_s is None else round(max(path_s, last_hit), 3)
        # membership: who saw it go, and come back
        # membership is read from the nodes that were up (running, not frozen, ready) then
        observers = [
            n for n in NODES if n != node and n not in e["together_with"] and not down_at(events, n, ref)
        ]
        row["observers"] = observers
        if e["action"] in ("kill9", "term", "stop"):
            suspect = monitor.first_change(node, t, {"suspect", "dead", "left", "absent"}, observers)
            dead = monitor.first_change(node, t, {"dead", "left", "absent"}, observers)
            row["first_suspect_s"] = round(min(suspect.values()), 3) if suspect else None
            row["all_dead_s"] = round(max(dead.values()), 3) if len(dead) == len(observers) else None
            row["seen_dead_by"] = len(dead)
        elif e["action"] in ("start", "cont"):
            # searched from the spawn (peers may see it before /health/ready), counted from ready
            alive = monitor.first_change(node, t, {"alive"}, observers)
            row["all_alive_s"] = (
                round(max(alive.values()) - (ref - t), 3) if len(alive) == len(observers) else None
            )
            row["seen_alive_by"] = len(alive)
            row["sees_at_end"] = dict(
                Counter(monitor.state_at(node, o, float("inf")) or "?" for o in observers).most_common()
            )
        if rtts is not None:
            links = [rtts[(node, o)] for o in NODES if o != node]
            row["link_rtt_ms"] = {"min": min(links), "max": max(links)}
            row["recovery_limit_s"] = round(3 * max(links) / 1000 + TARGETS["recovery_s"], 3)
        else:
            row["recovery_limit_s"] = TARGETS["recovery_s"]
        rows.append(row)

    # false suspicions: a node seen not alive while it was running and not frozen
    down: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e["action"] in ("kill9", "term", "stop"):
            back = next(
                (
                    x.get("ready") or x["t"]
                    for x in events
                    if x["node"] == e["node"] and x["t"] > e["t"] and x["action"] in ("start", "cont")
                ),
                1e9,
            )
            down[e["node"]].append((e["t"], back + 5.0))
    false_susp = [
        (t, o, s, st)
        for t, o, s, st in monitor.changes
        if st in ("suspect", "dead") and t > 0 and not any(a <= t <= b for a, b in down[s])
    ]

    def rate(xs: list[Req]) -> float | None:
        return sum(1 for r in xs if r.outcome == "ok") / len(xs) if xs else None

    oks = [r for r in reqs if r.outcome == "ok"]
    lat = [r.latency for r in oks]
    result = {
        "requests": {
            "sent": len(reqs),
            "outcomes": dict(outcomes),
            "succeeded": ok,
            "reached_a_live_entry": reached,
            "refused_entry_down": refused,
            "lost_with_killed_entry": len(lost_with_entry),
            "lost_with_killed_entry_by_outcome": dict(Counter(r.outcome for r in lost_with_entry)),
            "success_rate_all": ok / len(reqs) if reqs else None,
            "success_rate": ok / reached if reached else None,
            "kill_window": {"from": lo, "to": hi, "sent": len(window), "success_rate": rate(window)},
            "streams": sum(1 for r in reqs if r.stream),
            "by_endpoint": dict(Counter(f"{r.endpoint}/{'stream' if r.stream else 'whole'}" for r in reqs)),
            "latency_s": {
                "p50": float(np.percentile(lat, 50)) if lat else None,
                "p99": float(np.percentile(lat, 99)) if lat else None,
                "max": max(lat) if lat else None,
            },
            "excess_calm_p50_s": calm_p50,
            "excess_calm_p99_s": calm_p99,
            "disturbed_threshold_s": threshold,
            "failures": [
                {
                    "i": r.i,
                    "t": round(r.start, 3),
                    "end": round(r.end, 3),
                    "entry": r.entry,
                    "executor": r.executor,
                    "kind": f"{r.endpoint}/{'stream' if r.stream else 'whole'}",
                    "outcome": r.outcome,
                    "detail": r.detail,
                }
                for r in sorted(reqs, key=lambda r: (r.outcome == "refused", r.start))
                if r.outcome != "ok"
            ][:300],
            "slowest": [
                {
                    "i": r.i,
                    "t": round(r.start, 3),
                    "latency_s": round(r.latency, 3),
                    "excess_s": round(r.excess, 3),
                    "entry": r.entry,
                    "executor": r.executor,
                    "stream": r.stream,
                    "max_gap_s": round(max(np.diff(r.chunk_times)), 3) if len(r.chunk_times) > 1 else None,
                }
                for r in sorted(oks, key=lambda r: -r.excess)[:15]
            ],
        },
        "events": rows,
        "false_suspicions": {
            "count": len(false_susp),
            "examples": [
                {"t": round(t, 3), "observer": o, "subject": s, "state": st}
                for t, o, s, st in false_susp[:20]
            ],
        },
    }
    if rtts is not None:
        result["overhead_vs_rtt"] = overhead_vs_rtt(reqs, events, rtts)
    else:
        result["overhead_vs_rtt"] = overhead_vs_rtt(reqs, events, None)
    return result


def down_at(events: list[dict[str, Any]], node: str, t: float) -> bool:
    """Whether `node` was down at `t`: its last event before was a stop, or a restart not ready yet."""
    last = None
    for e in sorted(events, key=lambda e: e["t"]):
        if e["node"] == node and e["t"] <= t:
            last = e
    if last is None or last["action"] == "cont":
        return False
    if last["action"] == "start":
        return not last.get("ready") or last["ready"] > t
    return True


def kill_window(events: list[dict[str, Any]]) -> tuple[float, float]:
    """From the kill -9 of several nodes at once until the first of them is ready again."""
    together = [e for e in events if e["action"] == "kill9" and e["together_with"]]
    if not together:
        return 0.0, 0.0
    lo = min(e["t"] for e in together)
    killed = {e["node"] for e in together}
    back = [
        e.get("ready") or e["t"]
        for e in events
        if e["action"] == "start" and e["node"] in killed and e["t"] > lo
    ]
    return lo, min(back, default=lo)


def overhead_vs_rtt(
    reqs: list[Req], events: list[dict[str, Any]], rtts: dict[tuple[str, str], float] | None
) -> list[dict[str, Any]]:
    """Per (entry, executor): what delegation adds to non-streamed answers and to the first token of
    streams, in calm periods (no event in the 10 s before the request)."""
    times = [e["t"] for e in events]
    groups: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: {"whole": [], "ttft": []})
    for r in reqs:
        if r.outcome != "ok" or r.executor not in EXECUTORS:
            continue
        if any(t - 1 <= r.start <= t + RECOVERY_WINDOW_S for t in times):
            continue
        g = groups[(r.entry, r.executor)]
        if r.stream and r.ttft is not None:
            g["ttft"].append(r.ttft - GAP_MS / 1000)
        elif not r.stream:
            g["whole"].append(r.excess)
    out = []
    for (e, x), g in sorted(groups.items()):
        out.append(
            {
                "entry": e,
                "executor": x,
                "rtt_ms": rtts[(e, x)] if rtts else 0.0,
                "whole_n": len(g["whole"]),
                "whole_added_p50_ms": 1e3 * statistics.median(g["whole"]) if g["whole"] else None,
                "ttft_n": len(g["ttft"]),
                "ttft_added_p50_ms": 1e3 * statistics.median(g["ttft"]) if g["ttft"] else None,
            }
        )
    return out


# --------------------------------------------------------------------------------------------
# report


def evaluate(report: dict[str, Any], slow: bool) -> list[dict[str, Any]]:
    a = report["analysis"]
    rq = a["requests"]
    o = rq["outcomes"]
    led = report["ledger"]
    targets = [
        target_result(
            "requests succeeded (of those that reached a live entry)",
            100 * rq["success_rate"] if rq["success_rate"] is not None else None,
            100 * TARGETS["success"],
            ">=",
            "%",
            f"{rq['succeeded']} of {rq['reached_a_live_entry']}; all sent: {rq['sent']}",
        ),
        target_result(
            "succeeded while 2 of 6 nodes (33 %) were killed",
            100 * rq["kill_window"]["success_rate"]
            if rq["kill_window"]["success_rate"] is not None
            else None,
            100 * TARGETS["success"],
            ">=",
            "%",
            f"{rq['kill_window']['sent']} requests that reached a live entry in "
            f"t={rq['kill_window']['from']:.1f}..{rq['kill_window']['to']:.1f} s",
        ),
        target_result(
            "hung requests",
            o.get("hung", 0),
            0,
            "<=",
            "",
            f"client deadline {report['meta']['plan']['hung_s']:g} s",
        ),
        target_result(
            "broken or corrupted streams/answers (not counting those whose entry was killed -9)",
            o.get("broken", 0)
            + o.get("corrupted", 0)
            - rq["lost_with_killed_entry_by_outcome"].get("broken", 0),
            0,
            "<=",
            "",
            f"broken {o.get('broken', 0)} ({rq['lost_with_killed_entry_by_outcome'].get('broken', 0)} of them "
            f"at the entry killed -9), corrupted {o.get('corrupted', 0)}",
        ),
    ]
    worst = None
    worst_note = ""
    misses = []
    for ev in a["events"]:
        rec = ev["recovery_s"]
        limit = ev["recovery_limit_s"]
        label = f"{ev['action']} {ev['node']}"
        if rec is None or rec > limit:
            misses.append(f"{label}: {fmt(rec)} s")
        if rec is not None and (worst is None or rec - limit > worst[0] - worst[1]):
            worst = (rec, limit)
            worst_note = label
    note = f"worst {worst_note}; misses: {', '.join(misses) if misses else 'none'}"
    limit = TARGETS["recovery_s"] if not slow else max(ev["recovery_limit_s"] for ev in a["events"])
    targets.append(
        target_result(
            "recovery after each event" + (" (<= 3 RTT + 2 s of the node's slowest link)" if slow else ""),
            max((ev["recovery_s"] if ev["recovery_s"] is not None else float("inf")) for ev in a["events"])
            if a["events"]
            else None,
            limit,
            "<=",
            "s",
            note,
        )
    )
    if misses and targets[-1]["result"] == "PASS":
        targets[-1]["result"] = "MISS"
    targets.append(
        target_result(
            "credits created or destroyed (sum of all accounts - allocations)",
            abs(led["conservation"]["difference"]) if led["conservation"] else None,
            0,
            "<=",
            "credits",
            f"total {fmt(led['conservation']['total'], 6) if led['conservation'] else '-'}",
        )
    )
    targets.append(
        target_result(
            "delivered answers not paid (lost credits)",
            led["unpaid_delivered"],
            0,
            "<=",
            "",
            f"{led['paid_receipts']} receipts paid for {led['answers_ok']} answers (warm-up included); "
            f"ledger converged: {led['convergence']['converged']}",
        )
    )
    return targets


def print_report(report: dict[str, Any]) -> None:
    a = report["analysis"]
    rq = a["requests"]
    t = Table(title="requests")
    for c in ("sent", "ok", "clean_error", "error", "refused", "conn_lost", "hung", "broken", "corrupted"):
        t.add_column(c, justify="right")
    o = rq["outcomes"]
    t.add_row(
        str(rq["sent"]),
        *(
            str(o.get(k, 0))
            for k in ("ok", "clean_error", "error", "refused", "conn_lost", "hung", "broken", "corrupted")
        ),
    )
    console.print(t)
    t = Table(title="events (seconds)")
    for c in (
        "t",
        "event",
        "exit/start",
        "path",
        "recovery",
        "limit",
        "disturbed",
        "failed",
        "1st suspect",
        "all dead/alive",
    ):
        t.add_column(c, justify="right")
    for ev in a["events"]:
        t.add_row(
            f"{ev['t']:.1f}",
            f"{ev['action']} {ev['node']}",
            fmt(ev.get("exit_s") if ev["action"] != "start" else ev.get("startup_s")),
            fmt(ev["path_s"]),
            fmt(ev["recovery_s"]),
            fmt(ev["recovery_limit_s"]),
            str(ev["disturbed"]),
            str(ev["disturbed_failed"]),
            fmt(ev.get("first_suspect_s")),
            fmt(ev.get("all_dead_s") if "all_dead_s" in ev else ev.get("all_alive_s")),
        )
    console.print(t)
    led = report["ledger"]
    t = Table(title="executors: pay vs work")
    for c in (
        "executor",
        "answers delivered (route)",
        "stub completed",
        "stub aborted",
        "receipts paid",
        "credits earned",
    ):
        t.add_column(c, justify="right")
    for x, row in led["per_executor"].items():
        t.add_row(
            x,
            str(row["delivered"]),
            str(row["stub_completed"]),
            str(row["stub_aborted"]),
            str(row["paid_receipts"]),
            fmt(row["earned"]),
        )
    console.print(t)
    if a["overhead_vs_rtt"]:
        t = Table(title="delegation overhead vs RTT (calm periods)")
        for c in ("entry", "executor", "RTT ms", "n whole", "added p50 ms", "n streams", "TTFT added p50 ms"):
            t.add_column(c, justify="right")
        for r in a["overhead_vs_rtt"]:
            t.add_row(
                r["entry"],
                r["executor"],
                f"{r['rtt_ms']:g}",
                str(r["whole_n"]),
                fmt(r["whole_added_p50_ms"], 1),
                str(r["ttft_n"]),
                fmt(r["ttft_added_p50_ms"], 1),
            )
        console.print(t)
    console.print(targets_table(report["targets"], lambda v: "-" if v is None else f"{v:.4g}"))
    console.print(machine_line(report["meta"]))


def plot(report: dict[str, Any], reqs: list[Req], monitor: Monitor, out: Path) -> None:
    plt = pyplot()
    a = report["analysis"]
    fig = plt.figure(figsize=(15, 13))
    gs = fig.add_gridspec(4, 2, height_ratios=[1.3, 1, 1, 1.1])
    events = a["events"]
    colors = {"kill9": "red", "term": "orange", "stop": "purple", "cont": "green", "start": "blue"}

    readies = [
        (e["ready"], e["node"]) for e in report["events_raw"] if e["action"] == "start" and e.get("ready")
    ]

    def mark(ax: Any, labels: bool = False) -> None:
        for t, n in readies:
            ax.axvline(t, color="blue", lw=0.6, ls=":", alpha=0.7)
            if labels:
                ax.annotate(
                    f"{n} ready",
                    (t, 0.0),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    fontsize=6,
                    va="bottom",
                    ha="right",
                    color="blue",
                )
        for ev in events:
            ax.axvline(ev["t"], color=colors[ev["action"]], lw=0.8, ls="--", alpha=0.7)
            if labels:
                ax.annotate(
                    f"{ev['action']} {ev['node']}",
                    (ev["t"], 1.0),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    fontsize=7,
                    va="top",
                    ha="right",
                    color=colors[ev["action"]],
                )

    ax = fig.add_subplot(gs[0, :])
    ok = [r for r in reqs if r.outcome == "ok"]
    for stream, c, lab in ((True, "#1f77b4", "ok stream"), (False, "#2ca02c", "ok non-stream")):
        xs = [r.start for r in ok if r.stream == stream]
        ys = [max(r.latency, 1e-3) for r in ok if r.stream == stream]
        ax.scatter(xs, ys, s=3, c=c, alpha=0.5, label=lab)
    fails = Counter()
    for outcome, mk, c in (
        ("clean_error", "x", "orange"),
        ("error", "x", "red"),
        ("refused", "|", "grey"),
        ("conn_lost", "x", "brown"),
        ("hung", "X", "black"),
        ("broken", "D", "magenta"),
        ("corrupted", "D", "red"),
    ):
        xs = [r.start for r in reqs if r.outcome == outcome]
        if xs:
            fails[outcome] = len(xs)
            ax.scatter(
                xs,
                [max(r.latency, 1e-3) for r in reqs if r.outcome == outcome],
                s=25,
                marker=mk,
                c=c,
                label=f"{outcome} ({len(xs)})",
            )
    ax.set_yscale("log")
    ax.set_ylabel("latency s (log), by start time")
    ax.set_title(
        "Requests over time (each dot one request); dashed lines: events, dotted: restarted node ready"
    )
    mark(ax, labels=True)
    ax.legend(fontsize=7, loc="lower left", ncol=4)

    ax = fig.add_subplot(gs[1, :])
    end = max((r.end for r in reqs), default=1)
    bins = np.arange(0, end + 1, 1.0)
    ax.hist([r.end for r in ok], bins=bins, color="#2ca02c", alpha=0.7, label="answered ok per s")
    bad = [r.end for r in reqs if r.outcome != "ok"]
    if bad:
        ax.hist(bad, bins=bins, color="red", alpha=0.8, label="not ok per s")
    ax2 = ax.twinx()
    for obs, c in (("E1", "k"), ("E2", "grey")):
        pts = [(t, n) for t, o, n in monitor.alive_seen if o == obs]
        if pts:
            ax2.step(
                [p[0] for p in pts],
                [p[1] for p in pts],
                where="post",
                c=c,
                lw=1,
                label=f"executors alive at {obs}",
            )
    ax2.set_ylim(-0.2, 4.5)
    ax2.set_ylabel("executors alive (entry's view)")
    ax2.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("requests per s")
    ax.legend(fontsize=7, loc="upper left")
    mark(ax)
    ax.set_title("Throughput and failures; executors each entry sees alive")

    ax = fig.add_subplot(gs[2, :])
    state_y = {"alive": 1.0, "suspect": 0.5, "dead": 0.0, "left": -0.2, "absent": -0.4}
    for k, subject in enumerate(NODES):
        for observer in NODES:
            if observer == subject:
                continue
            pts = [
                (t, state_y.get(st, -0.4))
                for t, o, s, st in monitor.changes
                if o == observer and s == subject
            ]
            if pts:
                xs = [p[0] for p in pts] + [end]
                ys = [p[1] for p in pts] + [pts[-1][1]]
                ax.step(xs, [k * 2 + y for y in ys], where="post", lw=0.8, alpha=0.6)
    ax.set_yticks([k * 2 + 0.5 for k in range(len(NODES))], NODES)
    ax.set_title(
        "Membership: each line is one node's view of another (high alive, mid suspect, low dead/left)"
    )
    mark(ax)

    ax = fig.add_subplot(gs[3, 0])
    labels = [f"{e['action']} {e['node']}\n@{e['t']:.0f}s" for e in events]
    vals = [e["recovery_s"] if e["recovery_s"] is not None else 0 for e in events]
    bars = ax.bar(range(len(events)), vals, color=[colors[e["action"]] for e in events])
    for b, e in zip(bars, events, strict=True):
        ax.annotate(
            "none" if e["recovery_s"] is None else f"{e['recovery_s']:.2f}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.plot(range(len(events)), [e["recovery_limit_s"] for e in events], "k_", ms=20, label="target")
    ax.set_xticks(range(len(events)), labels, fontsize=6)
    ax.set_ylabel("recovery s")
    ax.set_title("Recovery after each event (restarts: from ready)")
    ax.legend(fontsize=7)

    ax = fig.add_subplot(gs[3, 1])
    ovr = a["overhead_vs_rtt"]
    if report["meta"]["slow_links"] and ovr:
        for key, mk, lab in (
            ("whole_added_p50_ms", "o", "non-stream added p50"),
            ("ttft_added_p50_ms", "s", "TTFT added p50"),
        ):
            pts = [(r["rtt_ms"], r[key]) for r in ovr if r[key] is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=mk, label=lab)
        xs = np.linspace(0, max(r["rtt_ms"] for r in ovr) * 1.1, 10)
        for k in (1, 2, 3):
            ax.plot(xs, k * xs, lw=0.6, ls=":", c="grey")
            ax.annotate(f"{k} RTT", (xs[-1], k * xs[-1]), fontsize=7, color="grey")
        ax.set_xlabel("entry-executor RTT ms")
        ax.set_ylabel("added by delegation, ms")
        ax.set_title("Delegation overhead against the link's RTT")
        ax.legend(fontsize=7)
    else:
        led = report["ledger"]["per_executor"]
        xs = np.arange(len(led))
        w = 0.27
        for j, (key, lab) in enumerate(
            (
                ("delivered", "answers delivered (route header)"),
                ("stub_completed", "backend completed"),
                ("paid_receipts", "receipts paid (ledger)"),
            )
        ):
            ax.bar(xs + j * w, [row[key] for row in led.values()], w, label=lab)
        ax.set_xticks(xs + w, list(led))
        ax.set_title("Pay vs work per executor")
        ax.legend(fontsize=7)
    name = "chaos, slow links" if report["meta"]["slow_links"] else "chaos"
    save_figure(fig, figure_title(name, report["meta"]), out)


# --------------------------------------------------------------------------------------------
# main


async def run_all(args: Any, plan: Plan, workdir: Path, out_dir: Path, run: RunStart) -> dict[str, Any]:
    from wwwserve_gateway.network.genesis import (
        DuelParams,
        GossipParams,
        LedgerParams,
        NetworkGenesis,
        write_genesis,
    )

    stubs: dict[str, Child] = {}
    nodes: dict[str, Node] = {}
    proxy: ProxyProcess | None = None
    result: dict[str, Any] = {}
    try:
        with progress_bar(console) as progress:
            setup = progress.add_task("start stubs", total=None)
            for x in EXECUTORS:
                stubs[x] = Child(
                    f"stub {x}",
                    [
                        sys.executable,
                        str(Path(__file__).parent / "continuation_stub.py"),
                        "--port",
                        "0",
                        "--gap-ms",
                        str(GAP_MS),
                    ],
                )
            allocations = {
                **founding_allocations(workdir, list(ENTRIES), ENTRY_CREDITS),
                **founding_allocations(workdir, list(EXECUTORS), EXECUTOR_CREDITS),
            }
            from wwwserve_gateway.network.identity import NodeIdentity

            ids = {n: NodeIdentity.load_or_create(workdir / f"{n}-data").node_id for n in NODES}
            gossip = GossipParams(interval_s=0.5, refresh_s=2.0)
            ledger = LedgerParams(
                allocations=allocations,
                price_per_request=PRICE,
                payment_batch_window_s=2.0,
                duels=DuelParams(rate=0.0, canary_rate=0.0),
            )
            genesis = workdir / "network.yaml"
            write_genesis(NetworkGenesis(name="chaos-bench", gossip=gossip, ledger=ledger), genesis)
            ports = {n: free_port() for n in NODES}
            public: dict[str, str] = {n: f"http://127.0.0.1:{ports[n]}" for n in NODES}
            rtts = None
            if args.slow_links:
                progress.update(setup, description="start the slow-link proxies")
                rtts = pair_rtts(ids, args.seed)
                half = {k: v / 2 for k, v in rtts.items()}
                mean_one_way = float(np.mean(list(half.values())))
                spec = LinkSpec(
                    latency_ms=mean_one_way,
                    jitter=SLOW["jitter"],
                    stall_every_s=SLOW["stall_every_s"],
                    stall_s=SLOW["stall_s"],
                )
                pairs = {ports[b]: {ids[a]: half[(a, b)] for a in NODES if a != b} for b in NODES}
                proxy = ProxyProcess([Link(ports[n], mean_one_way) for n in NODES], spec, args.seed, pairs)
                public = dict(zip(NODES, proxy.urls, strict=True))
            for n in NODES:
                role = "entry" if n in ENTRIES else "executor"
                boot = [] if n == "E1" else ([public["E1"]] if n == "E2" else [public["E1"], public["E2"]])
                models = [] if role == "entry" else stub_model_list(stubs[n].url)
                nodes[n] = Node(
                    workdir, n, models, role, genesis, ports[n], public[n] if args.slow_links else None, boot
                )
                nodes[n].id = ids[n]
            t0 = time.monotonic()
            progress.update(setup, description="start E1 (seed)")
            first = await start_node(nodes["E1"], t0)
            if first.get("ready") is None:
                raise RuntimeError(f"E1 did not start: {first}\n{nodes['E1'].log()[-3000:]}")
            progress.update(setup, description="start E2, X1..X4")
            starts = await asyncio.gather(*(start_node(nodes[n], t0) for n in NODES[1:]))
            for n, s in zip(NODES[1:], starts, strict=True):
                if s.get("ready") is None:
                    raise RuntimeError(f"{n} did not start: {s}\n{nodes[n].log()[-3000:]}")
            monitor = Monitor(nodes, t0, 0.25)
            monitor.names = {v: k for k, v in ids.items()}
            progress.update(setup, description="wait until the network has formed")
            formed = await wait_formed(nodes, ids, 120.0)
            progress.update(setup, description="network formed", total=1, completed=1)
            startup = {"E1": first, **dict(zip(NODES[1:], starts, strict=True)), "network_formed_s": formed}

            # The load, the schedule and the monitor, on one clock.
            t0 = time.monotonic()
            monitor.t0 = t0
            load = Load(plan, {n: nodes[n] for n in ENTRIES}, t0, args.seed, ids)
            warm = await warm_up(load)
            t0 = time.monotonic()
            monitor.t0 = load.t0 = t0
            load.stop_at = t0 + plan.load_s
            load.reqs.clear()
            load.count = 0
            chaos = Chaos(plan, nodes, t0, progress)
            task = progress.add_task(f"load {plan.load_s:g} s, {plan.workers} workers", total=None)
            done = [0]

            def tick() -> None:
                done[0] += 1
                progress.update(task, completed=done[0])

            session = aiohttp.ClientSession()
            mon = asyncio.create_task(monitor.run(session))
            load.stop_at = t0 + 3 * plan.load_s  # a bound; set to the schedule's end + TAIL_S below

            async def schedule() -> None:
                await chaos.run()
                load.stop_at = max(t0 + plan.load_s, time.monotonic() + TAIL_S)

            sched = asyncio.create_task(schedule())
            try:
                async with asyncio.timeout(3 * plan.load_s + plan.hung_s + 30):
                    await asyncio.gather(*(load.worker(w, tick) for w in range(plan.workers)))
                load_end = time.monotonic() - t0
                progress.update(task, total=done[0])
                await sched
                # every node back up, for the ledger's convergence and the final count
                cleanup = progress.add_task(
                    "restart what is down, wait for the ledger to converge", total=None
                )
                restarted = []
                for n, node in nodes.items():
                    if node.frozen:
                        assert node.proc is not None
                        node.proc.send_signal(signal.SIGCONT)
                        node.frozen = False
                    if not node.running:
                        restarted.append(n)
                        await start_node(node, t0)
                conv = await converge(nodes, t0, plan.converge_s)
                progress.update(cleanup, total=1, completed=1)
            finally:
                monitor.stopped = True
                await asyncio.gather(mon, return_exceptions=True)
                await session.close()
                await load.aclose()
            progress.update(task, description="collect", total=1, completed=1)
            ledger_report = await collect_ledger(
                nodes, ids, stubs, warm + load.reqs, allocations, conv, load_end, restarted
            )
            analysis = analyse(plan, load.reqs, chaos.events, monitor, ids, rtts)
            counters = {}
            async with aiohttp.ClientSession() as s:
                for n, node in nodes.items():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        counters[n] = {
                            k: await metric(s, node, k)
                            for k in (
                                "wwwserve_failovers_total",
                                "wwwserve_delegation_attempts_total",
                                "wwwserve_delegations_total",
                                "wwwserve_peer_requests_total",
                            )
                        }
            result = {
                "startup": startup,
                "load_end_s": load_end,
                "events_raw": chaos.events,
                "analysis": analysis,
                "ledger": ledger_report,
                "ids": ids,
                "rtt_ms": {f"{a}-{b}": v for (a, b), v in rtts.items() if a < b} if rtts else None,
                "counters_since_last_start": counters,
                "node_logs": {n: node.log_findings() for n, node in nodes.items()},
                "membership_changes": [
                    {"t": round(t, 3), "observer": o, "subject": s, "state": st}
                    for t, o, s, st in monitor.changes
                    if t > 0
                ][:2000],
                "genesis": {
                    "gossip": gossip.model_dump(),
                    "ledger": {k: v for k, v in ledger.model_dump().items() if k != "allocations"},
                },
                "_reqs": load.reqs,
                "_monitor": monitor,
            }
    finally:
        for node in nodes.values():
            if node.frozen and node.proc is not None:
                node.proc.send_signal(signal.SIGCONT)
        for node in nodes.values():
            node.stop()
        if proxy is not None:
            result["proxy_stats"] = proxy.stop()
        for stub in stubs.values():
            stub.stop()
    return result


async def wait_formed(nodes: dict[str, Node], ids: dict[str, str], within: float) -> float:
    """Seconds until every node sees every other alive, and both entries see every executor staked."""
    t = time.monotonic()
    last: Any = None
    async with aiohttp.ClientSession() as s:
        while time.monotonic() - t < within:
            ok = True
            for n, node in nodes.items():
                try:
                    peers = {p["id"]: p for p in await get_json(s, node.url + "/wwwserve/peers")}
                except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                    ok, last = False, str(exc)
                    break
                for m in NODES:
                    p = peers.get(ids[m])
                    if p is None or p["state"] != "alive":
                        ok, last = False, f"{n} sees {m} {p and p['state']}"
                        break
                    if n in ENTRIES and m in EXECUTORS and not (p["stake"] or 0) > 0:
                        ok, last = False, f"{n} sees {m} without stake"
                        break
                if not ok:
                    break
            if ok:
                return time.monotonic() - t
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the network did not form within {within:g} s: {last}")


async def warm_up(load: Load) -> list[Req]:
    """One request through each entry must succeed before the clock starts (returned: they are
    paid like the others)."""
    warm = []
    for k, entry in enumerate(ENTRIES):
        for _attempt in range(40):
            req = load.make(-1 - k, k, entry)
            await load.send(req)
            warm.append(req)
            if req.outcome == "ok":
                break
            await asyncio.sleep(0.25)
        else:
            raise RuntimeError(f"warm-up through {entry} failed: {req.outcome} {req.detail}")
    return warm


async def collect_ledger(
    nodes: dict[str, Node],
    ids: dict[str, str],
    stubs: dict[str, Child],
    reqs: list[Req],
    allocations: dict[str, int],
    conv: dict[str, Any],
    load_end: float,
    restarted: list[str],
) -> dict[str, Any]:
    names = {v: k for k, v in ids.items()}
    ref = nodes["X4"]
    views: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s:
        for n, node in nodes.items():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError):
                views[n] = await get_json(s, node.url + "/wwwserve/ledger/balances")
        stub_stats = {}
        for x, stub in stubs.items():
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, RuntimeError):
                stub_stats[x] = await get_json(s, stub.url + "/stats")
    balances = views.get("X4") or next(iter(views.values()), {})
    payments = []
    for e in ENTRIES:
        payments += [dict(p, payer=e) for p in await ledger_payments(ref, ids[e])]
    conservation = None
    if balances:
        total = sum(
            v.get("liquid", 0) + v.get("bonded", 0) + v.get("unbonding", 0) for v in balances.values()
        )
        conservation = {
            "total": total,
            "allocated": sum(allocations.values()),
            "difference": total - sum(allocations.values()),
        }
    paid = Counter()
    for p in payments:
        paid[names.get(p["to"], p["to"][:8])] += p["items"]
    delivered = Counter(r.executor for r in reqs if r.outcome == "ok")
    per_exec = {}
    for x in EXECUTORS:
        acc = balances.get(ids[x], {})
        earned = acc.get("liquid", 0) + acc.get("bonded", 0) + acc.get("unbonding", 0) - allocations[ids[x]]
        st = stub_stats.get(x, {})
        per_exec[x] = {
            "delivered": delivered.get(x, 0),
            "stub_completed": st.get("completed", 0),
            "stub_aborted": st.get("aborted", 0),
            "stub_continuations": st.get("continuations", 0),
            "stub_prefix_mismatch": st.get("prefix_mismatch", 0),
            "paid_receipts": paid.get(x, 0),
            "earned": earned,
        }
    entries = {}
    for e in ENTRIES:
        acc = balances.get(ids[e], {})
        entries[e] = {
            "spent": allocations[ids[e]]
            - (acc.get("liquid", 0) + acc.get("bonded", 0) + acc.get("unbonding", 0)),
            "answers_ok": sum(1 for r in reqs if r.outcome == "ok" and r.entry == e),
        }
    paid_total = sum(paid.values())
    paid_keys = Counter((p["to"], h) for p in payments for h in p["requests"])
    paid_hashes = {h for _, h in paid_keys}
    whole = [r for r in reqs if r.outcome == "ok" and not r.stream]
    unpaid_whole = [r for r in whole if r.receipt and r.receipt not in paid_hashes]
    ok = sum(1 for r in reqs if r.outcome == "ok")
    return {
        "convergence": {
            **conv,
            "after_load_s": (conv["at"] - load_end) if conv.get("at") else None,
            "restarted_after_load": restarted,
        },
        "views_identical": len({json.dumps(credit_view(v), sort_keys=True) for v in views.values()}) == 1,
        "conservation": conservation,
        "paid_receipts": paid_total,
        "answers_ok": ok,
        "unpaid_delivered": max(0, ok - paid_total),
        "paid_minus_delivered": paid_total - ok,
        "non_stream_receipts": {
            "answers": len(whole),
            "with_receipt": sum(1 for r in whole if r.receipt),
            "unpaid": [
                {
                    "i": r.i,
                    "t": round(r.start, 3),
                    "end": round(r.end, 3),
                    "entry": r.entry,
                    "executor": r.executor,
                }
                for r in unpaid_whole
            ],
            "paid_twice": sum(1 for v in paid_keys.values() if v > 1),
        },
        "per_executor": per_exec,
        "per_entry": entries,
        "payments": len(payments),
        "stub_stats": stub_stats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "a 70 s load and a shorter schedule: about 2 minutes")
    parser.add_argument(
        "--slow-links", action="store_true", help="every link between nodes through the delaying proxy"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the nodes' data dirs and logs (printed)")
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "chaos_slow_links" if args.slow_links else "chaos"
    run = RunStart.now()
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        result = asyncio.run(run_all(args, plan, workdir, out_dir, run))
    finally:
        if args.keep:
            console.print(f"node data and logs kept in {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    reqs = result.pop("_reqs")
    monitor = result.pop("_monitor")
    meta = run.meta(args.quick, plan)
    meta["plan"] = {**asdict(plan), "steps": [asdict(s) for s in plan.steps]}
    meta.update(
        slow_links=args.slow_links,
        seed=args.seed,
        gap_ms=GAP_MS,
        slow_link_spec=SLOW if args.slow_links else None,
        notes=[
            "entries serve no model: every answer is delegated; executors accept everything (policy frequency, "
            f"accept 1.0, bond {BOND}); duels off; {PRICE:g} credit per delegated answer; payment batch window 2 s",
            "success rate: ok / requests that reached a live entry (refused connections to a stopped entry and "
            "requests in flight at an entry when it was killed -9 are left out, and counted)",
            "recovery: max(time to the first success on the affected path, end of the last request the event "
            f"disturbed within {RECOVERY_WINDOW_S:g} s); a request is disturbed when it failed or took more than "
            "max(1 s, 3x the calm p99) longer than its answer's own duration; restarts count from /health/ready; "
            "the affected path of an executor that stops is any new request, of one that comes back an answer "
            "it served, of an entry its clients",
            "delivered per executor: the x-wwwserve-route header's last hop (for streams the first executor: a "
            "continued stream counts for the executor that began it)",
            "counters_since_last_start: node metrics reset when a node restarts",
        ],
    )
    report = {"meta": meta, **result}
    report["targets"] = evaluate(report, args.slow_links)
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, reqs, monitor, out_dir / f"{stem}.png")
    print_report(report)
    console.print(f"wrote {out_dir / (stem + '.json')} and {out_dir / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
