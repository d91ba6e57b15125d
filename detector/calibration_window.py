"""Live calibration windows: a machine's first N readings, kept to fit its own model.

The window lives in the machine's keyed state (``MachineRecord.calibration``, a JSON-able
dict: ``channels``, ``rows``, ``needed``), so it is checkpointed and restored with the rest of
the record: a ``kill -9`` during calibration loses no counted reading. The engine (pure)
fills it and, once full, asks for a fit (``FitRequest``); the shell runs ``fit`` off its loop,
saves the artifact as the machine's own model and binds it (``Engine.bind``).

Thresholds for small windows: ``fit`` calls ``model.generic.fit_columns``, which scores every
window reading out of sample (5 contiguous blocks in time, each scored by a model fitted on
the blocks before it, forward in time as the model will be used; the first block by one
fitted on the others) and sets the threshold at the larger of the conformal quantile
``ceil((n + 1)(1 - r))`` and a generalised-Pareto tail fit over the top 10 % of those scores
(``model.calibration``): with n = 200 readings and r = 1 % the conformal rank is the 2nd
largest score, and the tail fit extrapolates beyond the few values a short window has.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import numpy as np

from factorywatch.errors import FactorywatchError
from factorywatch.model.asset import CalibrateSpec
from factorywatch.model.generic import Trained, fit_columns


@dataclass(frozen=True, slots=True)
class FitRequest:
    """A full calibration window: fit ``machine``'s model on ``rows`` (one per reading)."""

    machine: str
    line: str
    channels: tuple[str, ...]
    rows: tuple[tuple[float, ...], ...]
    spec: CalibrateSpec


def new_window(channels: list[str], needed: int) -> dict[str, Any]:
    """An empty calibration window over ``channels`` (as stored in the machine's record)."""
    return {"channels": channels, "rows": [], "needed": needed}


def request(machine: str, line: str, window: dict[str, Any], spec: CalibrateSpec) -> FitRequest:
    """The fit request for a full window."""
    return FitRequest(
        machine=machine,
        line=line,
        channels=tuple(window["channels"]),
        rows=tuple(tuple(float(v) for v in row) for row in window["rows"]),
        spec=spec,
    )


def fit(req: FitRequest, *, seed: int = 0) -> Trained:
    """Fit the machine's model on its window (CPU-bound: the shell runs it off the loop)."""
    matrix = np.asarray(req.rows, dtype=np.float64).reshape(len(req.rows), len(req.channels))
    columns = {c: matrix[:, i].copy() for i, c in enumerate(req.channels)}
    return fit_columns(columns, req.spec.fit_spec(seed=seed), name=req.machine)


def check_fittable(spec: CalibrateSpec | None) -> None:
    """Fail at start-up when the configured family cannot be fitted here.

    The Isolation Forest is fitted by scikit-learn (the ``train`` extra), which the detector
    image does not carry: rather than silently fitting another family, say what to do.
    """
    if spec is None or spec.family != "iforest" or find_spec("sklearn") is not None:
        return
    raise FactorywatchError(
        "calibrate.family is iforest, which needs scikit-learn to fit: install "
        "'factorywatch[train]' where the detector runs, or set `family: pca` "
        "(numpy only) in the asset config's calibrate section"
    )
