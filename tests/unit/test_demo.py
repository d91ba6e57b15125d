"""The demo's lines: the threshold comparison that holds, model switches, the copy-safe hint."""

from __future__ import annotations

import shlex
from pathlib import Path

from factorywatch.contracts import Contribution, DeadLetter, Verdict
from factorywatch.demo import (
    LEGEND,
    failure_message,
    model_switch_line,
    mosquitto_sub_command,
    unscorable_line,
    verdict_line,
    write_hint,
)


def _verdict(status: str, score: float, **extra: object) -> Verdict:
    return Verdict.model_validate(
        {
            "machine_id": "press-1",
            "line": "line1",
            "seq": 1_764_017_000_000_001,
            "reading_ts": 1_764_017_000.0,
            "status": status,
            "score": score,
            "threshold": 0.593,
            "model_version": "v1",
            "latency_ms": 0.5,
            **extra,
        }
    )


def test_normal_lines_say_the_score_is_at_or_below_the_threshold() -> None:
    """A NORMAL verdict reads `0.470 <= threshold 0.593`, never `(>0.593)`."""
    line = verdict_line(_verdict("NORMAL", 0.47))
    assert "score 0.470 <= threshold 0.593" in line
    assert ">" not in line.replace("[/]", "").split("score")[1].split("ms")[0]


def test_alert_lines_say_above_the_threshold_and_why() -> None:
    """An ALERT above the threshold reads `>` and names the features that drove it."""
    explanation = [Contribution(feature="power_w", value=11728.6, z=6.4)]
    line = verdict_line(_verdict("ALERT", 0.71, explanation=explanation))
    assert "score 0.710 > threshold 0.593" in line
    assert "power_w z=+6.4" in line


def test_alert_outside_training_reads_right_with_a_low_score() -> None:
    """An envelope ALERT keeps `<=` for its score and says what lies outside training."""
    line = verdict_line(_verdict("ALERT", 0.55, outside_training=["process_temperature_k"]))
    assert "score 0.550 <= threshold 0.593, but outside training envelope: process_temp" in line


def test_lines_carry_the_full_reading_id_and_a_labelled_latency() -> None:
    """The reading id is shown whole (not shortened) and the latency says what it is."""
    line = verdict_line(_verdict("NORMAL", 0.47))
    assert "seq=1764017000000001 " in line
    assert "latency 0.50 ms" in line


def test_only_a_missing_channel_dead_letter_gets_the_loud_line() -> None:
    """Readings the model cannot score are named with the remedy; other dead letters are not."""
    letter = {
        "reason": "missing_channel",
        "detail": "reading lacks channels ['torque_nm']",
        "topic": "factory/telemetry/line1/pump-1",
        "payload_bytes": 10,
        "payload_excerpt": "{}",
        "received_at": 1.0,
    }
    line = unscorable_line(DeadLetter.model_validate(letter))
    assert line is not None
    assert "cannot score" in line
    assert "torque_nm" in line
    assert "models promote" in line
    assert unscorable_line(DeadLetter.model_validate({**letter, "reason": "schema"})) is None


def test_model_switch_is_announced_once() -> None:
    """The first model is no switch; a new version is; the same version again is not."""
    assert model_switch_line(None, "v1") is None
    assert model_switch_line("v1", "v1") is None
    switched = model_switch_line("v1", "v2")
    assert switched is not None
    assert "model switched: v1 -> v2" in switched


def test_hint_is_one_shell_safe_line_and_a_script(tmp_path: Path) -> None:
    """The hint survives a path with spaces and is saved as a runnable script."""
    secrets = tmp_path / "run dir" / "secrets"
    command = mosquitto_sub_command(41883, secrets, "factory/alerts/#")
    assert "\n" not in command
    words = shlex.split(command.replace("$(cat ", "").replace(")", ""))
    assert words[:5] == ["mosquitto_sub", "-h", "127.0.0.1", "-p", "41883"]
    assert "factory/alerts/#" in words
    assert str(secrets / "viewer.password") in command.replace("'", "")
    script = write_hint(tmp_path, command)
    assert script.stat().st_mode & 0o111
    assert command in script.read_text()


def test_a_stopped_process_names_its_cause_and_the_make_remedy(tmp_path: Path) -> None:
    """The demo's error repeats the role's own `error:` line, the make variable and the log."""
    log = tmp_path / "detector.log"
    text = (
        '{"event": "training_started"}\n'
        "error: no dataset in data and the kagglehub download failed (offline). "
        "Pass a local copy with --dataset PATH or FACTORYWATCH_DATASET=PATH.\n"
    )
    message = failure_message("detect", 2, text, log)
    assert message.startswith("the demo's detect stopped (exit 2): no dataset in data")
    assert "make demo DATASET=" in message
    assert str(log) in message


def test_a_stopped_process_without_an_error_line_shows_its_last_lines(tmp_path: Path) -> None:
    """Without an `error:` line the message carries the log's last lines, not only an exit code."""
    message = failure_message("sensor", 1, "starting\nTraceback: boom\n", tmp_path / "s.log")
    assert "Traceback: boom" in message
    assert "DATASET=" not in message


def test_the_legend_explains_what_a_newcomer_sees() -> None:
    """Every field of a verdict line, and why a few early seqs arrive after later ones (the
    sensors start with the detector and send again what it had not answered yet)."""
    for words in ("seq", "threshold", "latency", "training envelope", "z=", "sent again"):
        assert words in LEGEND
