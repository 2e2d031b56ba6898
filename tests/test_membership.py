"""The SWIM membership core in the deterministic simulator: convergence, failure detection,
rejoin, leave, partitions, forged records and garbage input."""

from __future__ import annotations

import math
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulation.gossip import SimNetwork
from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import GossipParams
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugins.gossip.member_table import ALIVE, DEAD, LEFT, SUSPECT, Entry, MemberTable
from wwwserve_gateway.plugins.gossip.membership import Membership, alive_body

PARAMS = GossipParams(
    interval_s=1.0,
    probe_timeout_s=0.5,
    suspect_timeout_s=3.0,
    refresh_s=10.0,
    tombstone_ttl_s=60.0,
    sync_every_rounds=5,
)
N = 20
# Detection: the dead node is probed within a few rounds, suspected one round later, declared dead
# suspect_timeout_s after that, and the news spreads in O(log N) rounds.
DEATH_BOUND_ROUNDS = (
    4 + 1 + math.ceil(PARAMS.suspect_timeout_s / PARAMS.interval_s) + 2 * math.ceil(math.log2(N))
)


def converged(n: int = N, params: GossipParams = PARAMS, **kwargs: Any) -> SimNetwork:
    net = SimNetwork.converged(n, params, seed=kwargs.pop("seed", 7), **kwargs)
    net.run(3)
    return net


def states(net: SimNetwork, subject: str, among: list[str] | None = None) -> set[str | None]:
    ids = among if among is not None else [i for i in net.live() if i != subject]
    out: set[str | None] = set()
    for i in ids:
        view = net.nodes[i].member(subject)
        out.add(view.state if view else None)
    return out


def everyone_sees_everyone_alive(net: SimNetwork) -> bool:
    live = net.live()
    return all(sorted([*net.nodes[i].alive_ids(), i]) == sorted(live) for i in live)


def gossip(node: Membership, sender: str, *records: dict[str, Any]) -> None:
    node.receive(sender, {"type": "gossip", "u": list(records)})


def test_twenty_nodes_converge_from_one_seed() -> None:
    net = SimNetwork(PARAMS, seed=3)
    seed = net.add_node()
    for _ in range(N - 1):
        net.add_node(seeds=[seed])
    rounds = net.run_until(lambda: everyone_sees_everyone_alive(net), max_rounds=30)
    assert rounds is not None, "20 nodes did not converge in 30 rounds"
    assert rounds <= 2 * math.log2(N)
    for node in net.nodes.values():
        assert node.stats["rejected.bad-signature"] == 0
        assert {m.state for m in node.members()} == {ALIVE}


def test_changed_record_reaches_everyone() -> None:
    # No periodic refresh here, so that this one update is all there is to relay.
    net = converged(params=PARAMS.model_copy(update={"refresh_s": 1e6}))
    node = net.nodes[net.live()[0]]
    node.set_own_fields({"models": [{"name": "m", "context_length": 4096, "price": 0.1}], "stake": 5})
    own = node.member(node.id)
    assert own is not None
    rounds = net.run_until(
        lambda: net.fraction(net.knows(node.id, own.incarnation, own.heartbeat)) == 1.0, 20
    )
    assert rounds is not None and rounds <= 2 * math.log2(N)
    for other in net.nodes.values():
        view = other.member(node.id)
        assert view is not None and view.record["stake"] == 5 and view.record["models"][0]["name"] == "m"
    # The update stops being relayed: every queue drains, and then nothing but probes and syncs flow.
    net.run_until(lambda: all(n.pending == 0 for n in net.nodes.values()), 40)
    assert all(n.pending == 0 for n in net.nodes.values())
    before = {i: dict(n.stats) for i, n in net.nodes.items()}
    net.run(PARAMS.sync_every_rounds)
    for i, n in net.nodes.items():
        assert n.stats["sent.gossip"] == before[i].get("sent.gossip", 0)
        assert n.stats["updates.applied"] == before[i].get("updates.applied", 0)


def test_anti_entropy_alone_repairs_a_missed_update() -> None:
    net = converged(params=PARAMS.model_copy(update={"refresh_s": 1e6}))
    node = net.nodes[net.live()[0]]
    node.set_own_fields({"stake": 42})
    node.drop_pending()  # as if every piggybacked copy had been lost: only syncs can carry it
    own = node.member(node.id)
    assert own is not None
    knows = net.knows(node.id, own.incarnation, own.heartbeat)
    rounds = net.run_until(lambda: net.fraction(knows) == 1.0, 12 * PARAMS.sync_every_rounds)
    assert rounds is not None
    pushes = sum(n.stats["recv.sync-push"] for n in net.nodes.values())
    assert pushes > 0 and all(n.stats["sent.gossip"] == 0 for n in net.nodes.values())


def test_killed_node_becomes_suspect_then_dead() -> None:
    net = converged()
    victim = net.live()[5]
    net.kill(victim)
    seen: list[set[str | None]] = []
    rounds = net.run_until(lambda: seen.append(states(net, victim)) or seen[-1] == {DEAD}, DEATH_BOUND_ROUNDS)
    assert rounds is not None, f"not everyone marked the dead node dead in {DEATH_BOUND_ROUNDS} rounds"
    assert any(SUSPECT in s for s in seen), "the node went dead without being suspected first"
    assert victim not in net.nodes[net.live()[0]].alive_ids()


def test_detection_also_works_when_ticked_once_per_round() -> None:
    # The overlay driver may tick only every interval_s: indirect probes then go one round later.
    net = converged(mid_round_tick=False)
    victim = net.live()[2]
    net.kill(victim)
    rounds = net.run_until(lambda: states(net, victim) == {DEAD}, DEATH_BOUND_ROUNDS + 2)
    assert rounds is not None


def test_restart_rejoins_with_higher_incarnation_and_old_record_is_no_ghost() -> None:
    net = converged()
    live = net.live()
    victim, seed, witness = live[4], live[0], net.nodes[live[1]]
    old = net.nodes[victim]
    old_view = old.member(victim)
    assert old_view is not None
    net.kill(victim)
    assert net.run_until(lambda: states(net, victim) == {DEAD}, DEATH_BOUND_ROUNDS) is not None

    # A stale copy of the old incarnation (even with a higher heartbeat) must not resurrect it.
    old.set_own_fields({"stake": 1})
    ghost = old._table.get(victim).alive  # type: ignore[union-attr]
    stale_before = witness.stats["updates.stale"]
    gossip(witness, seed, ghost)
    assert witness.member(victim).state == DEAD  # type: ignore[union-attr]
    assert witness.stats["updates.stale"] == stale_before + 1

    net.run(2)
    fresh = net.restart(victim, seeds=[seed])
    assert fresh.incarnation > old_view.incarnation
    rounds = net.run_until(lambda: states(net, victim) == {ALIVE}, 20)
    assert rounds is not None
    assert all(net.nodes[i].member(victim).incarnation == fresh.incarnation for i in net.live())  # type: ignore[union-attr]
    assert everyone_sees_everyone_alive(net)


def test_tombstone_expires_after_ttl() -> None:
    net = converged()
    victim = net.live()[3]
    net.kill(victim)
    assert net.run_until(lambda: states(net, victim) == {DEAD}, DEATH_BOUND_ROUNDS) is not None
    rounds = net.run_until(lambda: states(net, victim) == {None}, int(PARAMS.tombstone_ttl_s) + 5)
    assert rounds is not None


def test_graceful_leave_removes_the_node_at_once() -> None:
    net = converged()
    leaver = net.live()[6]
    net.deliver(leaver, net.nodes[leaver].leave())
    seen: list[set[str | None]] = []
    rounds = net.run_until(
        lambda: seen.append(states(net, leaver)) or seen[-1] == {LEFT}, 2 * math.ceil(math.log2(N))
    )
    assert rounds is not None
    assert not any(SUSPECT in s or DEAD in s for s in seen), "a departed node must not go through suspicion"
    net.kill(leaver)  # it has gone: nothing it says is heard, and nobody accuses it
    net.run(10)
    assert states(net, leaver) == {LEFT}


def test_partition_heals_after_reconnection() -> None:
    net = converged()
    live = net.live()
    halves = {node_id: i % 2 for i, node_id in enumerate(live)}
    net.partition(halves)
    other_half_dead = lambda: all(  # noqa: E731
        states(net, j, [i]) == {DEAD} for i in live for j in live if halves[i] != halves[j]
    )
    assert net.run_until(other_half_dead, 40) is not None, "the halves never declared each other dead"
    net.partition(None)
    rounds = net.run_until(lambda: everyone_sees_everyone_alive(net), 80)
    assert rounds is not None, "the partition did not heal"


def test_no_false_deaths_under_message_loss() -> None:
    # 10% of messages lost: some probes fail even through the indirect path, the suspects refute.
    net = converged(n=30, loss=0.1)
    net.run(60)
    for node in net.nodes.values():
        assert {m.state for m in node.members()} <= {ALIVE, SUSPECT}
    assert sum(node.stats["refutes"] for node in net.nodes.values()) > 0


def test_forged_records_are_rejected_and_counted() -> None:
    net = converged(n=5)
    a, b, c = (net.nodes[i] for i in net.live()[:3])
    target = b.member(a.id)
    assert target is not None
    body = alive_body(a.id, "sim://evil", target.incarnation, target.heartbeat + 10, 0, {})
    mallory = NodeIdentity.generate()

    # A's record with a bad signature.
    gossip(b, c.id, {"body": body, "sig": "00" * 64})
    # A's record signed by someone else (a record claiming another author).
    gossip(b, c.id, {"body": body, "sig": mallory.sign(canonical(body)).hex()})
    # A valid signature over different bytes (the body was changed after signing).
    signed = a.identity.sign_record(alive_body(a.id, a.url, target.incarnation, target.heartbeat + 10, 0, {}))
    gossip(b, c.id, {"body": {**signed["body"], "url": "sim://evil"}, "sig": signed["sig"]})
    # An accusation that names c as its author, signed by mallory.
    accusation = {
        "kind": DEAD,
        "id": c.id,
        "subject": a.id,
        "incarnation": target.incarnation,
        "ts": int(net.wall()),
    }
    gossip(b, c.id, {"body": accusation, "sig": mallory.sign(canonical(accusation)).hex()})

    assert b.stats["rejected.bad-signature"] == 4
    after = b.member(a.id)
    assert after is not None and after.state == ALIVE and after.url == target.url
    assert after.heartbeat == target.heartbeat


def accusation(accuser: Membership, subject: str, incarnation: int, kind: str = SUSPECT) -> dict[str, Any]:
    body = {"kind": kind, "id": accuser.id, "subject": subject, "incarnation": incarnation, "ts": 0}
    return accuser.identity.sign_record(body)


def test_an_accusation_alone_changes_nobodys_view_and_the_subject_refutes() -> None:
    """One member's word is a hint: the others check the accused themselves and keep it alive."""
    net = converged()
    live = net.live()
    accuser, subject = net.nodes[live[1]], net.nodes[live[2]]
    before = subject.incarnation
    for kind in (SUSPECT, DEAD):
        signed = accusation(accuser, subject.id, before, kind)
        for i in live[3:]:
            gossip(net.nodes[i], accuser.id, signed)
        assert states(net, subject.id, live[3:]) == {ALIVE}
        assert all(net.nodes[i].stats["confirms"] >= 1 for i in live[3:])
    gossip(subject, accuser.id, accusation(accuser, subject.id, before))
    assert subject.incarnation == before + 1 and subject.stats["refutes"] == 1
    rounds = net.run_until(
        lambda: all(
            net.nodes[i].member(subject.id).incarnation == subject.incarnation
            for i in live  # type: ignore[union-attr]
        ),
        10,
    )
    assert rounds is not None
    assert states(net, subject.id) == {ALIVE}


def test_an_accusation_citing_an_incarnation_never_signed_is_refused() -> None:
    """The eviction attack: a dead record at the largest incarnation the protocol carries would need
    a refutation above it, which no node can sign. It is refused everywhere, the victim included."""
    net = converged()
    live = net.live()
    attacker, victim = net.nodes[live[1]], net.nodes[live[2]]
    before = victim.incarnation
    forged = accusation(attacker, victim.id, 2**62 - 1, DEAD)
    for i in live[2:]:
        gossip(net.nodes[i], attacker.id, forged)
    assert victim.incarnation == before and victim.stats["refutes"] == 0
    assert all(net.nodes[i].stats["rejected.uncited"] == 1 for i in live[2:])
    net.run(10)
    assert states(net, victim.id) == {ALIVE}


def test_refutations_are_rate_limited() -> None:
    net = converged()
    live = net.live()
    attacker, victim = net.nodes[live[1]], net.nodes[live[2]]
    before = victim.incarnation
    for _ in range(20):  # re-accused at each new incarnation, within one round
        gossip(victim, attacker.id, accusation(attacker, victim.id, victim.incarnation))
    assert victim.incarnation == before + 1 and victim.stats["refutes"] == 1


def test_a_member_is_declared_dead_by_each_node_after_its_own_probes() -> None:
    net = converged()
    victim = net.live()[3]
    net.kill(victim)
    rounds = net.run_until(lambda: states(net, victim, [i for i in net.live()]) == {DEAD}, 30)
    assert rounds is not None
    # Every survivor checked for itself: its own accusation, not a relayed one, made it dead.
    for i in net.live():
        entry = net.nodes[i]._table.get(victim)
        assert entry is not None and entry.accusation["body"]["id"] == net.nodes[i].id


class Recorder:
    def __init__(self, value: int) -> None:
        self.value = value
        self.seen: dict[str, dict[str, Any]] = {}

    def local_state(self) -> dict[str, Any]:
        return {"head": self.value}

    def merge_remote_state(self, peer_id: str, digest: dict[str, Any]) -> None:
        self.seen[peer_id] = digest


class Broken:
    def local_state(self) -> dict[str, Any]:
        raise RuntimeError("boom")

    def merge_remote_state(self, peer_id: str, digest: dict[str, Any]) -> None:
        raise RuntimeError("boom")


def test_delegate_digests_ride_on_syncs() -> None:
    net = converged(n=8)
    recorders = {}
    for k, node_id in enumerate(net.live()):
        recorders[node_id] = Recorder(k)
        net.nodes[node_id].add_delegate("ledger", recorders[node_id])
        net.nodes[node_id].add_delegate("broken", Broken())
    net.run(3 * PARAMS.sync_every_rounds)
    for node_id, recorder in recorders.items():
        assert recorder.seen, f"{node_id[:8]} got no digest"
        for peer, digest in recorder.seen.items():
            assert digest == {"head": recorders[peer].value}
    assert all(net.nodes[i].stats["delegate_errors"] > 0 for i in net.live())


def test_overlay_table_hashes_match_a_plain_table() -> None:
    rng = random.Random(1)
    ids = [f"{rng.getrandbits(256):064x}" for _ in range(300)]
    entries = {i: Entry(ALIVE, 1, rng.randrange(5), None, None, 0.0, 0.0) for i in ids}
    base = MemberTable()
    for i in ids[:200]:
        base.put(i, entries[i])
    overlay, plain = MemberTable(base), MemberTable()
    for i in ids[:200]:
        plain.put(i, entries[i])
    for i in ids[200:]:
        overlay.put(i, entries[i])
        plain.put(i, entries[i])
    for i in ids[::7]:
        overlay.remove(i)
        plain.remove(i)
    changed = Entry(DEAD, 2, 0, None, None, 1.0, 1.0)
    overlay.put(ids[1], changed)
    plain.put(ids[1], changed)
    assert overlay.bucket_hashes() == plain.bucket_hashes()
    assert sorted(overlay.ids()) == sorted(plain.ids())
    assert len(overlay) == len(plain) and overlay.count(DEAD) == plain.count(DEAD) == 1
    picked = {overlay.random_id(rng, lambda _i, e: e.state == ALIVE) for _ in range(200)}
    assert picked <= set(plain.ids()) and ids[1] not in picked


# -- garbage in -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
TYPES = ["ping", "ack", "ping-req", "gossip", "sync", "sync-reply", "sync-push", "nope"]
hexid = st.text("0123456789abcdef", min_size=64, max_size=64)
record_like = st.fixed_dictionaries(
    {
        "body": st.fixed_dictionaries(
            {"kind": st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT, "x"]), "id": hexid},
            optional={
                "incarnation": st.integers(),
                "heartbeat": st.integers(),
                "url": st.text(max_size=10),
                "subject": hexid,
                "ts": st.integers() | st.floats(allow_nan=False),
            },
        ),
        "sig": st.text("0123456789abcdef", min_size=128, max_size=128),
    }
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)},
    optional={
        "seq": json_values,
        "target": json_values | hexid,
        "u": st.lists(record_like | json_values, max_size=4) | json_values,
        "r": st.lists(record_like | json_values, max_size=4) | json_values,
        "b": st.lists(st.integers(), max_size=4) | json_values,
        "v": st.lists(
            st.tuples(hexid, st.sampled_from("asdlx"), st.integers(), st.integers()).map(list) | json_values,
            max_size=4,
        )
        | json_values,
        "w": st.lists(hexid | json_values, max_size=4) | json_values,
        "h": json_values,
        "d": json_values,
    },
)

_FUZZ_NET = converged(n=4, seed=11)
_FUZZ_NODE = _FUZZ_NET.nodes[_FUZZ_NET.live()[0]]
_FUZZ_SENDER = _FUZZ_NET.live()[1]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages | json_values, sender=st.sampled_from([_FUZZ_SENDER, "", "zz", _FUZZ_NODE.id]))
def test_receive_never_raises_on_garbage(message: Any, sender: str) -> None:
    node = _FUZZ_NODE
    out = node.receive(sender, message)
    assert isinstance(out, list)
    assert node.stats["rejected.error"] == 0, "an input reached an unexpected exception"
    # The node still works: it knows its peers and answers a ping.
    assert node.member(node.id) is not None and node.member(node.id).state == ALIVE  # type: ignore[union-attr]


def test_garbage_is_counted() -> None:
    net = converged(n=3)
    node, sender = net.nodes[net.live()[0]], net.live()[1]
    for junk in [None, 3, "x", [], {"type": 5}, {"no": "type"}]:
        assert node.receive(sender, junk) == []  # type: ignore[arg-type]
    assert node.stats["rejected.malformed-message"] == 6
    node.receive(sender, {"type": "gossip", "u": [{"body": {}, "sig": "x"}, 7, {"a": 1, "b": 2}]})
    assert node.stats["rejected.malformed"] == 3
    node.receive(sender, {"type": "launch-missiles"})
    assert node.stats["rejected.unknown-type"] == 1
    node.receive("not-an-id", {"type": "ping", "seq": 1})
    assert node.stats["rejected.bad-sender"] == 1
    node.receive(sender, {"type": "sync", "h": "AAAA"})
    assert node.stats["rejected.malformed-message"] == 7


def test_a_leave_can_only_come_from_the_leaver() -> None:
    """A leave record is its author's own goodbye: one signed by another key says only that the
    signer left, and a leave forged in the victim's name fails its signature."""
    net = converged()
    live = net.live()
    attacker, victim, observer = (net.nodes[i] for i in live[1:4])
    entry = observer.member(victim.id)
    assert entry is not None
    body = {"kind": LEFT, "id": victim.id, "incarnation": entry.incarnation, "ts": int(net.wall())}
    forged = {"body": body, "sig": attacker.identity.sign(canonical(body)).hex()}
    gossip(observer, attacker.id, forged)
    assert observer.stats["rejected.bad-signature"] == 1
    assert observer.member(victim.id).state == ALIVE  # type: ignore[union-attr]


def test_records_of_an_earlier_life_are_ignored_after_a_restart() -> None:
    """Replayed after a restart, the old alive record and an accusation citing the old incarnation
    change nothing: the new incarnation wins."""
    net = converged()
    live = net.live()
    attacker, victim, observer = (net.nodes[i] for i in live[1:4])
    old_record = victim._table.get(victim.id).alive  # type: ignore[union-attr]
    old = victim.incarnation
    old_accusation = accusation(attacker, victim.id, old)
    net.restart(live[2], [live[0]])
    restarted = net.nodes[live[2]]
    assert restarted.incarnation > old
    net.run_until(lambda: observer.member(victim.id).incarnation == restarted.incarnation, 20)  # type: ignore[union-attr]
    gossip(observer, attacker.id, old_record, old_accusation)
    view = observer.member(victim.id)
    assert view is not None and view.state == ALIVE and view.incarnation == restarted.incarnation
    assert observer.stats["updates.stale"] >= 2
