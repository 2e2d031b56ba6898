"""The paper's default policy: coin flips over local load (WWW.Serve §2.2, §4.2, §4.4).

- An app's request: local if a ready local backend of the model is below its usage target; else
  delegate with probability `offload_frequency`; else queue locally with `queue_frequency`; else retry.
- A peer's request: accept (with probability `accept_frequency`) only when a local backend of the
  model is below target and none of them queues; else relay it onward with `relay_frequency`.
- Advertised stake: the paper's load score in [0, 4], scaled to the bonded stake, moving at most
  half the bonded stake per gossip round.

The helpers it shares with the completion-time policy are in `base`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, field_validator

from wwwserve_gateway.plugin_api.backend import Backend
from wwwserve_gateway.plugin_api.node import NodeAPI
from wwwserve_gateway.plugin_api.policy import Decision
from wwwserve_gateway.plugin_api.requests import RequestInfo
from wwwserve_gateway.plugins.policies.base import (
    PolicySettings,
    StakedPolicy,
    alive_peers,
    backend_usage,
    backend_waiting,
    ready_backends,
)

DEFAULT_TARGET = 0.5  # the paper's DEFAULT_IDLE_USAGE_THRESHOLD
NEVER_LOCAL = -1.0  # a target of -1: never serve the model locally (the paper's convention)
MAX_SCORE = 4  # the paper's stake score lies in [0, 4]


# -- the frequency policy ------------------------------------------------------------------------


class FrequencySettings(PolicySettings):
    target_usage: float | dict[str, float] = Field(
        DEFAULT_TARGET,
        description="a usage in [0, 1] (or -1 for never local), or a mapping model name -> such a number",
    )
    offload_frequency: float = Field(0.8, ge=0, le=1, description="a probability in [0, 1]")
    queue_frequency: float = Field(0.2, ge=0, le=1, description="a probability in [0, 1]")
    accept_frequency: float = Field(0.8, ge=0, le=1, description="a probability in [0, 1]")
    relay_frequency: float = Field(0.0, ge=0, le=1, description="a probability in [0, 1]")

    @field_validator("target_usage", mode="before")
    @classmethod
    def _target(cls, value: Any) -> Any:
        values = value.values() if isinstance(value, Mapping) else (value,)
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and (0 <= v <= 1 or v == NEVER_LOCAL)
            if not ok:
                raise ValueError(f"{v!r} is not a usage in [0, 1] or -1")
        return value


class FrequencyPolicy(StakedPolicy):
    """The paper's policy. Deterministic given `seed`."""

    Settings = FrequencySettings
    settings: FrequencySettings

    def __init__(self, node: NodeAPI, settings: FrequencySettings) -> None:
        super().__init__(node, settings)
        self._stake = 0.0

    def target(self, model: str) -> float:
        target = self.settings.target_usage
        return target.get(model, DEFAULT_TARGET) if isinstance(target, dict) else target

    def _idle(self, backends: Iterable[Backend]) -> bool:
        return any(backend_usage(b) < self.target(b.model_name) for b in backends)

    def _coin(self, p: float) -> bool:
        return self.rng.random() < p

    def decide(self, request: RequestInfo) -> Decision:
        model = request.model
        backends = ready_backends(self.node, model)
        if self.target(model) == NEVER_LOCAL:  # the provider never serves it here
            return Decision.DELEGATE if self.can_buy(model) else Decision.REJECT
        if not backends:
            return self.delegate_or_wait(model)
        if self._idle(backends) or not alive_peers(self.node, model):
            return Decision.LOCAL  # idle, or busy with nobody to hand over to: queue in the engine
        # The coins are drawn even when delegation is impossible, so a seed gives the same sequence.
        if self._coin(self.settings.offload_frequency) and self.can_buy(model):
            return Decision.DELEGATE
        if self._coin(self.settings.queue_frequency):
            return Decision.LOCAL
        return Decision.RETRY

    def accept(self, request: RequestInfo) -> Decision:
        model = request.model
        if not self.shares(model):
            return Decision.REJECT
        backends = ready_backends(self.node, model)
        idle = self._idle(backends) and not any(backend_waiting(b) for b in backends)
        if idle and self._coin(self.settings.accept_frequency):
            return Decision.LOCAL
        if self._coin(self.settings.relay_frequency) and self.can_buy(model):
            return Decision.DELEGATE
        return Decision.REJECT

    def stake_score(self) -> int:
        """The paper's load score in [0, 4] over the shared models' backends. Models this node never
        counts as idle (a target of 0 or -1) are left out: they would attract requests it declines."""
        backends = [b for b in self.shared_backends() if self.target(b.model_name) > 0]
        if not backends or any(backend_waiting(b) for b in backends):
            return 0
        usage = sum(backend_usage(b) for b in backends) / len(backends)
        target = sum(self.target(b.model_name) for b in backends) / len(backends)
        for score, fraction in ((4, 0.25), (3, 0.5), (2, 0.75), (1, 1.0)):
            if usage <= fraction * target:
                return score
        return 0

    def advertised_stake(self) -> float:
        bonded = self.bonded()
        wanted = self.stake_score() * bonded / MAX_SCORE
        # The paper moves stake by at most 2 of 4 per second; we are asked once per gossip round.
        step = bonded / 2
        stake = min(max(wanted, self._stake - step), self._stake + step)
        self._stake = max(0.0, min(stake, bonded))
        return self._stake
