"""The `factorywatch` command: every role is a subcommand with its own --help."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from factorywatch.cli import build_parser, main

SUBCOMMANDS = ["train", "evaluate", "models", "detect", "sensor", "replay", "watch", "demo"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Put structlog's defaults back after each test that ran main()."""
    # main() points structlog at this test's captured stderr, which pytest closes afterwards;
    # later in-process tests (tests/unit/test_engine_shell.py) then failed to log.
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`factorywatch <command> --help` prints usage for that command and exits 0."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    assert f"factorywatch {command}" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["serve", "init", "add-user", "remove-user"])
def test_broker_actions_have_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`factorywatch broker <action> --help` exits 0."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["broker", action, "--help"])
    assert done.value.code == 0
    assert action in capsys.readouterr().out


def test_reserved_machine_ids_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """A machine may not take a service user's name (the ACL would give it that role)."""
    assert main(["sensor", "--machine-id", "detector", "--count", "1", "--port", "1"]) == 2
    assert "reserved" in capsys.readouterr().err


def test_bad_machine_id_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An id with a topic wildcard is refused before anything connects."""
    assert main(["sensor", "--machine-id", "bad/id", "--count", "1", "--port", "1"]) == 2
    assert "invalid machine id" in capsys.readouterr().err


def test_evaluate_writes_under_run_unless_asked_for_reports() -> None:
    """By default `evaluate` writes to run/evaluate; the shipped reports/ only with --out."""
    assert build_parser().parse_args(["evaluate"]).out == Path("run") / "evaluate"
    assert build_parser().parse_args(["evaluate", "--out", "reports"]).out == Path("reports")
