"""SWIM-style membership, failure detection and dissemination of signed node records, sans-IO.

No sockets, no asyncio, no clock of its own: a driver (the gossip plugin over the overlay, or the
simulator in gossip_sim.py) calls `tick()` every `interval_s` (and, for exact probe timing, at
`next_deadline()`), hands every incoming message to `receive()`, and sends the `Outgoing` messages
both return. Time and randomness are injected, so the simulator runs thousands of nodes in virtual
time and every run is reproducible.

The protocol (SWIM, with memberlist's refinements; DESIGN.md §7 and docs/design.md):

- Failure detection by probing. Each round a node pings ONE member, in a randomized round-robin
  order; no ack within probe_timeout_s -> `indirect_probes` members are asked to ping it for us
  (ping-req); still silent at the end of the round -> the prober signs a *suspect* accusation. A
  suspect that does not refute (republish itself with a higher incarnation) within
  suspect_timeout_s is declared *dead* and tombstoned for tombstone_ttl_s, so ghosts stay out.
- No member's word alone removes another (as in Lifeguard, a node trusts its own probes). Another
  member's suspect or dead accusation is only a hint: it is believed as far as it cites the
  incarnation of the accused's own latest signed record, relayed (so the accused hears it and
  refutes, and others check too), and it makes this node probe the accused itself, directly and
  through others. Only this node's own failed probes make a member suspect here, and only its own
  suspicion, unrefuted, makes it dead. An accusation citing an incarnation the accused never signed
  is refused, so nobody can push a node's incarnation beyond what it can refute.
- Dissemination by infection: every message carries up to max_piggyback pending updates, each
  relayed about retransmit_mult * ceil(log2(N + 1)) times, least-sent first. Each round a node also
  pushes its pending updates to `fanout` random members. A node that learns nothing new sends
  nothing more: bytes per node per round do not grow with N.
- Anti-entropy every sync_every_rounds rounds with one random member: a constant-size digest of 64
  bucket hashes over the table; only the buckets that differ are exchanged (push-pull).

Every update is a record signed by its author and is verified before it is believed.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import math
import random
import re
import time
import types
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import GossipParams
from wwwserve_gateway.network.identity import InvalidSignature, NodeIdentity, verify
from wwwserve_gateway.plugin_api.gossip import GossipDelegate, MembershipListener
from wwwserve_gateway.plugin_api.peers import (
    MembershipEvent,
    MembershipEventKind,
    ModelOffer,
    PeerLoad,
    PeerState,
    PeerView,
)
from wwwserve_gateway.plugins.gossip.member_table import (
    ALIVE,
    BUCKETS,
    CODE_STATES,
    DEAD,
    LEFT,
    STATE_CODES,
    SUSPECT,
    Entry,
    MemberTable,
    rank,
)

__all__ = [
    "ALIVE",
    "DEAD",
    "LEFT",
    "SUSPECT",
    "MemberTable",
    "Membership",
    "Outgoing",
    "VerifiedCache",
]

RESERVED_FIELDS = frozenset({"kind", "id", "url", "incarnation", "heartbeat", "ts", "subject"})
MAX_RECORD_BYTES = 8192  # a signed record's body, canonically encoded; bigger ones are dropped
MAX_RECORDS_PER_MESSAGE = 100_000  # a sync reply may carry a whole table; anything above is hostile
MAX_QUEUE = 1024  # pending updates kept for piggybacking; beyond it the most-relayed are dropped
MAX_RELAYS = 256  # ping-reqs we are relaying at once
EPS = 1e-9  # float slack for deadlines, so a driver ticking exactly on time is never a round late
_HEX_ID = re.compile(r"[0-9a-f]{64}\Z")
_MAX_INT = 2**62  # JSON ints we accept (orjson cannot encode beyond 64 bits; bumps need headroom)
_DIGEST_CHARS = len(base64.b64encode(bytes(8 * BUCKETS)))
HINT = "?"  # queue key prefix of relayed accusations
MAX_CONFIRMS_PER_ROUND = 8  # probes started to check others' accusations, per round


@dataclass(frozen=True)
class Outgoing:
    """A message to send. `to` is a node id, or "" when only the URL is known (a bootstrap seed)."""

    to: str
    url: str | None
    message: dict[str, Any]
    size: int = 0  # bytes of its canonical encoding (what the stats and the simulator count)


Parsed = tuple[Any, Mapping[str, ModelOffer], PeerLoad, float]  # (the record parsed, its typed fields)


class Update(NamedTuple):
    """A well-formed signed record, parsed (not yet verified)."""

    kind: str
    author: str
    subject: str
    incarnation: int
    heartbeat: int
    signed: dict[str, Any]


def _is_id(value: Any) -> bool:
    return type(value) is str and _HEX_ID.match(value) is not None


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < _MAX_INT  # type() excludes bool


def parse_update(obj: Any) -> Update | None:
    """The update in a signed record if it is well formed, else None. Checks shape only."""
    if type(obj) is not dict or len(obj) != 2:
        return None
    body, sig = obj.get("body"), obj.get("sig")
    if type(body) is not dict or type(sig) is not str or len(sig) != 128:
        return None
    kind, author, inc = body.get("kind"), body.get("id"), body.get("incarnation")
    if not _is_id(author) or not _is_count(inc) or type(body.get("ts")) not in (int, float):
        return None
    if kind == ALIVE:
        heartbeat, url = body.get("heartbeat"), body.get("url")
        if not _is_count(heartbeat) or type(url) is not str or not url:
            return None
        return Update(ALIVE, author, author, inc, heartbeat, obj)
    if kind in (SUSPECT, DEAD):
        subject = body.get("subject")
        if len(body) != 5 or not _is_id(subject):
            return None
        return Update(PeerState(kind), author, subject, inc, 0, obj)
    if kind == LEFT and len(body) == 4:
        return Update(LEFT, author, author, inc, 0, obj)
    return None


def alive_body(
    node_id: str, url: str, incarnation: int, heartbeat: int, ts: int, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The body of a node's alive record (the owner's free-form fields: models, load, stake)."""
    return {
        **fields,
        "kind": ALIVE,
        "id": node_id,
        "url": url,
        "incarnation": incarnation,
        "heartbeat": heartbeat,
        "ts": ts,
    }


def overrides(update: Update, entry: Entry | None) -> bool:
    """SWIM's precedence: does `update` tell more than what `entry` says about its subject?

    `update` is the subject's own record (alive, left) or this node's own accusation, which cites
    the incarnation of the subject's record it holds (others' accusations are hints, never applied).
    """
    if entry is None:
        return update.kind in (ALIVE, LEFT)
    inc, state = update.incarnation, entry.state
    if update.kind == ALIVE:
        if state == ALIVE:
            return (inc, update.heartbeat) > (entry.incarnation, entry.heartbeat)
        if state == SUSPECT:  # only a higher incarnation refutes; a fresher same-incarnation record
            return inc > entry.incarnation or (
                inc == entry.incarnation and update.heartbeat > entry.heartbeat
            )
        return inc > entry.incarnation  # a tombstone holds off its own incarnation and older: no ghosts
    if update.kind == SUSPECT:
        return state == ALIVE and inc == entry.incarnation
    if update.kind == DEAD:
        return state in (ALIVE, SUSPECT) and inc == entry.incarnation
    if state in (ALIVE, SUSPECT):  # the subject's own leave
        return inc >= entry.incarnation
    return inc > entry.incarnation


class VerifiedCache:
    """Signed records already verified, so a copy relayed again is not checked again.

    The key hashes the canonical body (whose `id` is the author) with the signature: a cached
    record can only match the very bytes that were verified. Bounded; the oldest entries go first.
    One cache may be shared by many simulated nodes (they would all reach the same verdict).
    """

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self._seen: dict[bytes, None] = {}

    def check(self, signed: dict[str, Any]) -> str | None:
        """None when the record's signature is its author's, else why it is rejected."""
        try:
            data = canonical(signed["body"])
            sig = bytes.fromhex(signed["sig"])
        except (TypeError, ValueError):
            return "malformed"
        if len(data) > MAX_RECORD_BYTES:
            return "oversized"
        key = hashlib.sha256(sig + data).digest()
        if key in self._seen:
            return None
        try:
            verify(signed["body"]["id"], data, sig)
        except InvalidSignature:
            return "bad-signature"
        self._seen[key] = None
        if len(self._seen) > self.size:
            del self._seen[next(iter(self._seen))]
        return None


@dataclass
class _Probe:
    target: str
    seq: int
    sent: float
    indirect_at: float | None = None
    relays: set[str] = field(default_factory=set)
    acked: bool = False


class _Pending:
    __slots__ = ("order", "sent", "signed")

    def __init__(self, signed: dict[str, Any], order: int) -> None:
        self.signed = signed
        self.order = order
        self.sent = 0


class Membership:
    def __init__(
        self,
        identity: NodeIdentity,
        params: GossipParams,
        url: str,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        table: MemberTable | None = None,
        verify: bool = True,
        wall: Callable[[], float] = time.time,
        incarnation: int | None = None,
        fields: dict[str, Any] | None = None,
        verified: VerifiedCache | None = None,
        listener: MembershipListener | None = None,
    ) -> None:
        self.identity = identity
        self.id = identity.node_id
        self.params = params
        self.url = url
        self._clock = clock
        self._wall = wall  # record timestamps and the starting incarnation: wall time, not monotonic
        self._rng = rng
        self._table = table if table is not None else MemberTable()
        self._verify = verify
        self._verified = verified if verified is not None else VerifiedCache()
        self.stats: Counter[str] = Counter()
        self._delegates: dict[str, GossipDelegate] = {}
        self._listener = listener
        self._parsed: dict[str, Parsed] = {}  # node id -> its alive record's typed fields
        # A restarted node rejoins with a higher incarnation without persisting anything.
        self._incarnation = incarnation if incarnation is not None else int(wall() * 1000)
        self._heartbeat = 0
        self._fields: dict[str, Any] = {}
        if fields:
            self._check_fields(fields)
            self._fields = dict(fields)
        self._left = False
        self._refuted_at = -math.inf
        self._confirm_round, self._confirms = -1, 0
        self._seq = 0
        self._order = 0
        self._queue: dict[str, _Pending] = {}  # subject -> its newest pending update
        self._probes: list[_Probe] = []
        # Pings we send for others (ping-req): our seq -> (requester, its seq, target, when).
        self._relays: dict[int, tuple[str, int, str, float]] = {}
        self._suspects: dict[str, tuple[float, int]] = {}  # subject -> (deadline, incarnation)
        self._tombstones: list[tuple[float, str, int]] = []  # heap of (expiry, subject, incarnation)
        self._probe_cycle = (0, 1, 0, 0)  # n, a, b, k: target k of this cycle is position (a*k+b) % n
        now = clock()
        self._round = rng.randrange(params.sync_every_rounds)  # syncs of different nodes spread out
        self._round_due = now
        self._publish(bump=False)
        # The first refresh at a random point of the period: nodes started together (a converged
        # simulation, a data-centre restart) must not all republish in the same round forever after.
        self._next_refresh = now + params.refresh_s * (0.5 + 0.5 * rng.random())

    # -- the own record ---------------------------------------------------------------------------
    def set_own_fields(self, fields: dict[str, Any]) -> None:
        """Set what this node advertises (models, load, stake); re-signs and disseminates it."""
        self._check_fields(fields)
        self._fields = dict(fields)
        self._publish()

    @staticmethod
    def _check_fields(fields: dict[str, Any]) -> None:
        reserved = RESERVED_FIELDS & set(fields)
        if reserved:
            raise ValueError(f"fields reserved by the membership record: {sorted(reserved)}")

    def _publish(self, bump: bool = True) -> None:
        if self._left:
            return
        if bump:
            self._heartbeat += 1
        now = self._clock()
        body = alive_body(
            self.id, self.url, self._incarnation, self._heartbeat, int(self._wall()), self._fields
        )
        signed = self.identity.sign_record(body)
        self._table.put(self.id, Entry(ALIVE, self._incarnation, self._heartbeat, signed, None, now, now))
        self._next_refresh = now + self.params.refresh_s
        self._enqueue(self.id, signed)

    def add_delegate(self, name: str, delegate: GossipDelegate) -> None:
        self._delegates[name] = delegate

    def drop_pending(self) -> None:
        """Forget queued updates: for a simulator's converged start, where everyone holds them already."""
        self._queue.clear()

    # -- the driver's calls -------------------------------------------------------------------------
    def join(self, seed_urls: list[str]) -> list[Outgoing]:
        """Push-pull sync with each seed; their ids are not known yet."""
        if self._left:
            return []
        message = self._sync_message("sync")
        return [self._out("", message, url) for url in dict.fromkeys(seed_urls) if url and url != self.url]

    def next_deadline(self) -> float:
        """When `tick()` next has work: the next round, an indirect probe or a suspicion timeout."""
        deadlines = [self._round_due]
        for p in self._probes:
            if p.indirect_at is None:
                deadlines.append(p.sent + self.params.probe_timeout_s)
            else:
                deadlines.append(p.indirect_at + self._indirect_wait())
        deadlines.extend(d for d, _ in self._suspects.values())
        return min(deadlines)

    def tick(self) -> list[Outgoing]:
        """Do what is due: finish probes, time out suspicions and, once per interval_s, a round."""
        now = self._clock()
        out: list[Outgoing] = []
        if self._left:
            self._gossip(out)  # a departing node only finishes spreading its leave record
            return out
        self._check_probes(now, out)
        self._expire_suspects(now)
        if now + EPS >= self._round_due:
            self._round_due = now + self.params.interval_s
            self._round += 1
            if now + EPS >= self._next_refresh:
                self._publish()
            self._collect_tombstones(now)
            self._expire_relays(now)
            self._probe(now, out)
            self._gossip(out)
            if self._round % self.params.sync_every_rounds == 0:
                self._start_sync(out)
        return out

    def leave(self) -> list[Outgoing]:
        """Publish a signed leave record (members drop this node at once); then only relay it."""
        if self._left:
            return []
        body = {"kind": LEFT, "id": self.id, "incarnation": self._incarnation, "ts": int(self._wall())}
        signed = self.identity.sign_record(body)
        now = self._clock()
        own = self._table.get(self.id)
        self._table.put(
            self.id, Entry(LEFT, self._incarnation, 0, own.alive if own else None, signed, now, now)
        )
        self._left = True
        self._queue.clear()
        self._probes.clear()
        self._enqueue(self.id, signed)
        out: list[Outgoing] = []
        self._gossip(out)
        return out

    def receive(self, sender_id: str, message: dict[str, Any]) -> list[Outgoing]:
        """Handle one message from `sender_id` (authenticated by the transport). Never raises."""
        try:
            return self._receive(sender_id, message)
        except Exception:  # a bug or an input nobody foresaw: count it, never take the node down
            self.stats["rejected.error"] += 1
            return []

    # -- views --------------------------------------------------------------------------------------
    def member(self, node_id: str) -> PeerView | None:
        entry = self._table.get(node_id)
        return None if entry is None else self._view(node_id, entry, self._clock())

    def members(self) -> list[PeerView]:
        """Every member this node knows, itself and tombstones included."""
        now = self._clock()
        table = self._table
        return [self._view(i, table.get(i), now) for i in table.ids()]  # type: ignore[arg-type]

    def alive_ids(self) -> list[str]:
        """The other members believed alive (suspects excluded)."""
        table = self._table
        return [i for i in table.ids() if i != self.id and table.get(i).state == ALIVE]  # type: ignore[union-attr]

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def pending(self) -> int:
        """Updates still queued for piggybacking."""
        return len(self._queue)

    def _view(self, node_id: str, e: Entry, now: float) -> PeerView:
        body = e.alive["body"] if e.alive is not None else {}
        # Routers read every member's view on every request: each record is parsed once.
        parsed = self._parsed.get(node_id)
        if parsed is None or parsed[0] is not e.alive:
            parsed = self._parsed[node_id] = (e.alive, *PeerView.parse_fields(body))
        return PeerView(
            id=node_id,
            url=body.get("url", ""),
            state=e.state,
            incarnation=e.incarnation,
            heartbeat=e.heartbeat,
            age_s=max(0.0, now - e.advanced),
            models=parsed[1],
            load=parsed[2],
            stake=parsed[3],
            record=types.MappingProxyType(body),
        )

    # -- sending ------------------------------------------------------------------------------------
    def _out(self, to: str, message: dict[str, Any], url: str | None = None) -> Outgoing:
        if url is None and to:
            entry = self._table.get(to)
            if entry is not None and entry.alive is not None:
                url = entry.alive["body"]["url"]
        size = len(canonical(message))
        self.stats["sent." + message["type"]] += 1
        self.stats["sent_bytes"] += size
        return Outgoing(to, url, message, size)

    def _with_updates(self, message: dict[str, Any]) -> dict[str, Any]:
        updates = self._piggyback()
        if updates:
            message["u"] = updates
        return message

    def _retransmit_limit(self) -> int:
        n = self._table.count(ALIVE, SUSPECT)
        return self.params.retransmit_mult * max(1, math.ceil(math.log2(n + 1)))

    def _piggyback(self) -> list[dict[str, Any]]:
        """Up to max_piggyback pending updates, least-relayed (then newest) first."""
        if not self._queue:
            return []
        queue = self._queue
        chosen = heapq.nsmallest(
            self.params.max_piggyback, queue.items(), key=lambda kv: (kv[1].sent, -kv[1].order)
        )
        limit = self._retransmit_limit()
        for subject, pending in chosen:
            pending.sent += 1
            if pending.sent >= limit:
                del queue[subject]
        return [pending.signed for _, pending in chosen]

    def _enqueue_hint(self, subject: str, signed: dict[str, Any]) -> None:
        """Relay another member's accusation: keyed apart from the subject's own records, so it
        never displaces a refutation still being spread."""
        self._enqueue(HINT + subject, signed)

    def _enqueue(self, subject: str, signed: dict[str, Any]) -> None:
        # A newer update about a subject replaces the older one still queued (memberlist's invalidation).
        self._order += 1
        self._queue[subject] = _Pending(signed, self._order)
        if len(self._queue) > MAX_QUEUE:
            worst = max(self._queue.items(), key=lambda kv: (kv[1].sent, -kv[1].order))
            del self._queue[worst[0]]

    def _pick(self, k: int, exclude: set[str], states: tuple[str, ...] = (ALIVE, SUSPECT)) -> list[str]:
        """Up to k distinct random members in `states` with a known URL, none in `exclude`."""
        chosen: list[str] = []
        skip = set(exclude) | {self.id}

        def accept(node_id: str, e: Entry) -> bool:
            return e.state in states and e.alive is not None and node_id not in skip

        for _ in range(k):
            node_id = self._table.random_id(self._rng, accept)
            if node_id is None:
                break
            chosen.append(node_id)
            skip.add(node_id)
        return chosen

    # -- a round --------------------------------------------------------------------------------------
    def _probe(self, now: float, out: list[Outgoing]) -> None:
        target = self._next_probe_target()
        if target is None:
            return
        self._seq += 1
        self._probes.append(_Probe(target, self._seq, now))
        out.append(self._out(target, self._with_updates({"type": "ping", "seq": self._seq})))

    def _next_probe_target(self) -> str | None:
        """Randomized round-robin: each cycle visits every position once, in a fresh random order.

        The order is an affine permutation (a*k + b) mod n with gcd(a, n) = 1, so it costs O(1)
        memory where a shuffled list would hold N ids per node (N^2 for a simulated network).
        """
        table = self._table
        n, a, b, k = self._probe_cycle
        for _ in range(2 * table.index_size() + 2):
            if k >= n:
                n = table.index_size()
                a = self._coprime(n)
                b = self._rng.randrange(n) if n else 0
                k = 0
                if n == 0:
                    break
            pos = (a * k + b) % n
            k += 1
            node_id = table.id_at(pos)
            if node_id is None or node_id == self.id:
                continue
            e = table.get(node_id)
            if e is not None and e.state in (ALIVE, SUSPECT) and e.alive is not None:
                self._probe_cycle = (n, a, b, k)
                return node_id
        self._probe_cycle = (n, a, b, k)
        return None

    def _coprime(self, n: int) -> int:
        if n <= 2:
            return 1
        for _ in range(32):
            a = self._rng.randrange(1, n)
            if math.gcd(a, n) == 1:
                return a
        return 1

    def _indirect_wait(self) -> float:
        return max(self.params.interval_s - self.params.probe_timeout_s, self.params.probe_timeout_s)

    def _check_probes(self, now: float, out: list[Outgoing]) -> None:
        keep: list[_Probe] = []
        for p in self._probes:
            entry = self._table.get(p.target)
            if p.acked or entry is None or entry.state not in (ALIVE, SUSPECT):
                continue
            if p.indirect_at is None:
                if now + EPS >= p.sent + self.params.probe_timeout_s:
                    p.indirect_at = now
                    for relay in self._pick(self.params.indirect_probes, {p.target}, (ALIVE,)):
                        p.relays.add(relay)
                        msg = {"type": "ping-req", "seq": p.seq, "target": p.target}
                        out.append(self._out(relay, self._with_updates(msg)))
                keep.append(p)
            elif now + EPS >= p.indirect_at + self._indirect_wait():
                if entry.state == ALIVE:  # silent to us and to our relays: accuse
                    self._accuse(SUSPECT, p.target, entry.incarnation)
            else:
                keep.append(p)
        self._probes = keep

    def _expire_suspects(self, now: float) -> None:
        if not self._suspects:
            return
        for subject, (deadline, inc) in list(self._suspects.items()):
            if now + EPS >= deadline:
                del self._suspects[subject]
                entry = self._table.get(subject)
                if entry is not None and entry.state == SUSPECT and entry.incarnation == inc:
                    self._accuse(DEAD, subject, inc)

    def _accuse(self, kind: str, subject: str, incarnation: int) -> None:
        body = {
            "kind": kind,
            "id": self.id,
            "subject": subject,
            "incarnation": incarnation,
            "ts": int(self._wall()),
        }
        signed = self.identity.sign_record(body)
        update = Update(kind, self.id, subject, incarnation, 0, signed)
        entry = self._table.get(subject)
        if overrides(update, entry):
            self._apply(update, entry)
            self._enqueue(subject, signed)

    def _collect_tombstones(self, now: float) -> None:
        heap = self._tombstones
        while heap and heap[0][0] <= now + EPS:
            _, subject, inc = heapq.heappop(heap)
            entry = self._table.get(subject)
            if (
                entry is not None
                and entry.state in (DEAD, LEFT)
                and entry.incarnation == inc
                and subject != self.id
            ):
                self._table.remove(subject)

    def _expire_relays(self, now: float) -> None:
        horizon = now - 2 * self.params.interval_s
        for seq in [s for s, (_, _, _, t) in self._relays.items() if t < horizon]:
            del self._relays[seq]

    def _gossip(self, out: list[Outgoing]) -> None:
        if not self._queue:
            return
        for target in self._pick(self.params.fanout, set()):
            if not self._queue:
                break
            out.append(self._out(target, self._with_updates({"type": "gossip"})))

    # -- anti-entropy ---------------------------------------------------------------------------------
    def _sync_message(self, kind: str) -> dict[str, Any]:
        digest = b"".join(h.to_bytes(8, "big") for h in self._table.bucket_hashes())
        message: dict[str, Any] = {"type": kind, "h": base64.b64encode(digest).decode()}
        digests = self._local_states()
        if digests:
            message["d"] = digests
        return message

    def _start_sync(self, out: list[Outgoing]) -> None:
        # Tombstoned members are candidates too: that is how two halves of a healed partition,
        # each holding the other for dead, meet again (memberlist gossips to the dead for a while).
        partner = self._pick(1, set(), (ALIVE, SUSPECT, DEAD))
        if partner:
            out.append(self._out(partner[0], self._sync_message("sync")))

    def _local_states(self) -> dict[str, Any]:
        digests: dict[str, Any] = {}
        for name, delegate in self._delegates.items():
            try:
                state = delegate.local_state()
            except Exception:
                self.stats["delegate_errors"] += 1
                continue
            if state is not None:
                digests[name] = state
        return digests

    def _merge_states(self, peer_id: str, digests: Any) -> None:
        if digests is None:
            return
        if type(digests) is not dict:
            self.stats["rejected.malformed-digest"] += 1
            return
        for name, digest in digests.items():
            delegate = self._delegates.get(name)
            if delegate is None:
                continue
            if type(digest) is not dict:
                self.stats["rejected.malformed-digest"] += 1
                continue
            try:
                delegate.merge_remote_state(peer_id, digest)
            except Exception:
                self.stats["delegate_errors"] += 1

    def _differing_buckets(self, encoded: Any) -> list[int] | None:
        if type(encoded) is not str or len(encoded) != _DIGEST_CHARS:
            return None
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            return None
        ours = self._table.bucket_hashes()
        return [b for b in range(BUCKETS) if int.from_bytes(raw[8 * b : 8 * b + 8], "big") != ours[b]]

    # -- receiving ------------------------------------------------------------------------------------
    def _receive(self, sender: str, message: Any) -> list[Outgoing]:
        if self._left:
            return []
        if type(message) is not dict or type(message.get("type")) is not str:
            self.stats["rejected.malformed-message"] += 1
            return []
        if not _is_id(sender) or sender == self.id:
            self.stats["rejected.bad-sender"] += 1
            return []
        kind = message["type"]
        handler = _HANDLERS.get(kind)
        if handler is None:
            self.stats["rejected.unknown-type"] += 1
            return []
        self.stats["recv." + kind] += 1
        out: list[Outgoing] = []
        updates = message.get("u")
        if updates is not None:
            self._merge_all(updates, out, via_sync=False)
        handler(self, sender, message, out)
        return out

    def _on_ping(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        seq = message.get("seq")
        if not _is_count(seq):
            self.stats["rejected.malformed-message"] += 1
            return
        out.append(self._out(sender, self._with_updates({"type": "ack", "seq": seq})))

    def _on_ack(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        seq = message.get("seq")
        if not _is_count(seq):
            self.stats["rejected.malformed-message"] += 1
            return
        relay = self._relays.get(seq)
        if relay is not None and relay[2] == sender:  # the ack of a ping we sent for someone else: pass it on
            requester, their_seq, _, _ = relay
            del self._relays[seq]
            out.append(self._out(requester, self._with_updates({"type": "ack", "seq": their_seq})))
            return
        for p in self._probes:
            if p.seq == seq and (sender == p.target or sender in p.relays):
                p.acked = True
                self._alive_again(p.target)

    def _alive_again(self, subject: str) -> None:
        """An ack from a member we suspect: our own evidence of life ends our suspicion here."""
        entry = self._table.get(subject)
        if entry is None or entry.state != SUSPECT or entry.alive is None:
            return
        self._suspects.pop(subject, None)
        self._table.put(subject, entry._replace(state=ALIVE, accusation=None, since=self._clock()))
        self.stats["suspicions.cleared"] += 1
        if self._listener is not None:
            view = self._view(subject, self._table.get(subject), self._clock())  # type: ignore[arg-type]
            self._notify(MembershipEvent(MembershipEventKind.ALIVE, view, self._wall()))

    def _on_ping_req(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        seq, target = message.get("seq"), message.get("target")
        if not _is_count(seq) or not _is_id(target):
            self.stats["rejected.malformed-message"] += 1
            return
        entry = self._table.get(target)
        if target == self.id or entry is None or entry.alive is None or entry.state in (DEAD, LEFT):
            return
        self._seq += 1
        self._relays[self._seq] = (sender, seq, target, self._clock())
        if len(self._relays) > MAX_RELAYS:
            del self._relays[next(iter(self._relays))]
        out.append(self._out(target, self._with_updates({"type": "ping", "seq": self._seq})))

    def _on_gossip(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        pass  # its updates were merged already

    def _on_sync(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        """A peer's bucket hashes: answer with which buckets differ and our versions in them."""
        differing = self._differing_buckets(message.get("h"))
        if differing is None:
            self.stats["rejected.malformed-message"] += 1
            return
        self._merge_states(sender, message.get("d"))
        reply: dict[str, Any] = {"type": "sync-reply", "b": differing}
        # Versions, not records: in a differing bucket of a large table most entries are the same
        # on both sides, and a version costs a fifth of a signed record.
        versions = [
            [node_id, STATE_CODES[e.state], e.incarnation, e.heartbeat]
            for node_id, e in self._table.entries_in(differing)
        ]
        if versions:
            reply["v"] = versions
        digests = self._local_states()
        if digests:
            reply["d"] = digests
        out.append(self._out(sender, reply))

    def _on_sync_reply(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        """Their versions in the differing buckets: push what is newer here, ask for what is newer there."""
        buckets, versions = message.get("b"), message.get("v", [])
        theirs = self._parse_versions(versions)
        if (
            type(buckets) is not list
            or not all(type(b) is int and 0 <= b < BUCKETS for b in buckets)
            or theirs is None
        ):
            self.stats["rejected.malformed-message"] += 1
            return
        self._merge_states(sender, message.get("d"))
        push: list[dict[str, Any]] = []
        for node_id, e in self._table.entries_in(buckets):
            their_rank = theirs.pop(node_id, None)
            if their_rank is None or rank(e.state, e.incarnation, e.heartbeat) > their_rank:
                push.extend(e.records())
        want = []
        for node_id, their_rank in theirs.items():  # what is left: entries we hold older or not at all
            e = self._table.get(node_id)
            if e is None or rank(e.state, e.incarnation, e.heartbeat) < their_rank:
                want.append(node_id)
        reply: dict[str, Any] = {"type": "sync-push"}
        if push:
            reply["r"] = push
        if want:
            reply["w"] = want
        if push or want:
            out.append(self._out(sender, reply))

    def _parse_versions(self, versions: Any) -> dict[str, tuple[int, int, int]] | None:
        if type(versions) is not list or len(versions) > MAX_RECORDS_PER_MESSAGE:
            return None
        parsed: dict[str, tuple[int, int, int]] = {}
        for v in versions:
            if type(v) is not list or len(v) != 4:
                return None
            node_id, code, inc, heartbeat = v
            state = CODE_STATES.get(code) if type(code) is str else None
            if not _is_id(node_id) or state is None or not _is_count(inc) or not _is_count(heartbeat):
                return None
            parsed[node_id] = rank(state, inc, heartbeat)
        return parsed

    def _on_sync_push(self, sender: str, message: dict[str, Any], out: list[Outgoing]) -> None:
        """Records a sync partner sends; and, from the initiator, the ids it asks us for."""
        if "r" in message:
            self._merge_all(message["r"], out, via_sync=True)
        want = message.get("w")
        if want is None:
            return
        if type(want) is not list or len(want) > MAX_RECORDS_PER_MESSAGE:
            self.stats["rejected.malformed-message"] += 1
            return
        records: list[dict[str, Any]] = []
        for node_id in dict.fromkeys(w for w in want if type(w) is str):
            entry = self._table.get(node_id)
            if entry is not None:
                records.extend(entry.records())
        if records:  # no "w" in the answer: the exchange ends here
            out.append(self._out(sender, {"type": "sync-push", "r": records}))

    # -- merging updates ------------------------------------------------------------------------------
    def _merge_all(self, records: Any, out: list[Outgoing], *, via_sync: bool) -> None:
        if type(records) is not list or len(records) > MAX_RECORDS_PER_MESSAGE:
            self.stats["rejected.malformed-message"] += 1
            return
        for record in records:
            self._merge(record, via_sync, out)

    def _merge(self, record: Any, via_sync: bool, out: list[Outgoing]) -> None:
        update = parse_update(record)
        if update is None:
            self.stats["rejected.malformed"] += 1
            return
        if update.kind in (SUSPECT, DEAD):
            self._hint(update, out)
            return
        if update.subject == self.id:
            self._about_me(update)
            return
        entry = self._table.get(update.subject)
        if not overrides(update, entry) or (
            update.kind in (DEAD, LEFT) and self._tombstone_left(update) <= 0
        ):
            self.stats["updates.stale"] += 1
            return
        if not self._believe(update):
            return
        self._apply(update, entry)
        self.stats["updates.applied"] += 1
        # Infection: relay what we learned from gossip. What a sync taught us reached us late, so
        # relaying it helps only when it changes a member's state (a suspicion, a death, a refutation):
        # a joiner that pulls a whole table re-broadcasts none of it.
        if not via_sync or (entry is not None and (update.kind != ALIVE or entry.state != ALIVE)):
            self._enqueue(update.subject, update.signed)

    def _believe(self, update: Update) -> bool:
        if not self._verify:
            return True
        reason = self._verified.check(update.signed)
        if reason is not None:
            self.stats["rejected." + reason] += 1
            return False
        self.stats["verified"] += 1
        return True

    def _about_me(self, update: Update) -> None:
        """A record of this node signed by itself (an earlier process's, replayed or relayed) that
        is not older than its own: outbid it with a higher incarnation."""
        if update.kind == ALIVE:
            stale = (update.incarnation, update.heartbeat) <= (self._incarnation, self._heartbeat)
        else:
            stale = update.incarnation < self._incarnation
        if stale:
            self.stats["updates.stale"] += 1
            return
        if not self._believe(update):
            return
        self._incarnation = max(self._incarnation, update.incarnation) + 1
        self.stats["refutes"] += 1
        self._publish()

    def _accused(self, update: Update) -> None:
        """Another member says this node is suspect or dead: refute, unless the accusation cites
        an incarnation this node never signed (refuting that would need one it cannot reach)."""
        if update.incarnation != self._incarnation:
            self.stats["updates.stale" if update.incarnation < self._incarnation else "rejected.uncited"] += 1
            return
        if not self._believe(update):
            return
        self.stats["accusations.of_me"] += 1
        now = self._clock()
        if now < self._refuted_at + self.params.interval_s:
            return  # a refutation is spreading already: accusers cannot make this node flood
        self._refuted_at = now
        self._incarnation += 1
        self.stats["refutes"] += 1
        self._publish()

    def _hint(self, update: Update, out: list[Outgoing]) -> None:
        """Another member's accusation: relay it, and check the accused with our own probes."""
        subject = update.subject
        if update.author == self.id or update.author == subject:
            self.stats["updates.stale" if update.author == self.id else "rejected.malformed"] += 1
            return
        if subject == self.id:
            self._accused(update)
            return
        entry = self._table.get(subject)
        if entry is None or entry.alive is None or entry.state in (DEAD, LEFT):
            self.stats["updates.stale"] += 1
            return
        if update.incarnation != entry.incarnation:
            # Older: stale. Newer: the accused never signed that incarnation (as far as we know).
            self.stats["updates.stale" if update.incarnation < entry.incarnation else "rejected.uncited"] += 1
            return
        if not self._believe(update):
            return
        self.stats["accusations.heard"] += 1
        self._enqueue_hint(subject, update.signed)
        if entry.state == ALIVE:
            self._confirm(subject, out)

    def _confirm(self, subject: str, out: list[Outgoing]) -> None:
        """Probe `subject` now (direct, then through others), unless a probe of it is running."""
        if any(p.target == subject for p in self._probes):
            return
        now = self._clock()
        if self._confirm_round != self._round:
            self._confirm_round, self._confirms = self._round, 0
        if self._confirms >= MAX_CONFIRMS_PER_ROUND:
            self.stats["confirms.deferred"] += 1
            return
        self._confirms += 1
        self.stats["confirms"] += 1
        self._seq += 1
        self._probes.append(_Probe(subject, self._seq, now))
        out.append(self._out(subject, self._with_updates({"type": "ping", "seq": self._seq})))

    def _tombstone_left(self, u: Update) -> float:
        """Seconds a dead/left record still holds, counted from its author's timestamp.

        Every node then drops a tombstone at about the same moment, and one that expired elsewhere
        is not brought back by a sync with a node that still holds it (which would restart its TTL
        and keep it bouncing round the network for ever). Clocks need agree only to a small part of
        the TTL; a timestamp from the future counts as now.
        """
        ttl = self.params.tombstone_ttl_s
        return min(ttl, u.signed["body"]["ts"] + ttl - self._wall())

    def _apply(self, u: Update, e: Entry | None) -> None:
        now = self._clock()
        subject = u.subject
        before = e.state if e is not None else None
        if u.kind == ALIVE:
            if e is not None and e.state == SUSPECT and u.incarnation == e.incarnation:
                new = e._replace(heartbeat=u.heartbeat, alive=u.signed, advanced=now)  # still suspect
            else:
                new = Entry(ALIVE, u.incarnation, u.heartbeat, u.signed, None, now, now)
                self._suspects.pop(subject, None)
        elif u.kind == SUSPECT:
            assert e is not None
            new = Entry(SUSPECT, u.incarnation, e.heartbeat, e.alive, u.signed, now, e.advanced)
            self._suspects[subject] = (now + self.params.suspect_timeout_s, u.incarnation)
        else:
            alive = e.alive if e is not None else None
            new = Entry(u.kind, u.incarnation, 0, alive, u.signed, now, e.advanced if e is not None else now)
            self._suspects.pop(subject, None)
            heapq.heappush(self._tombstones, (now + self._tombstone_left(u), subject, u.incarnation))
        self._table.put(subject, new)
        if self._listener is not None:
            kind = _event_kind(before, new.state)
            if kind is not None:
                self._notify(MembershipEvent(kind, self._view(subject, new, now), self._wall()))

    def _notify(self, event: MembershipEvent) -> None:
        try:
            self._listener(event)  # type: ignore[misc]
        except Exception:
            self.stats["listener_errors"] += 1


def _event_kind(before: PeerState | None, after: PeerState) -> MembershipEventKind | None:
    if after == ALIVE:
        if before is None or before in (DEAD, LEFT):
            return MembershipEventKind.JOINED
        return MembershipEventKind.ALIVE if before == SUSPECT else MembershipEventKind.UPDATED
    if after == before:
        return None  # a suspect's record refreshed while still suspect
    return MembershipEventKind(after.value)


_HANDLERS: dict[str, Callable[[Membership, str, dict[str, Any], list[Outgoing]], None]] = {
    "ping": Membership._on_ping,
    "ack": Membership._on_ack,
    "ping-req": Membership._on_ping_req,
    "gossip": Membership._on_gossip,
    "sync": Membership._on_sync,
    "sync-reply": Membership._on_sync_reply,
    "sync-push": Membership._on_sync_push,
}
