"""`wwwserve demo`: a real three-node network on loopback, used through its entry URL, then stopped."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from openai import OpenAI

from tests.support import wait_until

ENTRY_LINE = re.compile(r"^entry: http://127\.0\.0\.1:\d+/v1$")
FIRST_LINE_DEADLINE_S = 180


class Demo:
    """`wwwserve demo` in a subprocess; a thread drains its stdout so that the pipe never fills."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wwwserve_gateway", "demo", *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "COLUMNS": "200"},
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s; stderr:\n{self.stderr()}") from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """Last resort for a failed test: kill the demo and everything it started."""
        procs = [*self.descendants()]
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def run_demo(tmp_path: Path) -> Iterator:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        demo = Demo(list(args), tmp_path / f"demo{len(started)}.err")
        started.append(demo)
        return demo

    yield start
    for demo in started:
        demo.kill()


def test_demo_network_serves_the_openai_sdk_and_stops_cleanly(run_demo, smollm2_path: Path) -> None:
    demo = run_demo("--nodes", "3")
    first = demo.next_line(FIRST_LINE_DEADLINE_S)
    assert first is not None and ENTRY_LINE.match(first), (first, demo.stderr())
    base_url = first.removeprefix("entry: ")

    nodes = [p for p in demo.descendants() if "node" in p.cmdline()]
    assert len(nodes) == 3
    children = demo.descendants()  # the nodes and their llama.cpp servers
    assert len(children) >= 6, [p.cmdline() for p in children]

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)
    routes = []

    def delegated() -> bool:
        raw = client.chat.completions.with_raw_response.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
        )
        completion = raw.parse()
        assert completion.choices[0].message.content
        routes.append(raw.headers["x-wwwserve-route"].split(","))
        return len(routes[-1]) == 2

    wait_until(delegated, interval=0, what="a request delegated to an executor")
    # The entry is first on every route; it hands requests to one of the two executors.
    assert all(len(r[0]) == 64 for r in routes)
    assert len({r[0] for r in routes}) == 1

    # Its own traffic runs too: a line per request, with its route.
    wait_until(
        lambda: any(
            re.match(r"^#\d+ +delegated +[\d.]+ s +route \w{8} → \w{8}", line) for line in demo.stdout
        ),
        60,
        interval=0.2,
        what="a delegated request of the demo's own traffic",
    )

    demo.proc.send_signal(signal.SIGTERM)
    assert demo.proc.wait(60) == 0, demo.stderr()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]


def test_a_node_that_dies_at_startup_fails_the_demo_with_its_log(run_demo, tiny_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        demo = run_demo("--nodes", "2", "--model", "tiny-random", "--no-traffic", "--base-port", str(port))
        started: set[psutil.Process] = set()

        def exited() -> bool:
            started.update(demo.descendants())
            return demo.proc.poll() is not None

        wait_until(exited, 90, what="the demo exited")
        assert demo.proc.wait(1) == 1, demo.stderr()
    err = demo.stderr()
    assert "node 0 (entry" in err and "exited with code" in err, err
    assert re.search(r"address already in use", err, re.IGNORECASE), err
    assert demo.stdout == []
    assert started, "the demo started no node"
    _, alive = psutil.wait_procs(list(started), timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
