"""Prometheus exposition text as a dict, for tests that read ``/metrics``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_samples(text: bytes | str) -> Samples:
    """``{(sample name, sorted labels without model_name): value}``."""
    text = text.decode() if isinstance(text, bytes) else text
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out
