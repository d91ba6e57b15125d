"""A machine's own threshold (false-alarm feedback, widen, reset) and its realized alarm
rate (#21 items 2 and 4): the pure rules, then through the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from factorywatch.contracts import (
    DeadLetter,
    FeedbackCommand,
    MachineState,
    ThresholdCommand,
    Verdict,
)
from factorywatch.detector.engine import Engine, Inbound, Outcome
from factorywatch.detector.tuning import (
    FEEDBACK_MARGIN,
    RAISE_CAP,
    RATE_MIN_READINGS,
    SURPRISE_CAP,
    SURPRISE_STEP,
    WIDEN_STEP,
    Scale,
    Tuning,
    rate_span,
    rejudge,
)
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.topics import Topics
from tests.support import reading

SCALE = Scale(threshold=0.6, spread=0.1, target=0.005)
T0 = 1_800_000_000.0
TOPICS = Topics("tuning")


# -- the pure rules ----------------------------------------------------------------------------
def test_a_false_alarm_raises_the_threshold_just_above_its_peak() -> None:
    """The machine's threshold goes to the alert's peak plus a margin of the score spread."""
    tuning = Tuning()
    tuning.remember_peak("m1-1-1", 0.65)
    change = tuning.adjust("false_alarm", SCALE, by="ann", at=T0, alert_id="m1-1-1")
    assert change is not None
    assert tuning.effective(SCALE) == pytest.approx(0.65 + FEEDBACK_MARGIN * 0.1)
    assert change["before"] == 0.6
    assert change["after"] == pytest.approx(0.66)
    assert change["by"] == "ann"


def test_feedback_never_lowers_and_never_passes_the_ceiling() -> None:
    """A false alarm below the current threshold changes nothing; a huge peak stops at the
    card's threshold plus RAISE_CAP spreads."""
    tuning = Tuning()
    tuning.remember_peak("low", 0.3)
    tuning.remember_peak("huge", 50.0)
    tuning.adjust("false_alarm", SCALE, by="ann", at=T0, alert_id="low")
    assert tuning.effective(SCALE) == 0.6
    tuning.adjust("false_alarm", SCALE, by="ann", at=T0 + 1, alert_id="huge")
    assert tuning.effective(SCALE) == pytest.approx(0.6 + RAISE_CAP * 0.1)


def test_widen_steps_up_and_reset_goes_back_to_the_card() -> None:
    """Widen raises by WIDEN_STEP spreads (bounded); reset puts back the card's threshold
    and records the change like every other."""
    tuning = Tuning()
    tuning.adjust("widen", SCALE, by="ann", at=T0)
    assert tuning.effective(SCALE) == pytest.approx(0.6 + WIDEN_STEP * 0.1)
    for i in range(20):
        tuning.adjust("widen", SCALE, by="ann", at=T0 + 1 + i)
    assert tuning.effective(SCALE) == pytest.approx(SCALE.ceiling)
    tuning.adjust("reset", SCALE, by="bob", at=T0 + 100)
    assert tuning.threshold is None
    assert tuning.adjustments[-1]["action"] == "reset"
    assert tuning.adjustments[-1]["by"] == "bob"


def test_a_redelivered_command_is_applied_once() -> None:
    """The same widen (author, time) twice moves the threshold once."""
    tuning = Tuning()
    assert tuning.adjust("widen", SCALE, by="ann", at=T0) is not None
    assert tuning.adjust("widen", SCALE, by="ann", at=T0) is None
    assert tuning.effective(SCALE) == pytest.approx(0.6 + WIDEN_STEP * 0.1)
    assert len(tuning.adjustments) == 1


def test_feedback_for_an_unknown_alert_is_refused() -> None:
    """Only an alert whose peak the machine remembers can move its threshold."""
    with pytest.raises(KeyError):
        Tuning().adjust("false_alarm", SCALE, by="ann", at=T0, alert_id="nope")


def test_a_false_alarm_quietens_the_surprise_rule_too_within_its_cap() -> None:
    """With the surprise rule, a false alarm (and a widen) also raises the machine's surprise
    cut a decade, at most SURPRISE_CAP above the card's; reset restores it; the change
    records both cuts; a model without the rule keeps none."""
    scale = dataclasses.replace(SCALE, surprise=3.0)
    tuning = Tuning()
    tuning.remember_peak("a1", 0.5)  # under the threshold: the surprise rule raised it
    change = tuning.adjust("false_alarm", scale, by="ann", at=T0, alert_id="a1")
    assert change is not None
    assert (change["surprise_before"], change["surprise_after"]) == (3.0, 3.0 + SURPRISE_STEP)
    assert tuning.effective(scale) == 0.6, "a peak under the threshold leaves it"
    for k in range(10):
        tuning.adjust("widen", scale, by="ann", at=T0 + 1 + k)
    assert tuning.surprise_cut(scale) == 3.0 + SURPRISE_CAP
    restored = Tuning.restore(tuning.snapshot())
    assert restored.surprise_cut(scale) == 3.0 + SURPRISE_CAP
    tuning.adjust("reset", scale, by="bob", at=T0 + 20)
    assert tuning.surprise_cut(scale) == 3.0
    plain = Tuning()
    plain.remember_peak("a1", 0.7)
    change = plain.adjust("false_alarm", SCALE, by="ann", at=T0, alert_id="a1")
    assert change is not None
    assert "surprise_before" not in change
    assert plain.surprise_cut(SCALE) is None
    state = MachineState(machine_id="m1", line="l1", state="NORMAL", since=T0, window_size=5,
                         **Tuning.restore(tuning.snapshot()).state_fields())  # fmt: skip
    assert state.threshold_changes is not None
    assert [c.surprise_after for c in state.threshold_changes][-3:] == [6.0, 6.0, 3.0]


def test_rejudge_drops_a_surprise_at_or_under_the_machines_cut() -> None:
    """A verdict the surprise rule made an ALERT is NORMAL (and carries no surprise) under a
    machine's higher cut; above it, it stays an ALERT with its surprise."""
    verdict = Verdict.model_validate(
        {"machine_id": "m1", "line": "l1", "seq": 1, "reading_ts": T0, "status": "ALERT",
         "score": 0.5, "threshold": 0.6, "model_version": "v1", "latency_ms": 0.1,
         "surprise": 3.6}
    )  # fmt: skip
    quiet = rejudge(verdict, 0.6, 4.0)
    assert (quiet.status, quiet.surprise) == ("NORMAL", None)
    loud = rejudge(verdict, 0.6, 3.0)
    assert (loud.status, loud.surprise) == ("ALERT", 3.6)


def test_the_realized_rate_leaves_and_reenters_its_bound_once_each() -> None:
    """A machine alerting 5 % of the time against a 0.5 % target is out of bound once the
    estimate has counted enough readings, reported once; quiet again, it comes back."""
    tuning = Tuning()
    changes = [tuning.count(i % 20 == 0, SCALE) for i in range(4000)]
    assert changes.count("out_of_bound") == 1
    assert changes.index("out_of_bound") >= RATE_MIN_READINGS - 1
    assert tuning.state_fields()["alarm_rate_out_of_bound"] is True
    changes = [tuning.count(False, SCALE) for _ in range(20_000)]
    assert changes.count("within_bound") == 1
    assert tuning.out_of_bound is False


def test_the_state_shows_a_rate_only_once_it_is_judged() -> None:
    """A machine whose first verdict was an ALERT has a "rate" of 100 % of one reading: its
    retained state (and so the web view's tile) shows no alarm rate until the estimate has
    counted the readings its bound is judged on."""
    tuning = Tuning()
    tuning.count(True, SCALE)
    assert "alarm_rate" not in tuning.state_fields()
    span = round(rate_span(0.005))
    for _ in range(span - 2):
        tuning.count(False, SCALE)
    assert "alarm_rate" not in tuning.state_fields()
    tuning.count(False, SCALE)
    fields = tuning.state_fields()
    assert fields["alarm_rate"] == pytest.approx(1 / span)
    assert fields["alarm_rate_out_of_bound"] is False


def test_a_rate_at_its_target_stays_within_bound() -> None:
    """Alerting at the target rate never leaves the bound."""
    tuning = Tuning()
    changes = [tuning.count(i % 200 == 0, SCALE) for i in range(20_000)]
    assert "out_of_bound" not in changes
    assert tuning.rate == pytest.approx(0.005, rel=0.5)


@given(
    st.lists(
        st.tuples(st.sampled_from(["false_alarm", "widen", "reset"]), st.floats(0.0, 100.0)),
        max_size=30,
    )
)
def test_any_sequence_of_changes_stays_between_the_card_and_the_ceiling(
    steps: list[tuple[str, float]],
) -> None:
    """Whatever operators send, the threshold stays in [card, ceiling] and a snapshot
    restores the same tuning."""
    tuning = Tuning()
    for i, (action, peak) in enumerate(steps):
        tuning.remember_peak(f"a{i}", peak)
        tuning.adjust(action, SCALE, by="op", at=T0 + i, alert_id=f"a{i}")  # type: ignore[arg-type]
        assert SCALE.threshold <= tuning.effective(SCALE) <= SCALE.ceiling + 1e-12
    assert Tuning.restore(tuning.snapshot()) == tuning


# -- through the engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def touchy(small_model_dir: Path) -> LoadedModel:
    """The small fixture model with its threshold just below a typical reading's score, so a
    typical reading is an ALERT: a false alarm by construction."""
    model = artifact.load(small_model_dir)
    probe = Engine(model, TOPICS)
    (outcome,) = probe.handle([telemetry("probe", 1)], T0)
    score = outcome.verdicts[0].score
    card = model.card.model_copy(update={"threshold": score - 1e-6, "clear_threshold": None})
    return dataclasses.replace(model, card=card, states={})


def telemetry(machine: str, seq: int) -> Inbound:
    """A typical reading of ``machine`` as the engine receives it."""
    payload = reading(machine, seq, ts=T0 + seq).encode()
    return Inbound(TOPICS.telemetry("line1", machine), payload, T0 + seq, 0.0)


def command(leaf: str, body: FeedbackCommand | ThresholdCommand) -> Inbound:
    """An operator's command on ``<root>/commands/line1/m1/<leaf>``."""
    topic = f"{TOPICS.root}/commands/line1/{body.machine_id}/{leaf}"
    return Inbound(topic, body.encode(), T0 + 100, 0.0)


def states(outcomes: list[Outcome]) -> list[MachineState]:
    """The retained machine states the outcomes publish."""
    return [
        MachineState.model_validate_json(p.payload)
        for o in outcomes
        for p in o.publishes
        if p.topic.endswith("/state")
    ]


def verdicts(outcomes: list[Outcome]) -> list[Verdict]:
    """The verdicts the outcomes carry."""
    return [v for o in outcomes for v in o.verdicts]


def test_a_false_alarm_label_quietens_that_machine_only(touchy: LoadedModel) -> None:
    """Readings that alert on the card's threshold raise an alert; its false-alarm label
    raises m1's threshold above the alert's peak (recorded on m1's state, who and why), so
    the same readings are NORMAL for m1 afterwards while m2 still alerts."""
    engine = Engine(touchy, TOPICS)
    out = engine.handle([telemetry(m, s) for s in range(1, 6) for m in ("m1", "m2")], T0)
    assert {v.status for v in verdicts(out)} == {"ALERT"}
    alert_id = engine.record("m1").alert_id
    assert alert_id is not None
    label = FeedbackCommand(
        machine_id="m1", alert_id=alert_id, label="false_alarm", by="ann", at=T0 + 50
    )
    out = engine.handle([command("feedback", label)], T0 + 100)
    (state,) = states(out)
    assert state.threshold is not None
    assert state.threshold > touchy.card.threshold
    assert state.threshold_changes is not None
    assert state.threshold_changes[-1].by == "ann"
    assert state.threshold_changes[-1].alert_id == alert_id
    assert out[0].notices[0]["event"] == "threshold_changed"
    later = verdicts(engine.handle([telemetry(m, s) for s in (6, 7) for m in ("m1", "m2")], T0))
    assert {(v.machine_id, v.status) for v in later} == {("m1", "NORMAL"), ("m2", "ALERT")}
    assert {v.threshold for v in later if v.machine_id == "m1"} == {state.threshold}
    # the machine's own threshold survives a restart (it is in its keyed state)
    restored = Engine(touchy, TOPICS)
    restored.restore(engine.snapshot())
    assert restored.record("m1").tuning.threshold == state.threshold
    (again,) = verdicts(restored.handle([telemetry("m1", 8)], T0))
    assert again.status == "NORMAL"


def test_reset_and_bad_commands(touchy: LoadedModel) -> None:
    """Reset restores the card's threshold; feedback for an unknown alert, a command for a
    machine the detector never saw and a malformed one are dead-lettered with a reason."""
    engine = Engine(touchy, TOPICS)
    engine.handle([telemetry("m1", s) for s in range(1, 6)], T0)
    widen = ThresholdCommand(machine_id="m1", action="widen", by="ann", at=T0 + 60)
    engine.handle([command("threshold", widen)], T0 + 100)
    assert engine.record("m1").tuning.threshold is not None
    reset = ThresholdCommand(machine_id="m1", action="reset", by="ann", at=T0 + 61)
    engine.handle([command("threshold", reset)], T0 + 100)
    assert engine.record("m1").tuning.threshold is None

    unknown = FeedbackCommand(
        machine_id="m1", alert_id="m1-0-9", label="false_alarm", by="ann", at=T0 + 62
    )
    stranger = ThresholdCommand(machine_id="m9", action="widen", by="ann", at=T0 + 63)
    garbled = Inbound(f"{TOPICS.root}/commands/line1/m1/threshold", b'{"action": 1}', T0, 0.0)
    outcomes = engine.handle(
        [command("feedback", unknown), command("threshold", stranger), garbled], T0 + 100
    )
    reasons = [
        DeadLetter.model_validate_json(p.payload).reason
        for o in outcomes
        for p in o.publishes
        if "/deadletter/" in p.topic
    ]
    assert reasons == ["unknown_alert", "unknown_machine", "schema"]
    assert engine.record("m1").tuning.threshold is None
