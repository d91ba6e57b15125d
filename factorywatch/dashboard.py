"""``factorywatch watch``: a live terminal table of every machine's alert state and scores.

``DashboardModel`` and ``render`` are pure (messages in, a rich ``Table`` out) and are tested
on a recording console; ``run_watch`` is the thin MQTT shell around them. It draws with
``rich.live.Live`` in the normal screen buffer with plain ANSI, so it works over SSH and in
tmux; on a non-terminal (a pipe, a file) it prints the final table once when it stops.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import paho.mqtt.client as mqtt
from pydantic import ValidationError
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import (
    MAX_PAYLOAD_BYTES,
    AlertEvent,
    Contribution,
    MachineState,
    Verdict,
)
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

BLOCKS: Final = "▁▂▃▄▅▆▇█"
DEFAULT_HISTORY: Final = 30
DEFAULT_REFRESH_PER_SECOND: Final = 4.0
ONCE_SETTLE_S: Final = 1.0  # --once: how long to collect retained states and recent messages
SUBSCRIBE_TIMEOUT_S: Final = 10.0
_STATE_STYLE: Final = {"NORMAL": "green", "ALERT": "bold red", "OFFLINE": "yellow"}
_CONTROL: Final = dict.fromkeys([*range(32), 127])


def sparkline(values: Sequence[float], *, lo: float | None = None, hi: float | None = None) -> str:
    """One block character (``▁`` .. ``█``) per value, scaled from ``lo`` to ``hi``.

    ``lo``/``hi`` default to the values' own range and clamp values outside them. Empty input
    gives ``""``; a flat series gives the lowest block; a non-finite value gives a space.
    """
    finite = [v for v in values if math.isfinite(v)]
    low = lo if lo is not None else min(finite, default=0.0)
    high = hi if hi is not None else max(finite, default=0.0)
    if high < low:
        raise ValueError(f"sparkline range is empty: lo={low} > hi={high}")
    span, top = high - low, len(BLOCKS) - 1
    out = []
    for value in values:
        if not math.isfinite(value):
            out.append(" ")
        elif span <= 0:
            out.append(BLOCKS[0])
        else:
            clamped = min(max(value, low), high)
            out.append(BLOCKS[round((clamped - low) / span * top)])
    return "".join(out)


def _clean(text: str) -> str:
    """Drop control characters: text from the broker must not drive the terminal."""
    return text.translate(_CONTROL)


def _explain(explanation: Sequence[Contribution]) -> str:
    return ", ".join(f"{_clean(c.feature)} z={c.z:+.1f}" for c in explanation)


@dataclass
class MachineRow:
    """What the dashboard knows about one machine."""

    machine_id: str
    line: str
    scores: deque[tuple[float, bool]]  # (score, anomalous) of recent readings, oldest first
    state: str | None = None  # NORMAL / ALERT / OFFLINE once an event or state was seen
    alert_open: bool = False
    reading_status: str | None = None  # the last verdict's per-reading status
    last_score: float | None = None
    alerts_raised: int = 0
    acknowledged_by: str | None = None
    explanation: str = ""
    model_version: str | None = None  # of this machine's newest judged verdict


@dataclass
class DashboardModel:
    """Per-machine rows fed from the alerts tree: verdicts, alert events and states."""

    topics: Topics
    history: int = DEFAULT_HISTORY
    rows: dict[tuple[str, str], MachineRow] = field(default_factory=dict)
    ignored: int = 0  # messages that were not valid verdicts, events or states
    model_version: str | None = None  # of the newest verdict
    previous_model: str | None = None  # the version before the last switch, if one was seen

    def __post_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")

    def feed(self, topic: str, payload: bytes) -> bool:
        """Apply one message from the alerts tree; False (and counted) if it is not valid."""
        try:
            line, machine, leaf = self.topics.parse_alert(topic)
        except PayloadError:
            self.ignored += 1
            return False
        if leaf == "state" and not payload:
            self.rows.pop((line, machine), None)  # retained state deleted: machine retired
            return True
        message: Verdict | AlertEvent | MachineState
        try:
            if len(payload) > MAX_PAYLOAD_BYTES:
                raise ValueError("oversize")
            if leaf == "verdict":
                message = Verdict.model_validate_json(payload)
            elif leaf == "event":
                message = AlertEvent.model_validate_json(payload)
            else:
                message = MachineState.model_validate_json(payload)
        except (ValidationError, ValueError):
            self.ignored += 1
            return False
        if (message.line, message.machine_id) != (line, machine):
            self.ignored += 1  # the topic is the trusted identity
            return False
        self.apply(message)
        return True

    def apply(self, message: Verdict | AlertEvent | MachineState) -> None:
        """Apply one decoded message."""
        row = self._row(message.line, message.machine_id)
        if isinstance(message, Verdict):
            progress = message.calibration
            if message.status == "CALIBRATING":  # no model judged it: no score to show
                row.reading_status = (
                    f"calibrating {progress.seen}/{progress.needed}" if progress else "calibrating"
                )
                return
            anomalous = message.status == "ALERT"
            row.scores.append((message.score, anomalous))
            row.last_score = message.score
            row.reading_status = message.status
            # A switch is one machine's model changing (machines may have models of their own).
            if row.model_version is not None and message.model_version != row.model_version:
                self.previous_model = row.model_version
            row.model_version = self.model_version = message.model_version
            if message.explanation:
                row.explanation = _explain(message.explanation)
        elif isinstance(message, AlertEvent):
            self._apply_event(row, message)
        else:
            row.state = message.state
            row.alert_open = message.alert_id is not None
            row.alerts_raised = max(row.alerts_raised, message.alerts_raised)
            row.acknowledged_by = message.acknowledged_by
            if row.last_score is None:
                row.last_score = message.last_score
            if message.explanation:
                row.explanation = _explain(message.explanation)

    @staticmethod
    def _apply_event(row: MachineRow, event: AlertEvent) -> None:
        kind = event.event
        if kind == "ALERT_RAISED":
            row.state, row.alert_open, row.acknowledged_by = "ALERT", True, None
            row.alerts_raised += 1
        elif kind == "ALERT_CLEARED":
            row.state, row.alert_open, row.acknowledged_by = "NORMAL", False, None
        elif kind == "ALERT_ACKNOWLEDGED":
            row.acknowledged_by = event.acknowledged_by
        elif kind == "MACHINE_OFFLINE":
            row.state = "OFFLINE"
        else:
            row.state = "ALERT" if row.alert_open else "NORMAL"
        if event.explanation and kind == "ALERT_RAISED":
            row.explanation = _explain(event.explanation)

    def _row(self, line: str, machine: str) -> MachineRow:
        key = (line, machine)
        row = self.rows.get(key)
        if row is None:
            row = MachineRow(machine_id=machine, line=line, scores=deque(maxlen=self.history))
            self.rows[key] = row
        return row

    def sorted_rows(self) -> list[MachineRow]:
        """Rows in a stable order (line, then machine), so the table does not jump around."""
        return [self.rows[key] for key in sorted(self.rows)]


def _state_cell(row: MachineRow) -> Text:
    if row.state is None:  # only verdicts so far: show the per-reading status, dimmed
        return Text((row.reading_status or "-").lower(), style="dim")
    text = Text(row.state, style=_STATE_STYLE.get(row.state, ""))
    if row.reading_status is not None and row.reading_status.startswith("calibrating"):
        text.append(f" ({row.reading_status})", style="dim")
    if row.state == "OFFLINE" and row.alert_open:
        text.append(" (alert open)", style="red")
    if row.acknowledged_by and row.alert_open:
        text.append(f" ack {_clean(row.acknowledged_by)}", style="dim")
    return text


class _Spark:
    """A sparkline cell that, when the column is narrow, keeps the newest scores."""

    MIN_WIDTH: Final = 8

    def __init__(self, row: MachineRow) -> None:
        line = sparkline([score for score, _ in row.scores])
        self.text = Text(no_wrap=True, end="")
        for char, (_, anomalous) in zip(line, row.scores, strict=True):
            self.text.append(char, style="red" if anomalous else "cyan")

    def __rich_measure__(self, _console: Console, _options: ConsoleOptions) -> Measurement:
        return Measurement(min(len(self.text), self.MIN_WIDTH), len(self.text))

    def __rich_console__(self, _console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.text[max(0, len(self.text) - options.max_width) :]


def render(model: DashboardModel, *, caption: str | None = None) -> Table:
    """The dashboard table: one row per machine."""
    rows = model.sorted_rows()
    alerting = sum(r.state == "ALERT" for r in rows)
    offline = sum(r.state == "OFFLINE" for r in rows)
    title = f"factorywatch: {len(rows)} machines, {alerting} in alert, {offline} offline"
    versions = {r.model_version for r in rows if r.model_version is not None}
    if len(versions) > 1:
        title += f"; {len(versions)} models (per machine or group)"
    elif model.model_version is not None:
        title += f"; model {_clean(model.model_version)}"
    if model.previous_model is not None:
        title += f" (switched from {_clean(model.previous_model)})"
    table = Table(
        title=title,
        caption=caption,
        expand=False,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("Machine", no_wrap=True)
    # Two different things, labelled as such: the machine's alert state (k-of-n raise, m to
    # clear) and the last single reading's score and verdict, which may disagree with it.
    table.add_column("Machine state", no_wrap=True)
    table.add_column("Last reading", justify="right", no_wrap=True)
    # the two wide columns give up width first on a narrow terminal (rich shrinks wrapable ones)
    table.add_column("Trend")
    table.add_column("Alerts", justify="right", no_wrap=True)
    table.add_column("Explanation", max_width=60)
    if not rows:
        table.add_row(Text("waiting for messages...", style="dim"), "", "", "", "", "")
    for row in rows:
        anomalous = bool(row.scores) and row.scores[-1][1]
        score = Text(
            "-" if row.last_score is None else f"{row.last_score:.3f}",
            style="red" if anomalous else "",
        )
        if row.reading_status is not None:
            score.append(" ALERT" if anomalous else " normal", style="red" if anomalous else "dim")
        table.add_row(
            Text(f"{row.line}/{row.machine_id}"),
            _state_cell(row),
            score,
            _Spark(row),
            Text(str(row.alerts_raised)),
            Text(
                row.explanation,
                style="dim" if row.state != "ALERT" else "",
                no_wrap=True,
                overflow="ellipsis",
            ),
        )
    return table


@dataclass
class _Link:
    """Connection facts the paho thread reports to the drawing loop."""

    subscribed: threading.Event = field(default_factory=threading.Event)
    refused: str | None = None
    connected: bool = False


def run_watch(
    settings: BrokerSettings,
    stop: threading.Event,
    console: Console | None = None,
    *,
    duration: float | None = None,
    once: bool = False,
    refresh_per_second: float = DEFAULT_REFRESH_PER_SECOND,
    history: int = DEFAULT_HISTORY,
    ready: threading.Event | None = None,
) -> DashboardModel:
    """Subscribe to the alerts tree and draw the table until ``stop`` (or ``duration`` s).

    ``once``: print the table a single time after collecting for ``duration`` seconds
    (default 1 s: enough for the retained states) instead of a live view. ``ready`` is set
    once the subscription is acknowledged. Raises ``BrokerError`` when the broker cannot be
    reached or refuses the subscription. Returns the final model.
    """
    if refresh_per_second <= 0:
        raise ValueError(f"refresh rate must be > 0, got {refresh_per_second}")
    console = console if console is not None else Console()
    topics = Topics(settings.topic_root)
    model = DashboardModel(topics, history)
    lock = threading.Lock()  # the paho thread feeds the model, this thread renders it
    link = _Link()
    waiter = fwmqtt.ConnectWaiter()

    def on_connect(client: mqtt.Client, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        waiter.record(reason_code)
        if not reason_code.is_failure:
            link.connected = True
            client.subscribe(topics.alerts_filter, qos=fwmqtt.QOS)

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        failed = [str(c) for c in codes if fwmqtt.reason_failed(c)]
        if failed:
            link.refused = ", ".join(failed)
        link.subscribed.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        link.connected = False

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with lock:
            model.feed(msg.topic, bytes(msg.payload))

    def snapshot() -> Table:
        status = "connected" if link.connected else "reconnecting..."
        caption = f"{settings.host}:{settings.port}  {topics.alerts_filter}  {status}"
        if not once:
            caption += "  (Ctrl-C to quit)"
        with lock:
            return render(model, caption=caption)

    client = fwmqtt.new_client(settings, f"factorywatch-watch-{uuid.uuid4().hex[:12]}")
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    fwmqtt.connect(client, settings, waiter)
    try:
        if not link.subscribed.wait(SUBSCRIBE_TIMEOUT_S) or link.refused:
            raise BrokerError(
                f"subscription to {topics.alerts_filter} refused or not acknowledged "
                f"({link.refused or 'no SUBACK'})"
            )
        if ready is not None:
            ready.set()
        if once:
            stop.wait(ONCE_SETTLE_S if duration is None else duration)
            console.print(snapshot())
            return model
        _live(console, snapshot, stop, duration, refresh_per_second)
    finally:
        client.disconnect()
        client.loop_stop()
    return model


def _live(
    console: Console,
    snapshot: Callable[[], Table],
    stop: threading.Event,
    duration: float | None,
    refresh_per_second: float,
) -> None:
    """Redraw from this thread only (auto_refresh off): no second thread reads the model."""
    deadline = None if duration is None else time.monotonic() + duration
    period = 1.0 / refresh_per_second
    with Live(snapshot(), console=console, auto_refresh=False, transient=False) as live:
        while not stop.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            stop.wait(period if left is None else min(period, left))
            live.update(snapshot(), refresh=True)
