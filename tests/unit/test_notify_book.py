"""The Alertmanager side of notifications, pure: which alerts fire, resolve and re-send."""

from __future__ import annotations

import pytest

from factorywatch.contracts import AlertEvent, Contribution, MachineState
from factorywatch.notify import ANOMALY, OFFLINE, AlertBook, parse_labels, rfc3339

T0 = 1_800_000_000.0


def _event(kind: str, at: float = T0, **kw: object) -> AlertEvent:
    return AlertEvent.model_validate(
        {"machine_id": "press-1", "line": "line1", "event": kind, "at": at, **kw}
    )


def test_raise_fires_with_labels_annotations_and_link() -> None:
    """A raise becomes one firing alert labelled by machine and line, with the peak score,
    the driving features and a link to the machine page."""
    book = AlertBook({"site": "plant-1"}, "http://web:8080/")
    [alert] = book.on_event(
        _event(
            "ALERT_RAISED",
            alert_id="press-1-7",
            peak_score=0.71,
            explanation=[Contribution(feature="power_w", value=11728.6, z=6.4)],
        )
    )
    assert alert["labels"] == {
        "site": "plant-1",
        "alertname": ANOMALY,
        "machine": "press-1",
        "line": "line1",
        "severity": "critical",
    }
    assert alert["annotations"]["peak_score"] == "0.710"
    assert alert["annotations"]["features"] == "power_w=1.173e+04 (z +6.4)"
    assert alert["startsAt"] == rfc3339(T0)
    assert alert["generatorURL"] == "http://web:8080/machine/line1/press-1"
    assert "endsAt" not in alert


def test_ack_annotates_and_clear_resolves_at_its_time() -> None:
    """An ack updates the firing alert; a clear sends it with endsAt = the clear time and
    forgets it, so re-sends stop."""
    book = AlertBook()
    book.on_event(_event("ALERT_RAISED", alert_id="a1", peak_score=0.7))
    [acked] = book.on_event(_event("ALERT_ACKNOWLEDGED", acknowledged_by="ana", note="on it"))
    assert acked["annotations"]["acknowledged_by"] == "ana"
    [cleared] = book.on_event(_event("ALERT_CLEARED", at=T0 + 60, alert_id="a1"))
    assert cleared["endsAt"] == rfc3339(T0 + 60)
    assert cleared["startsAt"] == rfc3339(T0)
    assert book.refresh(T0 + 61, 30) == []
    assert book.on_event(_event("ALERT_ACKNOWLEDGED", acknowledged_by="late")) == []


def test_offline_and_online_are_their_own_alert() -> None:
    """MACHINE_OFFLINE fires FactorywatchMachineOffline; MACHINE_ONLINE resolves it."""
    book = AlertBook()
    [off] = book.on_event(_event("MACHINE_OFFLINE", reason="last_will"))
    assert off["labels"]["alertname"] == OFFLINE
    assert "last_will" in off["annotations"]["summary"]
    [on] = book.on_event(_event("MACHINE_ONLINE", at=T0 + 5))
    assert on["endsAt"] == rfc3339(T0 + 5)


def test_refresh_pushes_end_time_ahead_for_every_firing_alert() -> None:
    """Open alerts are re-sent with endsAt four intervals ahead (kept alive while we live)."""
    book = AlertBook()
    book.on_event(_event("ALERT_RAISED", alert_id="a1"))
    [again] = book.refresh(T0 + 100, 60)
    assert again["endsAt"] == rfc3339(T0 + 340)


def test_retained_states_fire_open_alerts_and_resolve_the_rest() -> None:
    """On start, an ALERT state fires from its alert's start; a NORMAL one resolves both
    names even if this book never saw them (a clear missed while down)."""
    book = AlertBook()
    open_state = MachineState(
        machine_id="press-1", line="line1", state="ALERT", since=T0, alert_id="a9",
        alert_since=T0 - 30, window_size=5, acknowledged_by="bo",
    )  # fmt: skip
    [fired, offline_resolved] = book.on_state(open_state, T0 + 1)
    assert fired["startsAt"] == rfc3339(T0 - 30)
    assert fired["annotations"]["acknowledged_by"] == "bo"
    assert offline_resolved["labels"]["alertname"] == OFFLINE
    normal = MachineState(
        machine_id="press-1", line="line1", state="NORMAL", since=T0, window_size=5
    )
    resolved = book.on_state(normal, T0 + 2)
    assert {a["labels"]["alertname"] for a in resolved} == {ANOMALY, OFFLINE}
    assert all(a["endsAt"] == rfc3339(T0 + 2) for a in resolved)
    assert book.firing == {}


def test_labels_option_is_parsed_or_refused() -> None:
    """`--label site=plant1` pairs become labels; a malformed pair is a clear error."""
    assert parse_labels("site=plant1, team=maint") == {"site": "plant1", "team": "maint"}
    with pytest.raises(ValueError, match="invalid label"):
        parse_labels("no-equals")
