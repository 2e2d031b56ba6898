"""The ledger slot: the replicated credit ledger."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wwwserve_gateway.network.genesis import NetworkGenesis
from wwwserve_gateway.plugin_api.base import Plugin, PluginSettings

NEUTRAL_QUALITY = 1500.0


@dataclass(frozen=True, slots=True)
class Account:
    """One node's credits (unknown nodes have zeros)."""

    liquid: float = 0.0
    bonded: float = 0.0  # stake: what proof-of-stake draws weigh, and what duels and fraud slash
    unbonding: float = 0.0  # leaving the stake; still slashable until it matures
    barred: bool = False  # proven to have equivocated: never drawn, never paid


class LedgerPlugin(Plugin, ABC):
    """Operations, balances and replication."""

    @abstractmethod
    async def append_own(self, kind: str, body: dict[str, Any]) -> Any:
        """Sign and durably store an operation of this node's own chain; return it."""

    @abstractmethod
    def account(self, node_id: str) -> Account: ...

    @abstractmethod
    def can_delegate(self, node_id: str) -> bool:
        """Whether a node may delegate and be drawn: not barred, and, for this node, able to pay
        one more request after its debts not yet settled."""

    @abstractmethod
    async def settle(self, receipt: dict[str, Any], paid: tuple[int, int] | None = None) -> None:
        """Owe an executor for a verified signed receipt, for `paid` (prompt, completion) tokens
        (at most the receipt's; default: what it claims); the ledger pays in batches."""

    @abstractmethod
    def is_paid(self, executor: str, entry: str, request: str) -> bool:
        """Whether a payment of `entry` to `executor` for the receipt of `request` (its hash) is
        in the ledger as this node holds it."""

    async def drain(self, within_s: float) -> None:
        """Before the node leaves the network (a graceful stop): pay what it owes and hand its own
        latest operations to its peers, waiting at most `within_s`. What is not done by then is
        still on disk, and goes out when the node returns."""

    def quality(self, node_id: str, model: str) -> float:
        """`node_id`'s quality score for `model`: an Elo rating over the duels it has settled, 1500
        when unknown (what a ledger without duels returns)."""
        return NEUTRAL_QUALITY

    @abstractmethod
    def balances_view(self) -> dict[str, dict[str, Any]]:
        """Every account, for the HTTP views and the CLI (with, where known, its `quality` by
        model, its `duels` won/lost/tied and its `judging` record)."""

    @abstractmethod
    def ops_view(self, author: str, start: int, limit: int) -> list[dict[str, Any]]:
        """Operations of one chain from seq `start`, for the HTTP views and the CLI."""

    def pending_view(self) -> dict[str, Any]:
        """This node's debts not yet paid, for the operator's dashboard: `count`, `credits` and
        `oldest_s` (seconds the oldest has waited; None without debts)."""
        return {"count": 0, "credits": 0.0, "oldest_s": None}

    def heads_view(self) -> dict[str, int]:
        """How many operations of each author's chain this node holds ({} for a ledger without chains)."""
        return {}

    async def peer_heads(self, peer_id: str) -> dict[str, int] | None:
        """The same, as a peer says it holds them (None when it does not answer): the dashboard's
        replication lag per peer."""
        return None

    @classmethod
    def verify_offline(
        cls, settings: PluginSettings, data_dir: Path, genesis: NetworkGenesis, location: str | None = None
    ) -> tuple[str, list[str]]:
        """Re-check the stored ledger without running a node (`wwwserve ledger verify`): where it
        looked (`location` overrides the settings' storage), and the problems found."""
        raise NotImplementedError(f"the {cls.__name__} ledger plugin has no offline check")
