"""Helpers for tests that run real node processes and real llama.cpp servers on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:g} s")
        time.sleep(interval)


class NodeProcess:
    """`wwwserve node` in a subprocess, with a config written from a dict."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, name: str = "node", command: list[str] | None = None
    ) -> None:
        # What runs it, ending in `--config`: this interpreter's package, unless told otherwise.
        self.command = command or [sys.executable, "-m", "wwwserve_gateway", "node", "--config"]
        self.port = config.setdefault("node", {}).setdefault("port", free_port())
        config["node"].setdefault("host", "127.0.0.1")
        config["node"].setdefault("data_dir", str(workdir / f"{name}-data"))
        self.config = config
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, ready_timeout: float = 120.0, wait_ready: bool = True) -> NodeProcess:
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )
        wait_until(self._health_is(200, "/health"), ready_timeout, what=f"{self.url}/health")
        if wait_ready:
            wait_until(self._health_is(200, "/health/ready"), ready_timeout, what=f"{self.url}/health/ready")
        return self

    def _health_is(self, status: int, path: str):
        def check() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + path, timeout=1).status_code == status
            except httpx.HTTPError:
                return False

        return check

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


class LlamaServer:
    """A llama.cpp server started directly (the same child the embedded backend runs)."""

    def __init__(self, model: Path, alias: str, *, embedding: bool = False, parallel: int = 1) -> None:
        cmd = [
            sys.executable,
            "-m",
            "wwwserve_gateway.backends.llamacpp_server",
            "--model",
            str(model),
            "--alias",
            alias,
            "--parallel",
            str(parallel),
        ]
        if embedding:
            cmd.append("--embedding")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening "):
            raise RuntimeError(f"llama.cpp server did not start: {line!r}")
        self.url = line.split()[1].rstrip("/")
        wait_until(self._healthy, 120, what="llama.cpp /health")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def busy_slots(self) -> int:
        slots = httpx.get(self.url + "/slots", timeout=5).json()
        return sum(1 for s in slots if s.get("is_processing"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
