"""The Credits page's data: this node's balance, what it earned and spent over time (from the
ledger's operations, read incrementally), its pending debts, the latest operations, and the
replication lag per peer (operations each side holds that the other lacks)."""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wwwserve_gateway.plugin_api.ledger import LedgerPlugin

PAGE = 500  # operations read per chain per refresh: a catch-up is spread over refreshes
SERIES = 2000  # earned/spent points kept
LATEST = 30  # latest operations shown


def _amount(value: Any) -> float:
    return float(value) if type(value) in (int, float) else 0.0


def money_moved(op: Mapping[str, Any], me: str) -> tuple[float, float]:
    """(earned, spent) by `me` in one operation: payments and transfers, to or from it."""
    body = op.get("body") if isinstance(op.get("body"), dict) else {}
    earned = spent = 0.0
    if op.get("kind") == "pay":
        for payment in body.get("payments", []) if isinstance(body.get("payments"), list) else []:
            if not isinstance(payment, dict):
                continue
            if op.get("author") == me:
                spent += _amount(payment.get("amount"))
            elif payment.get("to") == me:
                earned += _amount(payment.get("amount"))
    elif op.get("kind") == "transfer":
        if op.get("author") == me:
            spent += _amount(body.get("amount"))
        elif body.get("to") == me:
            earned += _amount(body.get("amount"))
    return earned, spent


def summary(op: Mapping[str, Any]) -> str:
    body = op.get("body") if isinstance(op.get("body"), dict) else {}
    kind = op.get("kind")
    if kind == "pay" and isinstance(body.get("payments"), list):
        items = sum(len(p.get("items", [])) for p in body["payments"] if isinstance(p, dict))
        total = sum(_amount(p.get("amount")) for p in body["payments"] if isinstance(p, dict))
        return f"{total:g} credits for {items} requests to {len(body['payments'])} executors"
    if kind in ("transfer", "bond", "unbond"):
        to = body.get("to")
        return f"{_amount(body.get('amount')):g} credits" + (f" to {str(to)[:12]}" if to else "")
    if kind == "join":
        return f"joined with {_amount(body.get('grant')):g} credits"
    return kind if isinstance(kind, str) else "?"


def _entry(op: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "ts": round(_amount(op.get("ts")), 3),
        "author": op.get("author"),
        "seq": op.get("seq"),
        "kind": op.get("kind"),
        "summary": summary(op),
    }


@dataclass
class CreditsTracker:
    """Reads every chain from where it left off; keeps cumulative earned and spent by operation time."""

    ledger: LedgerPlugin
    me: str
    cursors: dict[str, int] = field(default_factory=dict)  # next seq to read, by author
    earned: float = 0.0
    spent: float = 0.0
    series: deque[tuple[float, float, float]] = field(default_factory=lambda: deque(maxlen=SERIES))
    latest: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LATEST))
    lag: dict[str, dict[str, int]] = field(default_factory=dict)

    def refresh(self, authors: list[str]) -> None:
        moves: list[tuple[float, float, float]] = []
        fresh: list[dict[str, Any]] = []
        for author in authors:
            start = self.cursors.get(author, 1)
            ops = self.ledger.ops_view(author, start, PAGE)
            for op in ops:
                op.setdefault("author", author)
                earned, spent = money_moved(op, self.me)
                ts = _amount(op.get("ts"))
                if earned or spent:
                    moves.append((ts, earned, spent))
                fresh.append(op)
            if ops:
                self.cursors[author] = int(ops[-1]["seq"]) + 1
        for ts, earned, spent in sorted(moves):
            self.earned += earned
            self.spent += spent
            self.series.append((round(ts, 3), round(self.earned, 6), round(self.spent, 6)))
        if fresh:
            newest = heapq.nlargest(LATEST, fresh, key=lambda op: _amount(op.get("ts")))
            entries = [*self.latest, *map(_entry, newest)]
            self.latest.clear()
            self.latest.extend(sorted(entries, key=lambda e: e["ts"])[-LATEST:])

    async def refresh_lag(self, peers: list[str]) -> None:
        """Ask each live peer which chain lengths it holds; compare with ours."""
        mine = self.ledger.heads_view()
        answers = await asyncio.gather(*(self.ledger.peer_heads(p) for p in peers))
        lag: dict[str, dict[str, int]] = {}
        for peer, theirs in zip(peers, answers, strict=True):
            if theirs is None:
                continue
            authors = set(mine) | set(theirs)
            lag[peer] = {
                "missing_here": sum(max(theirs.get(a, 0) - mine.get(a, 0), 0) for a in authors),
                "missing_there": sum(max(mine.get(a, 0) - theirs.get(a, 0), 0) for a in authors),
            }
        self.lag = lag

    def view(self, balances: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        account = balances.get(self.me, {})
        return {
            "account": {
                "liquid": account.get("liquid", 0.0),
                "bonded": account.get("bonded", 0.0),
                "unbonding": account.get("unbonding", 0.0),
                "barred": bool(account.get("barred", False)),
            },
            "earned": round(self.earned, 6),
            "spent": round(self.spent, 6),
            "series": list(self.series)[-300:],
            "pending": self.ledger.pending_view(),
            "latest": list(reversed(self.latest)),
            "replication": self.lag,
        }
