"""The gossip slot: membership, failure detection, and dissemination of node records."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.peers import MembershipEvent, PeerView

MembershipListener = Callable[[MembershipEvent], None]


class GossipDelegate:
    """How other parts of a node ride on gossip without the gossip plugin knowing them (memberlist's
    Delegate). Override what you need; every method has a no-op default.

    - `node_meta()`: fields this part adds to the node's own signed record, which every peer sees
      in its `PeerView` (`models` and `load` come from the backends, `stake` from the policy). Asked
      once per gossip round; the record is re-signed and spread only when the fields change, so
      return values that change rarely (coarse load states, not every request).
    - `local_state()` / `merge_remote_state()`: a small digest exchanged on anti-entropy syncs (the
      ledger's chain heads), and what to do with a peer's.
    """

    def node_meta(self) -> Mapping[str, Any]:
        return {}

    def local_state(self) -> dict[str, Any] | None:
        return None

    def merge_remote_state(self, peer_id: str, state: dict[str, Any]) -> None:
        """Called with a peer's `local_state()`; must not block (schedule work instead)."""


class GossipPlugin(Plugin, ABC):
    """Membership, failure detection and dissemination. `stop()` leaves the network gracefully."""

    @abstractmethod
    def peers(self) -> list[PeerView]:
        """Every node known, this one included (`peer.id == node.identity.node_id`)."""

    def peer(self, node_id: str) -> PeerView | None:
        return next((p for p in self.peers() if p.id == node_id), None)

    def seeds(self) -> list[str]:
        """The URLs this node joins through: its bootstrap list, and what the plugin remembers.
        A node with seeds and no live peer is still joining (or cut off), not alone by design."""
        return list(self.node.bootstrap)

    @abstractmethod
    def add_delegate(self, name: str, delegate: GossipDelegate) -> None:
        """Attach a delegate; `name` keys its state digest on the wire."""

    @abstractmethod
    def subscribe(self, listener: MembershipListener) -> None:
        """Call `listener` with every membership event (synchronously: it must not block)."""
