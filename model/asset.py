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
  pumps: [pump-1, pump-2]
```

Valid ranges are physical limits of the sensor: training rows with a value outside them are
sensor errors and are left out of training (counted in the progress output). Units and groups
are stored in the model card's ``params``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from factorywatch.channels import canonical
from factorywatch.errors import DatasetError
from factorywatch.model.recording import Recording


class ChannelSpec(BaseModel):
    """One channel's unit and valid range."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    unit: str | None = None
    min: float | None = None
    max: float | None = None


class Asset(BaseModel):
    """The parsed asset config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    csv: Path | None = None
    time_column: str | None = None
    machine_column: str | None = None
    channels: dict[str, ChannelSpec]
    groups: dict[str, list[str]] = {}

    def card_params(self) -> dict[str, int | float | str | None]:
        """Units and groups, for the model card."""
        units = {canonical(k): v.unit for k, v in self.channels.items() if v.unit}
        return {
            "units": json.dumps(units) if units else None,
            "groups": json.dumps(self.groups) if self.groups else None,
        }


def load_asset(path: Path) -> Asset:
    """Read and validate an asset config; errors name the file and the problem."""
    import yaml  # noqa: PLC0415 - only training reads asset configs

    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"cannot read asset config {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise DatasetError(f"asset config {path} must be a mapping with `channels:`")
    document["channels"] = {k: v or {} for k, v in (document.get("channels") or {}).items()}
    try:
        asset = Asset.model_validate(document)
    except ValidationError as exc:
        raise DatasetError(f"asset config {path}: {exc}") from None
    if not asset.channels:
        raise DatasetError(f"asset config {path} names no channels")
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
