"""`factorywatch demo` as a newcomer runs it: readable lines, a hint that works, model switches."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from factorywatch.broker import free_port
from tests.conftest import DatasetChoice
from tests.support import CLI, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_output(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Wait until the demo's output matches ``pattern``; return the whole output."""

    def matched() -> str:
        text = log.read_text(errors="replace")
        assert proc.poll() is None, f"demo exited {proc.returncode}:\n{text[-3000:]}"
        return text if re.search(pattern, text) else ""

    return wait_until(matched, timeout, f"{pattern!r} in the demo output", poll_s=0.2)


def test_demo_lines_hint_and_model_switch(
    model_dir: Path, test_data: DatasetChoice, tmp_path: Path
) -> None:
    """NORMAL lines read `<=`, the saved hint shows verdicts, a promoted model is announced,
    and a machine added as the demo's hint says (add-user, kill -HUP) gets verdicts."""
    port = free_port()
    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    log = tmp_path / "demo.out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "80"}
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [*CLI, "demo", "--port", str(port), "--rate", "5", "--model-dir", str(models)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    try:
        text = _wait_output(log, r"NORMAL +score", demo, timeout=120)
        hint = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("mosquitto_sub")]
        assert len(hint) == 1, "the hint is one line even at 80 columns in a pipe"
        assert "(>" not in text
        for line in text.splitlines():
            if "NORMAL " in line and "score" in line:
                assert re.search(r"score \d\.\d{3} <= threshold \d\.\d{3}", line), line
            if re.search(r"(NORMAL|ALERT) +score", line):
                assert re.search(r"\d ms", line), f"a verdict wrapped over lines: {line}"
        script = tmp_path / "run" / "demo" / "mosquitto_sub.sh"
        assert hint[0] in script.read_text()
        shown = subprocess.run(
            ["sh", str(script), "-C", "1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=tmp_path,
        )
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith("factory/alerts/"), shown.stdout

        trained = subprocess.run(
            [*CLI, "train", *test_data.args, "--trees", "20", "--model-dir", str(models)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=tmp_path,
        )
        assert trained.returncode == 0, trained.stderr
        new_version = trained.stdout.strip().splitlines()[-1]
        text = _wait_output(log, rf"model switched: \S+ -> {new_version}", demo, timeout=60)

        how = re.search(r"add a machine: (factorywatch broker add-user MACHINE [^,]+)", text)
        assert how is not None, text[-3000:]
        secrets = how.group(1).split("--secrets-dir ")[1].strip()
        added = subprocess.run(
            [*CLI, "broker", "add-user", "pump-1", "--secrets-dir", secrets],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert added.returncode == 0, added.stderr
        demo.send_signal(signal.SIGHUP)
        _wait_output(log, "the detector follows the registry", demo, timeout=60)
        login = ["--port", str(port), "--secrets-dir", secrets]
        sent = subprocess.run(
            [*CLI, "sensor", "--machine-id", "pump-1", "--count", "3", "--rate", "5", *login],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
        assert sent.returncode == 0, sent.stderr
        _wait_output(log, r"line1/pump-1 +seq=\d+ ", demo, timeout=60)
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0, log.read_text()[-3000:]


def test_demo_offline_without_a_dataset_says_why_in_the_terminal(tmp_path: Path) -> None:
    """With no model, no dataset and no download, the terminal names the cause and the remedy."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FACTORYWATCH_DATASET") and not k.startswith("KAGGLE")
    }
    # An unreachable proxy makes the download fail even on a machine that has the internet.
    env |= {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    env |= {"PYTHONUNBUFFERED": "1", "KAGGLEHUB_CACHE": str(tmp_path / "kagglehub")}
    args = ["--data-dir", str(tmp_path / "data"), "--model-dir", str(tmp_path / "models")]
    demo = subprocess.run(
        [*CLI, "demo", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert demo.returncode == 2, demo.stderr
    errors = [ln for ln in demo.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, demo.stderr
    assert "the demo's detect stopped" in errors[0]
    assert "no dataset" in errors[0]
    assert "download" in errors[0]
    assert "--dataset PATH" in errors[0]
    assert "make demo DATASET=" in demo.stderr
    assert "detector.log" in demo.stderr
