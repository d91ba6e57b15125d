"""The training envelope: the range of every quantity the model has seen (pure).

An Isolation Forest cannot tell "far outside anything in training" from "at the edge of
training": a value beyond the last split of every tree lands in the same leaf as the most
extreme training reading, so a process temperature 8 K above anything seen scores like an
ordinary warm reading. The envelope covers that blind spot: the range of each channel over
the training rows, and of the process-air temperature difference (physically about 10 K,
so a drifting temperature sensor leaves it long before the temperature leaves its own
range), widened by ``MARGIN`` of its width on both sides. A reading outside it is an ALERT
whatever its score, and the verdict names the quantities (``outside_training``). By
construction no training reading is outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, model_validator

from factorywatch.model.features import DERIVED, Columns

MARGIN: Final = 0.10
# Derived quantities watched too, when the model has their input channels.
WATCHED_DERIVED: Final = ("temp_diff_k",)

FloatArray = npt.NDArray[np.float64]


class Envelope(BaseModel):
    """Per channel, the lowest and highest value that is inside."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: list[str]  # channels, and derived quantities from model.features.DERIVED
    low: list[float]
    high: list[float]

    @model_validator(mode="after")
    def _same_lengths(self) -> Envelope:
        if not len(self.channels) == len(self.low) == len(self.high):
            raise ValueError("envelope needs one low and one high per channel")
        return self

    def outside(self, columns: Columns, rows: int) -> list[list[str] | None]:
        """Per row, the quantities outside the envelope (``None`` when all are inside).

        NaN is never outside (the schema refuses non-finite readings before this).
        """
        out: list[list[str] | None] = [None] * rows
        if not self.channels or not rows:
            return out
        if rows == 1:  # a batch of one (low rates): the same comparisons, on Python floats
            names = []
            for name, low, high in zip(self.channels, self.low, self.high, strict=True):
                value = float(_values(columns, name)[0])
                if value < low or value > high:
                    names.append(name)
            out[0] = names or None
            return out
        values = np.column_stack([_values(columns, name) for name in self.channels])
        beyond = (values < np.asarray(self.low)) | (values > np.asarray(self.high))
        for row in np.flatnonzero(beyond.any(axis=1)).tolist():
            out[row] = [self.channels[j] for j in np.flatnonzero(beyond[row]).tolist()]
        return out


def outside_parts(
    envelopes: Sequence[Envelope], counts: Sequence[int], columns: Columns
) -> list[list[str] | None]:
    """``Envelope.outside`` of consecutive parts at once: ``counts[i]`` rows of ``columns``
    judged by ``envelopes[i]``; every envelope must watch the same channels."""
    rows = sum(counts)
    out: list[list[str] | None] = [None] * rows
    names = envelopes[0].channels if envelopes else []
    if any(e.channels != names for e in envelopes):
        raise ValueError("outside_parts needs envelopes over the same channels")
    if not names or not rows:
        return out
    values = np.column_stack([_values(columns, name) for name in names])
    low = np.repeat(np.asarray([e.low for e in envelopes], dtype=np.float64), counts, axis=0)
    high = np.repeat(np.asarray([e.high for e in envelopes], dtype=np.float64), counts, axis=0)
    beyond = (values < low) | (values > high)
    for row in np.flatnonzero(beyond.any(axis=1)).tolist():
        out[row] = [names[j] for j in np.flatnonzero(beyond[row]).tolist()]
    return out


def _values(columns: Columns, name: str) -> FloatArray:
    if name in columns:
        return np.asarray(columns[name], dtype=np.float64)
    # a derived quantity of two finite extremes may overflow to +-inf: outside, as it should be
    with np.errstate(over="ignore"):
        return DERIVED[name][0](columns)


def watched(channels: Sequence[str]) -> list[str]:
    """What an envelope over ``channels`` covers: them, and the derived quantities they allow."""
    derived = [d for d in WATCHED_DERIVED if set(DERIVED[d][1]) <= set(channels)]
    return [*channels, *derived]


def fit_envelope(columns: Columns, channels: Sequence[str], margin: float = MARGIN) -> Envelope:
    """The envelope of ``channels`` (and what ``watched`` adds) over the training columns."""
    names = watched(channels)
    low, high = [], []
    for name in names:
        values = _values(columns, name)
        lo, hi = float(np.min(values)), float(np.max(values))
        width = hi - lo
        low.append(lo - margin * width)
        high.append(hi + margin * width)
    return Envelope(channels=names, low=low, high=high)
