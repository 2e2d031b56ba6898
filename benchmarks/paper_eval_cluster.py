"""The processes of one paper_eval run: an emulator per engine and a `wwwserve node` per node.

Node timings follow the paper's cadence in paper time where that is safe: the engine-load poll
(the reference polls every 3 s) and the policy's retry tick (the reference's 0.5 s dispatch tick)
are divided by the time scale; the gossip interval is 1 paper second but at least 0.2 wall seconds;
failure-detection timeouts stay at their wall-clock defaults, since a loaded 2-core machine would
otherwise see false deaths.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import yaml
from paper_eval_workload import ENTRY, EngineSpec, Event, NodeSpec, Setting

from tests.support import ListeningChild, NodeProcess, free_port

LOOPBACK = "127.0.0.1"
BOND = 100
ALLOCATION = 1000  # credits per node in the genesis (the former default grant)
START_TIMEOUT_S = 120.0
CONVERGE_TIMEOUT_S = 90.0

# Worker policies per variant (the entry node is always client-only, see ENTRY_POLICY).
SINGLE_NODE = {"offload_frequency": 0.0, "queue_frequency": 1.0, "accept_frequency": 0.0, "target_usage": 0.7}
PAPER_DEFAULT = {
    "offload_frequency": 0.8,
    "queue_frequency": 0.2,
    "accept_frequency": 0.8,
    "target_usage": 0.7,
}
ENTRY_POLICY = {"target_usage": -1, "offload_frequency": 1.0, "queue_frequency": 0.0, "accept_frequency": 0.0}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    path: str  # "gateway": to the user's own node; "centralized": dispatcher then a node; "ideal": engines
    policy: str = "frequency"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def has_nodes(self) -> bool:
        return self.path != "ideal"


VARIANTS = {
    v.name: v
    for v in (
        Variant("single", "single-node", "gateway", "frequency", SINGLE_NODE),
        Variant("centralized", "centralized (reference)", "centralized", "frequency", SINGLE_NODE),
        Variant("frequency", "WWW.Serve frequency (paper)", "gateway", "frequency", PAPER_DEFAULT),
        Variant("completion_time", "WWW.Serve completion_time", "gateway", "completion_time", {}),
        Variant("least_loaded", "WWW.Serve least_loaded", "gateway", "least_loaded", {}),
        Variant("ideal", "ideal centralized (JSQ)", "ideal"),
    )
}


class EmulatorProcess:
    """`wwwserve emulate-engine` for one engine of one node; restartable on the same port."""

    def __init__(self, owner: str, spec: EngineSpec, time_scale: float, seed: int) -> None:
        self.owner, self.spec = owner, spec
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "wwwserve_gateway", "emulate-engine", "--profile", spec.profile]
        self.cmd += ["--model", spec.model, "--port", str(self.port), "--time-scale", f"{time_scale:g}"]
        self.cmd += ["--seed", str(seed)]
        self.child: ListeningChild | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    async def start(self) -> None:
        name = f"emulator {self.owner}/{self.spec.model}"
        self.child = await asyncio.to_thread(ListeningChild, name, self.cmd, START_TIMEOUT_S)

    async def stop(self, kill: bool = False) -> None:
        child, self.child = self.child, None
        if child is None:
            return
        if kill:  # the machine died: no goodbye
            child.proc.kill()
        await asyncio.to_thread(child.stop)


class Cluster:
    def __init__(
        self, setting: Setting, variant: Variant, time_scale: float, workdir: Path, seed: int
    ) -> None:
        self.setting, self.variant, self.scale, self.workdir, self.seed = (
            setting,
            variant,
            time_scale,
            workdir,
            seed,
        )
        self.engines: dict[tuple[str, str], EmulatorProcess] = {}
        self.nodes: dict[str, NodeProcess] = {}
        self.ids: dict[str, str] = {}  # node id -> name
        self.up: set[str] = set()  # nodes whose engines (and gateway) take new requests
        self.genesis = workdir / "network.yaml"
        self._event_locks: dict[str, asyncio.Lock] = {}
        for k, node in enumerate(setting.nodes):
            for j, spec in enumerate(node.engines):
                self.engines[(node.name, spec.model)] = EmulatorProcess(
                    node.name, spec, time_scale, seed * 100 + k * 10 + j
                )

    # -- start and stop ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self.variant.has_nodes:
            await self._write_genesis()
        initial = [n for n in self.setting.nodes if n.starts]
        await asyncio.gather(*(self._start_engines(n) for n in initial))
        if not self.variant.has_nodes:
            self.up.update(n.name for n in initial if n.engines)
            return
        first, rest = initial[0], initial[1:]
        await self._start_node(first)
        await asyncio.gather(*(self._start_node(n) for n in rest))
        await self.wait_converged([n.name for n in initial])

    async def stop(self) -> None:
        await asyncio.gather(
            *(asyncio.to_thread(node.stop, signal.SIGTERM, 60) for node in self.nodes.values())
        )
        await asyncio.gather(*(e.stop() for e in self.engines.values()))

    async def _write_genesis(self) -> None:
        """`wwwserve network init` with a fast gossip interval; then every node of the setting gets
        ALLOCATION credits in the genesis (credits enter a network only there), under the node id of
        a key made beforehand in its data dir with `wwwserve keys new`."""
        wwwserve = [sys.executable, "-m", "wwwserve_gateway"]
        interval = f"{max(0.2, 1.0 / self.scale):g}"
        for node in self.setting.nodes:
            self.data_dir(node.name).mkdir(mode=0o700)  # private, as the node wants it
        ids = await asyncio.gather(
            *(
                _run([*wwwserve, "keys", "new", "--data-dir", str(self.data_dir(n.name))])
                for n in self.setting.nodes
            ),
            _run([*wwwserve, "network", "init", "-o", str(self.genesis), "--interval", interval, "--force"]),
        )
        genesis = yaml.safe_load(self.genesis.read_text())
        ledger = genesis.setdefault("ledger", {})
        if "initial_grant" not in ledger:  # a grant to every joiner was the older rule
            ledger["allocations"] = {node_id.strip(): ALLOCATION for node_id in ids[:-1]}
        self.genesis.write_text(yaml.safe_dump(genesis, sort_keys=True))

    def data_dir(self, name: str) -> Path:
        return self.workdir / f"{name}-data"

    async def _start_engines(self, node: NodeSpec) -> None:
        await asyncio.gather(*(self.engines[(node.name, e.model)].start() for e in node.engines))

    def node_config(self, node: NodeSpec) -> dict[str, Any]:
        entry_url = self.nodes[ENTRY].url if node.name != ENTRY and ENTRY in self.nodes else None
        policy = ENTRY_POLICY if not node.engines else self.variant.settings
        index = self.setting.nodes.index(node)
        settings = {**policy, "bond": BOND if node.engines else 0, "seed": self.seed * 1000 + index}
        if self.variant.policy == "frequency" or not node.engines:
            settings["retry_after_s"] = max(0.01, 0.5 / self.scale)  # the reference's dispatch tick
        return {
            "node": {
                "host": LOOPBACK,
                "port": free_port(),
                "data_dir": str(self.data_dir(node.name)),
                "network": str(self.genesis),
                "bootstrap": [entry_url] if entry_url else [],
                # A whole answer is silence until it is done: allow the slowest request plenty.
                "request_timeout": max(600.0, 4000.0 / self.scale),
                "load_poll_interval": max(0.05, 1.0 / self.scale),
                "log_level": "warning",
            },
            "model_list": [
                {
                    "model_name": e.model,
                    "litellm_params": {
                        "model": f"hosted_vllm/{e.model}",
                        "api_base": self.engines[(node.name, e.model)].url + "/v1",
                    },
                    "model_info": {"id": f"{node.name}-{e.model}"},
                }
                for e in node.engines
            ],
            "policy": {
                "plugin": "frequency" if not node.engines else self.variant.policy,
                "settings": settings,
            },
            "router": {"plugin": "pos"},
        }

    async def _start_node(self, node: NodeSpec) -> None:
        proc = self.nodes.get(node.name)
        if proc is None:
            proc = NodeProcess(self.node_config(node), self.workdir, node.name)
            self.nodes[node.name] = proc
        await asyncio.to_thread(proc.start, ready_timeout=START_TIMEOUT_S)
        self.ids[await asyncio.to_thread(proc.own_id)] = node.name
        if node.engines:
            self.up.add(node.name)

    async def wait_converged(self, names: list[str]) -> float:
        """Until every node sees every other alive, and every worker has stake at every node."""
        t0 = time.monotonic()
        workers = {n for n in names if self.setting.node(n).engines}
        last = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() - t0 < CONVERGE_TIMEOUT_S:
                missing = []
                for name in names:
                    try:
                        async with s.get(self.nodes[name].url + "/wwwserve/peers") as resp:
                            view = {self.ids.get(p["id"]): p for p in await resp.json()}
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        missing.append(f"{name}: {exc}")
                        continue
                    for other in names:
                        peer = view.get(other)
                        if other == name:
                            continue
                        if peer is None or peer["state"] != "alive":
                            missing.append(f"{name} does not see {other} alive")
                        elif other in workers and not (peer.get("stake") or 0) > 0:
                            missing.append(f"{name} sees no stake at {other}")
                if not missing:
                    return time.monotonic() - t0
                last = "; ".join(missing[:3])
                await asyncio.sleep(0.2)
        raise TimeoutError(f"the network did not converge in {CONVERGE_TIMEOUT_S:g} s: {last}")

    # -- events -----------------------------------------------------------------------------------
    async def apply(self, event: Event, now: Callable[[], float], drained: Any = None) -> float:
        """Carry out a join or leave; returns when it started (`now()`): a node's events run in order,
        so a rejoin waits until its departure is complete. `drained(name)` (ideal path) waits for the
        runner's requests to that node's engines to finish before they stop, as a gateway drains."""
        async with self._event_locks.setdefault(event.node, asyncio.Lock()):
            started = now()
            await self._apply(event, drained)
        return started

    async def _apply(self, event: Event, drained: Any) -> None:
        spec = self.setting.node(event.node)
        engines = [self.engines[(spec.name, e.model)] for e in spec.engines]
        if event.action == "join":
            await self._start_engines(spec)
            if self.variant.has_nodes:
                await self._start_node(spec)
            else:
                self.up.add(spec.name)
            return
        self.up.discard(spec.name)
        if event.action == "kill":
            node = self.nodes.get(spec.name)
            stops = [asyncio.to_thread(node.stop, signal.SIGKILL)] if node is not None else []
            await asyncio.gather(*stops, *(e.stop(kill=True) for e in engines))
            return
        if spec.name in self.nodes:  # SIGTERM: the gateway drains, then the GPU goes away
            await asyncio.to_thread(self.nodes[spec.name].stop, signal.SIGTERM, 60)
        elif drained is not None:
            await drained(spec.name)
        await asyncio.gather(*(e.stop() for e in engines))

    # -- what the report needs ----------------------------------------------------------------------
    def name_of(self, node_id: str) -> str:
        return self.ids.get(node_id, node_id[:12])

    async def delegation_counters(self) -> dict[str, dict[str, float]]:
        """Each running node's delegation counters (attempts, declines, failovers, peer requests)."""
        from delegation_overhead import Node as OverheadNode

        async def one(name: str, node: NodeProcess) -> tuple[str, dict[str, float]]:
            # counters() reads only self.url: reuse it rather than copy it.
            return name, await asyncio.to_thread(OverheadNode.counters, SimpleNamespace(url=node.url))  # type: ignore[arg-type]

        alive = [(n, p) for n, p in self.nodes.items() if p.proc is not None and p.proc.poll() is None]
        return dict(await asyncio.gather(*(one(n, p) for n, p in alive)))

    def node_logs(self) -> dict[str, dict[str, Any]]:
        """Warnings, errors and tracebacks in each node's log."""
        from delegation_overhead import Node as OverheadNode

        findings = {}
        for name, node in self.nodes.items():
            # log_findings reads only self.log_path: reuse it rather than copy it.
            findings[name] = OverheadNode.log_findings(SimpleNamespace(log_path=node.log_path))  # type: ignore[arg-type]
        return findings


async def _run(cmd: list[str]) -> str:
    """Run a command; its stdout. Raises if it fails."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {err.decode(errors='replace')[-500:]}")
    return out.decode()
