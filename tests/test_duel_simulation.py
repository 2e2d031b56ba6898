"""The duel-and-judge simulation (simulation/duels.py): small seeded networks on the real fold."""

from __future__ import annotations

import pytest

from simulation import duels
from simulation.duels import run
from wwwserve_gateway.network.votes import judge_order
from wwwserve_gateway.plugins.ledger import fold as fold_module

N, DUELS = 30, 400


@pytest.fixture(scope="module")
def honest() -> dict:
    return run(N, DUELS, seed=3, samples=8)


def test_with_honest_judges_better_executors_win_more(honest: dict) -> None:
    classes = honest["classes"]
    assert classes["good"]["score"] > classes["mid"]["score"] > classes["random"]["score"]
    assert classes["good"]["win_rate"] > classes["mid"]["win_rate"] > classes["random"]["win_rate"]
    assert classes["good"]["mean_elo"] > classes["mid"]["mean_elo"] > classes["random"]["mean_elo"]
    assert honest["ordering"]["holds"]
    # Every duel went through the fold: settled duels are the fold's own won/lost/tied records.
    played = sum(c["duels"] for c in classes.values())
    assert played == 2 * honest["duels"]["settled"] > 0
    # Stake moves between nodes, the entry pays the judges: no credit is created (the minority
    # slash's indivisible remainder and a slash nobody is owed may be destroyed).
    assert honest["total_credits"] <= N * honest["config"]["grant"] + 1e-6


def test_the_good_class_gains_credit_and_stake(honest: dict) -> None:
    series = honest["series"]
    assert series["credit_share"]["good"][-1] > series["credit_share"]["good"][0] + 0.03
    assert series["credit_share"]["random"][-1] < series["credit_share"]["random"][0] - 0.03
    assert series["bonded_share"]["good"][-1] >= series["bonded_share"]["good"][0]
    assert honest["classes"]["good"]["credit_per_node"] > 1 > honest["classes"]["random"]["credit_per_node"]


def test_canaries_lower_the_colluders_judge_weight() -> None:
    with_canaries = run(N, DUELS, collusion=0.3, canary_share=0.3, seed=5, samples=4)
    without = run(N, 100, collusion=0.3, canaries_on=False, seed=5, samples=4)
    judges = with_canaries["judges"]
    assert judges["colluder_weight"] < 0.35 < judges["honest_weight"]
    assert (
        with_canaries["series"]["judge_weight"]["colluders"][-1]
        < with_canaries["series"]["judge_weight"]["colluders"][0]
    )
    # Without canaries nobody is ever graded: every judge keeps the prior weight of 1/2.
    assert without["judges"] == {"honest_weight": 0.5, "colluder_weight": 0.5}
    assert with_canaries["duels"]["canaries"] > 0 and without["duels"]["canaries"] == 0


def test_a_seed_gives_the_same_run() -> None:
    a = run(12, 60, collusion=0.25, mix={"good": 1, "mid": 1, "random": 2}, seed=11, samples=3)
    b = run(12, 60, collusion=0.25, mix={"good": 1, "mid": 1, "random": 2}, seed=11, samples=3)
    c = run(12, 60, collusion=0.25, mix={"good": 1, "mid": 1, "random": 2}, seed=12, samples=3)
    strip = ("seconds", "cpu_seconds", "ms_per_duel", "cpu_ms_per_duel")
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    assert a["series"] != c["series"]


def test_the_shared_judge_draw_changes_nothing_and_is_restored() -> None:
    shared = run(12, 60, collusion=0.25, mix={"good": 1, "mid": 1, "random": 2}, seed=11, samples=3)
    alone = run(
        12,
        60,
        collusion=0.25,
        mix={"good": 1, "mid": 1, "random": 2},
        seed=11,
        samples=3,
        share_judge_draw=False,
    )
    assert fold_module.judge_order is judge_order
    assert shared["judge_draws_reused"] == shared["duels"]["settled"] > 0
    for key in ("classes", "judges", "duels", "series", "total_credits"):
        assert shared[key] == alone[key]


def test_cherry_picking_entries_and_lazy_executors_run() -> None:
    cheat = run(20, 120, collusion=0.3, cherry_pick=True, seed=2, samples=2)
    assert cheat["duels"]["withheld"] + cheat["duels"]["settled"] + cheat["duels"]["canary_identical"] <= 120
    lazy = run(20, 120, mix=duels.LAZY_MIX, seed=2, samples=2)
    assert lazy["classes"]["lazy"]["score"] < lazy["classes"]["good"]["score"]
    with pytest.raises(ValueError, match="colluders"):
        run(9, 5, collusion=0.5)


def test_the_study_writes_its_json_figure_and_targets(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`main` on a tiny plan (the --quick study itself takes about a minute): the JSON, the targets,
    the break points of the grid, the figure asked for."""
    import json

    def tiny(quick: bool = False) -> list[duels.Scenario]:
        grid = [
            duels.Scenario(
                f"n100-c{round(c * 100)}-{'canary' if can else 'nocanary'}",
                "tiny",
                16,
                80,
                (0,),
                {"collusion": c, "canaries_on": can, "mix": duels.collusion_mix(c)},
                f"{round(c * 100)}% colluders",
                duels._col(100, can),
                "grid",
            )
            for c in (0.0, 0.3)
            for can in (True, False)
        ]
        return [
            *grid,
            duels.Scenario("n100-lazy-canary", "tiny", 16, 80, (0, 1), {"mix": duels.LAZY_MIX}, "lazy"),
        ]

    monkeypatch.setattr(duels, "scenarios", tiny)
    plotted = []  # matplotlib takes 10-30 s on a loaded 2-core machine: the CLI run draws the figure
    monkeypatch.setattr(duels, "plot", lambda results, path: plotted.append((len(results), path.name)))
    assert duels.main(["--quick", "--out", str(tmp_path), "--jobs", "1"]) == 0
    report = json.loads((tmp_path / "duel_simulation.json").read_text())
    assert plotted == [(len(tiny()), "duel_simulation.png")]
    assert [s["name"] for s in report["scenarios"]] == [s.name for s in tiny()]
    lazy = report["scenarios"][-1]
    assert lazy["summary"]["seeds"] == 2 and lazy["summary"]["verdict"] in ("holds", "breaks", "mixed")
    targets = {t["scenario"]: t for t in report["targets"]}
    assert targets["n100-c30-canary"]["result"] in (True, False)
    assert targets["n1000-c30-canary"]["result"] is None  # not run: reported, not failed
    assert set(report["break_points"]) == {duels._col(100, True), duels._col(100, False)}
    assert report["meta"]["cpu_ms_per_duel"]["N=16"] > 0
    series = report["scenarios"][0]["runs"][0]["series"]
    assert len(series["score"]["good"]) == len(series["duel"])
    assert 0 <= report["scenarios"][0]["runs"][0]["classes"]["good"]["late_score"] <= 1
