"""Properties of the alert state machine over arbitrary streams (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from factorywatch.contracts import AckCommand, AlertEvent, Contribution, Verdict
from factorywatch.detector.alerting import AlertPolicy, AlertTracker
from factorywatch.detector.state import RECENT_IDENTITIES

T0 = 1_700_000_000.0
PROPS = settings(max_examples=200, deadline=None)


@dataclass(frozen=True)
class Reading:
    """One generated reading: its sequence number and whether the detector flagged it."""

    seq: int
    anomalous: bool
    score: float


def verdict(reading: Reading, machine: str = "m1") -> Verdict:
    """The verdict the detector would publish for ``reading``."""
    return Verdict(
        machine_id=machine,
        line="line1",
        seq=reading.seq,
        reading_ts=T0,
        status="ALERT" if reading.anomalous else "NORMAL",
        score=reading.score,
        threshold=0.6,
        model_version="v1",
        latency_ms=1.0,
        explanation=[Contribution(feature="torque_nm", value=1.0, z=4.0)]
        if reading.anomalous
        else None,
    )


@st.composite
def policies(draw: st.DrawFn) -> AlertPolicy:
    """Any valid k-of-n / m policy, small enough that transitions happen often."""
    n = draw(st.integers(1, 8))
    return AlertPolicy(k=draw(st.integers(1, n)), n=n, m=draw(st.integers(1, 12)))


@st.composite
def streams(draw: st.DrawFn, max_size: int = 120) -> list[Reading]:
    """Readings whose seq mostly grows but also repeats and goes back (redelivery, reorder)."""
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from([1, 1, 1, 1, 2, 0, -1, -3]),
                st.booleans(),
                st.floats(0.3, 1.0, allow_nan=False),
            ),
            max_size=max_size,
        )
    )
    seq, out = 100, []
    for delta, anomalous, score in steps:
        seq += delta
        out.append(Reading(seq, anomalous, score))
    return out


def accepted(stream: list[Reading]) -> list[Reading]:
    """The readings the tracker must count: those not among the last applied identities.

    Identity, not seq order, decides (Sparkplug sequence numbers wrap): a late reading never
    seen counts, a redelivered one does not.
    """
    out: list[Reading] = []
    for r in stream:
        if r.seq not in [a.seq for a in out[-RECENT_IDENTITIES:]]:
            out.append(r)
    return out


def run(policy: AlertPolicy, stream: list[Reading], machine: str = "m1") -> list[AlertEvent]:
    """Feed a whole stream (one second apart) and collect every event."""
    tracker = AlertTracker(policy)
    events: list[AlertEvent] = []
    for i, r in enumerate(stream):
        events += tracker.observe(verdict(r, machine), T0 + i)
    return events


def reference(policy: AlertPolicy, stream: list[Reading]) -> list[tuple[str, int]]:
    """The rule read literally, on the full history: ``(event, seq)`` of every transition."""
    events: list[tuple[str, int]] = []
    history: list[bool] = []  # anomalous flags since the last clear
    is_open, streak = False, 0
    for r in accepted(stream):
        history.append(r.anomalous)
        if not is_open:
            if sum(history[-policy.n :]) >= policy.k:
                is_open, streak = True, 0
                events.append(("ALERT_RAISED", r.seq))
        else:
            streak = 0 if r.anomalous else streak + 1
            if streak >= policy.m:
                is_open, history = False, []
                events.append(("ALERT_CLEARED", r.seq))
    return events


@PROPS
@given(policies(), streams())
def test_matches_the_rule_read_literally(policy: AlertPolicy, stream: list[Reading]) -> None:
    """Raise and clear happen exactly where a full-history reading of k-of-n / m says."""
    got = [(e.event, e.seq) for e in run(policy, stream)]
    assert got == reference(policy, stream)


@PROPS
@given(policies(), streams())
def test_raised_and_cleared_alternate(policy: AlertPolicy, stream: list[Reading]) -> None:
    """Per machine, events go RAISED, CLEARED, RAISED, ... and never twice the same."""
    names = [e.event for e in run(policy, stream)]
    assert names == ["ALERT_RAISED", "ALERT_CLEARED"] * (len(names) // 2) + (
        ["ALERT_RAISED"] if len(names) % 2 else []
    )


@PROPS
@given(policies(), streams())
def test_no_flapping(policy: AlertPolicy, stream: list[Reading]) -> None:
    """At least m readings lie between a raise and its clear, k anomalies before a re-raise."""
    positions = {r.seq: i for i, r in enumerate(accepted(stream))}
    flags = [r.anomalous for r in accepted(stream)]
    previous: AlertEvent | None = None
    for event in run(policy, stream):
        assert event.seq is not None
        here = positions[event.seq]
        if previous is not None:
            assert previous.seq is not None
            there = positions[previous.seq]
            if event.event == "ALERT_CLEARED":
                assert here - there >= policy.m
            else:
                assert sum(flags[there + 1 : here + 1]) >= policy.k
        previous = event


@PROPS
@given(policies(), streams())
def test_raised_only_when_k_of_the_last_n_were_anomalous(
    policy: AlertPolicy, stream: list[Reading]
) -> None:
    """Each raise completes k anomalies among the last n readings since the previous clear."""
    kept = accepted(stream)
    positions = {r.seq: i for i, r in enumerate(kept)}
    after_clear = 0
    for event in run(policy, stream):
        assert event.seq is not None
        i = positions[event.seq]
        if event.event == "ALERT_CLEARED":
            after_clear = i + 1
            continue
        window = kept[max(after_clear, i - policy.n + 1) : i + 1]
        assert kept[i].anomalous
        assert sum(r.anomalous for r in window) >= policy.k
        assert event.anomalous_in_window is not None
        assert policy.k <= event.anomalous_in_window <= policy.n
        assert event.peak_score == max(r.score for r in window if r.anomalous)


@PROPS
@given(
    st.integers(2, 8).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.integers(2, n),
            st.lists(st.integers(n - 1, 3 * n), max_size=20),
        )
    )
)
def test_isolated_anomalies_never_raise(args: tuple[int, int, list[int]]) -> None:
    """With k > 1, anomalies at least n-1 normal readings apart never raise an alert."""
    n, k, gaps = args
    pattern = [True]
    for gap in gaps:
        pattern += [False] * gap + [True]
    stream = [Reading(i, a, 0.9 if a else 0.4) for i, a in enumerate(pattern)]
    assert run(AlertPolicy(k=k, n=n, m=1), stream) == []


@PROPS
@given(policies(), streams(), st.data())
def test_redelivering_old_readings_changes_nothing(
    policy: AlertPolicy, stream: list[Reading], data: st.DataObject
) -> None:
    """After any stream, replaying readings already seen emits nothing and keeps the state."""
    if not stream:
        return
    tracker = AlertTracker(policy)
    for i, r in enumerate(stream):
        tracker.observe(verdict(r), T0 + i)
    before = tracker.state("m1")
    replay = data.draw(st.lists(st.sampled_from(stream), min_size=1, max_size=30))
    for r in replay:
        assert tracker.observe(verdict(r), T0 + len(stream)) == []
    assert tracker.state("m1") == before


@PROPS
@given(policies(), streams(max_size=60), streams(max_size=60), st.lists(st.booleans()))
def test_machines_are_independent(
    policy: AlertPolicy, first: list[Reading], second: list[Reading], order: list[bool]
) -> None:
    """Interleaving two machines' streams gives each the events it gets on its own."""
    tracker = AlertTracker(policy)
    got: dict[str, list[AlertEvent]] = {"a": [], "b": []}
    queues = {"a": list(enumerate(first)), "b": list(enumerate(second))}
    picks = iter(order)
    while queues["a"] or queues["b"]:
        machine = "a" if not queues["b"] or (queues["a"] and next(picks, True)) else "b"
        i, r = queues[machine].pop(0)
        got[machine] += tracker.observe(verdict(r, machine), T0 + i)
    assert got["a"] == run(policy, first, "a")
    assert got["b"] == run(policy, second, "b")


Op = tuple[str, bool, float]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["read", "read", "read", "tick", "will", "ack"]),
        st.booleans(),
        st.floats(0.0, 90.0, allow_nan=False),
    ),
    max_size=80,
)


class Lifecycle:
    """What the events so far say about one machine, checked event by event."""

    def __init__(self, offline_after: float) -> None:
        self.offline_after = offline_after
        self.offline = False
        self.open_alert: str | None = None
        self.acked = False

    def check(self, event: AlertEvent, cause: str, silent_for: float | None) -> None:
        """Assert ``event`` may follow the earlier ones, given the call that produced it."""
        if event.event == "MACHINE_OFFLINE":
            assert not self.offline
            assert event.reason == {"tick": "silence", "will": "last_will"}[cause]
            if cause == "tick":
                assert silent_for is not None
                assert silent_for > self.offline_after
            self.offline = True
        elif event.event == "MACHINE_ONLINE":
            assert self.offline
            assert cause == "read"
            self.offline = False
        elif event.event == "ALERT_RAISED":
            assert self.open_alert is None
            assert not self.offline
            self.open_alert, self.acked = event.alert_id, False
        elif event.event == "ALERT_CLEARED":
            assert self.open_alert == event.alert_id
            self.open_alert = None
        else:
            assert event.event == "ALERT_ACKNOWLEDGED"
            assert self.open_alert is not None
            assert event.alert_id == self.open_alert
            assert not self.acked
            self.acked = True

    @property
    def expected_state(self) -> str:
        """The state the retained state topic must show now."""
        if self.offline:
            return "OFFLINE"
        return "ALERT" if self.open_alert else "NORMAL"


@PROPS
@given(policies(), OPS, st.floats(1.0, 60.0))
def test_lifecycle_under_readings_silence_wills_and_acks(
    policy: AlertPolicy, ops: list[Op], offline_after: float
) -> None:
    """Offline/online alternate and match the state; acks land once, on open alerts only."""
    policy = AlertPolicy(k=policy.k, n=policy.n, m=policy.m, offline_after_s=offline_after)
    tracker = AlertTracker(policy)
    life = Lifecycle(offline_after)
    now, seq, last_read = T0, 0, None
    for cause, anomalous, dt in ops:
        now += dt
        if cause == "read":
            seq += 1
            events = tracker.observe(verdict(Reading(seq, anomalous, 0.5)), now)
            last_read = now
        elif cause == "tick":
            events = tracker.tick(now)
        elif cause == "will":
            events = tracker.sensor_offline("m1", now)
        else:
            events = tracker.acknowledge(AckCommand(machine_id="m1", by="op"), now)
        silent_for = None if last_read is None else now - last_read
        for event in events:
            life.check(event, cause, silent_for)
        if silent_for is None:
            assert tracker.machines == []
            continue
        if cause == "tick" and silent_for > offline_after:
            assert life.offline
        state = tracker.state("m1")
        assert state.state == life.expected_state
        assert state.alert_id == life.open_alert
        assert state.acknowledged == (life.acked and life.open_alert is not None)
        assert state.anomalous_in_window <= policy.n


@PROPS
@given(
    st.lists(  # stretches of readings: ALERT or not, how many, a score for each
        st.tuples(
            st.booleans(),
            st.integers(min_value=1, max_value=15),
            st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=15, max_size=15),
        ),
        min_size=1,
        max_size=30,
    ),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_the_evaluation_raises_alarms_where_the_detector_raises_alerts(
    stretches: list[tuple[bool, int, list[float]]], clear_threshold: float
) -> None:
    """``model.streams.alarms`` (evaluate's alert level) raises exactly where the detector's
    alert tracker raises, clear threshold included: the reports count what operators see."""
    import numpy as np  # noqa: PLC0415

    from factorywatch.model.streams import alarms  # noqa: PLC0415

    rows = [(alert, scores[i]) for alert, n, scores in stretches for i in range(n)]
    tracker = AlertTracker(AlertPolicy())
    raised = []
    for i, (anomalous, score) in enumerate(rows):
        events = tracker.observe(verdict(Reading(i, anomalous, score)), T0 + i, clear_threshold)
        raised += [i for e in events if e.event == "ALERT_RAISED"]
    flagged = np.array([a for a, _ in rows], dtype=np.bool_)
    scores = np.array([s for _, s in rows])
    assert alarms(flagged, clear=scores <= clear_threshold) == raised
