"""Read gauges from a Prometheus text exposition (vLLM, SGLang, llama.cpp /metrics)."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families


def gauge_values(text: str, names: set[str]) -> dict[str, list[float]]:
    """The finite values of each wanted gauge, one per label set.

    A data-parallel server reports one value per engine: counts are summed by the caller, while a
    fraction (KV-cache usage) must be averaged, so the values are kept apart here.
    Raises ValueError when the text is not Prometheus exposition (an HTML error page, say).
    """
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in names:
            continue
        for sample in family.samples:
            if sample.name == family.name and math.isfinite(sample.value):
                out.setdefault(sample.name, []).append(sample.value)
    return out
