"""benchmarks/paper_eval.py end to end on a small setting: real nodes in front of emulated engines,
the WWW.Serve path and the ideal scheduler's path, every request answered, every output written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO


def test_a_small_setting_runs_end_to_end(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "paper_eval.py"),
        "--setting",
        "1",
        "--workers",
        "2",
        "--variants",
        "frequency,ideal",
        "--duration",
        "60",
        "--time-scale",
        "60",
        "--out",
        str(tmp_path),
    ]
    env = os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "COLUMNS": "120"}
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=110, env=env, cwd=REPO)
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert took < 100, f"took {took:.0f} s"

    report = json.loads((tmp_path / "paper_eval_setting1.json").read_text())
    expected = report["setting"]["requests"]
    assert expected > 0
    nodes = {n["name"] for n in report["setting"]["nodes"]}
    assert nodes == {"entry", "n1", "n2"}
    for name in ("frequency", "ideal"):
        records = report["variants"][name]["records"]
        assert len(records) == expected
        assert {r["outcome"] for r in records} == {"ok"}, [r for r in records if r["outcome"] != "ok"]
        for r in records:
            assert r["finish"] > r["submit"] >= r["planned"] - 1
            assert r["completion_tokens"] == min(r["output_tokens"], 8192)
            assert r["route"] and set(r["route"]) <= nodes - {"entry"}
            assert r["route"][0] == r["node"] or name == "ideal"
    assert report["variants"]["frequency"]["credits"], "the ledger was not sampled"
    # Honest executors' receipts are believed: none struck, so none avoided for the rest of the run.
    counters = report["variants"]["frequency"]["delegation_counters"]
    assert not [k for node in counters.values() for k in node if k.startswith("wwwserve_bad_receipts")]
    for suffix in ("_slo.png", "_latency.png", "_credits.png"):
        assert (tmp_path / f"paper_eval_setting1{suffix}").stat().st_size > 10_000
    assert "frequency" in (tmp_path / "paper_eval_summary.md").read_text()


def test_a_request_s_bytes_can_hold_the_prompt_tokens_its_receipt_will_claim() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from paper_eval_clients import chat_body
    from paper_eval_workload import Request

    from wwwserve_gateway.delegation.answers import prompt_bound

    for tokens in (1, 1_020, 30_000):
        body = chat_body(Request(7, "n1", "qwen3-8b", 0.0, tokens, 129), "qwen3-8b", 2048)
        assert prompt_bound(body) >= tokens
        assert prompt_bound(body) < 4 * tokens + 1024  # about a real prompt's bytes, not a flood


def test_the_scale_simulation_runs_the_real_policies(tmp_path: Path) -> None:
    """paper_eval_sim: single-node in the simulation is exactly the engine model run offline per node,
    and the policies built from their entry points complete every request and delegate some."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import paper_eval_sim as sim

    from wwwserve_gateway.emulator.engine import simulate
    from wwwserve_gateway.emulator.profiles import load_profile

    requests = sim.shifting_workload(6, seed=3, horizon=240.0)
    assert requests
    runs = {v: sim.run_one(6, v, requests, 3, lambda done: None) for v in sim.VARIANTS}
    for v, run in runs.items():
        assert run["completed"] == len(requests), v
        assert run["errors"] == 0, v
    assert runs["single"]["served_elsewhere"] == 0
    assert runs["least_loaded"]["served_elsewhere"] > 0
    assert runs["ideal"]["served_elsewhere"] > 0
    profile = load_profile(sim.PROFILE)
    for node in {r.node for r in requests}:
        mine = [r for r in requests if r.node == node]
        offline = simulate(profile, [(r.at, r.prompt_tokens, r.output_tokens) for r in mine])
        for r, seq in zip(mine, offline, strict=True):
            assert runs["single"]["latencies"][r.id] == round(seq.finished_at - r.at, 2)
    analysis = sim.analyse(runs)
    assert analysis["attainment"]["single"] >= 0.5
    assert 0 < analysis["best_over_ideal"] <= 1.5
