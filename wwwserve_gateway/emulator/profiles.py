"""Engine profiles: how fast one model runs on one accelerator, as the timing model needs it.

A GPU profile is derived from two small spec sheets, a model's (parameters, KV-cache bytes per
token) and a GPU's (memory, bandwidth, tensor throughput), and a few constants, each observed in
published benchmarks, fitted to them, or assumed (docs/emulator.md says which):

- decode is memory-bound: one step reads the weights once and every held token's K and V, at
  `DECODE_BANDWIDTH_EFFICIENCY` of the spec bandwidth, plus `per_seq_ms` of compute and scheduling per
  sequence in the batch;
- prefill is compute-bound: 2 x params FLOPs per token at `PREFILL_MFU` of the dense tensor peak,
  overlapping the decodes of the same step;
- the KV cache gets what vLLM leaves it: `gpu_memory_utilization` (0.9) of the memory, minus the
  weights and an activation reserve.

docs/emulator.md gives the source of every number and how well the result matches published
benchmarks. A profile can also be given directly, as a YAML or JSON file of `EngineProfile` fields
(the CPU profile is such a direct calibration).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

GIB = 1024**3

# Both published batch-1 decode figures we found run at 76-77 % of the bandwidth roofline:
# Llama-3.1-8B BF16 on an A100 40GB, 75 tok/s (johnmusgrave.com, vLLM 0.23), and Llama-3-8B FP16 on an
# RTX 3090, 0.17 req/s of 256 tokens = 44 tok/s (gigagpu.com RTX 3090 throughput table).
DECODE_BANDWIDTH_EFFICIENCY = 0.77
# Prefill model FLOPs utilisation: an assumption (typical of vLLM prefill on Ampere/Ada); prefill is
# a small share of the reasoning workloads' service time (a 200-token prompt against 4,000 decode steps).
PREFILL_MFU = 0.5
# vLLM's default --gpu-memory-utilization.
GPU_MEMORY_UTILIZATION = 0.9
# Peak activation and CUDA graphs, held back from the KV cache by vLLM's profiling run: an estimate
# for 4-8B models at the default max_num_batched_tokens.
ACTIVATION_RESERVE_GIB = 1.5
# vLLM's default --max-num-seqs.
VLLM_MAX_NUM_SEQS = 256


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineProfile(_Frozen):
    """What the timing model needs. Times are in engine (paper) seconds, before any time scale."""

    name: str = Field(..., min_length=1, description="the profile's name, e.g. qwen3-8b-rtx3090")
    description: str = Field("", description="model, hardware and engine, in words")
    model: str = Field(..., min_length=1, description="the model name the engine serves by default")
    decode_base_ms: float = Field(..., gt=0, description="ms per decode step for the weights alone")
    decode_per_seq_ms: float = Field(..., ge=0, description="ms added per sequence in the batch")
    decode_per_kv_token_us: float = Field(
        ..., ge=0, description="us added per token held in the KV cache (attention reads)"
    )
    prefill_tokens_per_s: float = Field(..., gt=0, description="prompt tokens processed per second")
    kv_capacity_tokens: int = Field(..., gt=0, description="tokens the KV cache holds")
    max_batch: int = Field(VLLM_MAX_NUM_SEQS, gt=0, description="sequences decoded at once at most")
    max_model_len: int = Field(..., gt=0, description="longest prompt + output accepted")
    prefill_overlaps_decode: bool = Field(
        True,
        description="a GPU's memory-bound decode and compute-bound prefill share a step (the step takes "
        "the longer of the two); on a CPU both are compute-bound and add up",
    )

    def step_seconds(self, batch: int, kv_tokens: int) -> float:
        """One decode step of `batch` sequences holding `kv_tokens` tokens in all."""
        ms = (
            self.decode_base_ms
            + self.decode_per_seq_ms * batch
            + self.decode_per_kv_token_us * kv_tokens / 1e3
        )
        return ms / 1e3

    def prefill_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s


class GpuSpec(_Frozen):
    name: str
    memory_gib: float
    bandwidth_gb_s: float  # spec-sheet memory bandwidth
    tensor_tflops: float  # dense BF16/FP16 tensor peak with FP32 accumulate
    per_seq_ms: float  # fitted, see docs/emulator.md


class ModelSpec(_Frozen):
    name: str  # Hugging Face id
    params_b: float  # billions of parameters
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * 2  # BF16

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, BF16


GPUS = {
    # per_seq_ms: the RTX 3090's is fitted to gigagpu.com's vLLM batch sweep (Llama-3-8B FP16,
    # 128 in / 256 out: 0.17, 0.58, 0.98, 1.55, 2.10, 2.40 req/s at batch 1, 4, 8, 16, 32, 64; the fit is
    # within -2..+7 %, see benchmarks/emulator_check.py). It is compute (and sampling) per sequence, so
    # the other GPUs' values are scaled from it by tensor throughput: no comparable sweep was found.
    "rtx3090": GpuSpec(name="RTX 3090", memory_gib=24, bandwidth_gb_s=936, tensor_tflops=71, per_seq_ms=0.9),
    "rtx4090": GpuSpec(
        name="RTX 4090", memory_gib=24, bandwidth_gb_s=1008, tensor_tflops=165, per_seq_ms=0.39
    ),
    "a100": GpuSpec(name="A100 40GB", memory_gib=40, bandwidth_gb_s=1555, tensor_tflops=312, per_seq_ms=0.2),
}

MODELS = {
    # config.json of each model on Hugging Face (num_hidden_layers, num_key_value_heads, head_dim).
    "qwen3-8b": ModelSpec(name="Qwen/Qwen3-8B", params_b=8.19, layers=36, kv_heads=8, head_dim=128),
    "qwen3-4b": ModelSpec(name="Qwen/Qwen3-4B", params_b=4.02, layers=36, kv_heads=8, head_dim=128),
    "llama-3.1-8b": ModelSpec(
        name="meta-llama/Llama-3.1-8B-Instruct", params_b=8.03, layers=32, kv_heads=8, head_dim=128
    ),
}

MODEL_MAX_LEN = {"qwen3-8b": 40960, "qwen3-4b": 40960, "llama-3.1-8b": 131072}


def derive_profile(model_key: str, gpu_key: str) -> EngineProfile:
    """A vLLM-on-GPU profile from the model's and the GPU's spec sheets (see the module docstring)."""
    model, gpu = MODELS[model_key], GPUS[gpu_key]
    bandwidth = gpu.bandwidth_gb_s * 1e9 * DECODE_BANDWIDTH_EFFICIENCY
    kv_bytes = (
        GPU_MEMORY_UTILIZATION * gpu.memory_gib * GIB - model.weight_bytes - ACTIVATION_RESERVE_GIB * GIB
    )
    capacity = int(kv_bytes // model.kv_bytes_per_token)
    return EngineProfile(
        name=f"{model_key}-{gpu_key}",
        description=f"{model.name} (BF16) on one {gpu.name}, vLLM defaults",
        model=model.name,
        decode_base_ms=round(model.weight_bytes / bandwidth * 1e3, 3),
        decode_per_seq_ms=gpu.per_seq_ms,
        decode_per_kv_token_us=round(model.kv_bytes_per_token / bandwidth * 1e6, 5),
        prefill_tokens_per_s=round(PREFILL_MFU * gpu.tensor_tflops * 1e12 / (2 * model.params_b * 1e9)),
        kv_capacity_tokens=capacity,
        max_model_len=min(MODEL_MAX_LEN[model_key], capacity),
    )


# SmolLM2-135M-Instruct (Q4_1 GGUF) in the embedded llama.cpp server on this project's 2-core machine,
# one thread, 4 slots of 512 tokens, measured with benchmarks/emulator_calibrate_cpu.py (the run is in
# benchmarks/results/emulator_calibration_cpu.json; docs/emulator.md). llama.cpp's slots play the
# role of vLLM's batch.
CPU_SMOLLM2 = EngineProfile(
    name="smollm2-cpu",
    description="SmolLM2-135M-Instruct Q4_1 in llama.cpp, 1 CPU thread, 4 slots (calibrated here)",
    model="smollm2",
    decode_base_ms=15.78,
    decode_per_seq_ms=11.05,
    decode_per_kv_token_us=3.9,
    prefill_tokens_per_s=83,
    kv_capacity_tokens=2048,
    max_batch=4,
    max_model_len=512,
    prefill_overlaps_decode=False,
)

PROFILES: dict[str, EngineProfile] = {
    p.name: p
    for p in (
        derive_profile("qwen3-8b", "rtx3090"),
        derive_profile("qwen3-8b", "rtx4090"),
        derive_profile("qwen3-8b", "a100"),
        derive_profile("qwen3-4b", "rtx4090"),
        derive_profile("llama-3.1-8b", "a100"),
        derive_profile("llama-3.1-8b", "rtx3090"),
        CPU_SMOLLM2,
    )
}


def load_profile(name_or_path: str) -> EngineProfile:
    """A built-in profile by name, or a YAML/JSON file of EngineProfile fields."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name_or_path!r}: give one of {known}, or a YAML/JSON file")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return EngineProfile.model_validate(data)
