"""The alert state machine, its wire models and topics: raise, clear, ack, offline, online."""

from __future__ import annotations

import pytest
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from factorywatch.contracts import (
    AckCommand,
    AlertEvent,
    Contribution,
    MachineState,
    Verdict,
)
from factorywatch.detector.alerting import AlertPolicy, AlertTracker
from factorywatch.errors import PayloadError
from factorywatch.topics import Topics

T0 = 1_700_000_000.0
THRESHOLD = 0.6


def alert_id(machine: str, raised_at: float, episode: int) -> str:
    """The id of a machine's ``episode``-th alert, raised at ``raised_at``."""
    return f"{machine}-{round(raised_at * 1000)}-{episode}"


def verdict(
    seq: int,
    *,
    alert: bool = False,
    score: float | None = None,
    machine: str = "m1",
    line: str = "line1",
    feature: str = "torque_nm",
) -> Verdict:
    """A verdict as the detector would publish it; anomalous ones carry an explanation."""
    value = score if score is not None else (0.8 if alert else 0.4)
    return Verdict(
        machine_id=machine,
        line=line,
        seq=seq,
        reading_ts=T0 + seq,
        status="ALERT" if alert else "NORMAL",
        score=value,
        threshold=THRESHOLD,
        model_version="v1",
        latency_ms=1.0,
        explanation=[Contribution(feature=feature, value=80.0, z=5.0)] if alert else None,
    )


def feed(
    tracker: AlertTracker, pattern: str, *, start: int = 1, machine: str = "m1"
) -> list[AlertEvent]:
    """Feed one reading per character ('A' anomalous, '.' normal) one second apart."""
    events: list[AlertEvent] = []
    for i, ch in enumerate(pattern):
        seq = start + i
        events += tracker.observe(verdict(seq, alert=ch == "A", machine=machine), T0 + seq)
    return events


def kinds(events: list[AlertEvent]) -> list[str]:
    """The event kinds, in order."""
    return [e.event for e in events]


# -- policy ---------------------------------------------------------------------------------
def test_default_policy_is_three_of_five_clear_after_ten_offline_after_sixty() -> None:
    """The documented defaults are k=3, n=5, m=10 and 60 s of silence."""
    policy = AlertPolicy()
    assert (policy.k, policy.n, policy.m, policy.offline_after_s) == (3, 5, 10, 60.0)


@pytest.mark.parametrize(
    ("k", "n", "m", "offline"),
    [(0, 5, 10, 60.0), (6, 5, 10, 60.0), (3, 5, 0, 60.0), (3, 5, 10, 0.0), (3, 5, 10, -1.0)],
)
def test_policy_rejects_impossible_settings(k: int, n: int, m: int, offline: float) -> None:
    """k outside 1..n, m below 1 or a non-positive offline delay are refused."""
    with pytest.raises(ValueError, match=r"alert policy|offline_after_s"):
        AlertPolicy(k=k, n=n, m=m, offline_after_s=offline)


def test_policy_rejects_non_finite_offline_delay() -> None:
    """An infinite or NaN offline delay is refused rather than silently disabling it."""
    with pytest.raises(ValueError, match="offline_after_s"):
        AlertPolicy(offline_after_s=float("nan"))
    with pytest.raises(ValueError, match="offline_after_s"):
        AlertPolicy(offline_after_s=float("inf"))


# -- raise ----------------------------------------------------------------------------------
def test_raises_when_three_of_the_last_five_readings_are_anomalous() -> None:
    """A.A.A raises on the third anomaly, carrying its seq, peak score and explanation."""
    tracker = AlertTracker()
    assert feed(tracker, "A.A.") == []
    events = tracker.observe(verdict(5, alert=True, score=0.9, feature="tool_wear_min"), T0 + 5)
    assert kinds(events) == ["ALERT_RAISED"]
    raised = events[0]
    assert raised.seq == 5
    assert raised.at == T0 + 5
    assert raised.alert_id == alert_id("m1", T0 + 5, 1)
    assert raised.peak_score == 0.9
    assert raised.duration_s == 0.0
    assert raised.anomalous_in_window == 3
    assert raised.explanation is not None
    assert raised.explanation[0].feature == "tool_wear_min"


def test_two_anomalies_in_five_never_raise() -> None:
    """Two anomalies in every window of five stay below k=3 forever."""
    tracker = AlertTracker()
    assert feed(tracker, "A.A.." * 10) == []
    assert tracker.state("m1").state == "NORMAL"


def test_anomalies_spread_wider_than_the_window_never_raise() -> None:
    """Three anomalies more than five readings apart never share a window."""
    tracker = AlertTracker()
    assert feed(tracker, "A....A....A....") == []


def test_k_of_one_raises_on_the_first_anomaly() -> None:
    """With k=1 a single anomalous reading raises immediately."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    assert kinds(feed(tracker, "..A")) == ["ALERT_RAISED"]


def test_peak_explanation_is_that_of_the_highest_score_in_the_window() -> None:
    """At raise, peak score and explanation come from the window's most anomalous reading."""
    tracker = AlertTracker()
    tracker.observe(verdict(1, alert=True, score=0.95, feature="rotational_speed_rpm"), T0)
    tracker.observe(verdict(2, alert=True, score=0.70), T0)
    [raised] = tracker.observe(verdict(3, alert=True, score=0.75), T0)
    assert raised.peak_score == 0.95
    assert raised.explanation is not None
    assert raised.explanation[0].feature == "rotational_speed_rpm"


# -- clear ----------------------------------------------------------------------------------
def test_clears_after_ten_consecutive_normal_readings() -> None:
    """An open alert clears on the tenth normal reading in a row, with its duration."""
    tracker = AlertTracker()
    assert kinds(feed(tracker, "AAA")) == ["ALERT_RAISED"]
    assert feed(tracker, "." * 9, start=4) == []
    assert tracker.state("m1").state == "ALERT"
    [cleared] = feed(tracker, ".", start=13)
    assert cleared.event == "ALERT_CLEARED"
    assert cleared.seq == 13
    assert cleared.alert_id == alert_id("m1", T0 + 3, 1)
    assert cleared.duration_s == 10.0
    assert cleared.peak_score == 0.8
    assert tracker.state("m1").state == "NORMAL"
    assert tracker.state("m1").alert_id is None


def test_an_anomaly_during_the_normal_streak_restarts_it() -> None:
    """Nine normals, one anomaly, then it takes ten more normals to clear (no flapping)."""
    tracker = AlertTracker()
    feed(tracker, "AAA")
    assert feed(tracker, "." * 9 + "A" + "." * 9, start=4) == []
    assert kinds(feed(tracker, ".", start=23)) == ["ALERT_CLEARED"]


def test_readings_between_the_two_thresholds_keep_the_alert_open() -> None:
    """Hysteresis: NORMAL verdicts above the clear threshold neither clear nor count."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=3))
    clear_below = 0.5

    def observe(seq: int, score: float) -> list[AlertEvent]:
        reading = verdict(seq, alert=score > THRESHOLD, score=score)
        return tracker.observe(reading, T0 + seq, clear_below)

    assert kinds(observe(1, 0.8)) == ["ALERT_RAISED"]
    # just under the alert threshold: NORMAL verdicts, but not clear ones
    assert [kinds(observe(seq, 0.55)) for seq in range(2, 12)] == [[]] * 10
    assert tracker.state("m1").state == "ALERT"
    assert observe(12, 0.45) == []
    assert observe(13, 0.45) == []
    assert observe(14, 0.55) == []  # a grey reading restarts the streak
    assert observe(15, 0.45) == []
    assert observe(16, 0.5) == []  # at the clear threshold counts as clear
    assert kinds(observe(17, 0.3)) == ["ALERT_CLEARED"]


def test_peak_score_grows_while_the_alert_is_open() -> None:
    """A higher score after the raise becomes the alert's peak, with its explanation."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    tracker.observe(verdict(1, alert=True, score=0.7), T0)
    tracker.observe(verdict(2, alert=True, score=0.99, feature="tool_wear_min"), T0 + 1)
    state = tracker.state("m1")
    assert state.peak_score == 0.99
    assert state.explanation is not None
    assert state.explanation[0].feature == "tool_wear_min"
    [cleared] = tracker.observe(verdict(3), T0 + 2)
    assert cleared.peak_score == 0.99


def test_window_starts_afresh_after_a_clear() -> None:
    """With m < n, anomalies left in the window cannot re-raise right after the clear."""
    tracker = AlertTracker(AlertPolicy(k=3, n=5, m=1))
    assert kinds(feed(tracker, "AAA.")) == ["ALERT_RAISED", "ALERT_CLEARED"]
    assert feed(tracker, "..", start=5) == []
    assert kinds(feed(tracker, "AAA", start=7)) == ["ALERT_RAISED"]


def test_state_counts_alerts_and_tracks_since() -> None:
    """The retained state says ALERT since the raise and counts alerts raised."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    feed(tracker, "A.A")
    state = tracker.state("m1")
    assert state.state == "ALERT"
    assert state.since == T0 + 3
    assert state.alert_since == T0 + 3
    assert state.alerts_raised == 2
    assert state.last_seq == 3
    assert state.last_score == 0.8
    assert state.window_size == 1


# -- duplicates and order -------------------------------------------------------------------
def test_duplicate_readings_do_not_count_twice() -> None:
    """The same anomalous reading delivered three times is one anomaly, not three."""
    tracker = AlertTracker()
    for _ in range(3):
        assert tracker.observe(verdict(1, alert=True), T0) == []
    assert tracker.state("m1").anomalous_in_window == 1


def test_a_late_reading_counts_and_a_redelivered_one_does_not() -> None:
    """Identity, not seq order, decides: a lower seq never seen counts (seqs may wrap)."""
    tracker = AlertTracker()
    feed(tracker, "AA", start=10)
    before = tracker.state("m1")
    assert tracker.observe(verdict(10, alert=True), T0 + 20) == []
    assert tracker.state("m1") == before
    assert kinds(tracker.observe(verdict(5, alert=True), T0 + 20)) == ["ALERT_RAISED"]


def test_duplicates_do_not_extend_the_normal_streak() -> None:
    """Redelivered normal readings do not clear an alert early."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=3))
    feed(tracker, "A")
    feed(tracker, "..", start=2)
    assert tracker.observe(verdict(3), T0 + 3) == []
    assert tracker.observe(verdict(3), T0 + 3) == []
    assert kinds(tracker.observe(verdict(4), T0 + 4)) == ["ALERT_CLEARED"]


# -- acknowledgement ------------------------------------------------------------------------
def test_ack_acknowledges_the_open_alert_once() -> None:
    """The first ack of an open alert emits ALERT_ACKNOWLEDGED; a second one nothing."""
    tracker = AlertTracker()
    feed(tracker, "AAA")
    [ack] = tracker.acknowledge(AckCommand(machine_id="m1", by="alice", note="on it"), T0 + 33)
    assert ack.event == "ALERT_ACKNOWLEDGED"
    assert ack.acknowledged_by == "alice"
    assert ack.note == "on it"
    assert ack.alert_id == alert_id("m1", T0 + 3, 1)
    assert ack.duration_s == 30.0
    assert ack.seq is None
    state = tracker.state("m1")
    assert state.state == "ALERT"
    assert state.acknowledged
    assert state.acknowledged_by == "alice"
    assert tracker.acknowledge(AckCommand(machine_id="m1", by="bob"), T0 + 40) == []


def test_ack_without_an_open_alert_does_nothing() -> None:
    """Acks of a normal machine or an unknown one are ignored."""
    tracker = AlertTracker()
    feed(tracker, "..")
    assert tracker.acknowledge(AckCommand(machine_id="m1", by="alice"), T0) == []
    assert tracker.acknowledge(AckCommand(machine_id="nobody", by="alice"), T0) == []
    assert not tracker.state("m1").acknowledged


def test_ack_naming_another_alert_is_ignored() -> None:
    """An ack for an alert that already cleared cannot acknowledge the next one."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    feed(tracker, "A.A")
    stale = AckCommand(machine_id="m1", by="alice", alert_id=alert_id("m1", T0 + 1, 1))
    assert tracker.acknowledge(stale, T0 + 4) == []
    current = AckCommand(machine_id="m1", by="alice", alert_id=alert_id("m1", T0 + 3, 2))
    assert kinds(tracker.acknowledge(current, T0 + 4)) == ["ALERT_ACKNOWLEDGED"]


def test_a_new_alert_needs_a_new_ack() -> None:
    """Acknowledgement belongs to one alert: the next alert starts unacknowledged."""
    tracker = AlertTracker(AlertPolicy(k=1, n=1, m=1))
    feed(tracker, "A")
    tracker.acknowledge(AckCommand(machine_id="m1", by="alice"), T0 + 1)
    feed(tracker, ".A", start=2)
    assert not tracker.state("m1").acknowledged


# -- offline --------------------------------------------------------------------------------
def test_silence_longer_than_the_limit_makes_a_machine_offline() -> None:
    """No reading for more than 60 s: one MACHINE_OFFLINE (silence), not repeated."""
    tracker = AlertTracker()
    feed(tracker, "..")  # last reading at T0 + 2
    assert tracker.tick(T0 + 62) == []
    [offline] = tracker.tick(T0 + 62.5)
    assert offline.event == "MACHINE_OFFLINE"
    assert offline.reason == "silence"
    assert offline.duration_s == 60.5
    assert offline.at == T0 + 62.5
    assert tracker.state("m1").state == "OFFLINE"
    assert tracker.tick(T0 + 500) == []


def test_a_new_reading_brings_an_offline_machine_back() -> None:
    """The first new reading after OFFLINE emits MACHINE_ONLINE and the state is NORMAL again."""
    tracker = AlertTracker()
    feed(tracker, "..")
    tracker.tick(T0 + 100)
    [online] = tracker.observe(verdict(3), T0 + 130)
    assert online.event == "MACHINE_ONLINE"
    assert online.seq == 3
    assert online.duration_s == 30.0
    state = tracker.state("m1")
    assert state.state == "NORMAL"
    assert state.since == T0 + 130


def test_last_will_makes_a_machine_offline_at_once() -> None:
    """The sensor's status turning offline gives MACHINE_OFFLINE (last_will) without waiting."""
    tracker = AlertTracker()
    feed(tracker, ".")
    [offline] = tracker.sensor_offline("m1", T0 + 2)
    assert offline.event == "MACHINE_OFFLINE"
    assert offline.reason == "last_will"
    assert tracker.sensor_offline("m1", T0 + 3) == []
    assert tracker.tick(T0 + 1000) == []


def test_last_will_of_an_unknown_machine_is_ignored() -> None:
    """A retained offline status of a machine never seen creates no state and no event."""
    tracker = AlertTracker()
    assert tracker.sensor_offline("ghost", T0) == []
    assert tracker.machines == []


def test_an_open_alert_survives_an_outage() -> None:
    """OFFLINE overlays an open alert; back online the machine is in ALERT again."""
    tracker = AlertTracker()
    feed(tracker, "AAA")
    [offline] = tracker.sensor_offline("m1", T0 + 10)
    assert offline.alert_id == alert_id("m1", T0 + 3, 1)
    state = tracker.state("m1")
    assert state.state == "OFFLINE"
    assert state.alert_id == alert_id("m1", T0 + 3, 1)
    assert kinds(tracker.observe(verdict(4, alert=True), T0 + 20)) == ["MACHINE_ONLINE"]
    assert tracker.state("m1").state == "ALERT"


def test_a_reading_can_bring_a_machine_online_and_raise_at_once() -> None:
    """MACHINE_ONLINE comes first, then the alert that the same reading completes."""
    tracker = AlertTracker()
    feed(tracker, "AA")
    tracker.tick(T0 + 100)
    events = tracker.observe(verdict(3, alert=True), T0 + 101)
    assert kinds(events) == ["MACHINE_ONLINE", "ALERT_RAISED"]


def test_a_redelivered_old_reading_does_not_bring_a_machine_back() -> None:
    """Only a new reading (higher seq) counts as the machine being back."""
    tracker = AlertTracker()
    feed(tracker, "...")
    tracker.tick(T0 + 100)
    assert tracker.observe(verdict(2), T0 + 101) == []
    assert tracker.state("m1").state == "OFFLINE"


def test_machines_are_tracked_independently() -> None:
    """One machine's anomalies and silence do not touch another's state."""
    tracker = AlertTracker()
    events = feed(tracker, "AAA", machine="m1") + feed(tracker, "...", machine="m2")
    assert [(e.machine_id, e.event) for e in events] == [("m1", "ALERT_RAISED")]
    assert tracker.state("m2").state == "NORMAL"
    tracker.observe(verdict(50, machine="m2"), T0 + 50)
    offline = tracker.tick(T0 + 70)
    assert [(e.machine_id, e.event) for e in offline] == [("m1", "MACHINE_OFFLINE")]
    assert tracker.state("m2").state == "NORMAL"
    assert [s.machine_id for s in tracker.states()] == ["m1", "m2"]


def test_state_of_an_unknown_machine_is_a_key_error() -> None:
    """Asking for a machine never seen raises KeyError instead of inventing a state."""
    with pytest.raises(KeyError):
        AlertTracker().state("ghost")


# -- wire models ----------------------------------------------------------------------------
def test_events_and_states_round_trip_through_json() -> None:
    """Every event and state the tracker produces decodes back to an equal model."""
    tracker = AlertTracker(AlertPolicy(k=1, n=2, m=1))
    events = feed(tracker, "A")
    events += tracker.acknowledge(AckCommand(machine_id="m1", by="Alice Smith", note=""), T0 + 2)
    events += tracker.tick(T0 + 100) + feed(tracker, ".", start=2)
    assert kinds(events) == [
        "ALERT_RAISED",
        "ALERT_ACKNOWLEDGED",
        "MACHINE_OFFLINE",
        "MACHINE_ONLINE",
        "ALERT_CLEARED",
    ]
    for event in events:
        assert AlertEvent.model_validate_json(event.encode()) == event
    state = tracker.state("m1")
    assert MachineState.model_validate_json(state.encode()) == state


@pytest.mark.parametrize(
    "payload",
    [
        b'{"machine_id": "m1"}',  # no operator
        b'{"machine_id": "m1", "by": ""}',
        b'{"machine_id": "m1", "by": "eve\\u001b[2J"}',  # terminal escape in a name
        b'{"machine_id": "m 1", "by": "alice"}',
        b'{"machine_id": "m1", "by": "alice", "extra": 1}',
        b'{"machine_id": "m1", "by": "alice", "note": "x\\u0007"}',
        b'{"machine_id": "m1", "by": "alice", "schema_version": 2}',
    ],
)
def test_ack_command_rejects_bad_payloads(payload: bytes) -> None:
    """Ack commands are validated like every wire model: strict, no extras, no control chars."""
    with pytest.raises(ValidationError):
        AckCommand.model_validate_json(payload)


def test_event_time_must_be_unix_seconds() -> None:
    """An event time in milliseconds is refused at construction."""
    with pytest.raises(ValidationError):
        AlertEvent(machine_id="m1", line="l1", event="ALERT_RAISED", at=T0 * 1000)


# -- topics ---------------------------------------------------------------------------------
@pytest.mark.parametrize("root", ["factory", "acme/site1"])
def test_alert_topics_sit_in_the_alerts_tree(root: str) -> None:
    """Event and state topics are built as documented and matched by the alerts filter."""
    topics = Topics(root)
    assert topics.event("line1", "m1") == f"{root}/alerts/line1/m1/event"
    assert topics.state("line1", "m1") == f"{root}/alerts/line1/m1/state"
    for topic in (topics.event("line1", "m1"), topics.state("line1", "m1")):
        assert topic_matches_sub(topics.alerts_filter, topic)
    assert topics.parse_alert(topics.event("line1", "m1")) == ("line1", "m1", "event")
    assert topics.parse_alert(topics.state("line1", "m1")) == ("line1", "m1", "state")
    assert topics.parse_alert(topics.verdict("line1", "m1")) == ("line1", "m1", "verdict")


@pytest.mark.parametrize(
    "topic",
    [
        "factory/alerts/line1/m1",
        "factory/alerts/line1/m1/other",
        "factory/alerts/line1/m1/state/x",
        "factory/alerts/line1/+/state",
        "factory/alerts/line1/m1\n/state",
        "factory/commands/line1/m1/ack",
        "other/alerts/line1/m1/state",
    ],
)
def test_parse_alert_rejects_other_topics(topic: str) -> None:
    """Only ``<root>/alerts/<line>/<machine>/(verdict|event|state)`` parses."""
    with pytest.raises(PayloadError):
        Topics().parse_alert(topic)


@pytest.mark.parametrize("root", ["factory", "acme/site1"])
def test_ack_topics_build_parse_and_match_their_filter(root: str) -> None:
    """Ack topics round-trip through parse_ack and match ack_filter, not the alerts filter."""
    topics = Topics(root)
    topic = topics.ack("line1", "m1")
    assert topic == f"{root}/commands/line1/m1/ack"
    assert topics.parse_ack(topic) == ("line1", "m1")
    assert topic_matches_sub(topics.ack_filter, topic)
    assert not topic_matches_sub(topics.alerts_filter, topic)
    assert not topic_matches_sub(topics.ack_filter, topics.state("line1", "m1"))


@pytest.mark.parametrize(
    "topic",
    [
        "factory/commands/line1/m1",
        "factory/commands/line1/m1/nack",
        "factory/commands/line1/m1/ack/x",
        "factory/commands/+/m1/ack",
        "factory/commands/line1/-m/ack",
        "factory/alerts/line1/m1/ack",
    ],
)
def test_parse_ack_rejects_other_topics(topic: str) -> None:
    """Only ``<root>/commands/<line>/<machine>/ack`` parses as an ack."""
    with pytest.raises(PayloadError):
        Topics().parse_ack(topic)


def test_builders_refuse_ids_that_are_not_one_level() -> None:
    """Event, state and ack topics cannot be built from ids with slashes or wildcards."""
    topics = Topics()
    for build in (topics.event, topics.state, topics.ack):
        with pytest.raises(ValueError, match="invalid"):
            build("line1", "a/b")
        with pytest.raises(ValueError, match="invalid"):
            build("+", "m1")


def test_sensor_status_filter_matches_sensors_only() -> None:
    """The sensor status filter sees sensors' last wills, not the detector's status."""
    topics = Topics()
    assert topic_matches_sub(topics.sensor_status_filter, topics.status("sensor", "m1"))
    assert not topic_matches_sub(topics.sensor_status_filter, topics.status("detector", "d"))
    assert topics.parse_sensor_status(topics.status("sensor", "m1")) == "m1"
    for bad in ("factory/status/detector/d", "factory/status/sensor", "factory/status/sensor/+"):
        with pytest.raises(PayloadError):
            topics.parse_sensor_status(bad)
