"""What a node gives its plugins: `NodeAPI`. Plugins talk to each other only through it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.overlay.overlay import Overlay
from wwwserve_gateway.plugin_api.backend import Backend

if TYPE_CHECKING:
    from wwwserve_gateway.plugin_api.gossip import GossipPlugin
    from wwwserve_gateway.plugin_api.judge import Judge
    from wwwserve_gateway.plugin_api.ledger import LedgerPlugin
    from wwwserve_gateway.plugin_api.policy import Policy
    from wwwserve_gateway.plugin_api.router import Router


class Backends(Protocol):
    """The node's deployments, read-only: what policies look at to judge local load."""

    def __iter__(self) -> Iterator[Backend]: ...

    def get(self, deployment_id: str) -> Backend | None: ...

    def serves(self, model: str) -> bool: ...

    def model_names(self) -> list[str]: ...


class PluginNotBuilt(RuntimeError):
    pass


class NodeAPI:
    """The node's services and its plugins. The plugins are bound once all are built: a plugin may
    reach another from `start()` on, never in its `__init__`."""

    def __init__(
        self,
        *,
        identity: NodeIdentity,
        genesis: NetworkGenesis,
        overlay: Overlay,
        backends: Backends,
        metrics: CollectorRegistry,
        public_url: str,
        bootstrap: tuple[str, ...] = (),
        data_dir: Path,
    ) -> None:
        self.identity = identity
        self.genesis = genesis
        self.overlay = overlay
        self.backends = backends
        self.metrics = metrics
        self.public_url = public_url
        self.bootstrap = bootstrap
        self.data_dir = data_dir
        self._plugins: dict[str, Any] = {}

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def bind(self, **plugins: Any) -> None:
        """Make plugins reachable by slot name (gossip=..., ledger=..., judge=..., ...)."""
        self._plugins.update(plugins)

    def _plugin(self, slot: str) -> Any:
        try:
            return self._plugins[slot]
        except KeyError:
            raise PluginNotBuilt(
                f"the {slot} plugin is not bound yet: plugins may use each other from start() on"
            ) from None

    @property
    def gossip(self) -> GossipPlugin:
        return self._plugin("gossip")

    @property
    def judge(self) -> Judge:
        return self._plugin("judge")

    @property
    def ledger(self) -> LedgerPlugin:
        return self._plugin("ledger")

    @property
    def policy(self) -> Policy:
        return self._plugin("policy")

    @property
    def router(self) -> Router:
        return self._plugin("router")
