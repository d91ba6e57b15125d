"""The one process launcher (``factorywatch.launch``): the environment it gives a child (with
real child processes: tests/integration/test_launch.py)."""

from __future__ import annotations

import pytest

from factorywatch.launch import child_env


def test_child_env_drops_a_prefix_and_adds_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inherited settings with the prefix are dropped; extras win; output is unbuffered."""
    monkeypatch.setenv("FACTORYWATCH_MQTT_PORT", "1")
    env = child_env({"FACTORYWATCH_X": "2"}, drop_prefix="FACTORYWATCH_MQTT_")
    assert "FACTORYWATCH_MQTT_PORT" not in env
    assert env["FACTORYWATCH_X"] == "2"
    assert env["PYTHONUNBUFFERED"] == "1"
