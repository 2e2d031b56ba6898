"""The real-socket part of gossip_scale.py: N real `wwwserve node` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from wwwserve_gateway.network.genesis import GossipParams, NetworkGenesis, write_genesis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if url.endswith("/peers") else body.decode()


def _poll(check, limit_s: float, every: float = 0.05) -> float | None:
    """Seconds until check() holds, or None after limit_s."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        try:
            if check():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(every)
    return None


def _sent_bytes(url: str) -> float:
    for line in _get(url + "/metrics").splitlines():
        if line.startswith('wwwserve_gossip_events_total{event="sent_bytes"}'):
            return float(line.split()[-1])
    return 0.0


class _Node:
    def __init__(self, workdir: Path, name: str, genesis: Path, bootstrap: list[str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "node": {
                "port": self.port,
                "data_dir": str(workdir / name),
                "network": str(genesis),
                "bootstrap": bootstrap,
                "log_level": "warning",
            },
            "model_list": [],
        }
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wwwserve_gateway", "node", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ.copy(),
        )

    def healthy(self) -> bool:
        return _get(self.url + "/health") is not None

    def view(self) -> dict[str, str]:
        return {p["id"]: p["state"] for p in _get(self.url + "/wwwserve/peers")}


def run_real(n: int = 20, params: GossipParams | None = None, steady_rounds: int = 10) -> dict[str, Any]:
    params = params or GossipParams()
    interval = params.interval_s
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        genesis = workdir / "network.yaml"
        write_genesis(NetworkGenesis(name="bench-real", gossip=params), genesis)
        spawned = time.monotonic()
        seed = _Node(workdir, "node0", genesis, [])
        nodes = [seed] + [_Node(workdir, f"node{i}", genesis, [seed.url]) for i in range(1, n)]
        try:
            if _poll(lambda: all(node.healthy() for node in nodes), 120) is None:
                raise RuntimeError("nodes did not start")
            all_up = time.monotonic()

            def converged() -> bool:
                return all(
                    len(v) == n and all(s == "alive" for s in v.values())
                    for v in (node.view() for node in nodes)
                )

            if _poll(converged, 60 * interval + 30) is None:
                raise RuntimeError("no convergence")
            done = time.monotonic()
            before = sum(_sent_bytes(node.url) for node in nodes)
            time.sleep(steady_rounds * interval)
            steady = (sum(_sent_bytes(node.url) for node in nodes) - before) / n / steady_rounds
            victim = nodes[n // 2]
            victim_id = next(p["id"] for p in _get(victim.url + "/wwwserve/peers") if p["self"])
            victim.proc.send_signal(signal.SIGKILL)
            others = [node for node in nodes if node is not victim]
            detect = _poll(
                lambda: all(node.view().get(victim_id) == "dead" for node in others), 60, every=0.1
            )
        finally:
            for node in nodes:
                node.proc.kill()
                node.proc.wait()
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
