"""deploy/: Prometheus, Alertmanager and Grafana files checked by their own tools, and the
dashboard's queries run by a real Prometheus scraping a real detector.

Grafana itself cannot run on this machine: its dashboard JSON is checked for structure here,
and every one of its PromQL queries is evaluated by a real Prometheus.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from factorywatch.broker import free_port
from factorywatch.detector.metrics import Metrics
from tests.integration.opstack import publish_plan, require_binary
from tests.support import PROJECT_DIR, Collector, Proc, wait_until

pytestmark = pytest.mark.integration

DEPLOY = PROJECT_DIR / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "factorywatch.json"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_prometheus_and_alertmanager_configs_pass_their_own_checkers() -> None:
    """promtool accepts the scrape config and rules; amtool accepts the Alertmanager config."""
    promtool, amtool = require_binary("promtool"), require_binary("amtool")
    done = _run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 1 rule files found" in done.stdout + done.stderr
    done = _run(amtool, "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["factorywatch-detector"]["static_configs"][0]["targets"] == ["detector:9108"]


def test_grafana_dashboard_json_is_well_formed_and_uses_detector_metrics() -> None:
    """Unique panel ids, non-overlapping grid, the provisioned datasource, and only metric
    names the detector really exports."""
    dashboard = json.loads(DASHBOARD.read_text())
    for key in ("uid", "title", "panels", "schemaVersion", "time"):
        assert key in dashboard, key
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        cell = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & cell, f"panel {p['title']} overlaps another"
        cells |= cell
        assert p["targets"], p["title"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "factorywatch.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    used = {name for e in _exprs(dashboard) for name in re.findall(r"factorywatch_\w+", e)}
    assert used, "the dashboard queries no factorywatch metric"
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"


def _query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@pytest.mark.slow
def test_prometheus_scrapes_a_real_detector_and_evaluates_every_dashboard_query(
    tmp_path: Path,
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: Any,
) -> None:
    """Prometheus with deploy/'s config (target pointed at the test's detector) scrapes it;
    each dashboard query is valid PromQL and the throughput one returns the readings sent."""
    binary = require_binary("prometheus")
    det = detector()
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["alerting"] = {"alertmanagers": []}
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    for job in config["scrape_configs"]:
        if job["job_name"] == "factorywatch-detector":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{det.metrics_port}"]}]
    port = free_port()
    config["scrape_configs"] = [
        j for j in config["scrape_configs"] if j["job_name"] == "factorywatch-detector"
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        prom = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        col = collector(f"{settings.topic_root}/alerts/+/+/verdict")
        pub = publish_plan(settings, "prom-1", [1500.0] * 20)
        col.wait_for(lambda m: True, count=20)

        def scraped_all() -> bool:
            assert prom.poll() is None, log.read_text()[-2000:]
            try:
                got = _query(port, "factorywatch_readings_received_total")
            except OSError:
                return False
            return bool(got) and float(got[0]["value"][1]) == 20

        wait_until(scraped_all, timeout=60, what="prometheus to scrape 20 readings")
        up = _query(port, 'up{job="factorywatch-detector"}')
        assert float(up[0]["value"][1]) == 1
        for expr in _exprs(json.loads(DASHBOARD.read_text())):
            _query(port, expr)  # asserts status success: valid PromQL on real series
        pub.close()
    finally:
        prom.terminate()
        prom.wait(10)
