"""Property tests of ``factorywatch.verdict_codec``: the engine's verdict bytes are the schema's."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorywatch.channels import CHANNEL_PATTERN
from factorywatch.contracts import (
    MAX_CHANNELS,
    MAX_EXPLANATION,
    MAX_ID_TEXT,
    MAX_INT,
    MAX_TS,
    MIN_TS,
    Calibration,
    Contribution,
    Verdict,
)
from factorywatch.topics import ID_PATTERN
from factorywatch.verdict_codec import build_verdict, encode_verdict

FAST = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

ids = st.from_regex(ID_PATTERN, fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)
any_float = st.floats()
id_text = st.text(min_size=1, max_size=MAX_ID_TEXT)
channels = st.from_regex(CHANNEL_PATTERN, fullmatch=True)


def contributions(values: st.SearchStrategy[float]) -> st.SearchStrategy[list[Contribution]]:
    """Explanations as ``batch_scoring._contributions`` builds them (``model_construct``)."""
    one = st.builds(
        lambda f, v, z: Contribution.model_construct(feature=f, value=v, z=round(z, 3)),
        id_text,
        values,
        finite.filter(lambda z: abs(z) < 1e300),
    )
    return st.lists(one, max_size=MAX_EXPLANATION)


def verdict_values(explained: st.SearchStrategy[list[Contribution]]) -> st.SearchStrategy[Any]:
    """The values ``batch_scoring._verdicts`` passes on: a reading's identity and the engine's
    figures."""
    return st.fixed_dictionaries(
        {
            "machine_id": ids,
            "line": ids,
            "seq": st.integers(0, MAX_INT),
            "reading_ts": st.floats(MIN_TS, MAX_TS),
            "status": st.sampled_from(["NORMAL", "ALERT"]),
            "score": finite,
            "threshold": finite,
            "model_version": id_text,
            "latency_ms": finite,
            "explanation": st.none() | explained,
            "outside_training": st.none() | st.lists(channels, max_size=MAX_CHANNELS + 1),
            "surprise": st.none() | finite,
        }
    )


@FAST
@given(values=verdict_values(contributions(finite)))
def test_fast_verdict_is_the_schemas_verdict_byte_for_byte(values: dict[str, Any]) -> None:
    """A verdict built and encoded from values equals the validated model, and its bytes are
    ``model_dump_json(exclude_none=True)``'s and parse back to the same model."""
    slow = Verdict.model_validate(values)
    fast = build_verdict(**values)
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    payload = encode_verdict(fast)
    assert payload == slow.model_dump_json(exclude_none=True).encode() == slow.encode()
    assert Verdict.model_validate_json(payload) == slow
    assert list(Verdict.model_validate_json(payload).model_dump(exclude_none=True)) == list(
        slow.model_dump(exclude_none=True)
    )


@FAST
@given(values=verdict_values(contributions(any_float)))
def test_non_finite_explanation_values_encode_as_pydantic_does(values: dict[str, Any]) -> None:
    """An explanation value that overflowed (inf, NaN: not validated) is written as pydantic
    writes it (``null``)."""
    fast = build_verdict(**values)
    assert encode_verdict(fast) == fast.encode()


@FAST
@given(
    values=verdict_values(contributions(finite)),
    historical=st.booleans(),
    calibration=st.none()
    | st.builds(Calibration, seen=st.integers(0, MAX_INT), needed=st.integers(1, MAX_INT)),
)
def test_updated_and_calibrating_verdicts_encode_as_pydantic_does(
    values: dict[str, Any], historical: bool, calibration: Calibration | None
) -> None:
    """Verdicts the engine copies (``historical``) or that carry calibration progress encode to
    the schema's bytes too."""
    verdict = build_verdict(**values).model_copy(
        update={"historical": historical, "calibration": calibration}
    )
    assert encode_verdict(verdict) == verdict.encode()
    assert Verdict.model_validate_json(encode_verdict(verdict)) == verdict


@FAST
@given(values=verdict_values(st.just([])), bad=st.sampled_from([float("nan"), float("inf")]))
def test_non_finite_figures_are_refused(values: dict[str, Any], bad: float) -> None:
    """A non-finite score, threshold or latency is refused, as ``model_validate`` refused it."""
    for field in ("score", "threshold", "latency_ms"):
        try:
            build_verdict(**{**values, field: bad})
        except ValueError:
            continue
        raise AssertionError(f"{field}={bad} was accepted")


@FAST
@given(values=verdict_values(contributions(finite)))
def test_numpy_scalars_encode_as_pydantic_does(values: dict[str, Any]) -> None:
    """A score or z-score left as a numpy scalar (a float subclass orjson refuses on its own)
    encodes to the schema's bytes."""
    explanation = values["explanation"]
    if explanation:
        c = explanation[0]
        explanation[0] = Contribution.model_construct(
            feature=c.feature, value=np.float64(c.value), z=np.float64(c.z)
        )
    verdict = build_verdict(**{**values, "score": np.float64(values["score"])})
    assert encode_verdict(verdict) == verdict.encode()
