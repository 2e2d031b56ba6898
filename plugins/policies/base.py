"""What the built-in policies share, and third-party policies may import: the load of the node's
backends as policies judge it, the peers a router could draw, common settings, and a base class that
bonds stake at start and filters the models a node shares and buys.
"""

from __future__ import annotations

import math
import random
from typing import ClassVar

import structlog
from pydantic import ConfigDict, Field

from wwwserve_gateway.plugin_api.backend import Backend
from wwwserve_gateway.plugin_api.base import PluginSettings
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.peers import PeerView
from wwwserve_gateway.plugin_api.policy import Decision, Policy

log = structlog.get_logger(__name__)


# -- backends ------------------------------------------------------------------------------------


def _capacity(backend: Backend) -> int | None:
    """Its parallel limit, else the slots its engine reports (an external llama.cpp server's are
    its own setting, not ours), else the slots configured here; None when unknown."""
    params = backend.settings
    load = backend.state.load
    reported = load.capacity if load is not None else None
    return params.max_parallel_requests or reported or getattr(params, "n_parallel", None)


def backend_capacity(backend: Backend) -> int:
    """How many requests the backend decodes at once: its parallel limit, its slot count, or 1."""
    return _capacity(backend) or 1


def backend_usage(backend: Backend) -> float:
    """Fraction of the backend's capacity in use. The probe is polled about once a second, while
    the gateway's in-flight count moves at once: taking the larger keeps a burst of decisions made
    between two probes from all seeing the same stale 'idle'. The in-flight count only counts when
    the capacity is known (a parallel limit or a slot count): one request in flight to a remote
    API or a vLLM server of unknown size says nothing about how busy it is."""
    load = backend.state.load
    probed = load.usage if load is not None else 0.0
    capacity = _capacity(backend)
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
    me = node.node_id
    return [p for p in node.gossip.peers() if p.alive and p.id != me and p.stake > 0 and p.serves(model)]


# -- settings ------------------------------------------------------------------------------------


class PolicySettings(PluginSettings):
    """Settings every built-in policy takes."""

    # Lax numbers: `target_usage: 1` and `offload_frequency: 1` must read as floats.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)
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


# -- base ----------------------------------------------------------------------------------------


class StakedPolicy(Policy):
    """What the built-in policies share: settings, share/buy filters, bonding at start."""

    Settings: ClassVar[type[PolicySettings]] = PolicySettings
    settings: PolicySettings

    def __init__(self, node: NodeAPI, settings: PolicySettings) -> None:
        super().__init__(node, settings)
        self.retry_after_s = settings.retry_after_s
        self.rng = random.Random(settings.seed)
        self._share = None if settings.share_models is None else frozenset(settings.share_models)
        self._buy = None if settings.buy_models is None else frozenset(settings.buy_models)

    @property
    def me(self) -> str:
        return self.node.node_id

    def shares(self, model: str) -> bool:
        return self._share is None or model in self._share

    def buys(self, model: str) -> bool:
        return self._buy is None or model in self._buy

    def can_buy(self, model: str) -> bool:
        """Whether delegating `model` is allowed now: the provider buys it and the ledger lets us pay."""
        return self.buys(model) and self.node.ledger.can_delegate(self.me)

    def delegate_or_wait(self, model: str) -> Decision:
        """No local backend can serve now: delegate if allowed; else wait for a local one that is
        starting (503 with Retry-After), or refuse (429) when there is none."""
        if self.can_buy(model):
            return Decision.DELEGATE
        has_local = any(b.model_name == model for b in self.node.backends)
        return Decision.LOCAL if has_local else Decision.REJECT

    def bonded(self) -> float:
        return self.node.ledger.account(self.me).bonded

    def shared_backends(self) -> list[Backend]:
        """Ready backends of the models peers may send: the ones the advertised stake speaks for."""
        return [b for b in ready_backends(self.node) if self.shares(b.model_name)]

    async def start(self) -> None:
        await ensure_bond(self.node, self.settings.bond)


async def ensure_bond(node: NodeAPI, bond: int) -> int:
    """Bond what is missing up to `bond` credits, as far as liquid credit allows; return the amount
    bonded. Best effort: a node that cannot bond still serves, it is just never drawn."""
    if bond <= 0:
        return 0
    ledger = node.ledger
    account = ledger.account(node.node_id)
    missing = bond - account.bonded
    amount = min(math.ceil(missing), math.floor(account.liquid))
    if missing <= 0 or amount <= 0:
        return 0
    try:
        await ledger.append_own("bond", {"amount": amount})
    except Exception:
        log.exception("bonding stake failed", amount=amount)
        return 0
    log.info("bonded stake", amount=amount, target=bond)
    return amount
