"""A deterministic simulated network for the membership core: virtual time, no sockets.

`SimNetwork` runs N real `Membership` state machines in rounds. A round has two phases, at its
start and probe_timeout_s later (when indirect probes are due): every live node ticks, then the
messages they emitted are delivered, and the replies to those, until none is left. A message sent
in a phase is received in that phase (network latency is far below a round); what a node learns is
relayed from its next tick on, as in a synchronous-rounds analysis of SWIM. Bytes are counted as the
canonical encoding of each message. Loss (a fraction of messages dropped at random), killed nodes
and partitions are simulated; everything random comes from one seed.

For 10,000 nodes: the converged start is one shared `MemberTable` under a copy-on-write overlay
per node, and signature checks go through one shared cache (every node would reach the same
verdict on the same bytes, so each distinct record is verified once).

`FullListNetwork` is the reference design, whose nodes send their full peer list to every peer every
round and declare a peer dead when its heartbeat stops advancing.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing
import numpy as np

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import GossipParams
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugins.gossip.member_table import ALIVE, Entry, MemberTable
from wwwserve_gateway.plugins.gossip.membership import Membership, Outgoing, VerifiedCache, alive_body

EPOCH = 1_750_000_000.0  # the wall time at virtual time 0
MAX_DELIVERIES_PER_NODE = 200  # per phase; more means a message storm (a bug), not a busy round


def sim_identity(seed: int, index: int) -> NodeIdentity:
    """A reproducible key: the same seed gives the same ids, so the same buckets and the same run."""
    return NodeIdentity(nacl.signing.SigningKey(hashlib.sha256(f"sim:{seed}:{index}".encode()).digest()))


def sample_fields(index: int) -> dict[str, Any]:
    """What a typical provider advertises: one or two models, a load summary, a stake."""
    models = [{"name": "llama-3.1-8b-instruct", "context_length": 8192, "price": 0.2}]
    if index % 3 == 0:
        models.append({"name": "qwen2.5-7b-instruct", "context_length": 32768, "price": 0.25})
    return {"models": models, "load": {"running": index % 4, "waiting": 0, "usage": 0.1}, "stake": 100}


@dataclass
class PhaseStats:
    messages: int = 0
    bytes: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class SimNetwork:
    def __init__(
        self,
        params: GossipParams,
        *,
        seed: int = 0,
        loss: float = 0.0,
        verify: bool = True,
        fields: Callable[[int], dict[str, Any]] = sample_fields,
        mid_round_tick: bool = True,
    ) -> None:
        self.params = params
        # False: nodes tick only once per round, as a driver that ignores next_deadline() would.
        self.mid_round_tick = mid_round_tick
        self.seed = seed
        self.loss = loss
        self.verify = verify
        self.fields = fields
        self.now = 0.0
        self.rng = random.Random(seed)
        self.verified = VerifiedCache(size=4_000_000)
        self.nodes: dict[str, Membership] = {}
        self.identities: dict[str, NodeIdentity] = {}
        self.index: dict[str, int] = {}
        self.by_url: dict[str, str] = {}
        self.down: set[str] = set()
        self.groups: dict[str, int] | None = None  # a partition: messages cross no group boundary
        self.rounds = 0
        self.round_bytes: list[int] = []  # bytes sent in each round, by every node together
        self.round_messages: list[int] = []
        self.bytes_by_type: dict[str, int] = {}

    # -- building ---------------------------------------------------------------------------------
    def clock(self) -> float:
        return self.now

    def wall(self) -> float:
        return EPOCH + self.now

    def _make(
        self, i: int, ident: NodeIdentity, table: MemberTable | None, incarnation: int | None = None
    ) -> Membership:
        return Membership(
            ident,
            self.params,
            f"sim://node{i}",
            clock=self.clock,
            rng=random.Random(f"{self.seed}:{i}:{self.now}"),
            table=table,
            verify=self.verify,
            wall=self.wall,
            incarnation=incarnation,
            fields=self.fields(i),
            verified=self.verified,
        )

    def _register(self, i: int, node: Membership) -> None:
        self.nodes[node.id] = node
        self.identities[node.id] = node.identity
        self.index[node.id] = i
        self.by_url[node.url] = node.id

    @classmethod
    def converged(cls, n: int, params: GossipParams, **kwargs: Any) -> SimNetwork:
        """N nodes that already know each other: one frozen table shared under per-node overlays."""
        net = cls(params, **kwargs)
        incarnation = int(EPOCH * 1000)
        base = MemberTable()
        identities = [sim_identity(net.seed, i) for i in range(n)]
        for i, ident in enumerate(identities):
            body = alive_body(ident.node_id, f"sim://node{i}", incarnation, 0, int(EPOCH), net.fields(i))
            base.put(ident.node_id, Entry(ALIVE, incarnation, 0, ident.sign_record(body), None, 0.0, 0.0))
        for i, ident in enumerate(identities):
            node = net._make(i, ident, MemberTable(base), incarnation)
            node.drop_pending()  # everyone holds every record already
            net._register(i, node)
        return net

    def add_node(self, seeds: Iterable[str] = ()) -> str:
        """A fresh node (its own empty table) that joins through the given seed node ids."""
        i = len(self.index)
        node = self._make(i, sim_identity(self.seed, i), None)
        self._register(i, node)
        self.deliver(node.id, node.join([self.nodes[s].url for s in seeds]))
        return node.id

    def restart(self, node_id: str, seeds: Iterable[str] = ()) -> Membership:
        """The same identity started afresh (empty table, a later wall time -> higher incarnation)."""
        self.down.discard(node_id)
        node = self._make(self.index[node_id], self.identities[node_id], None)
        self.nodes[node_id] = node
        self.deliver(node_id, node.join([self.nodes[s].url for s in seeds]))
        return node

    def kill(self, node_id: str) -> None:
        self.down.add(node_id)

    def partition(self, groups: dict[str, int] | None) -> None:
        self.groups = groups

    def live(self) -> list[str]:
        return [i for i in self.nodes if i not in self.down]

    # -- running ----------------------------------------------------------------------------------
    def step(self) -> PhaseStats:
        """One round: both phases. Returns what was sent in it."""
        stats = PhaseStats()
        start = self.now
        offsets = (0.0, self.params.probe_timeout_s) if self.mid_round_tick else (0.0,)
        for offset in offsets:
            self.now = start + offset
            # Every node ticks before anything is delivered: what a node learns in this phase it
            # relays from its next tick on (no chains of relays within one tick).
            sent = [(node_id, out) for node_id in self.live() for out in self.nodes[node_id].tick()]
            self._deliver(sent, stats)
        self.now = start + self.params.interval_s
        self.rounds += 1
        self.round_bytes.append(stats.bytes)
        self.round_messages.append(stats.messages)
        for kind, size in stats.by_type.items():
            self.bytes_by_type[kind] = self.bytes_by_type.get(kind, 0) + size
        return stats

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.step()

    def run_until(self, done: Callable[[], bool], max_rounds: int) -> int | None:
        """Rounds until `done()` holds (checked after each), or None after max_rounds."""
        for r in range(1, max_rounds + 1):
            self.step()
            if done():
                return r
        return None

    def deliver(self, src: str, outgoing: list[Outgoing]) -> PhaseStats:
        """Deliver what a node's call (leave, set_own_fields, join...) returned, outside a round."""
        stats = PhaseStats()
        self._deliver([(src, out) for out in outgoing], stats)
        return stats

    def _deliver(self, queue: list[tuple[str, Outgoing]], stats: PhaseStats) -> None:
        """Deliver (sender, message) pairs and the replies they cause, FIFO, until none is left."""
        budget = MAX_DELIVERIES_PER_NODE * max(1, len(self.nodes))
        head = 0
        while head < len(queue):
            if head >= budget:
                raise RuntimeError("message storm: deliveries exceeded the simulator's bound")
            sender, out = queue[head]
            head += 1
            stats.messages += 1
            stats.bytes += out.size
            kind = out.message["type"]
            stats.by_type[kind] = stats.by_type.get(kind, 0) + out.size
            target = out.to or self.by_url.get(out.url or "", "")
            if not self._reaches(sender, target):
                continue
            for reply in self.nodes[target].receive(sender, out.message):
                queue.append((target, reply))

    def _reaches(self, sender: str, target: str) -> bool:
        if target not in self.nodes or target in self.down or sender in self.down:
            return False
        if self.groups is not None and self.groups.get(sender) != self.groups.get(target):
            return False
        return not (self.loss and self.rng.random() < self.loss)

    # -- observing ----------------------------------------------------------------------------------
    def fraction(self, predicate: Callable[[Membership], bool], among: Iterable[str] | None = None) -> float:
        ids = list(among) if among is not None else self.live()
        return sum(1 for i in ids if predicate(self.nodes[i])) / max(1, len(ids))

    def knows(self, subject: str, incarnation: int, heartbeat: int) -> Callable[[Membership], bool]:
        def check(node: Membership) -> bool:
            e = node._table.get(subject)
            return e is not None and (e.incarnation, e.heartbeat) >= (incarnation, heartbeat)

        return check

    def sees_state(self, subject: str, *states: str) -> Callable[[Membership], bool]:
        def check(node: Membership) -> bool:
            e = node._table.get(subject)
            return e is not None and e.state in states

        return check


class FullListNetwork:
    """The reference design, vectorized: every round each live node bumps its heartbeat and sends its
    full list of N records to each of its N-1 peers; a receiver keeps the highest heartbeat per node
    and declares a node dead when its heartbeat has not advanced for `fail_after_s`.

    With every list delivered to every node, what a receiver learns in a round is the element-wise
    maximum over all live senders' lists, which is what `step` computes. The bytes are those of the
    real list: the signed records of all nodes (the format `Membership` uses), measured each round.
    """

    def __init__(self, n: int, params: GossipParams, *, fail_after_s: float, seed: int = 0) -> None:
        self.n = n
        self.params = params
        self.fail_after_s = fail_after_s
        self.now = 0.0
        self.identities = [sim_identity(seed, i) for i in range(n)]
        self.urls = [f"sim://node{i}" for i in range(n)]
        self.incarnation = int(EPOCH * 1000)
        self.heartbeat = np.zeros(n, dtype=np.int64)  # each node's own counter
        self.known = np.zeros((n, n), dtype=np.int64)  # known[i, j]: j's heartbeat as i knows it
        self.advanced = np.zeros((n, n))  # when known[i, j] last advanced at i
        self.dead = np.zeros((n, n), dtype=bool)
        self.alive = np.ones(n, dtype=bool)
        self.records = [self._sign(i) for i in range(n)]
        self.list_bytes = len(canonical(self.records))
        self.round_bytes: list[int] = []

    def _sign(self, i: int) -> dict[str, Any]:
        body = alive_body(
            self.identities[i].node_id,
            self.urls[i],
            self.incarnation,
            int(self.heartbeat[i]),
            int(EPOCH + self.now),
            sample_fields(i),
        )
        return self.identities[i].sign_record(body)

    def step(self, resign: bool = True) -> None:
        live = np.flatnonzero(self.alive)
        self.heartbeat[live] += 1
        self.known[live, live] = self.heartbeat[live]
        if resign:  # the list a node sends holds every record, each re-signed by its owner each round
            for i in live:
                self.records[i] = self._sign(int(i))
            self.list_bytes = len(canonical(self.records))
        # Each live node sends its list to every peer it does not hold dead.
        peers = (~self.dead[live][:, :]).sum(axis=1) - 1
        self.round_bytes.append(int(peers.sum()) * self.list_bytes)
        rows = self.known[live]
        newest = rows.max(axis=0)[None, :]
        self.now += self.params.interval_s
        advanced = self.advanced[live]
        advanced[newest > rows] = self.now
        self.known[live] = np.maximum(rows, newest)
        self.advanced[live] = advanced
        dead = self.dead[live] | ((self.now - advanced) > self.fail_after_s + 1e-9)
        dead[np.arange(len(live)), live] = False
        self.dead[live] = dead

    def kill(self, i: int) -> None:
        self.alive[i] = False

    def fraction_dead(self, j: int) -> float:
        live = np.flatnonzero(self.alive)
        return float(self.dead[live, j].mean())
