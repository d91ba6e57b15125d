"""One way to run a role as a subprocess: start it, wait for a log event or /healthz, stop it.

Tests, the benchmark and the demo all start detectors, sensors and relays the same way. The
child writes its output (stdout and stderr together) straight into its log file, so a parent
that is busy elsewhere can never block it on a full pipe; ``wait_log`` reads only the new
lines, and waits between looks by waiting for the process's exit, so an exit ends it at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from factorywatch.errors import FactorywatchError

CLI: Final = (sys.executable, "-m", "factorywatch.cli", "--log-format", "json")


class LaunchError(FactorywatchError):
    """A launched process did not reach the state we waited for (its log tail says why)."""


def cli_command(*args: str) -> list[str]:
    """The command running ``factorywatch <args>`` (JSON logs) with this interpreter."""
    return [*CLI, *args]


def module_command(module: str, *args: str) -> list[str]:
    """The command running ``python -m <module> <args>`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(
    extra: Mapping[str, str] | None = None, *, drop_prefix: str | None = None
) -> dict[str, str]:
    """This process's environment (less variables starting with ``drop_prefix``) + ``extra``.

    Output is unbuffered so every log line reaches the reader at once.
    """
    env = {
        k: v for k, v in os.environ.items() if drop_prefix is None or not k.startswith(drop_prefix)
    }
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **(extra or {})}


class Launched:
    """A running role: its process, its log (file and memory) and the waits tests need."""

    def __init__(
        self,
        command: Sequence[str],
        log_file: Path,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.command = list(command)
        self.name = name or Path(self.command[0]).name
        self.log_file = log_file
        self.metrics_port: int | None = None
        self._lines: list[str] = []
        self._partial = b""
        self._offset = 0
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("ab") as out:
            self._offset = out.tell()  # an appended-to log: only what this run writes counts
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=dict(env) if env is not None else child_env(),
            )

    def _scan(self) -> None:
        """Take in the complete lines written since the last scan."""
        with self.log_file.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self._lines += [line.decode(errors="replace") + "\n" for line in complete]

    @property
    def pid(self) -> int:
        """Process id."""
        return self.process.pid

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process.poll() is None

    def log(self) -> str:
        """Everything the process printed so far."""
        self._scan()
        return "".join(self._lines) + self._partial.decode(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60.0) -> str:
        """Wait until a line containing ``needle`` was printed; return that line.

        Raises ``LaunchError`` with the log's tail when the process exits or ``timeout``
        passes first. The child writes straight into its log file (so a busy parent can never
        block it); this checks the new lines every 20 ms, each check being a wait for the
        process to exit, so an exit ends the wait at once.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            exited = self.process.poll() is not None
            self._scan()
            for line in self._lines[seen:]:
                if needle in line:
                    return line
            seen = len(self._lines)
            left = deadline - time.monotonic()
            if exited or left <= 0:
                break
            try:
                self.process.wait(min(left, 0.02))
            except subprocess.TimeoutExpired:
                continue
        why = "exited" if exited else f"did not print it within {timeout:g} s"
        raise LaunchError(
            f"{self.name} {why} (waiting for {needle!r}); log {self.log_file}:\n"
            f"{self.log()[-3000:]}"
        )

    def wait_healthy(self, port: int, timeout: float = 60.0, path: str = "/healthz") -> None:
        """Wait until ``GET http://127.0.0.1:<port><path>`` answers 200 (or ``LaunchError``)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline and self.running():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code}"
            except OSError as err:
                last = str(err)
            # A condition with a deadline: the next probe after 0.1 s (or at once on exit).
            try:
                self.process.wait(0.1)
            except subprocess.TimeoutExpired:
                continue
        raise LaunchError(
            f"{self.name} not healthy on :{port}{path} ({last}):\n{self.log()[-3000:]}"
        )

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit on its own; its exit code."""
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to ``timeout`` (then SIGKILL); the exit code."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        """SIGKILL (a crash, or clean-up after a failure) and reap."""
        if self.running():
            self.process.kill()
        self.wait(10)
