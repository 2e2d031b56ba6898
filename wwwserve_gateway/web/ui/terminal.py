"""The network in a terminal: `wwwserve peers` (a table, or JSON) and `wwwserve top` (a live view of
the dashboard's snapshot), rendered with rich."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table

COLOURS = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
SHORT = 16


def _id(node_id: str, wide: bool) -> str:
    return node_id if wide else node_id[:SHORT]


def merge_peers(
    peers: list[dict[str, Any]], balances: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each peer of /wwwserve/peers with its account from /wwwserve/ledger/balances."""
    empty = {"liquid": 0.0, "bonded": 0.0, "unbonding": 0.0, "barred": False}
    return [{**p, "account": {**empty, **balances.get(p["id"], {})}} for p in peers]


def peers_table(peers: list[dict[str, Any]], title: str, wide: bool) -> Table:
    table = Table(title=title)
    columns = ["id", "state", "inc", "age s", "models", "running", "waiting", "usage", "stake", "bonded"]
    columns += ["balance", "url"]
    for column in columns:
        table.add_column(column, no_wrap=wide or column in ("id", "url"), overflow="fold")
    for peer in peers:
        load, account = peer.get("load") or {}, peer["account"]
        state = peer["state"]
        table.add_row(
            _id(peer["id"], wide) + (" (self)" if peer.get("self") else ""),
            f"[{COLOURS.get(state, 'white')}]{state}[/]",
            str(peer["incarnation"]),
            f"{peer['age_s']:.1f}",
            ", ".join(m["name"] for m in peer.get("models", [])),
            str(load.get("running", "-")),
            str(load.get("waiting", "-")),
            f"{100 * load.get('usage', 0):.0f}%",
            f"{peer.get('stake') or 0:g}",
            f"{account['bonded']:g}",
            f"{account['liquid']:g}" + (" barred" if account["barred"] else ""),
            peer["url"] or "(operator key needed)",
        )
    return table


def top_view(snap: Mapping[str, Any], url: str) -> Group:
    """One screen of `wwwserve top`: traffic, peers, credits."""
    node = snap["node"]
    points = snap["traffic"]["points"]
    last = points[-1] if points else {}
    totals = snap["traffic"]["totals"]
    ms = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    traffic = Table.grid(padding=(0, 3))
    for _ in range(6):
        traffic.add_column()
    traffic.add_row(
        f"[bold]{last.get('rps', 0):g}[/] req/s",
        f"local {last.get('local', 0):g}",
        f"delegated {last.get('delegated', 0):g}",
        f"for peers {last.get('served_for_peers', 0):g}",
        f"p50 {ms(last.get('p50_ms'))} ms  p95 {ms(last.get('p95_ms'))} ms",
        f"TTFT p50 {ms(last.get('ttft_p50_ms'))} ms",
    )
    traffic.add_row(
        f"{totals['requests']:g} requests",
        f"{totals['delegated']:g} delegated",
        f"{totals['failed']:g} failed",
        f"{totals['served_for_peers']:g} served for peers",
        "",
        "",
    )
    peers = Table(expand=True)
    for column in ("node", "state", "models", "load", "stake", "bonded", "balance", "seen"):
        peers.add_column(column, justify="right" if column in ("stake", "bonded", "balance") else "left")
    for p in snap["network"]["peers"]:
        load = p["load"]
        peers.add_row(
            p["id"][:SHORT] + (" (self)" if p["self"] else ""),
            f"[{COLOURS.get(p['state'], 'white')}]{p['state']}[/]",
            ", ".join(p["models"]),
            f"{load['running']} run {load['waiting']} wait {100 * load['usage']:.0f}%",
            f"{p['stake']:g}",
            f"{p['bonded']:g}",
            f"{p['balance']:g}",
            "-" if p["self"] else f"{p['age_s']:.1f} s",
        )
    credits = snap["credits"]
    pending = credits["pending"]
    money = (
        f"liquid [bold]{credits['account']['liquid']:g}[/]  bonded {credits['account']['bonded']:g}  "
        f"earned [green]{credits['earned']:g}[/]  spent {credits['spent']:g}  "
        f"pending {pending['count']} ({pending['credits']:g} credits)"
    )
    recent = Table(expand=True)
    for column in ("time", "model", "route", "status", "tokens", "latency ms"):
        recent.add_column(column)
    for r in snap["requests"]["recent"][:8]:
        recent.add_row(
            f"{r['started']:.0f}",
            r["model"],
            " > ".join(i[:8] for i in r["route"]),
            str(r["status"]),
            f"{r['prompt_tokens']}/{r['completion_tokens']}",
            f"{r['latency_ms']:.1f}",
        )
    title = (
        f"wwwserve top: {node['id'][:SHORT]} on {node['network_name']} ({url}), up {node['uptime_s']:.0f} s"
    )
    return Group(
        Panel(traffic, title=title, title_align="left"),
        Panel(peers, title=f"peers ({len(snap['network']['peers'])})", title_align="left"),
        Panel(money, title="credits", title_align="left"),
        Panel(recent, title="recent requests", title_align="left"),
    )
