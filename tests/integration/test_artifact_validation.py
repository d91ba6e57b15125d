"""Finding 5: `models promote` refuses an artifact the detector could not load (real CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from factorywatch.model import artifact
from tests.support import CLI, PROJECT_DIR

pytestmark = pytest.mark.integration


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, check=False, cwd=PROJECT_DIR
    )


def _truncate_npz(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garbage_card(path: Path) -> None:
    path.write_text("{not json")


def _nan_threshold(path: Path) -> None:
    card = json.loads(path.read_text())
    card["threshold"] = "NaN"
    path.write_text(json.dumps(card))


def _slot_out_of_range(path: Path) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["children"] = arrays["children"].copy()
    arrays["children"][3] = 10**8  # the compiled walk would read far outside the forest
    with path.open("wb") as out:
        np.savez(out, **arrays)


def _other_width(path: Path) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["scalars"] = np.array([arrays["scalars"][0] + 1, arrays["scalars"][1]])
    with path.open("wb") as out:
        np.savez(out, **arrays)


CORRUPTIONS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "truncated forest.npz": (artifact.FLAT_FILE, _truncate_npz),
    "card.json not JSON": (artifact.CARD_FILE, _garbage_card),
    "card threshold NaN": (artifact.CARD_FILE, _nan_threshold),
    "slot index out of range": (artifact.FLAT_FILE, _slot_out_of_range),
    "feature count differs from card": (artifact.FLAT_FILE, _other_width),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_promote_refuses_a_corrupt_artifact(
    corruption: str, model_dir: Path, tmp_path: Path
) -> None:
    """A corrupted copy of a good model is refused (exit 2, clear message), `current` keeps
    pointing at the good one, `models list` still works, and the good one still promotes."""
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    good = artifact.current_version(models)
    assert good is not None
    bad = "20990101T000000Z-bad0"
    shutil.copytree(models / good, models / bad)
    file_name, corrupt = CORRUPTIONS[corruption]
    corrupt(models / bad / file_name)

    refused = _cli("models", "promote", bad, "--model-dir", str(models))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"refusing to promote {bad}" in refused.stderr
    assert f"still points at {good}" in refused.stderr
    assert artifact.current_version(models) == good
    listed = _cli("models", "list", "--model-dir", str(models))
    assert listed.returncode == 0, listed.stderr
    assert f"* {good}" in listed.stdout
    assert _cli("models", "promote", good, "--model-dir", str(models)).returncode == 0
