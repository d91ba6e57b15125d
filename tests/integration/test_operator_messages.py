"""What a newcomer reads when something is off: refused logins, no broker, which model."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from factorywatch.broker import LocalBroker, free_port
from factorywatch.credentials import init_secrets
from factorywatch.model import artifact
from tests.support import CLI, PROJECT_DIR

pytestmark = pytest.mark.integration


def _run(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=PROJECT_DIR
    )
    return done, time.monotonic() - started


@pytest.mark.timing
def test_refused_sensor_login_names_the_remedy_and_stops(tmp_path: Path) -> None:
    """A machine the broker does not know is told to `broker add-user` it and reload, at once."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    with LocalBroker(tmp_path / "broker", secrets_dir=secrets) as broker:
        done, took = _run(
            "sensor",
            "--machine-id",
            "weld-4",
            "--count",
            "3",
            "--port",
            str(broker.port),
            "--secrets-dir",
            str(secrets),
        )
    assert done.returncode == 2
    assert "did not accept the login of user 'weld-4'" in done.stderr
    assert "factorywatch broker add-user weld-4" in done.stderr
    assert "SIGHUP" in done.stderr
    assert took < 8, f"stopped after {took:.1f} s instead of retrying"


@pytest.mark.timing
def test_wrong_password_is_refused_with_the_same_advice(tmp_path: Path) -> None:
    """A known machine with a stale password stops at once too, pointing at its password."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    (secrets / "press-1.password").write_text("not-the-password\n")
    with LocalBroker(tmp_path / "broker", secrets_dir=secrets) as broker:
        done, took = _run(
            "sensor", "--machine-id", "press-1", "--count", "1",
            "--port", str(broker.port), "--secrets-dir", str(secrets),
        )  # fmt: skip
    assert done.returncode == 2
    assert "check its password" in done.stderr
    assert took < 8


@pytest.mark.timing
def test_watch_against_an_unreachable_broker_says_so_within_seconds() -> None:
    """`factorywatch watch` with nothing listening exits 2 naming the address, in seconds."""
    port = free_port()
    done, took = _run("watch", "--port", str(port), timeout=30)
    assert done.returncode == 2
    assert f"127.0.0.1:{port} unreachable" in done.stderr
    assert took < 6, f"took {took:.1f} s to say the broker is unreachable"


def test_models_list_shows_when_each_model_was_trained_and_its_figures(model_dir: Path) -> None:
    """Each version's line is followed by its training time, data and label figures."""
    done, _ = _run("models", "list", "--model-dir", str(model_dir))
    assert done.returncode == 0, done.stderr
    card = artifact.load(model_dir).card
    lines = done.stdout.splitlines()
    [index] = [i for i, ln in enumerate(lines) if card.version in ln]
    details = lines[index + 1]
    assert f"trained {card.created_at:%Y-%m-%d %H:%M} UTC on {card.data.file}" in details
    assert f"({card.data.rows} rows)" in details
    assert f"{card.metrics['label_roc_auc']:.3f}" in details
    assert "precision" in details
    assert "recall" in details
