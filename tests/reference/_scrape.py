"""Reading a reference server's Prometheus metrics in tests: its address, a scrape, a value."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

from .conftest import ServerProcess

#: (sample name, sorted label pairs) -> value
Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_address(server: ServerProcess) -> str:
    """The ``METRICS host:port`` line a server with metrics prints after ``LISTENING``."""
    word, address = server._next_line(10.0)
    assert word == "METRICS", (word, address)
    return address


def scrape(address: str) -> Samples:
    """Every sample ``GET /metrics`` answers with now."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels; 0 when absent (a counter not yet counted)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
