"""The AI4I 2020 dataset: find it locally or download it with kagglehub, verify, load.

Lookup order: an explicit file (``--dataset`` / ``FACTORYWATCH_DATASET``), then a dataset
file already in ``data/``, then a kagglehub download copied into ``data/``. Both the Kaggle
layout (``Target``, ``Failure Type``) and the UCI ``ai4i2020.csv`` layout load into one
canonical frame.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import pandas as pd

from factorywatch.contracts import (
    AI4I_CHANNELS,
    AIR_TEMPERATURE,
    PROCESS_TEMPERATURE,
    ROTATIONAL_SPEED,
    TOOL_WEAR,
    TORQUE,
)
from factorywatch.errors import DatasetChecksumError, DatasetError
from factorywatch.model.features import PRODUCT_TYPE_COLUMN, type_codes

KAGGLE_HANDLE: Final = "shivamb/machine-predictive-maintenance-classification"
KAGGLE_FILE: Final = "predictive_maintenance.csv"
UCI_FILE: Final = "ai4i2020.csv"
KNOWN_SHA256: Final = {
    "dc6630cd9b1f0f853922fad78a1b6436570d3f1ec863f1dd5c4340ac56bc8a8e": UCI_FILE,
    "b791968b805d7aba358301032af66003372b01eaaf4dfedd30c69bd65dd38620": KAGGLE_FILE,
}
FAILURE_MODES: Final = ("TWF", "HDF", "PWF", "OSF", "RNF")
LABEL: Final = "machine_failure"

_SOURCE_COLUMNS: Final = {
    "Type": "product_type",
    "Air temperature [K]": AIR_TEMPERATURE,
    "Process temperature [K]": PROCESS_TEMPERATURE,
    "Rotational speed [rpm]": ROTATIONAL_SPEED,
    "Torque [Nm]": TORQUE,
    "Tool wear [min]": TOOL_WEAR,
}
_KAGGLE_MODES: Final = {
    "Tool Wear Failure": "TWF",
    "Heat Dissipation Failure": "HDF",
    "Power Failure": "PWF",
    "Overstrain Failure": "OSF",
    "Random Failures": "RNF",
}

Layout = Literal["uci", "kaggle"]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset in canonical form."""

    frame: pd.DataFrame  # product_type, channels, machine_failure, TWF..RNF
    path: Path
    sha256: str
    layout: Layout
    verified: bool

    def columns(self) -> dict[str, np.ndarray]:
        """Channel columns (plus the product-type code) for ``compute_features``."""
        cols = {ch: self.frame[ch].to_numpy(dtype=np.float64) for ch in AI4I_CHANNELS}
        cols[PRODUCT_TYPE_COLUMN] = type_codes(self.frame["product_type"].tolist())
        return cols


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def _no_progress(_: str) -> None:
    return None


def _download(data_dir: Path, progress: Progress) -> Path:
    """Download the Kaggle dataset with kagglehub and copy its CSV into ``data_dir``."""
    import kagglehub  # noqa: PLC0415 - heavy import, only needed on first use

    progress(f"downloading {KAGGLE_HANDLE} with kagglehub")
    downloaded = Path(kagglehub.dataset_download(KAGGLE_HANDLE))
    source = downloaded / KAGGLE_FILE if downloaded.is_dir() else downloaded
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / KAGGLE_FILE
    shutil.copyfile(source, target)
    progress(f"saved {target}")
    return target


def locate(explicit: Path | None, data_dir: Path, *, progress: Progress = _no_progress) -> Path:
    """Return the dataset file to use, downloading it on first use."""
    if explicit is not None:
        if not explicit.is_file():
            raise DatasetError(f"dataset file {explicit} does not exist (--dataset)")
        return explicit
    for name in (KAGGLE_FILE, UCI_FILE):
        if (data_dir / name).is_file():
            return data_dir / name
    try:
        return _download(data_dir, progress)
    except Exception as exc:  # kagglehub raises many types: network, auth, HTTP
        raise DatasetError(
            f"no dataset in {data_dir} and the kagglehub download of {KAGGLE_HANDLE} failed "
            f"({type(exc).__name__}: {exc}). Offline? Copy {KAGGLE_FILE} or {UCI_FILE} "
            f"into {data_dir}/, or pass a local copy with --dataset PATH or "
            "FACTORYWATCH_DATASET=PATH."
        ) from exc


def load(path: Path, *, verify: bool = True) -> Dataset:
    """Load either CSV layout into canonical form; ``verify`` requires a known sha256."""
    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    digest = sha256_of(path)
    known = digest in KNOWN_SHA256
    if verify and not known:
        raise DatasetChecksumError(
            f"{path} has sha256 {digest}, which matches no known AI4I release "
            "(pass --no-verify to train on your own data in the same layout)"
        )
    try:
        raw = pd.read_csv(path, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path} as CSV: {exc}") from exc
    missing = [c for c in _SOURCE_COLUMNS if c not in raw.columns]
    if missing:
        raise DatasetError(f"{path} lacks columns {missing}: not an AI4I layout")
    frame = raw[list(_SOURCE_COLUMNS)].rename(columns=_SOURCE_COLUMNS)
    try:
        layout = _add_labels(frame, raw, path)
    except (ValueError, TypeError) as exc:  # empty or non-integer label cells
        raise DatasetError(f"{path}: label columns must hold 0/1 in every row ({exc})") from exc
    bad_types = set(frame["product_type"].unique()) - {"L", "M", "H"}
    if bad_types:
        raise DatasetError(f"{path}: unknown product types {sorted(bad_types)}")
    try:
        numeric = frame[list(AI4I_CHANNELS)].to_numpy(dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: non-numeric sensor values ({exc})") from exc
    if not np.isfinite(numeric).all():
        raise DatasetError(f"{path}: empty or non-finite sensor values")
    if len(frame) == 0:
        raise DatasetError(f"{path}: no data rows")
    return Dataset(frame=frame, path=path, sha256=digest, layout=layout, verified=known)


def _add_labels(frame: pd.DataFrame, raw: pd.DataFrame, path: Path) -> Layout:
    """Add ``machine_failure`` and the five mode columns from either layout."""
    layout: Layout
    if "Machine failure" in raw.columns and all(m in raw.columns for m in FAILURE_MODES):
        layout = "uci"
        frame[LABEL] = raw["Machine failure"].astype(int)
        for mode in FAILURE_MODES:
            frame[mode] = raw[mode].astype(int)
    elif "Target" in raw.columns and "Failure Type" in raw.columns:
        layout = "kaggle"
        frame[LABEL] = raw["Target"].astype(int)
        for mode in FAILURE_MODES:
            frame[mode] = 0
        for text, mode in _KAGGLE_MODES.items():
            frame.loc[raw["Failure Type"] == text, mode] = 1
    else:
        raise DatasetError(
            f"{path} has neither 'Machine failure'+TWF..RNF (UCI) nor 'Target'+'Failure Type' "
            "(Kaggle) label columns"
        )
    return layout


def obtain(
    explicit: Path | None,
    data_dir: Path,
    *,
    verify: bool = True,
    progress: Progress = _no_progress,
) -> Dataset:
    """Locate (downloading on first use) and load the dataset."""
    path = locate(explicit, data_dir, progress=progress)
    progress(f"loading {path}")
    return load(path, verify=verify)
