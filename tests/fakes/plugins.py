"""Stand-ins for a node's plugins, for tests that drive one plugin (a policy, a router) alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.plugin_api import Account, NodeAPI, PeerState, PeerView
from wwwserve_gateway.plugin_api.base import Plugin
from wwwserve_gateway.plugin_api.loading import validate_settings

ME = "me" * 32
P = TypeVar("P", bound=Plugin)


class FakeLedger:
    """Accounts by node id; `append_own("bond", ...)` moves the owner's liquid credit into stake;
    `settle` keeps the receipts it is given, in `settled`."""

    def __init__(
        self, accounts: Mapping[str, Account] | None = None, *, owner: str = ME, delegate: bool = True
    ):
        self.accounts = dict(accounts or {})
        self.owner = owner
        self.delegate = delegate
        self.ops: list[tuple[str, dict[str, Any]]] = []
        self.settled: list[dict[str, Any]] = []
        self.paid: list[tuple[int, int] | None] = []  # the tokens paid of each settled receipt
        self.ratings: dict[tuple[str, str], float] = {}

    def account(self, node_id: str) -> Account:
        return self.accounts.get(node_id, Account())

    def quality(self, node_id: str, model: str) -> float:
        return self.ratings.get((node_id, model), 1500.0)

    def balances_view(self) -> dict[str, dict[str, Any]]:
        return {
            n: {"liquid": a.liquid, "bonded": a.bonded, "barred": a.barred} for n, a in self.accounts.items()
        }

    def can_delegate(self, node_id: str) -> bool:
        return self.delegate and not self.account(node_id).barred

    async def append_own(self, kind: str, body: dict[str, Any]) -> None:
        self.ops.append((kind, body))
        if kind == "bond":
            mine = self.account(self.owner)
            self.accounts[self.owner] = Account(mine.liquid - body["amount"], mine.bonded + body["amount"])

    async def settle(self, receipt: dict[str, Any], paid: tuple[int, int] | None = None) -> None:
        self.settled.append(receipt)
        self.paid.append(paid)


class FakeGossip:
    def __init__(self, peers: Iterable[PeerView] = ()) -> None:
        self.list = list(peers)

    def peers(self) -> list[PeerView]:
        return list(self.list)

    def peer(self, node_id: str) -> PeerView | None:
        return next((p for p in self.list if p.id == node_id), None)

    def seeds(self) -> list[str]:
        return []


def peer_view(
    node_id: str,
    record: Mapping[str, Any] | None = None,
    *,
    state: PeerState = PeerState.ALIVE,
    **fields: Any,
) -> PeerView:
    """A peer as gossip would show it: `record` (or the fields given, e.g. models=[{"name": "m"}],
    stake=10) parsed by the same parser the gossip plugin uses."""
    body = dict(record if record is not None else fields)
    models, load, stake = PeerView.parse_fields(body)
    return PeerView(node_id, f"http://{node_id}", state, 1, 1, 0.0, models, load, stake, body)


def node_api(
    *,
    node_id: str = ME,
    backends: Iterable[Any] = (),
    peers: Iterable[PeerView] = (),
    ledger: Any = None,
    gossip: Callable[[NodeAPI], Any] | None = None,
    identity: Any = None,
    **services: Any,
) -> NodeAPI:
    """A NodeAPI with fake gossip and ledger bound (and nothing else a policy or router needs).

    `services` are NodeAPI's own arguments (genesis, overlay, metrics, data_dir, ...) for a plugin that
    uses them; `gossip`, when given, builds the gossip plugin from the NodeAPI instead of FakeGossip."""
    node_id = identity.node_id if identity is not None else node_id
    made: dict[str, Any] = {
        "identity": identity or SimpleNamespace(node_id=node_id),
        "genesis": NetworkGenesis(),
        "overlay": None,
        "metrics": None,
        "public_url": f"http://{node_id}",
        "data_dir": Path("."),
    }
    node = NodeAPI(backends=list(backends), **(made | services))  # type: ignore[arg-type]
    node.bind(
        gossip=FakeGossip(peers) if gossip is None else gossip(node),
        ledger=FakeLedger(owner=node.node_id) if ledger is None else ledger,
    )
    return node


def build(cls: type[P], node: NodeAPI, **settings: Any) -> P:
    """`cls` built as the node builds plugins: settings validated by its own `Settings` model."""
    valid, problems = validate_settings(cls.Settings, settings, ("settings",))
    if valid is None:
        raise ValueError("; ".join(map(str, problems)))
    return cls(node, valid)
