"""The real AI4I files: both layouts load with their documented counts, their checksums are
the ones the loader knows and a modified copy fails verification. The loader on small CSVs:
tests/unit/test_dataset.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factorywatch.contracts import AI4I_CHANNELS
from factorywatch.errors import DatasetChecksumError
from factorywatch.model.dataset import (
    FAILURE_MODES,
    KAGGLE_FILE,
    KNOWN_SHA256,
    LABEL,
    UCI_FILE,
    Dataset,
    load,
    sha256_of,
)
from factorywatch.model.features import PRODUCT_TYPE_COLUMN
from tests.support import reference_data_dir, reference_file

UCI_PATH = reference_data_dir() / UCI_FILE
KAGGLE_PATH = reference_data_dir() / KAGGLE_FILE


@pytest.fixture
def reference_files() -> tuple[Path, Path]:
    """Both real AI4I files (the test fails loudly when they are absent)."""
    return reference_file(UCI_FILE), reference_file(KAGGLE_FILE)


real_data = pytest.mark.usefixtures("reference_files")


@pytest.fixture(scope="module")
def uci() -> Dataset:
    """The real UCI file, verified."""
    return load(reference_file(UCI_FILE))


@pytest.fixture(scope="module")
def kaggle() -> Dataset:
    """The real Kaggle file, verified."""
    return load(reference_file(KAGGLE_FILE))


def test_uci_layout_loads_with_documented_counts(uci: Dataset) -> None:
    """ai4i2020.csv loads as the UCI layout: 10000 rows, 339 failures, L/M/H 6000/2997/1003."""
    frame = uci.frame
    assert (uci.layout, uci.verified) == ("uci", True)
    assert len(frame) == 10_000
    assert int(frame[LABEL].sum()) == 339
    assert frame["product_type"].value_counts().to_dict() == {"L": 6000, "M": 2997, "H": 1003}
    modes = {m: int(frame[m].sum()) for m in FAILURE_MODES}
    assert modes == {"TWF": 46, "HDF": 115, "PWF": 95, "OSF": 98, "RNF": 19}


def test_kaggle_layout_loads_with_documented_counts(kaggle: Dataset) -> None:
    """predictive_maintenance.csv loads as the Kaggle layout with the documented counts."""
    frame = kaggle.frame
    assert (kaggle.layout, kaggle.verified) == ("kaggle", True)
    assert len(frame) == 10_000
    assert int(frame[LABEL].sum()) == 339
    assert frame["product_type"].value_counts().to_dict() == {"L": 6000, "M": 2997, "H": 1003}
    modes = {m: int(frame[m].sum()) for m in FAILURE_MODES}
    assert modes == {"TWF": 45, "HDF": 112, "PWF": 95, "OSF": 78, "RNF": 18}


def test_both_layouts_share_sensor_values_and_labels(uci: Dataset, kaggle: Dataset) -> None:
    """The two files hold identical sensor columns and the same failure label per row."""
    for channel in AI4I_CHANNELS:
        np.testing.assert_array_equal(uci.frame[channel], kaggle.frame[channel])
    np.testing.assert_array_equal(uci.frame[LABEL], kaggle.frame[LABEL])


def test_canonical_frame_columns(uci: Dataset) -> None:
    """The canonical frame has exactly product type, channels, label and the five modes."""
    expected = ["product_type", *AI4I_CHANNELS, LABEL, *FAILURE_MODES]
    assert list(uci.frame.columns) == expected


def test_columns_feed_compute_features(uci: Dataset) -> None:
    """Dataset.columns gives float channel arrays plus product codes 0/1/2."""
    cols = uci.columns()
    assert set(cols) == {*AI4I_CHANNELS, PRODUCT_TYPE_COLUMN}
    assert all(col.dtype == np.float64 and len(col) == 10_000 for col in cols.values())
    assert set(np.unique(cols[PRODUCT_TYPE_COLUMN]).tolist()) == {0.0, 1.0, 2.0}


# -- checksums -------------------------------------------------------------------------------


@real_data
def test_known_files_have_their_documented_sha256() -> None:
    """The shared files' sha256 values are the ones the loader knows."""
    assert KNOWN_SHA256[sha256_of(UCI_PATH)] == UCI_FILE
    assert KNOWN_SHA256[sha256_of(KAGGLE_PATH)] == KAGGLE_FILE


@real_data
def test_modified_copy_fails_verification(tmp_path: Path) -> None:
    """A copy with one changed cell raises DatasetChecksumError naming --no-verify."""
    text = UCI_PATH.read_bytes()
    modified = tmp_path / UCI_FILE
    modified.write_bytes(text.replace(b"M14860,M,298.1", b"M14860,M,298.2", 1))
    assert modified.read_bytes() != text
    with pytest.raises(DatasetChecksumError, match="--no-verify"):
        load(modified)


@real_data
def test_modified_copy_loads_without_verification(tmp_path: Path) -> None:
    """With verify=False the modified copy loads and is marked unverified."""
    modified = tmp_path / UCI_FILE
    modified.write_bytes(UCI_PATH.read_bytes().replace(b"M14860,M,298.1", b"M14860,M,298.2", 1))
    loaded = load(modified, verify=False)
    assert (loaded.layout, loaded.verified, len(loaded.frame)) == ("uci", False, 10_000)
    assert loaded.frame["air_temperature_k"].iloc[0] == 298.2
