"""Model lifecycle against a real broker: promote a new model while readings flow."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from factorywatch.contracts import Verdict
from factorywatch.model import artifact
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.conftest import DatasetChoice
from tests.support import CLI, PROJECT_DIR, Collector, Proc, await_end_marker, not_marker

pytestmark = pytest.mark.integration


def test_a_promoted_model_is_picked_up_live_without_losing_or_rescoring_a_reading(
    spawn: Callable[..., Proc],
    collector: Callable[..., Collector],
    settings: BrokerSettings,
    mqtt_args: list[str],
    test_data: DatasetChoice,
    tmp_path: Path,
) -> None:
    """Every reading gets exactly one verdict; versions switch once, from old to new, never back."""
    model_dir = tmp_path / "models"
    train = [*CLI, "train", *test_data.args, "--model-dir", str(model_dir), "--trees", "50"]
    subprocess.run(train, check=True, capture_output=True, cwd=PROJECT_DIR, timeout=300)
    old = artifact.current_version(model_dir)
    topics = Topics(settings.topic_root)
    col = collector(topics.alerts_filter)
    det = spawn(
        "detect",
        *mqtt_args,
        "--model-dir",
        str(model_dir),
        "--state-dir",
        str(tmp_path / "s"),
        "--metrics-port",
        "0",
        env={"FACTORYWATCH_DETECTOR_RELOAD_INTERVAL_S": "0.2"},
    )
    det.wait_log("telemetry_subscribed")

    sim = MachineSimulator("reload-1", "line1", seed=5)
    pub = SensorPublisher(settings, "reload-1", buffer_size=10_000)
    pub.start()
    stop = threading.Event()
    sent: list[int] = []

    def produce() -> None:
        # Until stopped (the bound only caps a runaway): the stream must outlast the retrain.
        while not stop.is_set() and len(sent) < 30_000:
            reading = sim.next(time.time())
            pub.publish(reading)
            sent.append(reading.seq)
            time.sleep(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    # Some readings answered by the old model before the new one exists.
    assert len(col.wait_for(lambda m: m.topic.endswith("/verdict"), count=50, timeout=30)) >= 50
    # A second model, trained and promoted by the real command while readings flow.
    retrain = [*train[:-2], "--trees", "60", "--seed", "1"]
    subprocess.run(retrain, check=True, capture_output=True, cwd=PROJECT_DIR, timeout=300)
    new = artifact.current_version(model_dir)
    assert new is not None
    assert new != old
    det.wait_log("model_reloaded", timeout=30)
    # Some readings answered by the new model before the stream ends.
    by_new = col.wait_for(
        lambda m: m.topic.endswith("/verdict") and new.encode() in m.payload, count=20, timeout=30
    )
    assert len(by_new) >= 20
    stop.set()
    producer.join()
    pub.close()
    await_end_marker(settings, col)  # every verdict, duplicates included, is in now
    verdicts = [
        Verdict.model_validate_json(m.payload)
        for m in col.matching(lambda m: m.topic.endswith("/verdict") and not_marker(m))
    ]
    assert sorted(v.seq for v in verdicts) == sorted(sent), "one verdict per reading"
    versions = [v.model_version for v in sorted(verdicts, key=lambda v: v.seq)]
    switch = versions.index(new)
    assert set(versions[:switch]) == {old}
    assert set(versions[switch:]) == {new}, "never back to the old model"
    assert 0 < switch < len(versions)
    assert det.terminate() == 0


def test_models_list_shows_the_promoted_version_and_both_thresholds(model_dir: Path) -> None:
    """`factorywatch models list` marks the current model and prints its alarm and clear cuts."""
    done = subprocess.run(
        [*CLI, "models", "list", "--model-dir", str(model_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=PROJECT_DIR,
    )
    card = artifact.load(model_dir).card
    assert card.clear_threshold is not None
    assert f"* {card.version}" in done.stdout
    assert f"threshold={card.threshold:.4f}" in done.stdout
    assert f"clear={card.clear_threshold:.4f}" in done.stdout
