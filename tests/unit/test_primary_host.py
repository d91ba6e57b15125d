"""The primary host's STATE messages and historical (store-and-forward) readings in verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factorywatch.cli import main
from factorywatch.contracts import Verdict
from factorywatch.detector.engine import Engine, EngineSettings, Inbound
from factorywatch.detector.primary_host import PrimaryHost, parse_state
from factorywatch.detector.router import Router
from factorywatch.detector.sparkplug import SparkplugIngest, SparkplugSettings
from factorywatch.model import artifact
from factorywatch.model.asset import CalibrateSpec
from factorywatch.settings import DetectorSettings
from factorywatch.topics import Topics
from tests.spec_edge import SpecEdgeNode

T0 = 1_800_000_000.0
MS = int(T0 * 1000)
TYPICAL = {
    "air_temperature_k": 300.0,
    "process_temperature_k": 310.0,
    "rotational_speed_rpm": 1500.0,
    "torque_nm": 40.0,
    "tool_wear_min": 100.0,
}
#: far outside the training envelope: an ALERT verdict whatever the score
ANOMALY = {**TYPICAL, "torque_nm": 400.0}


def test_state_will_birth_and_death_payloads_topics_and_retain_flags() -> None:
    """tck-id-host-topic-phid-birth/-death-topic, -payload, -retain and the timestamps: the
    birth repeats the will's connect timestamp, the death is stamped at disconnect."""
    host = PrimaryHost("scada1")
    topic, will = host.will(MS)
    assert topic == "spBv1.0/STATE/scada1"
    assert json.loads(will) == {"online": False, "timestamp": MS}
    birth = host.birth()
    assert (birth.topic, birth.retain) == (topic, True)
    assert json.loads(birth.payload) == {"online": True, "timestamp": MS}
    death = host.death(MS + 5000)
    assert (death.topic, death.retain) == (topic, True)
    assert json.loads(death.payload) == {"online": False, "timestamp": MS + 5000}
    assert json.loads(host.death(MS - 1).payload)["timestamp"] == MS  # never before the birth


def test_an_offline_state_on_our_own_topic_is_answered_with_the_birth() -> None:
    """tck-id-message-flow-hid-sparkplug-state-message-delivered: an offline STATE (an old
    will) is answered with online at the connect timestamp; online or garbage is not."""
    host = PrimaryHost("scada1")
    host.will(MS)
    answer = host.answer(json.dumps({"online": False, "timestamp": MS - 60_000}).encode())
    assert answer is not None
    assert json.loads(answer.payload) == {"online": True, "timestamp": MS}
    assert answer.retain is True
    assert host.answer(host.birth().payload) is None
    assert host.answer(b"not json") is None
    assert parse_state(b'{"online": "yes", "timestamp": 1}') is None


@pytest.mark.parametrize("host_id", ["a/b", "a+", "#", ""])
def test_a_host_id_that_is_not_one_topic_level_is_refused(host_id: str) -> None:
    """A host id with '/', '+', '#' (or none) is refused by the settings and the topic builder."""
    with pytest.raises(ValueError, match=r"sparkplug_primary_host_id"):
        DetectorSettings(sparkplug_primary_host_id=host_id)
    with pytest.raises(ValueError, match=r"host id"):
        PrimaryHost(host_id)


@pytest.mark.parametrize("extra", [[], ["--sparkplug", "--engine", "jetstream"]])
def test_primary_host_id_without_sparkplug_on_mosquitto_is_refused(
    extra: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`detect --primary-host-id` stops with a clear error unless Sparkplug is on and the
    detector is the Mosquitto one (edge nodes would wait for a STATE nobody publishes)."""
    args = ["detect", "--primary-host-id", "scada1", "--model-dir", str(tmp_path), *extra]
    assert main(args) == 2
    assert "--primary-host-id needs --sparkplug" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "env", "out"])
def test_sparkplug_on_the_jetstream_engine_is_refused_not_ignored(
    how: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`detect --engine jetstream` with Sparkplug on (flag or environment, in or out) stops
    before the model loads and says why (NATS 2.9's MQTT layer refuses `spBv1.0/...`),
    instead of serving JSON only while the user believes Sparkplug is read or published."""
    args = ["detect", "--engine", "jetstream", "--model-dir", str(tmp_path)]
    if how == "flag":
        args.append("--sparkplug")
    elif how == "env":
        monkeypatch.setenv("FACTORYWATCH_DETECTOR_SPARKPLUG", "true")
    else:  # the detector's own Sparkplug edge node would publish spBv1.0/... too
        monkeypatch.setenv("FACTORYWATCH_DETECTOR_SPARKPLUG_OUT", "true")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "needs the Mosquitto detector (--engine mqtt)" in err
    assert "spBv1.0/" in err


def _engine(model_dir: Path) -> Engine:
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=1.0, rebirth_backoff_s=0.0))
    return Engine(artifact.load(model_dir), Topics("t"), extra_ingests=[ingest])


def _in(message: tuple[str, bytes]) -> Inbound:
    return Inbound(message[0], message[1], T0, 0.0)


def test_historical_readings_are_marked_scored_in_order_and_never_raise_alerts(
    small_model_dir: Path,
) -> None:
    """Replayed is_historical readings get verdicts marked historical, in order, ALERT when
    anomalous, but raise no live alert; live anomalies then do; live verdicts carry no
    historical field at all (older consumers read them unchanged)."""
    engine = _engine(small_model_dir)
    edge = SpecEdgeNode("plant1", "edge1")
    engine.handle([_in(edge.nbirth(MS)), _in(edge.dbirth("mill", TYPICAL, "L", MS))], T0)
    replay = [
        _in(edge.ddata("mill", dict(ANOMALY), MS - 10_000 + i, historical=True)) for i in range(10)
    ]
    outcomes = engine.handle(replay, T0 + 1)
    verdicts = [v for o in outcomes for v in o.verdicts]
    assert [round(v.reading_ts * 1000) for v in verdicts] == [MS - 10_000 + i for i in range(10)]
    assert all(v.historical for v in verdicts)
    assert {v.status for v in verdicts} == {"ALERT"}
    assert [e for o in outcomes for e in o.events if e.event == "ALERT_RAISED"] == []
    assert engine.record("edge1.mill").alert_id is None

    live = [_in(edge.ddata("mill", dict(ANOMALY), MS + 1 + i)) for i in range(10)]
    outcomes = engine.handle(live, T0 + 2)
    assert [e.event for o in outcomes for e in o.events].count("ALERT_RAISED") == 1
    payload = next(p for p in outcomes[0].publishes if p.topic.endswith("/verdict")).payload
    assert "historical" not in json.loads(payload)
    assert Verdict.model_validate_json(payload).historical is None


def test_a_historical_reading_of_a_calibrating_machine_is_marked_too(small_model_dir: Path) -> None:
    """A machine still calibrating its own model: a replayed reading fills the window like any
    other (it is real data of the machine) and its CALIBRATING verdict says historical."""
    model = artifact.load(small_model_dir)
    spec = CalibrateSpec(readings=60, family="pca", machines=["edge1.*"])
    ingest = SparkplugIngest(SparkplugSettings(reorder_timeout_s=1.0, rebirth_backoff_s=0.0))
    engine = Engine(
        model,
        Topics("t"),
        EngineSettings(),
        extra_ingests=[ingest],
        router=Router(model, None, spec),
    )
    edge = SpecEdgeNode("plant1", "edge1")
    engine.handle([_in(edge.nbirth(MS)), _in(edge.dbirth("mill", TYPICAL, "L", MS))], T0)
    old = edge.ddata("mill", {"torque_nm": 41.0}, MS - 5_000, historical=True)
    [verdict] = engine.handle([_in(old)], T0 + 1)[0].verdicts
    assert verdict.status == "CALIBRATING"
    assert verdict.historical is True
    assert verdict.calibration is not None
    assert verdict.calibration.seen == 2  # the birth and the replayed reading
