"""Finding 4: readings whose features overflow still give valid, finite verdicts (no null)."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from factorywatch.contracts import AI4I_CHANNELS, TORQUE, Telemetry, Verdict
from factorywatch.dashboard import DashboardModel
from factorywatch.detector.batch_scoring import score
from factorywatch.model import artifact
from factorywatch.model.artifact import LoadedModel
from factorywatch.model.features import FEATURE_LIMIT, FEATURE_SETS, compute_features
from factorywatch.model.scoring import explain
from factorywatch.topics import Topics
from tests.support import TYPICAL

finite = st.floats(allow_nan=False, allow_infinity=False)


@pytest.fixture(scope="module")
def model(small_model_dir: Path) -> LoadedModel:
    """The small fixture model, loaded as the detector loads it."""
    return artifact.load(small_model_dir)


def reading(**channels: float) -> Telemetry:
    """A reading with typical channels, some replaced."""
    return Telemetry(
        machine_id="m1",
        line="line1",
        seq=1,
        ts=time.time(),
        attributes={"product_type": "L"},
        readings={**TYPICAL, **channels},
    )


def _floats(document: Any) -> list[Any]:
    if isinstance(document, dict):
        return [v for x in document.values() for v in _floats(x)]
    if isinstance(document, list):
        return [v for x in document for v in _floats(x)]
    return [document]


def test_torque_1e308_is_an_alert_with_a_readable_explanation(model: LoadedModel) -> None:
    """Torque 1e308 gives an ALERT whose explanation names a feature with finite value and z,
    the encoded verdict has no null, and the dashboard keeps the machine's row."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning either
        (verdict,) = score(model, [reading(torque_nm=1e308)], [0.0], explain_top_k=3)
    assert verdict.status == "ALERT"
    assert verdict.explanation
    encoded = verdict.encode()
    assert b"null" not in encoded
    assert all(math.isfinite(c.value) and math.isfinite(c.z) for c in verdict.explanation)
    again = Verdict.model_validate_json(encoded)  # the contract accepts what we publish
    assert again.explanation == verdict.explanation
    topics = Topics()
    board = DashboardModel(topics)
    assert board.feed(topics.verdict("line1", "m1"), encoded)
    assert ("line1", "m1") in board.rows
    assert board.rows["line1", "m1"].reading_status == "ALERT"


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(channels=st.fixed_dictionaries(dict.fromkeys(AI4I_CHANNELS, finite)))
# found once: the envelope's derived temperature difference of two extremes overflowed
@example(
    channels={
        **dict.fromkeys(AI4I_CHANNELS, 0.0),
        "air_temperature_k": 1.8527983107084752e302,
        "process_temperature_k": -1.797691282064005e308,
    }
)
def test_any_finite_reading_gives_a_finite_verdict(
    model: LoadedModel, channels: dict[str, float]
) -> None:
    """Whatever finite values a reading carries, every float of its verdict is finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (verdict,) = score(model, [reading(**channels)], [0.0], explain_top_k=4)
    numbers = [v for v in _floats(json.loads(verdict.encode())) if not isinstance(v, str)]
    assert None not in numbers
    assert all(math.isfinite(v) for v in numbers if isinstance(v, float))


@pytest.mark.parametrize("feature_set", sorted(FEATURE_SETS))
@pytest.mark.parametrize("torque", [1e308, -1e308, 3e38, 1e-308])
def test_features_saturate_instead_of_overflowing(feature_set: str, torque: float) -> None:
    """Every feature set gives finite features within FEATURE_LIMIT, and finite z-scores."""
    columns = {c: np.array([v]) for c, v in {**TYPICAL, TORQUE: torque}.items()}
    columns["product_type_code"] = np.array([0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matrix = compute_features(columns, FEATURE_SETS[feature_set])
        ((_, z), *_) = explain(
            matrix, np.zeros(matrix.shape[1]), np.full(matrix.shape[1], 1e-9), 1
        )[0]
    assert np.isfinite(matrix).all()
    assert (np.abs(matrix) <= FEATURE_LIMIT).all()
    assert math.isfinite(z)
