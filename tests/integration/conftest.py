"""Fixtures of the integration tests that drive a browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from factorywatch.cluster import LocalNatsCluster
from factorywatch.partitions import ClusterLayout
from tests.integration.opstack import require_binary

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (no browser download)."""
    executable = require_binary("chromium")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def nats_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, topic_root: str
) -> Iterator[LocalNatsCluster]:
    """A fresh 3-node JetStream cluster with the MQTT listener, open (no auth), with the
    test module's ``PARTITIONS`` (default 4) partitions."""
    partitions = getattr(request.module, "PARTITIONS", 4)
    cluster = LocalNatsCluster(
        tmp_path / "nats", layouts=(ClusterLayout(topic_root, partitions=partitions),)
    ).start()
    yield cluster
    cluster.stop()
