"""Channel-name mapping (factorywatch.channels) and the version 2 telemetry wire."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from factorywatch.channels import ChannelNameError, canonical, is_canonical, map_names
from factorywatch.contracts import Telemetry
from factorywatch.detector.batch_scoring import Decoder, Received
from factorywatch.errors import PayloadError
from factorywatch.topics import Topics

TS = 1_700_000_000.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Vibration1RMS", "vibration1_rms"),
        ("Accelerometer1RMS", "accelerometer1_rms"),
        ("Volume Flow RateRMS", "volume_flow_rate_rms"),
        ("Flow Rate", "flow_rate"),
        ("Pump/Flow Rate", "pump_flow_rate"),
        ("Line1.Pump3.Temp", "line1_pump3_temp"),
        ("Air temperature [K]", "air_temperature_k"),
        ("RMSValue", "rms_value"),
        ("Temp [°C]", "temp_c"),
        ("Load %", "load_pct"),
        ("Flow µm/s", "flow_um_s"),
        ("3rd_axis", "ch_3rd_axis"),
        ("torque_nm", "torque_nm"),
        ("  Current ", "current"),
    ],
)
def test_real_names_map_to_channel_names(raw: str, expected: str) -> None:
    """Names from real systems (CamelCase, spaces, tag paths, units) map as documented."""
    assert canonical(raw) == expected


@given(st.text(min_size=1, max_size=300))
def test_canonical_is_valid_idempotent_or_refused(raw: str) -> None:
    """Any string maps to a valid channel name that maps to itself, or is refused clearly."""
    try:
        name = canonical(raw)
    except ChannelNameError:
        return
    assert is_canonical(name)
    assert canonical(name) == name


def test_long_names_stay_apart() -> None:
    """Two long names that share their first 64 characters map to different channels."""
    a, b = "x" * 80 + "A", "x" * 80 + "B"
    assert canonical(a) != canonical(b)
    assert len(canonical(a)) <= 64


def test_collisions_are_refused_with_both_names() -> None:
    """Two names mapping to one channel are an error naming both, never a silent merge."""
    with pytest.raises(ChannelNameError, match="'Flow Rate' and 'flow_rate'"):
        map_names(["Flow Rate", "flow_rate"])


@pytest.mark.parametrize("raw", ["", "   ", "///", "°"])
def test_names_without_letters_are_refused(raw: str) -> None:
    """A name with no letters or digits cannot become a channel."""
    with pytest.raises(ChannelNameError):
        canonical(raw)


def v2(**overrides: Any) -> bytes:
    """A version 2 reading as a sender would publish it."""
    base: dict[str, Any] = {
        "schema_version": 2,
        "machine_id": "pump-7",
        "line": "line1",
        "seq": 1,
        "ts": TS,
        "readings": {"Accelerometer1RMS": 0.2, "Flow Rate": 32.1, "Pump/Pressure": 1.1},
    }
    return json.dumps({**base, **overrides}).encode()


def test_v2_reading_maps_channel_names() -> None:
    """A version 2 reading with real tag names is accepted under channel names."""
    reading = Telemetry.model_validate_json(v2())
    assert reading.readings == {"accelerometer1_rms": 0.2, "flow_rate": 32.1, "pump_pressure": 1.1}
    assert reading.attributes == {}
    assert reading.product_type is None


def test_v2_attributes_are_strings() -> None:
    """Attributes carry string context; a number there is a schema error."""
    reading = Telemetry.model_validate_json(v2(attributes={"Product Type": "L", "shift": "B"}))
    assert reading.attributes == {"product_type": "L", "shift": "B"}
    assert reading.product_type == "L"
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(v2(attributes={"shift": 2}))


def test_v2_colliding_names_are_a_schema_error() -> None:
    """Two wire names for one channel in a reading are refused, naming both."""
    with pytest.raises(ValidationError, match="both map to channel 'flow_rate'"):
        Telemetry.model_validate_json(v2(readings={"Flow Rate": 1.0, "flow_rate": 2.0}))


def test_v1_and_v2_have_the_same_in_memory_shape() -> None:
    """A version 1 reading is normalised to version 2: product type becomes an attribute."""
    one = {
        "schema_version": 1,
        "machine_id": "pump-7",
        "line": "line1",
        "seq": 1,
        "ts": TS,
        "product_type": "M",
        "readings": {"torque_nm": 40.0},
    }
    two = {**one, "schema_version": 2, "attributes": {"product_type": "M"}}
    del two["product_type"]
    a = Telemetry.model_validate_json(json.dumps(one))
    b = Telemetry.model_validate_json(json.dumps(two))
    assert a == b
    assert a.schema_version == 2
    assert json.loads(a.encode())["attributes"] == {"product_type": "M"}


def test_v1_keeps_its_strict_names() -> None:
    """Version 1 did not map names: a capitalised channel is still refused there."""
    one = json.loads(v2(schema_version=1, product_type="L", readings={"Torque": 1.0}))
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(json.dumps(one))


def test_v2_with_top_level_product_type_is_refused() -> None:
    """In version 2 the product type is an attribute; at the top level it is unknown."""
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(v2(product_type="L"))


def _decode(decoder: Decoder, payload: bytes) -> Telemetry:
    return decoder.decode(
        Received(
            topic=TOPICS.telemetry("line1", "pump-7"),
            payload=payload,
            received_at=TS,
            received_perf=0.0,
        )
    )


TOPICS = Topics()


def test_decoder_checks_mapped_channel_names() -> None:
    """A model on mapped channels accepts a v2 reading with the raw tag names."""
    decoder = Decoder(TOPICS, channels=["accelerometer1_rms", "flow_rate"], max_clock_skew_s=60)
    assert _decode(decoder, v2()).readings["flow_rate"] == 32.1
    with pytest.raises(PayloadError, match="flow_rate") as info:
        _decode(decoder, v2(readings={"Accelerometer1RMS": 0.2}))
    assert info.value.reason == "missing_channel"


def test_ai4i_model_needs_the_product_type_attribute() -> None:
    """A v2 reading without product_type is refused by a decoder for an AI4I model."""
    decoder = Decoder(TOPICS, channels=["torque_nm"], max_clock_skew_s=60)
    with pytest.raises(PayloadError, match="product_type") as info:
        _decode(decoder, v2(readings={"torque_nm": 40.0}))
    assert info.value.reason == "missing_channel"
    with pytest.raises(PayloadError) as bad:
        _decode(decoder, v2(readings={"torque_nm": 40.0}, attributes={"product_type": "Q"}))
    assert bad.value.reason == "schema"
    ok = _decode(decoder, v2(readings={"torque_nm": 40.0}, attributes={"product_type": "H"}))
    assert ok.product_type == "H"
