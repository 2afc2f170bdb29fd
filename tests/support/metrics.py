"""A server's Prometheus metrics as a test reads them: scraped over HTTP, parsed by
prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

Samples = Mapping[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample served at http://host:port/metrics, by name and labels."""

    def read() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            text: str = response.read().decode()
            return text

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(read)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample of `name` with exactly these labels; 0 when there is none (a counter whose
    labels were never used)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of `name`, by its labels."""
    return {labels: each for (found, labels), each in samples.items() if found == name}
