"""Helpers of the operator-stack tests: readings that raise alerts, history databases,
Alertmanager with a webhook receiver, required binaries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from factorywatch.broker import free_port
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.settings import BrokerSettings
from tests.support import reading, wait_until

# Fast alert policy for tests: raise on 3 of 5 anomalous readings, clear after 4 normal ones.
POLICY_ENV = {
    "FACTORYWATCH_DETECTOR_ALERT_K": "3",
    "FACTORYWATCH_DETECTOR_ALERT_N": "5",
    "FACTORYWATCH_DETECTOR_ALERT_M": "4",
}
PG_BASE_URL = os.environ.get(
    "FACTORYWATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def require_binary(name: str) -> str:
    """The binary's path; fails loudly (never skips) when it is missing."""
    path = shutil.which(name)
    assert path is not None, (
        f"{name} is not installed: run scripts/ensure-ops-tools.sh (make test does) "
        "to apt-get install chromium, prometheus and prometheus-alertmanager"
    )
    return path


def publish_plan(
    settings: BrokerSettings, machine: str, plan: list[float], *, seq0: int = 0
) -> SensorPublisher:
    """Publish one reading per rpm value of ``plan`` as ``machine``; return the publisher."""
    pub = SensorPublisher(settings, machine, buffer_size=10_000)
    pub.start()
    for i, rpm in enumerate(plan):
        pub.publish(reading(machine, seq0 + i, rpm))
    return pub


@contextmanager
def history_url(backend: str, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """``(url, schema)`` of a fresh history database; PostgreSQL schemas are dropped after."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'history.sqlite'}", None
        return
    import sqlalchemy as sa  # noqa: PLC0415

    schema = f"fwtest_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_BASE_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        raise AssertionError(f"PostgreSQL at {PG_BASE_URL} is not reachable: {exc}") from exc
    try:
        yield PG_BASE_URL, schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


# -- Alertmanager and a webhook receiver ----------------------------------------------------
class WebhookReceiver:
    """A tiny HTTP server recording Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._cond:
                    receiver.notifications.append(json.loads(body))
                    receiver._cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Every alert of every notification so far that satisfies ``predicate``."""
        with self._cond:
            return [a for n in self.notifications for a in n["alerts"] if predicate(a)]

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Wait for an alert satisfying ``predicate`` in a notification; return all such."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [a for n in self.notifications for a in n["alerts"] if predicate(a)]
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


class Alertmanager:
    """A real prometheus-alertmanager on a free loopback port, routing to a webhook."""

    def __init__(self, workdir: Path, webhook_port: int, config_text: str | None = None) -> None:
        """``config_text``: an alertmanager.yml of its own instead of the webhook route."""
        self.binary = require_binary("prometheus-alertmanager")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "alertmanager.yml"
        self.config.write_text(
            config_text
            or "route:\n"
            "  receiver: hook\n"
            "  group_by: [alertname, machine]\n"
            "  group_wait: 200ms\n"
            "  group_interval: 1s\n"
            "  repeat_interval: 1h\n"
            "receivers:\n"
            "  - name: hook\n"
            "    webhook_configs:\n"
            f"      - url: http://127.0.0.1:{webhook_port}/hook\n"
            "        send_resolved: true\n"
        )
        self.log = workdir / "alertmanager.log"
        self.start()

    def start(self) -> None:
        """Start (again) on the same port, with the same config and data folder."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--cluster.listen-address=",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, timeout=30, what="alertmanager /-/ready")

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, body: Any = None) -> Any:
        """GET (or POST ``body``) on the v2 API; the decoded answer."""
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL of ours
            f"{self.url}/api/v2/{path}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="GET" if body is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
            return json.loads(resp.read() or b"null")

    def stop(self) -> None:
        """Terminate (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
