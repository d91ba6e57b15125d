"""Asset config: what a machine (type) measures, in one YAML file for ``train --asset-config``.

```yaml
csv: data/pump-runs/run1.csv        # optional; --csv wins
time_column: datetime               # optional
machine_column: machine             # optional
channels:                           # names as in the CSV or as channel names
  Accelerometer1RMS: {unit: g, min: 0, max: 10}
  Current: {unit: A, min: 0}
  Pressure: {}
groups:                             # machine groups (one model per group: the router)
  pumps: [pump-1, pump-2]           # machine ids or glob patterns (fnmatch)
  press-line: {machines: ["press-*"], lines: [line2]}
calibrate:                          # machines that fit their own model on live readings
  readings: 500                     # N: the first N valid readings train (>= 50)
  family: iforest                   # or pca (numpy only: the detector image has no sklearn)
  machines: [new-*]                 # and/or groups: [pumps], and/or default: true
  rebaseline: true                  # an alarm open N readings: recalibrate (model.rebaseline)
```

Valid ranges are physical limits of the sensor: training rows with a value outside them are
sensor errors and are left out of training (counted in the progress output). Units and groups
are stored in the model card's ``params``.

The detector reads the same file (``detect --asset-config``) for ``groups`` and
``calibrate`` (``channels`` is optional there: when given, a calibrating machine fits on
those channels, else on the channels of its first reading). The detector image carries no
YAML parser: there, write the file as JSON (JSON is YAML), or install pyyaml.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factorywatch.channels import canonical
from factorywatch.errors import DatasetError
from factorywatch.model.calibration import DEFAULT_FAR, MIN_TRAIN_ROWS
from factorywatch.model.fitspec import FitSpec
from factorywatch.model.recording import Recording


class ChannelSpec(BaseModel):
    """One channel's unit and valid range."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    unit: str | None = None
    min: float | None = None
    max: float | None = None


class GroupSpec(BaseModel):
    """A machine group: machine ids or glob patterns, and/or whole production lines."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    machines: list[str] = []
    lines: list[str] = []

    def matches(self, machine: str, line: str) -> bool:
        """Whether ``machine`` (on ``line``) belongs to this group."""
        return line in self.lines or any(fnmatchcase(machine, p) for p in self.machines)


class CalibrateSpec(BaseModel):
    """Which machines fit their own model on their first ``readings`` live readings."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    readings: Annotated[int, Field(ge=MIN_TRAIN_ROWS, le=1_000_000)]
    family: Literal["iforest", "pca"] = "iforest"
    machines: list[str] = []  # ids or glob patterns
    groups: list[str] = []
    default: bool = False  # every machine without a model of its own or of its group
    far: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_FAR
    preset: Literal["point", "windowed", "full", "drift", "auto"] = "windowed"
    window: Annotated[int, Field(ge=1)] = 5
    trees: Annotated[int, Field(ge=10, le=1000)] = 200  # iforest (memory: ~6-10 KB a tree)
    rebaseline: bool = True  # recalibrate after an alarm open for ``readings`` (model.rebaseline)

    def fit_spec(self, *, seed: int = 0) -> FitSpec:
        """The ``FitSpec`` a machine's calibration window is fitted with."""
        return FitSpec(
            preset=self.preset,
            window=self.window,
            family=self.family,
            far=self.far,
            trees=self.trees,
            seed=seed,
            rebaseline=self.rebaseline,
        )


class Asset(BaseModel):
    """The parsed asset config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    csv: Path | None = None
    time_column: str | None = None
    machine_column: str | None = None
    channels: dict[str, ChannelSpec] = {}
    groups: dict[str, list[str] | GroupSpec] = {}
    calibrate: CalibrateSpec | None = None

    @model_validator(mode="after")
    def _known_groups(self) -> Asset:
        named = self.calibrate.groups if self.calibrate else []
        unknown = [g for g in named if g not in self.groups]
        if unknown:
            raise ValueError(f"calibrate names groups not defined under `groups:`: {unknown}")
        return self

    def group_specs(self) -> dict[str, GroupSpec]:
        """Every group as a ``GroupSpec`` (a bare list is a list of machine patterns)."""
        return {
            name: spec if isinstance(spec, GroupSpec) else GroupSpec(machines=spec)
            for name, spec in self.groups.items()
        }

    def card_params(self) -> dict[str, int | float | str | None]:
        """Units and groups, for the model card."""
        units = {canonical(k): v.unit for k, v in self.channels.items() if v.unit}
        groups = {k: v.model_dump() for k, v in self.group_specs().items()}
        return {
            "units": json.dumps(units) if units else None,
            "groups": json.dumps(groups) if groups else None,
        }


def _parse(text: str) -> object:
    """YAML when pyyaml is installed (the train extra), else JSON (which is YAML)."""
    try:
        import yaml  # noqa: PLC0415 - not in the detector image
    except ImportError:
        try:
            return json.loads(text)
        except ValueError as exc:
            raise DatasetError(
                f"{exc}; without pyyaml (the detector image) write this file as JSON, "
                "or install pyyaml"
            ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DatasetError(str(exc)) from None


def load_asset(path: Path, *, need_channels: bool = True) -> Asset:
    """Read and validate an asset config; errors name the file and the problem.

    ``need_channels=False``: the detector's use (groups and calibration), where the channel
    list is optional.
    """
    try:
        document = _parse(path.read_text())
    except (OSError, DatasetError) as exc:
        raise DatasetError(f"cannot read asset config {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise DatasetError(f"asset config {path} must be a mapping with `channels:`")
    document["channels"] = {k: v or {} for k, v in (document.get("channels") or {}).items()}
    try:
        asset = Asset.model_validate(document)
    except ValidationError as exc:
        raise DatasetError(f"asset config {path}: {exc}") from None
    if need_channels and not asset.channels:
        raise DatasetError(f"asset config {path} names no channels")
    try:
        for raw in asset.channels:
            canonical(raw)
    except ValueError as exc:
        raise DatasetError(f"asset config {path}: {exc}") from None
    return asset


def apply_asset(
    asset: Asset,
    rec: Recording,
    train: npt.NDArray[np.bool_],
    *,
    progress: Callable[[str], None] = lambda _: None,
) -> npt.NDArray[np.bool_]:
    """Leave training rows with a value outside a channel's valid range out of training."""
    keep = train.copy()
    for raw, spec in asset.channels.items():
        values = rec.columns[canonical(raw)]
        bad = np.zeros(rec.rows, dtype=np.bool_)
        if spec.min is not None:
            bad |= values < spec.min
        if spec.max is not None:
            bad |= values > spec.max
        dropped = int(np.sum(bad & keep))
        if dropped:
            progress(f"{raw}: {dropped} training rows outside [{spec.min}, {spec.max}] left out")
        keep &= ~bad
    return keep
