"""The public API plugins are written against, built-in and third-party alike (pluggy's rule: a small
core, every feature a plugin on the same hooks a third party uses).

Every slot is declared the same way (`slots`): a config section, an entry-point group, an interface
to subclass and a built-in default. Every plugin class declares a pydantic `Settings` model, which
the node and `wwwserve check-config` validate before the plugin is built as `Plugin(node, settings)`.

- `base`: `Plugin`, `PluginSettings`
- `node`: `NodeAPI`, what a node gives its plugins
- `peers`: `PeerView` (typed, parsed from untrusted gossip records), `PeerState`, membership events
- `requests`: `RequestInfo`, what decisions see of a request
- `gossip`, `ledger`, `judge`, `policy`, `router`, `backend`: the slot interfaces
- `loading`: finding plugin classes and validating their settings
"""

from wwwserve_gateway.plugin_api.backend import (
    Backend,
    BackendContext,
    BackendLoad,
    BackendSettings,
    Endpoint,
    JSONReply,
    SSEStream,
    Usage,
)
from wwwserve_gateway.plugin_api.base import Plugin, PluginSettings
from wwwserve_gateway.plugin_api.gossip import GossipDelegate, GossipPlugin, MembershipListener
from wwwserve_gateway.plugin_api.judge import Judge, JudgeCase, Verdict
from wwwserve_gateway.plugin_api.ledger import Account, LedgerPlugin
from wwwserve_gateway.plugin_api.node import Backends, NodeAPI, PluginNotBuilt
from wwwserve_gateway.plugin_api.peers import (
    MembershipEvent,
    MembershipEventKind,
    ModelOffer,
    PeerLoad,
    PeerState,
    PeerView,
)
from wwwserve_gateway.plugin_api.policy import Decision, Policy
from wwwserve_gateway.plugin_api.requests import RequestInfo
from wwwserve_gateway.plugin_api.router import Router
from wwwserve_gateway.plugin_api.slots import BACKEND, GOSSIP, JUDGE, LEDGER, NODE_SLOTS, POLICY, ROUTER, Slot

__all__ = [
    "BACKEND",
    "GOSSIP",
    "JUDGE",
    "LEDGER",
    "NODE_SLOTS",
    "POLICY",
    "ROUTER",
    "Account",
    "Backend",
    "BackendContext",
    "BackendLoad",
    "BackendSettings",
    "Backends",
    "Decision",
    "Endpoint",
    "GossipDelegate",
    "GossipPlugin",
    "JSONReply",
    "Judge",
    "JudgeCase",
    "LedgerPlugin",
    "MembershipEvent",
    "MembershipEventKind",
    "MembershipListener",
    "ModelOffer",
    "NodeAPI",
    "PeerLoad",
    "PeerState",
    "PeerView",
    "Plugin",
    "PluginNotBuilt",
    "PluginSettings",
    "Policy",
    "RequestInfo",
    "Router",
    "SSEStream",
    "Slot",
    "Usage",
    "Verdict",
]
