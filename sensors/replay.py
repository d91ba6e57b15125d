"""Replay: the rows of a CSV (AI4I layout, or any machine's channels) as one machine's readings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Final

import pandas as pd

from factorywatch.contracts import AI4I_CHANNELS, PRODUCT_TYPE, AnomalyKind, Telemetry
from factorywatch.model.dataset import FAILURE_MODES

# A labelled failure mode maps to the simulator's anomaly kind of the same mechanism.
_MODE_TO_KIND: Final[dict[str, AnomalyKind]] = {
    "HDF": "heat_dissipation",
    "PWF": "power",
    "OSF": "overstrain",
    "TWF": "tool_wear",
}


def row_reading(row: pd.Series, machine_id: str, line: str, seq: int, ts: float) -> Telemetry:
    """One canonical dataset row as a reading; a labelled failure mode becomes ground truth."""
    modes = [m for m in FAILURE_MODES if m in _MODE_TO_KIND and int(row[m]) == 1]
    return Telemetry(
        machine_id=machine_id,
        line=line,
        seq=seq,
        ts=ts,
        attributes={PRODUCT_TYPE: str(row["product_type"])},
        readings={ch: float(row[ch]) for ch in AI4I_CHANNELS},
        injected=_MODE_TO_KIND[modes[0]] if modes else None,
    )


def replayer(
    frame: pd.DataFrame, machine_id: str, line: str, *, seq_start: int = 0
) -> Callable[[float], Telemetry | None]:
    """A stream for ``sensors.publisher.run``: the next row at each call, then ``None``."""
    rows = frame.iterrows()
    seq = seq_start

    def next_reading(ts: float) -> Telemetry | None:
        nonlocal seq
        try:
            _, row = next(rows)
        except StopIteration:
            return None
        reading = row_reading(row, machine_id, line, seq, ts)
        seq += 1
        return reading

    return next_reading


def channel_replayer(
    columns: Mapping[str, Sequence[float]], machine_id: str, line: str, *, seq_start: int = 0
) -> Callable[[float], Telemetry | None]:
    """A stream of any machine's rows (``{channel: values}``) as version 2 readings."""
    names = list(columns)
    rows = len(columns[names[0]]) if names else 0
    position = 0

    def next_reading(ts: float) -> Telemetry | None:
        nonlocal position
        if position >= rows:
            return None
        reading = Telemetry(
            machine_id=machine_id,
            line=line,
            seq=seq_start + position,
            ts=ts,
            readings={name: float(columns[name][position]) for name in names},
        )
        position += 1
        return reading

    return next_reading
