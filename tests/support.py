"""Helpers for tests that run real processes on loopback: ports, polling, child servers, `wwwserve node`
processes and llama.cpp servers.

The benchmarks use the same helpers (benchmarks/bench_common.py puts the repository root on sys.path and
imports them from here), so that each exists once. Only the standard library and PyYAML here.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
# How long a behaviour check waits by default: ample on a loaded 2-core machine. A check that holds
# returns at once; only a broken one waits this long. Speed is measured by benchmarks/, not here.
DEADLINE_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# -- polling -------------------------------------------------------------------------------------------


class Deadline:
    """`timeout` seconds from now; `check()` raises TimeoutError naming `what` once they have passed."""

    def __init__(self, timeout: float, what: str) -> None:
        self.timeout = timeout
        self.what = what
        self.at = time.monotonic() + timeout

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise TimeoutError(f"{self.what} not met within {self.timeout:g} s")


def wait_until(
    predicate: Callable[[], Any], timeout: float = DEADLINE_S, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned), or raise TimeoutError after `timeout` s."""
    deadline = Deadline(timeout, what)
    while not (result := predicate()):
        deadline.check()
        time.sleep(interval)
    return result


async def until(
    predicate: Callable[[], Any], within: float = DEADLINE_S, interval: float = 0.01, what: str = "condition"
) -> Any:
    """`wait_until` on the event loop: poll `predicate` without blocking the loop."""
    deadline = Deadline(within, what)
    while not (result := predicate()):
        deadline.check()
        await asyncio.sleep(interval)
    return result


# -- HTTP on loopback ---------------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET a loopback `http://host:port/path`: (status, body). Connection errors raise OSError.

    http.client, not an HTTP client library: benchmarks poll with it while they measure other processes."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    assert host in (LOOPBACK, "localhost"), "loopback only"
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status of a GET of `url`, or None when nothing answers."""
    try:
        return http_get(url, timeout)[0]
    except OSError:
        return None


# -- child servers ---------------------------------------------------------------------------------------


class ListeningChild:
    """A child server that prints 'listening [http://]HOST:PORT' once bound and exits when its stdin
    closes: the llama.cpp server (wwwserve_gateway.backends.llamacpp_server), benchmarks/stub_server.py,
    benchmarks/aiohttp_proxy.py."""

    def __init__(self, name: str, cmd: Sequence[str], timeout: float = 60.0) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO
        )
        try:
            self.url = self._read_url(timeout)
        except BaseException:
            self.stop()
            raise

    def _read_url(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.proc.stdout], [], [], left)[0]:
                break
            line = self.proc.stdout.readline().decode(errors="replace")
            if not line:
                break
            if line.startswith("listening "):
                url = line.split()[1].rstrip("/")
                return url if url.startswith("http") else f"http://{url}"
        raise RuntimeError(f"{self.name} did not start (exit code {self.proc.poll()})")

    def answers(self, path: str, status: int = 200) -> bool:
        """Whether GET `path` answers `status` now; raises if the child has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
        return http_status(self.url + path) == status

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def llama_command(
    model: Path, alias: str, *, parallel: int = 1, embedding: bool = False, extra: Sequence[str] = ()
) -> list[str]:
    """The llama.cpp server the embedded backend runs, on a free port."""
    cmd = [
        sys.executable,
        "-m",
        "wwwserve_gateway.backends.llamacpp_server",
        "--model",
        str(model),
        "--alias",
        alias,
        "--port",
        "0",
        "--parallel",
        str(parallel),
    ]
    return [*cmd, *(["--embedding"] if embedding else []), *extra]


class LlamaServer(ListeningChild):
    """A llama.cpp server started directly (the same child the embedded backend runs), ready when made."""

    def __init__(
        self,
        model: Path,
        alias: str,
        *,
        embedding: bool = False,
        parallel: int = 1,
        extra: Sequence[str] = (),
        timeout: float = 120.0,
    ) -> None:
        cmd = llama_command(model, alias, parallel=parallel, embedding=embedding, extra=extra)
        super().__init__(f"llama.cpp {alias}", cmd, timeout)
        try:
            wait_until(lambda: self.answers("/health"), timeout, what="llama.cpp /health")
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def busy_slots(self) -> int:
        slots = json.loads(http_get(self.url + "/slots")[1])
        return sum(1 for s in slots if s.get("is_processing"))


class SilentBackend:
    """A backend that accepts connections and never answers; notes when the other side closes one."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOOPBACK, 0), backlog=16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = threading.Event()
        self.closed_by_peer = threading.Event()
        self._held: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def api_base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self._held.append(conn)
            self.accepted.set()
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
            if not self._closing.is_set():
                self.closed_by_peer.set()

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self.sock.close()


# -- wwwserve nodes ----------------------------------------------------------------------------------------


def no_duels() -> Any:
    """Genesis duel parameters that never duel: for networks whose tests count payments exactly
    (duels pay a second executor and judges; tests/test_duels.py covers them)."""
    from wwwserve_gateway.network.genesis import DuelParams

    return DuelParams(rate=0.0, canary_rate=0.0)


def founding_allocations(workdir: Path, names: Sequence[str], credits: int) -> dict[str, int]:
    """Genesis allocations giving each named node `credits`: its key is created now, in the data
    dir NodeProcess(name=...) uses, since a genesis grants credits only to keys it lists."""
    from wwwserve_gateway.network.identity import NodeIdentity

    return {NodeIdentity.load_or_create(workdir / f"{n}-data").node_id: credits for n in names}


class NodeProcess:
    """`wwwserve node` in a subprocess, with a config written from a dict."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, name: str = "node", command: list[str] | None = None
    ) -> None:
        # What runs it, ending in `--config`: this interpreter's package, unless told otherwise.
        self.command = command or [sys.executable, "-m", "wwwserve_gateway", "node", "--config"]
        self.name = name
        self.port = config.setdefault("node", {}).setdefault("port", free_port())
        config["node"].setdefault("host", LOOPBACK)
        config["node"].setdefault("data_dir", str(workdir / f"{name}-data"))
        self.config = config
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s: float | None = (
            None  # seconds from spawn to the first 200 of the endpoint start waited for
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def spawn(self) -> NodeProcess:
        """Start the process and return at once."""
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )
        return self

    def start(
        self, *, ready_timeout: float = 120.0, wait_ready: bool = True, interval: float = 0.05
    ) -> NodeProcess:
        """Spawn, then wait until /health/ready (or, not `wait_ready`, /health) answers 200."""
        path = "/health/ready" if wait_ready else "/health"
        self.spawn()
        answered_at = wait_until(lambda: self.answered(path), ready_timeout, interval, what=self.url + path)
        self.ready_s = answered_at - self.started_at
        return self

    def answered(self, path: str, status: int = 200) -> float | None:
        """When GET `path` answered `status` (a monotonic time), None if it did not; raises if the node
        has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"node {self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return time.monotonic() if http_status(self.url + path) == status else None

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        status, body = http_get(self.url + path, timeout)
        if status != 200:
            raise RuntimeError(f"GET {self.url}{path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def peers(self) -> dict[str, dict[str, Any]]:
        """This node's view of the network, by node id."""
        return {p["id"]: p for p in self.get_json("/wwwserve/peers")}

    def own_id(self) -> str:
        return next(p["id"] for p in self.get_json("/wwwserve/peers") if p["self"])

    def balances(self) -> dict[str, dict[str, Any]]:
        return self.get_json("/wwwserve/ledger/balances")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the node's /metrics samples of `name` with these labels (0 when it has none: a
        labelled counter appears once first counted)."""
        text = http_get(self.url + "/metrics")[1].decode()
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted)
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- a two-node network ----------------------------------------------------------------------------

PAIR_MODEL = "stub"  # the model benchmarks/stub_server.py serves behind both nodes of delegating_pair
PAIR_BOND = 100
PAIR_POLICIES = {
    # E is always overloaded: it never serves apps locally and always delegates.
    "E": {"target_usage": -1, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0},
    "X": {"target_usage": 1.0, "accept_frequency": 1.0, "bond": PAIR_BOND},
}


@contextlib.contextmanager
def delegating_pair(
    workdir: Path, name: str, node_extra: Callable[[str], dict[str, Any]] = lambda node: {}
) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """(entry E, executor X): two real nodes in front of one stub backend, in a network of their
    own with fast gossip and no duels; E delegates every request, X is alive and staked at E when
    this yields. `node_extra(name)` adds to a node's `node` section."""
    from wwwserve_gateway.network.genesis import GossipParams, LedgerParams, NetworkGenesis, write_genesis

    stub = ListeningChild("stub", [sys.executable, "benchmarks/stub_server.py", "--port", "0"])
    genesis = workdir / "network.yaml"
    ledger = LedgerParams(
        payment_batch_window_s=0.3,
        price_per_request=1.0,
        duels=no_duels(),
        allocations=founding_allocations(workdir, list(PAIR_POLICIES), 1000),
    )
    gossip = GossipParams(interval_s=0.3, probe_timeout_s=0.25, suspect_timeout_s=1.5, refresh_s=2.0)
    write_genesis(NetworkGenesis(name=name, gossip=gossip, ledger=ledger), genesis)
    nodes: dict[str, NodeProcess] = {}
    try:
        for node_name, policy in PAIR_POLICIES.items():
            config = {
                "node": {
                    "network": str(genesis),
                    "bootstrap": [nodes["E"].url] if nodes else [],
                    **node_extra(node_name),
                },
                "model_list": [
                    {
                        "model_name": PAIR_MODEL,
                        "litellm_params": {"model": "openai/stub", "api_base": stub.url + "/v1"},
                    }
                ],
                "policy": {"settings": policy},
                "router": {"settings": {"explore": 0.0}},
            }
            nodes[node_name] = NodeProcess(config, workdir, name=node_name).start()
        entry, executor = nodes["E"], nodes["X"]
        xid = executor.own_id()
        wait_until(
            lambda: (
                entry.peers().get(xid, {}).get("state") == "alive"
                and entry.balances().get(xid, {}).get("bonded") == PAIR_BOND
            ),
            60,
            interval=0.2,
            what="the executor alive and staked at the entry",
        )
        yield entry, executor
    finally:
        for node in nodes.values():
            node.stop()
        stub.stop()
