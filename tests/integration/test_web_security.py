"""The web view's sessions and request guards, against the real app served by uvicorn on a
loopback port (no broker: nothing here reaches a command's publish): server-side sessions
that end at logout, user removal and role change; login throttling; the security headers;
the Origin check; bounded command bodies."""

from __future__ import annotations

import contextlib
import http.client
import json
import statistics
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from factorywatch.accounts import read_registry, registry_path
from factorywatch.broker import free_port
from factorywatch.credentials import (
    add_user,
    init_secrets,
    read_password,
    register,
    remove_user,
    save_registry,
)
from factorywatch.settings import BrokerSettings
from factorywatch.web.app import SESSION_COOKIE, WebSettings, build_context, create_app
from factorywatch.web.auth import Accounts
from tests.integration.opstack import Alertmanager
from tests.support import PROJECT_DIR, wait_until

pytestmark = [pytest.mark.integration]

JSON_POST = {"Content-Type": "application/json", "X-Requested-With": "factorywatch"}


@dataclass
class Browser:
    """A cookie-keeping HTTP client for one user of the view."""

    port: int
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        """Send one request with the stored cookies; keep the cookies it sets."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        resp.read()
        for header in resp.headers.get_all("set-cookie") or []:
            name, _, rest = header.partition("=")
            value = rest.split(";", 1)[0]
            if value in ("", '""') or "max-age=0" in header.lower():
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        conn.close()
        return resp

    def login(self, user: str, password: str) -> str:
        """Post the login form; the redirect's target."""
        form = urllib.parse.urlencode({"username": user, "password": password}).encode()
        resp = self.request(
            "POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"}
        )
        return resp.headers.get("location", "")

    def status(self, path: str = "/api/me") -> int:
        """The status of a GET."""
        return self.request("GET", path).status

    def post_json(self, path: str, body: bytes, **headers: str) -> int:
        """The status of a JSON POST with the view's own headers (plus ``headers``)."""
        return self.request("POST", path, body, {**JSON_POST, **headers}).status


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """Broker accounts as `broker init` makes them, plus alice, an operator in the registry."""
    init_secrets(tmp_path, ("press-1",))
    add_user(tmp_path, "alice", "alice-password")
    register(tmp_path, "alice", "operator")
    return tmp_path


@contextlib.contextmanager
def _served(secrets_dir: Path, **options: Any) -> Iterator[int]:
    """The web app (``options``: more WebSettings) served by uvicorn in a thread on a free
    loopback port; its port."""
    settings = WebSettings(port=free_port(), **options)
    ctx = build_context(settings, BrokerSettings(secrets_dir=secrets_dir), None)
    server = uvicorn.Server(
        uvicorn.Config(create_app(ctx), port=settings.port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, what="uvicorn to start")
    try:
        yield settings.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def port(secrets_dir: Path) -> Iterator[int]:
    """The web app served on a free loopback port."""
    with _served(secrets_dir) as served:
        yield served


def test_sessions_end_at_logout_removal_and_role_change(port: int, secrets_dir: Path) -> None:
    """A session id stops working after logout, after `broker remove-user`, and after a
    role change in the registry, even when the old cookie is sent again."""
    alice = Browser(port)
    assert alice.login("alice", "alice-password") == "/"
    sid = alice.cookies[SESSION_COOKIE]
    assert alice.status() == 200
    alice.request("GET", "/logout")
    assert SESSION_COOKIE not in alice.cookies
    replay = Browser(port, {SESSION_COOKIE: sid})
    assert replay.status() == 401, "the cookie still worked after logout"

    alice.login("alice", "alice-password")
    registry = read_registry(registry_path(secrets_dir))
    save_registry(secrets_dir, registry.without("alice").with_service("alice", "viewer"))
    assert alice.status() == 401, "the operator session survived a demotion to viewer"
    alice.login("alice", "alice-password")
    me = json.loads(_body(alice, "/api/me"))
    assert me == {"user": "alice", "role": "viewer"}

    remove_user(secrets_dir, "alice")
    assert alice.status() == 401, "a removed user's session still worked"
    assert alice.login("alice", "alice-password") == "/login?error=1"


def _body(browser: Browser, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", browser.port, timeout=10)
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    conn.request("GET", path, headers={"Cookie": cookie})
    data = conn.getresponse().read()
    conn.close()
    return data


def test_logins_are_throttled_then_locked_out(port: int, secrets_dir: Path) -> None:
    """After five wrong passwords a user is locked out (the right one is refused too), for an
    unknown name exactly as for a known one; other users can still log in."""
    operator = read_password(secrets_dir, "operator") or ""
    for user in ("alice", "nobody-by-this-name"):
        browser = Browser(port)
        outcomes = [browser.login(user, f"guess-{i}") for i in range(5)]
        assert outcomes == ["/login?error=1"] * 5
        assert browser.login(user, "guess-6") == "/login?error=locked"
    assert Browser(port).login("alice", "alice-password") == "/login?error=locked"
    assert Browser(port).login("operator", operator) == "/"


@pytest.mark.timing
def test_unknown_users_cost_a_full_password_check(secrets_dir: Path) -> None:
    """Refusing an unknown user, or one without a web role, takes as long as refusing a
    known user's wrong password (a dummy hash is verified): no timing oracle for accounts."""
    accounts = Accounts(secrets_dir / "passwd", frozenset({"operator"}), frozenset({"viewer"}))

    users = ("operator", "nobody", "press-1")  # known; unknown; known to the broker, no web role
    times: dict[str, list[float]] = {user: [] for user in users}
    for _ in range(300):  # interleaved: a slower moment of a shared machine hits all three
        for user in users:
            start = time.perf_counter()
            assert accounts.authenticate(user, "wrong") is None
            times[user].append(time.perf_counter() - start)
    known = statistics.median(times["operator"])
    for other in users[1:]:
        ratio = statistics.median(times[other]) / known
        assert ratio > 0.6, f"{other}: {ratio:.2f} of a known user's refusal time"


def test_headers_origin_check_and_bounded_bodies(port: int) -> None:
    """Every response carries a CSP with frame-ancestors 'none' and nosniff; a POST from a
    foreign Origin is refused even with X-Requested-With; a 600 KB alert id and deeply
    nested JSON are answered 4xx, not 500."""
    op = Browser(port)
    for path in ("/login", "/static/app.js", "/api/me"):
        headers = op.request("GET", path).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert "script-src 'self'" in headers["content-security-policy"], path
        assert headers["x-content-type-options"] == "nosniff", path
    op.login("alice", "alice-password")
    bad = b'{"line": "line1"}'  # gets past every guard, then fails validation: 400
    assert op.post_json("/api/ack", bad, Origin=f"http://127.0.0.1:{port}") == 400
    assert op.post_json("/api/ack", bad) == 400, "a script without Origin is not a CSRF"
    assert op.post_json("/api/ack", bad, Origin="https://evil.example") == 403
    assert op.post_json("/api/ack", bad, Referer="https://evil.example/page") == 403
    assert op.post_json("/api/ack", bad, Origin="null") == 403
    evil_login = urllib.parse.urlencode({"username": "alice", "password": "x"}).encode()
    foreign = {"Origin": "https://evil.example"}
    assert op.request("POST", "/login", evil_login, foreign).status == 403

    huge = json.dumps({"line": "line1", "machine": "press-1", "alert_id": "a" * 600_000})
    assert op.post_json("/api/ack", huge.encode()) == 413
    nested = b'{"line": "line1", "alert_id": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert op.post_json("/api/ack", nested) == 400
    deep = b"[" * 8000 + b"]" * 8000
    assert op.post_json("/api/feedback", deep) == 400
    long_id = json.dumps({"line": "line1", "machine": "press-1", "alert_id": "a" * 5000})
    assert op.post_json("/api/ack", long_id.encode()) == 400
    assert op.status() == 200, "the app still serves after the bad bodies"


def test_the_view_says_when_alertmanager_notifies_no_one(secrets_dir: Path, tmp_path: Path) -> None:
    """Against a real Alertmanager running the shipped config (its receiver has no channel)
    the view names that receiver for its banner; once Alertmanager is down it says so."""
    shipped = (PROJECT_DIR / "deploy" / "alertmanager" / "alertmanager.yml").read_text()
    am = Alertmanager(tmp_path / "alertmanager", 0, shipped)
    try:
        with _served(secrets_dir, alertmanager_url=am.url) as port:
            op = Browser(port)
            op.login("alice", "alice-password")
            answer = json.loads(_body(op, "/api/notifications"))
            assert answer["receivers_without_channels"] == ["operators"]
            assert answer["reachable"] is True
        am.stop()
        with _served(secrets_dir, alertmanager_url=am.url) as port:
            op = Browser(port)
            op.login("alice", "alice-password")
            assert json.loads(_body(op, "/api/notifications"))["reachable"] is False
    finally:
        am.stop()


def test_an_open_live_stream_ends_when_its_session_does(port: int) -> None:
    """A browser's server-sent-event stream stops (the server ends the response) once its
    session is logged out elsewhere, instead of streaming to a revoked session."""
    alice = Browser(port)
    alice.login("alice", "alice-password")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "GET",
        "/api/stream",
        headers={"Cookie": f"{SESSION_COOKIE}={alice.cookies[SESSION_COOKIE]}"},
    )
    stream = conn.getresponse()
    assert stream.status == 200
    assert stream.readline().startswith(b"event: snapshot")
    alice.request("GET", "/logout")
    rest = stream.read()  # returns at the end of the response: the server closed the stream
    assert b"event: update" not in rest
    conn.close()


def _post_body(browser: Browser, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", browser.port, timeout=10)
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    conn.request("POST", path, json.dumps(body).encode(), {**JSON_POST, "Cookie": cookie})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    return resp.status, answer


def test_a_view_that_cannot_signal_the_broker_says_what_to_run(
    secrets_dir: Path, tmp_path: Path
) -> None:
    """Without --broker-pid-file, or with one naming no process, an admin's new account is
    written as `broker add-user` writes it, and the answer gives the exact reload command."""
    stale = tmp_path / "reload.pid"
    stale.write_text("999999999\n")
    for pid_file, name in ((None, "weld-4"), (stale, "weld-5")):
        with _served(secrets_dir, admins="alice", broker_reload_pid_file=pid_file) as port:
            alice = Browser(port)
            alice.login("alice", "alice-password")
            status, answer = _post_body(alice, "/api/accounts", {"name": name, "line": "line2"})
            assert status == 200, answer
            assert answer["reloaded"] is False
            assert "docker compose kill -s SIGHUP broker" in answer["message"]
            assert answer["password"] == read_password(secrets_dir, name)
            assert read_registry(registry_path(secrets_dir)).machines[name].line == "line2"
    assert "999999999" in answer["message"], "the stale pid file is named"
