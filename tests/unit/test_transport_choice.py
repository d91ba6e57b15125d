"""Which MQTT client the Mosquitto detector runs on: mqtt5 unless only paho can serve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from factorywatch.cli import main
from factorywatch.settings import DetectorSettings


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put structlog's defaults back after each test that ran main()."""
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("transport", "primary_host", "protocol", "expected", "why"),
    [
        (None, None, "5", "mqtt5", None),
        (None, None, "3.1.1", "paho", "MQTT 3.1.1"),
        (None, "scada1", "5", "paho", "sparkplug_primary_host_id"),
        ("paho", None, "5", "paho", None),
        ("paho", "scada1", "3.1.1", "paho", None),
        ("mqtt5", None, "5", "mqtt5", None),
    ],
)
def test_unset_transport_is_mqtt5_except_where_only_paho_serves(
    transport: str | None, primary_host: str | None, protocol: str, expected: str, why: str | None
) -> None:
    """Unset means mqtt5, or paho with a reason for a primary host and MQTT 3.1.1; a transport
    asked for is the one used."""
    settings = DetectorSettings(
        transport=transport, sparkplug=True, sparkplug_primary_host_id=primary_host
    )
    chosen, reason = settings.transport_for(protocol)
    assert chosen == expected
    if why is None:
        assert reason is None
    else:
        assert reason is not None
        assert why in reason


@pytest.mark.parametrize(
    ("primary_host", "protocol", "why"),
    [(None, "3.1.1", "MQTT 3.1.1"), ("scada1", "5", "sparkplug_primary_host_id")],
)
def test_mqtt5_asked_for_where_it_cannot_serve_is_refused(
    primary_host: str | None, protocol: str, why: str
) -> None:
    """Asking for mqtt5 with MQTT 3.1.1 or as a primary host is an error naming the cause."""
    settings = DetectorSettings(
        transport="mqtt5", sparkplug=True, sparkplug_primary_host_id=primary_host
    )
    with pytest.raises(ValueError, match=why):
        settings.transport_for(protocol)


def test_detect_refuses_mqtt5_on_mqtt_3_1_1_before_loading_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`detect --transport mqtt5 --mqtt-protocol 3.1.1` exits 2 with the reason (the empty
    model directory is never read)."""
    args = ["detect", "--transport", "mqtt5", "--mqtt-protocol", "3.1.1"]
    assert main([*args, "--model-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "transport mqtt5 cannot serve here: MQTT 3.1.1" in err
    assert "use paho" in err
