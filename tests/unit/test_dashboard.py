"""The watch dashboard: sparklines, the model fed from the alerts tree, and its rendering."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from factorywatch.contracts import AlertEvent, Calibration, Contribution, MachineState, Verdict
from factorywatch.dashboard import BLOCKS, DashboardModel, render, sparkline
from factorywatch.topics import Topics

T0 = 1_700_000_000.0
TOPICS = Topics("plant")


def verdict(machine: str, seq: int, score: float, *, line: str = "line1") -> Verdict:
    """A verdict; scores above 0.6 are anomalous and explained by torque."""
    alert = score > 0.6
    return Verdict(
        machine_id=machine,
        line=line,
        seq=seq,
        reading_ts=T0 + seq,
        status="ALERT" if alert else "NORMAL",
        score=score,
        threshold=0.6,
        model_version="v1",
        latency_ms=1.0,
        explanation=[Contribution(feature="torque_nm", value=80.0, z=5.2)] if alert else None,
    )


def event(machine: str, kind: str, **extra: object) -> AlertEvent:
    """An alert event of ``kind`` for ``machine`` on line1."""
    return AlertEvent.model_validate(
        {"machine_id": machine, "line": "line1", "event": kind, "at": T0, **extra}
    )


def state(machine: str, condition: str, **extra: object) -> MachineState:
    """A retained machine state."""
    return MachineState.model_validate(
        {
            "machine_id": machine,
            "line": "line1",
            "state": condition,
            "since": T0,
            "window_size": 5,
            **extra,
        }
    )


def show(model: DashboardModel, width: int = 160) -> str:
    """Render to a recording console and return the plain text."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(render(model, caption="test caption"))
    return console.export_text()


def line_of(text: str, needle: str) -> str:
    """The one rendered line that contains ``needle``."""
    [found] = [ln for ln in text.splitlines() if needle in ln]
    return found


# -- sparkline ------------------------------------------------------------------------------
def test_sparkline_of_nothing_is_empty() -> None:
    """No values, no characters."""
    assert sparkline([]) == ""


def test_sparkline_spans_lowest_to_highest_block() -> None:
    """A rising series starts at the lowest block and ends at the highest, one char each."""
    line = sparkline([float(i) for i in range(8)])
    assert line == BLOCKS


def test_sparkline_of_a_flat_series_is_flat() -> None:
    """Equal values (or a single value) give the lowest block, not a division by zero."""
    assert sparkline([0.5, 0.5, 0.5]) == "▁▁▁"
    assert sparkline([0.7]) == "▁"


def test_sparkline_clamps_to_a_given_range() -> None:
    """Values outside an explicit lo..hi are clamped to the end blocks."""
    assert sparkline([-1.0, 0.0, 0.5, 1.0, 2.0], lo=0.0, hi=1.0) == "▁▁▅██"


def test_sparkline_shows_non_finite_values_as_gaps() -> None:
    """NaN and infinities become spaces and do not distort the scale of the others."""
    assert sparkline([0.0, float("nan"), 1.0, float("inf")]) == "▁ █ "
    assert sparkline([float("nan")]) == " "


def test_sparkline_rejects_an_inverted_range() -> None:
    """lo above hi is a caller error, reported as such."""
    with pytest.raises(ValueError, match="range is empty"):
        sparkline([1.0], lo=2.0, hi=1.0)


# -- the model ------------------------------------------------------------------------------
def test_verdicts_create_rows_with_bounded_history() -> None:
    """Each machine gets one row; only the last ``history`` scores are kept."""
    model = DashboardModel(TOPICS, history=4)
    for seq in range(10):
        model.apply(verdict("press-1", seq, 0.1 * (seq % 5)))
    model.apply(verdict("mill-3", 1, 0.3))
    assert [r.machine_id for r in model.sorted_rows()] == ["mill-3", "press-1"]
    row = model.rows[("line1", "press-1")]
    assert len(row.scores) == 4
    assert row.last_score == pytest.approx(0.4)


def test_events_drive_state_alert_count_and_ack() -> None:
    """RAISED, ACKNOWLEDGED, OFFLINE, ONLINE and CLEARED move the row's state as published."""
    model = DashboardModel(TOPICS)
    explanation = [{"feature": "tool_wear_min", "value": 200.0, "z": 6.0}]
    model.apply(event("press-1", "ALERT_RAISED", explanation=explanation))
    row = model.rows[("line1", "press-1")]
    assert (row.state, row.alerts_raised) == ("ALERT", 1)
    assert "tool_wear_min" in row.explanation
    model.apply(event("press-1", "ALERT_ACKNOWLEDGED", acknowledged_by="alice"))
    assert row.acknowledged_by == "alice"
    model.apply(event("press-1", "MACHINE_OFFLINE", reason="silence"))
    assert row.state == "OFFLINE"
    model.apply(event("press-1", "MACHINE_ONLINE"))
    assert row.state == "ALERT"
    model.apply(event("press-1", "ALERT_CLEARED"))
    assert row.state == "NORMAL"
    assert row.acknowledged_by is None


def test_retained_state_fills_a_row_before_any_verdict() -> None:
    """A retained state alone gives a row with state, score, alert count and explanation."""
    model = DashboardModel(TOPICS)
    explanation = [{"feature": "rotational_speed_rpm", "value": 2800.0, "z": 4.4}]
    model.apply(
        state(
            "lathe-2",
            "ALERT",
            alert_id="lathe-2-9",
            alerts_raised=7,
            last_score=0.71,
            explanation=explanation,
        )
    )
    row = model.rows[("line1", "lathe-2")]
    assert (row.state, row.alerts_raised, row.last_score) == ("ALERT", 7, 0.71)
    assert row.alert_open
    assert "rotational_speed_rpm z=+4.4" in row.explanation


def test_feed_dispatches_by_topic_and_counts_what_it_cannot_use() -> None:
    """Valid payloads on verdict/event/state topics apply; anything else is counted, no crash."""
    model = DashboardModel(TOPICS)
    assert model.feed(TOPICS.verdict("line1", "m1"), verdict("m1", 1, 0.9).encode())
    assert model.feed(TOPICS.event("line1", "m1"), event("m1", "ALERT_RAISED").encode())
    assert model.feed(TOPICS.state("line1", "m1"), state("m1", "ALERT").encode())
    bad = [
        (TOPICS.verdict("line1", "m1"), b"{not json"),
        (TOPICS.verdict("line1", "m1"), b'{"score": NaN}'),
        (TOPICS.event("line1", "m1"), verdict("m1", 2, 0.1).encode()),  # wrong model
        (TOPICS.verdict("line1", "m2"), verdict("m1", 3, 0.1).encode()),  # topic mismatch
        (TOPICS.verdict("line1", "m1"), b"\xff\xfe"),
        (TOPICS.verdict("line1", "m1"), b" " * (70 * 1024)),
        ("plant/alerts/line1/m1/other", b"{}"),
        ("elsewhere/alerts/line1/m1/verdict", b"{}"),
    ]
    for topic, payload in bad:
        assert not model.feed(topic, payload)
    assert model.ignored == len(bad)
    assert list(model.rows) == [("line1", "m1")]


def test_deleting_a_retained_state_removes_the_row() -> None:
    """An empty retained state (``mosquitto_pub -r -n``) retires the machine from the view."""
    model = DashboardModel(TOPICS)
    model.feed(TOPICS.state("line1", "old"), state("old", "OFFLINE").encode())
    assert model.feed(TOPICS.state("line1", "old"), b"")
    assert model.rows == {}
    assert model.ignored == 0


def test_history_must_hold_at_least_one_score() -> None:
    """A zero-length history is refused."""
    with pytest.raises(ValueError, match="history"):
        DashboardModel(TOPICS, history=0)


# -- rendering ------------------------------------------------------------------------------
def test_render_shows_one_row_per_machine_with_state_score_sparkline_and_explanation() -> None:
    """The recorded output has each machine with its state, score, sparkline and reasons."""
    model = DashboardModel(TOPICS)
    for seq, score in enumerate([0.30, 0.35, 0.40, 0.90, 0.95, 0.92]):
        model.apply(verdict("press-1", seq, score))
    model.apply(event("press-1", "ALERT_RAISED"))
    model.apply(event("press-1", "ALERT_ACKNOWLEDGED", acknowledged_by="alice"))
    for seq in range(3):
        model.apply(verdict("mill-3", seq, 0.3 + 0.01 * seq))
    model.apply(state("mill-3", "NORMAL"))
    model.apply(state("lathe-2", "OFFLINE", alert_id="lathe-2-4", last_score=0.5))
    text = show(model)

    assert "factorywatch: 3 machines, 1 in alert, 1 offline" in text
    assert "test caption" in text
    press = line_of(text, "line1/press-1")
    assert "ALERT" in press
    assert "ack alice" in press
    assert "0.920" in press
    assert "▁▂▂▇██" in press
    assert "torque_nm z=+5.2" in press
    assert press.rstrip().endswith("│")
    assert "NORMAL" in line_of(text, "line1/mill-3")
    lathe = line_of(text, "line1/lathe-2")
    assert "OFFLINE (alert open)" in lathe
    assert "0.500" in lathe


def test_rows_with_only_verdicts_show_the_reading_status_in_lower_case() -> None:
    """Without alert events the state column says what the last reading said, dimmed."""
    model = DashboardModel(TOPICS)
    model.apply(verdict("m1", 1, 0.9))
    assert "alert" in line_of(show(model), "line1/m1")


def test_empty_dashboard_says_it_is_waiting() -> None:
    """Before any message the table shows a waiting line, not an empty box."""
    text = show(DashboardModel(TOPICS))
    assert "0 machines" in text
    assert "waiting for messages" in text


def test_control_characters_from_the_broker_do_not_reach_the_terminal() -> None:
    """A feature name carrying an ANSI escape is rendered without the escape character."""
    model = DashboardModel(TOPICS)
    evil = [{"feature": "x\x1b[2Jy", "value": 1.0, "z": 9.0}]
    model.apply(event("m1", "ALERT_RAISED", explanation=evil))
    console = Console(record=True, width=120, file=io.StringIO(), force_terminal=True)
    console.print(render(model))
    assert "\x1b[2J" not in console.file.getvalue()  # type: ignore[attr-defined]
    assert "x[2Jy" in console.export_text()


def test_narrow_terminal_keeps_machine_and_state_visible() -> None:
    """On an 80-column SSH session the machine and its state stay readable."""
    model = DashboardModel(TOPICS)
    long_reason = [{"feature": f"feature_{i}", "value": 1.0, "z": 3.0} for i in range(8)]
    model.apply(event("press-1", "ALERT_RAISED", explanation=long_reason))
    for seq in range(30):
        model.apply(verdict("press-1", seq, 0.3 + 0.02 * seq))
    text = show(model, width=80)
    row = line_of(text, "line1/press-1")
    assert "ALERT" in row
    assert "0.880" in row
    assert "▇███" in row  # the newest scores survive; the oldest are cropped
    assert all(len(ln) <= 80 for ln in text.splitlines())


def test_machine_state_and_last_reading_are_labelled_apart() -> None:
    """An ALERT reading on a NORMAL machine reads as two labelled facts, not a contradiction."""
    model = DashboardModel(TOPICS)
    model.apply(state("press-1", "NORMAL"))
    model.apply(verdict("press-1", 1, 0.62))
    text = show(model)
    header = line_of(text, "Machine state")
    assert "Last reading" in header
    row = line_of(text, "line1/press-1")
    assert "NORMAL" in row
    assert "0.620 ALERT" in row
    model.apply(verdict("press-1", 2, 0.41))
    assert "0.410 normal" in line_of(show(model), "line1/press-1")


def test_model_switch_shows_in_the_title() -> None:
    """The title names the model of the newest verdict and the one it replaced."""
    model = DashboardModel(TOPICS)
    model.apply(verdict("press-1", 1, 0.3))
    assert "model v1" in show(model)
    assert "switched" not in show(model)
    switched = verdict("press-1", 2, 0.3).model_copy(update={"model_version": "v2"})
    model.apply(switched)
    assert "model v2 (switched from v1)" in show(model)


def test_calibrating_verdicts_show_progress_not_scores() -> None:
    """A CALIBRATING verdict shows the calibration's progress and adds no score; machines
    served by different models are named as such, not as a model switch."""
    model = DashboardModel(TOPICS)
    calibrating = verdict("new-1", 1, 0.0).model_copy(
        update={
            "status": "CALIBRATING",
            "model_version": "calibrating",
            "calibration": Calibration(seen=3, needed=60),
        }
    )
    model.apply(calibrating)
    row = model.rows[("line1", "new-1")]
    assert (len(row.scores), row.reading_status) == (0, "calibrating 3/60")
    assert "calibrating 3/60" in line_of(show(model), "new-1")
    model.apply(verdict("press-1", 1, 0.2))
    model.apply(verdict("mill-1", 1, 0.2).model_copy(update={"model_version": "v2"}))
    title = show(model).splitlines()[0]
    assert "2 models" in title
    assert model.previous_model is None
