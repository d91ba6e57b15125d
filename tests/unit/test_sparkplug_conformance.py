"""Sparkplug B 3.0 host-application rules, against an edge node written from the spec.

The edge node (tests/spec_edge.py) encodes its protobuf by hand, omits data types in DATA,
reports by exception and wraps ``seq`` at 255: what issue 24's table found the ingest could
not read. Each test names the tck-id(s) it proves (the README's Sparkplug section lists them).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import pytest

from factorywatch.accounts import AccountRegistry, read_registry
from factorywatch.broker import BASE_ACL, sparkplug_edge_rights
from factorywatch.cli import main
from factorywatch.contracts import AI4I_CHANNELS, Verdict
from factorywatch.detector.alerting import AlertPolicy, AlertTracker
from factorywatch.detector.batch_scoring import Received
from factorywatch.detector.ingest import Reading
from factorywatch.detector.mosquitto_shell import _sparkplug_out
from factorywatch.detector.registry import Registry
from factorywatch.detector.sparkplug import SparkplugIngest, SparkplugSettings
from factorywatch.detector.state import MachineRecord
from factorywatch.errors import FactorywatchError, PayloadError
from factorywatch.settings import BrokerSettings, DetectorSettings
from tests.sparkplug_edge import decode
from tests.spec_edge import BOOLEAN, DOUBLE, FLOAT, STRING, SpecEdgeNode

T0 = 1_800_000_000.0
MS = int(T0 * 1000)
BIRTH = {
    "air_temperature_k": 300.0,
    "process_temperature_k": 310.0,
    "rotational_speed_rpm": 1500.0,
    "torque_nm": 40.0,
    "tool_wear_min": 3.0,
}


def _msg(message: tuple[str, bytes], at: float = T0) -> Received:
    return Received(message[0], message[1], at, 0.0)


def _readings(items: list[Reading | PayloadError]) -> list[Reading]:
    assert all(isinstance(i, Reading) for i in items), items
    return [i for i in items if isinstance(i, Reading)]


def _error(items: list[Reading | PayloadError]) -> PayloadError:
    assert len(items) == 1, items
    assert isinstance(items[0], PayloadError), items
    return items[0]


def _born(
    devices: tuple[str, ...] = ("mill",), **settings: float
) -> tuple[SparkplugIngest, SpecEdgeNode]:
    ingest = SparkplugIngest(
        SparkplugSettings(**{"reorder_timeout_s": 2.0, "rebirth_backoff_s": 5.0, **settings})
    )
    edge = SpecEdgeNode("plant1", "edge1", bd_seq=3)
    assert ingest.decode(_msg(edge.nbirth(MS))) == []
    for device in devices:
        _readings(ingest.decode(_msg(edge.dbirth(device, BIRTH, "M", MS))))
    return ingest, edge


def test_data_without_datatypes_by_exception_gives_one_reading_each() -> None:
    """tck-id-payloads-metric-datatype-not-req: 2 devices x 200 DDATA without data types,
    each carrying one changed metric, give 400 readings with every last-known value."""
    ingest, edge = _born(("mill", "lathe"))
    readings: list[Reading] = []
    for i in range(200):
        for device in ("mill", "lathe"):
            message = edge.ddata(device, {"torque_nm": 40.0 + i}, MS + i + 1)
            readings += _readings(ingest.decode(_msg(message)))
    assert len(readings) == 400
    last = readings[-1].telemetry
    assert last.readings == {**BIRTH, "torque_nm": 239.0}  # the other values stand
    assert last.product_type == "M"
    assert len({r.identity for r in readings}) == 400
    assert ingest.take_effects(T0 + 60).commands == []  # 402 messages, seq wrapped, no gap


def test_data_by_name_and_null_values() -> None:
    """tck-id-payloads-name-requirement: DATA by name (no alias) is read; is_null makes the
    value unknown, so the reading lacks that channel (dead-lettered once)."""
    ingest, edge = _born()
    [reading] = _readings(
        ingest.decode(_msg(edge.ddata("mill", {"tool_wear_min": 9.0}, MS + 1, by_name=True)))
    )
    assert reading.telemetry.readings["tool_wear_min"] == 9.0
    null = edge.ddata("mill", {"torque_nm": None}, MS + 2)
    assert _error(ingest.decode(_msg(null))).reason == "missing_channel"


def test_a_value_of_another_type_than_its_birth_is_a_type_mismatch() -> None:
    """A String "40" for a metric born Float is dead-lettered type_mismatch, not scored as 40,
    and does not become the last-known value; so does a data type that contradicts the birth."""
    ingest, edge = _born()
    text = edge.ddata(
        "mill", {"air_temperature_k": "40"}, MS + 1, value_types={"air_temperature_k": STRING}
    )
    error = _error(ingest.decode(_msg(text)))
    assert error.reason == "type_mismatch"
    assert "Air temperature [K]" in str(error)
    assert ingest.nodes["plant1/edge1"].devices["mill"].values["air_temperature_k"] == 300.0
    double = edge.ddata(
        "mill", {"air_temperature_k": 301.0}, MS + 2, value_types={"air_temperature_k": DOUBLE}
    )
    assert _error(ingest.decode(_msg(double))).reason == "type_mismatch"
    assert ingest.stats["type_mismatches"] == 2
    fine = edge.ddata(
        "mill", {"air_temperature_k": 302.0}, MS + 3, value_types={"air_temperature_k": FLOAT}
    )
    assert _readings(ingest.decode(_msg(fine)))[0].telemetry.readings["air_temperature_k"] == 302


def test_historical_data_is_scored_as_it_was_and_never_the_present_value() -> None:
    """is_historical metrics give a reading at their own timestamp, counted as historical,
    and do not replace the last-known value."""
    ingest, edge = _born()
    old = edge.ddata("mill", {"torque_nm": 11.0}, MS - 60_000, historical=True)
    [reading] = _readings(ingest.decode(_msg(old)))
    assert reading.telemetry.readings["torque_nm"] == 11.0
    assert reading.telemetry.ts == T0 - 60
    assert ingest.nodes["plant1/edge1"].devices["mill"].values["torque_nm"] == 40.0
    assert ingest.stats["historical_readings"] == 1


def test_a_gap_of_200_is_a_gap_not_200_duplicates() -> None:
    """tck-id-operational-behavior-host-reordering-start/-rebirth: 200 lost messages (across
    the wrap) leave the next one a new reading with a new identity; unfilled after the
    reorder timeout, one rebirth is requested."""
    ingest, edge = _born()
    before = [_readings(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 1.0}, MS + 1))))]
    edge.skip(200)
    after = [
        _readings(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 2.0 + i}, MS + 2 + i))))
        for i in range(60)  # seq 203..262: past the wrap and over the old numbers
    ]
    identities = {r.identity for batch in [*before, *after] for r in batch}
    assert len(identities) == 61
    assert [b[0].telemetry.seq for b in after] == list(range(203, 263))
    assert ingest.stats["gaps"] == 1
    assert ingest.take_effects(T0 + 1).commands == []
    [command] = ingest.take_effects(T0 + 2).commands
    assert command.topic == "spBv1.0/plant1/NCMD/edge1"


def test_a_redelivered_message_keeps_its_number_and_a_late_one_fills_its_gap() -> None:
    """tck-id-operational-behavior-host-reordering-success: a message delivered again is the
    same reading; one arriving late fills its gap, and no rebirth is requested."""
    ingest, edge = _born()
    first = edge.ddata("mill", {"torque_nm": 5.0}, MS + 1)
    edge.skip(1)
    third = edge.ddata("mill", {"torque_nm": 7.0}, MS + 3)
    edge.seq -= 2
    second = edge.ddata("mill", {"torque_nm": 6.0}, MS + 2)
    a = _readings(ingest.decode(_msg(first)))[0]
    c = _readings(ingest.decode(_msg(third)))[0]
    b = _readings(ingest.decode(_msg(second)))[0]
    again = _readings(ingest.decode(_msg(first)))[0]
    assert [a.telemetry.seq, b.telemetry.seq, c.telemetry.seq] == [2, 3, 4]
    assert (again.identity, again.digest) == (a.identity, a.digest)
    assert ingest.take_effects(T0 + 60).commands == []


def test_rebirth_requests_are_counted_logged_and_owed_through_the_backoff() -> None:
    """tck-id-operational-behavior-data-commands-ncmd-rebirth-verb/-name/-value: an NCMD with
    Node Control/Rebirth = true; a second request within
    the backoff is suppressed (the dead letter says so, a counter and a log event count it)
    and sent once the backoff ends."""
    ingest = SparkplugIngest(SparkplugSettings(rebirth_backoff_s=5.0))
    edge = SpecEdgeNode("plant1", "edge1")
    edge.aliases["mill"] = {"torque_nm": 14}
    first = _error(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 1.0}, MS))))
    assert "a rebirth was requested" in str(first)
    second = _error(ingest.decode(_msg(edge.ddata("mill", {"torque_nm": 2.0}, MS), at=T0 + 1)))
    assert "held back by the backoff" in str(second)
    assert "requested from" not in str(second)
    assert len(ingest.take_effects(T0 + 1).commands) == 1
    assert ingest.stats["rebirth_requests_sent"] == 1
    assert ingest.stats["rebirth_requests_suppressed"] == 1
    assert [name for name, _ in ingest.take_notes()] == [
        "sparkplug_rebirth_requested",
        "sparkplug_rebirth_suppressed",
    ]
    assert ingest.take_effects(T0 + 4.9).commands == []
    [owed] = ingest.take_effects(T0 + 5.0).commands
    assert owed.topic == "spBv1.0/plant1/NCMD/edge1"
    assert ingest.stats["rebirth_requests_sent"] == 2
    [request] = decode(owed.payload).metrics
    assert (request.name, request.datatype, request.boolean_value) == (
        "Node Control/Rebirth",
        BOOLEAN,
        True,
    )


def test_deaths_are_labelled_and_devices_are_not_offline_by_silence() -> None:
    """tck-id-operational-behavior-edge-node-termination-host-action-ndeath-devices-offline and
    -ddeath-devices-offline: deaths say ndeath/ddeath; a device quiet for 60 s while its node
    lives is not OFFLINE by silence unless a silence timeout is configured."""
    ingest, edge = _born(("mill", "lathe"))
    tracker = AlertTracker(AlertPolicy(offline_after_s=30.0))
    for machine in ("edge1.mill", "edge1.lathe", "press-1"):
        tracker.observe(_verdict(machine), T0)
    events = tracker.tick(T0 + 60, ingest.silence_timeout)
    assert [e.machine_id for e in events] == ["press-1"]  # a JSON sensor: silence
    timed = SparkplugIngest(SparkplugSettings(silence_timeout_s=45.0))
    timed.restore(ingest.snapshot())
    events = tracker.tick(T0 + 60, timed.silence_timeout)
    assert sorted(e.machine_id for e in events) == ["edge1.lathe", "edge1.mill"]
    ingest.decode(_msg(edge.ddeath("lathe", MS + 1)))
    ingest.decode(_msg(edge.ndeath()))
    effects = ingest.take_effects(T0 + 61)
    assert effects.reasons == {"edge1.lathe": "ddeath", "edge1.mill": "ndeath", "edge1": "ndeath"}
    assert ingest.stats["deaths"] == 3


def _verdict(machine: str) -> Verdict:
    return Verdict(
        machine_id=machine,
        line="plant1",
        seq=1,
        reading_ts=T0,
        latency_ms=0.1,
        score=0.1,
        threshold=0.6,
        status="NORMAL",
        model_version="test",
    )


def test_alert_ids_are_unique_across_rebirths_restarts_and_machines() -> None:
    """Three episodes whose readings restart at seq 1 (rebirths), one after a restart from the
    journaled record, and another machine's: five different alert ids."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    ids: list[str | None] = []
    now = T0
    for _ in range(3):
        for status in ("ALERT", "NORMAL"):
            now += 1
            verdict = _verdict("edge1.mill").model_copy(update={"status": status, "seq": 1})
            for event in tracker.observe(verdict, now, identity=f"r{now}"):
                if event.event == "ALERT_RAISED":
                    ids.append(event.alert_id)
    restarted = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    restarted.table.add(MachineRecord.restore(tracker.table["edge1.mill"].snapshot()))
    restarted.table["edge1.mill"].window = deque(maxlen=1)
    alert = _verdict("edge1.mill").model_copy(update={"status": "ALERT", "seq": 1})
    ids += [e.alert_id for e in restarted.observe(alert, now + 1, identity="x")]
    other = _verdict("edge2.mill").model_copy(update={"status": "ALERT", "seq": 1})
    ids += [e.alert_id for e in restarted.observe(other, now + 1, identity="y")]
    assert len(ids) == 5
    assert len(set(ids)) == 5


def test_the_registry_decides_which_edge_node_speaks_for_which_device() -> None:
    """Issue 25 item 2: an account that is not a registered edge node (a viewer), another
    group, an unregistered device, or a machine registered as a JSON sender is refused
    before any state is made; the registered edge node is read."""
    accounts = (
        AccountRegistry()
        .with_machine("press-1", "line1")
        .with_edge_node("edge1", "plant1", ["mill"])
        .with_edge_node("press", "line1", [])
        .with_service("alice", "viewer")
    )
    ingest = SparkplugIngest(registry=Registry.from_accounts(accounts))
    ok = SpecEdgeNode("plant1", "edge1")
    assert ingest.decode(_msg(ok.nbirth(MS))) == []
    assert len(_readings(ingest.decode(_msg(ok.dbirth("mill", BIRTH, "M", MS))))) == 1
    refused = [
        SpecEdgeNode("plant1", "alice").nbirth(MS),  # a viewer
        SpecEdgeNode("plant1", "viewer").nbirth(MS),
        SpecEdgeNode("line2", "edge1").nbirth(MS),  # another group
        ok.dbirth("pump", BIRTH, "M", MS),  # a device it did not register
    ]
    for message in refused:
        with pytest.raises(PayloadError) as error:
            ingest.decode(_msg(message))
        assert error.value.reason == "unauthorized_machine"
    assert sorted(ingest.nodes) == ["plant1/edge1"]  # nothing made for the refused
    assert ingest.stats["refused"] == 4
    registry = Registry.from_accounts(accounts)
    assert registry.check_sparkplug("line1", "press", None, "press") is None
    # A node named like a registered JSON machine cannot be born as that machine.
    clash = AccountRegistry().with_machine("press.1", "line1").with_edge_node("press", "line1", [])
    assert Registry.from_accounts(clash).check_sparkplug("line1", "press", "1", "press.1") == (
        "unauthorized_machine"
    )


def test_sparkplug_out_on_an_authenticating_broker_uses_its_own_account(tmp_path: Path) -> None:
    """Sparkplug out logs in with its own edge-node account (its node id); without one the
    detector stops with the command that makes it."""
    (tmp_path / "detector-spb.password").write_text("s3cret\n")
    broker = BrokerSettings(username="detector", secrets_dir=tmp_path)
    settings = DetectorSettings(sparkplug_out=True, sparkplug_out_username="detector-spb")
    out = _sparkplug_out(settings, broker)
    assert out is not None
    assert out.broker.username == "detector-spb"
    assert out.broker.resolved_password() == "s3cret"
    assert out.node.node == "detector-spb"
    with pytest.raises(FactorywatchError, match="add-user detector-spb --role edge-node"):
        _sparkplug_out(DetectorSettings(sparkplug_out=True), broker)


def test_a_restored_ingest_reads_data_without_datatypes() -> None:
    """The birth's data types are in the snapshot: a restarted detector reads DATA without
    data types as the original does."""
    ingest, edge = _born()
    copy = SparkplugIngest()
    copy.restore(ingest.snapshot())
    message = _msg(edge.ddata("mill", {"torque_nm": 44.0}, MS + 1))
    assert _readings(copy.decode(message)) == _readings(ingest.decode(message))
    assert set(AI4I_CHANNELS) <= set(copy.nodes["plant1/edge1"].devices["mill"].values)


def test_add_user_edge_node_registers_it_and_writes_its_acl_block(tmp_path: Path) -> None:
    """`broker add-user NODE --role edge-node --line GROUP --machines ...` registers the edge
    node with its devices and gives it one ACL block: its own node's Sparkplug topics in its
    group and its devices' verdicts and dead letters; the base ACL has no Sparkplug pattern
    line any account could use."""
    secrets = tmp_path / "secrets"
    argv = ["broker", "add-user", "press7", "--role", "edge-node", "--line", "plant1"]
    assert main([*argv, "--machines", "m1,m2", "--secrets-dir", str(secrets)]) == 0
    registry = read_registry(secrets / "registry.json")
    assert registry.role_of("press7") == "edge-node"
    assert registry.edge_nodes["press7"].devices == ["m1", "m2"]
    acl = (secrets / "acl").read_text()
    block = acl.split("user press7\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == sparkplug_edge_rights("press7", "plant1", ["m1", "m2"])
    assert "topic write spBv1.0/plant1/DDATA/press7/+" in block
    # the detector's answers about its own devices' readings, and no other machine's
    assert [ln for ln in block if ln.startswith("topic read factory/")] == [
        "topic read factory/alerts/plant1/press7.m1/verdict",
        "topic read factory/alerts/plant1/press7.m2/verdict",
        "topic read factory/deadletter/plant1/press7.m1",
        "topic read factory/deadletter/plant1/press7.m2",
    ]
    assert not [
        ln
        for ln in BASE_ACL.read_text().splitlines()
        if ln.startswith("pattern ") and "spBv1.0" in ln
    ]
    checked = Registry.from_accounts(registry)
    assert checked.check_sparkplug("plant1", "press7", "m1", "press7.m1") is None
    assert checked.check_sparkplug("plant1", "press7", "m3", "press7.m3") == "unauthorized_machine"


def test_a_version_1_snapshot_asks_for_births_instead_of_guessing_types() -> None:
    """A checkpoint written before data types were kept restores its nodes unborn: their
    next data is dead-lettered no_birth and a rebirth is requested (never read untyped)."""
    ingest, edge = _born()
    old = ingest.snapshot()
    old["version"] = 1
    for node in old["nodes"].values():
        del node["seen"], node["rebirth_owed"]
        for device in node["devices"].values():
            del device["types"]
    copy = SparkplugIngest()
    copy.restore(old)
    error = _error(copy.decode(_msg(edge.ddata("mill", {"torque_nm": 41.0}, MS + 1))))
    assert error.reason == "no_birth"
    assert len(copy.take_effects(T0).commands) == 1
