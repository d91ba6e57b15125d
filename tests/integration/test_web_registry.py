"""Issue #26 in the web view: a machine an admin adds on the accounts page is scored by the
running detector (no restart); the page says when, and its Scored column shows the first
verdict once the detector has given one. Real `broker serve`, web view, detector, Chromium."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Browser
from pydantic import SecretStr

from factorywatch import mqtt as fwmqtt
from factorywatch.errors import BrokerError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics
from tests.integration.test_web_admin import Stack, _session, stack
from tests.support import Proc, reading, secure_args, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

__all__ = ["stack"]  # the fixture, shared with the admin page's tests


@pytest.fixture
def topic_root() -> str:
    """`broker serve` renders its ACL for the default topic root: the detector and the view
    use it too (the broker is this test's own)."""
    return "factory"


def test_a_machine_added_on_the_accounts_page_is_scored_without_a_detector_restart(
    browser: Browser, stack: Stack, spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    """alice adds weld-5: the answer says it is scored from its first reading; its row says
    "no verdict yet" until the machine (logging in with the password shown) sends one, then
    the time of that reading; the detector never restarted. Removing it says when its
    readings stop being scored."""
    det = spawn(
        "detect", *secure_args(stack.port, stack.topic_root, stack.secrets),
        "--model-dir", str(stack.models), "--state-dir", str(tmp_path / "det-state"),
        "--metrics-port", "0",
    )  # fmt: skip
    det.wait_log("telemetry_subscribed")
    _context, page = _session(browser, stack, "alice", "alice-password")
    page.goto(f"{stack.base}/accounts")
    page.wait_for_selector('#accounts tr[data-account="press-1"]')
    page.fill("#new-name", "weld-5")
    page.select_option("#new-role", "machine")
    page.fill("#new-line", "line1")
    page.click("#add-submit")
    page.wait_for_selector("#shown-password")
    password = page.inner_text("#shown-password")
    message = page.inner_text("#reload-message")
    assert "Broker reloaded" in message
    assert "scored from its first reading, no restart" in message
    scored = '#accounts tr[data-account="weld-5"] td.scored'
    page.wait_for_selector(f"{scored}:has-text('no verdict yet')")

    settings = BrokerSettings().with_overrides(
        port=stack.port, topic_root=stack.topic_root, username="weld-5",
        password=SecretStr(password), connect_retries=0,
    )  # fmt: skip
    weld = wait_until(
        lambda: fwmqtt.connected_client(settings, "weld-5"),
        what="the reloaded broker to let weld-5 in",
        errors=(BrokerError,),
    )
    try:
        topic = Topics(stack.topic_root).telemetry("line1", "weld-5")
        weld.publish(topic, reading("weld-5", 1).encode(), qos=1).wait_for_publish(10)
        # the page looks again while a machine has no verdict: no reload of the page
        page.wait_for_selector(f"{scored}:has-text('yes, last reading')", timeout=30_000)
    finally:
        weld.disconnect()
        weld.loop_stop()
    lines = det.log().splitlines()
    assert [x for x in lines if "payload_rejected" in x and "/weld-5" in x] == []
    assert det.log().count("detector_started") == 1  # the same detector all along
    assert '"machines_added": ["weld-5"]' in det.log()

    page.on("dialog", lambda dialog: dialog.accept())
    page.click('#accounts tr[data-account="weld-5"] button.remove-account')
    page.wait_for_selector("#accounts-notice:has-text('weld-5 removed')")
    assert "dead-lettered (unknown_machine" in page.inner_text("#accounts-notice")
