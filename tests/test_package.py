"""The package as users get it: a wheel with every subpackage, a node that runs from a fresh venv
holding only that wheel, and the architecture's import contracts (checked on the wheel's tree, where
`plugins/` and `backends/` sit inside `wwwserve_gateway` as they do once installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import REPO, NodeProcess, free_port

MAPPED = {
    "wwwserve_gateway": "wwwserve_gateway",
    "plugins": "wwwserve_gateway/plugins",
    "backends": "wwwserve_gateway/backends",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the files git knows (setuptools writes build/ beside the sources)."""
    source = tmp_path_factory.mktemp("source")
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, cwd=REPO, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        str(REPO),
    ]
    done = subprocess.run(build, capture_output=True, text=True, cwd=out)
    assert done.returncode == 0, f"building the wheel failed:\n{done.stdout}\n{done.stderr}"
    [built] = out.glob("wwwserve-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tree)
    return tree


def test_the_wheel_holds_every_module_and_nothing_else(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, installed in MAPPED.items():
        for source in (REPO / folder).rglob("*.py"):
            expected.add(f"{installed}/{source.relative_to(REPO / folder).as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"modules left out of the wheel: {missing}"
    stray = sorted(
        n for n in names if n.split("/")[0] in {"plugins", "backends", "tests", "simulation", "benchmarks"}
    )
    assert not stray, f"files the wheel must not install at the top level: {stray}"


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A new venv with the wheel installed (no editable install, no source tree on its path). Its
    dependencies come from this interpreter's site-packages through a .pth line, which Python adds
    to the path without running that directory's own .pth files (so this checkout's editable
    install stays out of it)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        str(wheel),
    ]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def test_a_node_runs_from_the_installed_wheel(fresh_venv: Path, tmp_path: Path, smollm2_path: Path) -> None:
    where = subprocess.run(
        [
            fresh_venv / "bin" / "python",
            "-c",
            "import wwwserve_gateway, wwwserve_gateway.plugins.ledger.chains as c; print(wwwserve_gateway.__file__, c.__file__)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert str(REPO) not in where.stdout, f"the venv imports the checkout, not the wheel: {where.stdout}"
    config = yaml.safe_load((REPO / "examples" / "single-node.yaml").read_text())
    config["node"].update(port=free_port(), data_dir=str(tmp_path / "data"))
    node = NodeProcess(config, tmp_path, command=[str(fresh_venv / "bin" / "wwwserve"), "node", "--config"])
    try:
        node.start(ready_timeout=180)
        answer = httpx.post(
            node.url + "/v1/chat/completions",
            json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
    finally:
        node.stop()


# -- the architecture ------------------------------------------------------------------------------


def importlinter_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_import_contracts_hold(unpacked: Path) -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    if not lint.exists():
        pytest.skip("import-linter is not installed (it is in the test extra)")
    # Run from the unpacked tree: import-linter puts its working directory first on sys.path, and
    # the checkout's own wwwserve_gateway would shadow the installed layout.
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    config = str(REPO / "pyproject.toml")
    done = subprocess.run(
        [str(lint), "--no-cache", config], capture_output=True, text=True, cwd=unpacked, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BROKEN" not in done.stdout and "KEPT" in done.stdout


def test_the_core_contract_names_every_core_module() -> None:
    """A new core module must be added to the 'core never imports a built-in plugin' contract."""
    [contract] = [c for c in importlinter_config()["contracts"] if c["name"].startswith("The core never")]
    listed = {m.removeprefix("wwwserve_gateway.") for m in contract["source_modules"]}
    core = {
        p.stem
        for p in (REPO / "wwwserve_gateway").iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    core -= {"__init__"}
    assert core - listed == set(), f"add these to the contract's source_modules: {sorted(core - listed)}"
