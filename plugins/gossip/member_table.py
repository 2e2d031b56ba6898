"""The membership table: node id -> Entry, with what the gossip protocol needs in O(1).

A node asks its table, every round, for a random member, for the member at a position of its probe
order, for counts by state (the retransmit limit depends on N) and for 64 bucket hashes (the
anti-entropy digest). All of these are kept up to date incrementally, so that no round costs O(N).

A table made with `base=` is a copy-on-write overlay on a frozen table: a simulator builds one
converged table and gives each of 10,000 nodes an overlay holding only what that node changed.
Entries are immutable tuples whose records are never mutated, so sharing them is safe.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from wwwserve_gateway.plugin_api.peers import PeerState

ALIVE, SUSPECT, DEAD, LEFT = PeerState.ALIVE, PeerState.SUSPECT, PeerState.DEAD, PeerState.LEFT
BUCKETS = 64
_RANDOM_TRIES = 16  # rejection-sampling attempts before falling back to a scan of eligible members


class Entry(NamedTuple):
    """What a node believes about one member. Immutable: a change is a new Entry."""

    state: PeerState
    incarnation: int  # the incarnation of the record behind `state`
    heartbeat: int  # of the alive record (0 for tombstones)
    alive: dict[str, Any] | None  # the newest signed alive record believed (kept while suspect)
    accusation: dict[str, Any] | None  # the signed suspect/dead/left record behind a non-alive state
    since: float  # local clock when this state began
    advanced: float  # local clock when (incarnation, heartbeat) last advanced: a member's age

    def records(self) -> list[dict[str, Any]]:
        """The signed records that rebuild this entry elsewhere (alive first: a suspicion needs it)."""
        if self.state == ALIVE:
            return [self.alive] if self.alive is not None else []
        if self.state == SUSPECT:
            return [r for r in (self.alive, self.accusation) if r is not None]
        return [self.accusation] if self.accusation is not None else []


_PRIORITY = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 2}
STATE_CODES = {ALIVE: "a", SUSPECT: "s", DEAD: "d", LEFT: "l"}
CODE_STATES = {code: state for state, code in STATE_CODES.items()}


def rank(state: PeerState, incarnation: int, heartbeat: int) -> tuple[int, int, int]:
    """SWIM's precedence as one order: a higher incarnation wins; within one, alive < suspect <
    dead/left; within alive (or suspect), the higher heartbeat. Anti-entropy uses it to decide what
    to send and ask for; what arrives is still checked against the exact rules."""
    return (incarnation, _PRIORITY[state], heartbeat)


def bucket_of(node_id: str) -> int:
    return int(node_id[:4], 16) % BUCKETS


def entry_hash(node_id: str, entry: Entry) -> int:
    """A 64-bit hash of (id, kind, incarnation, heartbeat); a bucket's hash is the XOR of its entries'.

    XOR makes the bucket hash order-independent and updatable in O(1) per change (remove the old
    entry's hash, add the new one), where a hash over the sorted bucket would cost O(N/64) each time.
    It only detects differences; it protects nothing, so its linearity is harmless.
    """
    key = f"{node_id}:{entry.state}:{entry.incarnation}:{entry.heartbeat}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


class IndexedIds:
    """A set of ids that can also be indexed by position, for O(1) random choice (swap-pop removal)."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._pos: dict[str, int] = {}

    def add(self, node_id: str) -> None:
        if node_id not in self._pos:
            self._pos[node_id] = len(self._items)
            self._items.append(node_id)

    def discard(self, node_id: str) -> None:
        pos = self._pos.pop(node_id, None)
        if pos is None:
            return
        last = self._items.pop()
        if pos < len(self._items):
            self._items[pos] = last
            self._pos[last] = pos

    def __getitem__(self, pos: int) -> str:
        return self._items[pos]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


_MISSING: Any = object()


class MemberTable:
    def __init__(self, base: MemberTable | None = None) -> None:
        if base is not None and base._base is not None:
            raise ValueError("an overlay's base must be a plain table")
        self._base = base
        if base is not None:
            base._frozen = True
        self._frozen = False
        # Here: every entry of a plain table; an overlay's own changes (None masks a base entry).
        self._own: dict[str, Entry | None] = {}
        self._added = IndexedIds()  # ids present here and not in the base, indexable
        self._hashes: list[int] = list(base._hashes) if base is not None else [0] * BUCKETS
        self._counts: Counter[str] = Counter(base._counts) if base is not None else Counter()
        self._by_bucket: list[list[str]] | None = None  # a frozen base's ids per bucket, built on demand

    # -- reading ------------------------------------------------------------------------------
    def get(self, node_id: str) -> Entry | None:
        entry = self._own.get(node_id, _MISSING)
        if entry is _MISSING:
            return self._base._own.get(node_id) if self._base is not None else None
        return entry

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, str) and self.get(node_id) is not None

    def __len__(self) -> int:
        return sum(self._counts.values())

    def count(self, *states: str) -> int:
        return sum(self._counts[s] for s in states)

    def ids(self) -> Iterator[str]:
        if self._base is not None:
            for node_id in self._base._added:
                if self._own.get(node_id, _MISSING) is not None:
                    yield node_id
        yield from self._added

    def bucket_hashes(self) -> list[int]:
        return list(self._hashes)

    def entries_in(self, buckets: Iterable[int]) -> list[tuple[str, Entry]]:
        """Every (id, entry) in `buckets` (one pass, so a plain table costs O(N) however many)."""
        wanted = set(buckets)
        if not wanted:
            return []
        out: list[tuple[str, Entry]] = []
        if self._base is not None:
            by_bucket = self._base._bucket_index()
            base_own = self._base._own
            for b in sorted(wanted):
                for node_id in by_bucket[b]:
                    if node_id not in self._own:  # overridden ids are read from _own below
                        out.append((node_id, base_own[node_id]))  # type: ignore[arg-type]
        for node_id, entry in self._own.items():
            if entry is not None and bucket_of(node_id) in wanted:
                out.append((node_id, entry))
        return out

    # -- positions, for random choice and the probe order -----------------------------------------
    def index_size(self) -> int:
        """Positions are 0..index_size()-1; some may hold a removed id (id_at returns None)."""
        return (len(self._base._added) if self._base is not None else 0) + len(self._added)

    def id_at(self, pos: int) -> str | None:
        n_base = len(self._base._added) if self._base is not None else 0
        if pos < n_base:
            node_id = self._base._added[pos]  # type: ignore[union-attr]
            return node_id if self._own.get(node_id, _MISSING) is not None else None
        pos -= n_base
        return self._added[pos] if pos < len(self._added) else None

    def random_id(self, rng: random.Random, accept: Callable[[str, Entry], bool]) -> str | None:
        """A uniformly random id whose entry `accept`s, or None when there is none."""
        size = self.index_size()
        if size == 0:
            return None
        for _ in range(_RANDOM_TRIES):
            node_id = self.id_at(rng.randrange(size))
            if node_id is not None:
                entry = self.get(node_id)
                if entry is not None and accept(node_id, entry):
                    return node_id
        # Few eligible members (a tiny network, or one made mostly of tombstones): scan.
        eligible = [i for i in self.ids() if accept(i, self.get(i))]  # type: ignore[arg-type]
        return rng.choice(eligible) if eligible else None

    # -- writing ------------------------------------------------------------------------------
    def put(self, node_id: str, entry: Entry) -> None:
        if self._frozen:
            raise RuntimeError("this table is the shared base of overlays; it cannot change")
        old = self.get(node_id)
        b = bucket_of(node_id)
        if old is not None:
            self._hashes[b] ^= entry_hash(node_id, old)
            self._counts[old.state] -= 1
        elif self._base is None or node_id not in self._base._own:
            self._added.add(node_id)
        self._hashes[b] ^= entry_hash(node_id, entry)
        self._counts[entry.state] += 1
        self._own[node_id] = entry

    def remove(self, node_id: str) -> None:
        if self._frozen:
            raise RuntimeError("this table is the shared base of overlays; it cannot change")
        old = self.get(node_id)
        if old is None:
            return
        self._hashes[bucket_of(node_id)] ^= entry_hash(node_id, old)
        self._counts[old.state] -= 1
        if self._base is not None and node_id in self._base._own:
            self._own[node_id] = None  # mask the base's entry
        else:
            del self._own[node_id]
            self._added.discard(node_id)

    def _bucket_index(self) -> list[list[str]]:
        if self._by_bucket is None:
            self._by_bucket = [[] for _ in range(BUCKETS)]
            for node_id in self._added:
                self._by_bucket[bucket_of(node_id)].append(node_id)
        return self._by_bucket
