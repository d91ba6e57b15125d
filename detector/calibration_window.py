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
from functools import cache
from importlib.util import find_spec
from typing import Any

import numpy as np

from factorywatch.errors import FactorywatchError
from factorywatch.model.asset import CalibrateSpec
from factorywatch.model.fitspec import FitSpec
from factorywatch.model.generic import Trained, fit_columns


@dataclass(frozen=True, slots=True)
class FitRequest:
    """A full calibration window: fit ``machine``'s model on ``rows`` (one per reading) as
    ``spec`` says (a calibrating machine's: ``CalibrateSpec.fit_spec``; a re-baselining
    one's: its card's, ``model.rebaseline.spec_of``)."""

    machine: str
    line: str
    channels: tuple[str, ...]
    rows: tuple[tuple[float, ...], ...]
    spec: FitSpec
    #: the model version a re-baselining machine leaves (None: a first calibration)
    leaving: str | None = None


def new_window(channels: list[str], needed: int) -> dict[str, Any]:
    """An empty calibration window over ``channels`` (as stored in the machine's record)."""
    return {"channels": channels, "rows": [], "needed": needed}


def new_rebaseline(channels: list[str], needed: int, leaving: str, spec: FitSpec) -> dict[str, Any]:
    """An empty re-baselining window (``model.rebaseline``): it names the model version the
    machine leaves and the ``FitSpec`` its next model is fitted with."""
    return {**new_window(channels, needed), "rebaseline": leaving, "fit": spec.as_dict()}


def rebaselining(window: dict[str, Any] | None) -> bool:
    """Whether ``window`` is a re-baselining window (else a first calibration, or none)."""
    return window is not None and "rebaseline" in window


def request(machine: str, line: str, window: dict[str, Any], spec: FitSpec) -> FitRequest:
    """The fit request for a full window."""
    return FitRequest(
        machine=machine,
        line=line,
        channels=tuple(window["channels"]),
        rows=tuple(tuple(float(v) for v in row) for row in window["rows"]),
        spec=spec,
        leaving=window.get("rebaseline"),
    )


def fit(req: FitRequest) -> Trained:
    """Fit the machine's model on its window (CPU-bound: the shell runs it off the loop)."""
    matrix = np.asarray(req.rows, dtype=np.float64).reshape(len(req.rows), len(req.channels))
    columns = {c: matrix[:, i].copy() for i, c in enumerate(req.channels)}
    return fit_columns(columns, req.spec, name=req.machine)


@cache
def can_fit(family: str) -> bool:
    """Whether a model of ``family`` can be fitted here: the Isolation Forest needs
    scikit-learn (the ``train`` extra)."""
    return family != "iforest" or find_spec("sklearn") is not None


def check_fittable(spec: CalibrateSpec | None) -> None:
    """Fail at start-up when the configured family cannot be fitted here.

    The Isolation Forest is fitted by scikit-learn (the ``train`` extra), which the detector
    image does not carry: rather than silently fitting another family, say what to do.
    """
    if spec is None or can_fit(spec.family):
        return
    raise FactorywatchError(
        "calibrate.family is iforest, which needs scikit-learn to fit: install "
        "'factorywatch[train]' where the detector runs, or set `family: pca` "
        "(numpy only) in the asset config's calibrate section"
    )
