"""Every plugin slot, declared the same way: its config section, entry-point group, interface and
built-in default. A third-party plugin subclasses the interface and registers under the group."""

from __future__ import annotations

from dataclasses import dataclass

from wwwserve_gateway.plugin_api.backend import Backend
from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.gossip import GossipPlugin
from wwwserve_gateway.plugin_api.judge import Judge
from wwwserve_gateway.plugin_api.ledger import LedgerPlugin
from wwwserve_gateway.plugin_api.policy import Policy
from wwwserve_gateway.plugin_api.router import Router


@dataclass(frozen=True)
class Slot:
    name: str  # the config section (for backends: a model_list entry's provider prefix picks one)
    group: str  # the entry-point group plugins register under
    interface: type  # the base class a plugin subclasses
    default: str  # the built-in plugin's entry-point name


GOSSIP = Slot("gossip", "wwwserve.gossip", GossipPlugin, "swim")
LEDGER = Slot("ledger", "wwwserve.ledgers", LedgerPlugin, "chains")
JUDGE = Slot("judge", "wwwserve.judges", Judge, "llm")
POLICY = Slot("policy", "wwwserve.policies", Policy, "frequency")
ROUTER = Slot("router", "wwwserve.routers", Router, "pos")
# A deployment's backend is the one registered under its provider prefix; other prefixes go to
# the LiteLLM SDK adapter.
BACKEND = Slot("backend", "wwwserve.backends", Backend, "litellm")

# Node plugins, in the order they are started (and stopped in reverse).
NODE_SLOTS: tuple[Slot, ...] = (LEDGER, GOSSIP, JUDGE, POLICY, ROUTER)

__all__ = ["BACKEND", "GOSSIP", "JUDGE", "LEDGER", "NODE_SLOTS", "POLICY", "ROUTER", "Plugin", "Slot"]
