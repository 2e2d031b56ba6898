"""A real PostgreSQL server for tests, from Debian's binaries (`apt-get install postgresql`).

Use it from a test module with `pytest_plugins = ("tests.postgres",)`; the `postgres_server` fixture
(one server per session) hands out fresh databases through `create_database()`, and `ledger_url` runs a
test once on a fresh SQLite database and once on a fresh PostgreSQL one. The cluster lives in
a temporary directory, listens on a free loopback port only, and is stopped at teardown. PostgreSQL
refuses to run as root, so under root the cluster is owned by, and run as, the `postgres` user.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port
from wwwserve_gateway.plugins.ledger.store import default_url

INSTALL_HINT = "PostgreSQL server binaries not found: apt-get install postgresql"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists()]
    if found:
        return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="wwwserve-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._ids = itertools.count(1)
        # Under root, run everything as `postgres`; the temp dir must be theirs (mkdtemp makes 0700).
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{tool} failed: {done.stdout}{done.stderr}{log[-2000:]}")

    def start(self) -> None:
        # Loopback TCP only; the Unix socket goes in our own dir, not the system's /var/run/postgresql.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=100"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; mode "immediate" is a crash (no checkpoint: recovery replays the WAL)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"test_{next(self._ids)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip(INSTALL_HINT)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(
                "running as root without a `postgres` user to run the server: apt-get install postgresql"
            )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install 'psycopg[binary]'")
    server = PostgresServer(bindir)
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty ledger database: SQLite under tmp_path/db, then a PostgreSQL database."""
    if request.param == "sqlite":
        return default_url(tmp_path / "db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()
