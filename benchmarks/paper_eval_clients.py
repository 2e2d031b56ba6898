"""The users' side of a paper_eval run: per-node clients, the three ways a request reaches an engine,
and the samplers (credits, engine load).

- gateway: to the user's own node (`/v1/chat/completions`), whose policy serves or delegates;
- centralized: the reference's dispatcher (simu_centralized.py): per request it reads every engine's
  /metrics (3 s timeout; a failure counts as usage 999), keeps the request at its source node while
  that engine's KV usage is below 0.6, else picks the engine with the lowest (usage, running +
  waiting), and sends the request to that engine's node, whose policy serves it locally;
- ideal: a scheduler with perfect, instant knowledge: join the shortest queue over the engines that
  serve the model, counting the requests it has itself sent and not yet seen answered (it sends all
  of them, so this is each engine's exact running + waiting), straight to the engine.

Every request carries its lengths in the emulator's body fields (`x-emulator-prompt-tokens`,
`x-emulator-output-tokens`), which the gateways pass through to the engines unchanged. Its message
also holds as many bytes as a prompt of that many tokens would (four per token): an entry pays for
no more prompt tokens than the bytes it sent can hold and strikes an executor whose receipt claims
more. Runs before this padding struck honest executors in setting 4 (prompts of ~1,000 tokens in
a message of a few bytes) and then avoided them for the rest of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from paper_eval_cluster import Cluster
from paper_eval_workload import Request, Setting

from wwwserve_gateway.backends.vllm import VLLMBackend, load_from_metrics

ROUTE_HEADER = "x-wwwserve-route"
METRICS_TIMEOUT = aiohttp.ClientTimeout(total=3)  # the reference's metrics timeout
KEEP_LOCAL_BELOW = 0.6  # the reference's centralized threshold
FAILED_FETCH = (999.0, 999)


class PaperClock:
    """Paper seconds since the workload started: wall seconds x time scale."""

    def __init__(self, time_scale: float) -> None:
        self.scale = time_scale
        self.t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.scale

    async def sleep_until(self, paper_t: float) -> None:
        await asyncio.sleep(max(0.0, self.t0 + paper_t / self.scale - time.monotonic()))


@dataclass
class Record:
    id: int
    node: str
    model: str
    planned: float
    prompt_tokens: int
    output_tokens: int
    submit: float | None = None
    finish: float | None = None
    outcome: str = "not sent"  # ok | http_error | connection_error | timeout | not sent
    status: int | None = None
    route: list[str] = field(default_factory=list)  # node names, entry first, executor last
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str = ""

    @property
    def latency(self) -> float | None:
        if self.outcome != "ok" or self.submit is None or self.finish is None:
            return None
        return self.finish - self.submit

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"latency": self.latency}


def chat_body(req: Request, model: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"problem {req.id}:" + " tok" * req.prompt_tokens}],
        "max_tokens": max_tokens,
        "temperature": 0.6,
        "x-emulator-prompt-tokens": req.prompt_tokens,
        "x-emulator-output-tokens": req.output_tokens,
    }


class Sender:
    """Posts a request and fills in its record."""

    def __init__(self, session: aiohttp.ClientSession, clock: PaperClock, cluster: Cluster, max_tokens: int):
        self.session, self.clock, self.cluster, self.max_tokens = session, clock, cluster, max_tokens

    async def post(self, rec: Record, base_url: str, req: Request, fixed_route: list[str] | None) -> None:
        rec.submit = self.clock.now()
        try:
            async with self.session.post(
                base_url + "/v1/chat/completions",
                data=orjson.dumps(chat_body(req, req.model, self.max_tokens)),
            ) as resp:
                raw = await resp.read()
                rec.finish = self.clock.now()
                rec.status = resp.status
                route = resp.headers.get(ROUTE_HEADER)
                rec.route = fixed_route or (
                    [self.cluster.name_of(h) for h in route.split(",")] if route else []
                )
                if resp.status != 200:
                    rec.outcome, rec.error = "http_error", raw[:200].decode(errors="replace")
                    return
                body = orjson.loads(raw)
                rec.outcome = "ok"
                rec.finish_reason = body["choices"][0]["finish_reason"]
                rec.completion_tokens = body["usage"]["completion_tokens"]
        except TimeoutError:
            rec.finish, rec.outcome, rec.error = self.clock.now(), "timeout", "client timeout"
        except (aiohttp.ClientError, orjson.JSONDecodeError, KeyError, IndexError) as exc:
            rec.finish, rec.outcome, rec.error = self.clock.now(), "connection_error", repr(exc)[:200]


class GatewayPath:
    """The user's own node decides (single-node, frequency, completion_time)."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    async def send(self, req: Request, rec: Record) -> None:
        node = self.sender.cluster.nodes[req.node]
        await self.sender.post(rec, node.url, req, None)


class CentralizedPath:
    """The reference's metrics-polling dispatcher, in front of the nodes."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender

    async def _load(self, url: str) -> tuple[float, int]:
        try:
            async with self.sender.session.get(url + "/metrics", timeout=METRICS_TIMEOUT) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return FAILED_FETCH
        b = VLLMBackend
        load = load_from_metrics(text, b.running_metric, b.waiting_metric, b.usage_metrics)
        return FAILED_FETCH if load is None else (load.usage, load.running + load.waiting)

    async def choose(self, req: Request) -> str:
        cluster = self.sender.cluster
        owners = [o for (o, m) in cluster.engines if m == req.model and o in cluster.up]
        loads = await asyncio.gather(*(self._load(cluster.engines[(o, req.model)].url) for o in owners))
        by_owner = dict(zip(owners, loads, strict=True))
        if req.node in by_owner and by_owner[req.node][0] < KEEP_LOCAL_BELOW:
            return req.node
        return min(owners, key=lambda o: by_owner[o])

    async def send(self, req: Request, rec: Record) -> None:
        target = await self.choose(req)
        await self.sender.post(rec, self.sender.cluster.nodes[target].url, req, None)


class IdealPath:
    """Join the shortest queue with exact counts, straight to the engines."""

    def __init__(self, sender: Sender) -> None:
        self.sender = sender
        self.in_flight: dict[tuple[str, str], int] = defaultdict(int)
        self._idle: dict[str, asyncio.Event] = {}

    async def send(self, req: Request, rec: Record) -> None:
        cluster = self.sender.cluster
        keys = [k for k in cluster.engines if k[1] == req.model and k[0] in cluster.up]
        key = min(keys, key=lambda k: (self.in_flight[k], k[0] != req.node, k[0]))
        self.in_flight[key] += 1
        try:
            await self.sender.post(rec, cluster.engines[key].url, req, [key[0]])
        finally:
            self.in_flight[key] -= 1
            if not any(n for k, n in self.in_flight.items() if k[0] == key[0]):
                self._idle.setdefault(key[0], asyncio.Event()).set()

    async def drained(self, owner: str) -> None:
        """Until none of this owner's engines has a request of ours (at most 30 wall seconds)."""
        if not any(n for k, n in self.in_flight.items() if k[0] == owner):
            return
        event = self._idle.setdefault(owner, asyncio.Event())
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 30)


def make_path(path: str, sender: Sender) -> GatewayPath | CentralizedPath | IdealPath:
    return {"gateway": GatewayPath, "centralized": CentralizedPath, "ideal": IdealPath}[path](sender)


async def drive(
    setting: Setting,
    path: GatewayPath | CentralizedPath | IdealPath,
    clock: PaperClock,
    deadline_paper: float,
    on_done: Callable[[], None],
) -> list[Record]:
    """One client per node sends its users' requests at their arrival times; waits for every answer
    until `deadline_paper`, after which what is left counts as lost ("timeout")."""
    records = {
        r.id: Record(r.id, r.node, r.model, r.at, r.prompt_tokens, r.output_tokens) for r in setting.requests
    }
    tasks: list[asyncio.Task[None]] = []

    async def one(req: Request) -> None:
        try:
            await path.send(req, records[req.id])
        finally:
            on_done()

    async def client(node: str) -> None:
        for req in (r for r in setting.requests if r.node == node):
            await clock.sleep_until(req.at)
            tasks.append(asyncio.create_task(one(req)))

    await asyncio.gather(*(client(n.name) for n in setting.workers))
    left = max(0.0, (deadline_paper - clock.now()) / clock.scale)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=left)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for rec in records.values():
        if rec.submit is not None and rec.outcome == "not sent":
            rec.outcome, rec.error, rec.finish = "timeout", "no answer by the run's deadline", None
    return sorted(records.values(), key=lambda r: r.id)


async def sample_every(
    clock: PaperClock, period_paper: float, probe: Callable[[], Awaitable[dict[str, Any] | None]]
) -> list[dict[str, Any]]:
    """Call `probe` every `period_paper` paper seconds until cancelled; returns what it got, timed."""
    out: list[dict[str, Any]] = []
    k = 0
    try:
        while True:
            await clock.sleep_until(k * period_paper)
            k += 1
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                got = await probe()
                if got is not None:
                    out.append({"t": clock.now(), **got})
    except asyncio.CancelledError:
        pass
    return out


def credits_probe(session: aiohttp.ClientSession, cluster: Cluster) -> Callable[[], Awaitable[Any]]:
    """Balances (liquid + bonded) of every node, as the entry node's ledger replica folds them."""

    async def probe() -> dict[str, Any] | None:
        entry = next(iter(cluster.nodes.values()), None)
        if entry is None:
            return None
        async with session.get(entry.url + "/wwwserve/ledger/balances", timeout=METRICS_TIMEOUT) as resp:
            balances = await resp.json()
        return {
            "credits": {
                cluster.name_of(node_id): acct["liquid"] + acct["bonded"]
                for node_id, acct in balances.items()
            }
        }

    return probe


def load_probe(session: aiohttp.ClientSession, cluster: Cluster) -> Callable[[], Awaitable[Any]]:
    """Each live engine's running, waiting and KV usage."""

    async def one(key: tuple[str, str]) -> tuple[str, Any]:
        try:
            async with session.get(cluster.engines[key].url + "/metrics", timeout=METRICS_TIMEOUT) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return f"{key[0]}/{key[1]}", None
        b = VLLMBackend
        load = load_from_metrics(text, b.running_metric, b.waiting_metric, b.usage_metrics)
        value = None if load is None else [load.running, load.waiting, round(load.usage, 3)]
        return f"{key[0]}/{key[1]}", value

    async def probe() -> dict[str, Any]:
        keys = [k for k in cluster.engines if k[0] in cluster.up]
        return {"engines": dict(await asyncio.gather(*(one(k) for k in keys)))}

    return probe
