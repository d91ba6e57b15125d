"""Re-baselining on a real stream we did not record, through a real Mosquitto and the real
detector process: NAB's CPU utilisation of an AWS RDS instance (labelled by NAB) settles at a
new level after its labelled anomaly and stays there. Trained as ``evaluate --nab`` trains
(on NAB's probationary period), the default model would hold that alarm open to the end of
the file. The detector clears it after as many readings as the model was trained on,
recalibrates on the next as many, saves the machine's new model and scores the rest with it:
every verdict as ``model.rebaseline.replay`` (what ``evaluate`` counts) says.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from factorywatch.cluster import LocalNatsCluster, MqttDevice
from factorywatch.contracts import AlertEvent, Telemetry, Verdict
from factorywatch.model import artifact, rebaseline, streams
from factorywatch.model.fitspec import DEFAULT_SPEC
from factorywatch.model.generic import Scores, Trained, fit_recording
from factorywatch.model.nab import NabFile
from factorywatch.partitions import ClusterLayout
from factorywatch.topics import Topics
from tests.integration.cluster_helpers import start_detector, stored_events, wait_verdicts
from tests.support import Collector, Proc, nab_stream, verdict_counts, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILE = "realAWSCloudwatch/rds_cpu_utilization_e47b3b.csv"
MACHINE = "rds-1"


@pytest.fixture(scope="module")
def stream() -> NabFile:
    """The NAB file (fails loudly when the corpus is missing)."""
    return nab_stream(FILE)


@pytest.fixture(scope="module")
def trained(stream: NabFile) -> Trained:
    """The default model, fitted as ``evaluate --nab`` fits it."""
    rec = stream.recording
    return fit_recording(rec, streams.nab_mask(rec.rows), DEFAULT_SPEC)


@pytest.fixture
def model_dir(tmp_path: Path, trained: Trained) -> Path:
    """The detector's model directory (the ``detector`` fixture's): ``trained`` promoted."""
    models = tmp_path / "models"
    artifact.save_generic(models, trained.scorer, trained.card)
    artifact.promote(models, trained.card.version)
    return models


def _offline(stream: NabFile, trained: Trained) -> tuple[Scores, list[tuple[int, int]]]:
    """``replay``'s scores and each re-baseline's window (first row, end): the part after a
    window starts at its end."""
    replayed = rebaseline.replay(trained, stream.recording.columns)
    offline = replayed.scores
    assert offline.calibrating is not None
    windows = []
    for (_, before), (end, _) in zip(replayed.parts, replayed.parts[1:], strict=False):
        n = before.card.rebaseline_readings()
        assert n is not None
        windows.append((end - n, end))
    assert windows, "no re-baseline in this file"
    assert np.flatnonzero(offline.calibrating).tolist() == [
        i for a, b in windows for i in range(a, b)
    ]
    return offline, windows


def test_a_settled_move_re_baselines_through_the_broker_as_evaluate_counts_it(
    stream: NabFile,
    trained: Trained,
    model_dir: Path,
    detector: Callable[..., Proc],
    collector: Callable[..., Collector],
    topic_root: str,
) -> None:
    """Every reading gets one verdict: the default model's until the re-baseline (the same
    statuses and scores as offline), the alert cleared with a note that says why, N
    CALIBRATING verdicts, then the machine's own new model (saved, naming the model it
    replaced) with the statuses and scores ``replay`` gives; the alarm that stood to the
    end of the file without the policy is gone."""
    rec = stream.recording
    mask = streams.nab_mask(rec.rows)
    values = rec.columns["value"]
    fixed = rebaseline.replay(
        fit_recording(rec, mask, DEFAULT_SPEC.replace(rebaseline=False)), rec.columns
    ).scores
    assert fixed.flagged[-500:].all()  # without the policy: ALERT to the end of the file
    offline, windows = _offline(stream, trained)
    start, end = windows[0]
    assert end - start == trained.card.rebaseline_readings()
    assert offline.flagged[windows[-1][1] :].mean() < 0.1

    topics = Topics(topic_root)
    sink = collector(topics.alerts_filter)
    proc = detector(client_id="det-rebaseline")
    now = time.time()

    def send(seq: int) -> None:
        reading = Telemetry(
            machine_id=MACHINE,
            line="aws",
            seq=seq,
            ts=now + seq * 0.001,
            readings={"value": float(values[seq])},
        )
        info = sink.client.publish(topics.telemetry("aws", MACHINE), reading.encode(), qos=1)
        info.wait_for_publish(10)

    def verdicts() -> list[Verdict]:
        return [
            Verdict.model_validate_json(m.payload)
            for m in sink.matching(lambda m: m.topic.endswith("/verdict"))
        ]

    def fitted(fits: int) -> bool:
        return proc.log().count("calibration_model_served") >= fits

    sent = 0
    for k, (_, stop) in enumerate(windows, start=1):
        for seq in range(sent, stop):
            send(seq)
        sent = stop
        # the window is full: no reading arrives while its fit runs (offline it takes no
        # time); then the machine's new model serves
        assert wait_until(partial(fitted, k), 120), proc.log()[-3000:]
    for seq in range(sent, rec.rows):
        send(seq)
    sink.wait_for(lambda m: m.topic.endswith("/verdict"), count=rec.rows, timeout=120)

    got = sorted(verdicts(), key=lambda v: v.seq)
    counts = verdict_counts(sink.matching(lambda m: m.topic.endswith("/verdict")))
    assert sorted(counts) == [(MACHINE, s) for s in range(rec.rows)]
    assert set(counts.values()) == {1}, "a reading answered twice"
    own = artifact.current_version(artifact.route_dir(model_dir, "machine", MACHINE))
    assert own is not None, proc.log()
    card = artifact.read_card(
        artifact.route_dir(model_dir, "machine", MACHINE) / own / artifact.CARD_FILE
    )
    assert card.params["calibrated_live"] == windows[-1][1] - windows[-1][0]
    assert {v.model_version for v in got[:start]} == {trained.card.version}
    leaving = [trained.card.version]
    for k, (a, b) in enumerate(windows):
        assert {v.status for v in got[a:b]} == {"CALIBRATING"}
        upto = windows[k + 1][0] if k + 1 < len(windows) else rec.rows
        served = {v.model_version for v in got[b:upto]}
        assert len(served) == 1
        leaving += served
    assert leaving[-1] == own
    assert card.params["rebaselined_from"] == leaving[-2]
    scored = [v for v in got if v.status != "CALIBRATING"]
    rows = [v.seq for v in scored]
    assert [v.status == "ALERT" for v in scored] == offline.flagged[rows].tolist()
    assert [v.score for v in scored] == offline.score[rows].tolist()

    events = [
        AlertEvent.model_validate_json(m.payload)
        for m in sink.matching(lambda m: m.topic.endswith("/event"))
    ]
    cleared = [e for e in events if e.note is not None and "re-baselined" in e.note]
    assert [(e.event, e.seq) for e in cleared] == [("ALERT_CLEARED", a - 1) for a, _ in windows]
    raised = streams.alarms(offline.flagged, clear=offline.calm, calibrating=offline.calibrating)
    assert [e.seq for e in events if e.event == "ALERT_RAISED"] == raised
    assert proc.running(), proc.log()


def test_on_the_cluster_a_re_baselined_model_reaches_the_next_detector(
    stream: NabFile,
    trained: Trained,
    model_dir: Path,
    tmp_path: Path,
    spawn: Callable[..., Proc],
    topic_root: str,
) -> None:
    """The same stream through a 3-node NATS JetStream cluster (MQTT 3.1.1 device, the
    jetstream detector): the verdicts ``replay`` gives, the clears in the output stream;
    the re-baselined machine's model is uploaded to the cluster's object store, and a second
    detector with a model directory of its own that takes the partition over serves the
    machine with it (no third calibration)."""
    offline, windows = _offline(stream, trained)
    values = stream.recording.columns["value"].tolist()
    rows = len(values)
    cluster = LocalNatsCluster(
        tmp_path / "nats", layouts=(ClusterLayout(topic_root, partitions=1),)
    ).start()
    try:
        dirs = {d: tmp_path / f"models-{d}" for d in ("det-a", "det-b")}
        for directory in dirs.values():
            shutil.copytree(model_dir, directory)
        first = start_detector(spawn, cluster, dirs["det-a"], client_id="det-a", lease_ttl_s=3.0)
        topic = Topics(topic_root).telemetry("aws", MACHINE)
        now = time.time()
        with MqttDevice("rds-device", cluster.nodes[0].ports.mqtt) as device:
            device.wait_connected()

            def send(upto: int) -> None:
                for seq in range(len(device.acked) + len(device.refused), upto):
                    reading = Telemetry(
                        machine_id=MACHINE, line="aws", seq=seq, ts=now + seq * 0.001,
                        readings={"value": values[seq]},
                    )  # fmt: skip
                    device.publish(topic, reading.encode(), f"{MACHINE}:{seq}")
                assert device.wait_acked(upto, 60)

            for k, (_, stop) in enumerate(windows, start=1):
                send(stop)  # the window is full: nothing arrives while its fit runs
                assert wait_until(
                    partial(lambda n: first.log().count("calibration_model_served") >= n, k),
                    120,
                ), first.log()[-3000:]
            send(rows)
        got = sorted(wait_verdicts(cluster, rows, timeout_s=120), key=lambda v: v.seq)
        assert [v.seq for v in got] == list(range(rows))  # one each: none lost, none twice
        for a, b in windows:
            assert {v.status for v in got[a:b]} == {"CALIBRATING"}
        scored = [v for v in got if v.status != "CALIBRATING"]
        assert [v.status == "ALERT" for v in scored] == offline.flagged[
            [v.seq for v in scored]
        ].tolist()
        cleared = [e.seq for e in stored_events(cluster) if e.note and "re-baselined" in e.note]
        assert cleared == [a - 1 for a, _ in windows]
        own = got[-1].model_version
        assert own != trained.card.version

        # uploaded (every fit of this detector, at its next reload), then the partition moves
        assert wait_until(
            lambda: any(
                "route_model_uploaded" in line and own in line for line in first.log().splitlines()
            ),
            60,
        ), first.log()[-3000:]
        first.kill()  # det-b has never seen the machine's new model
        assert (
            artifact.current_version(artifact.route_dir(dirs["det-b"], "machine", MACHINE)) is None
        )
        second = start_detector(spawn, cluster, dirs["det-b"], client_id="det-b", lease_ttl_s=3.0)
        assert wait_until(
            lambda: (
                artifact.current_version(artifact.route_dir(dirs["det-b"], "machine", MACHINE))
                == own
            ),
            60,
        ), second.log()[-3000:]
        assert "calibration_fit_started" not in second.log()
    finally:
        cluster.stop()
