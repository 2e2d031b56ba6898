"""Durable storage of ledger operations: SQLModel tables in SQLite (WAL) or PostgreSQL.

Tables: `ledger_ops` (one row per operation, keyed by (author, seq), holding the canonical signed bytes),
`ledger_heads` (each author's last seq and hash), `ledger_meta` (the network id the DB belongs to) and
`ledger_pending` (receipts this node owes for and has not paid yet, keyed by receipt key: a debt is on
disk before the app is told about it, and leaves in the transaction that stores the pay operation).
The store enforces the chain rules (seq contiguity, prev links, no equivocation) so that what it holds
is always a set of well-formed chains; signatures are checked by the caller (`parse_op`) before an
append, and again by `verify()` over what is on disk, so a node refuses a tampered database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import BigInteger, Engine, LargeBinary, and_, bindparam, event, func, or_, select, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Field, SQLModel, create_engine

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation, Operation, parse_op

# How many of each author's newest operations are re-verified when a store is opened: the full check
# is `verify()`, which reads every row (`wwwserve ledger verify`).
OPEN_CHECK_TAIL = 8
PAGE = 1000
NETWORK_KEY = "network_id"
WRITE_OPTION = "ledger_write"
INSERT_PENDING_SQLITE = (
    "INSERT INTO ledger_pending (executor, entry, request, created, raw) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)


class LedgerOpRow(SQLModel, table=True):
    __tablename__ = "ledger_ops"
    author: str = Field(primary_key=True, max_length=64)
    seq: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False})
    hash: str = Field(max_length=64)
    prev: str = Field(max_length=64)
    kind: str = Field(max_length=16)
    ts: float
    raw: bytes = Field(sa_type=LargeBinary)  # canonical signed operation: what is verified and relayed


class LedgerHeadRow(SQLModel, table=True):
    __tablename__ = "ledger_heads"
    author: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_type=BigInteger)
    hash: str = Field(max_length=64)


class LedgerMetaRow(SQLModel, table=True):
    __tablename__ = "ledger_meta"
    key: str = Field(primary_key=True, max_length=64)
    value: str


class LedgerPendingRow(SQLModel, table=True):
    """A debt of this node: a signed receipt it has not paid yet. Keyed as `ledger_rules.receipt_key`."""

    __tablename__ = "ledger_pending"
    executor: str = Field(primary_key=True, max_length=64)
    entry: str = Field(primary_key=True, max_length=64)
    request: str = Field(primary_key=True, max_length=64)
    created: float  # wall-clock time the debt was recorded (payment order)
    raw: bytes = Field(sa_type=LargeBinary)  # canonical signed receipt, as it goes into the pay operation


OPS = LedgerOpRow.__table__  # type: ignore[attr-defined]
HEADS = LedgerHeadRow.__table__  # type: ignore[attr-defined]
META = LedgerMetaRow.__table__  # type: ignore[attr-defined]
PENDING = LedgerPendingRow.__table__  # type: ignore[attr-defined]
TABLES = [OPS, HEADS, META, PENDING]
# Receipt keys per statement that reads or deletes pending rows (three bound values each).
KEYS_PER_QUERY = 300

ReceiptKey = tuple[str, str, str]  # (executor, entry, request hash)


class LedgerStoreError(Exception):
    pass


class ChainError(LedgerStoreError):
    """An operation that does not extend its author's chain: a gap in seq or a wrong prev."""


class ChainFork(LedgerStoreError):
    """Two different operations with the same author and seq: the makings of a fraud proof.

    `stored` is the one already held (or, for two forks in one batch, the one earlier in it).
    """

    def __init__(self, stored: Operation, offered: Operation) -> None:
        super().__init__(f"author {stored.author[:8]}.. seq {stored.seq}: already holds {stored.hash[:12]}..")
        self.stored = stored
        self.offered = offered


class PendingGone(LedgerStoreError):
    """A pay operation would settle pending receipts that are no longer stored (another writer
    sharing the database paid or dropped them): nothing was stored. `missing` names them."""

    def __init__(self, missing: set[ReceiptKey]) -> None:
        super().__init__(f"{len(missing)} pending receipts are no longer stored")
        self.missing = missing


class AuthorInUse(LedgerStoreError):
    """Another process writes this author's chain in the same database."""


class WrongNetwork(LedgerStoreError):
    """The database belongs to another network (another genesis)."""


class TamperedLedger(LedgerStoreError):
    """What is on disk fails verification; `problems` names each bad row."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        super().__init__(f"the ledger database fails verification: {shown}")
        self.problems = problems


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir}/ledger.db"


def _who(author: str) -> str:
    return f"author={author[:8]}.."


def _as_bytes(value: Any) -> bytes:
    # A value written behind our back may come back as text (SQLite is dynamically typed).
    return value.encode() if isinstance(value, str) else bytes(value)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _key_in(keys: list[ReceiptKey]) -> Any:
    return tuple_(PENDING.c.executor, PENDING.c.entry, PENDING.c.request).in_(keys)


def _decode(raw: bytes) -> Operation:
    """An Operation from stored bytes without the signature check (done on append and by verify()).

    The hash is recomputed rather than read from its column, so a read never returns an operation
    under a hash that does not match its contents.
    """
    raw = _as_bytes(raw)
    signed = orjson.loads(raw)
    op = signed["op"]
    return Operation(
        op["author"],
        op["seq"],
        op["prev"],
        op["kind"],
        op["body"],
        op["ts"],
        hashlib.sha256(canonical(op)).hexdigest(),
        signed["sig"],
        raw,
    )


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" below issue BEGIN itself (pysqlite's implicit BEGIN is deferred).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; synchronous=FULL: the WAL is fsynced at every
            # commit, so an append that returned survives a power loss, not just a process crash.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # A writer takes the write lock (IMMEDIATE) before it reads the heads, so two writers
            # (threads or processes) cannot both extend the same head; readers take no lock.
            write = conn.get_execution_options().get(WRITE_OPTION, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    # PostgreSQL: the default synchronous_commit=on flushes the WAL before COMMIT returns.
    return create_engine(url, pool_pre_ping=True)


class LedgerStore:
    def __init__(self, url: str, network_id: str, *, check_on_open: bool = True) -> None:
        """Open (creating tables if needed) the ledger DB at `url` for `network_id`.

        Raises WrongNetwork for a DB of another network, and TamperedLedger when the fast check
        (`verify(tail=OPEN_CHECK_TAIL)`) finds a problem; pass check_on_open=False to open a DB only
        to run the full `verify()` on it.
        """
        self.url = url
        self.network_id = network_id
        self.engine = _make_engine(url)
        self._writer = self.engine.execution_options(**{WRITE_OPTION: True})
        self._postgres = self.engine.dialect.name == "postgresql"
        self._author_lock: Any = None  # the connection holding hold_author's lock
        SQLModel.metadata.create_all(self.engine, tables=TABLES)
        self._claim_network()
        if check_on_open:
            problems = self.verify(tail=OPEN_CHECK_TAIL)
            if problems:
                self.close()
                raise TamperedLedger(problems)

    def _claim_network(self) -> None:
        for _ in range(2):  # a second try covers another replica creating the row at the same time
            try:
                with self._writer.begin() as conn:
                    row = conn.execute(select(META.c.value).where(META.c.key == NETWORK_KEY)).first()
                    if row is None:
                        conn.execute(META.insert().values(key=NETWORK_KEY, value=self.network_id))
                        return
            except IntegrityError:
                continue
            if row.value != self.network_id:
                raise WrongNetwork(
                    f"{self.url} holds the ledger of network {row.value}, not {self.network_id}"
                )
            return
        raise LedgerStoreError(f"{self.url}: could not record the network id")

    # -- writes ---------------------------------------------------------------------------------

    def append(self, ops: list[Operation], settled: Iterable[ReceiptKey] = ()) -> None:
        """Store `ops` (already verified by parse_op) in one transaction, all or nothing.

        Each op must extend its author's chain as it stands after the ops before it in `ops`.
        An op already stored (same author, seq and hash) is skipped, so re-delivery is harmless.
        `settled` names pending receipts (`ledger_pending`) that the ops pay: their rows are deleted
        in the same transaction, so a debt is either pending or paid, never both nor neither.
        Raises ChainFork (same author/seq, another hash), ChainError (gap, wrong prev) or PendingGone
        (a settled receipt is not pending any more); nothing is stored then. When append returns, the
        ops are committed and on stable storage.
        """
        keys = list(dict.fromkeys(settled))
        if not ops and not keys:
            return
        for attempt in range(3):
            try:
                with self._writer.begin() as conn:
                    self._settle(conn, keys)
                    if ops:
                        self._append(conn, ops)
                return
            except IntegrityError:
                # PostgreSQL replicas racing to start the same new chain: the loser retries and
                # then sees the winner's rows (skipped as duplicates, or a ChainFork).
                if attempt == 2:
                    raise
            except OperationalError:
                # PostgreSQL deadlocks (replicas inserting new chains in different orders) are
                # transient: retry. On SQLite an OperationalError is a real failure.
                if attempt == 2 or not self._postgres:
                    raise

    def _append(self, conn: Any, ops: list[Operation]) -> None:
        authors = sorted({op.author for op in ops})
        query = select(HEADS.c.author, HEADS.c.seq, HEADS.c.hash).where(HEADS.c.author.in_(authors))
        if self._postgres:
            # Row locks (in a fixed order) serialize replicas extending the same chains.
            query = query.order_by(HEADS.c.author).with_for_update()
        stored = {r.author: (r.seq, r.hash) for r in conn.execute(query)}
        heads = dict(stored)
        batch: dict[tuple[str, int], Operation] = {}
        rows: list[dict[str, Any]] = []
        for op in ops:
            seq, head_hash = heads.get(op.author, (0, ""))
            if op.seq <= seq:
                held = batch.get((op.author, op.seq)) or self._stored_op(conn, op.author, op.seq)
                if held is None:
                    raise ChainError(f"{_who(op.author)} seq {op.seq}: below the head but not stored")
                if held.hash != op.hash:
                    raise ChainFork(held, op)
                continue
            if op.seq != seq + 1:
                raise ChainError(f"{_who(op.author)} seq {op.seq}: the chain's head is at seq {seq}")
            if op.prev != head_hash:
                raise ChainError(f"{_who(op.author)} seq {op.seq}: prev does not match the head's hash")
            heads[op.author] = (op.seq, op.hash)
            batch[(op.author, op.seq)] = op
            rows.append(
                {
                    "author": op.author,
                    "seq": op.seq,
                    "hash": op.hash,
                    "prev": op.prev,
                    "kind": op.kind,
                    "ts": op.ts,
                    "raw": op.raw,
                }
            )
        if not rows:
            return
        conn.execute(OPS.insert(), rows)
        moved = [{"a": a, "s": s, "h": h} for a, (s, h) in heads.items() if stored.get(a) != (s, h)]
        updates = [m for m in moved if m["a"] in stored]
        inserts = [{"author": m["a"], "seq": m["s"], "hash": m["h"]} for m in moved if m["a"] not in stored]
        if updates:
            stmt = (
                HEADS.update()
                .where(HEADS.c.author == bindparam("a"))
                .values(seq=bindparam("s"), hash=bindparam("h"))
            )
            conn.execute(stmt, updates)
        if inserts:
            conn.execute(HEADS.insert(), inserts)

    def _settle(self, conn: Any, keys: list[ReceiptKey]) -> None:
        """Delete the pending rows of `keys`, all of which must be held (else PendingGone)."""
        held: set[ReceiptKey] = set()
        for chunk in _chunks(keys, KEYS_PER_QUERY):
            query = select(PENDING.c.executor, PENDING.c.entry, PENDING.c.request).where(_key_in(chunk))
            if self._postgres:
                # A replica settling the same rows waits here, then finds them gone.
                query = query.order_by(PENDING.c.executor, PENDING.c.entry, PENDING.c.request)
                query = query.with_for_update()
            held.update((r.executor, r.entry, r.request) for r in conn.execute(query))
        missing = set(keys) - held
        if missing:
            raise PendingGone(missing)
        for chunk in _chunks(keys, KEYS_PER_QUERY):
            conn.execute(PENDING.delete().where(_key_in(chunk)))

    def add_pending(self, key: ReceiptKey, raw: bytes, created: float) -> bool:
        """Record one debt; False (and nothing changed) when its key is already pending."""
        return self.add_pending_many([(key, raw, created)]) == 1

    def add_pending_many(self, rows: list[tuple[ReceiptKey, bytes, float]]) -> int:
        """Record debts, each a canonical signed receipt under its receipt key, in one transaction;
        returns how many were new (a key already pending is left as it is).

        When it returns the rows are committed: they survive the node's process being killed. They
        reach stable storage (survive a power cut) with the next ledger operation's commit, without
        an fsync of their own: one per delegated request cost the entry node about 3 ms of disk wait
        and much of its CPU, while debts are paid within a batch window anyway.
        """
        if not rows:
            return 0
        params = [(ex, en, rq, created, raw) for (ex, en, rq), raw, created in rows]
        with self._writer.connect() as conn:
            if self._postgres:
                with conn.begin():
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    names = ("executor", "entry", "request", "created", "raw")
                    # RETURNING says which rows were new (rowcount is -1 here with psycopg).
                    insert = postgresql.insert(PENDING).on_conflict_do_nothing().returning(PENDING.c.request)
                    return sum(
                        len(conn.execute(insert.values(**dict(zip(names, p, strict=True)))).all())
                        for p in params
                    )
            # SQLite, on the DBAPI connection: SQLAlchemy would open a transaction first, and SQLite
            # refuses to change the safety level inside one; its statement handling also cost more
            # CPU than the insert.
            cursor = conn.connection.driver_connection.cursor()
            try:
                cursor.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: no fsync at commit
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    before = conn.connection.driver_connection.total_changes
                    cursor.executemany(INSERT_PENDING_SQLITE, params)
                    added = conn.connection.driver_connection.total_changes - before
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                return added
            finally:
                cursor.execute("PRAGMA synchronous=FULL")
                cursor.close()

    def drop_pending(self, keys: Iterable[ReceiptKey]) -> int:
        """Delete pending rows (receipts found already paid); returns how many were held."""
        count = 0
        with self._writer.begin() as conn:
            for chunk in _chunks(list(dict.fromkeys(keys)), KEYS_PER_QUERY):
                count += conn.execute(PENDING.delete().where(_key_in(chunk))).rowcount
        return count

    def pending(self, entry: str) -> list[tuple[bytes, float]]:
        """(raw signed receipt, created) of every debt of `entry` not paid yet, oldest first."""
        query = (
            select(PENDING.c.raw, PENDING.c.created)
            .where(PENDING.c.entry == entry)
            .order_by(PENDING.c.created, PENDING.c.executor, PENDING.c.request)
        )
        with self.engine.connect() as conn:
            return [(_as_bytes(r.raw), r.created) for r in conn.execute(query)]

    @staticmethod
    def _stored_op(conn: Any, author: str, seq: int) -> Operation | None:
        row = conn.execute(select(OPS.c.raw).where(OPS.c.author == author, OPS.c.seq == seq)).first()
        return None if row is None else _decode(row.raw)

    # -- reads ----------------------------------------------------------------------------------

    def heads(self) -> dict[str, tuple[int, str]]:
        with self.engine.connect() as conn:
            return {r.author: (r.seq, r.hash) for r in conn.execute(select(HEADS))}

    def head(self, author: str) -> tuple[int, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(HEADS).where(HEADS.c.author == author)).first()
        return None if row is None else (row.seq, row.hash)

    def ops(self, author: str, start: int = 1, end: int | None = None, limit: int = 1000) -> list[Operation]:
        """The author's operations with start <= seq <= end (inclusive), oldest first, at most `limit`."""
        query = select(OPS.c.raw).where(OPS.c.author == author, OPS.c.seq >= start)
        if end is not None:
            query = query.where(OPS.c.seq <= end)
        query = query.order_by(OPS.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [_decode(r.raw) for r in conn.execute(query)]

    def _rows(self, *columns: Any) -> Iterator[Any]:
        """Every ops row in (author, seq) order, in pages: no transaction stays open while the
        caller works, which would hold back SQLite's WAL checkpoints."""
        after: tuple[str, int] | None = None
        while True:
            query = select(OPS.c.author, OPS.c.seq, *columns)
            if after is not None:
                a, s = after
                query = query.where(or_(OPS.c.author > a, and_(OPS.c.author == a, OPS.c.seq > s)))
            query = query.order_by(OPS.c.author, OPS.c.seq).limit(PAGE)
            with self.engine.connect() as conn:
                page = conn.execute(query).all()
            yield from page
            if len(page) < PAGE:
                return
            after = (page[-1].author, page[-1].seq)

    def all_ops(self) -> Iterator[Operation]:
        """Every stored operation, by author then seq (the fold does not depend on the order)."""
        for row in self._rows(OPS.c.raw):
            yield _decode(row.raw)

    def linked_ops(self) -> list[Operation]:
        """Every stored operation, checking what is cheap on the way: each row decodes, chains run
        1, 2, 3... and each op's prev is the hash of the op before it (recomputed from its bytes),
        so a changed byte anywhere but a chain's newest op breaks a link. Signatures are not
        checked here (about 70 us each; verify() does). Raises TamperedLedger naming the rows."""
        ops: list[Operation] = []
        problems: list[str] = []
        last: tuple[str, int, str] = ("", 0, "")
        for row in self._rows(OPS.c.raw):
            where = f"ledger_ops row {_who(row.author)} seq={row.seq}"
            try:
                op = _decode(row.raw)
            except (ValueError, KeyError, TypeError) as exc:
                problems.append(f"{where}: its contents are not an operation ({exc})")
                continue
            before = last if last[0] == row.author else (row.author, 0, "")
            if (op.author, op.seq) != (row.author, row.seq):
                problems.append(f"{where}: columns do not match its contents")
            elif op.seq != before[1] + 1:
                problems.append(f"{where}: follows seq {before[1]} (a gap)")
            elif op.prev != before[2]:
                problems.append(f"{where}: prev does not match the hash of seq {before[1]}")
            last = (row.author, row.seq, op.hash)
            ops.append(op)
            if len(problems) >= 20:
                break
        if problems:
            raise TamperedLedger(problems)
        return ops

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(OPS)).scalar_one())

    # -- verification ---------------------------------------------------------------------------

    def verify(self, tail: int | None = None) -> list[str]:
        """Re-check what is stored; [] means sound. Each problem names its table and row.

        With tail=None every ops row is checked (signature, hash, columns, seq contiguity, prev
        links) and the heads against the chains. With tail=K only each author's K newest ops are,
        plus the heads: what a node does on every start.
        """
        problems: list[str] = []
        with self._snapshot() as conn:
            meta = conn.execute(select(META.c.value).where(META.c.key == NETWORK_KEY)).first()
            heads = {r.author: (r.seq, r.hash) for r in conn.execute(select(HEADS))}
            per_author = select(OPS.c.author, func.max(OPS.c.seq).label("top"), func.count().label("n"))
            tops = {r.author: (r.top, r.n) for r in conn.execute(per_author.group_by(OPS.c.author))}
            columns = (OPS.c.hash, OPS.c.prev, OPS.c.kind, OPS.c.ts, OPS.c.raw)
            tails: list[Any] = []
            for author, (seq, _) in [] if tail is None else sorted(heads.items()):
                # One op before the tail is read too, to anchor the first tail op's prev link.
                query = select(OPS.c.author, OPS.c.seq, *columns).where(
                    OPS.c.author == author, OPS.c.seq >= seq - tail
                )
                tails.extend(conn.execute(query.order_by(OPS.c.seq)))
        if meta is None or meta.value != self.network_id:
            problems.append(f"ledger_meta row key={NETWORK_KEY}: does not name network {self.network_id}")
        for author, (seq, _) in sorted(heads.items()):
            top, n = tops.get(author, (0, 0))
            if top != seq:
                problems.append(f"ledger_heads row {_who(author)}: seq {seq}, but its last op is seq {top}")
            if n != top:
                problems.append(f"ledger_ops rows {_who(author)}: {n} ops for seqs 1..{top}")
        for author in sorted(set(tops) - set(heads)):
            problems.append(f"ledger_ops rows {_who(author)}: no ledger_heads row for this author")
        # The full check reads page by page, after the snapshot: rows are only ever added, so later
        # pages can only hold newer ops, past the heads read above, never a changed row.
        rows: Iterable[Any] = self._rows(*columns) if tail is None else tails
        last: dict[str, tuple[int, str]] = {}
        for row in rows:
            # The full check starts every chain at (0, ""): seq 1 with an empty prev.
            before = last.get(row.author, (0, "") if tail is None else None)
            problems.extend(self._check_row(row, before))
            last[row.author] = (row.seq, row.hash)
        for author, (seq, hash_) in sorted(heads.items()):
            if author in last and last[author][0] == seq and last[author][1] != hash_:
                problems.append(f"ledger_heads row {_who(author)}: hash does not match op seq {seq}")
        return problems

    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """A read transaction that sees one state of the DB, while replicas may be appending."""
        with self.engine.connect() as conn:
            if self._postgres:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            # SQLite: a deferred BEGIN already reads one snapshot of the WAL until it ends.
            with conn.begin():
                yield conn

    @staticmethod
    def _check_row(row: Any, before: tuple[int, str] | None) -> list[str]:
        where = f"ledger_ops row {_who(row.author)} seq={row.seq}"
        raw = _as_bytes(row.raw)
        try:
            op = parse_op(orjson.loads(raw))
        except (InvalidOperation, orjson.JSONDecodeError, TypeError) as exc:
            return [f"{where}: its contents are not a valid signed operation ({exc})"]
        problems = []
        if op.hash != row.hash:
            problems.append(f"{where}: hash does not match its contents")
        if op.raw != raw:
            problems.append(f"{where}: stored bytes are not in canonical form")
        got = (op.author, op.seq, op.prev, op.kind, float(op.ts))
        if got != (row.author, row.seq, row.prev, row.kind, float(row.ts)):
            problems.append(f"{where}: columns do not match its contents")
        if before is None:
            return problems
        if row.seq != before[0] + 1:
            problems.append(f"{where}: follows seq {before[0]} (a gap)")
        elif op.prev != before[1]:
            problems.append(f"{where}: prev does not match the hash of seq {before[0]}")
        return problems

    def hold_author(self, author: str) -> None:
        """Claim `author`'s chain for this process (PostgreSQL: a session advisory lock, held on a
        connection of its own until close). Raises AuthorInUse when another process holds it: two
        writers of one chain would sign different operations at the same seq, a fork the network
        bars for good. SQLite is covered by the data dir's lock (the database lives there)."""
        if not self._postgres or self._author_lock is not None:
            return
        key = int.from_bytes(
            hashlib.sha256(f"{self.network_id}:{author}".encode()).digest()[:8], "big", signed=True
        )
        conn = self.engine.connect()
        if not conn.execute(select(func.pg_try_advisory_lock(key))).scalar():
            conn.close()
            raise AuthorInUse(
                f"another process is writing the ledger chain of {author[:16]} in {self.engine.url!r}: "
                "two processes with one identity would fork it. Stop the other one"
            )
        conn.commit()
        self._author_lock = conn

    def close(self) -> None:
        if self._author_lock is not None:
            self._author_lock.close()
            self._author_lock = None
        self.engine.dispose()
