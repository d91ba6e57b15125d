"""``FitSpec``: the parameters of fitting a generic model, in one frozen value.

The CLI (``train --csv`` / ``evaluate --csv`` / ``--nab``), the evaluation
(``model.streams``) and live calibration (``detector/calibration_window.py``) all build one and
hand it to ``model.generic.fit_recording`` / ``fit_columns``, so a default or a new
parameter is written once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

from factorywatch.model.calibration import DEFAULT_FAR
from factorywatch.model.families import DEFAULT_FAMILY, FAMILIES
from factorywatch.model.pipeline import SURPRISE_RATE

PRESETS: Final = ("point", "windowed", "full", "drift", "auto")
DEFAULT_PRESET: Final = "auto"
DEFAULT_WINDOW: Final = 5
DEFAULT_SMOOTH: Final = 1
DEFAULT_TREES: Final = 200


@dataclass(frozen=True)
class FitSpec:
    """How to fit: feature preset and window, score smoothing, scorer family, target
    false-alarm rate, forest size and seed, whether the score is the anomaly likelihood,
    whether each machine's threshold follows its normal score level, whether a recent
    score level unusual for the machine is an ALERT (the surprise rule) and whether a machine
    recalibrates after a sustained alarm (re-baselining)."""

    preset: str = DEFAULT_PRESET
    window: int = DEFAULT_WINDOW
    smooth: int = DEFAULT_SMOOTH
    family: str = DEFAULT_FAMILY
    far: float = DEFAULT_FAR
    trees: int = DEFAULT_TREES
    seed: int = 0
    # score = anomaly likelihood of the smoothed scores (``model.pipeline``, step 5)
    likelihood: bool = False
    # each machine's threshold follows its normal score level up (``model.threshold.Follow``)
    follow: bool = True
    # a recent score level rarer than this for the machine is an ALERT (None: no such rule;
    # ``model.pipeline``, step 6)
    surprise: float | None = SURPRISE_RATE
    # a machine whose alarm stays open as long as the model was trained (readings per machine)
    # recalibrates on its next readings: a sustained move is its new operating point
    # (``model.rebaseline``)
    rebaseline: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown feature preset {self.preset!r}; choose from {PRESETS}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown scorer family {self.family!r}; choose from {FAMILIES}")
        if not 0.0 < self.far < 1.0:
            raise ValueError(f"false-alarm rate must be in (0, 1), got {self.far}")
        if self.surprise is not None and not 0.0 < self.surprise < 1.0:
            raise ValueError(f"surprise rate must be in (0, 1), got {self.surprise}")
        if self.window < 1 or self.smooth < 1 or self.trees < 1:
            raise ValueError("window, smooth and trees must be at least 1")

    @property
    def surprise_rate(self) -> float | None:
        """The surprise rule's rate in a fitted model: None without the rule, and when its
        score is already the likelihood."""
        return None if self.likelihood else self.surprise

    def replace(self, **changes: Any) -> FitSpec:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (reports, model cards)."""
        return dataclasses.asdict(self)


DEFAULT_SPEC: Final = FitSpec()
