"""The web view's ASGI app: login, pages, a JSON API, server-sent events, commands.

Routes (every one but ``/login``, ``/healthz`` and ``/static`` needs a logged-in session)::

    GET  /                          overview: machine tiles and open alerts
    GET  /machine/<line>/<machine>  score, threshold and channel charts, alert history
    GET  /api/stream                server-sent events: a snapshot, then coalesced updates
    GET  /api/machines              the same snapshot as JSON
    GET  /api/history?machine=M&since=24h   alerts (episodes) and events from the store
    POST /api/ack                   operator: acknowledge (publishes the ack command)
    POST /api/feedback              operator: label an alert false_alarm / confirmed

Commands go out on the broker as the ``operator`` account; state comes in as ``monitor``
(the accounts and ACL of ``factorywatch broker init``). POSTs take JSON with an
``X-Requested-With`` header and the session cookie is ``SameSite=Strict``, so another site
cannot make a logged-in browser send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import string
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any, Final, TypeVar

import paho.mqtt.client as mqtt
import structlog
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
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

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AckCommand, FeedbackCommand
from factorywatch.errors import BrokerError
from factorywatch.history import parse_since
from factorywatch.history_store import HistoryStore
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics, check_id
from factorywatch.web.auth import Accounts
from factorywatch.web.live import CLOSE, Hub, LiveModel

log = structlog.get_logger("factorywatch.web")

STATIC_DIR: Final = Path(str(resources.files("factorywatch.web") / "static"))
CSRF_HEADER: Final = "x-requested-with"
PUBLISH_TIMEOUT_S: Final = 5.0
# The pages behind the login: static/<name> holds the page's <main>; (title, app.js entry).
PAGES: Final = {"index.html": ("machines", "overview"), "machine.html": ("machine", "machinePage")}
_Command = TypeVar("_Command", AckCommand, FeedbackCommand)


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
    # Accounts of their own (monitor / operator rights): the broker makes a login the client
    # id, so the web view must not share one with a person or another component.
    read_user: str = Field(default="web", description="broker account that reads state")
    command_user: str = Field(default="web-commands", description="broker account for commands")
    session_secret: SecretStr | None = Field(
        default=None, description="signs session cookies (default: random per start)"
    )
    secure_cookies: bool = Field(default=False, description="set behind HTTPS")
    history_points: int = Field(default=300, ge=10, le=5000, description="points per chart")


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
        self.topics = Topics(broker.topic_root)
        self.hub = Hub(LiveModel(self.topics, settings.history_points))
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
                client.subscribe([(f"{root}/alerts/#", 1), (self.topics.telemetry_filter, 0)])

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
    user = request.session.get("user")
    role = request.session.get("role")
    return {"user": user, "role": role} if user and role else None


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


async def _operator_json(request: Request) -> tuple[dict[str, Any], dict[str, str]] | Response:
    """The JSON body of an operator's POST, or the error response to send instead."""
    who = _user(request)
    if who is None:
        return _error(401, "log in first")
    if request.headers.get(CSRF_HEADER) != "factorywatch":
        return _error(403, "missing X-Requested-With header")
    if who["role"] != "operator":
        return _error(403, "operators only: viewers may look, not act")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    return body, who


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
    """Check the password against the broker's accounts; start a session."""
    form = urllib.parse.parse_qs((await request.body()).decode(errors="replace"))
    user = (form.get("username") or [""])[0].strip()
    password = (form.get("password") or [""])[0]
    role = await asyncio.to_thread(_ctx(request).accounts.authenticate, user, password)
    if role is None:
        log.warning("web_login_refused", user=user[:64])
        return RedirectResponse("/login?error=1", status_code=303)
    request.session.clear()
    request.session.update({"user": user, "role": role})
    log.info("web_logged_in", user=user, role=role)
    return RedirectResponse("/", status_code=303)


async def logout(request: Request) -> Response:
    """End the session."""
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


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
                update = await queue.get()
                if update == CLOSE:
                    return
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


async def healthz(request: Request) -> Response:
    """Liveness: 200 while the broker link is up."""
    hub = _ctx(request).hub
    body = {"ok": hub.connected, "browsers": hub.clients, "machines": len(hub.model.machines)}
    return JSONResponse(body, status_code=200 if hub.connected else 503)


def create_app(ctx: WebContext) -> Starlette:
    """The ASGI app around a connected context (the hub starts in the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        ctx.hub.start()
        log.info("web_started", host=ctx.settings.host, port=ctx.settings.port)
        try:
            yield
        finally:
            await ctx.stop()
            log.info("web_stopped")

    secret = ctx.settings.session_secret
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
            Route("/api/ack", ack, methods=["POST"]),
            Route("/api/feedback", feedback, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=secret.get_secret_value() if secret else secrets.token_urlsafe(32),
                session_cookie="factorywatch_session",
                same_site="strict",
                https_only=ctx.settings.secure_cookies,
                max_age=12 * 3600,
            )
        ],
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
    accounts = Accounts(passwd, _split(settings.operators), _split(settings.viewers))
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
