"""The public API plugins are written against: what a node offers them, and the slot interfaces.

Built-in plugins use exactly this API, as a third-party plugin would (pluggy's rule: a small core,
every feature a plugin). A plugin is a class registered under its slot's entry-point group, or named
in the config as 'module:Class'; it is built with `Plugin(node, settings)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from wwwserve_gateway.backend_registry import BackendRegistry
    from wwwserve_gateway.genesis import NetworkGenesis
    from wwwserve_gateway.identity import NodeIdentity
    from wwwserve_gateway.overlay.overlay import Overlay

GOSSIP_GROUP = "wwwserve.gossip"
LEDGER_GROUP = "wwwserve.ledgers"


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
    gossip: GossipPlugin | None = None  # set once the gossip plugin is built


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
