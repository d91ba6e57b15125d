"""Test support: real processes (detector, sensors) and an MQTT collector for assertions."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from factorywatch import mqtt as fwmqtt
from factorywatch.settings import BrokerSettings

PROJECT_DIR = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "factorywatch.cli", "--log-format", "json"]


@dataclass
class Message:
    """A message a collector received."""

    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.time)


class Collector:
    """A real paho subscriber that records everything on its filters."""

    def __init__(self, settings: BrokerSettings, filters: Sequence[str], client_id: str) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._filters = list(filters)
        self._subscribed = threading.Event()
        self.client = fwmqtt.new_client(settings, client_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self._waiter = fwmqtt.ConnectWaiter()
        fwmqtt.connect(self.client, settings, self._waiter)
        assert self._subscribed.wait(10), "collector subscription not acknowledged"

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._waiter.record(rc)
        client.subscribe([(f, 1) for f in self._filters])

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def matching(self, predicate: Callable[[Message], bool]) -> list[Message]:
        """Messages received so far that satisfy ``predicate``."""
        with self._cond:
            return [m for m in self.messages if predicate(m)]

    def wait_for(
        self, predicate: Callable[[Message], bool], count: int = 1, timeout: float = 30.0
    ) -> list[Message]:
        """Wait until ``count`` messages satisfy ``predicate``; return them (maybe fewer)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class Proc:
    """A factorywatch CLI process with its output kept in a log file."""

    def __init__(self, args: Sequence[str], log_file: Path, env: dict[str, str] | None = None):
        self.log_file = log_file
        self.args = list(args)
        self.metrics_port: int | None = None
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log_file.open("ab") as out:
            self.process = subprocess.Popen(
                [*CLI, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=PROJECT_DIR,
            )

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_file.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 60.0) -> None:
        """Wait until the log contains ``needle`` (fail with the log otherwise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in log of {self.args}:\n{self.log()[-3000:]}")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def scrape(port: int, path: str) -> tuple[int, str]:
    """GET a path of a detector's metrics server: (HTTP status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (fails when it is absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if labels else name):
            return float(value)
    raise AssertionError(f"{name} {labels} not in metrics")
