"""What the web view shows live: per-machine tiles fed from the broker, fanned out to browsers.

:class:`LiveModel` is pure (messages in, JSON-ready dicts out). :class:`Hub` runs in the
event loop: the paho thread hands it messages, a ticker coalesces every change of the last
``TICK_S`` into one update per browser (a burst of verdicts is one push, not a storm), and a
browser that cannot keep up is dropped (its EventSource reconnects and gets a snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from factorywatch import contracts
from factorywatch.contracts import (
    AlertEvent,
    FeedbackCommand,
    MachineState,
    Telemetry,
    Verdict,
)
from factorywatch.errors import PayloadError
from factorywatch.topics import Topics

TICK_S: Final = 0.5
CLIENT_QUEUE: Final = 64
CLOSE: Final = ""  # queued to a browser's stream to end it


def _decode(model: type[contracts.W], payload: bytes, now: float | None = None) -> contracts.W:
    """``contracts.decode``; without ``now`` only the bounds that need no clock are checked."""
    if now is None:
        return contracts.decode(model, payload, now=0.0, max_future_s=float("inf"))
    return contracts.decode(model, payload, now=now)


@dataclass
class Machine:
    """Everything the web view knows about one machine right now."""

    machine_id: str
    line: str
    points: deque[list[Any]]  # [reading_ts, score, threshold, status]
    readings: deque[list[Any]]  # [ts, {channel: value}]
    state: str | None = None
    since: float | None = None
    alert_id: str | None = None
    alert_since: float | None = None
    acknowledged_by: str | None = None
    peak_score: float | None = None
    explanation: list[dict[str, Any]] = field(default_factory=list)
    outside_training: list[str] = field(default_factory=list)  # of the latest ALERT reading
    surprise: float | None = None  # of the latest ALERT reading
    last_score: float | None = None
    last_status: str | None = None
    threshold: float | None = None
    model_version: str | None = None
    last_seen: float | None = None  # the latest reading's time, from verdicts and states
    alerts_raised: int = 0
    label: str | None = None  # an operator's label of the open alert (false_alarm/confirmed)
    labelled_by: str | None = None
    # its own threshold (feedback / an operator changed it), latest changes, alarm rate
    own_threshold: float | None = None
    threshold_changes: list[dict[str, Any]] = field(default_factory=list)
    alarm_rate: float | None = None
    alarm_rate_bound: float | None = None
    alarm_rate_out_of_bound: bool = False
    new_points: list[list[Any]] = field(default_factory=list)
    new_readings: list[list[Any]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """``line/machine``: how the browser names it."""
        return f"{self.line}/{self.machine_id}"

    def tile(self) -> dict[str, Any]:
        """The tile's fields (no series)."""
        return {
            "key": self.key,
            "machine_id": self.machine_id,
            "line": self.line,
            "state": self.state,
            "since": self.since,
            "alert_id": self.alert_id,
            "alert_since": self.alert_since,
            "acknowledged_by": self.acknowledged_by,
            "peak_score": self.peak_score,
            "explanation": self.explanation,
            "outside_training": self.outside_training,
            "surprise": self.surprise,
            "last_score": self.last_score,
            "last_status": self.last_status,
            "threshold": self.threshold,
            "model_version": self.model_version,
            "last_seen": self.last_seen,
            "alerts_raised": self.alerts_raised,
            "label": self.label,
            "labelled_by": self.labelled_by,
            "own_threshold": self.own_threshold,
            "threshold_changes": self.threshold_changes,
            "alarm_rate": self.alarm_rate,
            "alarm_rate_bound": self.alarm_rate_bound,
            "alarm_rate_out_of_bound": self.alarm_rate_out_of_bound,
        }

    def full(self) -> dict[str, Any]:
        """Tile plus every series the browser draws."""
        return {**self.tile(), "points": list(self.points), "readings": list(self.readings)}


#: names whose readings are held before the detector answers for them (``LiveModel.pending``)
PENDING_MACHINES: Final = 1000


@dataclass
class LiveModel:
    """Machines fed from the alerts tree and telemetry (pure: no I/O)."""

    topics: Topics
    history: int = 300
    machines: dict[str, Machine] = field(default_factory=dict)
    ignored: int = 0
    #: readings of machines the detector has not answered for yet (a reading reaches the
    #: view before its verdict): held, at most ``history`` each for ``PENDING_MACHINES``
    #: names, until a verdict, event or state makes the machine's tile; never a tile
    pending: dict[str, deque[list[Any]]] = field(default_factory=dict)

    def machine(self, line: str, machine_id: str) -> Machine:
        """The machine's record, created on first sight (with its held readings)."""
        key = f"{line}/{machine_id}"
        found = self.machines.get(key)
        if found is None:
            held = self.pending.pop(key, deque())
            found = Machine(
                machine_id, line, deque(maxlen=self.history), deque(held, maxlen=self.history)
            )
            found.new_readings = list(held)
            self.machines[key] = found
        return found

    def feed(self, topic: str, payload: bytes, now: float | None = None) -> str | None:
        """Apply one message; return the key of the machine it changed (None: ignored).

        Decoded by the contracts' one decoder; with ``now`` (the receiver's clock) a message
        stamped in the future is ignored too (a 2099 reading would freeze the charts).
        """
        try:
            if topic.startswith(f"{self.topics.root}/commands/"):
                return self._feedback(topic, payload, now)
            if topic.startswith(f"{self.topics.root}/telemetry/"):
                return self._telemetry(topic, payload, now)
            line, machine_id, leaf = self.topics.parse_alert(topic)
            if leaf == "state" and not payload:
                self.machines.pop(f"{line}/{machine_id}", None)  # retired machine
                return f"{line}/{machine_id}"
            message: Verdict | AlertEvent | MachineState
            if leaf == "verdict":
                message = _decode(Verdict, payload, now)
            elif leaf == "event":
                message = _decode(AlertEvent, payload, now)
            else:
                message = _decode(MachineState, payload, now)
            if (message.line, message.machine_id) != (line, machine_id):
                raise PayloadError("topic_mismatch", topic)
        except (PayloadError, ValueError):
            self.ignored += 1
            return None
        m = self.machine(line, machine_id)
        if isinstance(message, Verdict):
            self._apply_verdict(m, message)
        elif isinstance(message, MachineState):
            self._apply_state(m, message)
        else:
            self._apply_event(m, message)
        return m.key

    def _telemetry(self, topic: str, payload: bytes, now: float | None) -> str | None:
        """A reading for the channel charts of a machine the detector has answered for (a
        verdict, event or state came): raw telemetry of a name the detector never accepted
        (an account publishing on its own login, a forged line) makes no tile."""
        line, machine_id = self.topics.parse_telemetry(topic)
        reading = _decode(Telemetry, payload, now)
        if (reading.line, reading.machine_id) != (line, machine_id):
            raise PayloadError("topic_mismatch", topic)
        key = f"{line}/{machine_id}"
        m = self.machines.get(key)
        row = [reading.ts, reading.readings]
        if m is None:
            self.ignored += 1
            held = self.pending.pop(key, None) or deque(maxlen=self.history)
            held.append(row)
            self.pending[key] = held  # the most recently heard name last
            while len(self.pending) > PENDING_MACHINES:
                del self.pending[next(iter(self.pending))]
            return None
        m.readings.append(row)
        m.new_readings.append(row)
        return m.key

    def _feedback(self, topic: str, payload: bytes, now: float | None) -> str | None:
        """An operator's label: shown on the machine while it is about the open alert."""
        line, machine_id = self.topics.parse_feedback(topic)
        cmd = _decode(FeedbackCommand, payload, now)
        m = self.machines.get(f"{line}/{machine_id}")
        if cmd.machine_id != machine_id or m is None:
            self.ignored += 1
            return None
        if cmd.alert_id != m.alert_id:
            return None  # about an earlier alert: the machine page's history shows it
        m.label, m.labelled_by = cmd.label, cmd.by
        return m.key

    @staticmethod
    def _apply_verdict(m: Machine, v: Verdict) -> None:
        # the retained state is republished only on a change of state: each verdict is a
        # sign of life of its own
        m.last_seen = max(m.last_seen or v.reading_ts, v.reading_ts)
        if v.status == "CALIBRATING":  # no score yet: the machine's model is being calibrated
            progress = v.calibration
            m.last_status = (
                f"CALIBRATING {progress.seen}/{progress.needed}" if progress else "CALIBRATING"
            )
            return
        point = [v.reading_ts, v.score, v.threshold, v.status]
        m.points.append(point)
        m.new_points.append(point)
        m.last_score, m.last_status = v.score, v.status
        m.threshold, m.model_version = v.threshold, v.model_version
        if v.status == "ALERT":
            m.outside_training = list(v.outside_training or [])
            m.surprise = v.surprise

    @staticmethod
    def _apply_state(m: Machine, s: MachineState) -> None:
        if s.alert_id != m.alert_id:
            m.label = m.labelled_by = None
        m.state, m.since, m.alert_id, m.alert_since = s.state, s.since, s.alert_id, s.alert_since
        m.acknowledged_by, m.peak_score = s.acknowledged_by, s.peak_score
        m.explanation = [c.model_dump() for c in s.explanation or []]
        m.last_seen = max(filter(None, (m.last_seen, s.last_seen)), default=None)
        m.alerts_raised = s.alerts_raised
        m.own_threshold = s.threshold
        m.threshold_changes = [c.model_dump() for c in s.threshold_changes or []]
        m.alarm_rate, m.alarm_rate_bound = s.alarm_rate, s.alarm_rate_bound
        m.alarm_rate_out_of_bound = s.alarm_rate_out_of_bound
        if m.last_score is None:
            m.last_score = s.last_score

    @staticmethod
    def _apply_event(m: Machine, e: AlertEvent) -> None:
        if e.event == "ALERT_RAISED":
            if e.alert_id != m.alert_id:
                m.label = m.labelled_by = None
            m.state, m.since, m.alert_id, m.alert_since = "ALERT", e.at, e.alert_id, e.at
            m.acknowledged_by, m.peak_score = None, e.peak_score
            m.explanation = [c.model_dump() for c in e.explanation or []]
        elif e.event == "ALERT_CLEARED":
            m.state, m.since, m.alert_id, m.acknowledged_by = "NORMAL", e.at, None, None
            m.label = m.labelled_by = None
            m.outside_training = []
            m.surprise = None
        elif e.event == "ALERT_ACKNOWLEDGED":
            m.acknowledged_by = e.acknowledged_by
        elif e.event == "MACHINE_OFFLINE":
            m.state, m.since = "OFFLINE", e.at
        else:
            m.state, m.since = ("ALERT" if m.alert_id else "NORMAL"), e.at

    def snapshot(self) -> list[dict[str, Any]]:
        """Every machine with its series, in a stable order."""
        return [self.machines[k].full() for k in sorted(self.machines)]

    def delta(self, keys: set[str]) -> dict[str, Any]:
        """Tiles of the changed machines plus the points/readings added since the last delta."""
        changed, removed = [], []
        for key in sorted(keys):
            m = self.machines.get(key)
            if m is None:
                removed.append(key)
                continue
            changed.append({**m.tile(), "new_points": m.new_points, "new_readings": m.new_readings})
            m.new_points, m.new_readings = [], []
        return {"machines": changed, "removed": removed}


class Hub:
    """The live model in the event loop, fanned out to every connected browser."""

    def __init__(self, model: LiveModel) -> None:
        self.model = model
        self.connected = False
        self._dirty: set[str] = set()
        self._clients: set[asyncio.Queue[str]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._early: list[tuple[str, bytes]] = []
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Bind to the running loop, take what arrived before, start the ticker."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._loop = loop
            early, self._early = self._early, []
        for topic, payload in early:
            self._ingest(topic, payload)
        self._ticker = loop.create_task(self._tick())

    async def stop(self) -> None:
        """Stop the ticker."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    def submit(self, topic: str, payload: bytes) -> None:
        """Thread-safe: called from the paho thread (kept until the loop runs, e.g. the
        retained states that arrive while the server is still starting)."""
        with self._lock:
            if self._loop is None:
                self._early.append((topic, payload))
                return
            loop = self._loop
        loop.call_soon_threadsafe(self._ingest, topic, payload)

    def set_connected(self, connected: bool) -> None:
        """Thread-safe: the broker link went up or down (a plain flag read by the loop)."""
        self.connected = connected

    def _ingest(self, topic: str, payload: bytes) -> None:
        key = self.model.feed(topic, payload, time.time())
        if key is not None:
            self._dirty.add(key)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)  # the coalescing period, not a synchronisation
            if not self._dirty:
                continue
            keys, self._dirty = self._dirty, set()
            update = json.dumps({**self.model.delta(keys), "connected": self.connected})
            for q in list(self._clients):
                try:
                    q.put_nowait(update)
                except asyncio.QueueFull:  # too slow: close its stream; the browser reconnects
                    self._clients.discard(q)
                    q.get_nowait()
                    q.put_nowait(CLOSE)

    def subscribe(self) -> tuple[asyncio.Queue[str], str]:
        """A queue of updates for one browser, and the snapshot it starts from."""
        q: asyncio.Queue[str] = asyncio.Queue(maxsize=CLIENT_QUEUE)
        self._clients.add(q)
        # pending deltas belong to the next tick; the snapshot already contains their points
        return q, json.dumps({"machines": self.model.snapshot(), "connected": self.connected})

    def unsubscribe(self, q: asyncio.Queue[str]) -> None:
        """Forget a browser."""
        self._clients.discard(q)

    @property
    def clients(self) -> int:
        """Browsers connected now."""
        return len(self._clients)
