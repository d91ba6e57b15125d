"""The policy every transport shares around the engine: batches in, sends and acks out.

Pure apart from counting (``detector/shell_common.py``'s counters, metrics and the events it
logs): no transport, no store, no clock reads — the time comes in as ``now``. A driver shell
(``detector/mosquitto_shell.py`` on Mosquitto, ``detector/jetstream.py`` on NATS JetStream, the
in-memory drivers in tests) does only the I/O:

    sends = runner.handle(batch, now)          one Ticket per message, one Send per publish
    driver.publish(send) -> runner.settle(send, ok)
    settled = runner.take_settled()            messages whose publishes all confirmed
    store.write(...); store.flush()            the state they reflect is durable
    driver.ack(token) for token in settled.acks

The one rule: a message is acknowledged only once every publish it caused is confirmed and
the state store has flushed. A refused publish leaves its message unacknowledged (the
transport redelivers it) and only that message's reading ids are forgotten by the
de-duplication, so the redelivery is scored again; the machine's record still knows the
reading, so its alert window counts it once. A store that could not flush gives its messages
back the same way (``store_failed``).

``due(now)`` says which periodic work is due (drift check, model reload, heartbeat), each
period from the settings; ``health`` and ``status`` are the same on every transport.

The account registry (who may speak for which machine) is followed here, once for both
transports: ``reload_registry`` (the shells call it on the reload cadence, beside the model
reload) reads the registry file again when it changed, and ``handle`` does so before a batch
holding a reading from a sender the registry in use does not know, so a machine added while
the detector runs is scored from its first reading. The only I/O besides counting: one
``stat`` of the file then (``RegistryFile``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from factorywatch.contracts import AlertEvent, ClientStatus
from factorywatch.detector.engine import Engine, Inbound, Outcome, Publish
from factorywatch.detector.metrics import Metrics
from factorywatch.detector.registry import RegistryFile
from factorywatch.detector.shell_common import (
    Counters,
    log_events,
    reload_registry,
    report_drift,
    tally,
)
from factorywatch.detector.store import Changes, Restored

#: a loop that has not turned for this long is unhealthy
LOOP_STALE_S = 10.0
#: how often the drift window is checked
DRIFT_EVERY_S = 1.0
#: how often machines are checked for silence (offline detection), as on the JetStream shell
SILENCE_EVERY_S = 1.0
#: changed records a journaling store takes per turn once their cadence came (urgent ones
#: are not counted): a thousand machines' records are spread over some turns, not one stall
RECORDS_PER_TURN = 64


@dataclass(frozen=True, slots=True)
class RunnerSettings:
    """The periods the runner keeps (seconds) and who it is on the status topic."""

    client_id: str
    heartbeat_s: float = 15.0
    reload_interval_s: float = 5.0
    drift_every_s: float = DRIFT_EVERY_S
    #: machines silent past their limit go OFFLINE at the next check, this often
    silence_every_s: float = SILENCE_EVERY_S
    #: a journaling store takes every changed record this often (urgent ones every turn)
    records_every_s: float = 1.0
    #: and a full snapshot this often
    snapshot_every_s: float = 30.0


@dataclass(slots=True)
class Ticket:
    """A received message waiting for ``remaining`` confirmations before its own ack."""

    token: Any
    #: what handling it produced (its answered reading ids, the machines it touched)
    outcome: Outcome
    remaining: int = 0
    refused: bool = False

    @property
    def answered(self) -> list[tuple[str, int]]:
        """(identity, digest) of each reading it answered."""
        return self.outcome.answered


class Send(NamedTuple):
    """One publish to carry out; ``msg_id``: a verdict's reading identity (a transport that
    de-duplicates by message id drops a redelivered reading's second verdict by it)."""

    publish: Publish
    msg_id: str | None = None
    ticket: Ticket | None = None


@dataclass(slots=True)
class Settled:
    """Messages whose every publish confirmed: ack them once the store has flushed."""

    tickets: list[Ticket] = field(default_factory=list)

    @property
    def acks(self) -> list[Any]:
        """The transport tokens to acknowledge."""
        return [t.token for t in self.tickets]

    @property
    def answered(self) -> list[tuple[str, int]]:
        """The reading ids these messages answered (the journal keeps them across restarts)."""
        return [pair for t in self.tickets for pair in t.answered]

    @property
    def machines(self) -> set[str]:
        """The machines whose records these messages changed."""
        return touched(t.outcome for t in self.tickets)


@dataclass(frozen=True, slots=True)
class Handled:
    """What a batch produced: the engine's outcomes, the publishes to carry out, readings."""

    outcomes: list[Outcome]
    sends: list[Send]
    readings: int


@dataclass(frozen=True, slots=True)
class Due:
    """Which periodic work is due now."""

    drift: bool = False
    reload: bool = False
    heartbeat: bool = False
    records: bool = False
    snapshot: bool = False
    silence: bool = False


_NOTHING_DUE: Final = Due()


def _verdict_ids(outcome: Outcome) -> list[str | None]:
    """For each publish of an outcome, the reading identity when it is a verdict (a
    re-answered duplicate's included: it carries its own, not the next scored reading's)."""
    return [publish.identity for publish in outcome.publishes]


def touched(outcomes: Iterable[Outcome]) -> set[str]:
    """Machines whose records the outcomes changed (a verdict or an event)."""
    machines: set[str] = set()
    for outcome in outcomes:
        machines.update(v.machine_id for v in outcome.verdicts)
        machines.update(e.machine_id for e in outcome.events)
    return machines


class Runner:
    """Drives an ``Engine`` for any transport (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        settings: RunnerSettings,
        *,
        counters: Counters | None = None,
        metrics: Metrics | None = None,
        registry_file: RegistryFile | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self.metrics = metrics if metrics is not None else Metrics()
        #: the account registry's file to follow (None: the engine's registry never changes)
        self.registry_file = registry_file
        root = engine.topics.root
        self._sender_topics = (f"{root}/telemetry/", f"{root}/batch/")
        self._settled: list[Ticket] = []
        self._last_turn: float | None = None
        # When each periodic task is next due; None: at the first ``due``.
        self._next: dict[str, float] = {}
        self._soonest = float("-inf")  # the earliest of them
        # Machines whose changed records are still to be written, RECORDS_PER_TURN a turn.
        self._backlog: list[str] = []

    # -- messages -------------------------------------------------------------------------------
    def handle(self, batch: Sequence[Inbound], now: float) -> Handled:
        """Score a batch (wall-clock ``now``); what to publish, each tied to its message."""
        if self.registry_file is not None and self._stranger_in(batch):
            self.reload_registry()  # an account added since the registry was read
        outcomes = self.engine.handle(batch, now)
        readings = tally(outcomes, self.counters, self.metrics)
        sends: list[Send] = []
        for outcome in outcomes:
            publishes = outcome.publishes
            ticket = Ticket(outcome.message.token, outcome, len(publishes))
            if not publishes:
                self._settled.append(ticket)  # nothing to wait for (a duplicate)
            elif (
                len(publishes) == 1 and outcome.answered and publishes[0].topic.endswith("/verdict")
            ):
                # the common case: one reading, its verdict alone
                sends.append(Send(publishes[0], outcome.answered[0][0], ticket))
            else:
                sends += [
                    Send(publish, msg_id, ticket)
                    for publish, msg_id in zip(publishes, _verdict_ids(outcome), strict=True)
                ]
        return Handled(outcomes, sends, readings)

    def _stranger_in(self, batch: Sequence[Inbound]) -> bool:
        """Whether a reading or batch in ``batch`` comes from a login the registry in use
        does not know (the topic's last level)."""
        registry = self.engine.registry
        if registry is None:
            return False
        senders, prefixes = registry.senders, self._sender_topics
        return any(
            m.topic.startswith(prefixes) and m.topic.rpartition("/")[2] not in senders
            for m in batch
        )

    # -- the account registry -------------------------------------------------------------------
    def reload_registry(self) -> bool:
        """Read the registry file again if it changed (added, removed or moved machines,
        gateways' and edge nodes' rights): the next batch is checked against it. False when
        unchanged, not followed, or unreadable (the registry in use stays)."""
        if self.registry_file is None:
            return False
        return reload_registry(self.engine, self.registry_file, self.counters)

    def settle(self, send: Send, ok: bool) -> None:
        """The transport confirmed (``ok``) or refused ``send``'s publish."""
        ticket = send.ticket
        if ok:
            self.engine.confirmed(send.publish)
        else:
            self.counters.publish_failures += 1
            self.metrics.publish_failures.inc()
            if ticket is not None:
                self._give_back(ticket)
        if ticket is None:
            return
        ticket.remaining -= 1
        if ticket.remaining == 0 and not ticket.refused:
            self._settled.append(ticket)

    def _give_back(self, ticket: Ticket) -> None:
        """Leave the message unacknowledged: its redelivery is scored again."""
        if not ticket.refused:
            ticket.refused = True
            self.engine.forget_ids(identity for identity, _digest in ticket.answered)

    def take_settled(self) -> Settled:
        """The messages ready to be acknowledged once the store has flushed."""
        settled, self._settled = Settled(self._settled), []
        return settled

    def store_failed(self, settled: Settled) -> None:
        """The store could not flush: ``settled``'s messages stay unacknowledged."""
        for ticket in settled.tickets:
            self._give_back(ticket)

    # -- the store ------------------------------------------------------------------------------
    def changes(
        self,
        settled: Settled,
        *,
        records: bool = False,
        snapshot: bool = False,
        machines: set[str] | None = None,
    ) -> Changes:
        """What the store must hold before ``settled`` is acknowledged: answered ids, ingest
        parts, calibration rows, urgent records, a snapshot; with ``records``, every record
        changed until now, ``RECORDS_PER_TURN`` of them in this call and as many in each
        next one until all are taken (all at once with ``snapshot`` too); for a store of
        whole records (``machines`` given, maybe empty) the records of ``machines`` and of
        the machines ``settled`` touched."""
        engine = self.engine
        changed = engine.take_urgent()
        if records and snapshot:
            changed += engine.take_dirty()
            self._backlog = []
        else:
            if records:  # every record changed until now, a slice per turn from now on
                self._backlog = engine.dirty_ids()
            if self._backlog:
                part = self._backlog[:RECORDS_PER_TURN]
                del self._backlog[:RECORDS_PER_TURN]
                changed += engine.take_dirty_of(part)
        whole = (settled.machines | machines) if machines is not None else set()
        return Changes(
            answered=settled.answered,
            ingest=engine.ingest_changes(),
            rows=engine.take_rows(),
            records=changed,
            touched=engine.records(sorted(whole)),
            snapshot=engine.snapshot() if snapshot else None,
        )

    @property
    def journaling(self) -> bool:
        """Whether changed records are still to be written (``changes``, a slice per turn):
        a shell then turns again at once instead of waiting for messages."""
        return bool(self._backlog)

    def restore(self, restored: Restored) -> None:
        """Take over what a store held: snapshot, records since, ingest parts, answered ids."""
        engine = self.engine
        if restored.snapshot is not None:
            engine.restore(restored.snapshot)
        engine.restore_records(restored.records, restored.rows)
        engine.restore_ingest_changes(restored.ingest)
        for identity, digest in restored.answered:
            engine.answered(identity, digest)
        self.counters.restored_machines = engine.machine_count()

    # -- time -----------------------------------------------------------------------------------
    def turned(self, now: float) -> None:
        """The loop turned at ``now`` (monotonic seconds): it is alive."""
        self._last_turn = now

    def due(self, now: float) -> Due:
        """Which periodic work is due at ``now`` (monotonic seconds); each is then rescheduled."""
        if now < self._soonest:
            return _NOTHING_DUE  # most turns: nothing is
        s = self.settings
        due = Due(
            drift=self._is_due("drift", now, s.drift_every_s),
            reload=self._is_due("reload", now, s.reload_interval_s),
            heartbeat=self._is_due("heartbeat", now, s.heartbeat_s),
            records=self._is_due("records", now, s.records_every_s),
            snapshot=self._is_due("snapshot", now, s.snapshot_every_s),
            silence=self._is_due("silence", now, s.silence_every_s),
        )
        self._soonest = min(self._next.values())
        return due

    def _is_due(self, name: str, now: float, period: float) -> bool:
        if now < self._next.get(name, now):
            return False
        self._next[name] = now + period
        return True

    def tick(self, now: float, *, silence: bool = True) -> tuple[list[Send], list[AlertEvent]]:
        """Stateful ingests' effects and, with ``silence`` (a shell passes ``due.silence``),
        machines silent too long go OFFLINE (wall-clock ``now``): what to publish."""
        publishes, events = self.engine.tick(now, silence=silence)
        log_events(events, self.metrics)
        return [Send(p) for p in publishes], events

    def check_drift(self) -> None:
        """Publish the drift window's figures as metrics; log when drift starts or ends."""
        report_drift(self.engine, self.metrics)

    def recover(self) -> list[Send]:
        """After a restore: the unconfirmed events to publish again."""
        return [Send(p) for p in self.engine.recover()]

    # -- health and status ----------------------------------------------------------------------
    def health(
        self, *, connected: bool, now: float, fitting: Sequence[str] = (), **extra: Any
    ) -> tuple[bool, dict[str, Any]]:
        """Healthy while connected and the loop turned within the last ``LOOP_STALE_S``."""
        age = 0.0 if self._last_turn is None else now - self._last_turn
        registry = self.engine.registry
        detail = {
            "connected": connected,
            "loop_age_s": round(age, 3),
            "model_version": self.engine.model.version,
            "machines": self.engine.machine_count(),
            "models_per_route": len(self.engine.router.models()),
            "fitting": list(fitting),
            "registry_machines": None if registry is None else len(registry.lines),
            "registry_reloads": self.counters.registry_reloads,
            **extra,
        }
        return connected and age < LOOP_STALE_S, detail

    def status(self, state: str, ts: float) -> Publish:
        """This detector's retained status (``online`` / ``offline``) at wall-clock ``ts``."""
        status = ClientStatus(
            role="detector",
            client_id=self.settings.client_id,
            state="online" if state == "online" else "offline",
            ts=ts,
            model_version=self.engine.model.version,
        )
        topic = self.engine.topics.status("detector", self.settings.client_id)
        return Publish(topic, status.encode(), retain=True)
