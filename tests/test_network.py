"""Real node processes on loopback form a network by gossip: convergence, failures, leave, security."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import NodeProcess, free_port, wait_until
from wwwserve_gateway.network.genesis import GossipParams, NetworkGenesis, write_genesis

N = 11
# Fast timings so the test runs in seconds; 11 processes share 2 cores, so not too fast.
PARAMS = GossipParams(
    interval_s=0.3, probe_timeout_s=0.25, suspect_timeout_s=1.2, refresh_s=2.0, tombstone_ttl_s=60.0
)


def states_of(nodes: list[NodeProcess], subject: str) -> list[str | None]:
    return [n.peers().get(subject, {}).get("state") for n in nodes]


@pytest.fixture(scope="module")
def genesis_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("net") / "network.yaml"
    write_genesis(NetworkGenesis(name="test-net", gossip=PARAMS), path)
    return path


@pytest.fixture(scope="module")
def network(
    tmp_path_factory: pytest.TempPathFactory, genesis_path: Path, tiny_path: Path
) -> Iterator[list[NodeProcess]]:
    workdir = tmp_path_factory.mktemp("nodes")
    seed = NodeProcess(
        {
            "node": {"network": str(genesis_path)},
            "model_list": [{"model_name": "tiny", "litellm_params": {"model": "llamacpp/tiny-random"}}],
        },
        workdir,
        name="node0",
    )
    seed.start(wait_ready=False)
    nodes = [seed]
    for i in range(1, N):
        config = {"node": {"network": str(genesis_path), "bootstrap": [seed.url]}, "model_list": []}
        nodes.append(NodeProcess(config, workdir, name=f"node{i}").start(wait_ready=False))
    yield nodes
    for node in nodes:
        node.stop(signal.SIGKILL)


def test_all_nodes_converge_with_models_and_load(network: list[NodeProcess]) -> None:
    # How fast: benchmarks/gossip_scale.py (20 real nodes: converged within 5 intervals).
    def converged() -> bool:
        for node in network:
            view = node.peers()
            if len(view) != N or any(p["state"] != "alive" for p in view.values()):
                return False
        return True

    wait_until(converged, interval=0.2, what=f"{N} nodes converged")
    seed_id = network[0].own_id()
    # The seed's model and load summary reached every node.
    wait_until(
        lambda: all([m["name"] for m in n.peers()[seed_id]["models"]] == ["tiny"] for n in network),
        what="models everywhere",
    )
    assert all(n.peers()[seed_id]["load"] is not None for n in network)


def test_kill_9_is_detected_and_restart_rejoins(network: list[NodeProcess]) -> None:
    victim = network[5]
    others = [n for n in network if n is not victim]
    victim_id = victim.own_id()
    old_incarnation = others[0].peers()[victim_id]["incarnation"]
    victim.stop(signal.SIGKILL)
    # How fast: benchmarks/gossip_scale.py (detection time, simulated up to 10,000 nodes and 20 real).
    wait_until(
        lambda: all(s == "dead" for s in states_of(others, victim_id)),
        interval=0.1,
        what="victim dead everywhere",
    )

    victim.start(wait_ready=False)  # same data dir: same identity, same port

    def back() -> bool:
        views = [n.peers().get(victim_id) for n in others]
        return all(
            v is not None and v["state"] == "alive" and v["incarnation"] > old_incarnation for v in views
        )

    wait_until(back, interval=0.2, what="victim alive again with a higher incarnation")
    # No ghost: exactly one entry per id at every node, the victim's included.
    for node in network:
        listing = httpx.get(node.url + "/wwwserve/peers", timeout=5).json()
        assert len({p["id"] for p in listing}) == len(listing)


def test_graceful_leave_removes_a_node_at_once(network: list[NodeProcess]) -> None:
    leaver = network[7]
    others = [n for n in network if n is not leaver]
    leaver_id = leaver.own_id()
    leaver.stop(signal.SIGTERM)
    # Disseminated, not timed out: a node that had declared the leaver dead first would keep it dead
    # (dead and left rank alike at one incarnation), so "left" everywhere means the leave record won.
    wait_until(
        lambda: all(s == "left" for s in states_of(others, leaver_id)),
        interval=0.1,
        what="leave seen everywhere",
    )


def test_node_of_another_network_is_refused(network: list[NodeProcess], tmp_path: Path) -> None:
    other_genesis = tmp_path / "other.yaml"
    write_genesis(NetworkGenesis(name="other-net", gossip=PARAMS), other_genesis)
    config = {"node": {"network": str(other_genesis), "bootstrap": [network[0].url]}, "model_list": []}
    stranger = NodeProcess(config, tmp_path, name="stranger").start(wait_ready=False)
    try:
        stranger_id = stranger.own_id()
        wait_until(
            lambda: "wrong_network" in httpx.get(network[0].url + "/metrics").text,
            what="refusal counted",
        )
        assert stranger_id not in network[0].peers()
        assert [p["id"] for p in httpx.get(stranger.url + "/wwwserve/peers").json()] == [stranger_id]
        assert httpx.get(network[0].url + "/health").status_code == 200
    finally:
        stranger.stop(signal.SIGKILL)


def test_peers_cli(network: list[NodeProcess]) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", "peers", "--url", network[1].url, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    listing = yaml.safe_load(done.stdout)
    assert {p["state"] for p in listing} >= {"alive"}
    table = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", "peers", "--url", network[1].url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "alive" in table.stdout and "tiny" in table.stdout


def test_a_cut_off_node_heals_when_it_returns(network: list[NodeProcess]) -> None:
    """SIGSTOP cuts a node off (its sockets stay open but it answers nothing): the others declare it
    dead. On SIGCONT it learns it was declared dead, refutes with a higher incarnation, and is back."""
    paused = network[3]
    others = [n for n in network if n is not paused and n.proc is not None and n.proc.poll() is None]
    paused_id = paused.own_id()
    before = others[0].peers()[paused_id]["incarnation"]
    assert paused.proc is not None
    paused.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: all(s == "dead" for s in states_of(others, paused_id)),
            interval=0.1,
            what="paused node declared dead",
        )
    finally:
        paused.proc.send_signal(signal.SIGCONT)

    def healed() -> bool:
        views = [n.peers().get(paused_id) for n in others]
        return all(v and v["state"] == "alive" and v["incarnation"] > before for v in views)

    wait_until(healed, interval=0.2, what="partition healed")
    assert len(paused.peers()) >= len(others)


def test_membership_metrics(network: list[NodeProcess]) -> None:
    text = httpx.get(network[0].url + "/metrics").text
    alive = [line for line in text.splitlines() if line.startswith('wwwserve_gossip_members{state="alive"}')]
    assert alive and float(alive[0].split()[-1]) >= 5
    assert "wwwserve_overlay_connections" in text


def test_unreachable_bootstrap_keeps_serving_and_retries(
    genesis_path: Path, tmp_path: Path, llama_tiny
) -> None:
    seed_port = free_port()
    config = {
        "node": {"network": str(genesis_path), "bootstrap": [f"http://127.0.0.1:{seed_port}"]},
        "model_list": [
            {"model_name": "t", "litellm_params": {"model": "llamacpp/t", "api_base": llama_tiny.base_url}}
        ],
    }
    lonely = NodeProcess(config, tmp_path, name="lonely").start()
    seed = None
    try:
        body = {"model": "t", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(lonely.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        assert len(lonely.peers()) == 1
        seed = NodeProcess(
            {"node": {"network": str(genesis_path), "port": seed_port}, "model_list": []},
            tmp_path,
            name="late-seed",
        ).start()
        wait_until(
            lambda: len(lonely.peers()) == 2 and len(seed.peers()) == 2,
            what="joined once the bootstrap appeared",
        )
    finally:
        lonely.stop(signal.SIGKILL)
        if seed is not None:
            seed.stop(signal.SIGKILL)
