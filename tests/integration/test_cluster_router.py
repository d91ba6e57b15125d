"""Live calibration on the 3-node NATS JetStream cluster: a kill -9 and a partition move.

A new machine calibrates its own model on its first readings while the detector serving it
is killed with SIGKILL; another detector takes the partition over (lease expiry), reads the
machine's record (calibration window included) back from the state bucket and continues the
count where the first one stopped; it fits, saves and serves the machine's own model. Each
detector has a model directory of its own (three hosts): a third detector taking over gets
the fitted model from the cluster's object store and serves it without calibrating again.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.model import artifact
from factorywatch.partitions import ClusterLayout, partition_of
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import (
    run_js,
    start_detector,
    stored_verdicts,
    wait_verdicts,
)
from tests.support import Proc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2
WINDOW = 80


def test_live_calibration_continues_on_the_detector_that_takes_over_after_kill9(
    tmp_path: Path,
    spawn: Callable[..., Proc],
    model_dir: Path,
    topic_root: str,
) -> None:
    """cal-1 gets CALIBRATING verdicts counting 1..80 exactly once each across a kill -9 of
    its detector and the partition's move to another one (state from the KV bucket), then
    verdicts of its own model fitted by the new owner; m1 keeps the default model; every
    reading gets exactly one verdict; a third detector with its own model directory downloads
    that model from the object store and serves it (no second calibration)."""
    cluster = LocalNatsCluster(
        tmp_path / "nats", layouts=(ClusterLayout(topic_root, partitions=PARTITIONS),)
    ).start()
    try:
        _calibrate_across_kill9(cluster, tmp_path, spawn, model_dir, topic_root)
    finally:
        cluster.stop()


def _calibrate_across_kill9(
    cluster: LocalNatsCluster,
    tmp_path: Path,
    spawn: Callable[..., Proc],
    shared_models: Path,
    topic_root: str,
) -> None:
    # each detector has a model directory of its own, as on three hosts (the default model)
    dirs = {d: tmp_path / f"models-{d}" for d in ("det-a", "det-b", "det-c")}
    for directory in dirs.values():
        shutil.copytree(shared_models, directory)
    default = artifact.current_version(dirs["det-a"])
    config = tmp_path / "assets.yaml"
    config.write_text(f"calibrate:\n  readings: {WINDOW}\n  family: pca\n  machines: [cal-1]\n")
    topics = Topics(topic_root)
    layout = cluster.layout

    def detector(client_id: str) -> Proc:
        return start_detector(
            spawn, cluster, dirs[client_id], client_id=client_id, lease_ttl_s=3.0,
            asset_config=config,
        )  # fmt: skip

    first = detector("det-a")
    device = MqttDevice("device-1", cluster.nodes[0].ports.mqtt)
    device.wait_connected()
    sims = {m: MachineSimulator(m, "line1", seed=i) for i, m in enumerate(("cal-1", "m1"))}

    def publish(per_machine: int, every_s: float = 0.0) -> None:
        for _ in range(per_machine):
            for machine, sim in sims.items():
                reading = sim.next(time.time())
                key = f"{machine}:{reading.seq}"
                device.publish(topics.telemetry("line1", machine), reading.encode(), key)
            if every_s:
                time.sleep(every_s)  # pacing the load, not synchronising

    def calibrating_seen() -> int:
        return sum(v.machine_id == "cal-1" for v in stored_verdicts(cluster))

    # 70 readings each at 40 a second: the kill lands mid-stream and mid-calibration
    paced = threading.Thread(target=publish, args=(70, 0.025), daemon=True)
    paced.start()
    assert wait_until(lambda: calibrating_seen() >= 30, 30)
    first.kill()  # SIGKILL mid-calibration: its leases expire, its unacked batches come back
    before_kill = calibrating_seen()
    assert before_kill < WINDOW
    paced.join(30)
    assert not paced.is_alive()
    publish(30)  # while no detector serves: the window fills on the next owner
    second = detector("det-b")  # the partitions move to another detector
    second.wait_log("calibration_model_served", timeout=60)
    publish(30)  # served by cal-1's own model
    total = 2 * 130
    assert device.wait_acked(total)
    verdicts = wait_verdicts(cluster, total, timeout_s=60)

    keys = Counter(f"{v.machine_id}:{v.seq}" for v in verdicts)
    assert {k: n for k, n in keys.items() if n > 1} == {}  # none answered twice
    assert set(keys) == set(device.acked)  # none lost
    assert len(verdicts) == total
    cal = sorted((v for v in verdicts if v.machine_id == "cal-1"), key=lambda v: v.seq)
    seen = Counter(v.calibration.seen for v in cal if v.calibration is not None)
    # counted once each across the kill: a restart from zero would count 1..30 twice
    assert {n: seen[n] for n in range(1, WINDOW)} == dict.fromkeys(range(1, WINDOW), 1)
    assert set(seen) == set(range(1, WINDOW + 1))  # WINDOW: the full window while it fits
    own = artifact.current_version(artifact.route_dir(dirs["det-b"], "machine", "cal-1"))
    assert own is not None, second.log()
    served = [v for v in cal if v.calibration is None]
    assert served, second.log()
    assert {v.model_version for v in served} == {own}
    last_calibrating = max(v.seq for v in cal if v.calibration is not None)
    assert min(v.seq for v in served) > last_calibrating  # never back to calibrating
    assert len(served) >= 30
    card = artifact.read_card(
        artifact.route_dir(dirs["det-b"], "machine", "cal-1") / own / artifact.CARD_FILE
    )
    assert card.params["calibrated_live"] == WINDOW
    assert {v.model_version for v in verdicts if v.machine_id == "m1"} == {default}
    assert _logged(second, "calibration_fit_started")
    assert not _logged(first, "calibration_fit_started")

    async def stored_record(_nc: NatsClient, js: JetStreamContext) -> dict[str, Any]:
        kv = await js.key_value(layout.state_bucket)
        entry = await kv.get(layout.state_key(partition_of("cal-1", PARTITIONS), "cal-1"))
        assert entry.value is not None
        record: dict[str, Any] = json.loads(entry.value)
        return record

    # the window is done with once the model is bound (a third owner would not refit)
    assert wait_until(lambda: run_js(cluster, stored_record).get("calibration") is None, 10)
    assert second.terminate() == 0  # its leases released: a third detector takes over

    # On "another host": the model comes from the object store, it is not fitted again.
    third = detector("det-c")
    assert _logged(third, "route_model_downloaded"), third.log()
    assert artifact.current_version(artifact.route_dir(dirs["det-c"], "machine", "cal-1")) == own
    publish(10)
    assert device.wait_acked(total + 20)
    later = wait_verdicts(cluster, total + 20, timeout_s=30)
    assert len(later) == total + 20
    newest = sorted((v for v in later if v.machine_id == "cal-1"), key=lambda v: v.seq)[-10:]
    assert [(v.status == "CALIBRATING", v.model_version) for v in newest] == [(False, own)] * 10
    assert not _logged(third, "calibration_fit_started")
    assert third.terminate() == 0
    device.close()
    print(
        f"calibrating verdicts before the kill: {before_kill}; "
        f"cal-1's own model {own} from verdict seq {min(v.seq for v in served)}"
    )


def _logged(proc: Proc, event: str) -> bool:
    return f'"{event}"' in proc.log()
