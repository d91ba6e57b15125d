"""Shared fixtures: the dataset, a trained model, real Mosquitto brokers, real processes; the
small fixture model of the pure tests and the guard that keeps them pure."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from factorywatch.broker import LocalBroker, free_port
from factorywatch.settings import BrokerSettings
from tests.integration.opstack import Alertmanager, WebhookReceiver
from tests.support import (
    CLI,
    PROJECT_DIR,
    Collector,
    Proc,
    pure_test_guard,
    reference_file,
    train_small_model,
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build matplotlib's font cache before any test runs: on a fresh machine its first
    import runs ``fc-list``, which the pure-test guard would take for the test's subprocess."""
    import matplotlib.font_manager  # noqa: F401, PLC0415


# A test in tests/unit or tests/property fails when it, or a fixture it asks for, reads the
# AI4I dataset or starts a subprocess (tests.support.pure_test_guard). Setup and call only:
# a session fixture of other tests may end (a subprocess) in the last pure test's teardown.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None]:
    """Set the test up under the pure-test guard."""
    with pure_test_guard(item):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None]:
    """Run the test under the pure-test guard."""
    with pure_test_guard(item):
        yield


@dataclass(frozen=True)
class DatasetChoice:
    """The dataset the tests train on and the CLI arguments that select it."""

    path: Path
    verified: bool

    @property
    def args(self) -> list[str]:
        """CLI arguments selecting this dataset."""
        return ["--dataset", str(self.path), *([] if self.verified else ["--no-verify"])]


@pytest.fixture(scope="session")
def test_data() -> DatasetChoice:
    """The real AI4I CSV (``$FACTORYWATCH_TEST_DATASET_DIR`` or ../shared/data), else a loud fail.

    Models trained on anything else do not flag the readings these tests inject, so a
    stand-in would only turn a missing file into misleading failures further on.
    """
    return DatasetChoice(path=reference_file("ai4i2020.csv"), verified=True)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, test_data: DatasetChoice) -> Path:
    """A model trained and promoted by the real `factorywatch train` command.

    Under pytest-xdist the workers share one: the first trains it in the session's common
    temporary directory while the others wait on its lock (tests only read it)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _train(tmp_path_factory.mktemp("models"), test_data)
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each popen-gwN/
    directory = shared / "models"
    with (shared / "models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "models.trained").exists():
            shutil.rmtree(directory, ignore_errors=True)  # a worker that failed half-way
            _train(directory, test_data)
            (shared / "models.trained").touch()
    return directory


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A promoted 25-tree model of 600 simulated AI4I-shaped readings, fitted in-process in
    well under a second (``tests.support.train_small_model``): for the tests that need *a*
    model as the detector loads it, not the AI4I figures. Tests only read it."""
    return train_small_model(tmp_path_factory.mktemp("small") / "models")


def _train(directory: Path, data: DatasetChoice) -> Path:
    done = subprocess.run(
        [*CLI, "train", *data.args, "--model-dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=PROJECT_DIR,
    )
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A fresh Mosquitto with the project's config on a free loopback port."""
    local = LocalBroker(tmp_path / "broker").start()
    yield local
    local.stop()


@pytest.fixture
def secure_broker(tmp_path: Path, secrets_dir: Path, topic_root: str) -> Iterator[LocalBroker]:
    """Mosquitto with authentication, the ACL generated from the registry and a TLS listener,
    all from the requesting module's ``secrets_dir`` fixture."""
    local = LocalBroker(tmp_path / "sbroker", secrets_dir=secrets_dir, topic_root=topic_root)
    local.start()
    yield local
    local.stop()


@pytest.fixture
def topic_root() -> str:
    """A topic prefix of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(broker: LocalBroker, topic_root: str) -> BrokerSettings:
    """Broker settings pointing at this test's broker and topic root."""
    return BrokerSettings().with_overrides(port=broker.port, topic_root=topic_root)


@pytest.fixture
def mqtt_args(broker: LocalBroker, topic_root: str) -> list[str]:
    """CLI arguments that point a role at this test's broker and topic root."""
    return ["--port", str(broker.port), "--topic-root", topic_root]


@pytest.fixture
def collector(settings: BrokerSettings) -> Iterator[Callable[..., Collector]]:
    """Factory of real subscribers on this test's broker; all closed at the end."""
    made: list[Collector] = []

    def make(*filters: str) -> Collector:
        c = Collector(settings, filters, f"collector-{uuid.uuid4().hex[:8]}")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Factory of factorywatch CLI processes; any still running are killed at the end."""
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str | None = None) -> Proc:
        log_file = tmp_path / f"{name or args[0]}-{len(procs)}.log"
        proc = Proc(list(args), log_file, env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


@pytest.fixture
def detector(
    spawn: Callable[..., Proc], mqtt_args: list[str], model_dir: Path, tmp_path: Path
) -> Callable[..., Proc]:
    """Start a real detector process on this test's broker and wait until it subscribed."""

    # `make faults DETECTOR_PROTOCOL=3.1.1` runs the detectors (only them) on paho's MQTT 3.1.1.
    protocol = os.environ.get("FACTORYWATCH_TEST_DETECTOR_PROTOCOL")
    chosen = {"FACTORYWATCH_MQTT_PROTOCOL": protocol} if protocol else {}
    # `make faults DETECTOR_TRANSPORT=paho` runs them on paho-mqtt instead of the default mqtt5.
    transport = os.environ.get("FACTORYWATCH_TEST_DETECTOR_TRANSPORT")
    chosen |= {"FACTORYWATCH_DETECTOR_TRANSPORT": transport} if transport else {}

    def start(
        *extra: str, client_id: str = "detector-under-test", env: dict[str, str] | None = None
    ) -> Proc:
        proc = spawn(
            "detect",
            *mqtt_args,
            "--model-dir",
            str(model_dir),
            "--client-id",
            client_id,
            "--state-dir",
            str(tmp_path / "detector-state"),
            "--metrics-port",
            str(port := free_port()),
            *extra,
            env={**chosen, **(env or {})},
        )
        proc.metrics_port = port
        proc.wait_log("telemetry_subscribed")
        return proc

    return start


# -- Alertmanager and a receiver behind it (the notifier's tests and fault rows) ---------
@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    """A webhook receiver on a free loopback port."""
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def alertmanager(tmp_path: Path, webhook: WebhookReceiver) -> Iterator[Alertmanager]:
    """A real Alertmanager routing every alert to the webhook receiver."""
    am = Alertmanager(tmp_path / "alertmanager", webhook.port)
    yield am
    am.stop()
