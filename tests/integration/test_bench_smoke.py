"""Smoke test of ``python -m bench.run --quick``: it runs end to end and writes its reports.

Only the shape of the report and the absence of loss are checked: benchmark figures depend
on the machine, so no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.relay import CLIENTS as RELAY_CLIENTS
from tests.conftest import DatasetChoice
from tests.support import PROJECT_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timing]

REQUIRED_KEYS = (
    "relay_msgs_per_s_by_client",
    "fastest_relay_msgs_per_s",
    "mosquitto_c_one_hop_msgs_per_s",
    "mosquitto_c_relay_msgs_per_s",
    "detector_msgs_per_s_by_client",
    "detector_msgs_per_s",
    "relay_sharded_msgs_per_s",
    "detector_sharded_msgs_per_s",
    "naive_msgs_per_s",
    "p99_ms_at_1000",
    "machines",
    "batch_readings_per_s",
    "peak_memory_mb",
    "ratios",
    "environment",
)


@pytest.fixture(scope="module")
def quick_report(
    tmp_path_factory: pytest.TempPathFactory, test_data: DatasetChoice
) -> tuple[dict[str, Any], Path]:
    """Run the quick benchmark once; return its JSON report and its output directory."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), *test_data.args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "bench.json").read_text()), out


@pytest.mark.timeout(900)
def test_quick_bench_report_has_every_figure(quick_report: tuple[dict[str, Any], Path]) -> None:
    """The JSON report holds every required key, ratio and environment field."""
    report, _ = quick_report
    missing = [key for key in REQUIRED_KEYS if key not in report]
    assert not missing, missing
    assert set(report["relay_msgs_per_s_by_client"]) == set(RELAY_CLIENTS)
    assert set(report["detector_msgs_per_s_by_client"]) == {"paho5", "paho311", "mqtt5"}
    assert set(report["ratios"]) >= {
        "detector_vs_fastest_relay",
        "detector_vs_c_relay",
        "sharded_detector_vs_best_relay",
        "detector_vs_naive",
        "machines_1000_vs_10",
    }
    assert set(report["environment"]) >= {"cpu_count", "python", "mosquitto", "date", "command"}
    assert report["machines"], "no latency rows"
    for row in report["machines"]:
        assert {"machines", "p50_ms", "p99_ms", "max_ms", "lost"} <= set(row)
    by_transport = report["transports_at_fixed_rates"]
    assert {r["client"] for r in by_transport} == {"paho5", "mqtt5"}
    for row in by_transport:
        assert row["lost"] == 0, row
        assert row["server_cpu_us_per_msg"] is not None, row
        assert row["server_cpu_us_per_msg"] > 0, row


@pytest.mark.timeout(900)
def test_quick_bench_throughputs_are_positive_without_loss(
    quick_report: tuple[dict[str, Any], Path],
) -> None:
    """Every throughput (per client, C clients, sharded) is positive; no run lost a reading."""
    report, _ = quick_report
    rates = {
        **{f"relay {c}": v for c, v in report["relay_msgs_per_s_by_client"].items()},
        **{f"detector {c}": v for c, v in report["detector_msgs_per_s_by_client"].items()},
    }
    assert all(v is not None and v > 0 for v in rates.values()), rates
    assert report["fastest_relay_msgs_per_s"] == max(rates[f"relay {c}"] for c in RELAY_CLIENTS)
    for key in (
        "mosquitto_c_one_hop_msgs_per_s",
        "mosquitto_c_relay_msgs_per_s",
        "detector_msgs_per_s",
        "relay_sharded_msgs_per_s",
        "detector_sharded_msgs_per_s",
        "naive_msgs_per_s",
    ):
        assert report[key] is not None, key
        assert report[key] > 0, key
    for run in report["throughput_runs"]:
        assert run["lost"] == 0, run
        assert run["unique_verdicts"] == run["messages"], run


@pytest.mark.timeout(900)
def test_quick_bench_writes_markdown_with_its_command(
    quick_report: tuple[dict[str, Any], Path],
) -> None:
    """The Markdown report exists and starts with the command that produced it."""
    report, out = quick_report
    text = (out / "bench.md").read_text()
    assert report["environment"]["command"] in text.split("\n## ")[0]
    assert "Mosquitto's own ceiling" in text
    assert "| relay, gmqtt" in text
