"""Test support: real processes (``factorywatch.launch``), an MQTT collector for assertions,
and the builders tests share (a typical reading, logins from a secrets folder)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import paho.mqtt.client as mqtt
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from factorywatch import mqtt as fwmqtt
from factorywatch.accounts import Role
from factorywatch.broker import free_port
from factorywatch.contracts import Telemetry
from factorywatch.credentials import add_user, read_password, register
from factorywatch.launch import CLI as _CLI
from factorywatch.launch import Launched, child_env, cli_command
from factorywatch.model import nab
from factorywatch.model.nab import NabFile
from factorywatch.sensors.publisher import SensorPublisher
from factorywatch.sensors.simulator import MachineSimulator
from factorywatch.settings import BrokerSettings

PROJECT_DIR = Path(__file__).resolve().parents[1]


@contextmanager
def source_tree_build() -> Iterator[None]:
    """Held around `pip wheel .`: setuptools builds in the source tree (build/, *.egg-info),
    so two builds at once (tests on different pytest-xdist workers) would mix their files."""
    lock_file = PROJECT_DIR / "build" / "tests-pip-wheel.lock"  # build/ is git-ignored
    lock_file.parent.mkdir(exist_ok=True)
    with lock_file.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


DATASET_ENV = "FACTORYWATCH_TEST_DATASET_DIR"


#: The pure tests: no dataset, no subprocess, no broker (`make test` runs them in phase 1).
PURE_TEST_DIRS: Final = (PROJECT_DIR / "tests" / "unit", PROJECT_DIR / "tests" / "property")
_running_pure_test: str | None = None  # the node id of the pure test running now, if any


def _pure_test_may_not(what: str) -> NoReturn:
    pytest.fail(
        f"{_running_pure_test} is a pure test (tests/unit, tests/property) and {what}. Use "
        "the small_model_dir fixture (a small model fitted in-process) or a CSV written to "
        "tmp_path, call the CLI with cli_in_process, or move the test to tests/integration.",
        pytrace=False,
    )


def _refuse_subprocesses(event: str, args: tuple[Any, ...]) -> None:
    if event == "subprocess.Popen" and _running_pure_test is not None:
        _pure_test_may_not(f"started a subprocess ({args[1]!r})")


@contextmanager
def pure_test_guard(item: pytest.Item) -> Iterator[None]:
    """Around one test's setup (its fixtures' included) and call: a test under
    ``PURE_TEST_DIRS`` that reaches for the AI4I dataset (``reference_data_dir``, hence the
    ``test_data`` and ``model_dir`` fixtures) or starts a subprocess fails, saying so."""
    global _running_pure_test  # noqa: PLW0603 - one test runs at a time in a process
    if not any(item.path.is_relative_to(d) for d in PURE_TEST_DIRS):
        yield
        return
    _install_subprocess_audit()
    _running_pure_test = item.nodeid
    try:
        yield
    finally:
        _running_pure_test = None


_audit_installed = False


def _install_subprocess_audit() -> None:
    global _audit_installed  # noqa: PLW0603 - an audit hook cannot be removed: add it once
    if not _audit_installed:
        sys.addaudithook(_refuse_subprocesses)
        _audit_installed = True


def reference_data_dir() -> Path:
    """Where the real AI4I files are: ``$FACTORYWATCH_TEST_DATASET_DIR`` or ``../shared/data``."""
    if _running_pure_test is not None:
        _pure_test_may_not("reached for the AI4I dataset")
    given = os.environ.get(DATASET_ENV)
    # Absolute: tests hand the path to processes that run in other directories.
    return (Path(given) if given else PROJECT_DIR.parent / "shared" / "data").resolve()


def reference_file(name: str) -> Path:
    """A real AI4I file; fails the test loudly (never skips it) when the file is absent."""
    path = reference_data_dir() / name
    if not path.is_file():
        pytest.fail(
            f"{path} is missing: this test checks the real AI4I dataset. Put {name} there or "
            f"set {DATASET_ENV} to its folder (`make test` sets it from ../shared/data).",
            pytrace=False,
        )
    return path


def nab_stream(key: str) -> NabFile:
    """One stream of the NAB development corpus in ``../shared/data/nab-dev`` by its key
    (``realKnownCause/nyc_taxi.csv``); fails the test loudly when the corpus is missing."""
    root = reference_data_dir() / "nab-dev"
    if not root.is_dir():
        pytest.fail(f"{root} is missing: the NAB development corpus ships in ../shared/data")
    return next(f for f in nab.load_nab(root) if f.key == key)


CLI = list(_CLI)

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    *,
    poll_s: float = 0.05,
    errors: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail (an
    ``AssertionError`` naming ``what``) after ``timeout`` seconds.

    The one way tests wait: on a condition, never a fixed sleep. An exception in ``errors``
    raised by ``predicate`` (state read over HTTP that is not there yet) counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except errors as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what} (last: {last!r})"
            )
        time.sleep(min(poll_s, left))  # polling a condition with a deadline, not a fixed wait


#: A typical AI4I reading, inside every training envelope (copy it before changing a channel).
TYPICAL: Final = {
    "air_temperature_k": 300.0,
    "process_temperature_k": 310.0,
    "rotational_speed_rpm": 1500.0,
    "torque_nm": 40.0,
    "tool_wear_min": 100.0,
}


def run_cli(
    *args: str, timeout: float = 60.0, cwd: Path = PROJECT_DIR
) -> subprocess.CompletedProcess[str]:
    """Run ``factorywatch ARGS`` to its end (output captured, exit code not checked)."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


@dataclass(frozen=True)
class CliRun:
    """What an in-process ``factorywatch`` command returned and printed."""

    returncode: int
    stdout: str
    stderr: str


def cli_in_process(*args: str) -> CliRun:
    """Run ``factorywatch ARGS`` through ``cli.main`` in this process, its stdout and stderr
    captured; structlog's defaults are put back afterwards (main() configures it for the
    process, pointing it at the captured stderr).

    For a test of what a command does and says; ``run_cli`` (a real process) for one of how
    the process behaves (its logging setup, signals, exit)."""
    from factorywatch.cli import main  # noqa: PLC0415 - the CLI's imports are heavy

    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: a usage error, or --help
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        structlog.reset_defaults()
    return CliRun(code, out.getvalue(), err.getvalue())


#: The small fixture model: AI4I-shaped readings of simulated machines, a few trees.
SMALL_MODEL_MACHINES: Final = 40
SMALL_MODEL_READINGS: Final = 15  # kept per machine: 600 rows
SMALL_MODEL_STRIDE: Final = 10  # one reading kept in ten: the tool wears through its cycle
SMALL_MODEL_TREES: Final = 25


def small_ai4i_csv(path: Path) -> Path:
    """Write 600 normal readings of 40 simulated machines in the AI4I (UCI) layout, as
    `factorywatch history export` writes them (every label 0); deterministic."""
    from factorywatch.history_episodes import write_ai4i_csv  # noqa: PLC0415

    rows = []
    for i in range(SMALL_MODEL_MACHINES):
        sim = MachineSimulator(f"sim-{i}", "line1", seed=i)
        for step in range(SMALL_MODEL_READINGS * SMALL_MODEL_STRIDE):
            r = sim.next(1_700_000_000.0 + step)
            if step % SMALL_MODEL_STRIDE == SMALL_MODEL_STRIDE - 1:
                product = r.attributes["product_type"]
                rows.append({"seq": r.seq, "product_type": product, "readings": r.readings})
    with path.open("w", newline="") as out:
        write_ai4i_csv(rows, out)
    return path


def train_small_model(model_dir: Path, *, feature_set: str | None = None) -> Path:
    """Fit, save and promote a 25-tree model on ``small_ai4i_csv`` (what `factorywatch train
    --csv FILE --trees 25` does, in-process, in well under a second); return ``model_dir``.

    For tests that need *a* model the detector loads; a test of the AI4I figures trains on
    the real dataset in tests/integration."""
    from factorywatch.model import artifact, dataset, train  # noqa: PLC0415
    from factorywatch.model.features import DEFAULT_FEATURE_SET  # noqa: PLC0415

    model_dir.mkdir(parents=True, exist_ok=True)
    data = dataset.load(small_ai4i_csv(model_dir.parent / f"{model_dir.name}.csv"), verify=False)
    forest, card = train.fit(
        data, feature_set=feature_set or DEFAULT_FEATURE_SET, n_estimators=SMALL_MODEL_TREES
    )
    artifact.save(model_dir, forest, card)
    artifact.promote(model_dir, card.version)
    return model_dir


def reading(
    machine: str,
    seq: int,
    rpm: float = TYPICAL["rotational_speed_rpm"],
    *,
    ts: float | None = None,
    line: str = "line1",
    product_type: str = "L",
    **channels: float,
) -> Telemetry:
    """A typical AI4I reading with the given speed (2800 rpm is far outside training) and
    other ``channels`` changed; ``ts`` defaults to now."""
    return Telemetry(
        machine_id=machine,
        line=line,
        seq=seq,
        ts=time.time() if ts is None else ts,
        attributes={"product_type": product_type},
        readings={**TYPICAL, "rotational_speed_rpm": rpm, **channels},
    )


def add_account(secrets_dir: Path, user: str, role: Role, **registration: Any) -> None:
    """Register ``user`` with ``role`` (``line``, ``machines`` for a gateway) and give it a
    password, as `factorywatch broker add-user` does."""
    register(secrets_dir, user, role, **registration)
    add_user(secrets_dir, user)


def secure_args(port: int, topic_root: str, secrets_dir: Path) -> list[str]:
    """CLI arguments that point a role at a broker with logins, its account from ``secrets_dir``."""
    return ["--port", str(port), "--topic-root", topic_root, "--secrets-dir", str(secrets_dir)]


def start_secure_detector(
    spawn: Callable[..., Proc],
    port: int,
    topic_root: str,
    secrets_dir: Path,
    model_dir: Path,
    state_dir: Path,
    env: dict[str, str] | None = None,
) -> Proc:
    """A real detector (persistent session, its state in ``state_dir``) logged in to a broker
    with logins, once it has subscribed to telemetry."""
    proc = spawn(
        "detect",
        *secure_args(port, topic_root, secrets_dir),
        "--model-dir", str(model_dir),
        "--state-dir", str(state_dir),
        "--metrics-port", str(free_port()),
        name="detector",
        env=env,
    )  # fmt: skip
    proc.wait_log("telemetry_subscribed")
    return proc


def login_settings(
    port: int, topic_root: str, secrets_dir: Path, user: str, **overrides: Any
) -> BrokerSettings:
    """Broker settings that log in as ``user`` with the password its secrets folder keeps
    (``overrides``: more fields, e.g. ``connect_retries=0``)."""
    password = SecretStr(read_password(secrets_dir, user) or "")
    return BrokerSettings().with_overrides(
        port=port, topic_root=topic_root, username=user, password=password, **overrides
    )


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


class Proc(Launched):
    """A factorywatch CLI process (``factorywatch --log-format json <args>``), run from the repo."""

    def __init__(self, args: Sequence[str], log_file: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        super().__init__(
            cli_command(*args), log_file, cwd=PROJECT_DIR, env=child_env(env), name=args[0]
        )


def scrape(port: int, path: str) -> tuple[int, str]:
    """GET a path of a detector's metrics server: (HTTP status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (fails when it is absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in metrics")


def verdict_counts(messages: Sequence[Message]) -> Counter[tuple[str, int]]:
    """How many verdict messages each reading ``(machine_id, seq)`` got."""
    return Counter(
        (str(body["machine_id"]), int(body["seq"]))
        for body in (json.loads(m.payload) for m in messages)
    )


def duplicated(counts: Counter[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The readings with more than one verdict, and how many each got."""
    return {key: n for key, n in counts.items() if n > 1}


END_MARKER = "end-marker"


def await_end_marker(
    settings: BrokerSettings, collector: Collector, line: str = "line1", timeout: float = 30.0
) -> None:
    """Send one reading of machine ``end-marker`` on ``line``; wait for its verdict.

    Call it once the readings under test were acknowledged by the broker. The detector
    answers in the order the broker delivers, so when the marker's verdict has arrived every
    verdict of an earlier reading (a duplicate included) has arrived too: after this, a test
    can count verdicts instead of sleeping and hoping nothing else comes.
    """
    publisher = SensorPublisher(settings, END_MARKER, buffer_size=10)
    publisher.start()
    publisher.publish(MachineSimulator(END_MARKER, line, seed=0).next(time.time()))
    stats = publisher.close()
    assert stats.acknowledged == 1, f"end marker not acknowledged: {stats}"
    found = collector.wait_for(
        lambda m: m.topic.endswith(f"/{line}/{END_MARKER}/verdict"), timeout=timeout
    )
    assert found, f"no verdict for the end marker on {line} within {timeout} s"


def not_marker(message: Message) -> bool:
    """True for any message but the end marker's (see ``await_end_marker``)."""
    return f"/{END_MARKER}/" not in message.topic
