"""How plugins see other nodes: a typed view of each gossiped node record, and membership events.

Records come from the network, so one parser (`PeerView.parse_fields`) turns a record's untrusted
fields into typed values, and a malformed field reads as "nothing offered" rather than raising:
a peer that gossips garbage simply offers no models and no stake.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


class PeerState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # missed its probes; still drawn by nobody until it refutes
    DEAD = "dead"
    LEFT = "left"  # said goodbye with a signed leave record


@dataclass(frozen=True, slots=True)
class ModelOffer:
    """A model a peer serves, as it advertises it."""

    name: str
    context_length: int | None = None


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """A peer's load summary over its backends: requests running and waiting, and the largest
    fraction of capacity in use."""

    running: int = 0
    waiting: int = 0
    usage: float = 0.0


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _fraction(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        return 0.0
    return min(max(float(value), 0.0), 1.0)


def _stake(value: Any) -> float:
    # Only JSON numbers: a bool or a string is a malformed record, not a stake of 1 or "5".
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        return 0.0
    return float(value)


def parse_models(value: Any) -> Mapping[str, ModelOffer]:
    if type(value) is not list:
        return _EMPTY
    models: dict[str, ModelOffer] = {}
    for item in value:
        if type(item) is not dict or type(item.get("name")) is not str or not item["name"]:
            continue
        context = item.get("context_length")
        models[item["name"]] = ModelOffer(item["name"], context if type(context) is int else None)
    return types.MappingProxyType(models)


def parse_load(value: Any) -> PeerLoad:
    if type(value) is not dict:
        return PeerLoad()
    return PeerLoad(_count(value.get("running")), _count(value.get("waiting")), _fraction(value.get("usage")))


@dataclass(frozen=True, slots=True)
class PeerView:
    """One known node, as the gossip plugin sees it. `record` is the raw signed record body, for
    plugins that gossip fields of their own; the fields every node sends are parsed already."""

    id: str
    url: str
    state: PeerState
    incarnation: int
    heartbeat: int
    age_s: float
    models: Mapping[str, ModelOffer] = field(default_factory=lambda: _EMPTY)
    load: PeerLoad = field(default_factory=PeerLoad)
    stake: float = 0.0  # advertised; routers cap it by the ledger's bonded stake
    record: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @property
    def alive(self) -> bool:
        return self.state is PeerState.ALIVE

    def serves(self, model: str) -> bool:
        return model in self.models

    @staticmethod
    def parse_fields(record: Mapping[str, Any]) -> tuple[Mapping[str, ModelOffer], PeerLoad, float]:
        """The typed `models`, `load` and `stake` of a record body (defaults for malformed fields)."""
        return parse_models(record.get("models")), parse_load(record.get("load")), _stake(record.get("stake"))


class MembershipEventKind(StrEnum):
    JOINED = "joined"  # first seen, or back after being dead or gone
    UPDATED = "updated"  # re-published its record (models, load, stake)
    SUSPECT = "suspect"
    ALIVE = "alive"  # refuted a suspicion
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class MembershipEvent:
    kind: MembershipEventKind
    peer: PeerView
    at: float  # wall-clock seconds
