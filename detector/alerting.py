"""Per-machine alert state machine: k-of-n raise, m-normal clear, acknowledgement, offline.

Pure: verdicts, acknowledgements and the current time go in, ``AlertEvent`` transitions come
out; no paho, no logging, no clock reads. The shell publishes each event on
``topics.event(line, machine)`` and then ``state(machine)`` retained on
``topics.state(line, machine)``; per-reading verdicts keep flowing unchanged.

Per machine::

    NORMAL --k of the last n readings anomalous--> ALERT --m clear readings in a row--> NORMAL
    any    --no reading for offline_after_s, or the sensor's last will--> OFFLINE
    OFFLINE --a new reading--> back to NORMAL or ALERT, whichever the readings say

OFFLINE overlays the alert state without resetting it: an alert open when a machine went
silent is still open when it comes back. A reading whose identity (its ingest's, see
``detector/ingest.py``) is among the last ones applied to the machine (a redelivery) is
ignored entirely; the state lives in ``detector/state.py``'s records, so it can be
checkpointed and restored.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from factorywatch.contracts import (
    AckCommand,
    AlertEvent,
    AlertEventKind,
    MachineCondition,
    MachineState,
    OfflineReason,
    Verdict,
)
from factorywatch.detector.state import MachineRecord, StateTable, WindowEntry
from factorywatch.model.alert_rule import ALARM_K, ALARM_M, ALARM_N

DEFAULT_K: Final = ALARM_K
DEFAULT_N: Final = ALARM_N
DEFAULT_M: Final = ALARM_M
DEFAULT_OFFLINE_AFTER_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """When an alert is raised and cleared, and when a machine counts as offline.

    * ``k`` of the last ``n`` readings anomalous (verdict status ``ALERT``) raise an alert;
      ``k=1`` raises on the first anomalous reading, ``k=n`` needs n in a row.
    * ``m`` consecutive *clear* readings clear it (the hysteresis: a lone normal reading in
      the middle of an incident does not clear it, a lone anomaly does not raise one). A
      reading is clear when its score is at or below the model's lower clear threshold
      (``observe(..., clear_threshold=)``); one between the two thresholds is neither
      anomalous nor clear, and restarts the streak.
    * ``offline_after_s`` seconds (detector clock) without a reading make a machine OFFLINE.
    """

    k: int = DEFAULT_K
    n: int = DEFAULT_N
    m: int = DEFAULT_M
    offline_after_s: float = DEFAULT_OFFLINE_AFTER_S

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise ValueError(f"alert policy needs 1 <= k <= n, got k={self.k}, n={self.n}")
        if self.m < 1:
            raise ValueError(f"alert policy needs m >= 1, got m={self.m}")
        if not (math.isfinite(self.offline_after_s) and self.offline_after_s > 0):
            raise ValueError(f"offline_after_s must be > 0, got {self.offline_after_s}")


class AlertTracker:
    """The alert state of every machine; feed it verdicts, acks and the time."""

    def __init__(self, policy: AlertPolicy | None = None, table: StateTable | None = None) -> None:
        self.policy = policy if policy is not None else AlertPolicy()
        self.table = table if table is not None else StateTable()

    @property
    def machines(self) -> list[str]:
        """Ids of every machine a reading has been seen from, sorted."""
        return sorted(r.machine_id for r in self.table)

    def applied(self, machine_id: str, identity: str) -> bool:
        """Whether the reading ``identity`` was already applied to the machine's state."""
        record = self.table.get(machine_id)
        return record is not None and identity in record.recent

    def observe(
        self,
        verdict: Verdict,
        now: float,
        clear_threshold: float | None = None,
        *,
        identity: str | None = None,
        digest: int = 0,
        live: bool = True,
    ) -> list[AlertEvent]:
        """Account one reading's verdict; return the transitions it caused (often none).

        ``live=False`` (store-and-forward data of the past): the reading is remembered (a
        redelivery stays a duplicate) and shows the machine is reporting, but it is not the
        present, so it neither counts in the k-of-n window nor raises or clears an alert.

        ``identity`` names the reading as its ingest does (default: its ``seq``); a reading
        already applied to the machine (a redelivery) changes nothing.

        ``clear_threshold``: the score a reading must not exceed to count toward clearing an
        open alert (default: any NORMAL verdict counts).
        """
        key = str(verdict.seq) if identity is None else identity
        machine = self.table.get(verdict.machine_id)
        events: list[AlertEvent] = []
        if machine is None:
            machine = MachineRecord(
                machine_id=verdict.machine_id,
                line=verdict.line,
                window=deque(maxlen=self.policy.n),
                since=now,
                last_seen=now,
                last_seq=verdict.seq,
                last_score=verdict.score,
            )
            self.table.add(machine)
        elif key in machine.recent:
            return []  # a redelivery: counting it again would skew the window
        elif machine.offline_since is not None:
            offline_for = max(0.0, now - machine.offline_since)
            machine.offline_since = None
            machine.since = now
            events.append(
                self._event(machine, "MACHINE_ONLINE", now, seq=verdict.seq, duration=offline_for)
            )
        self.table.touch(machine.machine_id)
        machine.remember(key, digest)
        machine.line = verdict.line
        machine.last_seen = now
        if live:
            machine.last_seq, machine.last_score = verdict.seq, verdict.score
        if verdict.status == "CALIBRATING" or not live:
            return events  # no model judged it, or of the past: the window does not count it
        anomalous = verdict.status == "ALERT"
        reading = WindowEntry(anomalous, verdict.score, verdict.explanation if anomalous else None)
        machine.window.append(reading)
        if machine.alert_id is None:
            if machine.anomalous_in_window() >= self.policy.k:
                events.append(self._raise(machine, verdict.seq, now))
        else:
            self._update_peak(machine, reading)
            clear = not anomalous and (clear_threshold is None or verdict.score <= clear_threshold)
            machine.normal_streak = machine.normal_streak + 1 if clear else 0
            if machine.normal_streak >= self.policy.m:
                events.append(self._clear(machine, verdict.seq, now))
        return events

    def acknowledge(self, cmd: AckCommand, now: float) -> list[AlertEvent]:
        """Acknowledge the machine's open alert, once; anything else is ignored (no events)."""
        machine = self.table.get(cmd.machine_id)
        if (
            machine is None
            or machine.alert_id is None
            or machine.acknowledged_by is not None
            or (cmd.alert_id is not None and cmd.alert_id != machine.alert_id)
        ):
            return []
        machine.acknowledged_by = cmd.by
        self.table.touch(machine.machine_id)
        return [
            self._event(
                machine,
                "ALERT_ACKNOWLEDGED",
                now,
                duration=self._open_for(machine, now),
                acknowledged_by=cmd.by,
                note=cmd.note,
            )
        ]

    def rebaselined(self, machine_id: str, now: float, seq: int, note: str) -> list[AlertEvent]:
        """The machine re-baselines (``model.rebaseline``): its open alert clears, ``note``
        saying why, and its k-of-n window starts over."""
        machine = self.table.get(machine_id)
        if machine is None or machine.alert_id is None:
            return []
        self.table.touch(machine_id)
        return [self._clear(machine, seq, now, note=note)]

    def sensor_offline(
        self, machine_id: str, now: float, reason: OfflineReason = "last_will"
    ) -> list[AlertEvent]:
        """The sensor's status turned ``offline`` (its last will or a clean shutdown), or its
        Sparkplug node or device announced its death (``reason`` ``ndeath`` / ``ddeath``).

        A machine no reading has been seen from is ignored: it has no state to change, and
        its status topic carries no production line to publish under.
        """
        machine = self.table.get(machine_id)
        if machine is None or machine.offline_since is not None:
            return []
        return [self._offline(machine, now, reason)]

    def tick(
        self, now: float, timeout_of: Callable[[str, float], float | None] | None = None
    ) -> list[AlertEvent]:
        """Call periodically: machines silent for more than ``offline_after_s`` go OFFLINE.

        ``timeout_of(machine, offline_after_s)`` may set another limit per machine, or None
        for none (a Sparkplug device reports by exception: it is offline on its death).
        """
        default = self.policy.offline_after_s
        events = []
        for machine in sorted(self.table, key=lambda r: r.machine_id):
            if machine.offline_since is not None:
                continue
            limit = default if timeout_of is None else timeout_of(machine.machine_id, default)
            if limit is not None and now - machine.last_seen > limit:
                events.append(self._offline(machine, now, "silence"))
        return events

    def state(self, machine_id: str) -> MachineState:
        """The current state of one machine (``KeyError`` if no reading was seen from it)."""
        machine = self.table[machine_id]
        condition: MachineCondition
        if machine.offline_since is not None:
            condition = "OFFLINE"
        elif machine.alert_id is not None:
            condition = "ALERT"
        else:
            condition = "NORMAL"
        return MachineState(
            machine_id=machine.machine_id,
            line=machine.line,
            state=condition,
            since=machine.since,
            last_seen=machine.last_seen,
            last_seq=machine.last_seq,
            last_score=machine.last_score,
            alert_id=machine.alert_id,
            alert_since=machine.alert_since,
            acknowledged=machine.acknowledged_by is not None,
            acknowledged_by=machine.acknowledged_by,
            peak_score=machine.peak_score,
            explanation=machine.peak_explanation,
            anomalous_in_window=machine.anomalous_in_window(),
            window_size=self.policy.n,
            alerts_raised=machine.alerts_raised,
            **machine.tuning.state_fields(),
        )

    def states(self) -> list[MachineState]:
        """The current state of every machine, sorted by machine id."""
        return [self.state(machine_id) for machine_id in self.machines]

    # -- transitions ------------------------------------------------------------------------
    def _raise(self, machine: MachineRecord, seq: int, now: float) -> AlertEvent:
        peak = max((r for r in machine.window if r.anomalous), key=lambda r: r.score)
        # Unique for all time: a sequence number restarts (a Sparkplug rebirth, a sensor
        # restarted with a new --seq-start), so the id is the machine, when the alert was
        # raised (ms, detector clock) and the machine's episode count (journaled with it).
        machine.alert_id = f"{machine.machine_id}-{round(now * 1000)}-{machine.alerts_raised + 1}"
        machine.alert_since = now
        machine.since = now
        machine.peak_score, machine.peak_explanation = peak.score, peak.explanation
        machine.normal_streak = 0
        machine.acknowledged_by = None
        machine.alerts_raised += 1
        return self._event(machine, "ALERT_RAISED", now, seq=seq, duration=0.0)

    def _clear(
        self, machine: MachineRecord, seq: int, now: float, *, note: str | None = None
    ) -> AlertEvent:
        event = self._event(
            machine,
            "ALERT_CLEARED",
            now,
            seq=seq,
            duration=self._open_for(machine, now),
            note=note,
        )
        machine.alert_id = machine.alert_since = None
        machine.peak_score = machine.peak_explanation = None
        machine.acknowledged_by = None
        machine.normal_streak = 0
        machine.since = now
        # a fresh start: with m < n, anomalies still in the window would re-raise at once
        machine.window.clear()
        return event

    def _offline(self, machine: MachineRecord, now: float, reason: OfflineReason) -> AlertEvent:
        self.table.touch(machine.machine_id)
        machine.offline_since = now
        machine.since = now
        silent_for = max(0.0, now - machine.last_seen)
        return self._event(machine, "MACHINE_OFFLINE", now, duration=silent_for, reason=reason)

    @staticmethod
    def _update_peak(machine: MachineRecord, reading: WindowEntry) -> None:
        if machine.peak_score is None or reading.score > machine.peak_score:
            machine.peak_score = reading.score
            if reading.explanation:
                machine.peak_explanation = reading.explanation

    @staticmethod
    def _open_for(machine: MachineRecord, now: float) -> float:
        return 0.0 if machine.alert_since is None else max(0.0, now - machine.alert_since)

    def _event(
        self,
        machine: MachineRecord,
        kind: AlertEventKind,
        now: float,
        *,
        seq: int | None = None,
        duration: float | None = None,
        acknowledged_by: str | None = None,
        note: str | None = None,
        reason: OfflineReason | None = None,
    ) -> AlertEvent:
        return AlertEvent(
            machine_id=machine.machine_id,
            line=machine.line,
            event=kind,
            at=now,
            seq=seq,
            alert_id=machine.alert_id,
            peak_score=machine.peak_score,
            duration_s=duration,
            anomalous_in_window=machine.anomalous_in_window(),
            explanation=machine.peak_explanation,
            acknowledged_by=acknowledged_by,
            note=note,
            reason=reason,
        )
