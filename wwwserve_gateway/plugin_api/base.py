"""What every plugin shares, whatever its slot: a settings model and the node it serves.

A plugin class declares `Settings`, a pydantic model of the config section's `settings`; the loader
and `wwwserve check-config` validate the section with it (unknown keys and wrong types are errors that
name the key), and the plugin is built as `Plugin(node, settings)` with the validated model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from wwwserve_gateway.plugin_api.node import NodeAPI


class PluginSettings(BaseModel):
    """Base of every plugin's settings: unknown keys are errors, and values are not coerced
    ("3" for a number is a mistake worth reporting)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Plugin:
    """The shape of every node plugin (gossip, ledger, policy, router, judge).

    `__init__` must not use other plugins: they may not be built yet. From `start()` on, every
    plugin is reachable through `node` (`node.gossip`, `node.ledger`, ...). `start()` is awaited in
    the slots' order (ledger, gossip, judge, policy, router) and `stop()` in the reverse order.
    """

    Settings: ClassVar[type[PluginSettings]] = PluginSettings

    def __init__(self, node: NodeAPI, settings: PluginSettings) -> None:
        self.node = node
        self.settings = settings

    async def start(self) -> None:
        """Called once every plugin is built, before the node serves requests."""

    async def stop(self) -> None:
        """Called when the node stops, after it has stopped serving requests."""
