"""Prometheus exposition text as the tests read it."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def exposed_samples(text: str) -> dict[SampleKey, float]:
    """(sample name, sorted labels) -> value; a sample exposed twice fails the test."""
    found: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"{key} exposed twice"
            found[key] = sample.value
    return found
