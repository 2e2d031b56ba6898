"""Gossip at scale: the real membership state machine over a simulated transport (no sockets).

    python benchmarks/gossip_scale.py [--quick] [--out DIR]

For N = 10, 100, 1,000 and 10,000 nodes (--quick: up to 1,000), starting from a converged network:

  dissemination  one node changes its record: rounds until 99% (and 100%) of nodes hold it
  bytes          bytes sent per node per round in steady state, and during that dissemination
                 (from the change until every node has stopped relaying it)
  detection      one node is killed: virtual seconds until 99% of the live nodes mark it dead

The same scenarios run for the reference design, whose nodes send their full peer list to every
peer every round (simulated up to N = 1,000; at 10,000 its bytes are computed from the measured
size of a record). Records carry what a provider advertises (models, load, stake) and are signed.

Steady state here means static records: `refresh_s` is set beyond the run, so the numbers are the
protocol's own cost. Periodic republication of every record (every refresh_s, the genesis default)
is measured separately ("refresh"): N/refresh_s new records a second reach every node, so its
cost per node grows with N whatever the protocol; it is reported, not part of the flat target.

Targets: 99% dissemination within 2*log2(N) rounds at fanout 3; steady bytes per node per round
within +-20% from N = 100 to N = 10,000 (--quick: to 1,000). Writes gossip_scale.json and
gossip_scale.png to --out (default benchmarks/results/). All times are virtual; all runs seeded.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# bench_common, also when imported (importing it puts the repository root on sys.path: simulation/, tests/)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from bench_common import bench_parser, machine_info, progress_bar, pyplot, save_figure, verdict, versions
from gossip_real import run_real
from rich.console import Console
from rich.table import Table

from simulation.gossip import FullListNetwork, SimNetwork, sample_fields
from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import GossipParams
from wwwserve_gateway.plugins.gossip.member_table import DEAD, SUSPECT

SEED = 2024
FULL_SIZES = [10, 100, 1000, 10_000]
QUICK_SIZES = [10, 100, 1000]
REFERENCE_MAX_N = 1000  # beyond it the reference's lists (N records to N peers) are computed, not sent
WARMUP_ROUNDS = 2
FLAT_TOLERANCE = 0.20
STATIC = 1e9  # refresh_s for the protocol runs: no periodic republication within the run

console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def protocol_params() -> GossipParams:
    return GossipParams(refresh_s=STATIC)


def per_node_round(total: int, nodes: int, rounds: int) -> float:
    return total / max(1, nodes) / max(1, rounds)


# -- SWIM (the real state machine) --------------------------------------------------------------------
def run_swim(n: int, params: GossipParams) -> dict[str, Any]:
    started = time.perf_counter()
    net = SimNetwork.converged(n, params, seed=SEED)
    build_s = time.perf_counter() - started
    net.run(WARMUP_ROUNDS)

    # Steady state: one full sync cycle, so every node's sync is in the window exactly once.
    window = params.sync_every_rounds
    first = len(net.round_bytes)
    by_type_before = dict(net.bytes_by_type)
    net.run(window)
    steady_bytes = sum(net.round_bytes[first:])
    steady_msgs = sum(net.round_messages[first:])
    steady_by_type = {
        k: per_node_round(v - by_type_before.get(k, 0), n, window)
        for k, v in sorted(net.bytes_by_type.items())
    }

    # Dissemination of one changed record.
    ids = net.live()
    changer = net.nodes[ids[0]]
    changer.set_own_fields({**sample_fields(0), "load": {"running": 3, "waiting": 1, "usage": 0.7}})
    own = changer.member(changer.id)
    assert own is not None
    knows = net.knows(changer.id, own.incarnation, own.heartbeat)
    first = len(net.round_bytes)
    by_type_before = dict(net.bytes_by_type)
    curve: list[float] = []
    rounds_99 = rounds_all = None
    limit = 4 * math.ceil(math.log2(n)) + 20
    for r in range(1, limit + 1):
        net.step()
        curve.append(net.fraction(knows))
        if rounds_99 is None and curve[-1] >= 0.99:
            rounds_99 = r
        if rounds_all is None and curve[-1] >= 1.0:
            rounds_all = r
        if rounds_all is not None and all(node.pending == 0 for node in net.nodes.values()):
            break
    diss_rounds = len(net.round_bytes) - first
    diss_bytes = sum(net.round_bytes[first:])
    diss_by_type = {
        k: per_node_round(v - by_type_before.get(k, 0), n, diss_rounds)
        for k, v in sorted(net.bytes_by_type.items())
    }

    # Failure detection.
    victim = ids[n // 2]
    net.kill(victim)
    killed_at = net.now
    others = [i for i in net.live() if i != victim]
    first_suspect_s = detect_s = None
    for _ in range(60):
        net.step()
        if first_suspect_s is None and net.fraction(net.sees_state(victim, SUSPECT, DEAD), others) > 0:
            first_suspect_s = net.now - killed_at
        if net.fraction(net.sees_state(victim, DEAD), others) >= 0.99:
            detect_s = net.now - killed_at
            break
    rejected = sum(
        v for node in net.nodes.values() for k, v in node.stats.items() if k.startswith("rejected.")
    )
    return {
        "n": n,
        "rounds_to_99": rounds_99,
        "rounds_to_100": rounds_all,
        "dissemination_curve": curve,
        "bytes_per_node_round_steady": per_node_round(steady_bytes, n, window),
        "messages_per_node_round_steady": per_node_round(steady_msgs, n, window),
        "steady_bytes_by_type": steady_by_type,
        "bytes_per_node_round_dissemination": per_node_round(diss_bytes, n, diss_rounds),
        "dissemination_bytes_by_type": diss_by_type,
        "dissemination_window_rounds": diss_rounds,
        "first_suspect_s": first_suspect_s,
        "detect_dead_99_s": detect_s,
        "rejected_updates": rejected,
        "build_s": round(build_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
    }


# -- the reference design -----------------------------------------------------------------------------
def run_reference(n: int, params: GossipParams) -> dict[str, Any]:
    started = time.perf_counter()
    net = FullListNetwork(n, params, fail_after_s=params.suspect_timeout_s, seed=SEED)
    for _ in range(WARMUP_ROUNDS):
        net.step()
    first = len(net.round_bytes)
    window = 3
    for _ in range(window):
        net.step()
    steady = per_node_round(sum(net.round_bytes[first:]), n, window)
    record_bytes = float(np.mean([len(canonical(r)) for r in net.records]))

    # A changed record is in every list the next round: count the rounds until 99% hold it.
    changer = 0
    version = int(net.heartbeat[changer]) + 1
    rounds_99 = None
    for r in range(1, 10):
        net.step()
        if float((net.known[:, changer] >= version).mean()) >= 0.99:
            rounds_99 = r
            break

    victim = n // 2
    net.kill(victim)
    killed_at = net.now
    detect_s = None
    for _ in range(60):
        net.step(resign=False)
        if net.fraction_dead(victim) >= 0.99:
            detect_s = net.now - killed_at
            break
    return {
        "n": n,
        "analytic": False,
        "rounds_to_99": rounds_99,
        "bytes_per_node_round_steady": steady,
        "bytes_per_node_round_dissemination": steady,  # the same lists flow whatever changes
        "record_bytes": record_bytes,
        "list_bytes": net.list_bytes,
        "detect_dead_99_s": detect_s,
        "wall_s": round(time.perf_counter() - started, 3),
    }


def reference_analytic(n: int, measured: dict[str, Any], params: GossipParams) -> dict[str, Any]:
    """N-1 lists a round, each N records of the measured mean size plus the JSON list's commas."""
    list_bytes = n * measured["record_bytes"] + (n - 1) + 2
    per_node = (n - 1) * list_bytes
    return {
        "n": n,
        "analytic": True,
        "rounds_to_99": measured["rounds_to_99"],  # every list reaches every node in the next round
        "bytes_per_node_round_steady": per_node,
        "bytes_per_node_round_dissemination": per_node,
        "record_bytes": measured["record_bytes"],
        "list_bytes": list_bytes,
        "detect_dead_99_s": measured["detect_dead_99_s"],  # a heartbeat timeout: independent of N
        "wall_s": 0.0,
    }


# -- periodic republication ---------------------------------------------------------------------------
def run_refresh(n: int, rounds: int) -> dict[str, Any]:
    """Steady state with every record republished every refresh_s (the genesis default)."""
    params = GossipParams()
    started = time.perf_counter()
    net = SimNetwork.converged(n, params, seed=SEED)
    net.run(int(params.refresh_s))  # let the first (jittered) republications start
    first = len(net.round_bytes)
    net.run(rounds)
    measured = per_node_round(sum(net.round_bytes[first:]), n, rounds)
    signed_bytes = float(
        np.mean([signed_record_bytes(node.member(node.id).record) for node in net.nodes.values()])
    )  # type: ignore[union-attr]
    ages = [m.age_s for m in net.nodes[net.live()[0]].members()]
    return {
        "n": n,
        "refresh_s": params.refresh_s,
        "bytes_per_node_round": measured,
        # Each node must receive each republished record at least once: N * interval/refresh_s of them.
        "signed_record_bytes": signed_bytes,
        "lower_bound_bytes_per_node_round": refresh_lower_bound(n, signed_bytes, params),
        "max_age_s": max(ages),
        "wall_s": round(time.perf_counter() - started, 3),
    }


def signed_record_bytes(body: Any) -> int:
    return len(canonical({"body": dict(body), "sig": "0" * 128}))


def refresh_lower_bound(n: int, signed_record_bytes: float, params: GossipParams) -> float:
    return n * params.interval_s / params.refresh_s * signed_record_bytes


# -- verdicts, output ---------------------------------------------------------------------------------
def evaluate(swim: dict[int, dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    dissemination = {}
    for n, res in swim.items():
        bound = 2 * math.log2(n)
        r = res["rounds_to_99"]
        dissemination[str(n)] = {"rounds": r, "bound": round(bound, 2), "pass": r is not None and r <= bound}
    lo, hi = 100, sizes[-1]
    base = swim[lo]["bytes_per_node_round_steady"]
    ratio = swim[hi]["bytes_per_node_round_steady"] / base
    spread = {str(n): round(swim[n]["bytes_per_node_round_steady"] / base, 4) for n in sizes if n >= lo}
    worst = max(abs(v - 1) for v in spread.values())
    return {
        "dissemination_within_2log2N": dissemination,
        "flat_bytes": {
            "from_n": lo,
            "to_n": hi,
            "ratio": round(ratio, 4),
            "ratios_to_n100": spread,
            "tolerance": FLAT_TOLERANCE,
            "pass": worst <= FLAT_TOLERANCE,
        },
    }


def human_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def print_tables(report: dict[str, Any]) -> None:
    targets = report["targets"]
    table = Table(title="Gossip at scale (virtual time; bytes = canonical JSON of each message)")
    for col in ("design", "N", "rounds→99%", "≤2·log2N", "B/node/round", "disseminating", "dead@99% s"):
        table.add_column(col, justify="right")
    for n, res in report["swim"].items():
        d = targets["dissemination_within_2log2N"][n]
        table.add_row(
            "SWIM",
            f"{int(n):,}",
            str(res["rounds_to_99"]),
            f"{d['bound']:.1f} {verdict(d['pass'])}",
            human_bytes(res["bytes_per_node_round_steady"]),
            human_bytes(res["bytes_per_node_round_dissemination"]),
            f"{res['detect_dead_99_s']}",
        )
    for n, res in report["reference"].items():
        table.add_row(
            "full lists" + ("*" if res["analytic"] else ""),
            f"{int(n):,}",
            str(res["rounds_to_99"]),
            "",
            human_bytes(res["bytes_per_node_round_steady"]),
            human_bytes(res["bytes_per_node_round_dissemination"]),
            f"{res['detect_dead_99_s']}",
        )
    console.print(table)
    if any(res["analytic"] for res in report["reference"].values()):
        console.print("* computed from the measured record size, not simulated")
    flat = targets["flat_bytes"]
    console.print(
        f"steady bytes/node/round, N={flat['to_n']} vs N={flat['from_n']}: x{flat['ratio']:.3f} "
        f"(all ratios {flat['ratios_to_n100']}; tolerance ±{flat['tolerance']:.0%}) {verdict(flat['pass'])}"
    )
    real = report["real_sockets"]
    console.print(
        f"real sockets, {real['n']} nodes, interval {real['interval_s']:g} s: converged "
        f"{real['converge_s_after_all_up']} s ({real['converge_intervals']} intervals) after all were up "
        f"{verdict(real['pass_converge_within_5_intervals'])}; steady {human_bytes(real['steady_bytes_per_node_round'])}"
        f"/node/round; kill -9 marked dead everywhere after {real['detect_dead_all_s']} s"
    )
    if report["refresh"]:
        t = Table(title="SWIM with every record republished every refresh_s (outside the flat target)")
        for col in ("N", "B/node/round", "lower bound, any protocol", "max age s"):
            t.add_column(col, justify="right")
        for n, res in report["refresh"].items():
            t.add_row(
                n,
                human_bytes(res["bytes_per_node_round"]) if res["bytes_per_node_round"] is not None else "-",
                human_bytes(res["lower_bound_bytes_per_node_round"]),
                f"{res['max_age_s']:.0f}" if res["max_age_s"] is not None else "-",
            )
        console.print(t)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    swim = {int(k): v for k, v in report["swim"].items()}
    ref = {int(k): v for k, v in report["reference"].items()}
    ns = sorted(swim)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))

    ax = axes[0][0]
    ax.plot(ns, [swim[n]["bytes_per_node_round_steady"] for n in ns], "o-", label="SWIM, steady state")
    ax.plot(
        ns,
        [swim[n]["bytes_per_node_round_dissemination"] for n in ns],
        "s-",
        label="SWIM, during a dissemination",
    )
    sim_n = [n for n in sorted(ref) if not ref[n]["analytic"]]
    calc_n = [n for n in sorted(ref) if ref[n]["analytic"]]
    ax.plot(
        sim_n,
        [ref[n]["bytes_per_node_round_steady"] for n in sim_n],
        "^-",
        c="C3",
        label="full lists (simulated)",
    )
    if calc_n:
        edge = [*sim_n[-1:], *calc_n]
        ax.plot(
            edge,
            [ref[n]["bytes_per_node_round_steady"] for n in edge],
            "^--",
            c="C3",
            mfc="none",
            label="full lists (computed)",
        )
    refresh = {int(k): v for k, v in report["refresh"].items()}
    if refresh:
        rn = sorted(refresh)
        measured = [n for n in rn if refresh[n]["bytes_per_node_round"] is not None]
        ax.plot(
            measured,
            [refresh[n]["bytes_per_node_round"] for n in measured],
            "d-",
            c="C4",
            label=f"SWIM + refresh every {report['refresh'][str(rn[0])]['refresh_s']:g} s",
        )
        ax.plot(
            rn,
            [refresh[n]["lower_bound_bytes_per_node_round"] for n in rn],
            ":",
            c="C4",
            label="refresh: lower bound, any protocol",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("nodes N")
    ax.set_ylabel("bytes sent per node per round")
    ax.set_title("Bandwidth per node")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    ax.plot(ns, [swim[n]["rounds_to_99"] for n in ns], "o-", label="SWIM: rounds until 99% hold a new record")
    ax.plot(ns, [swim[n]["rounds_to_100"] for n in ns], "o:", c="C0", mfc="none", label="SWIM: until 100%")
    grid = np.logspace(1, math.log10(max(ns)), 50)
    ax.plot(grid, 2 * np.log2(grid), "k--", lw=0.8, label="target 2·log2 N")
    all_ref = sorted(ref)
    ax.plot(all_ref, [ref[n]["rounds_to_99"] for n in all_ref], "^-", c="C3", label="full lists")
    ax.set_xscale("log")
    ax.set_xlabel("nodes N")
    ax.set_ylabel("rounds")
    ax.set_title(f"Dissemination (fanout {report['params']['fanout']})")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    ax.plot(ns, [swim[n]["detect_dead_99_s"] for n in ns], "o-", label="SWIM: 99% mark it dead")
    ax.plot(
        ns, [swim[n]["first_suspect_s"] for n in ns], "o:", c="C0", mfc="none", label="SWIM: first suspicion"
    )
    ax.plot(
        all_ref,
        [ref[n]["detect_dead_99_s"] for n in all_ref],
        "^-",
        c="C3",
        label="full lists (heartbeat timeout)",
    )
    ax.axhline(report["params"]["suspect_timeout_s"], ls="--", c="k", lw=0.8, label="suspect_timeout_s")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("nodes N")
    ax.set_ylabel("virtual seconds after the kill")
    ax.set_title("Failure detection")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    for n in ns:
        curve = swim[n]["dissemination_curve"]
        ax.plot(range(1, len(curve) + 1), [100 * f for f in curve], ".-", label=f"N={n:,}")
    ax.axhline(99, ls="--", c="k", lw=0.8)
    ax.set_xlabel("rounds after the change")
    ax.set_ylabel("% of nodes holding the new record")
    ax.set_title("SWIM infection curves")
    ax.legend(fontsize=8)

    m = report["meta"]
    title = (
        f"wwwserve gossip at scale ({'quick' if m['quick'] else 'full'} run, simulated transport, seed {m['seed']}): "
        f"interval {report['params']['interval_s']:g} s, fanout {report['params']['fanout']}, "
        f"max_piggyback {report['params']['max_piggyback']}, sync every {report['params']['sync_every_rounds']} rounds"
    )
    save_figure(fig, title, path)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "N up to 1,000 (within a minute)")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    refresh_sizes = [10, 100] if args.quick else [10, 100, 1000]
    params = protocol_params()
    started = time.perf_counter()

    swim: dict[int, dict[str, Any]] = {}
    reference: dict[int, dict[str, Any]] = {}
    refresh: dict[int, dict[str, Any]] = {}
    steps = (
        [("swim", n) for n in sizes]
        + [("reference", n) for n in sizes]
        + [("refresh", n) for n in refresh_sizes]
    )
    with progress_bar(console) as progress:
        task = progress.add_task("starting", total=len(steps))
        for kind, n in steps:
            progress.update(task, description=f"{kind:9s} N={n:>6,}")
            if kind == "swim":
                swim[n] = run_swim(n, params)
            elif kind == "reference":
                if n <= REFERENCE_MAX_N:
                    reference[n] = run_reference(n, params)
                else:
                    reference[n] = reference_analytic(n, reference[max(reference)], params)
            else:
                refresh[n] = run_refresh(n, rounds=10)
            progress.advance(task)
    console.print("real sockets: 20 wwwserve node processes on loopback ...")
    real = run_real(20)
    if not args.quick:  # the refresh cost at 10,000 only as its lower bound: simulating it takes hours
        per_record = refresh[max(refresh)]["signed_record_bytes"]
        refresh[10_000] = {
            "n": 10_000,
            "refresh_s": GossipParams().refresh_s,
            "bytes_per_node_round": None,
            "signed_record_bytes": per_record,
            "lower_bound_bytes_per_node_round": refresh_lower_bound(10_000, per_record, GossipParams()),
            "max_age_s": None,
            "wall_s": 0.0,
        }

    report = {
        "meta": {
            "quick": args.quick,
            "seed": SEED,
            "elapsed_s": round(time.perf_counter() - started, 1),
            "machine": machine_info(),
            "versions": versions(),
            "notes": [
                "virtual time; one round = interval_s; a round has two phases (round start, +probe_timeout_s)",
                "every node ticks before any message of a phase is delivered; replies are delivered in the phase",
                "bytes = len(canonical JSON) of each message sent, over all nodes, divided by nodes and rounds",
                "steady state = one full sync cycle (sync_every_rounds rounds) with static records (refresh_s=1e9)",
                "dissemination window = from the change until every node holds it and no node still relays it",
                "detection = virtual seconds from the kill until 99% of the other live nodes mark the node dead",
                f"full lists: every node sends its list of N signed records to its N-1 peers each round; a node "
                f"is declared dead when its heartbeat has not advanced for {params.suspect_timeout_s:g} s "
                f"(suspect_timeout_s); simulated up to N={REFERENCE_MAX_N}, computed beyond from the mean record size",
                "refresh: genesis defaults (refresh_s=10): every record is republished every 10 s; the lower bound "
                "is N*interval/refresh_s signed records received per node per round, whatever the protocol",
            ],
        },
        "params": params.model_dump() | {"refresh_s_protocol_runs": STATIC},
        "swim": {str(n): v for n, v in swim.items()},
        "reference": {str(n): v for n, v in reference.items()},
        "refresh": {str(n): v for n, v in refresh.items()},
        "real_sockets": real,
        "targets": evaluate(swim, sizes)
        | {"real_20_converge_within_5_intervals": real["pass_converge_within_5_intervals"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gossip_scale.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "gossip_scale.png")
    print_tables(report)
    console.print(
        f"wrote {args.out / 'gossip_scale.json'} and {args.out / 'gossip_scale.png'} in {report['meta']['elapsed_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
