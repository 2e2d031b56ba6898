"""The Backends page's data: each deployment's readiness, load, limits and cooldown."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from wwwserve_gateway.plugin_api.backend import Backend

MINUTE = 60.0


def _recent(stamps: Iterable[float], since: float) -> int:
    return sum(1 for t in stamps if t >= since)


def backend_row(backend: Backend, now_mono: float) -> dict[str, Any]:
    described = backend.describe()
    settings, state = backend.settings, backend.state
    load = state.load
    since = now_mono - MINUTE
    cooldown = described.get("cooldown_until", getattr(state, "cooldown_until", None))
    return {
        "id": backend.id,
        "model": backend.model_name,
        "provider": described.get("provider"),
        "upstream_model": described.get("upstream_model"),
        "api_base": described.get("api_base"),
        "ready": backend.ready,
        "in_flight": state.in_flight,
        "load": None
        if load is None
        else {"running": load.running, "waiting": load.waiting, "usage": round(load.usage, 4)},
        "limits": {
            "rpm": settings.rpm,
            "tpm": settings.tpm,
            "max_parallel_requests": settings.max_parallel_requests,
        },
        "last_minute": {
            "requests": _recent(list(state.recent_requests), since),
            "tokens": sum(n for t, n in list(state.recent_tokens) if t >= since),
        },
        "cooldown_until": cooldown if isinstance(cooldown, int | float) else None,
        "cooldown_reason": described.get("cooldown_reason"),
    }


def backends_view(backends: Iterable[Backend]) -> list[dict[str, Any]]:
    now = time.monotonic()
    return [backend_row(b, now) for b in backends]
