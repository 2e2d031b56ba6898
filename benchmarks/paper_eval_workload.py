"""The paper_eval settings: who runs what, the workloads (seeded) and the join/leave events.

All times are paper seconds (the emulated hardware's time); the runner divides them by its time scale.

Workloads
- Shifting Poisson (settings 1, 2, 3), after the reference's tests/generate_poisson.py: each worker
  node's users send Poisson arrivals, at a high rate on half of the nodes and a low rate on the other
  half, and the two halves swap at the midpoint. The reference's rates were 1/15 and 1/30 per second;
  with our reasoning lengths they leave an RTX 3090 far from saturation, so we use 1/9 and 1/36
  (busy nodes then need more than one engine can give, while the network as a whole has headroom).
  Lengths imitate Qwen3 thinking on OpenR1-Math problems with max_tokens 8192: prompts log-normal
  (median 150 tokens, sigma 0.5, 32..1024), outputs log-normal (median 4000, sigma 0.6, 256..8192).
- Steady Poisson (setting 5): constant rates, so that latency moves only with the joins and leaves.
- Bursty trace-like (setting 4), synthetic, shaped after the Azure LLM inference trace (conversation)
  that the reference replays: per node a two-state Markov-modulated process, ON periods (exponential,
  mean 30 s) at 3x the node's base rate and OFF periods (mean 90 s) at 1/3 of it, so the base rate is
  the long-run mean; within a state the gaps are Gamma-distributed with a coefficient of variation of
  2 (clustered, heavier-tailed than Poisson). Base rates differ per node (1.6 : 1.0 : 0.8 : 0.6), like
  the reference's per-node trace windows taken at different hours. Lengths log-normal with the medians
  reported for that trace (prompt 1020 and output 129 tokens, Patel et al., Splitwise, ISCA 2024) and
  sigma 1.0 (heavy tails), clipped to 16..8000 and 4..2000.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

QWEN8 = "qwen3-8b"
QWEN4 = "qwen3-4b"
LLAMA = "llama-3.1-8b"

BUSY_RATE = 1 / 9  # requests per paper second
IDLE_RATE = 1 / 36
MAX_TOKENS = 8192  # the reference's gen_params.max_tokens
ENTRY = "entry"


@dataclass(frozen=True)
class EngineSpec:
    model: str  # the public model name apps ask for (also the emulator's served name)
    profile: str  # an emulator profile


@dataclass(frozen=True)
class NodeSpec:
    name: str
    engines: tuple[EngineSpec, ...]  # none: a client-only entry node
    starts: bool = True  # False: it joins through an event


@dataclass(frozen=True)
class Event:
    at: float
    node: str
    action: Literal["sigterm", "kill", "join"]


@dataclass(frozen=True)
class Request:
    id: int
    node: str  # the node whose users send it
    model: str
    at: float  # planned arrival
    prompt_tokens: int
    output_tokens: int


@dataclass
class Setting:
    number: int
    title: str
    description: str
    nodes: tuple[NodeSpec, ...]
    requests: list[Request]
    horizon: float
    events: tuple[Event, ...] = ()
    max_tokens: int = MAX_TOKENS
    notes: list[str] = field(default_factory=list)

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    @property
    def workers(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.engines]


# -- lengths and arrivals ---------------------------------------------------------------------------


def lognormal_int(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def reasoning_lengths(rng: random.Random) -> tuple[int, int]:
    return lognormal_int(rng, 150, 0.5, 32, 1024), lognormal_int(rng, 4000, 0.6, 256, MAX_TOKENS)


def conversation_lengths(rng: random.Random) -> tuple[int, int]:
    return lognormal_int(rng, 1020, 1.0, 16, 8000), lognormal_int(rng, 129, 1.0, 4, 2000)


def shifting_poisson(rng: random.Random, horizon: float, busy_first: bool) -> list[float]:
    """Arrival times: BUSY_RATE then IDLE_RATE (or the reverse), swapping at horizon / 2."""
    out, t = [], 0.0
    while True:
        first_half = t < horizon / 2
        rate = BUSY_RATE if first_half == busy_first else IDLE_RATE
        t += rng.expovariate(rate)
        if t >= horizon:
            return out
        # An arrival drawn at the old rate past the midpoint is redrawn at the new one (memoryless).
        if first_half and t >= horizon / 2:
            t = horizon / 2
            continue
        out.append(t)


def bursty_arrivals(rng: random.Random, horizon: float, base_rate: float) -> list[float]:
    """The Markov-modulated, Gamma-gapped process of the module docstring."""
    on_mean, off_mean, factor, cv = 30.0, 90.0, 3.0, 2.0
    shape = 1 / cv**2
    out, t = [], 0.0
    on = rng.random() < on_mean / (on_mean + off_mean)
    while t < horizon:
        end = t + rng.expovariate(1 / (on_mean if on else off_mean))
        rate = base_rate * (factor if on else 1 / factor)
        while True:
            t += rng.gammavariate(shape, 1 / (rate * shape))
            if t >= min(end, horizon):
                break
            out.append(t)
        t, on = end, not on
    return out


def build_requests(
    rng: random.Random,
    plan: list[tuple[str, list[str], list[float]]],
    lengths: Callable[[random.Random], tuple[int, int]],
) -> list[Request]:
    """(node, its models, its arrival times) -> requests, ids in arrival order."""
    raw = []
    for node, models, times in plan:
        for at in times:
            prompt, output = lengths(rng)
            raw.append((at, node, rng.choice(models), prompt, output))
    raw.sort()
    return [Request(i, node, model, at, p, o) for i, (at, node, model, p, o) in enumerate(raw)]


# -- the settings -----------------------------------------------------------------------------------


def _engines(*pairs: tuple[str, str]) -> tuple[EngineSpec, ...]:
    return tuple(EngineSpec(model, profile) for model, profile in pairs)


def _shifting(
    seed: int, horizon: float, workers: tuple[NodeSpec, ...], busy_first: set[str]
) -> list[Request]:
    rng = random.Random(seed)
    plan = [
        (n.name, [e.model for e in n.engines], shifting_poisson(rng, horizon, n.name in busy_first))
        for n in workers
    ]
    return build_requests(rng, plan, reasoning_lengths)


def _steady(seed: int, horizon: float, workers: tuple[NodeSpec, ...]) -> list[Request]:
    rng = random.Random(seed)
    plan = []
    for n in workers:
        times, t = [], rng.expovariate(STEADY_RATES[n.name])
        while t < horizon:
            times.append(t)
            t += rng.expovariate(STEADY_RATES[n.name])
        plan.append((n.name, [e.model for e in n.engines], times))
    return build_requests(rng, plan, reasoning_lengths)


def setting_1(seed: int, horizon: float) -> Setting:
    workers = tuple(NodeSpec(f"n{i}", _engines((QWEN8, "qwen3-8b-rtx3090"))) for i in range(1, 5))
    return Setting(
        1,
        "shifting load",
        "4 workers (Qwen3-8B, RTX 3090) + a client-only entry node; n1, n2 busy first, n3, n4 second",
        (NodeSpec(ENTRY, ()), *workers),
        _shifting(seed, horizon, workers, {"n1", "n2"}),
        horizon,
    )


def setting_2(seed: int, horizon: float) -> Setting:
    profiles = ("qwen3-8b-rtx3090", "qwen3-8b-rtx3090", "qwen3-8b-rtx4090", "qwen3-8b-a100")
    workers = tuple(NodeSpec(f"n{i}", _engines((QWEN8, p))) for i, p in enumerate(profiles, 1))
    return Setting(
        2,
        "heterogeneous hardware",
        "Qwen3-8B on 2x RTX 3090 (n1, n2: busy first), RTX 4090 (n3) and A100 40GB (n4): busy second",
        (NodeSpec(ENTRY, ()), *workers),
        _shifting(seed, horizon, workers, {"n1", "n2"}),
        horizon,
    )


def setting_3(seed: int, horizon: float) -> Setting:
    workers = (
        NodeSpec("n1", _engines((QWEN8, "qwen3-8b-rtx3090"))),
        NodeSpec("n2", _engines((QWEN8, "qwen3-8b-rtx3090"), (QWEN4, "qwen3-4b-rtx4090"))),
        NodeSpec("n3", _engines((QWEN4, "qwen3-4b-rtx4090"), (LLAMA, "llama-3.1-8b-a100"))),
        NodeSpec("n4", _engines((LLAMA, "llama-3.1-8b-a100"))),
    )
    return Setting(
        3,
        "heterogeneous models",
        "n1 {Qwen3-8B}, n2 {Qwen3-8B, Qwen3-4B}, n3 {Qwen3-4B, Llama-3.1-8B}, n4 {Llama-3.1-8B}; "
        "each node's users ask for its own models; n1, n3 busy first, n2, n4 second",
        (NodeSpec(ENTRY, ()), *workers),
        _shifting(seed, horizon, workers, {"n1", "n3"}),
        horizon,
    )


BURSTY_BASE_RATE = 0.2  # requests per paper second for weight 1.0
BURSTY_WEIGHTS = (1.6, 1.0, 0.8, 0.6)


def setting_4(seed: int, horizon: float) -> Setting:
    workers = tuple(NodeSpec(f"n{i}", _engines((QWEN8, "qwen3-8b-rtx3090"))) for i in range(1, 5))
    rng = random.Random(seed)
    plan = [
        (n.name, [QWEN8], bursty_arrivals(rng, horizon, BURSTY_BASE_RATE * w))
        for n, w in zip(workers, BURSTY_WEIGHTS, strict=True)
    ]
    return Setting(
        4,
        "bursty trace-like",
        "4 workers (Qwen3-8B, RTX 3090); Markov-modulated Gamma arrivals, base rates 1.6:1.0:0.8:0.6, "
        "Azure-conversation-like lengths",
        (NodeSpec(ENTRY, ()), *workers),
        build_requests(rng, plan, conversation_lengths),
        horizon,
        max_tokens=2048,
    )


STEADY_RATES = {"n1": 1 / 10, "n2": 1 / 40}  # setting 5: requests per paper second, constant


def setting_5(seed: int, horizon: float) -> Setting:
    """n1, n2 carry the users, at constant rates, so that latency changes come from the joins and
    leaves; n3, n4, n5 are helpers without users of their own. Demand (~540 output tokens/s) needs
    about two RTX 3090s at full batch: four engines serve it easily, two barely."""
    engine = _engines((QWEN8, "qwen3-8b-rtx3090"))
    users = (NodeSpec("n1", engine), NodeSpec("n2", engine))
    helpers = (NodeSpec("n3", engine), NodeSpec("n4", engine), NodeSpec("n5", engine, starts=False))
    events = (
        Event(round(0.25 * horizon), "n3", "sigterm"),
        Event(round(0.40 * horizon), "n4", "kill"),
        Event(round(0.55 * horizon), "n5", "join"),
        Event(round(0.70 * horizon), "n3", "join"),
    )
    return Setting(
        5,
        "dynamic participation",
        "n1, n2 (Qwen3-8B, RTX 3090) carry the users at constant rates (1/10 and 1/40 per s); helpers "
        "n3, n4 leave (SIGTERM, kill -9), n5 joins new, n3 rejoins",
        (NodeSpec(ENTRY, ()), *users, *helpers),
        _steady(seed, horizon, users),
        horizon,
        events,
    )


SETTINGS: dict[int, Callable[[int, float], Setting]] = {
    1: setting_1,
    2: setting_2,
    3: setting_3,
    4: setting_4,
    5: setting_5,
}


def shrink(setting: Setting, workers: int) -> Setting:
    """The setting with its first `workers` worker nodes only (and their users' requests, and the
    events that concern them): a small run of the same shape, for smoke tests."""
    keep = {n.name for n in setting.workers[:workers]} | {n.name for n in setting.nodes if not n.engines}
    requests = [r for r in setting.requests if r.node in keep]
    return Setting(
        setting.number,
        setting.title,
        setting.description + f" (first {workers} workers only)",
        tuple(n for n in setting.nodes if n.name in keep),
        [Request(i, r.node, r.model, r.at, r.prompt_tokens, r.output_tokens) for i, r in enumerate(requests)],
        setting.horizon,
        tuple(e for e in setting.events if e.node in keep),
        setting.max_tokens,
    )
