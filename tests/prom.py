"""Reading Prometheus exposition text and registries in tests."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry


def samples(text: str) -> dict[str, float]:
    """Every sample line as 'name{labels}' (exactly as exposed) -> value."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def families(text: str) -> dict[str, str]:
    """Every family's exposed name -> its TYPE."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value in a registry (0 when absent)."""
    return registry.get_sample_value(name, labels) or 0.0
