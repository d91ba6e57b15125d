"""The web view's administration in a real headless Chromium, on `factorywatch broker serve`
with logins: an admin adds a machine (its password shown once logs in to the broker after the
view's SIGHUP) and removes accounts (the broker refuses them, their web sessions end);
operators promote a model version and roll back from the machine page, each change in the
promotion log. Viewers and plain operators are refused, as are foreign origins and bad
input (400 with a clear message)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page
from pydantic import SecretStr

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import RELOAD_PID_FILE, free_port
from factorywatch.credentials import add_user, init_secrets, read_password, register
from factorywatch.errors import BrokerError
from factorywatch.model import artifact
from factorywatch.model.promotions import read_log
from factorywatch.settings import BrokerSettings
from tests.support import Proc, secure_args, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FOREIGN = "http://evil.example"


@dataclass
class Stack:
    """A broker served with logins, the web view on it, and what they use."""

    base: str
    port: int
    topic_root: str
    secrets: Path
    models: Path
    serve: Proc
    versions: tuple[str, str]  # (current at start, an older one)


@pytest.fixture
def stack(tmp_path: Path, spawn: Callable[..., Proc], model_dir: Path, topic_root: str) -> Stack:
    """`broker serve` (it writes reload.pid) and `factorywatch web --admins alice
    --broker-pid-file ...` with a model folder of two versions; alice is an admin, bob a
    viewer, `operator` a plain operator."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    add_user(secrets, "alice", "alice-password")
    register(secrets, "alice", "operator")
    add_user(secrets, "bob", "bob-password")
    register(secrets, "bob", "viewer")
    port, workdir = free_port(), tmp_path / "broker"
    serve = spawn(
        "broker", "serve", "--port", str(port), "--workdir", str(workdir),
        "--secrets-dir", str(secrets), name="serve",
    )  # fmt: skip
    serve.wait_log("mosquitto listening")
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    current = artifact.current_version(models)
    assert current is not None
    older = "20000101T000000Z-0ld0"  # sorts before the trained one: a roll-back target
    shutil.copytree(models / current, models / older)
    card = json.loads((models / older / artifact.CARD_FILE).read_text())
    (models / older / artifact.CARD_FILE).write_text(json.dumps({**card, "version": older}))
    http_port = free_port()
    spawn(
        "web", *secure_args(port, topic_root, secrets), "--http-port", str(http_port),
        "--no-history", "--admins", "alice", "--model-dir", str(models),
        "--broker-pid-file", str(workdir / RELOAD_PID_FILE),
    ).wait_log("web_started")  # fmt: skip
    return Stack(
        f"http://127.0.0.1:{http_port}", port, topic_root, secrets, models, serve, (current, older)
    )


def _session(
    browser: Browser, stack: Stack, user: str, password: str
) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport={"width": 1360, "height": 900}, base_url=stack.base)
    page = context.new_page()
    page.goto(f"{stack.base}/login")
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#signin")
    page.wait_for_url(f"{stack.base}/")
    return context, page


def _post(
    page: Page, path: str, body: dict[str, Any], origin: str | None = None
) -> tuple[int, str]:
    """A JSON POST with the view's headers from the page's session (``origin``: forged)."""
    headers = {"Content-Type": "application/json", "X-Requested-With": "factorywatch"}
    if origin is not None:
        headers["Origin"] = origin
    resp = page.request.post(path, data=json.dumps(body), headers=headers)
    return resp.status, resp.text()


def _broker_login(stack: Stack, user: str, password: str) -> None:
    """Log in to the broker as ``user`` (raises ``BrokerError`` when refused) and leave."""
    settings = BrokerSettings().with_overrides(
        port=stack.port, topic_root=stack.topic_root, username=user,
        password=SecretStr(password), connect_retries=0,
    )  # fmt: skip
    client = fwmqtt.connected_client(settings, f"probe-{user}")
    client.disconnect()
    client.loop_stop()


def _refused(stack: Stack, user: str, password: str) -> bool:
    """Whether the broker refuses ``user``'s login now."""
    try:
        _broker_login(stack, user, password)
    except BrokerError:
        return True
    return False


def test_admin_adds_and_removes_accounts_in_chromium(browser: Browser, stack: Stack) -> None:
    """An admin adds machine weld-4 on the accounts page: its password is shown once and logs
    in to the broker (the view reloaded it); removing it and a logged-in viewer locks both
    out of the broker and ends the viewer's web session. Viewers, plain operators, foreign
    origins, service accounts and bad names are refused with a clear answer."""
    bob_context, bob = _session(browser, stack, "bob", "bob-password")
    assert bob.locator("#accounts-link").is_hidden()
    assert bob.request.get(f"{stack.base}/api/accounts").status == 403
    assert _post(bob, "/api/accounts", {"name": "x-1"})[0] == 403
    op_context, op = _session(
        browser, stack, "operator", read_password(stack.secrets, "operator") or ""
    )
    status, text = _post(op, "/api/accounts", {"name": "x-1"})
    assert (status, json.loads(text)["error"]) == (403, "admins only (FACTORYWATCH_WEB_ADMINS)")
    op_context.close()

    _context, page = _session(browser, stack, "alice", "alice-password")
    page.click("#accounts-link")
    page.wait_for_url(f"{stack.base}/accounts")
    page.wait_for_selector('#accounts tr[data-account="press-1"]')
    assert page.inner_text('#accounts tr[data-account="press-1"] td.role') == "machine"
    assert page.locator('#accounts tr[data-account="detector"] button').count() == 0
    assert page.locator('#accounts tr[data-account="alice"] button').count() == 0

    page.fill("#new-name", "weld-4")
    page.select_option("#new-role", "machine")
    page.fill("#new-line", "line2")
    page.click("#add-submit")
    page.wait_for_selector("#shown-password")
    password = page.inner_text("#shown-password")
    assert len(password) >= 20
    assert "Broker reloaded" in page.inner_text("#reload-message")
    assert read_password(stack.secrets, "weld-4") == password  # as `broker add-user` keeps it
    page.wait_for_selector('#accounts tr[data-account="weld-4"]')
    assert "line2" in page.inner_text('#accounts tr[data-account="weld-4"]')
    page.screenshot(path=str(stack.secrets.parent / "web-accounts.png"), full_page=True)
    wait_until(lambda: stack.serve.log().count("reloaded users and ACL") >= 1, what="a reload")
    _broker_login(stack, "weld-4", password)

    # bad input: a clear 400, nothing written
    for name, expected in (("bad name!", "account name"), ("press-1", "already exists"),
                           ("detector", "service account")):  # fmt: skip
        page.fill("#new-name", name)
        page.click("#add-submit")
        page.wait_for_selector(f"#accounts-error:has-text('{expected}')")
    status, text = _post(page, "/api/accounts", {"name": "gw-1", "role": "gateway"})
    assert status == 400
    assert "needs --machines" in json.loads(text)["error"]
    status, _ = _post(page, "/api/accounts", {"name": "evil-1"}, origin=FOREIGN)
    assert status == 403
    status, _ = _post(page, "/api/accounts/remove", {"name": "weld-4"}, origin=FOREIGN)
    assert status == 403
    assert read_password(stack.secrets, "evil-1") is None

    # removal: the broker refuses the account, the viewer's web session ends
    page.on("dialog", lambda dialog: dialog.accept())
    for account in ("weld-4", "bob"):
        page.click(f'#accounts tr[data-account="{account}"] button.remove-account')
        page.wait_for_selector(f"#accounts-notice:has-text('{account} removed')")
    assert page.locator('#accounts tr[data-account="weld-4"]').count() == 0
    # each removal sent its SIGHUP; `broker serve` reloads within half a second of one
    wait_until(lambda: _refused(stack, "weld-4", password), what="the broker to refuse weld-4")
    wait_until(lambda: _refused(stack, "bob", "bob-password"), what="the broker to refuse bob")
    assert bob.request.get(f"{stack.base}/api/me").status == 401
    status, text = _post(page, "/api/accounts/remove", {"name": "weld-4"})
    assert status == 400
    assert "no user 'weld-4'" in json.loads(text)["error"]
    bob_context.close()


def test_operator_promotes_and_rolls_back_a_model_in_chromium(
    browser: Browser, stack: Stack
) -> None:
    """On the machine page an operator promotes the other version and rolls back: `current`
    follows, each change is in the promotion log under the operator's name. A viewer sees no
    buttons and is refused; unknown machines, bad names and versions get a clear 400, a
    foreign origin 403, and nothing changes."""
    current, older = stack.versions
    bob_context, bob = _session(browser, stack, "bob", "bob-password")
    bob.goto(f"{stack.base}/machine/line1/press-1")
    bob.wait_for_selector(f'#models tr[data-version="{older}"]')
    assert bob.locator("#models button").count() == 0
    status, _ = _post(
        bob, "/api/models/promote", {"machine": "press-1", "scope": "default", "version": older}
    )
    assert status == 403
    bob_context.close()

    _context, page = _session(
        browser, stack, "operator", read_password(stack.secrets, "operator") or ""
    )
    page.goto(f"{stack.base}/machine/line1/press-1")
    scope = page.locator('#models .model-scope[data-scope="default"]')
    scope.locator(f'tr[data-version="{current}"] .badge:has-text("current")').wait_for()
    assert "serves this machine" in scope.inner_text()
    assert "no versions" in page.inner_text('#models .model-scope[data-scope="machine"]')

    for body, expected in (
        ({"machine": "nowhere-9", "scope": "default", "version": older}, "unknown machine"),
        ({"machine": "bad name", "scope": "default", "version": older}, "machine id"),
        ({"machine": "press-1", "scope": "elsewhere", "version": older}, "scope must be"),
        ({"machine": "press-1", "scope": "default", "version": "../etc"}, "no model version"),
    ):
        status, text = _post(page, "/api/models/promote", body)
        assert (status, expected in json.loads(text)["error"]) == (400, True), text
    assert _post(page, "/api/models/rollback", {"machine": "press-1", "scope": "machine"})[0] == 400
    assert page.request.get(f"{stack.base}/api/models?machine=nowhere-9").status == 400
    status, _ = _post(
        page,
        "/api/models/promote",
        {"machine": "press-1", "scope": "default", "version": older},
        origin=FOREIGN,
    )
    assert status == 403
    assert artifact.current_version(stack.models) == current

    scope.locator(f'tr[data-version="{older}"] button.promote').click()
    page.wait_for_selector(f"#models-message:has-text('{older} is now current')")
    assert artifact.current_version(stack.models) == older
    scope.locator(f'tr[data-version="{older}"].current').wait_for()
    page.click(f'#models .model-scope[data-scope="default"] button.rollback:has-text("{current}")')
    page.wait_for_selector(f"#models-message:has-text('{current} is now current')")
    assert artifact.current_version(stack.models) == current
    changes = [(e.by, e.action, e.version, e.previous) for e in read_log(stack.models)[-2:]]
    assert changes == [
        ("operator", "promote", older, current),
        ("operator", "rollback", current, older),
    ]
    page.wait_for_selector("#models .changes li:has-text('operator rolled back to')")
    page.screenshot(path=str(stack.secrets.parent / "web-models.png"), full_page=True)
