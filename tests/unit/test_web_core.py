"""The web view's pure parts: logins against broker hashes, the live model and its deltas,
the feedback topic and contract, the pages around their shared layout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from factorywatch.accounts import read_registry, registry_path
from factorywatch.contracts import AlertEvent, FeedbackCommand, MachineState, Telemetry, Verdict
from factorywatch.credentials import add_user, hash_password, register, save_registry
from factorywatch.errors import PayloadError
from factorywatch.topics import Topics
from factorywatch.web import live
from factorywatch.web.app import PAGES, render_page
from factorywatch.web.auth import Accounts, Identity, verify_password
from factorywatch.web.live import LiveModel

T = Topics("factory")
NOBODY = Identity("", "viewer", "")


def test_passwords_are_checked_against_mosquitto_hashes(tmp_path: Path) -> None:
    """The broker's `$7$` hashes verify the right password only; roles come from the
    configured lists, and a user without a role cannot log in even with its password."""
    assert verify_password("s3cret", hash_password("s3cret"))
    assert not verify_password("s3cret ", hash_password("s3cret"))
    assert not verify_password("x", "$6$not$ours")
    assert not verify_password("x", "$7$101$%%%$%%%")
    op, viewer, machine = (add_user(tmp_path, u) for u in ("operator", "viewer", "press-1"))
    accounts = Accounts(tmp_path / "passwd", frozenset({"operator"}), frozenset({"viewer"}))
    assert (accounts.authenticate("operator", op) or NOBODY).role == "operator"
    assert (accounts.authenticate("viewer", viewer) or NOBODY).role == "viewer"
    assert accounts.authenticate("viewer", op) is None
    assert accounts.authenticate("press-1", machine) is None
    assert accounts.authenticate("nobody", "x") is None
    assert accounts.authenticate("operator", "") is None


def test_admins_are_operators_named_as_such(tmp_path: Path) -> None:
    """An operator in the admins list logs in as admin; a viewer or an unknown user in that
    list gains nothing; an admin demoted to viewer in the registry is a viewer."""
    passwords = {u: add_user(tmp_path, u) for u in ("alice", "bob", "carol")}
    register(tmp_path, "alice", "operator")
    register(tmp_path, "bob", "viewer")
    accounts = Accounts(
        tmp_path / "passwd", frozenset({"carol"}), frozenset(), frozenset({"alice", "bob", "zed"})
    )
    assert (accounts.authenticate("alice", passwords["alice"]) or NOBODY).role == "admin"
    assert (accounts.authenticate("bob", passwords["bob"]) or NOBODY).role == "viewer"
    assert (accounts.authenticate("carol", passwords["carol"]) or NOBODY).role == "operator"
    assert accounts.role_of("zed") is None
    registry = read_registry(registry_path(tmp_path))
    save_registry(tmp_path, registry.without("alice").with_service("alice", "viewer"))
    assert (accounts.current("alice") or NOBODY).role == "viewer"


def _verdict(seq: int, status: str = "NORMAL", score: float = 0.4) -> bytes:
    return Verdict.model_validate(
        {"machine_id": "m1", "line": "l1", "seq": seq, "reading_ts": 1.8e9 + seq,
         "status": status, "score": score, "threshold": 0.6, "model_version": "v1",
         "latency_ms": 0.3}
    ).encode()  # fmt: skip


def test_live_model_follows_verdicts_events_states_and_readings() -> None:
    """Verdicts feed the score series, events and states the alert fields, telemetry the
    channel series; deltas carry only what is new since the last one."""
    model = LiveModel(T, history=3)
    for seq in range(5):
        assert model.feed(T.verdict("l1", "m1"), _verdict(seq)) == "l1/m1"
    m = model.machines["l1/m1"]
    assert [p[0] for p in m.points] == [1.8e9 + 2, 1.8e9 + 3, 1.8e9 + 4]
    reading = Telemetry(
        machine_id="m1",
        line="l1",
        seq=9,
        ts=1.8e9,
        attributes={"product_type": "L"},
        readings={"torque_nm": 40.0},
    )
    model.feed(T.telemetry("l1", "m1"), reading.encode())
    raised = AlertEvent(machine_id="m1", line="l1", event="ALERT_RAISED", at=1.8e9, alert_id="a1",
                        peak_score=0.8)  # fmt: skip
    model.feed(T.event("l1", "m1"), raised.encode())
    assert (m.state, m.alert_id, m.peak_score) == ("ALERT", "a1", 0.8)
    delta = model.delta({"l1/m1"})
    [tile] = delta["machines"]
    assert len(tile["new_points"]) == 5
    assert tile["new_readings"] == [[1.8e9, {"torque_nm": 40.0}]]
    assert model.delta({"l1/m1"})["machines"][0]["new_points"] == []
    state = MachineState(machine_id="m1", line="l1", state="NORMAL", since=1.8e9, window_size=5)
    model.feed(T.state("l1", "m1"), state.encode())
    assert (m.state, m.alert_id) == ("NORMAL", None)
    assert model.feed(T.state("l1", "m1"), b"") == "l1/m1"
    assert model.delta({"l1/m1"}) == {"machines": [], "removed": ["l1/m1"]}


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("factory/alerts/l1/m1/verdict", b"{not json"),
        ("factory/alerts/l1/m2/verdict", _verdict(1)),  # payload names another machine
        ("factory/alerts/l1/m1/other", _verdict(1)),
        ("factory/elsewhere/l1/m1", _verdict(1)),
        ("factory/alerts/l1/m1/verdict", b"x" * 70_000),
    ],
)
def test_live_model_ignores_and_counts_bad_messages(topic: str, payload: bytes) -> None:
    """A message that is not a valid one of ours changes nothing and is counted."""
    model = LiveModel(T)
    assert model.feed(topic, payload) is None
    assert model.machines == {}
    assert model.ignored == 1


def test_feedback_topic_round_trips_and_refuses_others() -> None:
    """The feedback command topic is built and parsed in topics.py only."""
    topic = T.feedback("line1", "press-1")
    assert topic == "factory/commands/line1/press-1/feedback"
    assert T.parse_feedback(topic) == ("line1", "press-1")
    assert T.feedback_filter == "factory/commands/+/+/feedback"
    with pytest.raises(PayloadError):
        T.parse_feedback(T.ack("line1", "press-1"))
    with pytest.raises(ValueError, match="machine id"):
        T.feedback("line1", "bad/id")


def test_feedback_command_is_strict() -> None:
    """Only known labels, a named operator without control characters, finite times."""
    ok = FeedbackCommand(machine_id="m1", alert_id="m1-3", label="false_alarm", by="ana",
                         at=time.time())  # fmt: skip
    assert FeedbackCommand.model_validate_json(ok.encode()) == ok
    for bad in ({"label": "maybe"}, {"by": "\x1b[31mred"}, {"alert_id": ""}, {"at": 5.0}):
        with pytest.raises(ValidationError):
            FeedbackCommand.model_validate({**ok.model_dump(), **bad})


def test_live_model_shows_calibration_progress_without_points() -> None:
    """A CALIBRATING verdict says how far the calibration is and adds no score point."""
    model = LiveModel(T, history=3)
    payload = Verdict.model_validate(
        {"machine_id": "m1", "line": "l1", "seq": 1, "reading_ts": 1.8e9, "status": "CALIBRATING",
         "score": 0.0, "threshold": 0.0, "model_version": "calibrating", "latency_ms": 0.3,
         "calibration": {"seen": 4, "needed": 50}}
    ).encode()  # fmt: skip
    assert model.feed(T.verdict("l1", "m1"), payload) == "l1/m1"
    m = model.machines["l1/m1"]
    assert (list(m.points), m.last_status) == ([], "CALIBRATING 4/50")


def test_pages_share_one_head_and_keep_their_own_title_and_script() -> None:
    """Each page is one whole document: the layout's head and header bar once, its own title,
    its own <main> and its own app.js entry point (named on the script tag: no inline code),
    with no placeholder left."""
    for name, (title, entry) in PAGES.items():
        page = render_page(name)
        assert page.startswith("<!doctype html>\n")
        assert page.endswith("</html>\n")
        assert page.count("<head>") == page.count('href="/logout"') == page.count("<main>") == 1
        assert f"<title>factorywatch — {title}</title>" in page
        assert f'<script src="/static/app.js" data-entry="{entry}"></script>' in page
        assert "<script>" not in page, "inline script: the CSP (script-src 'self') blocks it"
        assert "${" not in page
    assert 'id="tiles"' in render_page("index.html")
    assert 'id="score-chart"' in render_page("machine.html")
    assert 'id="tiles"' not in render_page("machine.html")


def test_last_seen_follows_verdicts_not_only_the_retained_state() -> None:
    """A machine's last-seen is its latest verdict's reading time; the retained state,
    republished only on a change of state, never moves it back."""
    model = LiveModel(T)
    state = MachineState(machine_id="m1", line="l1", state="NORMAL", since=1.8e9,
                         window_size=5, last_seen=1.8e9)  # fmt: skip
    model.feed(T.state("l1", "m1"), state.encode())
    for seq in range(1, 121):  # two minutes of verdicts after the state
        model.feed(T.verdict("l1", "m1"), _verdict(seq))
    assert model.machines["l1/m1"].tile()["last_seen"] == 1.8e9 + 120
    model.feed(T.state("l1", "m1"), state.encode())  # e.g. redelivered on a reconnect
    assert model.machines["l1/m1"].tile()["last_seen"] == 1.8e9 + 120


def test_an_operators_label_shows_on_the_open_alert_until_the_next_one() -> None:
    """A feedback command about the open alert puts its label on the machine's tile; one
    about an earlier alert does not; a clear or a new alert removes it; feedback for a
    machine the view does not know, or naming another machine, is ignored and counted."""
    model = LiveModel(T)
    raised = AlertEvent(machine_id="m1", line="l1", event="ALERT_RAISED", at=1.8e9,
                        alert_id="a1")  # fmt: skip
    model.feed(T.event("l1", "m1"), raised.encode())

    def label(alert_id: str, machine: str = "m1", label: str = "false_alarm") -> bytes:
        return FeedbackCommand(machine_id=machine, alert_id=alert_id, label=label,  # type: ignore[arg-type]
                               by="ana", at=1.8e9 + 5).encode()  # fmt: skip

    assert model.feed(T.feedback("l1", "m1"), label("a0")) is None
    assert model.feed(T.feedback("l1", "m1"), label("a1")) == "l1/m1"
    tile = model.machines["l1/m1"].tile()
    assert (tile["label"], tile["labelled_by"]) == ("false_alarm", "ana")
    again = raised.model_copy(update={"alert_id": "a2", "at": 1.8e9 + 60})
    model.feed(T.event("l1", "m1"), again.encode())
    assert model.machines["l1/m1"].tile()["label"] is None
    model.feed(T.feedback("l1", "m1"), label("a2", label="confirmed"))
    cleared = raised.model_copy(update={"event": "ALERT_CLEARED", "at": 1.8e9 + 90})
    model.feed(T.event("l1", "m1"), cleared.encode())
    assert model.machines["l1/m1"].tile()["label"] is None
    assert model.feed(T.feedback("l1", "m9"), label("a1", machine="m9")) is None
    assert model.feed(T.feedback("l1", "m1"), label("a1", machine="m2")) is None
    assert model.ignored == 2


def test_telemetry_of_a_machine_the_detector_never_answered_for_makes_no_tile() -> None:
    """Readings published under a name the detector gave no verdict for (a viewer's own
    login, an invented line) are ignored; once a verdict came, its readings are charted."""
    model = LiveModel(T, history=3)
    reading = Telemetry(
        machine_id="viewer",
        line="l9",
        seq=1,
        ts=1.8e9,
        attributes={"product_type": "L"},
        readings={"torque_nm": 40.0},
    )
    assert model.feed(T.telemetry("l9", "viewer"), reading.encode()) is None
    assert model.machines == {}
    assert model.feed(T.verdict("l1", "m1"), _verdict(1)) == "l1/m1"
    mine = reading.model_copy(update={"machine_id": "m1", "line": "l1"})
    assert model.feed(T.telemetry("l1", "m1"), mine.encode()) == "l1/m1"
    assert len(model.machines["l1/m1"].readings) == 1


def test_readings_that_arrive_before_the_first_verdict_are_charted_once_it_comes() -> None:
    """A reading reaches the view before the detector's verdict on it: it is held (no tile)
    and charted when the verdict makes the machine's tile; held names are bounded."""
    model = LiveModel(T, history=3)

    def telemetry(seq: int, machine: str = "m1") -> bytes:
        return Telemetry(machine_id=machine, line="l1", seq=seq, ts=1.8e9 + seq,
                         readings={"torque_nm": 40.0 + seq}).encode()  # fmt: skip

    for seq in range(5):
        assert model.feed(T.telemetry("l1", "m1"), telemetry(seq)) is None
    assert model.machines == {}
    assert model.feed(T.verdict("l1", "m1"), _verdict(1)) == "l1/m1"
    m = model.machines["l1/m1"]
    assert [row[1]["torque_nm"] for row in m.readings] == [42.0, 43.0, 44.0]  # the last 3
    assert [row[1]["torque_nm"] for row in m.new_readings] == [42.0, 43.0, 44.0]
    assert model.pending == {}
    for i in range(live.PENDING_MACHINES + 5):
        model.feed(T.telemetry("l1", f"x{i}"), telemetry(0, f"x{i}"))
    assert len(model.pending) == live.PENDING_MACHINES
    assert "l1/x0" not in model.pending


def test_a_surprise_alert_says_why_until_the_alert_clears() -> None:
    """An ALERT the surprise rule raised (score under the threshold) carries its surprise to
    the tile, so the view does not show an alert beside a score below the line unexplained;
    the clear removes it."""
    model = LiveModel(T)
    model.feed(T.verdict("l1", "m1"), _verdict(1))
    surprising = Verdict.model_validate(
        {"machine_id": "m1", "line": "l1", "seq": 2, "reading_ts": 1.8e9 + 2,
         "status": "ALERT", "score": 0.5, "threshold": 0.6, "model_version": "v1",
         "latency_ms": 0.3, "surprise": 3.7}
    ).encode()  # fmt: skip
    model.feed(T.verdict("l1", "m1"), surprising)
    assert model.machines["l1/m1"].tile()["surprise"] == 3.7
    cleared = AlertEvent(machine_id="m1", line="l1", event="ALERT_CLEARED", at=1.8e9 + 9,
                         alert_id="a1")  # fmt: skip
    model.feed(T.event("l1", "m1"), cleared.encode())
    assert model.machines["l1/m1"].tile()["surprise"] is None
