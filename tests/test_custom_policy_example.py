"""examples/custom_policy: a third-party policy registered through the `wwwserve.policies` entry point.

`.ci/run` installs the example (`pip install -e examples/custom_policy`); when it is missing, this
module installs it once so that node processes can load it by its entry-point name.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.fakes.plugins import FakeLedger, build, node_api
from tests.support import REPO, NodeProcess, founding_allocations, no_duels, wait_until
from wwwserve_gateway.network.genesis import GossipParams, LedgerParams, NetworkGenesis, write_genesis
from wwwserve_gateway.plugin_api import POLICY, Account, Decision, Policy, RequestInfo
from wwwserve_gateway.plugin_api.loading import plugin_class

EXAMPLE = REPO / "examples" / "custom_policy"


def _ensure_installed() -> None:
    if importlib.util.find_spec("wwwserve_custom_policy") is not None:
        return
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(EXAMPLE)]
    subprocess.run(pip, check=True)
    # The editable install's path hook is read at interpreter start; node processes get it, this one
    # imports the package from its folder.
    sys.path.insert(0, str(EXAMPLE))


_ensure_installed()

from wwwserve_custom_policy import QuotaPolicy  # noqa: E402

NODE_ID = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_policy(ledger: FakeLedger | None = None, models: tuple[str, ...] = ("m",), **settings: Any):
    backends = [SimpleNamespace(model_name=m) for m in models]
    node = node_api(node_id=NODE_ID, backends=backends, ledger=ledger)
    policy = build(QuotaPolicy, node, **settings)
    clock = Clock()
    policy.clock = clock
    return policy, clock


def app_request(model: str = "m") -> RequestInfo:
    return RequestInfo(id="0" * 32, model=model, endpoint="chat/completions", stream=False, route=())


def peer_request(model: str = "m") -> RequestInfo:
    return RequestInfo(
        id="1" * 32, model=model, endpoint="chat/completions", stream=False, route=("cd" * 32,)
    )


# -- the package ---------------------------------------------------------------------------------


def test_entry_point_resolves_to_the_class() -> None:
    cls = plugin_class(POLICY, "quota")
    assert cls is QuotaPolicy
    assert issubclass(cls, Policy)
    assert plugin_class(POLICY, "wwwserve_custom_policy:QuotaPolicy") is QuotaPolicy


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({}, "requests_per_minute: required key is missing"),
        ({"requests_per_minute": "5"}, "requests_per_minute"),
        ({"requests_per_minute": 0}, "requests_per_minute"),
        ({"requests_per_minute": 5, "window_s": 0}, "window_s"),
        ({"requests_per_minute": 5, "over_quota": "drop"}, "over_quota"),
        ({"requests_per_minute": 5, "bond": -1}, "bond"),
        ({"requests_per_minute": 5, "rpm": 5}, "rpm: unknown key; allowed keys here: bond, over_quota"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match="settings") as info:
        make_policy(**settings)
    assert named in str(info.value)


# -- decisions -----------------------------------------------------------------------------------


def test_serves_locally_until_the_quota_is_used_then_delegates() -> None:
    policy, _ = make_policy(requests_per_minute=3)
    decisions = [policy.decide(app_request()) for _ in range(5)]
    assert decisions == [Decision.LOCAL] * 3 + [Decision.DELEGATE] * 2
    assert policy.remaining() == 0


def test_the_window_slides() -> None:
    policy, clock = make_policy(requests_per_minute=2)
    assert policy.decide(app_request()) is Decision.LOCAL
    clock.now += 30
    assert policy.decide(app_request()) is Decision.LOCAL
    assert policy.decide(app_request()) is Decision.DELEGATE
    clock.now += 30  # the first request leaves the 60 s window, the second is still in it
    assert policy.remaining() == 1
    assert policy.decide(app_request()) is Decision.LOCAL
    assert policy.decide(app_request()) is Decision.DELEGATE
    clock.now += 61
    assert policy.remaining() == 2


def test_custom_window() -> None:
    policy, clock = make_policy(requests_per_minute=1, window_s=5.0)
    assert policy.decide(app_request()) is Decision.LOCAL
    clock.now += 4.9
    assert policy.decide(app_request()) is Decision.DELEGATE
    clock.now += 0.2
    assert policy.decide(app_request()) is Decision.LOCAL


def test_over_quota_reject() -> None:
    policy, _ = make_policy(requests_per_minute=1, over_quota="reject")
    assert policy.decide(app_request()) is Decision.LOCAL
    assert policy.decide(app_request()) is Decision.REJECT


def test_a_model_served_only_by_peers_is_delegated_without_using_the_quota() -> None:
    policy, _ = make_policy(requests_per_minute=1)
    assert policy.decide(app_request("elsewhere")) is Decision.DELEGATE
    assert policy.remaining() == 1


def test_peers_are_accepted_only_under_the_quota_which_apps_share() -> None:
    policy, _ = make_policy(requests_per_minute=2)
    assert policy.accept(peer_request()) is Decision.LOCAL
    assert policy.decide(app_request()) is Decision.LOCAL
    assert policy.accept(peer_request()) is Decision.REJECT
    assert policy.decide(app_request()) is Decision.DELEGATE
    assert policy.accept(peer_request("elsewhere")) is Decision.REJECT


def test_stake_is_offered_only_while_there_is_room() -> None:
    policy, clock = make_policy(requests_per_minute=1, bond=40)
    assert policy.advertised_stake() == 40.0
    policy.decide(app_request())
    assert policy.advertised_stake() == 0.0
    clock.now += 60
    assert policy.advertised_stake() == 40.0
    unbonded, _ = make_policy(requests_per_minute=1)
    assert unbonded.advertised_stake() == 0.0


async def test_start_bonds_only_what_is_missing() -> None:
    ledger = FakeLedger({NODE_ID: Account(1000.0, 30.0)}, owner=NODE_ID)
    policy, _ = make_policy(ledger, requests_per_minute=1, bond=100)
    await policy.start()
    assert ledger.ops == [("bond", {"amount": 70})]
    ledger = FakeLedger({NODE_ID: Account(1000.0, 100.0)}, owner=NODE_ID)
    policy, _ = make_policy(ledger, requests_per_minute=1, bond=100)
    await policy.start()
    assert ledger.ops == []


# -- in a real node ------------------------------------------------------------------------------


def chat(node: NodeProcess, content: str = "Hi") -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return httpx.post(node.url + "/v1/chat/completions", json=body, timeout=60)


def own_record(node: NodeProcess) -> dict[str, Any]:
    return next(p for p in httpx.get(node.url + "/wwwserve/peers", timeout=5).json() if p["self"])


def quota_node(workdir: Path, name: str, settings: dict[str, Any], **node: Any) -> NodeProcess:
    config = {
        "node": node,
        "model_list": [{"model_name": "tiny", "litellm_params": {"model": "llamacpp/tiny-random"}}],
        "policy": {"plugin": "quota", "settings": settings},
    }
    return NodeProcess(config, workdir, name=name)


@pytest.fixture
def workdir(tmp_path: Path, tiny_path: Path) -> Path:
    return tmp_path


def test_a_node_runs_the_quota_policy(workdir: Path) -> None:
    genesis = workdir / "network.yaml"
    write_genesis(
        NetworkGenesis(
            ledger=LedgerParams(allocations=founding_allocations(workdir, ["quota"], 1000), duels=no_duels())
        ),
        genesis,
    )
    node = quota_node(workdir, "quota", {"requests_per_minute": 2, "bond": 10}, network=str(genesis)).start()
    try:
        me = own_record(node)["id"]
        # start() bonded the stake, and the gossiped record offers it while the quota has room.
        balances = wait_until(
            lambda: (
                (b := httpx.get(node.url + "/wwwserve/ledger/balances", timeout=5).json()).get(me)
                and b[me]["bonded"] == 10
                and b
            ),
            30,
            what="bond of 10",
        )
        assert balances[me]["liquid"] == 990
        wait_until(lambda: own_record(node)["stake"] == 10, 30, what="advertised stake 10")
        for _ in range(2):
            resp = chat(node)
            assert resp.status_code == 200, resp.text
            assert resp.json()["object"] == "chat.completion"
        # The quota is used: the node stops offering its stake to the network.
        wait_until(lambda: own_record(node)["stake"] == 0, 30, what="advertised stake 0")
    finally:
        node.stop()


def test_bad_settings_stop_the_node_with_a_message(workdir: Path) -> None:
    node = quota_node(workdir, "bad", {"requests_per_minute": "lots"})
    with pytest.raises(RuntimeError, match="requests_per_minute"):
        node.start(ready_timeout=60)


# -- over the quota (needs delegation) -----------------------------------------------------------


def test_over_quota_reject_answers_429_in_openai_form(workdir: Path) -> None:
    node = quota_node(workdir, "reject", {"requests_per_minute": 1, "over_quota": "reject"}).start()
    try:
        assert chat(node).status_code == 200
        resp = chat(node)
        assert resp.status_code == 429, resp.text
        error = resp.json()["error"]
        assert error["type"] and error["message"]
        assert int(resp.headers["retry-after"]) >= 1
    finally:
        node.stop()


@pytest.fixture
def pair(workdir: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """An entry with a quota of one request and a peer with room and stake, in one network."""
    genesis = workdir / "network.yaml"
    funded = LedgerParams(
        allocations=founding_allocations(workdir, ["entry", "peer"], 1000), duels=no_duels()
    )
    write_genesis(
        NetworkGenesis(name="quota-test", gossip=GossipParams(interval_s=0.3), ledger=funded), genesis
    )
    entry = quota_node(workdir, "entry", {"requests_per_minute": 1}, network=str(genesis)).start()
    peer = quota_node(
        workdir, "peer", {"requests_per_minute": 100, "bond": 50}, network=str(genesis), bootstrap=[entry.url]
    )
    try:
        peer.start()
        yield entry, peer
    finally:
        peer.stop()
        entry.stop()


def test_a_request_over_the_quota_is_delegated(pair: tuple[NodeProcess, NodeProcess]) -> None:
    entry, peer = pair
    entry_id, peer_id = own_record(entry)["id"], own_record(peer)["id"]

    def peer_offers_stake() -> bool:
        known = {p["id"]: p for p in httpx.get(entry.url + "/wwwserve/peers", timeout=5).json()}
        balances = httpx.get(entry.url + "/wwwserve/ledger/balances", timeout=5).json()
        offer = known.get(peer_id, {})
        return (
            offer.get("state") == "alive"
            and (offer.get("stake") or 0) > 0
            and (balances.get(peer_id, {}).get("bonded", 0) > 0)
        )

    wait_until(peer_offers_stake, 60, interval=0.2, what="the entry sees the peer's stake")
    first = chat(entry)
    assert first.status_code == 200, first.text
    assert first.headers["x-wwwserve-route"] == entry_id
    second = chat(entry)
    assert second.status_code == 200, second.text
    assert second.headers["x-wwwserve-route"] == f"{entry_id},{peer_id}"
    assert "x-wwwserve-receipt" in second.headers
