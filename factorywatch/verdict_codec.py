"""Verdicts built and encoded from the engine's values, without a pydantic round trip.

``contracts.Verdict`` stays the schema: its field order is checked here at import, and a
property test (``tests/property/test_verdict_codec.py``) proves that ``encode_verdict`` gives
the bytes ``Verdict.encode`` (``model_dump_json(exclude_none=True)``) gives. What is skipped
on the hot path is pydantic's per-verdict work: validating a dict (``model_validate``) and
serialising the model. The values come from a reading the door already validated and from
the engine itself; what could still be out of the schema's range (a non-finite score,
threshold or latency: pydantic refused those) is refused here with a ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Final

import orjson

from factorywatch.contracts import (
    MAX_ID_TEXT,
    SCHEMA_VERSION,
    Calibration,
    Contribution,
    Status,
    Verdict,
)

_ORDER: Final = (
    "schema_version",
    "machine_id",
    "line",
    "seq",
    "reading_ts",
    "status",
    "score",
    "threshold",
    "model_version",
    "latency_ms",
    "explanation",
    "outside_training",
    "surprise",
    "calibration",
    "historical",
)
if tuple(Verdict.model_fields) != _ORDER:  # pragma: no cover - a schema change lands here
    raise ImportError("factorywatch.verdict_codec: Verdict's fields changed; update _ORDER")
if tuple(Contribution.model_fields) != ("feature", "value", "z") or tuple(
    Calibration.model_fields
) != ("seen", "needed", "fitting"):  # pragma: no cover
    raise ImportError("factorywatch.verdict_codec: a verdict's nested model changed")

#: the fields a verdict built by ``batch_scoring._verdicts`` was given (``model_validate``'s
#: fields_set)
_GIVEN: Final = frozenset(_ORDER[1:13])
_new = object.__new__
_set = object.__setattr__
_isfinite = math.isfinite


def build_verdict(  # noqa: PLR0917 - one verdict's fields
    machine_id: str,
    line: str,
    seq: int,
    reading_ts: float,
    status: Status,
    score: float,
    threshold: float,
    model_version: str,
    latency_ms: float,
    explanation: list[Contribution] | None,
    outside_training: list[str] | None,
    surprise: float | None = None,
) -> Verdict:
    """The ``Verdict`` ``Verdict.model_validate`` gives for these values, built unvalidated.

    ``machine_id``, ``line``, ``seq`` and ``reading_ts`` are a validated reading's; the rest
    are checked for what the engine could get wrong (non-finite numbers, a long version).
    """
    if not (_isfinite(score) and _isfinite(threshold) and _isfinite(latency_ms)):
        raise ValueError(f"verdict of {machine_id}: non-finite score, threshold or latency")
    if surprise is not None and not _isfinite(surprise):
        raise ValueError(f"verdict of {machine_id}: non-finite surprise")
    if not 0 < len(model_version) <= MAX_ID_TEXT:
        raise ValueError(f"verdict of {machine_id}: model version of {len(model_version)} chars")
    verdict = _new(Verdict)
    _set(
        verdict,
        "__dict__",
        {
            "schema_version": SCHEMA_VERSION,
            "machine_id": machine_id,
            "line": line,
            "seq": seq,
            "reading_ts": reading_ts,
            "status": status,
            "score": score,
            "threshold": threshold,
            "model_version": model_version,
            "latency_ms": latency_ms,
            "explanation": explanation,
            "outside_training": outside_training,
            "surprise": surprise,
            "calibration": None,
            "historical": None,
        },
    )
    _set(verdict, "__pydantic_fields_set__", set(_GIVEN))
    _set(verdict, "__pydantic_extra__", None)
    _set(verdict, "__pydantic_private__", None)
    return verdict


def _number(value: Any) -> float:
    """orjson's fallback: a numpy scalar (a float subclass orjson refuses) as a float."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"verdict field of type {type(value).__name__} is not JSON")


def _contributions(explanation: Sequence[Contribution]) -> list[dict[str, Any]]:
    return [{"feature": c.feature, "value": c.value, "z": c.z} for c in explanation]


def encode_verdict(verdict: Verdict) -> bytes:
    """``verdict.encode()``'s bytes, written by orjson from the verdict's values."""
    v = verdict.__dict__
    out: dict[str, Any] = {
        "schema_version": v["schema_version"],
        "machine_id": v["machine_id"],
        "line": v["line"],
        "seq": v["seq"],
        "reading_ts": v["reading_ts"],
        "status": v["status"],
        "score": v["score"],
        "threshold": v["threshold"],
        "model_version": v["model_version"],
        "latency_ms": v["latency_ms"],
    }
    explanation = v["explanation"]
    if explanation is not None:
        out["explanation"] = _contributions(explanation)
    outside = v["outside_training"]
    if outside is not None:
        out["outside_training"] = outside
    surprise = v["surprise"]
    if surprise is not None:
        out["surprise"] = surprise
    calibration = v["calibration"]
    if calibration is not None:
        out["calibration"] = {
            "seen": calibration.seen,
            "needed": calibration.needed,
            "fitting": calibration.fitting,
        }
    historical = v["historical"]
    if historical is not None:
        out["historical"] = historical
    return orjson.dumps(out, default=_number)
