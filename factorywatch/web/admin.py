"""The web view's administration: the broker's accounts and each machine's model versions.

Both change files through the same functions as the CLI, so there is one writer of each:
accounts through :func:`factorywatch.credentials.create_account` / ``remove_user``
(``broker add-user`` / ``remove-user``: password file, registry, ACL), models through
:func:`factorywatch.model.artifact.promote` / ``rollback`` (``models promote`` /
``rollback``, which record who, when and what in the folder's promotion log).

Accounts are an admin's (an operator named in ``FACTORYWATCH_WEB_ADMINS``) and only where
the view may write the secrets folder (in Compose it is mounted read-only: the page says
so and shows the command). After a change the broker must re-read its files: the view
sends SIGHUP to the process in ``--broker-pid-file`` (``broker serve`` and ``demo`` write
one), or shows the command to run. A running detector follows the registry itself
(``Runner.reload_registry``): the answer says when it acts on the change, and each machine's
row says whether the detector has answered for it yet (``scored``: the time of its latest
scored reading, from the live feed). Promoting and rolling back are operators'.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Final

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from factorywatch.accounts import COMPONENT_ACCOUNTS, AccountRegistry, read_registry, registry_path
from factorywatch.broker import send_reload
from factorywatch.credentials import (
    ACL_FILE,
    PASSWD_FILE,
    RELOAD_HINT,
    SERVICE_USERS,
    create_account,
    passwd_users,
    remove_user,
)
from factorywatch.errors import BrokerError, FactorywatchError, ModelError
from factorywatch.model import artifact
from factorywatch.model.promotions import read_log, rollback_target
from factorywatch.topics import check_id
from factorywatch.web.context import WebContext, _app_page, _ctx, _error, _operator_json, _user

log = structlog.get_logger("factorywatch.web")

# What an admin may create from the view; detector shards and monitor accounts are a
# deployment's, made with the CLI.
UI_ROLES: Final = ("machine", "gateway", "edge-node", "viewer", "operator")
# When a running detector (started with --secrets-dir) acts on a change of the registry (who
# may speak for which machine): ``detector/runner.py``'s ``reload_registry``, no restart.
DETECTOR_NOTES: Final = {
    "machine": "The detector re-reads the registry at the first reading from a login it does "
    "not know: this machine is scored from its first reading, no restart (the Scored column "
    "shows its first verdict).",
    "gateway": "The detector re-reads the registry at the first batch from a login it does "
    "not know: this gateway's machines are scored from its first batch, no restart.",
    "edge-node": "The detector re-reads the registry on its reload cadence (every 5 s unless "
    "FACTORYWATCH_DETECTOR_RELOAD_INTERVAL_S says otherwise): this edge node's devices are "
    "scored from then on, no restart.",
}
REMOVED_NOTE: Final = (
    "The detector re-reads the registry on its reload cadence (every 5 s unless "
    "FACTORYWATCH_DETECTOR_RELOAD_INTERVAL_S says otherwise): from then on its readings are "
    "dead-lettered (unknown_machine, 'removed from the registry'), no restart."
)
MAX_VERSIONS: Final = 50  # newest first; older ones stay reachable with `models list`
MAX_LOG: Final = 20


def _protected(registry: AccountRegistry) -> frozenset[str]:
    """Accounts the services log in with: never removed (nor re-created) from the view."""
    return frozenset({*SERVICE_USERS, *COMPONENT_ACCOUNTS, *registry.detectors})


def read_only_reason(secrets_dir: Path) -> str | None:
    """Why the view may not change the accounts here (None: it may)."""
    for path in (secrets_dir, secrets_dir / PASSWD_FILE, registry_path(secrets_dir)):
        if path.exists() and not os.access(path, os.W_OK):
            return f"{path} is read-only for the web view"
    acl = secrets_dir / ACL_FILE
    if acl.exists() and not os.access(acl, os.W_OK):
        return f"{acl} is read-only for the web view"
    return None


def list_accounts(ctx: WebContext) -> list[dict[str, Any]]:
    """Every account of the password file and the registry, with its role and rights."""
    registry = read_registry(registry_path(ctx.secrets_dir), missing_ok=True)
    users = passwd_users(ctx.secrets_dir)
    protected = _protected(registry)
    names = users | set(registry.machines) | set(registry.gateways) | set(registry.edge_nodes)
    names |= set(registry.services) | set(registry.detectors)
    live = ctx.hub.model.machines
    rows = []
    for name in sorted(names):
        role: str | None = registry.role_of(name)
        line, machines = None, None
        if name in registry.machines:
            line = registry.machines[name].line
            role = role or "machine (via a gateway, no login)"
        if name in registry.gateways:
            machines = registry.gateways[name].machines
        if name in registry.edge_nodes:
            line, machines = registry.edge_nodes[name].line, registry.edge_nodes[name].devices
        if role is None:
            role = name if name in SERVICE_USERS else "account"
        scored: float | bool | None = None  # not a machine
        if name in registry.machines:
            seen = live.get(f"{line}/{name}")
            # the time of the latest reading the detector gave a verdict for; False: none yet
            scored = seen.last_seen or False if seen is not None else False
        rows.append(
            {
                "name": name,
                "role": role,
                "line": line,
                "machines": machines,
                "web_role": ctx.accounts.role_of(name),
                "login": name in users,
                "protected": name in protected,
                "scored": scored,
            }
        )
    return rows


async def _reload(ctx: WebContext) -> dict[str, Any]:
    """Have the broker re-read its password file and ACL, or say how."""
    pid_file = ctx.settings.broker_reload_pid_file
    if pid_file is None:
        return {"reloaded": False, "message": f"This view cannot signal the broker. {RELOAD_HINT}"}
    try:
        pid = await asyncio.to_thread(send_reload, pid_file)
    except BrokerError as exc:
        return {"reloaded": False, "message": f"{exc}. {RELOAD_HINT}"}
    return {"reloaded": True, "message": f"Broker reloaded (SIGHUP to process {pid})."}


# -- accounts --------------------------------------------------------------------------------
async def accounts_page(request: Request) -> Response:
    """The accounts page (its API refuses anyone but admins)."""
    return _app_page("accounts.html") if _user(request) else RedirectResponse("/login", 303)


async def accounts(request: Request) -> Response:
    """The accounts, whether the view may change them, and how the broker is reloaded."""
    who = _user(request)
    if who is None:
        return _error(401, "log in first")
    if who["role"] != "admin":
        return _error(403, "admins only (FACTORYWATCH_WEB_ADMINS)")
    ctx = _ctx(request)
    rows = await asyncio.to_thread(list_accounts, ctx)
    return JSONResponse(
        {
            "accounts": rows,
            "read_only": read_only_reason(ctx.secrets_dir),
            "roles": list(UI_ROLES),
            "reload": "signal" if ctx.settings.broker_reload_pid_file else RELOAD_HINT,
        }
    )


def _taken(ctx: WebContext, name: str) -> str | None:
    """Why ``name`` cannot be a new account (None: it can)."""
    registry = read_registry(registry_path(ctx.secrets_dir), missing_ok=True)
    if name in _protected(registry):
        return f"{name!r} is a service account: not managed from the view"
    if name in passwd_users(ctx.secrets_dir) or registry.role_of(name) is not None:
        return (
            f"account {name!r} already exists: remove it first (or rotate its password "
            "with `factorywatch broker add-user`)"
        )
    return None


async def _admin_request(
    request: Request, command: str
) -> tuple[dict[str, Any], dict[str, str], WebContext] | Response:
    """An admin's JSON body, who they are and the view's context; or the answer to send
    instead (not an admin, or the accounts are read-only here: ``broker COMMAND`` names
    where to do it)."""
    got = await _operator_json(request, ("admin",))
    if isinstance(got, Response):
        return got
    body, who = got
    ctx = _ctx(request)
    reason = read_only_reason(ctx.secrets_dir)
    if reason is not None:
        return _error(409, f"{reason}: run `factorywatch broker {command}` where it is writable")
    return body, who, ctx


async def add_account(request: Request) -> Response:
    """An admin adds an account; its password is in the answer, and only there."""
    got = await _admin_request(request, "add-user")
    if isinstance(got, Response):
        return got
    body, who, ctx = got
    role = str(body.get("role") or "machine")
    if role not in UI_ROLES:
        return _error(400, f"role must be one of {', '.join(UI_ROLES)}, not {role[:40]!r}")
    machines = [m.strip() for m in str(body.get("machines") or "").split(",") if m.strip()]
    line = str(body.get("line") or "line1")
    async with ctx.admin_lock:
        try:
            name = check_id(str(body.get("name", "")), "account name")
            refusal = _taken(ctx, name)
            if refusal is not None:
                return _error(400, refusal)
            made = await asyncio.to_thread(
                create_account, ctx.secrets_dir, name, role, line=line, machines=machines
            )
        except (ValueError, FactorywatchError) as exc:
            return _error(400, str(exc).splitlines()[0])
        reloaded = await _reload(ctx)
    log.info("web_account_added", account=made.user, role=made.role, by=who["user"])
    note = DETECTOR_NOTES.get(made.role)
    if note is not None:
        reloaded["message"] += f" {note}"
    return JSONResponse(
        {"account": made.user, "what": made.what, "password": made.password, **reloaded},
        headers={"Cache-Control": "no-store"},
    )


async def remove_account(request: Request) -> Response:
    """An admin removes an account; its web sessions end at once."""
    got = await _admin_request(request, "remove-user")
    if isinstance(got, Response):
        return got
    body, who, ctx = got
    async with ctx.admin_lock:
        try:
            name = check_id(str(body.get("name", "")), "account name")
            registry = read_registry(registry_path(ctx.secrets_dir), missing_ok=True)
            if name in _protected(registry) or name == who["user"]:
                what = "your own account" if name == who["user"] else "a service account"
                return _error(400, f"{name!r} is {what}: not removed from the view")
            speaks = name in registry.machines or name in registry.gateways
            speaks = speaks or name in registry.edge_nodes
            await asyncio.to_thread(remove_user, ctx.secrets_dir, name)
        except (ValueError, FactorywatchError) as exc:
            return _error(400, str(exc).splitlines()[0])
        ended = ctx.sessions.revoke_user(name)
        reloaded = await _reload(ctx)
    if speaks:
        reloaded["message"] += f" {REMOVED_NOTE}"
    log.info("web_account_removed", account=name, by=who["user"], sessions_ended=ended)
    return JSONResponse({"account": name, "sessions_ended": ended, **reloaded})


# -- models ----------------------------------------------------------------------------------
def _machine_scopes(ctx: WebContext, machine: str) -> dict[str, Path]:
    """The model folders that may serve ``machine``: its own, then the default."""
    if ctx.model_dir is None:
        raise LookupError("no model directory configured (--model-dir)")
    return {
        "machine": artifact.route_dir(ctx.model_dir, "machine", machine),
        "default": ctx.model_dir,
    }


def _known_machine(ctx: WebContext, machine: str) -> bool:
    registry = read_registry(registry_path(ctx.secrets_dir), missing_ok=True)
    live = {key.split("/", 1)[1] for key in ctx.hub.model.machines}
    own = (
        ctx.model_dir is not None and artifact.route_dir(ctx.model_dir, "machine", machine).is_dir()
    )
    return machine in registry.machines or machine in live or own


def describe_folder(folder: Path) -> dict[str, Any]:
    """A model folder's versions (newest first, with their cards' figures), its ``current``,
    its recent promotions and the version a roll-back would return to."""
    current = artifact.current_version(folder)
    names = artifact.list_versions(folder)
    versions: list[dict[str, Any]] = []
    for version in reversed(names[-MAX_VERSIONS:]):
        try:
            card = artifact.read_card(folder / version / artifact.CARD_FILE)
        except ModelError as exc:
            versions.append({"version": version, "error": str(exc).splitlines()[0][:200]})
            continue
        versions.append(
            {
                "version": version,
                "trained_at": card.created_at.timestamp(),
                "family": card.scorer_family,
                "feature_set": card.feature_set,
                "threshold": card.threshold,
                "forward_far": card.metrics.get("forward_far"),
                "summary": artifact.card_summary(card),
                "current": version == current,
            }
        )
    history = read_log(folder)
    return {
        "current": current,
        "versions": versions,
        "log": [e.model_dump() for e in reversed(history[-MAX_LOG:])],
        "rollback_to": rollback_target(history, current, names),
    }


def _models_of(ctx: WebContext, machine: str) -> dict[str, Any]:
    scopes = _machine_scopes(ctx, machine)
    described = {name: describe_folder(folder) for name, folder in scopes.items()}
    serving = "machine" if described["machine"]["current"] else "default"
    return {"machine": machine, "serving": serving, "scopes": described}


async def models(request: Request) -> Response:
    """The model versions that may serve one machine (its own folder, the default)."""
    if _user(request) is None:
        return _error(401, "log in first")
    ctx = _ctx(request)
    try:
        machine = check_id(request.query_params.get("machine", ""), "machine id")
        if not _known_machine(ctx, machine):
            return _error(400, f"unknown machine {machine!r}")
        return JSONResponse(await asyncio.to_thread(_models_of, ctx, machine))
    except (ValueError, LookupError, FactorywatchError) as exc:
        return _error(400, str(exc).splitlines()[0])


async def _change_model(request: Request, *, rollback: bool) -> Response:
    got = await _operator_json(request)
    if isinstance(got, Response):
        return got
    body, who = got
    ctx = _ctx(request)
    try:
        machine = check_id(str(body.get("machine", "")), "machine id")
        if not _known_machine(ctx, machine):
            return _error(400, f"unknown machine {machine!r}")
        scope = str(body.get("scope", ""))
        scopes = _machine_scopes(ctx, machine)
        if scope not in scopes:
            return _error(400, f"scope must be one of {', '.join(scopes)}")
        folder = scopes[scope]
        async with ctx.admin_lock:
            before = artifact.current_version(folder)
            if rollback:
                version = await asyncio.to_thread(artifact.rollback, folder, by=who["user"])
            else:
                version = str(body.get("version", ""))
                if version not in artifact.list_versions(folder):
                    return _error(400, f"no model version {version[:128]!r} in {scope} models")
                await asyncio.to_thread(artifact.promote, folder, version, by=who["user"])
    except (ValueError, LookupError, FactorywatchError) as exc:
        return _error(400, str(exc).splitlines()[0])
    action = "model_rolled_back" if rollback else "model_promoted"
    log.info(
        f"web_{action}",
        machine=machine,
        scope=scope,
        version=version,
        previous=before,
        by=who["user"],
    )
    return JSONResponse({"ok": True, "scope": scope, "version": version, "previous": before})


async def promote(request: Request) -> Response:
    """An operator makes a version current (loaded and checked first, as the CLI does)."""
    return await _change_model(request, rollback=False)


async def rollback(request: Request) -> Response:
    """An operator returns to the version promoted before the current one."""
    return await _change_model(request, rollback=True)


ROUTES: Final = [
    Route("/accounts", accounts_page),
    Route("/api/accounts", accounts, methods=["GET"]),
    Route("/api/accounts", add_account, methods=["POST"]),
    Route("/api/accounts/remove", remove_account, methods=["POST"]),
    Route("/api/models", models),
    Route("/api/models/promote", promote, methods=["POST"]),
    Route("/api/models/rollback", rollback, methods=["POST"]),
]
