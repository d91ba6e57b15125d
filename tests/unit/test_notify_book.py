"""The Alertmanager side of notifications, pure: which alerts fire, resolve and re-send."""

from __future__ import annotations

import pytest

from factorywatch.contracts import AlertEvent, Contribution, MachineState
from factorywatch.notify import (
    ANOMALY,
    OFFLINE,
    AlertBook,
    parse_labels,
    receivers_without_channels,
    rfc3339,
)
from tests.support import PROJECT_DIR

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
    book.delivered(book.on_event(_event("ALERT_RAISED", alert_id="a1", peak_score=0.7)))
    [acked] = book.on_event(_event("ALERT_ACKNOWLEDGED", acknowledged_by="ana", note="on it"))
    assert acked["annotations"]["acknowledged_by"] == "ana"
    [cleared] = book.on_event(_event("ALERT_CLEARED", at=T0 + 60, alert_id="a1"))
    assert cleared["endsAt"] == rfc3339(T0 + 60)
    assert cleared["startsAt"] == rfc3339(T0)
    assert book.refresh(T0 + 61, 30) == [cleared], "re-sent until Alertmanager has it"
    book.delivered([cleared])
    assert book.refresh(T0 + 62, 30) == []
    assert book.on_event(_event("ALERT_ACKNOWLEDGED", acknowledged_by="late")) == []


def test_offline_and_online_are_their_own_alert() -> None:
    """MACHINE_OFFLINE fires FactorywatchMachineOffline; MACHINE_ONLINE resolves it."""
    book = AlertBook()
    [off] = book.on_event(_event("MACHINE_OFFLINE", reason="last_will"))
    book.delivered([off])
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
    book.delivered([fired, offline_resolved])
    resolved = book.on_state(normal, T0 + 2)
    assert {a["labels"]["alertname"] for a in resolved} == {ANOMALY, OFFLINE}
    assert all(a["endsAt"] == rfc3339(T0 + 2) for a in resolved)
    assert book.firing == {}


def test_labels_option_is_parsed_or_refused() -> None:
    """`--label site=plant1` pairs become labels; a malformed pair is a clear error."""
    assert parse_labels("site=plant1, team=maint") == {"site": "plant1", "team": "maint"}
    with pytest.raises(ValueError, match="invalid label"):
        parse_labels("no-equals")


def test_an_alert_raised_and_cleared_while_alertmanager_is_away_is_sent_firing_then_resolved() -> (
    None
):
    """Nothing is delivered while Alertmanager is down: the clear of an alert it never had
    is posted firing first, re-sent until delivered, and only then resolved (Alertmanager
    would notify no one of an alert it first learned of resolved)."""
    book = AlertBook()
    book.on_event(_event("ALERT_RAISED", alert_id="a1"))  # the post fails: never delivered
    [now] = book.on_event(_event("ALERT_CLEARED", at=T0 + 10, alert_id="a1"))
    assert "endsAt" not in now, "posted firing, not resolved"
    [firing] = book.refresh(T0 + 20, 5)
    assert firing["endsAt"] == rfc3339(T0 + 40)
    assert book.refresh(T0 + 25, 5) == [{**firing, "endsAt": rfc3339(T0 + 45)}]
    book.delivered([firing])  # Alertmanager is back
    [resolution] = book.refresh(T0 + 30, 5)
    assert resolution["endsAt"] == rfc3339(T0 + 10)
    book.delivered([resolution])
    assert book.tracked == {}


def test_a_clear_never_seen_firing_is_only_resolved_and_the_book_is_bounded() -> None:
    """A clear for an alert this book never saw (an earlier notifier's) is one resolution,
    not a new firing alert; past the bound, the oldest undelivered resolutions are dropped
    and counted, while open alerts are kept."""
    book = AlertBook(max_tracked=3)
    [resolved] = book.on_event(_event("ALERT_CLEARED", at=T0 + 5))
    assert resolved["endsAt"] == rfc3339(T0 + 5)
    book.on_event(_event("ALERT_RAISED", alert_id="a1"))  # a new episode replaces it
    for machine in ("m2", "m3", "m4"):
        book.on_event(AlertEvent(machine_id=machine, line="line1", event="MACHINE_ONLINE", at=T0))
    assert len(book.tracked) == 3
    assert book.dropped == 1
    assert (OFFLINE, "line1", "m2") not in book.tracked, "the oldest resolution went first"
    assert (ANOMALY, "line1", "press-1") in book.firing


def test_receivers_without_a_channel_are_named() -> None:
    """The shipped Alertmanager config routes to a receiver with no channel (the notifier
    warns about it); one with a webhook is fine; sub-routes are followed."""
    shipped = (PROJECT_DIR / "deploy" / "alertmanager" / "alertmanager.yml").read_text()
    assert receivers_without_channels(shipped) == ["operators"]
    hooked = """
route: {receiver: hook, routes: [{receiver: pager, matchers: [severity = critical]}]}
receivers:
  - name: hook
    webhook_configs: [{url: "http://127.0.0.1:1/hook"}]
  - name: pager
"""
    assert receivers_without_channels(hooked) == ["pager"]


def test_severity_follows_how_far_the_driving_features_are_from_training() -> None:
    """An anomaly whose driving features lie within `critical_z` standard deviations is a
    warning, one beyond it (or without an explanation) is critical, from events and from
    retained states alike; an offline machine is a warning."""
    book = AlertBook(critical_z=4.0)
    mild = [Contribution(feature="torque_nm", value=55.0, z=2.5)]
    far = [*mild, Contribution(feature="power_w", value=9e3, z=-4.2)]
    [warning] = book.on_event(_event("ALERT_RAISED", alert_id="a1", explanation=mild))
    assert warning["labels"]["severity"] == "warning"
    [critical] = book.on_event(_event("ALERT_RAISED", at=T0 + 9, alert_id="a2", explanation=far))
    assert critical["labels"]["severity"] == "critical"
    [unexplained] = book.on_event(_event("ALERT_RAISED", at=T0 + 20, alert_id="a3"))
    assert unexplained["labels"]["severity"] == "critical"
    state = MachineState(
        machine_id="press-2", line="line1", state="ALERT", since=T0, alert_id="b1",
        window_size=5, explanation=mild,
    )  # fmt: skip
    assert book.on_state(state, T0)[0]["labels"]["severity"] == "warning"
    [offline] = book.on_event(_event("MACHINE_OFFLINE", reason="last_will"))
    assert offline["labels"]["severity"] == "warning"
