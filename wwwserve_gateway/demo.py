"""`wwwserve demo`: a local network of N nodes on loopback, one entry that delegates, and a live view.

Node 0 is the entry: its policy delegates every request it can. The others accept peers' requests
and bond stake. Each node runs its own embedded llama.cpp server with one thread. The demo writes a
genesis and one config per node, starts `wwwserve node` for each (every child in its own process
group), waits until all are ready and the entry sees the others alive, and prints
`entry: http://127.0.0.1:PORT/v1` as the first line of stdout. It then shows a table refreshed once
a second and, with traffic on, sends a small chat request to the entry every couple of seconds,
printing its route. Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from wwwserve_gateway.network.genesis import LedgerParams, NetworkGenesis, write_genesis
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugin_api.peers import PeerState

STARTUP_TIMEOUT_S = 300.0  # the first start may pull the model (98 MB)
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL of the node's whole process group
TRAFFIC_INTERVAL_S = 2.0
EXECUTOR_BOND = 100
FOUNDING_CREDITS = 1000  # what the genesis allocates each demo node
LOG_TAIL_LINES = 40
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=3)
CHAT_TIMEOUT = aiohttp.ClientTimeout(total=120)
PROMPTS = (
    "Name a colour.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "Give me a word that rhymes with cat.",
    "What is 2 + 3?",
    "Name an animal that lives in the sea.",
)

err = Console(stderr=True)


@dataclass(frozen=True)
class DemoOptions:
    nodes: int = 3
    model: str = "smollm2"
    base_port: int = 0
    traffic: bool = True
    workdir: Path | None = None


@dataclass
class DemoNode:
    index: int
    port: int
    node_id: str
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def role(self) -> str:
        return "entry" if self.index == 0 else "executor"

    @property
    def short(self) -> str:
        return self.node_id[:8]

    @property
    def name(self) -> str:
        return f"node {self.index} ({self.role}, port {self.port})"

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class StartupFailed(Exception):
    pass


# -- setup ---------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (bound to port 0 together, so the kernel picks distinct ones)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def model_file(model: str) -> Path:
    """The GGUF file of a known model, pulled (or generated) once into the shared models dir."""
    from wwwserve_gateway.model_store import KNOWN_MODELS, TINY_MODEL, find_model, models_dir, pull

    if model not in KNOWN_MODELS and model != TINY_MODEL:
        known = ", ".join([*KNOWN_MODELS, TINY_MODEL])
        raise StartupFailed(f"unknown model {model!r}; known: {known}")
    found = find_model(model)
    if found is not None:
        return found
    with err.status(f"pulling {model} into {models_dir()} (once)"):
        return pull(model, models_dir())


def policy_settings(index: int) -> dict[str, Any]:
    if index == 0:
        # Never idle (target 0): delegate whenever a peer is there; serve locally when none accepts.
        return {"target_usage": 0.0, "offload_frequency": 1.0, "accept_frequency": 0.0, "bond": 0}
    return {"target_usage": 1.0, "accept_frequency": 1.0, "offload_frequency": 0.0, "bond": EXECUTOR_BOND}


def write_network(opts: DemoOptions, workdir: Path, model_path: Path) -> list[DemoNode]:
    """A genesis and one config per node. Identities are created first: the genesis allocates
    each founding node its credits (keys it does not list get none)."""
    genesis_path = workdir / "network.yaml"
    data_dirs = [workdir / f"node{i}" for i in range(opts.nodes)]
    ids = [NodeIdentity.load_or_create(d).node_id for d in data_dirs]
    # Pay executors every 2 s, so balances move while one watches.
    ledger = LedgerParams(payment_batch_window_s=2.0, allocations=dict.fromkeys(ids, FOUNDING_CREDITS))
    write_genesis(NetworkGenesis(name="wwwserve-demo", ledger=ledger), genesis_path)
    if opts.base_port:
        ports = [opts.base_port + i for i in range(opts.nodes)]
    else:
        ports = free_ports(opts.nodes)
    nodes = []
    for i, (port, data_dir, node_id) in enumerate(zip(ports, data_dirs, ids, strict=True)):
        config = {
            "node": {
                "host": "127.0.0.1",
                "port": port,
                "data_dir": str(data_dir),
                "network": str(genesis_path),
                "bootstrap": [f"http://127.0.0.1:{ports[0]}"] if i else [],
            },
            "model_list": [
                {
                    "model_name": opts.model,
                    "litellm_params": {
                        "model": f"llamacpp/{opts.model}",
                        "model_path": str(model_path),
                        "n_threads": 1,  # one decode thread per server: they share the machine
                    },
                }
            ],
            "policy": {"plugin": "frequency", "settings": policy_settings(i)},
        }
        config_path = workdir / f"node{i}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        nodes.append(DemoNode(i, port, node_id, config_path, workdir / f"node{i}.log"))
    return nodes


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the demo dies (even by SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the forked child only calls it
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_node(node: DemoNode) -> None:
    with node.log_path.open("ab") as log:
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "wwwserve_gateway", "node", "--config", str(node.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches only the demo
            preexec_fn=_die_with_parent(),
        )


async def stop_nodes(nodes: list[DemoNode], force: asyncio.Event, grace_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every node, wait for all, SIGKILL the process group of any still there."""
    running = [n for n in nodes if n.proc is not None and n.exited() is None]
    for node in running:
        with contextlib.suppress(ProcessLookupError):
            node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    deadline = time.monotonic() + grace_s
    while any(n.exited() is None for n in running) and time.monotonic() < deadline and not force.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(force.wait(), 0.1)
    for node in nodes:
        if node.proc is None:
            continue
        pgid = node.proc.pid  # the node leads its own process group
        if node.exited() is None:
            _killpg(pgid, signal.SIGKILL)
        for _ in range(50):
            if node.exited() is not None:
                break
            await asyncio.sleep(0.1)
        # What is left of the group (the node's llama.cpp server, which exits when the node's pipe
        # closes) gets a moment, then SIGKILL.
        for _ in range(30):
            if not _killpg(pgid, 0):
                break
            await asyncio.sleep(0.1)
        else:
            _killpg(pgid, signal.SIGKILL)


def _killpg(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a zombie leader not yet reaped still counts; nothing to signal
        return False
    return True


# -- startup -------------------------------------------------------------------------------------


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=HTTP_TIMEOUT) as resp:
        resp.raise_for_status()
        return await resp.json()


async def is_ready(session: aiohttp.ClientSession, node: DemoNode) -> bool:
    try:
        async with session.get(node.url + "/health/ready", timeout=HTTP_TIMEOUT) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def alive_at_entry(session: aiohttp.ClientSession, entry: DemoNode) -> dict[str, dict[str, Any]]:
    try:
        peers = await get_json(session, entry.url + "/wwwserve/peers")
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}
    return {p["id"]: p for p in peers if p.get("state") == PeerState.ALIVE}


def check_alive(nodes: list[DemoNode]) -> None:
    for node in nodes:
        rc = node.exited()
        if rc is not None:
            raise StartupFailed(f"{node.name} exited with code {rc}; its log ends:\n{node.log_tail()}")


async def wait_for_network(
    session: aiohttp.ClientSession, nodes: list[DemoNode], stop: asyncio.Event
) -> None:
    """Every node ready, and the entry seeing every other alive; then a short wait for stake."""
    entry, others = nodes[0], nodes[1:]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with err.status("starting") as status:
        ready: set[int] = set()
        seen: set[str] = set()
        stake_deadline = None
        while not stop.is_set():
            check_alive(nodes)
            if time.monotonic() > deadline:
                late = [n for n in nodes if n.index not in ready] or others
                tails = "\n".join(f"--- {n.name}:\n{n.log_tail()}" for n in late)
                raise StartupFailed(f"the network was not up within {STARTUP_TIMEOUT_S:g} s\n{tails}")
            if len(ready) < len(nodes):
                for node, ok in zip(
                    nodes, await asyncio.gather(*(is_ready(session, n) for n in nodes)), strict=True
                ):
                    if ok and node.index not in ready:
                        ready.add(node.index)
                        err.print(f"[green]✓[/] {node.name} ready ({node.short})")
                status.update(f"loading models: {len(ready)}/{len(nodes)} nodes ready")
            else:
                alive = await alive_at_entry(session, entry)
                for node in others:
                    if node.node_id in alive and node.node_id not in seen:
                        seen.add(node.node_id)
                        err.print(f"[green]✓[/] the entry sees {node.short} alive")
                if len(seen) == len(others):
                    # Executors bond and then advertise stake; the first requests find them drawable.
                    # Not required: the entry serves locally until one is.
                    stake_deadline = stake_deadline or time.monotonic() + 15
                    staked = [n for n in others if (alive.get(n.node_id, {}).get("stake") or 0) > 0]
                    if len(staked) == len(others) or time.monotonic() > stake_deadline:
                        return
                    status.update(f"waiting for stake: {len(staked)}/{len(others)} executors offer it")
                else:
                    status.update(f"joining: the entry sees {len(seen)}/{len(others)} peers")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


# -- the live view -------------------------------------------------------------------------------


def counters(text: str) -> dict[tuple[str, str], float]:
    """(counter, outcome) -> value summed over models, for the delegation counters."""
    wanted = {"wwwserve_delegations_total", "wwwserve_peer_requests_total"}
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and math.isfinite(sample.value):
                key = (sample.name, sample.labels.get("outcome", ""))
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def poll(session: aiohttp.ClientSession, nodes: list[DemoNode]) -> None:
    entry = nodes[0]

    async def metrics(node: DemoNode) -> None:
        try:
            async with session.get(node.url + "/metrics", timeout=HTTP_TIMEOUT) as resp:
                node.stats["counters"] = counters(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass

    async def network() -> None:
        try:
            entry.stats["balances"] = await get_json(session, entry.url + "/wwwserve/ledger/balances")
            entry.stats["peers"] = {
                p["id"]: p for p in await get_json(session, entry.url + "/wwwserve/peers")
            }
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass

    await asyncio.gather(network(), *(metrics(n) for n in nodes if n.exited() is None))


def render(nodes: list[DemoNode], requests: int) -> Table:
    entry = nodes[0]
    balances = entry.stats.get("balances", {})
    peers = entry.stats.get("peers", {})
    table = Table(
        title=f"wwwserve demo: {len(nodes)} nodes, {requests} demo requests (Ctrl-C stops)",
        title_justify="left",
    )
    for column, justify in (
        ("node", "left"),
        ("port", "right"),
        ("role", "left"),
        ("state", "left"),
        ("served for peers", "right"),
        ("delegated", "right"),
        ("liquid", "right"),
        ("bonded", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for node in nodes:
        c = node.stats.get("counters", {})
        served = c.get(("wwwserve_peer_requests_total", "served"), 0)
        ok = c.get(("wwwserve_delegations_total", "ok"), 0)
        failed = sum(c.get(("wwwserve_delegations_total", o), 0) for o in ("failed", "no_executor"))
        delegated = f"{ok:g}" + (f" [yellow](+{failed:g} not)[/]" if failed else "")
        account = balances.get(node.node_id, {})
        rc = node.exited()
        if rc is not None:
            state = f"[red]exited {rc}[/]"
        elif node is entry:
            state = "[green]entry[/]"
        else:
            state = peers.get(node.node_id, {}).get("state", "?")
            state = {PeerState.ALIVE: "[green]alive[/]", PeerState.SUSPECT: "[yellow]suspect[/]"}.get(
                state, f"[red]{state}[/]"
            )
        table.add_row(
            node.short,
            str(node.port),
            node.role,
            state,
            f"{served:g}",
            delegated,
            f"{account['liquid']:g}" if account else "-",
            f"{account['bonded']:g}" if account else "-",
        )
    return table


async def send_traffic(
    session: aiohttp.ClientSession,
    nodes: list[DemoNode],
    model: str,
    out: Console,
    stop: asyncio.Event,
    sent: list[int],
) -> None:
    """One small chat request to the entry every TRAFFIC_INTERVAL_S, never two at once."""
    short = {n.node_id: n.short for n in nodes}
    url = nodes[0].url + "/v1/chat/completions"
    n = 0
    while not stop.is_set():
        prompt = PROMPTS[n % len(PROMPTS)]
        n += 1
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24}
        started = time.perf_counter()
        try:
            async with session.post(url, json=body, timeout=CHAT_TIMEOUT) as resp:
                answer = await resp.json(content_type=None)
                route = resp.headers.get("x-wwwserve-route", "")
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            answer, route, status = {"error": {"message": str(exc) or type(exc).__name__}}, "", 0
        seconds = time.perf_counter() - started
        sent[0] = n
        path = " → ".join(short.get(i, i[:8]) for i in route.split(",") if i) or "?"
        if status == 200:
            text = (answer.get("choices") or [{}])[0].get("message", {}).get("content") or ""
            text = " ".join(text.split())
            where = "[cyan]delegated[/]" if "," in route else "[magenta]local    [/]"
            line = f"#{n:<3} {where} {seconds:5.2f} s  route {path}  [dim]{prompt}[/] {text!r}"
        else:
            message = (
                (answer.get("error") or {}).get("message", answer) if isinstance(answer, dict) else answer
            )
            line = f"#{n:<3} [red]{status or 'error':<9}[/] {seconds:5.2f} s  route {path}  {message}"
        out.print(line, no_wrap=True, overflow="ellipsis", highlight=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(TRAFFIC_INTERVAL_S - seconds, 0.1))


async def dashboard(
    session: aiohttp.ClientSession, nodes: list[DemoNode], opts: DemoOptions, stop: asyncio.Event
) -> None:
    from rich.live import Live

    # A pipe or file gets lines of 120 columns rather than rich's default of 80.
    out = Console() if sys.stdout.isatty() else Console(width=120)
    sent = [0]
    await poll(session, nodes)
    with Live(render(nodes, 0), console=out, auto_refresh=False, transient=False) as live:
        traffic = (
            asyncio.create_task(send_traffic(session, nodes, opts.model, live.console, stop, sent))
            if opts.traffic
            else None
        )
        reported: set[int] = set()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                for node in nodes:
                    if node.exited() is not None and node.index not in reported:
                        reported.add(node.index)
                        live.console.print(
                            f"[red]{node.name} exited with code {node.exited()}[/]; its log ends:\n"
                            f"{node.log_tail(15)}",
                            markup=True,
                            highlight=False,
                        )
                await poll(session, nodes)
                live.update(render(nodes, sent[0]), refresh=True)
        finally:
            if traffic is not None:
                traffic.cancel()
                await asyncio.gather(traffic, return_exceptions=True)
    out.print()


# -- the command ---------------------------------------------------------------------------------


async def run_async(opts: DemoOptions, workdir: Path) -> int:
    loop = asyncio.get_running_loop()
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            force.set()  # a second Ctrl-C: do not wait for graceful shutdowns
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    nodes: list[DemoNode] = []
    try:
        model_path = await asyncio.to_thread(model_file, opts.model)
        nodes = write_network(opts, workdir, model_path)
        for node in nodes:
            start_node(node)
        err.print(
            f"started {len(nodes)} nodes ({opts.model}, one llama.cpp thread each); configs and logs in "
            f"{workdir}{'' if opts.workdir else ' (removed at exit; keep them with --workdir)'}",
            highlight=False,
        )
        async with aiohttp.ClientSession() as session:
            await wait_for_network(session, nodes, stop)
            if stop.is_set():
                return 0
            sys.stdout.write(f"entry: {nodes[0].url}/v1\n")
            sys.stdout.flush()
            err.print(
                f"[bold]entry:[/] {nodes[0].url}/v1  (model '{opts.model}', no API key needed: any value "
                "works, e.g. OpenAI(base_url=..., api_key='none'))",
                highlight=False,
            )
            await dashboard(session, nodes, opts, stop)
        return 0
    except StartupFailed as exc:
        err.print(f"[red]demo failed:[/] {exc}", highlight=False)
        return 1
    finally:
        if nodes:
            with err.status(f"stopping {len(nodes)} nodes"):
                await stop_nodes(nodes, force)
            err.print("stopped every node")


def run(opts: DemoOptions) -> int:
    if opts.nodes < 2:
        err.print("[red]error[/] a demo network needs at least 2 nodes")
        return 2
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
        workdir = opts.workdir.resolve()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="wwwserve-demo-"))
    try:
        return asyncio.run(run_async(opts, workdir))
    finally:
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
