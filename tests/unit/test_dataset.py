"""The AI4I dataset loader on small CSVs written here: both layouts, --no-verify, bad CSVs fail
clearly, locating the file (the real files: tests/integration/test_dataset_ai4i.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from factorywatch.broker import free_port
from factorywatch.contracts import AI4I_CHANNELS
from factorywatch.errors import DatasetChecksumError, DatasetError
from factorywatch.model import dataset
from factorywatch.model.dataset import (
    KAGGLE_FILE,
    LABEL,
    UCI_FILE,
    load,
    locate,
    obtain,
)

UCI_HEADER = (
    "UDI,Product ID,Type,Air temperature [K],Process temperature [K],Rotational speed [rpm],"
    "Torque [Nm],Tool wear [min],Machine failure,TWF,HDF,PWF,OSF,RNF"
)
UCI_ROWS = [
    "1,M14860,M,298.1,308.6,1551,42.8,0,0,0,0,0,0,0",
    "2,L47181,L,298.2,308.7,1408,46.3,3,0,0,0,0,0,0",
    "3,L47182,L,298.1,308.5,1498,49.4,5,1,0,0,0,1,0",
    "4,H29424,H,298.2,308.6,1433,39.5,7,0,0,0,0,0,0",
]


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    """Write a small CSV file and return its path."""
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def with_cell(row: str, index: int, value: str) -> str:
    """``row`` with its ``index``-th cell replaced by ``value``."""
    cells = row.split(",")
    cells[index] = value
    return ",".join(cells)


def test_small_uci_csv_loads_without_verification(tmp_path: Path) -> None:
    """A small CSV in the UCI layout loads with verify=False (the --no-verify path)."""
    path = write_csv(tmp_path / "mine.csv", UCI_HEADER, UCI_ROWS)
    with pytest.raises(DatasetChecksumError):
        load(path)
    loaded = load(path, verify=False)
    assert (loaded.layout, loaded.verified, loaded.path) == ("uci", False, path)
    assert loaded.frame["product_type"].tolist() == ["M", "L", "L", "H"]
    assert loaded.frame[LABEL].tolist() == [0, 0, 1, 0]
    assert loaded.frame["OSF"].tolist() == [0, 0, 1, 0]
    assert loaded.frame["torque_nm"].tolist() == [42.8, 46.3, 49.4, 39.5]


def test_small_kaggle_csv_loads_without_verification(tmp_path: Path) -> None:
    """A small CSV in the Kaggle layout maps 'Failure Type' text onto the mode columns."""
    header = UCI_HEADER.split(",Machine failure", maxsplit=1)[0] + ",Target,Failure Type"
    rows = [
        "1,M14860,M,298.1,308.6,1551,42.8,0,0,No Failure",
        "2,L47181,L,298.2,308.7,1408,46.3,3,1,Power Failure",
        "3,L47182,L,298.1,308.5,1498,49.4,5,0,Random Failures",
    ]
    loaded = load(write_csv(tmp_path / "k.csv", header, rows), verify=False)
    assert loaded.layout == "kaggle"
    assert loaded.frame[LABEL].tolist() == [0, 1, 0]
    assert loaded.frame["PWF"].tolist() == [0, 1, 0]
    assert loaded.frame["RNF"].tolist() == [0, 0, 1]


# -- bad CSVs --------------------------------------------------------------------------------


def test_missing_columns_are_named(tmp_path: Path) -> None:
    """A CSV without a sensor column raises DatasetError naming that column."""
    header = UCI_HEADER.replace("Torque [Nm]", "Torque")
    path = write_csv(tmp_path / "bad.csv", header, UCI_ROWS)
    with pytest.raises(DatasetError, match=r"lacks columns \['Torque \[Nm\]'\]"):
        load(path, verify=False)


def test_missing_label_columns_are_explained(tmp_path: Path) -> None:
    """A CSV with sensor columns but no label columns raises DatasetError naming both layouts."""
    header = UCI_HEADER.split(",Machine failure", maxsplit=1)[0]
    rows = [row.rsplit(",", 6)[0] for row in UCI_ROWS]
    path = write_csv(tmp_path / "nolabel.csv", header, rows)
    with pytest.raises(DatasetError, match=r"Machine failure.*Target"):
        load(path, verify=False)


def test_unknown_product_types_are_named(tmp_path: Path) -> None:
    """A product type other than L/M/H raises DatasetError naming it."""
    rows = [*UCI_ROWS, with_cell(UCI_ROWS[0], 2, "X")]
    with pytest.raises(DatasetError, match=r"unknown product types \['X'\]"):
        load(write_csv(tmp_path / "types.csv", UCI_HEADER, rows), verify=False)


@pytest.mark.parametrize("index", [3, 4, 5, 6, 7], ids=list(AI4I_CHANNELS))
def test_empty_sensor_cells_are_rejected(tmp_path: Path, index: int) -> None:
    """An empty sensor cell raises DatasetError saying values are empty."""
    rows = [UCI_ROWS[0], with_cell(UCI_ROWS[1], index, "")]
    with pytest.raises(DatasetError, match="empty or non-finite"):
        load(write_csv(tmp_path / "empty.csv", UCI_HEADER, rows), verify=False)


def test_empty_product_type_cell_is_rejected(tmp_path: Path) -> None:
    """An empty Type cell raises DatasetError."""
    rows = [UCI_ROWS[0], with_cell(UCI_ROWS[1], 2, "")]
    with pytest.raises(DatasetError, match="product types"):
        load(write_csv(tmp_path / "empty_type.csv", UCI_HEADER, rows), verify=False)


@pytest.mark.parametrize("index", [8, 9, 13], ids=["Machine failure", "TWF", "RNF"])
def test_empty_label_cells_are_rejected(tmp_path: Path, index: int) -> None:
    """An empty label cell raises DatasetError rather than a pandas error."""
    rows = [UCI_ROWS[0], with_cell(UCI_ROWS[1], index, "")]
    with pytest.raises(DatasetError):
        load(write_csv(tmp_path / "empty_label.csv", UCI_HEADER, rows), verify=False)


def test_non_numeric_sensor_cell_is_rejected(tmp_path: Path) -> None:
    """A non-numeric sensor value raises DatasetError rather than a bare ValueError."""
    rows = [UCI_ROWS[0], with_cell(UCI_ROWS[1], 6, "abc")]
    with pytest.raises(DatasetError):
        load(write_csv(tmp_path / "abc.csv", UCI_HEADER, rows), verify=False)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_sensor_cells_are_rejected(tmp_path: Path, value: str) -> None:
    """inf and nan sensor values raise DatasetError."""
    rows = [UCI_ROWS[0], with_cell(UCI_ROWS[1], 6, value)]
    with pytest.raises(DatasetError, match="non-finite"):
        load(write_csv(tmp_path / "inf.csv", UCI_HEADER, rows), verify=False)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00\x01garbage\n"])
def test_unreadable_files_raise_dataset_error(tmp_path: Path, content: bytes) -> None:
    """An empty or non-UTF-8 file raises DatasetError saying it cannot be read."""
    path = tmp_path / "junk.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match="cannot read"):
        load(path, verify=False)


def test_load_returns_a_pandas_frame(tmp_path: Path) -> None:
    """The loaded frame is a pandas DataFrame with integer labels."""
    loaded = load(write_csv(tmp_path / "mine.csv", UCI_HEADER, UCI_ROWS), verify=False)
    assert isinstance(loaded.frame, pd.DataFrame)
    assert loaded.frame[LABEL].dtype.kind == "i"


# -- locating the file -----------------------------------------------------------------------


def test_locate_prefers_the_explicit_path(tmp_path: Path) -> None:
    """An explicit file wins over a dataset already in data_dir."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_csv(data_dir / KAGGLE_FILE, UCI_HEADER, UCI_ROWS)
    explicit = write_csv(tmp_path / "mine.csv", UCI_HEADER, UCI_ROWS)
    assert locate(explicit, data_dir) == explicit


@pytest.mark.parametrize("name", [KAGGLE_FILE, UCI_FILE])
def test_locate_finds_a_file_in_data_dir(tmp_path: Path, name: str) -> None:
    """Without an explicit path, a dataset file already in data_dir is used."""
    path = write_csv(tmp_path / name, UCI_HEADER, UCI_ROWS)
    assert locate(None, tmp_path) == path


def test_locate_prefers_kaggle_file_when_both_are_present(tmp_path: Path) -> None:
    """With both files in data_dir, the Kaggle file is chosen (the download's name)."""
    write_csv(tmp_path / UCI_FILE, UCI_HEADER, UCI_ROWS)
    kaggle = write_csv(tmp_path / KAGGLE_FILE, UCI_HEADER, UCI_ROWS)
    assert locate(None, tmp_path) == kaggle


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_locate_rejects_a_bad_explicit_path(tmp_path: Path, kind: str) -> None:
    """A nonexistent explicit path (or a directory) raises DatasetError mentioning --dataset."""
    explicit = tmp_path / "nope.csv"
    if kind == "directory":
        explicit.mkdir()
    write_csv(tmp_path / UCI_FILE, UCI_HEADER, UCI_ROWS)  # must not be used as a fallback
    with pytest.raises(DatasetError, match="--dataset"):
        locate(explicit, tmp_path)


def test_obtain_locates_and_loads(tmp_path: Path) -> None:
    """obtain() loads the located file and reports progress."""
    messages: list[str] = []
    path = write_csv(tmp_path / "mine.csv", UCI_HEADER, UCI_ROWS)
    loaded = obtain(path, tmp_path, verify=False, progress=messages.append)
    assert len(loaded.frame) == 4
    assert any(str(path) in m for m in messages)


@pytest.mark.timeout(60)
def test_offline_download_fails_with_guidance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline with an empty data_dir, the real kagglehub fails and we explain the way out."""
    # Offline whatever this machine can reach: every HTTP(S) request goes to a proxy on a
    # loopback port where nothing listens, so the connection is refused at once.
    closed = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(name, closed)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    # Keep kagglehub away from the user's cache and credentials; our code runs unpatched.
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub-cache"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    started = time.monotonic()
    with pytest.raises(DatasetError) as info:
        locate(None, data_dir)
    assert time.monotonic() - started < 20.0
    message = str(info.value)
    assert "--dataset" in message
    assert "FACTORYWATCH_DATASET" in message
    assert list(data_dir.iterdir()) == []


def test_offline_without_a_copy_the_error_names_both_remedies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No CSV in the data folder and no network: the error says to copy it there (what the
    README says for an offline machine) or to pass a copy, and why the download failed."""

    def offline(_data_dir: Path, _progress: object) -> Path:
        raise ConnectionError("Failed to resolve 'api.kaggle.com'")

    monkeypatch.setattr(dataset, "_download", offline)
    with pytest.raises(DatasetError) as raised:
        locate(None, tmp_path / "data")
    message = str(raised.value)
    assert f"into {tmp_path / 'data'}/" in message
    assert "ai4i2020.csv" in message
    assert "--dataset PATH" in message
    assert "api.kaggle.com" in message
