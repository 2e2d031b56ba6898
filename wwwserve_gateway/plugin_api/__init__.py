"""The public API plugins are written against: what a node offers them, and the slot interfaces.

Built-in plugins use exactly this API, as a third-party plugin would (pluggy's rule: a small core,
every feature a plugin). A plugin is a class registered under its slot's entry-point group, or named
in the config as 'module:Class'; it is built with `Plugin(node, settings)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from wwwserve_gateway.backend_registry import BackendRegistry
    from wwwserve_gateway.network.genesis import NetworkGenesis
    from wwwserve_gateway.network.identity import NodeIdentity
    from wwwserve_gateway.overlay.overlay import Overlay

GOSSIP_GROUP = "wwwserve.gossip"
LEDGER_GROUP = "wwwserve.ledgers"
POLICY_GROUP = "wwwserve.policies"
ROUTER_GROUP = "wwwserve.routers"


@dataclass
class NodeAPI:
    """What a node gives its plugins. Plugins talk to each other only through it: the ledger, for
    instance, reaches gossip as `node.gossip`, never through the gossip plugin's internals."""

    identity: NodeIdentity
    genesis: NetworkGenesis
    overlay: Overlay
    backends: BackendRegistry
    metrics: CollectorRegistry
    public_url: str
    bootstrap: tuple[str, ...]
    data_dir: Path
    # Set as the plugins are built (gossip, ledger, policy, router, in that order).
    gossip: GossipPlugin | None = None
    ledger: LedgerPlugin | None = None
    policy: PolicyPlugin | None = None
    router: RouterPlugin | None = None


@dataclass(frozen=True)
class PeerView:
    """One known node, as the gossip plugin sees it."""

    id: str
    url: str
    state: str  # alive, suspect, dead or left
    incarnation: int
    heartbeat: int
    age_s: float
    record: Mapping[str, Any]

    @property
    def models(self) -> frozenset[str]:
        """Names of the models the peer offers (records come from the network: malformed = none)."""
        models = self.record.get("models")
        if not isinstance(models, list):
            return frozenset()
        return frozenset(
            m["name"] for m in models if isinstance(m, Mapping) and isinstance(m.get("name"), str)
        )


class GossipDelegate(Protocol):
    """Lets another plugin attach a small digest to gossip, as memberlist's Delegate does."""

    def local_digest(self) -> dict[str, Any]: ...

    def merge_remote_digest(self, peer_id: str, digest: dict[str, Any]) -> None: ...


@runtime_checkable
class GossipPlugin(Protocol):
    """Membership, failure detection and dissemination of node records."""

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Leave the network gracefully (a signed leave record), then stop."""

    def peers(self) -> list[PeerView]: ...

    def add_delegate(self, name: str, delegate: GossipDelegate) -> None: ...


@runtime_checkable
class LedgerPlugin(Protocol):
    """The replicated credit ledger: operations, balances, replication."""

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def append_own(self, kind: str, body: dict[str, Any]) -> Any:
        """Sign and durably store an operation of this node's own chain; return it."""

    def balances_view(self) -> dict[str, dict[str, Any]]: ...

    def ops_view(self, author: str, start: int, limit: int) -> list[dict[str, Any]]: ...

    def account(self, node_id: str) -> dict[str, Any]:
        """{"liquid", "bonded", "unbonding" (credits), "barred"} of one node; zeros if unknown."""

    def can_delegate(self, node_id: str) -> bool:
        """Whether a node may delegate and be drawn: balance >= 0 (own debts not yet settled
        included, for this node) and not barred."""

    async def settle(self, receipt: dict[str, Any]) -> None:
        """Owe an executor for a verified signed receipt; the ledger pays in batches."""


# -- delegation ----------------------------------------------------------------------------------


class Decision(StrEnum):
    LOCAL = "local"  # serve on a local backend now (the engine may queue it)
    DELEGATE = "delegate"  # hand it to a peer the router draws
    RETRY = "retry"  # wait the policy's retry_after_s, then decide again
    REJECT = "reject"  # refuse: 429 to an app, a decline to a peer


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What policies and routers see of a request (never its content)."""

    id: str  # 32 hex characters, the same on every hop
    model: str
    endpoint: str  # "chat/completions", "completions" or "embeddings"
    stream: bool
    route: tuple[str, ...]  # node ids it went through, entry first; () for an app's request
    prompt_chars: int = 0
    max_tokens: int | None = None
    attempt: int = 0  # how many times the policy has been asked about it already (RETRY)
    avoid: tuple[str, ...] = ()  # nodes that already failed this request: routers skip them

    @property
    def from_peer(self) -> bool:
        return bool(self.route)


class Policy:
    """A provider's decisions. Subclass it and override what you need; register the class under the
    `wwwserve.policies` entry-point group (or name it as 'module:Class' in the config).

    Decisions are synchronous and must be quick: they run on the request path.
    """

    retry_after_s: float = 0.5

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None:
        self.node = node
        self.settings = settings

    async def start(self) -> None:
        """Called once the ledger and gossip run (e.g. to bond stake)."""

    async def stop(self) -> None: ...

    def decide(self, request: RequestInfo) -> Decision:
        """An app's request: serve locally, delegate, retry shortly or reject."""
        return Decision.LOCAL

    def accept(self, request: RequestInfo) -> Decision:
        """A peer's request: LOCAL runs it here, DELEGATE relays it onward (multi-hop), anything
        else declines it."""
        return Decision.REJECT

    def advertised_stake(self) -> float:
        """The stake this node offers to proof-of-stake draws now (capped by its bonded stake)."""
        return 0.0

    def shares(self, model: str) -> bool:
        """Whether peers may send this node requests for `model`."""
        return True

    def buys(self, model: str) -> bool:
        """Whether this node may delegate requests for `model` to peers."""
        return True

    def on_request_done(self, request: RequestInfo, where: str, seconds: float, ok: bool) -> None:
        """Told after every app request and every peer request served here: `where` is "local"
        or "peer" (delegated)."""


PolicyPlugin = Policy


@runtime_checkable
class RouterPlugin(Protocol):
    """Executor choice: which peers to try for a request, best first. The node tries them in order
    (a decline, timeout or dead connection moves to the next)."""

    def __init__(self, node: NodeAPI, settings: Mapping[str, Any]) -> None: ...

    def candidates(self, request: RequestInfo) -> list[str]: ...
