"""Ledger throughput: verified appends per second, sync time of a new node, and bytes per request.

    python benchmarks/ledger_throughput.py [--quick] [--out DIR] [--no-profile] [--long-form]

The workload's pay operations use the compact form that nodes write when the executor countersigns
(ChainLedger._payment): {to, amount, items: [[request hash, prompt, completion], ...], sig}, one
executor signature per payment over batch_body(executor, entry, items). --long-form generates the
fallback form instead, {to, amount, receipts} with one executor signature per receipt, for comparison.

1. Verified appends/s (parse_op signature check + check_op kind rules + LedgerStore.append), on
   SQLite (WAL, synchronous=FULL) and on a real PostgreSQL server on loopback, at batch sizes 1, 10,
   100 and 1000. This process is pinned to core 0 (os.sched_setaffinity); the PostgreSQL server is a
   separate process and is not pinned. Target: >= 5,000 verified appends/s on SQLite on one core.
2. Sync time of a new node: node A (a real `wwwserve node`) starts with a ledger of 100,000 valid
   operations (quick: 10,000) from 100 identities (join, bond/unbond, pay of 1-3 requests, each
   payment countersigned by its executor); node B bootstraps from A; measured from B's start until
   B's /wwwserve/ledger/balances equals A's (and, once both are stopped, their chain heads match).
   Node B is sampled with py-spy meanwhile. Target: <= 30 s for 100,000 operations.
3. Ledger bytes per delegated request when an entry node pays 1, 10 or 100 requests per `pay`
   operation, to one executor or spread over up to 10 (canonical signed op divided by requests), in
   both forms side by side, plus the per-request record alone (compact item; long-form receipt).
   Target: <= 200 bytes per request at a batch of 10 to one payee, judged on the compact form.

Writes ledger_throughput.json and ledger_throughput.png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

# bench_common, also when imported (importing it puts the repository root on sys.path: simulation/, tests/)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nacl.signing
import orjson
from bench_common import (
    BenchNode,
    bench_parser,
    collapsed_stacks,
    find_py_spy,
    loadavg,
    machine_info,
    progress_bar,
    py_spy_command,
    pyplot,
    save_figure,
    verdict,
    versions,
    wait_until,
)
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.genesis import LedgerParams, NetworkGenesis, write_genesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugins.ledger.ops import Operation, parse_op, sign_op
from wwwserve_gateway.plugins.ledger.rules import batch_body, check_op, payment_amount
from wwwserve_gateway.plugins.ledger.store import LedgerStore, default_url

console = Console()

TARGET_APPENDS_PER_S = 5000
TARGET_SYNC_S = 30.0
TARGET_START_S = 15.0  # a node on a 100,000-op ledger serves within this (scaled for --quick)
TARGET_SYNC_OPS = 100_000
TARGET_BYTES_PER_REQUEST = 200
BATCHES = (1, 10, 100, 1000)
PAY_BATCHES = (1, 10, 100)
IDENTITIES = 100
BASE_TS = 1_700_000_000.0  # far enough in the past that every unbonding has matured
MODEL = "qwen2.5-7b-instruct-q4_k_m"
BALANCES = "/wwwserve/ledger/balances"


# -- workload ------------------------------------------------------------------------------------


def identity(i: int) -> NodeIdentity:
    """Deterministic identities, so that worker processes sign receipts for each other."""
    seed = hashlib.sha256(f"ledger-bench-{i}".encode()).digest()
    return NodeIdentity(nacl.signing.SigningKey(seed))


GRANT = 1000


@functools.cache
def bench_genesis() -> NetworkGenesis:
    """The benchmark's network: the IDENTITIES authors are its founding members."""
    allocations = {identity(i).node_id: GRANT for i in range(IDENTITIES)}
    return NetworkGenesis(name="ledger-throughput-bench", ledger=LedgerParams(allocations=allocations))


def receipt_body(executor: NodeIdentity, entry: str, tag: str, started: float) -> dict[str, Any]:
    return {
        "id": executor.node_id,
        "kind": "receipt",
        "net": bench_genesis().network_id,
        "entry": entry,
        "request": hashlib.sha256(f"request {tag}".encode()).hexdigest(),
        "response": hashlib.sha256(f"response {tag}".encode()).hexdigest(),
        "model": MODEL,
        "prompt_tokens": 180 + len(tag) % 50,
        "completion_tokens": 250 + len(tag) % 97,
        "started": round(started, 3),
        "finished": round(started + 1.234, 3),
    }


def make_receipt(executor: NodeIdentity, entry: str, tag: str, started: float) -> dict[str, Any]:
    return executor.sign_record(receipt_body(executor, entry, tag, started))


def payment(
    executor: NodeIdentity,
    entry: str,
    tags: list[str],
    starts: list[float],
    params: LedgerParams,
    long_form: bool,
) -> dict[str, Any]:
    """A payment to `executor` for one request per tag, as ChainLedger._payment writes it: compact
    ({to, amount, items, sig}: the executor countersigns the items once) or, with long_form, the
    fallback {to, amount, items, receipts} (one executor signature per receipt)."""
    bodies = [receipt_body(executor, entry, t, s) for t, s in zip(tags, starts, strict=True)]
    items = [[b["request"], b["prompt_tokens"], b["completion_tokens"]] for b in bodies]
    payment = {"to": executor.node_id, "amount": payment_amount(items, params), "items": items}
    if long_form:
        return {**payment, "receipts": [executor.sign_record(b) for b in bodies]}
    net = bench_genesis().network_id
    return {**payment, "sig": executor.sign(canonical(batch_body(net, executor.node_id, entry, items))).hex()}


def pay_body(
    me: NodeIdentity,
    payee: NodeIdentity,
    n: int,
    tag: str,
    ts: float,
    params: LedgerParams,
    long_form: bool = False,
) -> dict[str, Any]:
    tags = [f"{tag}/{k}" for k in range(n)]
    starts = [ts - 5 + k * 0.01 for k in range(n)]
    return {"payments": [payment(payee, me.node_id, tags, starts, params, long_form)]}


def payment_requests(p: dict[str, Any]) -> int:
    return len(p["receipts"] if "receipts" in p else p["items"])


def payment_signatures(p: dict[str, Any]) -> int:
    """Executor signatures a payment carries: one per receipt (long form) or one per batch (compact)."""
    return len(p["receipts"]) if "receipts" in p else 1


def gen_chain(index: int, n_ops: int, n_ids: int, long_form: bool = False) -> list[Operation]:
    """One author's chain: join, bond 100, then (per 10 ops) 8 pays of 1-3 requests, a bond, an unbond.
    Pays are in the compact form (the payee countersigns the batch), or the long form with long_form."""
    params = bench_genesis().ledger
    me = identity(index)
    ops: list[Operation] = []
    prev = ""
    for seq in range(1, n_ops + 1):
        ts = round(BASE_TS + seq * 1.0 + index * 0.001, 3)
        if seq == 1:
            kind, body = "join", {"grant": params.allocations.get(me.node_id, 0)}
        elif seq == 2:
            kind, body = "bond", {"amount": 100}
        elif seq % 10 == 0:
            kind, body = "unbond", {"amount": 1}
        elif seq % 10 == 5:
            kind, body = "bond", {"amount": 1}
        else:
            payee = identity((index + 1 + seq % (n_ids - 1)) % n_ids)
            kind, body = "pay", pay_body(me, payee, 1 + seq % 3, f"{index}/{seq}", ts, params, long_form)
        op = sign_op(me, seq, prev, kind, body, ts)
        prev = op.hash
        ops.append(op)
    return ops


def gen_ledger(
    n_ops: int, n_ids: int, progress: Progress | None = None, workers: int = 2, long_form: bool = False
) -> list[Operation]:
    """n_ops operations from n_ids authors, in timestamp order (chains interleaved)."""
    per = [n_ops // n_ids + (1 if i < n_ops % n_ids else 0) for i in range(n_ids)]
    task = progress.add_task("signing operations", total=n_ids) if progress else None
    chains: list[list[Operation]] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for chain in pool.map(
            gen_chain, range(n_ids), per, [n_ids] * n_ids, [long_form] * n_ids, chunksize=2
        ):
            chains.append(chain)
            if progress is not None and task is not None:
                progress.advance(task)
    ops = [op for chain in chains for op in chain]
    ops.sort(key=lambda op: (op.ts, op.author, op.seq))
    return ops


# -- 1. verified appends per second --------------------------------------------------------------


def bench_appends(
    url: str, signed: list[dict[str, Any]], batch: int, budget_s: float, params: LedgerParams
) -> dict[str, Any]:
    """Feed `signed` (chain order) through parse_op + check_op + append, `batch` ops per append."""
    store = LedgerStore(url, bench_genesis().network_id)
    t_parse = t_check = t_append = 0.0
    done = 0
    started = time.perf_counter()
    try:
        for i in range(0, len(signed), batch):
            chunk = signed[i : i + batch]
            t0 = time.perf_counter()
            ops = [parse_op(s) for s in chunk]
            t1 = time.perf_counter()
            for op in ops:
                check_op(op, params, bench_genesis().network_id)
            t2 = time.perf_counter()
            store.append(ops)
            t3 = time.perf_counter()
            t_parse += t1 - t0
            t_check += t2 - t1
            t_append += t3 - t2
            done += len(ops)
            if t3 - started > budget_s and done >= min(batch, len(signed)):
                break
    finally:
        store.close()
    total = t_parse + t_check + t_append
    return {
        "batch": batch,
        "ops": done,
        "seconds": round(total, 4),
        "appends_per_s": round(done / total, 1),
        "parse_us_per_op": round(t_parse / done * 1e6, 1),
        "check_us_per_op": round(t_check / done * 1e6, 1),
        "append_us_per_op": round(t_append / done * 1e6, 1),
    }


def part_appends(ops: list[Operation], quick: bool, workdir: Path, progress: Progress) -> dict[str, Any]:
    params = bench_genesis().ledger
    signed = [orjson.loads(op.raw) for op in ops]
    budget = 1.0 if quick else 3.0
    results: dict[str, Any] = {"sqlite": [], "postgresql": [], "postgresql_error": None}
    pg = None
    try:
        from tests.postgres import PostgresServer, find_bindir  # the repository root: bench_common

        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL binaries not found")
        pg = PostgresServer(bindir)  # started before pinning: the server is not pinned to core 0
    except Exception as exc:  # reported; SQLite still runs
        results["postgresql_error"] = str(exc)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    task = progress.add_task("verified appends (pinned to core 0)", total=2 * len(BATCHES))
    try:
        for i, batch in enumerate(BATCHES):
            path = workdir / f"appends-{batch}"
            results["sqlite"].append(bench_appends(default_url(path), signed, batch, budget, params))
            progress.advance(task)
            if pg is not None:
                results["postgresql"].append(
                    bench_appends(pg.create_database(), signed, batch, budget, params)
                )
            progress.advance(task)
            shutil.rmtree(path, ignore_errors=True)
            del i
    finally:
        os.sched_setaffinity(0, before)
        if pg is not None:
            pg.close()
    mix = Counter(op.kind for op in ops)
    payments = [p for op in ops if op.kind == "pay" for p in op.body["payments"]]
    forms = Counter("long" if "receipts" in p else "compact" for p in payments)
    requests = sum(payment_requests(p) for p in payments)
    executor_sigs = sum(payment_signatures(p) for p in payments)
    results["workload"] = {
        "ops_available": len(ops),
        "kinds": dict(mix),
        "pay_forms": dict(forms),
        "requests_per_pay": round(requests / max(1, mix["pay"]), 2),
        # the op's own signature, plus one per receipt (long form) or one per payment (compact form)
        "signatures_per_op": round((len(ops) + executor_sigs) / len(ops), 2),
        "mean_op_bytes": round(sum(len(op.raw) for op in ops) / len(ops), 1),
        "pinned_cpu": 0,
        "postgres_server_pinned": False,
        "sqlite_synchronous": "FULL (fsync of the WAL at every commit)",
    }
    ok = [r for r in results["sqlite"] if r["appends_per_s"] >= TARGET_APPENDS_PER_S]
    results["target_met_at_batch"] = ok[0]["batch"] if ok else None
    results["best_sqlite_appends_per_s"] = max(r["appends_per_s"] for r in results["sqlite"])
    return results


# -- 2. sync time of a new node ------------------------------------------------------------------


def build_db(ops: list[Operation], data_dir: Path, network_id: str) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    store = LedgerStore(default_url(data_dir), network_id)
    try:
        by_author: dict[str, list[Operation]] = {}
        for op in ops:
            by_author.setdefault(op.author, []).append(op)
        pending = [op for chain in by_author.values() for op in chain]
        for i in range(0, len(pending), 5000):
            store.append(pending[i : i + 5000])
    finally:
        store.close()


def db_count(path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT count(*) FROM ledger_ops").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


CATEGORIES = [  # leaf-most frame that matches decides the sample's category
    ("signature verification (nacl)", ("nacl", "identity.py:verify", "verify (wwwserve_gateway/identity")),
    ("canonical JSON / orjson", ("canonical", "orjson", "loads", "dumps")),
    ("SQL (SQLAlchemy / sqlite3)", ("sqlalchemy", "sqlite3", "ledger_store")),
    ("balance fold (ledger_fold)", ("ledger_fold",)),
    ("kind rules (ledger_rules)", ("ledger_rules",)),
    ("op parsing (ledger_ops)", ("ledger_ops",)),
    ("overlay / websocket / asyncio", ("overlay", "websocket", "asyncio", "uvloop", "msgpack", "json")),
    ("gossip", ("gossip",)),
]
INCLUSIVE = [
    ("Balances.add_many", "add_many"),
    ("Balances._fold_all (full refold)", "_fold_all"),
    ("parse_op", "parse_op"),
    ("check_op", "check_op"),
    ("LedgerStore.append", "append (wwwserve_gateway/plugins/ledger_store"),
    ("LedgerStore.heads / head", "head"),
    ("_serve_range", "_serve_range"),
    ("signature verify", "verify ("),
]


def ledger_profile(raw: Path) -> dict[str, Any]:
    """Node B's samples by what the ledger sync spends them on (CATEGORIES, INCLUSIVE)."""
    if not raw.exists():
        return {"error": "py-spy wrote nothing"}
    leaf: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for frames, n in collapsed_stacks(raw):
        total += n
        leaf[frames[-1]] += n
        for frame in reversed(frames):
            hit = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit:
                cats[hit] += n
                break
        else:
            cats["other"] += n
        for name, key in INCLUSIVE:
            if any(key in f for f in frames):
                incl[name] += n
    pct = lambda n: round(100 * n / max(1, total), 1)  # noqa: E731
    return {
        "samples": total,
        "by_category_pct": {k: pct(v) for k, v in cats.most_common()},
        "inclusive_pct": {k: pct(v) for k, v in incl.most_common()},
        "top_leaf_frames_pct": {k: pct(v) for k, v in leaf.most_common(12)},
    }


def part_sync(ops: list[Operation], n_ids: int, quick: bool, workdir: Path, profile: bool) -> dict[str, Any]:
    genesis = bench_genesis()
    genesis_path = workdir / "genesis.yaml"
    write_genesis(genesis, genesis_path)
    a_data = workdir / "a-data"
    t0 = time.perf_counter()
    build_db(ops, a_data, genesis.network_id)
    build_s = time.perf_counter() - t0
    a = BenchNode(workdir, "a", [], network=str(genesis_path), data_dir=str(a_data))
    b = BenchNode(workdir, "b", [], network=str(genesis_path), bootstrap=[a.url])
    b_db = Path(b.config["node"]["data_dir"]) / "ledger.db"
    timeout = float(os.environ.get("LEDGER_BENCH_SYNC_TIMEOUT", 90.0 if quick else 120.0))
    result: dict[str, Any] = {
        "ops": len(ops),
        "identities": n_ids,
        "db_bytes": (a_data / "ledger.db").stat().st_size,
        "db_build_s": round(build_s, 2),
    }
    spy = None
    try:
        t0 = time.perf_counter()
        a.start(wait_ready=False)
        wait_until(lambda: len(a.get_json(BALANCES, 60)) >= n_ids + 1, 120, 0.2, what="node A's ledger")
        result["node_a_start_s"] = round(time.perf_counter() - t0, 2)
        with console.status(f"node B syncing {len(ops):,} operations from node A") as status:
            started = time.perf_counter()
            b.start(wait_ready=False)
            b_up = time.perf_counter() - started
            raw = workdir / "b-profile.txt"
            exe = find_py_spy()
            if profile and exe and b.proc is not None:
                spy = subprocess.Popen(
                    py_spy_command(exe, b.proc.pid, raw, 50, "--duration", str(int(timeout) + 10)),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            curve: list[tuple[float, int]] = []

            def synced() -> bool:
                n = db_count(b_db)
                elapsed = time.perf_counter() - started
                curve.append((round(elapsed, 2), n))
                status.update(
                    f"node B syncing: {max(n, 0):,} / {len(ops):,} operations after {elapsed:.1f} s"
                )
                if n < len(ops):
                    return False
                try:
                    va, vb = a.get_json(BALANCES, 60), b.get_json(BALANCES, 60)
                except (OSError, RuntimeError):
                    return False
                return va == vb and len(va) >= n_ids + 2

            try:
                wait_until(synced, timeout, 0.25)
                converged_at: float | None = time.perf_counter() - started
            except TimeoutError:
                converged_at = None
            result["b_http_up_s"] = round(b_up, 2)
            # A checks every row's links before it serves, and its signatures in the background
            # (refusing ledger data meanwhile): both are part of the sync B sees.
            checked = re.search(r"stored ledger verified\W.*?seconds\W+([0-9.]+)", a.log())
            result["node_a_signatures_s"] = float(checked.group(1)) if checked else None
            result["sync_s"] = round(converged_at, 2) if converged_at is not None else None
            result["timed_out_after_s"] = None if converged_at is not None else timeout
            result["ops_on_b_at_end"] = db_count(b_db)
            result["curve"] = curve
            if converged_at is None:
                result["log_tail_b"] = b.log()[-3000:]
                result["log_tail_a"] = a.log()[-3000:]
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                result["profile_b"] = ledger_profile(raw)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        a.stop()
        b.stop()
    # Heads: both stopped, compare the chains' heads as stored on disk.
    sa = LedgerStore(default_url(a_data), genesis.network_id, check_on_open=False)
    sb = LedgerStore(default_url(b_db.parent), genesis.network_id, check_on_open=False)
    try:
        ha, hb = sa.heads(), sb.heads()
        result["heads_match"] = ha == hb
        result["heads"] = len(ha)
        result["count_a"], result["count_b"] = sa.count(), sb.count()
    finally:
        sa.close()
        sb.close()
    if result["sync_s"] is not None:
        result["projected_s_for_100k"] = round(result["sync_s"] * TARGET_SYNC_OPS / len(ops), 1)
    elif result["ops_on_b_at_end"] > 1000:  # linear projection from the rate reached before the timeout
        rate = result["ops_on_b_at_end"] / result["timed_out_after_s"]
        result["projected_s_for_100k"] = round(TARGET_SYNC_OPS / rate, 1)
    return result


# -- 3. ledger bytes per delegated request -------------------------------------------------------


FORMS = ("compact", "long")


def part_bytes() -> dict[str, Any]:
    """Both payment forms side by side; the target is judged on the compact form (what nodes write)."""
    params = bench_genesis().ledger
    entry, executors = identity(1000), [identity(1001 + i) for i in range(100)]
    receipt = make_receipt(executors[0], entry.node_id, "size", BASE_TS)
    body = receipt["body"]
    item = [body["request"], body["prompt_tokens"], body["completion_tokens"]]
    out: dict[str, Any] = {
        "receipt_bytes": len(canonical(receipt)),
        "receipt_body_bytes": len(canonical(receipt["body"])),
        "receipt_sig_hex_bytes": len(receipt["sig"]),
        "receipt_fields": {k: len(canonical({k: v})) - 2 for k, v in receipt["body"].items()},
        "compact_item_bytes": len(canonical(item)) + 1,  # [request, prompt, completion] and its comma
        "compact_sig_hex_bytes": len(executors[0].sign(b"x").hex()),
        "batches": [],
    }
    # The per-request record: a signed receipt (long form) or an item (compact form).
    record = {"long": out["receipt_bytes"] + 1, "compact": out["compact_item_bytes"]}
    for form in FORMS:
        for n in PAY_BATCHES:
            for payees in ("one", "distinct"):
                if payees == "distinct" and n == 1:
                    continue
                k = 1 if payees == "one" else min(n, 10)  # entry spreads the batch over up to 10 executors
                payments = [
                    payment(
                        executors[j],
                        entry.node_id,
                        [f"{n}/{payees}/{j}/{i}" for i in range(j, n, k)],
                        [BASE_TS + i for i in range(j, n, k)],
                        params,
                        long_form=form == "long",
                    )
                    for j in range(k)
                ]
                op = sign_op(entry, 2, "0" * 64, "pay", {"payments": payments}, BASE_TS + 100)
                check_op(op, params, bench_genesis().network_id)
                out["batches"].append(
                    {
                        "form": form,
                        "requests": n,
                        "payees": k,
                        "op_bytes": len(op.raw),
                        "bytes_per_request": round(len(op.raw) / n, 1),
                        "overhead_bytes_per_request": round((len(op.raw) - n * record[form]) / n, 1),
                    }
                )

    def at(form: str, n: int) -> float:
        return next(
            b["bytes_per_request"]
            for b in out["batches"]
            if b["form"] == form and b["requests"] == n and b["payees"] == 1
        )

    out["bytes_per_request_one_payee"] = {form: {n: at(form, n) for n in PAY_BATCHES} for form in FORMS}
    out["bytes_per_request_at_10"] = at("compact", 10)
    out["long_form_bytes_per_request_at_10"] = at("long", 10)
    return out


# -- report --------------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    ap, sync, by = report["appends"], report["sync"], report["bytes"]
    t = Table(title="Verified appends/s (parse_op + check_op + append), pinned to core 0")
    for col in ("backend", "batch", "ops", "appends/s", "parse µs/op", "check µs/op", "append µs/op"):
        t.add_column(col, justify="right")
    for backend in ("sqlite", "postgresql"):
        for r in ap[backend]:
            t.add_row(
                backend,
                str(r["batch"]),
                f"{r['ops']:,}",
                f"{r['appends_per_s']:,.0f}",
                f"{r['parse_us_per_op']:.0f}",
                f"{r['check_us_per_op']:.0f}",
                f"{r['append_us_per_op']:.0f}",
            )
    console.print(t)
    w = ap["workload"]
    console.print(
        f"workload: {w['kinds']}, {report['pay_form']}-form pays {w['pay_forms']}, "
        f"{w['requests_per_pay']} requests/pay, {w['signatures_per_op']} signatures/op, "
        f"{w['mean_op_bytes']:.0f} B/op; PostgreSQL server not pinned"
        + (f"; PostgreSQL error: {ap['postgresql_error']}" if ap["postgresql_error"] else "")
    )
    t = Table(title="Ledger bytes per delegated request (compact form: what nodes write; long: fallback)")
    for col in ("form", "requests/pay", "payees", "op bytes", "bytes/request", "beyond-record bytes/request"):
        t.add_column(col, justify="right")
    for r in by["batches"]:
        t.add_row(
            r["form"],
            str(r["requests"]),
            str(r["payees"]),
            f"{r['op_bytes']:,}",
            f"{r['bytes_per_request']:.0f}",
            f"{r['overhead_bytes_per_request']:.0f}",
        )
    console.print(t)
    console.print(
        f"per-request record: compact item {by['compact_item_bytes']} B (plus one "
        f"{by['compact_sig_hex_bytes']} B hex signature per payment); long-form receipt {by['receipt_bytes']} B "
        f"(body {by['receipt_body_bytes']} B + sig {by['receipt_sig_hex_bytes']} B hex; "
        f"fields: {by['receipt_fields']})"
    )
    if sync.get("profile_b"):
        p = sync["profile_b"]
        console.print(
            f"node B profile ({p.get('samples', 0)} samples): by category {p.get('by_category_pct')}"
        )
        console.print(f"  inclusive: {p.get('inclusive_pct')}")
    t = Table(title="Targets")
    for col in ("target", "measured", "result"):
        t.add_column(col)
    for row in report["targets"]:
        t.add_row(row["target"], row["measured"], verdict(row["pass"]))
    console.print(t)


def targets(report: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    ap, sync, by = report["appends"], report["sync"], report["bytes"]
    met = ap["target_met_at_batch"]
    sqlite_best = ap["best_sqlite_appends_per_s"]
    pg = ap["postgresql"]
    pg_best = max((r["appends_per_s"] for r in pg), default=0)
    s = sync.get("sync_s")
    limit = TARGET_SYNC_S * sync["ops"] / TARGET_SYNC_OPS
    sync_text = (
        f"{s:.1f} s for {sync['ops']:,} ops, {sync['ops'] / s:,.0f} ops/s (heads match: {sync.get('heads_match')})"
        if s is not None
        else f"not synced after {sync['timed_out_after_s']:.0f} s ({sync['ops_on_b_at_end']:,}/{sync['ops']:,} ops)"
    )
    return [
        {
            "target": f">= {TARGET_APPENDS_PER_S:,} verified appends/s, SQLite, one core "
            f"({report['pay_form']}-form pays)",
            "measured": f"best {sqlite_best:,.0f}/s"
            + (f", met from batch {met}" if met else ", at no batch size")
            + f" (PostgreSQL best {pg_best:,.0f}/s)",
            "pass": met is not None,
        },
        {
            "target": f"new node syncs {sync['ops']:,} ops in <= {limit:g} s"
            + ("" if sync["ops"] == TARGET_SYNC_OPS else f" (quick: scaled from {TARGET_SYNC_S:g} s / 100k)")
            + f" ({report['pay_form']}-form pays)",
            "measured": sync_text,
            "pass": s is not None and s <= limit and bool(sync.get("heads_match")),
        },
        {
            "target": f"node starts on {sync['ops']:,} stored ops in <= {TARGET_START_S * sync['ops'] / TARGET_SYNC_OPS:g} s "
            "(every row's hash links checked; signatures after, in the background)",
            "measured": f"{sync.get('node_a_start_s')} s to serve balances; signatures checked in "
            f"{sync.get('node_a_signatures_s')} s",
            "pass": (sync.get("node_a_start_s") or 1e9) <= TARGET_START_S * sync["ops"] / TARGET_SYNC_OPS,
        },
        {
            "target": f"<= {TARGET_BYTES_PER_REQUEST} ledger bytes per delegated request at 10/pay",
            "measured": f"{by['bytes_per_request_at_10']:.0f} B/request, compact form "
            f"(long form {by['long_form_bytes_per_request_at_10']:.0f} B/request)",
            "pass": by["bytes_per_request_at_10"] <= TARGET_BYTES_PER_REQUEST,
        },
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    for backend in ("sqlite", "postgresql"):
        rows = report["appends"][backend]
        if rows:
            ax.plot([r["batch"] for r in rows], [r["appends_per_s"] for r in rows], "o-", label=backend)
    ax.axhline(TARGET_APPENDS_PER_S, color="red", ls="--", label=f"target {TARGET_APPENDS_PER_S:,}/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("operations per append (batch)")
    ax.set_ylabel("verified appends / s (one core)")
    ax.set_title(f"1. verified appends/s ({report['pay_form']}-form pays)")
    ax.legend()
    ax = axes[1]
    sync = report["sync"]
    curve = [(t, n) for t, n in sync.get("curve", []) if n >= 0]
    if curve:
        ax.plot([t for t, _ in curve], [n for _, n in curve], "-", label="ops on node B")
    ax.axhline(sync["ops"], color="gray", ls=":", label=f"{sync['ops']:,} ops on node A")
    limit = TARGET_SYNC_S * sync["ops"] / TARGET_SYNC_OPS
    ax.axvline(limit, color="red", ls="--", label=f"target {limit:g} s")
    if sync.get("sync_s") is not None:
        ax.axvline(sync["sync_s"], color="green", ls="-.", label=f"balances equal at {sync['sync_s']:.1f} s")
    ax.set_xlabel("seconds since node B started")
    ax.set_ylabel("operations stored on node B")
    ax.set_title(f"2. new-node sync ({report['pay_form']}-form pays)")
    ax.legend()
    ax = axes[2]
    by = report["bytes"]
    series = [  # (form, payees, label, colour)
        ("compact", "one", "compact, one payee", "tab:blue"),
        ("compact", "distinct", "compact, 10 payees", "tab:cyan"),
        ("long", "one", "long form, one payee", "tab:orange"),
        ("long", "distinct", "long form, 10 payees", "tab:brown"),
    ]
    width = 0.2
    for i, (form, payees, label, colour) in enumerate(series):
        rows = [r for r in by["batches"] if r["form"] == form and (r["payees"] == 1) == (payees == "one")]
        xs = [PAY_BATCHES.index(r["requests"]) + (i - 1.5) * width for r in rows]
        bars = ax.bar(xs, [r["bytes_per_request"] for r in rows], width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(PAY_BATCHES)), [str(n) for n in PAY_BATCHES])
    ax.set_yscale("log")
    ax.axhline(
        TARGET_BYTES_PER_REQUEST, color="red", ls="--", label=f"target {TARGET_BYTES_PER_REQUEST} B (compact)"
    )
    ax.set_xlabel("delegated requests per pay operation")
    ax.set_ylabel("ledger bytes per request (log)")
    ax.set_title("3. ledger bytes per delegated request")
    ax.legend(fontsize=8)
    m = report["machine"]
    title = (
        f"wwwserve ledger throughput ({'quick' if report['quick'] else 'full'} run, "
        f"{m['cpu_count']} CPUs, {m['cpu_model']}; workload pays in the {report['pay_form']} form)"
    )
    save_figure(fig, title, path)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "10,000-op sync and shorter runs: under a minute")
    parser.add_argument("--no-profile", action="store_true", help="do not sample node B with py-spy")
    parser.add_argument(
        "--long-form",
        action="store_true",
        help="workload pays by signed receipts (the old form, now a fallback) instead of compact batches; "
        "for comparison (use another --out to keep the default results)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    n_sync = 10_000 if args.quick else TARGET_SYNC_OPS
    n_append = 3_000 if args.quick else 20_000
    workdir = Path(tempfile.mkdtemp(prefix="wwwserve-ledger-bench-"))
    started = time.perf_counter()
    try:
        with progress_bar(console) as progress:
            workers = max(1, len(os.sched_getaffinity(0)))
            sync_ops = gen_ledger(n_sync, IDENTITIES, progress, workers, args.long_form)
            append_ops = (
                sync_ops[:n_append]
                if n_append <= n_sync
                else gen_ledger(n_append, IDENTITIES, None, workers, args.long_form)
            )
            # chain order for appends: a prefix in ts order keeps every chain contiguous
            appends = part_appends(append_ops, args.quick, workdir, progress)
            bytes_ = part_bytes()
        sync = part_sync(sync_ops, IDENTITIES, args.quick, workdir, not args.no_profile)
        report: dict[str, Any] = {
            "benchmark": "ledger_throughput",
            "quick": args.quick,
            "pay_form": "long" if args.long_form else "compact",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine_info() | {"load_avg": loadavg(), "sqlite": sqlite3.sqlite_version},
            "versions": versions(),
            "appends": appends,
            "sync": sync,
            "bytes": bytes_,
            "targets_spec": {
                "appends_per_s_sqlite_one_core": TARGET_APPENDS_PER_S,
                "sync_s_for_100k_ops": TARGET_SYNC_S,
                "bytes_per_request_at_batch_10": TARGET_BYTES_PER_REQUEST,
            },
        }
        report["targets"] = targets(report, args.quick)
        report["wall_s"] = round(time.perf_counter() - started, 1)
        (args.out / "ledger_throughput.json").write_text(json.dumps(report, indent=2))
        plot(report, args.out / "ledger_throughput.png")
        print_report(report)
        console.print(f"wrote {args.out / 'ledger_throughput.json'} and .png in {report['wall_s']:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
