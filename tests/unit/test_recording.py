"""Reading any machine's CSV (model.recording) and the asset config (model.asset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from factorywatch.errors import DatasetError
from factorywatch.model.asset import apply_asset, load_asset
from factorywatch.model.recording import load_recording, sniff_separator, train_mask

HEADER = ["datetime", "Accelerometer1RMS", "Volume Flow RateRMS", "Pump/Pressure", "anomaly"]


def write(path: Path, rows: list[list[str]], sep: str = ";", header: list[str] = HEADER) -> Path:
    """Write a small CSV with ``sep``."""
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n")
    return path


def rows(n: int) -> list[list[str]]:
    """``n`` plausible rows one second apart."""
    return [
        [f"2026-03-01 08:00:{i:02d}", f"0.2{i % 7}", f"{32 + i % 5}.1", f"1.{i % 3}", "0"]
        for i in range(n)
    ]


@pytest.mark.parametrize("sep", [";", ",", "\t", "|"])
def test_separator_is_detected(tmp_path: Path, sep: str) -> None:
    """Semicolon, comma, tab and pipe separated files all load the same channels."""
    rec = load_recording(write(tmp_path / "run.csv", rows(10), sep), time_column="datetime")
    assert sniff_separator(tmp_path / "run.csv") == sep
    assert rec.channels == ["accelerometer1_rms", "volume_flow_rate_rms", "pump_pressure"]
    assert rec.rows == 10


def test_labels_like_columns_are_never_channels(tmp_path: Path) -> None:
    """Without --channels, a column named like a label (anomaly) is excluded and listed."""
    rec = load_recording(write(tmp_path / "run.csv", rows(5)))
    assert "anomaly" not in rec.channels
    assert "anomaly" in rec.excluded
    assert "datetime" in rec.excluded  # not numeric, not declared as the time column


def test_channels_can_be_named_raw_or_mapped(tmp_path: Path) -> None:
    """--channels accepts the CSV's own names or their channel names."""
    path = write(tmp_path / "run.csv", rows(5))
    a = load_recording(path, channels=["Volume Flow RateRMS", "pump_pressure"])
    assert a.channels == ["volume_flow_rate_rms", "pump_pressure"]
    with pytest.raises(DatasetError, match="no channel 'torque'"):
        load_recording(path, channels=["torque"])


def test_missing_values_fail_clearly_or_follow_the_policy(tmp_path: Path) -> None:
    """Empty cells fail naming the column, unless carried forward or dropped."""
    data = rows(6)
    data[2][2] = ""
    path = write(tmp_path / "run.csv", data)
    with pytest.raises(DatasetError, match="Volume Flow RateRMS"):
        load_recording(path)
    filled = load_recording(path, missing="ffill")
    assert filled.rows == 6
    assert filled.columns["volume_flow_rate_rms"][2] == filled.columns["volume_flow_rate_rms"][1]
    assert load_recording(path, missing="drop").rows == 5


def test_non_numeric_channel_values_are_refused(tmp_path: Path) -> None:
    """A text cell in a named channel column is an error naming the column."""
    data = rows(4)
    data[1][1] = "broken"
    with pytest.raises(DatasetError, match="Accelerometer1RMS"):
        load_recording(write(tmp_path / "run.csv", data), channels=["Accelerometer1RMS"])


def test_colliding_column_names_are_refused(tmp_path: Path) -> None:
    """Two columns mapping to one channel are an error naming both."""
    header = ["Flow Rate", "flow_rate"]
    with pytest.raises(DatasetError, match="'Flow Rate' and 'flow_rate'"):
        load_recording(write(tmp_path / "run.csv", [["1", "2"]], ",", header))


def test_train_mask_by_rows_time_and_machine(tmp_path: Path) -> None:
    """--train-rows takes each machine's first N rows; --train-until the rows before a time."""
    header = ["datetime", "machine", "Current"]
    data = [[f"2026-03-01 08:00:{i:02d}", f"m{i % 2}", str(i % 4)] for i in range(10)]
    path = write(tmp_path / "run.csv", data, ",", header)
    rec = load_recording(path, time_column="datetime", machine_column="machine")
    assert train_mask(rec, train_rows=2).tolist() == [True] * 4 + [False] * 6
    until = train_mask(rec, train_until="2026-03-01 08:00:03")
    assert until.tolist() == [True] * 3 + [False] * 7
    with pytest.raises(DatasetError):
        train_mask(rec, train_rows=2, train_until="2026-03-01")


def test_asset_config_ranges_leave_sensor_errors_out(tmp_path: Path) -> None:
    """Training rows outside an asset's valid range are left out of training."""
    config = tmp_path / "asset.yaml"
    config.write_text(
        "channels:\n  Volume Flow RateRMS: {unit: l/min, min: 0, max: 33}\n  Pump/Pressure:\n"
        "groups:\n  pumps: [pump-1]\n"
    )
    asset = load_asset(config)
    rec = load_recording(write(tmp_path / "run.csv", rows(10)), channels=list(asset.channels))
    kept = apply_asset(asset, rec, np.ones(rec.rows, dtype=np.bool_))
    assert kept.sum() == np.sum(rec.columns["volume_flow_rate_rms"] <= 33)
    assert asset.card_params()["units"] == '{"volume_flow_rate_rms": "l/min"}'


def test_bad_asset_config_is_a_clear_error(tmp_path: Path) -> None:
    """An asset config without channels, or with unknown keys, names the problem."""
    config = tmp_path / "asset.yaml"
    config.write_text("chanels: [a]\n")
    with pytest.raises(DatasetError, match="asset config"):
        load_asset(config)


def test_index_columns_are_not_channels(tmp_path: Path) -> None:
    """A strictly increasing column (row index, counter) is excluded unless named."""
    header = ["UDI", "Current", "Voltage"]
    data = [[str(i + 1), str(1.5 + (i % 3) * 0.1), str(230 - i % 2)] for i in range(8)]
    path = write(tmp_path / "run.csv", data, ",", header)
    rec = load_recording(path)
    assert rec.channels == ["current", "voltage"]
    assert "UDI" in rec.excluded
    assert load_recording(path, channels=["UDI"]).channels == ["udi"]
