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
import secrets
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import structlog
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from factorywatch.contracts import AckCommand, FeedbackCommand, ThresholdCommand
from factorywatch.errors import BrokerError
from factorywatch.history_episodes import parse_since
from factorywatch.history_store import HistoryStore
from factorywatch.settings import BrokerSettings
from factorywatch.topics import check_id
from factorywatch.web.auth import Accounts
from factorywatch.web.context import (
    MAX_FORM_BYTES,
    PAGES,
    SESSION_COOKIE,
    STATIC_DIR,
    STREAM_RECHECK_S,
    Guard,
    WebContext,
    WebSettings,
    _app_page,
    _bounded_body,
    _ctx,
    _error,
    _page,
    _publish_command,
    _split,
    _user,
    render_page,
)
from factorywatch.web.live import CLOSE

log = structlog.get_logger("factorywatch.web")

__all__ = [
    "PAGES",
    "SESSION_COOKIE",
    "WebSettings",
    "build_context",
    "create_app",
    "render_page",
    "serve",
]


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
