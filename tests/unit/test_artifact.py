"""Model artifacts: save / promote / load round trip and typed errors for broken artifacts."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.ensemble import IsolationForest

from factorywatch.errors import ModelMismatchError, ModelNotFoundError
from factorywatch.model import artifact
from factorywatch.model.artifact import (
    CARD_FILE,
    CURRENT,
    FLAT_FILE,
    MODEL_FILE,
    LoadedModel,
    ModelCard,
)
from factorywatch.model.dataset import load, sha256_of
from factorywatch.model.promotions import read_log
from factorywatch.model.threshold import ThresholdSpec
from factorywatch.model.train import fit
from tests.support import SMALL_MODEL_MACHINES, SMALL_MODEL_READINGS, small_ai4i_csv


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 simulated AI4I-shaped readings in the UCI layout (``small_ai4i_csv``)."""
    return small_ai4i_csv(tmp_path_factory.mktemp("data") / "small.csv")


@pytest.fixture(scope="module")
def trained(small_csv: Path) -> tuple[IsolationForest, ModelCard]:
    """A tiny 20-tree model of the physics feature set, fitted on the small CSV."""
    return fit(load(small_csv, verify=False), feature_set="physics", n_estimators=20, seed=0)


@pytest.fixture
def saved(tmp_path: Path, trained: tuple[IsolationForest, ModelCard]) -> Path:
    """A model directory holding the tiny model, saved and promoted."""
    forest, card = trained
    artifact.save(tmp_path, forest, card)
    artifact.promote(tmp_path, card.version)
    return tmp_path


def edit_card(model_dir: Path, version: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a saved card's JSON through ``change``."""
    path = model_dir / version / CARD_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture(params=["sklearn", "fast-without-npz"])
def from_pickle(request: pytest.FixtureRequest) -> Callable[[Path], LoadedModel]:
    """The two loads that unpickle: the sklearn scorer, and an artifact saved before npz."""

    def load_it(model_dir: Path) -> LoadedModel:
        if request.param == "sklearn":
            return artifact.load(model_dir, scorer="sklearn")
        for flat in model_dir.glob(f"*/{FLAT_FILE}"):
            flat.unlink()
        return artifact.load(model_dir)

    return load_it


def with_version(card: ModelCard, when: datetime) -> ModelCard:
    """A copy of ``card`` with a version id made at ``when``."""
    return card.model_copy(update={"version": artifact.new_version(when)})


# -- round trip ------------------------------------------------------------------------------


def test_save_promote_load_round_trip(
    saved: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """The loaded model has the saved card and scores exactly like the trained forest."""
    forest, card = trained
    loaded = artifact.load(saved)
    assert loaded.card == card
    assert loaded.version == card.version
    rows = np.array([[10.0, 6000.0, 0.5, 100.0], [8.0, 12_000.0, 1.2, 230.0]])
    np.testing.assert_array_equal(loaded.scorer.score(rows), -forest.score_samples(rows))
    np.testing.assert_array_equal(loaded.center, card.feature_center)
    np.testing.assert_array_equal(loaded.scale, card.feature_scale)


def test_saved_artifact_layout(saved: Path, trained: tuple[IsolationForest, ModelCard]) -> None:
    """An artifact is ``<version>/{model.joblib,forest.npz,card.json}`` + a ``current`` pointer."""
    version = trained[1].version
    assert (saved / version / MODEL_FILE).is_file()
    assert (saved / version / FLAT_FILE).is_file()
    assert ModelCard.model_validate_json((saved / version / CARD_FILE).read_text()).version
    assert (saved / CURRENT).read_text().strip() == version


def test_card_records_training_facts(
    trained: tuple[IsolationForest, ModelCard], small_csv: Path
) -> None:
    """The card carries features, channels, data checksum, libraries and a calibrated cut
    (of the real dataset, verified: tests/integration/test_ai4i_models.py)."""
    card = trained[1]
    assert card.features == ["temp_diff_k", "power_w", "strain_ratio", "tool_wear_min"]
    assert card.data.rows == SMALL_MODEL_MACHINES * SMALL_MODEL_READINGS
    assert (card.data.file, card.data.layout) == (small_csv.name, "uci")
    assert card.data.sha256 == sha256_of(small_csv)
    assert not card.data.verified
    assert card.libraries["scikit-learn"] == sklearn.__version__
    assert card.params["n_estimators"] == 20
    assert 0.0 < card.threshold < 1.0
    rate = ThresholdSpec().value  # the default false-alarm budget
    assert card.threshold_spec == ThresholdSpec()
    assert card.metrics["train_alert_rate"] == pytest.approx(rate, abs=0.005)
    assert card.clear_threshold is not None
    assert 0.0 < card.clear_threshold < card.threshold  # the lower edge of the hysteresis


def test_card_without_clear_threshold_still_loads(
    trained: tuple[IsolationForest, ModelCard],
) -> None:
    """Cards written before the clear threshold existed validate, with none."""
    raw = trained[1].model_dump(mode="json")
    del raw["clear_threshold"]
    assert ModelCard.model_validate(raw).clear_threshold is None


def test_save_refuses_to_overwrite_a_version(
    saved: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """Saving the same version twice fails instead of replacing a published artifact."""
    forest, card = trained
    with pytest.raises(FileExistsError):
        artifact.save(saved, forest, card)


def test_current_version_and_list_versions(
    tmp_path: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """Versions list oldest first; ``current`` follows the latest promotion."""
    forest, card = trained
    assert artifact.current_version(tmp_path) is None
    assert artifact.list_versions(tmp_path) == []
    old = with_version(card, datetime(2026, 1, 1, tzinfo=UTC))
    new = with_version(card, datetime(2026, 6, 1, tzinfo=UTC))
    artifact.save(tmp_path, forest, new)
    artifact.save(tmp_path, forest, old)
    (tmp_path / "not-a-model").mkdir()
    assert artifact.list_versions(tmp_path) == [old.version, new.version]
    assert artifact.current_version(tmp_path) is None
    artifact.promote(tmp_path, new.version)
    assert artifact.current_version(tmp_path) == new.version
    artifact.promote(tmp_path, old.version)
    assert artifact.current_version(tmp_path) == old.version
    assert artifact.load(tmp_path).version == old.version
    assert artifact.load(tmp_path, new.version).version == new.version
    assert artifact.list_versions(tmp_path) == [old.version, new.version]


def test_list_versions_of_missing_directory_is_empty(tmp_path: Path) -> None:
    """A model directory that does not exist has no versions and no current one."""
    assert artifact.list_versions(tmp_path / "nowhere") == []
    assert artifact.current_version(tmp_path / "nowhere") is None


def test_new_version_is_sortable_by_time() -> None:
    """Version ids sort in creation order."""
    early = artifact.new_version(datetime(2026, 1, 1, tzinfo=UTC))
    late = artifact.new_version(datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    assert early.startswith("20260101T000000Z-")
    assert early < late


# -- missing artifacts -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["empty", "missing"])
def test_load_without_promoted_model_says_how_to_fix_it(tmp_path: Path, where: str) -> None:
    """No promoted model raises ModelNotFoundError telling the user to run factorywatch train."""
    model_dir = tmp_path if where == "empty" else tmp_path / "nowhere"
    with pytest.raises(ModelNotFoundError, match="factorywatch train"):
        artifact.load(model_dir)


def test_empty_current_pointer_counts_as_nothing_promoted(tmp_path: Path) -> None:
    """A blank ``current`` file means no promoted model."""
    (tmp_path / CURRENT).write_text("\n")
    assert artifact.current_version(tmp_path) is None
    with pytest.raises(ModelNotFoundError, match="factorywatch train"):
        artifact.load(tmp_path)


def test_promote_unknown_version_fails(tmp_path: Path) -> None:
    """Promoting a version that was never saved raises ModelNotFoundError."""
    with pytest.raises(ModelNotFoundError):
        artifact.promote(tmp_path, "20260101T000000Z-dead")
    assert artifact.current_version(tmp_path) is None


def test_current_pointing_at_missing_version_fails(tmp_path: Path) -> None:
    """A ``current`` pointer to a deleted version raises ModelNotFoundError."""
    (tmp_path / CURRENT).write_text("20260101T000000Z-dead\n")
    with pytest.raises(ModelNotFoundError):
        artifact.load(tmp_path)


def test_the_fast_scorer_needs_no_pickle(
    saved: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """forest.npz alone scores exactly like the fitted forest: model.joblib is not read."""
    forest, card = trained
    (saved / card.version / MODEL_FILE).unlink()
    rows = np.array([[10.0, 6000.0, 0.5, 100.0], [8.0, 12_000.0, 1.2, 230.0]])
    np.testing.assert_array_equal(
        artifact.load(saved).scorer.score(rows), -forest.score_samples(rows)
    )


def test_artifact_without_npz_is_flattened_from_its_pickle(
    saved: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """Artifacts saved before forest.npz existed still load with the fast scorer."""
    forest, card = trained
    (saved / card.version / FLAT_FILE).unlink()
    rows = np.array([[10.0, 6000.0, 0.5, 100.0]])
    np.testing.assert_array_equal(
        artifact.load(saved).scorer.score(rows), -forest.score_samples(rows)
    )


@pytest.mark.parametrize("corrupt", [b"", b"garbage", b"PK\x03\x04broken zip"])
def test_corrupt_npz_is_a_mismatch(
    saved: Path, trained: tuple[IsolationForest, ModelCard], corrupt: bytes
) -> None:
    """A forest.npz that is not what save() wrote raises ModelMismatchError naming it."""
    (saved / trained[1].version / FLAT_FILE).write_bytes(corrupt)
    with pytest.raises(ModelMismatchError, match=FLAT_FILE):
        artifact.load(saved)


def test_missing_model_file_fails(
    saved: Path,
    trained: tuple[IsolationForest, ModelCard],
    from_pickle: Callable[[Path], LoadedModel],
) -> None:
    """A card without its model.joblib raises ModelNotFoundError where the pickle is needed."""
    (saved / trained[1].version / MODEL_FILE).unlink()
    with pytest.raises(ModelNotFoundError, match=MODEL_FILE):
        from_pickle(saved)


# -- mismatched or corrupt artifacts ---------------------------------------------------------


def _other_minor(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"{major}.{int(minor) + 1}.0"


@pytest.mark.parametrize("other", ["0.24.2", _other_minor(sklearn.__version__)])
def test_other_scikit_learn_release_is_a_mismatch(
    saved: Path,
    trained: tuple[IsolationForest, ModelCard],
    other: str,
    from_pickle: Callable[[Path], LoadedModel],
) -> None:
    """Unpickling a forest from another scikit-learn major.minor is refused, with the fix."""
    version = trained[1].version
    edit_card(saved, version, lambda d: d["libraries"].update({"scikit-learn": other}))
    with pytest.raises(ModelMismatchError, match="factorywatch train"):
        from_pickle(saved)


def test_other_scikit_learn_patch_release_is_accepted(
    saved: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """Only major.minor must match: another patch release loads."""
    major_minor = ".".join(sklearn.__version__.split(".")[:2])
    version = trained[1].version
    edit_card(
        saved, version, lambda d: d["libraries"].update({"scikit-learn": f"{major_minor}.99"})
    )
    assert artifact.load(saved, scorer="sklearn").version == version


@pytest.mark.parametrize(
    "corrupt",
    [
        b"",
        b"{",
        b"not json at all",
        b"[]",
        b'{"format_version": 1}',
    ],
)
def test_corrupt_card_is_a_mismatch(
    saved: Path, trained: tuple[IsolationForest, ModelCard], corrupt: bytes
) -> None:
    """A card that is not a valid format-1 card raises ModelMismatchError."""
    (saved / trained[1].version / CARD_FILE).write_bytes(corrupt)
    with pytest.raises(ModelMismatchError):
        artifact.load(saved)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(format_version=2),
        lambda d: d.update(surprise=True),
        lambda d: d.pop("threshold"),
        lambda d: d.update(threshold="high"),
    ],
    ids=["format_version", "unknown-key", "missing-key", "wrong-type"],
)
def test_invalid_card_fields_are_a_mismatch(
    saved: Path, trained: tuple[IsolationForest, ModelCard], change: Callable[[Any], None]
) -> None:
    """A card of another format or with bad fields raises ModelMismatchError."""
    edit_card(saved, trained[1].version, change)
    with pytest.raises(ModelMismatchError):
        artifact.load(saved)


def test_non_utf8_card_is_a_mismatch(
    saved: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """A card file of binary garbage raises ModelMismatchError, not a decoding error."""
    (saved / trained[1].version / CARD_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelMismatchError):
        artifact.load(saved)


def test_corrupt_model_file_is_a_mismatch(
    saved: Path,
    trained: tuple[IsolationForest, ModelCard],
    from_pickle: Callable[[Path], LoadedModel],
) -> None:
    """A model.joblib that cannot be unpickled raises ModelMismatchError."""
    (saved / trained[1].version / MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(ModelMismatchError, match="unpickle"):
        from_pickle(saved)


def test_non_forest_model_file_is_a_mismatch(
    saved: Path,
    trained: tuple[IsolationForest, ModelCard],
    from_pickle: Callable[[Path], LoadedModel],
) -> None:
    """A model.joblib holding something other than an IsolationForest is refused."""
    joblib.dump({"not": "a forest"}, saved / trained[1].version / MODEL_FILE)
    with pytest.raises(ModelMismatchError, match="IsolationForest"):
        from_pickle(saved)


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(features=["temp_diff_k", "power_w", "strain_ratio", "vibration"]),
        lambda d: d.update(features=["temp_diff_k", "power_w", "strain_ratio"]),
        lambda d: d.update(channels=["air_temperature_k"]),
        lambda d: d.update(feature_center=[0.0]),
    ],
    ids=["unknown-feature", "fewer-features", "wrong-channels", "short-center"],
)
@pytest.mark.parametrize("scorer", ["fast", "sklearn"])
def test_card_that_does_not_fit_the_forest_is_a_mismatch(
    saved: Path,
    trained: tuple[IsolationForest, ModelCard],
    change: Callable[[Any], None],
    scorer: artifact.ScorerKind,
) -> None:
    """Features, channels or statistics that do not fit the forest raise ModelMismatchError."""
    edit_card(saved, trained[1].version, change)
    with pytest.raises(ModelMismatchError):
        artifact.load(saved, scorer=scorer)


def test_rollback_returns_through_the_promotions_and_records_who(
    tmp_path: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """Promotions A, B, C then two roll-backs return to B, then A; each change is in the
    folder's log with who made it and what it replaced; a third roll-back is refused."""
    forest, card = trained
    a, b, c = (with_version(card, datetime(2026, month, 1, tzinfo=UTC)) for month in (1, 2, 3))
    for version in (a, b, c):
        artifact.save(tmp_path, forest, version)
        artifact.promote(tmp_path, version.version, by="alice")
    assert artifact.rollback(tmp_path, by="bob") == b.version
    assert artifact.current_version(tmp_path) == b.version
    assert artifact.rollback(tmp_path, by="bob") == a.version
    with pytest.raises(ModelNotFoundError, match="nothing to roll back to"):
        artifact.rollback(tmp_path, by="bob")
    assert artifact.current_version(tmp_path) == a.version
    log = read_log(tmp_path)
    assert [(e.by, e.action, e.version, e.previous) for e in log] == [
        ("alice", "promote", a.version, None),
        ("alice", "promote", b.version, a.version),
        ("alice", "promote", c.version, b.version),
        ("bob", "rollback", b.version, c.version),
        ("bob", "rollback", a.version, b.version),
    ]


def test_rollback_without_a_log_returns_to_the_next_older_version(
    tmp_path: Path, trained: tuple[IsolationForest, ModelCard]
) -> None:
    """A folder promoted before the log existed rolls back to the newest older version; a
    path-like version name is no version at all."""
    forest, card = trained
    old, new = (with_version(card, datetime(2026, month, 1, tzinfo=UTC)) for month in (1, 2))
    for version in (old, new):
        artifact.save(tmp_path, forest, version)
    (tmp_path / CURRENT).write_text(new.version + "\n")
    assert artifact.rollback(tmp_path) == old.version
    with pytest.raises(ModelNotFoundError):
        artifact.promote(tmp_path, "../" + new.version)
