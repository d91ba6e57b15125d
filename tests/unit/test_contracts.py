"""Wire contracts: round trips through encode()/model_validate_json and strict rejection."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pydantic import ValidationError

from factorywatch.contracts import (
    AI4I_CHANNELS,
    MAX_CHANNELS,
    ClientStatus,
    Contribution,
    DeadLetter,
    Telemetry,
    Verdict,
)

TS = 1_700_000_000.0


def telemetry_dict(**overrides: Any) -> dict[str, Any]:
    """A valid telemetry message as a plain dict, with ``overrides`` applied."""
    base: dict[str, Any] = {
        "schema_version": 1,
        "machine_id": "mill-01",
        "line": "line1",
        "seq": 12,
        "ts": TS,
        "product_type": "M",
        "readings": {
            "air_temperature_k": 298.1,
            "process_temperature_k": 308.6,
            "rotational_speed_rpm": 1551.0,
            "torque_nm": 42.8,
            "tool_wear_min": 0.0,
        },
    }
    return {**base, **overrides}


def as_json(data: dict[str, Any]) -> bytes:
    """Encode a dict exactly as a (possibly misbehaving) sender would."""
    return json.dumps(data).encode()


def make_verdict(**overrides: Any) -> Verdict:
    """A valid ALERT verdict with an explanation."""
    fields: dict[str, Any] = {
        "machine_id": "mill-01",
        "line": "line1",
        "seq": 7,
        "reading_ts": TS,
        "status": "ALERT",
        "score": 0.71,
        "threshold": 0.6,
        "model_version": "20261124T204400Z-3f9a",
        "latency_ms": 1.25,
        "explanation": [
            Contribution(feature="power_w", value=11728.6, z=5.105),
            Contribution(feature="temp_diff_k", value=10.0, z=-0.169),
        ],
    }
    return Verdict(**{**fields, **overrides})


# -- round trips -----------------------------------------------------------------------------


def test_telemetry_round_trips_through_encode() -> None:
    """A telemetry message decodes from its own encoding into an equal object."""
    original = Telemetry.model_validate_json(as_json(telemetry_dict(injected="power")))
    again = Telemetry.model_validate_json(original.encode())
    assert again == original
    assert again.injected == "power"


def test_telemetry_encode_omits_absent_ground_truth() -> None:
    """``injected=None`` is left out of the wire form, and decoding restores it as None."""
    reading = Telemetry.model_validate_json(as_json(telemetry_dict()))
    wire = json.loads(reading.encode())
    assert "injected" not in wire
    assert Telemetry.model_validate_json(reading.encode()).injected is None


def test_verdict_round_trips_through_encode() -> None:
    """A verdict with an explanation decodes from its own encoding into an equal object."""
    verdict = make_verdict()
    assert Verdict.model_validate_json(verdict.encode()) == verdict


def test_normal_verdict_round_trips_without_explanation() -> None:
    """A NORMAL verdict without explanation round-trips and carries no explanation key."""
    verdict = make_verdict(status="NORMAL", score=0.41, explanation=None)
    assert "explanation" not in json.loads(verdict.encode())
    assert Verdict.model_validate_json(verdict.encode()) == verdict


def test_dead_letter_round_trips_through_encode() -> None:
    """A dead letter decodes from its own encoding into an equal object."""
    letter = DeadLetter(
        reason="invalid_json",
        detail="<root>: Invalid JSON",
        topic="factory/telemetry/line1/mill-01",
        payload_bytes=3,
        payload_excerpt="{\ufffd",
        received_at=TS,
    )
    assert DeadLetter.model_validate_json(letter.encode()) == letter


def test_client_status_round_trips_through_encode() -> None:
    """A retained client status decodes from its own encoding into an equal object."""
    status = ClientStatus(role="detector", client_id="det-1", state="online", ts=TS)
    assert ClientStatus.model_validate_json(status.encode()) == status


def test_wire_models_are_frozen() -> None:
    """A decoded reading cannot be modified after validation."""
    reading = Telemetry.model_validate_json(as_json(telemetry_dict()))
    with pytest.raises(ValidationError):
        reading.seq = 13  # type: ignore[misc]


# -- rejections ------------------------------------------------------------------------------


def test_unknown_top_level_key_is_rejected() -> None:
    """An extra key in a telemetry message is a validation error naming that key."""
    with pytest.raises(ValidationError, match=r"extra_forbidden|Extra inputs"):
        Telemetry.model_validate_json(as_json(telemetry_dict(firmware="1.2")))


def test_unknown_key_in_verdict_is_rejected() -> None:
    """Verdicts are as strict as readings: an extra key fails validation."""
    wire = json.loads(make_verdict().encode())
    wire["severity"] = "high"
    with pytest.raises(ValidationError):
        Verdict.model_validate_json(json.dumps(wire))


@pytest.mark.parametrize("key", ["machine_id", "line", "seq", "ts", "product_type", "readings"])
def test_missing_required_key_is_rejected(key: str) -> None:
    """Dropping any required telemetry key is a validation error."""
    data = telemetry_dict()
    del data[key]
    with pytest.raises(ValidationError) as info:
        Telemetry.model_validate_json(as_json(data))
    assert {err["type"] for err in info.value.errors()} == {"missing"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq": "12"}, "seq"),
        ({"seq": 12.0}, "seq"),
        ({"seq": True}, "seq"),
        ({"seq": -1}, "seq"),
        ({"ts": "1700000000"}, "ts"),
        ({"product_type": "X"}, "product_type"),
        ({"product_type": "l"}, "product_type"),
        ({"schema_version": 3}, "schema_version"),
        ({"injected": "meteor"}, "injected"),
        ({"readings": []}, "readings"),
        ({"readings": {}}, "readings"),
        ({"machine_id": 17}, "machine_id"),
    ],
)
def test_wrong_types_are_rejected(overrides: dict[str, Any], field: str) -> None:
    """Strict mode: no coercion of strings, booleans or floats into other field types."""
    with pytest.raises(ValidationError) as info:
        Telemetry.model_validate_json(as_json(telemetry_dict(**overrides)))
    # Version 1's product_type is checked while normalising (no field location): its
    # message names it instead.
    named = {str(err["loc"][0]) for err in info.value.errors() if err["loc"]}
    named |= {err["msg"].split(":")[0] for err in info.value.errors() if not err["loc"]}
    assert field in named


@pytest.mark.parametrize("value", [True, "42.8", None, [42.8], {"v": 42.8}])
def test_non_number_reading_is_rejected(value: object) -> None:
    """A reading value must be a JSON number: true, strings, null and containers fail."""
    data = telemetry_dict()
    data["readings"] = {**data["readings"], "torque_nm": value}
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(as_json(data))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("where", ["reading", "ts"])
def test_non_finite_numbers_are_rejected(token: str, where: str) -> None:
    """NaN, Infinity and overflowing literals fail validation as non-finite numbers."""
    text = as_json(telemetry_dict()).decode()
    if where == "reading":
        text = text.replace('"torque_nm": 42.8', f'"torque_nm": {token}')
    else:
        text = text.replace(f'"ts": {TS}', f'"ts": {token}')
    assert token in text
    with pytest.raises(ValidationError) as info:
        Telemetry.model_validate_json(text)
    assert "finite_number" in {err["type"] for err in info.value.errors()}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_rejected_in_python_construction(value: float) -> None:
    """Constructing a reading or a verdict in code with a non-finite float also fails."""
    with pytest.raises(ValidationError):
        Telemetry(**telemetry_dict(readings={"torque_nm": value}))
    with pytest.raises(ValidationError):
        make_verdict(score=value)
    with pytest.raises(ValidationError):
        Contribution(feature="power_w", value=1.0, z=value)


@pytest.mark.parametrize("ts", [TS * 1000, 1_700_000_000_000, 0, -1.0, 946_684_799.0, 4.2e9])
def test_timestamp_outside_unix_seconds_window_is_rejected(ts: float) -> None:
    """Milliseconds, zero, negatives and dates outside 2000..2100 fail validation."""
    with pytest.raises(ValidationError) as info:
        Telemetry.model_validate_json(as_json(telemetry_dict(ts=ts)))
    assert [err["loc"] for err in info.value.errors()] == [("ts",)]


@pytest.mark.parametrize("ts", [946_684_800.0, 4_102_444_800.0, 1_700_000_000])
def test_timestamp_window_bounds_and_integers_are_accepted(ts: float) -> None:
    """The window is inclusive and an integral Unix-seconds timestamp is accepted."""
    assert Telemetry.model_validate_json(as_json(telemetry_dict(ts=ts))).ts == float(ts)


@pytest.mark.parametrize(
    "bad_id",
    ["", "a/b", "a+b", "+", "#", "mill#1", "-mill", "_mill", ".mill", "mill 1", "mühle", "m" * 65],
)
@pytest.mark.parametrize("field", ["machine_id", "line"])
def test_bad_identifiers_are_rejected(bad_id: str, field: str) -> None:
    """Machine ids and lines that could not be one topic level fail validation."""
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(as_json(telemetry_dict(**{field: bad_id})))


@pytest.mark.parametrize("good_id", ["m", "M1", "mill-01", "line_2.a", "9" * 64])
def test_good_identifiers_are_accepted(good_id: str) -> None:
    """Identifiers of letters, digits, '_', '.', '-' up to 64 characters are accepted."""
    reading = Telemetry.model_validate_json(as_json(telemetry_dict(machine_id=good_id)))
    assert reading.machine_id == good_id


def test_too_many_channels_are_rejected() -> None:
    """A reading with more than MAX_CHANNELS channels fails; exactly MAX_CHANNELS passes."""
    at_limit = {f"ch_{i}": float(i) for i in range(MAX_CHANNELS)}
    accepted = Telemetry.model_validate_json(as_json(telemetry_dict(readings=at_limit)))
    assert len(accepted.readings) == MAX_CHANNELS
    over = {**at_limit, "one_more": 1.0}
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(as_json(telemetry_dict(readings=over)))


@pytest.mark.parametrize("name", ["Torque", "1torque", "torque-nm", "torque/nm", "", "t" * 65])
def test_bad_channel_names_are_rejected(name: str) -> None:
    """Channel names must be lower-case snake case starting with a letter."""
    with pytest.raises(ValidationError):
        Telemetry.model_validate_json(as_json(telemetry_dict(readings={name: 1.0})))


def test_ai4i_channel_names_are_valid_channel_names() -> None:
    """Every built-in AI4I channel name passes the channel-name pattern."""
    readings = dict.fromkeys(AI4I_CHANNELS, 1.0)
    assert set(Telemetry(**telemetry_dict(readings=readings)).readings) == set(AI4I_CHANNELS)


# -- never NaN on the wire -------------------------------------------------------------------
def strict_loads(payload: bytes) -> object:
    """json.loads that refuses the NaN/Infinity constants it accepts by default."""

    def reject(constant: str) -> object:
        raise ValueError(f"non-finite {constant}")

    return json.loads(payload, parse_constant=reject)


def test_encode_output_is_strict_json() -> None:
    """Encoded verdicts and readings parse with a JSON decoder that rejects NaN/Infinity."""
    for model in (make_verdict(), Telemetry(**telemetry_dict())):
        assert isinstance(strict_loads(model.encode()), dict)


def test_encode_never_emits_nan_even_for_unvalidated_models() -> None:
    """Even a verdict built without validation encodes non-finite floats as non-NaN JSON."""
    verdict = Verdict.model_construct(
        **{
            **make_verdict(explanation=None).model_dump(),
            "score": math.nan,
            "latency_ms": -math.inf,
        }
    )
    wire = verdict.encode()
    for token in (b"NaN", b"Infinity"):
        assert token not in wire
    decoded = strict_loads(wire)
    assert isinstance(decoded, dict)
    assert decoded["score"] is None
