"""Recordings: any machine's CSV (or a folder of them) as named channels, ready to train on.

* The separator is detected (``csv.Sniffer`` over the first 64 KiB; ``,`` ``;`` tab ``|``).
* Column names are mapped to channel names with ``factorywatch.channels`` (collisions fail).
* Channels: ``--channels`` (raw or mapped names), else every numeric column except the time,
  machine and label columns, columns whose name says they are labels (``anomaly``,
  ``changepoint``, ``label``, ``target``, ...) and strictly increasing columns (a row index
  or a running counter, always beyond training): those are listed as excluded, never used.
* Missing values (empty cells, NaN; also what different sampling rates leave between
  readings): ``missing="error"`` (default) fails naming the columns and counts,
  ``"ffill"`` carries the last value forward (rows before a channel's first value are
  dropped), ``"drop"`` drops incomplete rows. Non-numeric cells fail naming the column.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # pandas is the `train` extra's: imported where a CSV is read
    import pandas as pd

from factorywatch.channels import ChannelNameError, canonical, map_names
from factorywatch.errors import DatasetError

FloatArray = npt.NDArray[np.float64]
Missing = Literal["error", "ffill", "drop"]
LABEL_LIKE: Final = frozenset(
    {
        "anomaly",
        "anomalies",
        "is_anomaly",
        "changepoint",
        "change_point",
        "label",
        "labels",
        "target",
        "attack",
        "fault",
        "failure",
        "machine_failure",
        "outlier",
        "class",
    }
)
_SNIFF_BYTES: Final = 64 * 1024


@dataclass
class Recording:
    """One CSV as aligned channel columns (+ optional time, machine and label columns)."""

    path: Path
    sha256: str
    channels: list[str]
    columns: dict[str, FloatArray]
    time: npt.NDArray[np.datetime64] | FloatArray | None = None
    machines: list[str] | None = None
    labels: npt.NDArray[np.int_] | None = None
    renamed: dict[str, str] = field(default_factory=dict)  # raw -> channel, where different
    excluded: list[str] = field(default_factory=list)
    #: the run's name in reports and as a replayed machine (default: the file's stem; for a
    #: folder of runs, its path inside the folder, so ``valve1/1.csv`` and ``valve2/1.csv``
    #: stay two runs)
    run: str | None = None

    @property
    def name(self) -> str:
        """The run's name (``run``, else the file's stem)."""
        return self.run or self.path.stem

    @property
    def rows(self) -> int:
        """Number of readings."""
        return len(next(iter(self.columns.values())))


def sniff_separator(path: Path) -> str:
    """The CSV's field separator, detected from its first bytes."""
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
        sample = fh.read(_SNIFF_BYTES)
    if not sample.strip():
        raise DatasetError(f"{path}: empty file")
    head = sample.splitlines()[0]
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        counts = {sep: head.count(sep) for sep in ",;\t|"}
        return max(counts, key=lambda sep: counts[sep])


def has_column(path: Path, name: str) -> bool:
    """Whether the CSV's header names the column ``name`` (raw or mapped)."""
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
        header = next(csv.reader(fh, delimiter=sniff_separator(path)), [])
    try:
        _resolve(name, map_names(h.strip() for h in header), "column", path)
    except (DatasetError, ChannelNameError):
        return False
    return True


def _resolve(name: str, mapping: dict[str, str], what: str, path: Path) -> str:
    """A user-given column name (raw or mapped) -> the raw column name in the file."""
    if name in mapping:
        return name
    try:
        wanted = canonical(name)
    except ChannelNameError as exc:
        raise DatasetError(f"{what} {name!r}: {exc}") from None
    for raw, mapped in mapping.items():
        if mapped == wanted:
            return raw
    raise DatasetError(f"{path}: no {what} {name!r}; columns are {list(mapping)}")


def load_recording(  # noqa: PLR0912 - one branch per documented rule
    path: Path,
    *,
    channels: Sequence[str] | None = None,
    time_column: str | None = None,
    machine_column: str | None = None,
    label_column: str | None = None,
    missing: Missing = "error",
) -> Recording:
    """Read one CSV as a ``Recording`` (see the module docstring for the rules)."""
    import pandas as pd  # noqa: PLC0415

    if not path.is_file():
        raise DatasetError(f"{path} is not a file")
    sep = sniff_separator(path)
    try:
        raw = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path} as CSV (separator {sep!r}): {exc}") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    try:
        mapping = map_names(raw.columns)
    except ChannelNameError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    special = {
        "time column": time_column,
        "machine column": machine_column,
        "label column": label_column,
    }
    resolved = {k: _resolve(v, mapping, k, path) for k, v in special.items() if v}
    if channels:
        chosen = [_resolve(c, mapping, "channel", path) for c in channels]
        excluded: list[str] = []
    else:
        others = [c for c in raw.columns if c not in resolved.values()]
        numeric = [c for c in others if pd.api.types.is_numeric_dtype(raw[c])]
        excluded = [c for c in numeric if mapping[c] in LABEL_LIKE or _is_counter(raw[c])]
        excluded += [c for c in others if c not in numeric]
        chosen = [c for c in numeric if c not in excluded]
        if not chosen:
            raise DatasetError(f"{path}: no numeric channel columns; name them with --channels")
    frame = raw[chosen].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in chosen if frame[c].isna().sum() > raw[c].isna().sum()]
    if bad:
        raise DatasetError(f"{path}: non-numeric values in channel columns {bad}")
    keep = _missing_rows(frame, missing, path)
    raw, frame = raw.loc[keep].reset_index(drop=True), frame.loc[keep].reset_index(drop=True)
    if missing == "ffill":
        frame = frame.ffill()
    if len(frame) == 0:
        raise DatasetError(f"{path}: no complete data rows")
    values = frame.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise DatasetError(f"{path}: infinite values in channel columns")
    rec = Recording(
        path=path,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        channels=[mapping[c] for c in chosen],
        columns={mapping[c]: values[:, i].copy() for i, c in enumerate(chosen)},
        renamed={c: mapping[c] for c in chosen if mapping[c] != c},
        excluded=excluded,
    )
    if "time column" in resolved:
        rec.time = _parse_time(raw[resolved["time column"]], path)
    if "machine column" in resolved:
        rec.machines = [str(m) for m in raw[resolved["machine column"]].tolist()]
    if "label column" in resolved:
        rec.labels = _labels(raw[resolved["label column"]], path)
    return rec


def _is_counter(column: pd.Series) -> bool:
    """A strictly increasing column (a row index, a running counter): never a channel.

    Every later value would lie outside anything seen in training.
    """
    import pandas as pd  # noqa: PLC0415

    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    return len(values) > 2 and bool(np.all(np.diff(values) > 0))


def _missing_rows(frame: pd.DataFrame, missing: Missing, path: Path) -> pd.Series:
    """Which rows to keep under the ``missing`` policy."""
    import pandas as pd  # noqa: PLC0415

    holes = frame.isna()
    if not holes.to_numpy().any():
        return pd.Series(True, index=frame.index)
    if missing == "error":
        counts = {c: int(n) for c, n in holes.sum().items() if n}
        raise DatasetError(
            f"{path}: missing values in {counts}; pass --missing ffill (carry the last value "
            "forward, e.g. channels sampled at different rates) or --missing drop"
        )
    if missing == "drop":
        return ~holes.any(axis=1)
    return frame.ffill().notna().all(axis=1)


def _parse_time(column: pd.Series, path: Path) -> npt.NDArray[np.datetime64] | FloatArray:
    import pandas as pd  # noqa: PLC0415

    if pd.api.types.is_numeric_dtype(column):
        return column.to_numpy(dtype=np.float64)
    try:
        return pd.to_datetime(column).to_numpy()
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: time column is neither numbers nor dates ({exc})") from None


def _labels(column: pd.Series, path: Path) -> npt.NDArray[np.int_]:
    import pandas as pd  # noqa: PLC0415

    values = pd.to_numeric(column, errors="coerce")
    if values.isna().any():
        raise DatasetError(f"{path}: label column must hold numbers (0 = normal) in every row")
    labels: npt.NDArray[np.int_] = (values.to_numpy() != 0).astype(np.int_)
    return labels


def train_mask(
    rec: Recording, *, train_rows: int | None = None, train_until: str | None = None
) -> npt.NDArray[np.bool_]:
    """Rows to train on: each machine's first ``train_rows``, or those before ``train_until``.

    Neither given: every row (train on a whole anomaly-free recording).
    """
    import pandas as pd  # noqa: PLC0415

    n = rec.rows
    if train_rows is not None and train_until is not None:
        raise DatasetError("give --train-rows or --train-until, not both")
    if train_until is not None:
        if rec.time is None:
            raise DatasetError("--train-until needs --time-column")
        times: Any = rec.time
        try:
            if np.issubdtype(times.dtype, np.datetime64):
                return np.asarray(times < pd.Timestamp(train_until).to_datetime64(), np.bool_)
            return np.asarray(times < float(train_until), dtype=np.bool_)
        except ValueError as exc:
            raise DatasetError(f"--train-until {train_until!r}: {exc}") from None
    if train_rows is None:
        return np.ones(n, dtype=np.bool_)
    if train_rows <= 0:
        raise DatasetError("--train-rows must be positive")
    mask = np.zeros(n, dtype=np.bool_)
    if rec.machines is None:
        mask[:train_rows] = True
        return mask
    seen: dict[str, int] = {}
    for i, m in enumerate(rec.machines):
        seen[m] = seen.get(m, 0) + 1
        mask[i] = seen[m] <= train_rows
    return mask
