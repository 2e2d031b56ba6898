"""The real-socket part of gossip_scale.py: N real `wwwserve node` processes on loopback."""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when imported

from bench_common import BenchNode, http_status, wait_until

from wwwserve_gateway.network.genesis import GossipParams, NetworkGenesis, write_genesis


def seconds_until(check: Callable[[], bool], limit_s: float, every: float = 0.05) -> float | None:
    """Seconds until check() holds (a node not answering yet counts as not), or None after limit_s."""

    def holds() -> bool:
        try:
            return check()
        except OSError:
            return False

    start = time.monotonic()
    try:
        wait_until(holds, limit_s, every)
    except TimeoutError:
        return None
    return time.monotonic() - start


def states(node: BenchNode) -> dict[str, str]:
    return {node_id: p["state"] for node_id, p in node.peers().items()}


def run_real(n: int = 20, params: GossipParams | None = None, steady_rounds: int = 10) -> dict[str, Any]:
    params = params or GossipParams()
    interval = params.interval_s
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        genesis = workdir / "network.yaml"
        write_genesis(NetworkGenesis(name="bench-real", gossip=params), genesis)

        def node(i: int, bootstrap: list[str]) -> BenchNode:
            settings = {"network": str(genesis), "bootstrap": bootstrap, "log_level": "warning"}
            return BenchNode(workdir, f"node{i}", [], **settings)

        spawned = time.monotonic()
        seed = node(0, []).spawn()
        nodes = [seed] + [node(i, [seed.url]).spawn() for i in range(1, n)]
        try:
            if seconds_until(lambda: all(http_status(m.url + "/health") == 200 for m in nodes), 120) is None:
                raise RuntimeError("nodes did not start")
            all_up = time.monotonic()

            def converged() -> bool:
                return all(
                    len(v) == n and all(s == "alive" for s in v.values()) for v in (states(m) for m in nodes)
                )

            if seconds_until(converged, 60 * interval + 30) is None:
                raise RuntimeError("no convergence")
            done = time.monotonic()

            def sent_bytes() -> float:
                return sum(m.metric("wwwserve_gossip_events_total", event="sent_bytes") for m in nodes)

            before = sent_bytes()
            time.sleep(steady_rounds * interval)  # the measured window
            steady = (sent_bytes() - before) / n / steady_rounds
            victim = nodes[n // 2]
            victim_id = victim.own_id()
            victim.stop(signal.SIGKILL)
            others = [m for m in nodes if m is not victim]
            detect = seconds_until(lambda: all(states(m).get(victim_id) == "dead" for m in others), 60, 0.1)
        finally:
            for m in nodes:
                m.stop(signal.SIGKILL)
    converge_s = done - all_up
    return {
        "n": n,
        "interval_s": interval,
        "startup_s": round(all_up - spawned, 2),
        "converge_s_after_all_up": round(converge_s, 2),
        "converge_intervals": round(converge_s / interval, 2),
        "converge_s_from_first_spawn": round(done - spawned, 2),
        "steady_bytes_per_node_round": round(steady, 1),
        "detect_dead_all_s": round(detect, 2) if detect is not None else None,
        "pass_converge_within_5_intervals": converge_s <= 5 * interval,
    }


if __name__ == "__main__":
    print(json.dumps(run_real(), indent=2))
