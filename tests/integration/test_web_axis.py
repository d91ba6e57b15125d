"""The web view's chart axes, in Chromium: a value that is never negative gets no negative axis."""

from __future__ import annotations

from playwright.sync_api import Browser

from tests.support import PROJECT_DIR

APP_JS = PROJECT_DIR / "factorywatch" / "web" / "static" / "app.js"


def test_a_series_that_never_goes_below_zero_keeps_its_axis_at_zero(browser: Browser) -> None:
    """A machine page's tool wear from 0 to 170 min was drawn on an axis from -11.4; its
    margin now stops at zero. A series with negative values keeps its margin below."""
    page = browser.new_page()
    page.add_script_tag(content=APP_JS.read_text())
    low, high = page.evaluate("FW.axisRange([0, 40, 170])")
    assert low == 0
    assert high > 170
    low, high = page.evaluate("FW.axisRange([-2, 3])")
    assert low < -2
    assert high > 3
    low, _ = page.evaluate("FW.axisRange([0.4, 0.6])")
    assert 0 < low < 0.4
