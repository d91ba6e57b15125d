"""The web view's ASGI app: login, pages, a JSON API, server-sent events, commands.

Routes (every one but ``/login``, ``/healthz`` and ``/static`` needs a logged-in session)::

    GET  /                          overview: machine tiles and open alerts
    GET  /machine/<line>/<machine>  score, threshold and channel charts, alert history
    GET  /api/stream                server-sent events: a snapshot, then coalesced updates
    GET  /api/machines              the same snapshot as JSON
    GET  /api/history?machine=M&since=24h   alerts (episodes) and events from the store
    GET  /api/notifications         whether alerts reach anyone (Alertmanager's receivers)
    POST /api/ack                   operator: acknowledge (publishes the ack command)
    POST /api/feedback              operator: label an alert false_alarm / confirmed
    GET  /accounts                  the broker's accounts (page)
    GET  /api/accounts              admin: the registry's accounts, whether the view may write
    POST /api/accounts              admin: add one (``broker add-user``); its password once
    POST /api/accounts/remove       admin: remove one (``broker remove-user``)
    GET  /api/models?machine=M      the model versions serving M (its own, the default)
    POST /api/models/promote        operator: make a version current (``models promote``)
    POST /api/models/rollback       operator: back to the one before (``models rollback``)

Commands go out on the broker as the ``operator`` account; state comes in as ``monitor``
(the accounts and ACL of ``factorywatch broker init``).

Sessions live on the server (:mod:`factorywatch.web.sessions`); the ``HttpOnly``,
``SameSite=Strict`` cookie holds only a random id. Every request re-checks the session's
user against the broker's accounts, so logout, ``broker remove-user``, a new password or a
role change end it at once. A request that changes state must come from the view's own
origin (``Origin``, else ``Referer``; a foreign one is refused), API POSTs also carry an
``X-Requested-With`` header, and bodies are small and bounded. Every response carries a
Content-Security-Policy (own scripts and styles only, no framing) and ``nosniff``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import string
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar

import paho.mqtt.client as mqtt
import structlog
import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AckCommand, FeedbackCommand, ThresholdCommand
from factorywatch.errors import BrokerError
from factorywatch.history import parse_since
from factorywatch.history_store import HistoryStore
from factorywatch.notify import receivers_without_channels
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics, check_id
from factorywatch.web.auth import Accounts
from factorywatch.web.live import CLOSE, Hub, LiveModel
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


# -- routes ----------------------------------------------------------------------------------
async def login_page(request: Request) -> Response:
    """The login form."""
    if _user(request) is not None:
        return RedirectResponse("/", status_code=303)
    return _page("login.html")


async def login(request: Request) -> Response:
    """Check the password against the broker's accounts (throttled); start a session."""
    ctx = _ctx(request)
    raw = await _bounded_body(request, MAX_FORM_BYTES)
    if isinstance(raw, Response):
        return raw
    form = urllib.parse.parse_qs(raw.decode(errors="replace"))
    user = (form.get("username") or [""])[0].strip()
    password = (form.get("password") or [""])[0]
    client = request.client.host if request.client else "unknown"
    async with ctx.login_lock:
        locked = ctx.throttle.locked_for(user, client, time.time())
        if locked > 0:
            log.warning("web_login_locked_out", user=user[:64], client=client, for_s=round(locked))
            return RedirectResponse("/login?error=locked", status_code=303)
        identity = await asyncio.to_thread(ctx.accounts.authenticate, user, password)
        if identity is None:
            ctx.throttle.failed(user, client, time.time())
            log.warning("web_login_refused", user=user[:64], client=client)
            return RedirectResponse("/login?error=1", status_code=303)
        ctx.throttle.succeeded(user)
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        ctx.sessions.close(old)  # a new id at every login: no session fixation
    sid = secrets.token_urlsafe(32)
    ctx.sessions.open(sid, identity.user, identity.role, identity.fingerprint, time.time())
    log.info("web_logged_in", user=identity.user, role=identity.role)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        httponly=True,
        samesite="strict",
        secure=ctx.settings.secure_cookies,
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    """End the session on the server (the id is worthless from now on)."""
    sid = request.cookies.get(SESSION_COOKIE)
    if sid and _ctx(request).sessions.close(sid):
        log.info("web_logged_out")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def overview(request: Request) -> Response:
    """Machine tiles and open alerts."""
    return _app_page("index.html") if _user(request) else RedirectResponse("/login", 303)


async def machine_page(request: Request) -> Response:
    """One machine's charts and history."""
    return _app_page("machine.html") if _user(request) else RedirectResponse("/login", 303)


async def me(request: Request) -> Response:
    """Who is logged in."""
    who = _user(request)
    return JSONResponse(who) if who else _error(401, "log in first")


async def machines(request: Request) -> Response:
    """The live snapshot as JSON."""
    if _user(request) is None:
        return _error(401, "log in first")
    hub = _ctx(request).hub
    return JSONResponse({"machines": hub.model.snapshot(), "connected": hub.connected})


async def stream(request: Request) -> Response:
    """Server-sent events: ``snapshot`` once, then ``update`` (coalesced every 0.5 s)."""
    if _user(request) is None:
        return _error(401, "log in first")
    hub = _ctx(request).hub
    queue, snapshot = hub.subscribe()

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            yield {"event": "snapshot", "data": snapshot}
            while True:
                try:
                    update = await asyncio.wait_for(queue.get(), STREAM_RECHECK_S)
                except TimeoutError:
                    update = None
                if update == CLOSE or _user(request) is None:  # a revoked session stops here
                    return
                if update is not None:
                    yield {"event": "update", "data": update}
        finally:
            hub.unsubscribe(queue)

    return EventSourceResponse(events(), ping=15)


async def history(request: Request) -> Response:
    """Alerts and events of the store (one machine or all) since ``since``."""
    if _user(request) is None:
        return _error(401, "log in first")
    store = _ctx(request).store
    if store is None:
        return _error(404, "no history store configured")
    machine = request.query_params.get("machine") or None
    try:
        if machine is not None:
            check_id(machine, "machine id")
        since = parse_since(request.query_params.get("since", "24h"), time.time())
    except ValueError as exc:
        return _error(400, str(exc))

    def query() -> dict[str, Any]:
        return {
            "alerts": [ep.as_dict() for ep in store.alerts(machine, since=since)],
            "events": store.events(machine, since=since, limit=500),
        }

    return JSONResponse(await asyncio.to_thread(query))


async def ack(request: Request) -> Response:
    """An operator acknowledges a machine's open alert."""

    def build(body: dict[str, Any], user: str) -> AckCommand:
        return AckCommand(
            machine_id=str(body.get("machine", "")),
            by=user,
            alert_id=body.get("alert_id"),
            note=body.get("note") or None,
        )

    sent = await _publish_command(request, build, _ctx(request).topics.ack)
    if isinstance(sent, Response):
        return sent
    _line, cmd = sent
    log.info("web_ack_published", machine=cmd.machine_id, by=cmd.by, alert_id=cmd.alert_id)
    return JSONResponse({"ok": True})


async def feedback(request: Request) -> Response:
    """An operator labels an alert (false alarm / confirmed); published and stored."""

    def build(body: dict[str, Any], user: str) -> FeedbackCommand:
        return FeedbackCommand(
            machine_id=str(body.get("machine", "")),
            alert_id=str(body.get("alert_id", "")),
            label=body.get("label", ""),
            by=user,
            at=time.time(),
            note=body.get("note") or None,
        )

    ctx = _ctx(request)
    sent = await _publish_command(request, build, ctx.topics.feedback)
    if isinstance(sent, Response):
        return sent
    line, cmd = sent
    if ctx.store is not None:  # also stored here: the label shows at once, even with no recorder
        await asyncio.to_thread(ctx.store.add_feedback, line, [cmd])
    log.info("web_feedback_published", machine=cmd.machine_id, label=cmd.label, by=cmd.by)
    return JSONResponse({"ok": True})


async def threshold(request: Request) -> Response:
    """An operator widens or resets one machine's own threshold (the detector applies and
    records it; the machine's state shows the change)."""

    def build(body: dict[str, Any], user: str) -> ThresholdCommand:
        return ThresholdCommand(
            machine_id=str(body.get("machine", "")),
            action=body.get("action", ""),
            by=user,
            at=time.time(),
            note=body.get("note") or None,
        )

    sent = await _publish_command(request, build, _ctx(request).topics.threshold)
    if isinstance(sent, Response):
        return sent
    _, cmd = sent
    log.info("web_threshold_published", machine=cmd.machine_id, action=cmd.action, by=cmd.by)
    return JSONResponse({"ok": True})


async def notifications(request: Request) -> Response:
    """Whether alerts reach a notification channel (for the page's banner)."""
    if _user(request) is None:
        return _error(401, "log in first")
    return JSONResponse(await _ctx(request).notifications())


async def healthz(request: Request) -> Response:
    """Liveness: 200 while the broker link is up."""
    hub = _ctx(request).hub
    body = {"ok": hub.connected, "browsers": hub.clients, "machines": len(hub.model.machines)}
    return JSONResponse(body, status_code=200 if hub.connected else 503)


def create_app(ctx: WebContext) -> Starlette:
    """The ASGI app around a connected context (the hub starts in the app's lifespan)."""
    from factorywatch.web import admin  # noqa: PLC0415 - admin imports this module's helpers

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        ctx.hub.start()
        log.info("web_started", host=ctx.settings.host, port=ctx.settings.port)
        try:
            yield
        finally:
            await ctx.stop()
            log.info("web_stopped")

    app = Starlette(
        routes=[
            Route("/", overview),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["GET", "POST"]),
            Route("/machine/{line}/{machine}", machine_page),
            Route("/healthz", healthz),
            Route("/api/me", me),
            Route("/api/machines", machines),
            Route("/api/stream", stream),
            Route("/api/history", history),
            Route("/api/notifications", notifications),
            Route("/api/ack", ack, methods=["POST"]),
            Route("/api/feedback", feedback, methods=["POST"]),
            Route("/api/threshold", threshold, methods=["POST"]),
            *admin.ROUTES,
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=[Middleware(Guard, allowed_origins=_split(ctx.settings.allowed_origins))],
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    return app


def build_context(
    settings: WebSettings, broker: BrokerSettings, store: HistoryStore | None
) -> WebContext:
    """Accounts from the broker's password file plus the links; clear error when missing."""
    passwd = settings.passwd_file or (
        broker.secrets_dir / "passwd" if broker.secrets_dir is not None else None
    )
    if passwd is None or not passwd.is_file():
        raise BrokerError(
            f"no broker password file ({passwd or 'give --secrets-dir or --passwd-file'}): "
            "the web view logs users in with the broker's accounts (factorywatch broker init)"
        )
    accounts = Accounts(
        passwd, _split(settings.operators), _split(settings.viewers), _split(settings.admins)
    )
    return WebContext(settings, broker, accounts, store)


def serve(ctx: WebContext) -> None:
    """Connect, then run the app with uvicorn until SIGTERM/SIGINT."""
    import uvicorn  # noqa: PLC0415 - only the web process needs the server

    ctx.connect()

    config = uvicorn.Config(
        create_app(ctx),
        host=ctx.settings.host,
        port=ctx.settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()
