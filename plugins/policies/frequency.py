"""The paper's default policy: coin flips over local load (WWW.Serve §2.2, §4.2, §4.4).

- An app's request: local if a ready local backend of the model is below its usage target; else
  delegate with probability `offload_frequency`; else queue locally with `queue_frequency`; else retry.
- A peer's request: accept (with probability `accept_frequency`) only when a local backend of the
  model is below target and none of them queues; else relay it onward with `relay_frequency`.
- Advertised stake: the paper's load score in [0, 4], scaled to the bonded stake, moving at most
  half the bonded stake per gossip round.

The helpers below (`backend_capacity`, `backend_usage`, `StakedPolicy`, ...) are shared with the
completion-time policy.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wwwserve_gateway.plugin_api import Decision, NodeAPI, PeerView, Policy, RequestInfo
from wwwserve_gateway.plugin_api.backend import Backend

log = structlog.get_logger(__name__)

DEFAULT_TARGET = 0.5  # the paper's DEFAULT_IDLE_USAGE_THRESHOLD
NEVER_LOCAL = -1.0  # a target of -1: never serve the model locally (the paper's convention)
MAX_SCORE = 4  # the paper's stake score lies in [0, 4]


# -- backends ------------------------------------------------------------------------------------


def backend_capacity(backend: Backend) -> int:
    """How many requests the backend decodes at once: its parallel limit, its slot count, or 1."""
    params = backend.params
    return params.max_parallel_requests or getattr(params, "n_parallel", None) or 1


def backend_usage(backend: Backend) -> float:
    """Fraction of the backend's capacity in use. The probe is polled about once a second, while
    the gateway's in-flight count moves at once: taking the larger keeps a burst of decisions made
    between two probes from all seeing the same stale 'idle'. The in-flight count only counts when
    the capacity is known (a parallel limit or a slot count): one request in flight to a remote
    API or a vLLM server of unknown size says nothing about how busy it is."""
    load = backend.state.load
    probed = load.usage if load is not None else 0.0
    params = backend.params
    capacity = params.max_parallel_requests or getattr(params, "n_parallel", None)
    return max(probed, backend.state.in_flight / capacity) if capacity else probed


def backend_busy(backend: Backend) -> int:
    """Requests the backend holds (running or queued). The engine's own counts include this gateway's
    in-flight requests once probed, so the larger of the two is used rather than their sum."""
    load = backend.state.load
    engine = load.running + load.waiting if load is not None else 0
    return max(engine, backend.state.in_flight)


def backend_waiting(backend: Backend) -> int:
    load = backend.state.load
    return load.waiting if load is not None else 0


def ready_backends(node: NodeAPI, model: str | None = None) -> list[Backend]:
    """The node's ready backends, of one model or of all."""
    return [b for b in node.backends if b.ready and (model is None or b.model_name == model)]


def alive_peers(node: NodeAPI, model: str) -> list[PeerView]:
    """Peers a router could draw for `model`: alive, offering it, and with stake > 0 (the router
    never draws a peer advertising no stake, so such a peer cannot take our work)."""
    if node.gossip is None:
        return []
    me = node.identity.node_id
    found = []
    for peer in node.gossip.peers():
        if (
            peer.state == "alive"
            and peer.id != me
            and model in peer.models
            and _positive(peer.record.get("stake"))
        ):
            found.append(peer)
    return found


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


# -- settings ------------------------------------------------------------------------------------

S = TypeVar("S", bound=BaseModel)


class BaseSettings(BaseModel):
    """Settings every built-in policy takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retry_after_s: float = Field(
        0.5, gt=0, description="seconds before a RETRY decision is asked again (> 0)"
    )
    bond: int = Field(
        100,
        ge=0,
        description="credits to keep bonded as stake, bonded at start from liquid (an integer >= 0)",
    )
    share_models: list[str] | None = Field(
        None, description="model names peers may send here (a list of names, or null for all)"
    )
    buy_models: list[str] | None = Field(
        None, description="model names this node may delegate (a list of names, or null for all)"
    )
    seed: int | None = Field(None, description="seed of the policy's random draws (an integer, or null)")


def parse_settings(cls: type[S], settings: Mapping[str, Any], policy: str) -> S:
    """Validate settings; a ValueError names each bad key and what it should be."""
    try:
        return cls.model_validate(dict(settings))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = str(err["loc"][0]) if err["loc"] else "settings"
            if err["type"] == "extra_forbidden":
                known = ", ".join(sorted(cls.model_fields))
                problems.append(f"unknown setting '{key}'; remove it (known settings: {known})")
                continue
            field = cls.model_fields.get(key)
            expected = f"; expected {field.description}" if field and field.description else ""
            why = err["msg"].removeprefix("Value error, ")
            problems.append(f"setting '{key}' = {err['input']!r} is invalid: {why}{expected}")
        raise ValueError(f"policy '{policy}': " + "; ".join(problems)) from None


# -- base ----------------------------------------------------------------------------------------


class StakedPolicy(Policy):
    """What the built-in policies share: settings, share/buy filters, bonding at start."""

    Settings: type[BaseSettings] = BaseSettings
    name = "policy"

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None:
        super().__init__(node, settings)
        self.config = parse_settings(self.Settings, settings, self.name)
        self.retry_after_s = self.config.retry_after_s
        self.rng = random.Random(self.config.seed)
        self._share = None if self.config.share_models is None else frozenset(self.config.share_models)
        self._buy = None if self.config.buy_models is None else frozenset(self.config.buy_models)

    @property
    def me(self) -> str:
        return self.node.identity.node_id

    def shares(self, model: str) -> bool:
        return self._share is None or model in self._share

    def buys(self, model: str) -> bool:
        return self._buy is None or model in self._buy

    def can_buy(self, model: str) -> bool:
        """Whether delegating `model` is allowed now: the provider buys it and the ledger lets us pay."""
        ledger = self.node.ledger
        return self.buys(model) and (ledger is None or ledger.can_delegate(self.me))

    def bonded(self) -> float:
        ledger = self.node.ledger
        return float(ledger.account(self.me)["bonded"]) if ledger is not None else 0.0

    def shared_backends(self) -> list[Backend]:
        """Ready backends of the models peers may send: the ones the advertised stake speaks for."""
        return [b for b in ready_backends(self.node) if self.shares(b.model_name)]

    async def start(self) -> None:
        await ensure_bond(self.node, self.config.bond)


async def ensure_bond(node: NodeAPI, bond: int) -> int:
    """Bond what is missing up to `bond` credits, as far as liquid credit allows; return the amount
    bonded. Best effort: a node that cannot bond still serves, it is just never drawn."""
    ledger = node.ledger
    if ledger is None or bond <= 0:
        return 0
    account = ledger.account(node.identity.node_id)
    missing = bond - float(account["bonded"])
    amount = min(math.ceil(missing), math.floor(float(account["liquid"])))
    if missing <= 0 or amount <= 0:
        return 0
    try:
        await ledger.append_own("bond", {"amount": amount})
    except Exception:
        log.exception("bonding stake failed", amount=amount)
        return 0
    log.info("bonded stake", amount=amount, target=bond)
    return amount


# -- the frequency policy ------------------------------------------------------------------------


class FrequencySettings(BaseSettings):
    target_usage: float | dict[str, float] = Field(
        DEFAULT_TARGET,
        description="a usage in [0, 1] (or -1 for never local), or a mapping model name -> such a number",
    )
    offload_frequency: float = Field(0.8, ge=0, le=1, description="a probability in [0, 1]")
    queue_frequency: float = Field(0.2, ge=0, le=1, description="a probability in [0, 1]")
    accept_frequency: float = Field(0.8, ge=0, le=1, description="a probability in [0, 1]")
    relay_frequency: float = Field(0.0, ge=0, le=1, description="a probability in [0, 1]")

    @field_validator("target_usage", mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, Mapping) else (value,)
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and (0 <= v <= 1 or v == NEVER_LOCAL)
            if not ok:
                raise ValueError(f"{v!r} is not a usage in [0, 1] or -1")
        return value


class FrequencyPolicy(StakedPolicy):
    """The paper's policy. Deterministic given `seed`."""

    Settings = FrequencySettings
    name = "frequency"
    config: FrequencySettings

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None:
        super().__init__(node, settings)
        self._stake = 0.0

    def target(self, model: str) -> float:
        target = self.config.target_usage
        return target.get(model, DEFAULT_TARGET) if isinstance(target, dict) else target

    def _idle(self, backends: Iterable[Backend]) -> bool:
        return any(backend_usage(b) < self.target(b.model_name) for b in backends)

    def _coin(self, p: float) -> bool:
        return self.rng.random() < p

    def decide(self, request: RequestInfo) -> Decision:
        model = request.model
        backends = ready_backends(self.node, model)
        if not backends or self.target(model) == NEVER_LOCAL:
            return Decision.DELEGATE if self.can_buy(model) else Decision.REJECT
        if self._idle(backends) or not alive_peers(self.node, model):
            return Decision.LOCAL  # idle, or busy with nobody to hand over to: queue in the engine
        # The coins are drawn even when delegation is impossible, so a seed gives the same sequence.
        if self._coin(self.config.offload_frequency) and self.can_buy(model):
            return Decision.DELEGATE
        if self._coin(self.config.queue_frequency):
            return Decision.LOCAL
        return Decision.RETRY

    def accept(self, request: RequestInfo) -> Decision:
        model = request.model
        if not self.shares(model):
            return Decision.REJECT
        backends = ready_backends(self.node, model)
        idle = self._idle(backends) and not any(backend_waiting(b) for b in backends)
        if idle and self._coin(self.config.accept_frequency):
            return Decision.LOCAL
        if self._coin(self.config.relay_frequency) and self.can_buy(model):
            return Decision.DELEGATE
        return Decision.REJECT

    def stake_score(self) -> int:
        """The paper's load score in [0, 4] over the shared models' backends. Models this node never
        counts as idle (a target of 0 or -1) are left out: they would attract requests it declines."""
        backends = [b for b in self.shared_backends() if self.target(b.model_name) > 0]
        if not backends or any(backend_waiting(b) for b in backends):
            return 0
        usage = sum(backend_usage(b) for b in backends) / len(backends)
        target = sum(self.target(b.model_name) for b in backends) / len(backends)
        for score, fraction in ((4, 0.25), (3, 0.5), (2, 0.75), (1, 1.0)):
            if usage <= fraction * target:
                return score
        return 0

    def advertised_stake(self) -> float:
        bonded = self.bonded()
        wanted = self.stake_score() * bonded / MAX_SCORE
        # The paper moves stake by at most 2 of 4 per second; we are asked once per gossip round.
        step = bonded / 2
        stake = min(max(wanted, self._stake - step), self._stake + step)
        self._stake = max(0.0, min(stake, bonded))
        return self._stake
