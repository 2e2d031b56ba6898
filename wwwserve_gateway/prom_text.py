"""Read unlabelled and labelled samples from a Prometheus text exposition (vLLM, SGLang, llama.cpp)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_samples(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (e.g. several model names on one server)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out
