"""`train --csv` never silently makes a model of other channels everyone's default."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support import CLI, PROJECT_DIR

pytestmark = pytest.mark.integration

FAST = ["--preset", "point", "--trees", "10"]


def _csv(path: Path, channels: list[str], rows: int = 300) -> Path:
    rng = np.random.default_rng(len(channels))
    lines = [",".join(channels)]
    lines += [",".join(f"{v:.4f}" for v in rng.normal(size=len(channels))) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(csv: Path, models: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*CLI, "train", "--csv", str(csv), *FAST, "--model-dir", str(models), *extra],
        capture_output=True,
        text=True,
        cwd=PROJECT_DIR,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def _current(models: Path) -> str:
    return (models / "current").read_text().strip()


def test_a_model_of_other_channels_is_saved_not_promoted_unless_asked(tmp_path: Path) -> None:
    """Over a current model of other channels a new one is only saved (and says so);
    --promote makes it current; a model of the same channels is promoted as before."""
    models = tmp_path / "models"
    first = _train(_csv(tmp_path / "a.csv", ["temp", "vibration"]), models)
    first_version = first.stdout.split()[-1]
    assert _current(models) == first_version

    other = _csv(tmp_path / "b.csv", ["flow_rate", "pressure"])
    refused = _train(other, models)
    assert _current(models) == first_version
    assert "NOT promoted" in refused.stderr
    assert "flow_rate" in refused.stderr
    assert f"models promote {refused.stdout.split()[-1]}" in refused.stderr

    forced = _train(other, models, "--promote")
    assert _current(models) == forced.stdout.split()[-1]

    same = _train(_csv(tmp_path / "c.csv", ["flow_rate", "pressure"], rows=320), models)
    assert _current(models) == same.stdout.split()[-1]
