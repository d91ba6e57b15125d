"""What every page and API route of the web view shares: its settings and context (broker
clients, sessions, accounts, history store, live model), the request guard (sessions, origin,
security headers), bounded bodies, page rendering, JSON errors and command publishing.

:mod:`factorywatch.web.app` (the routes) and :mod:`factorywatch.web.admin` (the accounts and
model pages) both build on it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import string
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar

import paho.mqtt.client as mqtt
import structlog
import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AckCommand, FeedbackCommand, ThresholdCommand
from factorywatch.errors import BrokerError
from factorywatch.history_store import HistoryStore
from factorywatch.notify import receivers_without_channels
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics, check_id
from factorywatch.web.auth import Accounts
from factorywatch.web.live import Hub, LiveModel
from factorywatch.web.sessions import LoginThrottle, SessionBook

log = structlog.get_logger("factorywatch.web")

STATIC_DIR: Final = Path(str(resources.files("factorywatch.web") / "static"))
CSRF_HEADER: Final = "x-requested-with"
PUBLISH_TIMEOUT_S: Final = 5.0
SESSION_COOKIE: Final = "factorywatch_session"
MAX_BODY_BYTES: Final = 16 * 1024  # an ack or a label with a note; anything bigger is refused
MAX_FORM_BYTES: Final = 4 * 1024  # the login form
MAX_FIELD_CHARS: Final = 2000  # any one string in a command's JSON body
STREAM_RECHECK_S: Final = 5.0  # an open event stream re-checks its session this often
RECEIVERS_CHECK_S: Final = 60.0  # how long Alertmanager's answer is reused
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Scripts and styles from the view's own files only (no inline code), never framed.
SECURITY_HEADERS: Final = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
# The pages behind the login: static/<name> holds the page's <main>; (title, app.js entry).
PAGES: Final = {
    "index.html": ("machines", "overview"),
    "machine.html": ("machine", "machinePage"),
    "accounts.html": ("accounts", "accountsPage"),
}
ACTING_ROLES: Final = ("operator", "admin")
_Command = TypeVar("_Command", AckCommand, FeedbackCommand, ThresholdCommand)


class WebSettings(BaseSettings):
    """The web view (``FACTORYWATCH_WEB_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYWATCH_WEB_", env_file=".env", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    passwd_file: Path | None = Field(
        default=None, description="the broker's password file (default <secrets-dir>/passwd)"
    )
    operators: str = Field(default="operator", description="users with the operator role")
    viewers: str = Field(default="viewer", description="users with the viewer role")
    admins: str = Field(
        default="",
        description="operators who may also add and remove the broker's accounts in the view",
    )
    model_dir: Path | None = Field(
        default=None, description="model versions shown and promoted (FACTORYWATCH_MODEL_DIR)"
    )
    broker_reload_pid_file: Path | None = Field(
        default=None,
        description="reload.pid of `factorywatch broker serve` / `demo`: the view sends it "
        "SIGHUP after an account change (else it shows the command to run)",
    )
    # Accounts of their own (monitor / operator rights): the broker makes a login the client
    # id, so the web view must not share one with a person or another component.
    read_user: str = Field(default="web", description="broker account that reads state")
    command_user: str = Field(default="web-commands", description="broker account for commands")
    allowed_origins: str = Field(
        default="",
        description="other origins that may send commands, e.g. https://factory.example "
        "when a proxy changes the Host header (the view's own origin always may)",
    )
    secure_cookies: bool = Field(default=False, description="set behind HTTPS")
    history_points: int = Field(default=300, ge=10, le=5000, description="points per chart")
    alertmanager_url: str | None = Field(
        default=None,
        description="Alertmanager that `factorywatch notify` posts to: the view warns when "
        "none is set or its receivers have no channel",
    )


def _split(text: str) -> frozenset[str]:
    return frozenset(u.strip() for u in text.split(",") if u.strip())


class WebContext:
    """The app's I/O: the broker links, the live hub and the history store."""

    def __init__(
        self,
        settings: WebSettings,
        broker: BrokerSettings,
        accounts: Accounts,
        store: HistoryStore | None,
    ) -> None:
        self.settings, self.broker, self.accounts, self.store = settings, broker, accounts, store
        self.secrets_dir = accounts.passwd_file.parent  # passwd, registry.json, acl
        self.model_dir = settings.model_dir
        # one account or model change at a time (the files have one writer per process)
        self.admin_lock = asyncio.Lock()
        self.topics = Topics(broker.topic_root)
        self.hub = Hub(LiveModel(self.topics, settings.history_points))
        self.sessions = SessionBook()
        self._receivers: tuple[float, dict[str, Any]] | None = None
        self.throttle = LoginThrottle()
        # one login at a time: a burst of guesses cannot slip past the throttle's count
        self.login_lock = asyncio.Lock()
        self._reader: mqtt.Client | None = None
        self._commander: mqtt.Client | None = None

    def _as(self, user: str) -> BrokerSettings:
        if self.broker.secrets_dir is not None and self.broker.password_file is None:
            return self.broker.with_overrides(username=user)
        return self.broker

    def connect(self) -> None:
        """Connect both broker links before serving (raises ``BrokerError``)."""
        suffix = uuid.uuid4().hex[:8]
        waiter = fwmqtt.ConnectWaiter()
        reader = fwmqtt.new_client(self._as(self.settings.read_user), f"fw-web-read-{suffix}")
        root = self.topics.root

        def on_connect(client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            waiter.record(rc)
            if not rc.is_failure:
                self.hub.set_connected(True)
                client.subscribe(
                    [
                        (f"{root}/alerts/#", 1),
                        (self.topics.telemetry_filter, 0),
                        (self.topics.feedback_filter, 1),  # labels show on the overview
                    ]
                )

        reader.on_connect = on_connect
        reader.on_disconnect = lambda *_: self.hub.set_connected(False)
        reader.on_message = lambda _c, _u, m: self.hub.submit(m.topic, bytes(m.payload))
        fwmqtt.connect(reader, self._as(self.settings.read_user), waiter)
        self._reader = reader
        self._commander = fwmqtt.connected_client(
            self._as(self.settings.command_user), f"fw-web-cmd-{suffix}"
        )

    async def stop(self) -> None:
        """Disconnect and stop."""
        await self.hub.stop()
        for client in (self._reader, self._commander):
            if client is not None:
                client.disconnect()
                client.loop_stop()
        if self.store is not None:
            self.store.close()

    async def notifications(self) -> dict[str, Any]:
        """Whether alerts notify anyone: Alertmanager's receivers, asked at most once a
        :data:`RECEIVERS_CHECK_S`."""
        url = self.settings.alertmanager_url
        if url is None:
            return {"alertmanager": None}
        now = time.monotonic()
        if self._receivers is not None and now - self._receivers[0] < RECEIVERS_CHECK_S:
            return self._receivers[1]

        def ask() -> dict[str, Any]:
            status = f"{url.rstrip('/')}/api/v2/status"
            try:
                with urllib.request.urlopen(status, timeout=3) as resp:  # noqa: S310
                    original = json.loads(resp.read())["config"]["original"]
                empty = receivers_without_channels(original)
            except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
                return {"alertmanager": url, "reachable": False}
            return {"alertmanager": url, "reachable": True, "receivers_without_channels": empty}

        answer = await asyncio.to_thread(ask)
        self._receivers = (now, answer)
        return answer

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish a command QoS 1 and wait for the broker's acknowledgement."""
        if self._commander is None:
            raise BrokerError("not connected")
        info = self._commander.publish(topic, fwmqtt.check_size(payload), qos=fwmqtt.QOS)
        await asyncio.to_thread(info.wait_for_publish, PUBLISH_TIMEOUT_S)
        if not info.is_published():
            raise BrokerError("the broker did not acknowledge the command")


# -- helpers ---------------------------------------------------------------------------------
def _ctx(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx
    return ctx


def _user(request: Request) -> dict[str, str] | None:
    """The logged-in user and role, checked against the accounts as they are now (a session
    whose user was removed, or whose password or role changed, ends here)."""
    ctx = _ctx(request)
    sid = request.cookies.get(SESSION_COOKIE)
    session = ctx.sessions.get(sid, time.time()) if sid else None
    if session is None or sid is None:
        return None
    now = ctx.accounts.current(session.user)
    if now is None or (now.role, now.fingerprint) != (session.role, session.fingerprint):
        ctx.sessions.close(sid)
        reason = "user removed" if now is None else f"role or password changed (now {now.role})"
        log.warning("web_session_revoked", user=session.user, reason=reason)
        return None
    return {"user": session.user, "role": session.role}


def _same_origin(headers: Headers, allowed: frozenset[str]) -> bool:
    """True unless the request names another site as its source.

    Browsers send ``Origin`` with every POST (``Referer`` as a fallback is checked too); a
    request with neither comes from a script, not from a page another site controls.
    """
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site in ("cross-site", "same-site"):
        return False
    source = headers.get("origin") or headers.get("referer")
    if source is None:
        return True
    parts = urllib.parse.urlsplit(source)
    if not parts.scheme or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file:// page) or garbage
    return parts.netloc == headers.get("host") or f"{parts.scheme}://{parts.netloc}" in allowed


class Guard:
    """ASGI middleware: the security headers on every response, and state-changing requests
    from another origin refused before any route sees them."""

    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        if scope["method"] not in SAFE_METHODS and not _same_origin(
            Headers(scope=scope), self.allowed
        ):
            log.warning("web_foreign_origin_refused", path=scope["path"])
            refusal = _error(403, "this request came from another site")
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


async def _bounded_body(request: Request, limit: int) -> bytes | Response:
    """The request body, or a 413 as soon as it grows past ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return _error(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return _error(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_long(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) > MAX_FIELD_CHARS
    if isinstance(value, dict):
        return any(_too_long(k) or _too_long(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_too_long(v) for v in value)
    return False


def _page(name: str) -> FileResponse:
    return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-store"})


@functools.cache
def render_page(name: str) -> str:
    """One of :data:`PAGES`: its ``<main>`` (``static/<name>``) inside ``static/_layout.html``,
    the head, header bar and scripts the pages share."""
    title, entry = PAGES[name]
    layout = string.Template((STATIC_DIR / "_layout.html").read_text(encoding="utf-8"))
    main = (STATIC_DIR / name).read_text(encoding="utf-8").rstrip("\n")
    return layout.substitute(title=title, main=main, entry=entry)


def _app_page(name: str) -> HTMLResponse:
    return HTMLResponse(render_page(name), headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _operator_json(
    request: Request, roles: tuple[str, ...] = ACTING_ROLES
) -> tuple[dict[str, Any], dict[str, str]] | Response:
    """The JSON body of a POST by a user with one of ``roles`` (operators and admins by
    default), or the error response to send instead."""
    who = _user(request)
    if who is None:
        return _error(401, "log in first")
    if request.headers.get(CSRF_HEADER) != "factorywatch":
        return _error(403, "missing X-Requested-With header")
    if who["role"] not in roles:
        if roles == ("admin",):
            return _error(403, "admins only (FACTORYWATCH_WEB_ADMINS)")
        return _error(403, "operators only: viewers may look, not act")
    raw = await _bounded_body(request, MAX_BODY_BYTES)
    body = raw if isinstance(raw, Response) else _json_object(raw)
    return body if isinstance(body, Response) else (body, who)


def _json_object(raw: bytes) -> dict[str, Any] | Response:
    """A command's body: one flat JSON object of short values, or the 400 to send instead."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return _error(400, "body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    if any(isinstance(v, (dict, list)) for v in body.values()) or _too_long(body):
        return _error(400, f"fields must be plain values of at most {MAX_FIELD_CHARS} characters")
    return body


async def _publish_command(
    request: Request,
    build: Callable[[dict[str, Any], str], _Command],
    topic_of: Callable[[str, str], str],
) -> tuple[str, _Command] | Response:
    """Parse an operator's command (``line`` plus what ``build`` reads from the JSON body, as
    the logged-in user) and publish it QoS 1 on ``topic_of(line, machine)``.

    Returns the line and the command once the broker has acknowledged it, or the error
    response to send instead (401/403/400 before anything is published).
    """
    got = await _operator_json(request)
    if isinstance(got, Response):
        return got
    body, who = got
    try:
        line = check_id(str(body.get("line", "")), "line")
        cmd = build(body, who["user"])
        topic = topic_of(line, cmd.machine_id)
    except (ValidationError, ValueError) as exc:
        return _error(400, str(exc).splitlines()[0])
    await _ctx(request).publish(topic, cmd.encode())
    return line, cmd
