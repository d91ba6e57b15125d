"""Finding 5: `models promote` refuses an artifact the detector could not load (real CLI)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from factorywatch.cli import main
from factorywatch.model import artifact
from tests.support import CLI, PROJECT_DIR

pytestmark = pytest.mark.integration


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The `factorywatch` entry point in-process: (exit code, stdout, stderr)."""
    code = main(["--log-format", "json", *args])
    out, err = capsys.readouterr()
    return code, out, err


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
    corruption: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
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

    code, out, err = _cli(capsys, "models", "promote", bad, "--model-dir", str(models))
    assert code == 2, out + err
    assert f"refusing to promote {bad}" in err
    assert f"still points at {good}" in err
    assert artifact.current_version(models) == good
    code, out, err = _cli(capsys, "models", "list", "--model-dir", str(models))
    assert code == 0, err
    assert f"* {good}" in out
    assert _cli(capsys, "models", "promote", good, "--model-dir", str(models))[0] == 0


def test_promote_exit_code_of_the_real_command(model_dir: Path, tmp_path: Path) -> None:
    """The installed command exits 2 on a corrupt artifact (as a shell script would see it)."""
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    good = artifact.current_version(models)
    assert good is not None
    shutil.copytree(models / good, models / "bad")
    _truncate_npz(models / "bad" / artifact.FLAT_FILE)
    done = subprocess.run(
        [*CLI, "models", "promote", "bad", "--model-dir", str(models)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to promote bad" in done.stderr


def test_models_rollback_returns_to_the_version_before(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`models promote` of a second version then `models rollback` makes the first current
    again, both recorded in promotions.jsonl; with nothing before it, rollback exits 2 and
    says so, leaving `current` where it was."""
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    (models / "promotions.jsonl").unlink(missing_ok=True)
    first = artifact.current_version(models)
    assert first is not None
    second = "20990101T000000Z-two0"
    shutil.copytree(models / first, models / second)
    assert _cli(capsys, "models", "promote", second, "--model-dir", str(models))[0] == 0
    code, out, err = _cli(capsys, "models", "rollback", "--model-dir", str(models))
    assert code == 0, err
    assert f"rolled back from {second} to {first}" in out
    assert artifact.current_version(models) == first
    log = (models / "promotions.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in log] == ["promote", "rollback"]
    code, _out, err = _cli(capsys, "models", "rollback", "--model-dir", str(models))
    assert code == 2
    assert "nothing to roll back to" in err
    assert artifact.current_version(models) == first
