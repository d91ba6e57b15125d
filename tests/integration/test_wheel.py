"""The wheel in a fresh virtualenv, run from an empty directory: one namespace, nothing inside
site-packages, the broker config found as package data, no training libraries in the base."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from factorywatch import mqtt as fwmqtt
from factorywatch.broker import free_port, wait_for_port
from factorywatch.settings import BrokerSettings
from tests.support import PROJECT_DIR, source_tree_build

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the project's wheel (base dependencies only) installed."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    with source_tree_build():
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), "."],
            check=True,
            cwd=PROJECT_DIR,
            timeout=300,
        )
    (wheel,) = dist.glob("factorywatch-*.whl")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        check=True,
        timeout=600,
    )
    return env_dir


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("FACTORYWATCH_")},
    )


def _site_packages(venv: Path) -> Path:
    (site,) = (venv / "lib").glob("python3*/site-packages")
    return site


def test_only_the_factorywatch_namespace_is_installed(venv: Path, tmp_path: Path) -> None:
    """`import model` (or detector, sensors) fails; factorywatch.model imports."""
    for generic in ("model", "detector", "sensors", "broker"):
        done = _run(venv, tmp_path, "python", "-c", f"import {generic}")
        assert done.returncode != 0, f"`import {generic}` worked from the wheel"
    done = _run(venv, tmp_path, "python", "-c", "import factorywatch.model.artifact")
    assert done.returncode == 0, done.stderr
    site = _site_packages(venv)
    top = {p.name for p in site.iterdir() if p.name.startswith(("factorywatch", "model"))}
    assert "factorywatch" in top
    assert "model" not in top


def test_the_detector_runs_without_the_training_libraries(venv: Path, tmp_path: Path) -> None:
    """The base install has no scikit-learn, pandas, matplotlib or kagglehub; detect still loads."""
    for heavy in ("sklearn", "pandas", "matplotlib", "kagglehub"):
        assert _run(venv, tmp_path, "python", "-c", f"import {heavy}").returncode != 0, heavy
    done = _run(venv, tmp_path, "python", "-c", "import factorywatch.detector.mosquitto_shell")
    assert done.returncode == 0, done.stderr


def test_help_works_from_an_empty_directory(venv: Path, tmp_path: Path) -> None:
    """`factorywatch --help` lists the roles."""
    done = _run(venv, tmp_path, "factorywatch", "--help")
    assert done.returncode == 0, done.stderr
    assert "detect" in done.stdout
    assert "broker" in done.stdout


def test_broker_serve_finds_its_config_and_keeps_state_in_the_working_directory(
    venv: Path, tmp_path: Path
) -> None:
    """`factorywatch broker serve` from an empty directory accepts clients; its files are here."""
    port = free_port()
    proc = subprocess.Popen(
        [str(venv / "bin" / "factorywatch"), "broker", "serve", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("FACTORYWATCH_")},
    )
    try:
        wait_for_port("127.0.0.1", port, timeout_s=30)
        client = fwmqtt.connected_client(BrokerSettings(port=port), "wheel-check")
        client.disconnect()
        client.loop_stop()
        assert (tmp_path / "run" / "broker").is_dir()
        site = _site_packages(venv)
        assert not (site / "factorywatch" / "run").exists()
        assert (site / "factorywatch" / "broker_config" / "mosquitto.conf").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"listening on 127.0.0.1:{port}" in err


def test_models_and_data_resolve_under_the_working_directory(venv: Path, tmp_path: Path) -> None:
    """Default model, data and state directories are relative to where the command runs."""
    done = _run(
        venv,
        tmp_path,
        "python",
        "-c",
        "from factorywatch.settings import DataSettings, DetectorSettings as D;"
        "d = DataSettings(); print(d.model_dir.resolve(), d.data_dir.resolve(),"
        " D().state_dir.resolve())",
    )
    assert done.returncode == 0, done.stderr
    model_dir, data_dir, state_dir = (Path(p) for p in done.stdout.split())
    for path in (model_dir, data_dir, state_dir):
        assert path.is_relative_to(tmp_path.resolve()), path
