"""One way to run a role as a subprocess: start it, wait for a log event or /healthz, stop it.

Tests, the benchmark and the demo all start detectors, sensors and relays the same way. The
child's output (stdout and stderr together) goes through a pipe that a reader thread copies
line by line into the log file and into memory; ``wait_log`` blocks on a condition that each
new line (and the end of the output) signals, so a wait ends the moment the line is written,
without polling the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Final

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
        self._cond = threading.Condition()
        self._ended = False
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env is not None else child_env(),
        )
        assert self.process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), daemon=True, name=f"log-{self.name}"
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        with self.log_file.open("ab") as out:
            for raw in stream:
                out.write(raw)
                out.flush()
                with self._cond:
                    self._lines.append(raw.decode(errors="replace"))
                    self._cond.notify_all()
        stream.close()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        """Process id."""
        return self.process.pid

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process.poll() is None

    def log(self) -> str:
        """Everything the process printed so far."""
        with self._cond:
            return "".join(self._lines)

    def wait_log(self, needle: str, timeout: float = 60.0) -> str:
        """Wait until a line containing ``needle`` was printed; return that line.

        Raises ``LaunchError`` with the log's tail when the output ends (the process exited)
        or ``timeout`` passes first.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if needle in line:
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    break
                self._cond.wait(left)
        why = "exited" if self._ended else f"did not print it within {timeout:g} s"
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
            # A condition with a deadline: the next probe after a short pause (or new output).
            with self._cond:
                self._cond.wait(0.1)
        raise LaunchError(
            f"{self.name} not healthy on :{port}{path} ({last}):\n{self.log()[-3000:]}"
        )

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit on its own; its exit code."""
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

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
