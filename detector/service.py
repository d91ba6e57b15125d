"""The detector's shell: a transport in, the pure engine, a checkpoint, metrics and health.

One loop on one thread: ``transport.receive`` (paho's ``loop()`` for Mosquitto) returns what
arrived; the engine handles it in batches of up to ``batch_max`` messages (one vectorised
scoring call each) and says what to publish; a message is acknowledged only when every
publish it caused is confirmed (at-least-once with ack-after-verdict). Each turn then writes
the checkpoint (``detector/checkpoint.py``) before the next ``receive`` can acknowledge
anything it reflects.

Between batches: offline detection (``engine.tick``), model reload (the default ``current``
and every machine's and group's own, ``models/{machines,groups}/<name>/current``), drift
check, heartbeat, and a full snapshot every ``snapshot_every_s``.

Routes and live calibration: ``detector/calibration_worker.py`` (shared with the JetStream
runner) binds promoted route models and fits full calibration windows on a worker thread;
each turn polls it between batches.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import structlog

from factorywatch.contracts import ClientStatus
from factorywatch.detector.alerting import AlertPolicy
from factorywatch.detector.bookkeeping import (
    Counters,
    log_events,
    reload_model,
    report_drift,
    sync_drift_metrics,
    tally,
)
from factorywatch.detector.calibration_worker import CalibrationWorker, make_router
from factorywatch.detector.checkpoint import FileCheckpoint
from factorywatch.detector.engine import Engine, EngineSettings, Inbound, Publish
from factorywatch.detector.ingest import StatefulIngest
from factorywatch.detector.metrics import Metrics, serve
from factorywatch.detector.mqtt5_transport import Mqtt5Transport
from factorywatch.detector.mqtt_transport import PahoTransport
from factorywatch.detector.registry import Registry
from factorywatch.detector.transport import Transport
from factorywatch.errors import FactorywatchError
from factorywatch.model.artifact import LoadedModel
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics, sparkplug_filters

if TYPE_CHECKING:
    from factorywatch.detector.sparkplug_out import SparkplugOut

log = structlog.get_logger("detector")


@dataclass(slots=True)
class _AckTarget:
    """A received message waiting for ``remaining`` confirmations before its own ack."""

    token: Any
    answered: list[tuple[str, int]]
    remaining: int = 0
    failed: bool = False


def engine_settings(
    settings: DetectorSettings, broker: BrokerSettings | None = None
) -> EngineSettings:
    """The engine's part of the detector's settings (the registry found via ``broker``)."""
    secrets_dir = broker.secrets_dir if broker is not None else None
    return EngineSettings(
        policy=AlertPolicy(
            k=settings.alert_k,
            n=settings.alert_n,
            m=settings.alert_m,
            offline_after_s=settings.offline_after_s,
        ),
        max_clock_skew_s=settings.max_clock_skew_s,
        dedup_size=settings.dedup_size,
        explain_top_k=settings.explain_top_k,
        alert_clear_score=settings.alert_clear_score,
        drift_window=settings.drift_window,
        drift_factor=settings.drift_factor,
        max_future_skew_s=settings.max_future_skew_s,
        registry=Registry.locate(settings.registry_file, secrets_dir),
    )


def _sparkplug(settings: DetectorSettings) -> tuple[list[StatefulIngest], list[str]]:
    """The Sparkplug B ingest and its subscriptions, when enabled (else none)."""
    if not settings.sparkplug:
        return [], []
    from factorywatch.detector.sparkplug import SparkplugIngest, SparkplugSettings  # noqa: PLC0415

    groups = [g.strip() for g in (settings.sparkplug_groups or "").split(",") if g.strip()]
    ingest = SparkplugIngest(
        SparkplugSettings(
            reorder_timeout_s=settings.sparkplug_reorder_timeout_s,
            rebirth_backoff_s=settings.sparkplug_rebirth_backoff_s,
            max_clock_skew_s=settings.max_clock_skew_s,
        ),
        groups or None,
        # the detector's own verdicts (Sparkplug out) are not readings
        ignore_groups=[settings.sparkplug_out_group] if settings.sparkplug_out else (),
    )
    return [ingest], sparkplug_filters(groups or None)


def _sparkplug_out(settings: DetectorSettings, broker: BrokerSettings) -> SparkplugOut | None:
    """The detector's own Sparkplug edge node for verdicts, when enabled (else None)."""
    if not settings.sparkplug_out:
        return None
    if broker.authenticates:
        # Its second connection would log in with the detector's account, and with client
        # ids bound to logins (use_username_as_clientid) the two would take each other over.
        raise FactorywatchError(
            "Sparkplug out is not supported on an authenticating broker yet: it needs an "
            "account of its own (run it against an open broker, or leave it off)"
        )
    from factorywatch.detector.sparkplug_out import SparkplugOut  # noqa: PLC0415

    node = settings.sparkplug_out_node or settings.client_id
    return SparkplugOut(broker, settings.client_id, settings.sparkplug_out_group, node)


class DetectorService:
    """Runs the detector until ``stop`` is set; then drains in-flight work and stops."""

    def __init__(
        self,
        settings: DetectorSettings,
        broker: BrokerSettings,
        model_dir: Path,
        model: LoadedModel,
        *,
        transport: Transport | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.topics = Topics(broker.topic_root)
        self.counters = Counters()
        self.metrics = Metrics()
        self.metrics.set_model(model.version)
        self.stop = stop if stop is not None else threading.Event()
        extra, spb_filters = _sparkplug(settings)
        self.spb_out = _sparkplug_out(settings, broker)
        self.engine = Engine(
            model,
            self.topics,
            engine_settings(settings, broker),
            extra_ingests=extra,
            router=make_router(settings.asset_config, model),
        )
        self.calibration = CalibrationWorker(
            model_dir, settings.scorer, self.counters, self.metrics
        )
        # before the restore: a window already fitted is not refitted
        self.calibration.reload_routes(self.engine)
        self.checkpoint = FileCheckpoint(
            settings.state_dir, settings.client_id, max(1, settings.dedup_size)
        )
        self._restore()
        sync_drift_metrics(self.engine, self.metrics)
        self._http: WSGIServer | None = None
        self._last_loop = time.monotonic()
        # When each periodic task is next due (monotonic); 0: at the first turn.
        self._next_records = self._next_snapshot = self._next_reload = 0.0
        self._next_heartbeat = self._next_drift = 0.0
        self._status_topic = self.topics.status("detector", settings.client_id)
        lines = (
            [x.strip() for x in settings.lines.split(",") if x.strip()] if settings.lines else None
        )
        self.input_filters = self.topics.input_filters(lines) + spb_filters
        filters = [*self.input_filters, self.topics.ack_filter, self.topics.sensor_status_filter]
        offline = ClientStatus(role="detector", client_id=settings.client_id, state="offline")
        # Both drivers take the same arguments (detector/mqtt5_transport.py: the compiled codec).
        driver = Mqtt5Transport if settings.transport == "mqtt5" else PahoTransport
        self.transport: Transport = transport or driver(
            broker,
            settings.client_id,
            filters=filters,
            will=(self._status_topic, offline.encode()),
            session_expiry_s=settings.session_expiry_s,
            stop=self.stop,
            on_connected=lambda: self._publish_status("online"),
            on_connection_change=lambda up: self.metrics.connected.set(1 if up else 0),
        )

    @property
    def model(self) -> LoadedModel:
        """The model serving now."""
        return self.engine.model

    # -- restart ------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Take over what the checkpoint holds (nothing on a first start)."""
        restored = self.checkpoint.load()
        if restored.snapshot is not None:
            self.engine.restore(restored.snapshot)
        self.engine.restore_records(restored.records, restored.rows)
        self.engine.restore_ingest_changes(restored.ingest)
        for identity, digest in restored.answered:
            self.engine.answered(identity, digest)
        self.counters.restored_machines = len(self.engine.states)
        if not restored.empty:
            log.info(
                "state_restored",
                machines=len(self.engine.states),
                open_alerts=sum(1 for r in self.engine.states if r.alert_id is not None),
                answered=len(restored.answered),
                unconfirmed_events=sum(len(r.outbox) for r in self.engine.states),
            )

    # -- health -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while connected and the loop turned within the last 10 s."""
        connected = self.transport.is_connected()
        loop_age = time.monotonic() - self._last_loop
        detail = {
            "connected": connected,
            "loop_age_s": round(loop_age, 3),
            "model_version": self.model.version,
            "machines": len(self.engine.states),
            "models_per_route": len(self.engine.router.models()),
            "fitting": self.calibration.fitting,
        }
        return connected and loop_age < 10.0, detail

    def start(self) -> None:
        """Serve metrics, connect (bounded retries) and republish unconfirmed events."""
        if self.settings.metrics_port:
            try:
                self._http = serve(
                    self.metrics,
                    self.health,
                    self.settings.metrics_host,
                    self.settings.metrics_port,
                )
                log.info("metrics_serving", port=self.settings.metrics_port)
            except OSError as exc:  # detection matters more than its metrics: keep going
                log.error("metrics_unavailable", port=self.settings.metrics_port, error=str(exc))
        self.transport.connect()
        if self.spb_out is not None:
            self.spb_out.start()
        for publish in self.engine.recover():
            self._send(publish, None)
        log.info("detector_started", model_version=self.model.version)

    # -- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Receive, handle and publish until ``stop`` is set, then drain and stop."""
        stop = stop if stop is not None else self.stop
        while not stop.is_set():
            self.turn(timeout=0.1)
        self.shutdown()

    def turn(self, timeout: float) -> None:
        """One turn of the loop: I/O, every batch that arrived, checkpoint, housekeeping."""
        settings = self.settings
        inbox = self.transport.receive(timeout)
        for start in range(0, len(inbox), settings.batch_max):
            self._process(inbox[start : start + settings.batch_max])
        self.calibration.poll(self.engine)
        now = time.monotonic()
        self._last_loop = now
        self._housekeeping(now)
        self.checkpoint.write_ingest(self.engine.ingest_changes())
        self.checkpoint.write_rows(self.engine.states.take_rows())  # before their records
        self.checkpoint.write_records(self.engine.states.take_urgent())
        if now >= self._next_records:
            self.checkpoint.write_records(self.engine.states.take_dirty())
            self._next_records = now + settings.checkpoint_records_every_s
        if now >= self._next_snapshot:
            self.checkpoint.save(self.engine.snapshot())
            self._next_snapshot = now + settings.snapshot_every_s
        self.checkpoint.flush()

    def _housekeeping(self, now: float) -> None:
        publishes, events = self.engine.tick(time.time())
        for publish in publishes:
            self._send(publish, None)
        log_events(events, self.metrics)
        if self.spb_out is not None:
            for event in events:
                self.spb_out.observe(self.engine.tracker.state(event.machine_id), None)
            self.spb_out.flush(time.time())
        if now >= self._next_reload:
            self.maybe_reload()
            self._next_reload = now + self.settings.reload_interval_s
        if now >= self._next_drift:
            self.check_drift()
            self._next_drift = now + 1.0
        if now >= self._next_heartbeat:
            self._publish_status("online")
            self._next_heartbeat = now + self.settings.heartbeat_s

    def _process(self, batch: list[Inbound]) -> None:
        outcomes = self.engine.handle(batch, time.time())
        tally(outcomes, self.counters, self.metrics)
        if self.spb_out is not None:
            state = self.engine.tracker.state
            for outcome in outcomes:
                for verdict in outcome.verdicts:
                    self.spb_out.observe(state(verdict.machine_id), verdict)
                for event in outcome.events:
                    self.spb_out.observe(state(event.machine_id), None)
        for outcome in outcomes:
            target = _AckTarget(outcome.message.token, outcome.answered)
            for publish in outcome.publishes:
                self._send(publish, target)
            if target.remaining == 0:
                self.transport.ack(target.token)  # nothing to wait for (a duplicate)

    def _send(self, publish: Publish, target: _AckTarget | None) -> None:
        if target is not None:
            target.remaining += 1

        def confirmed(ok: bool) -> None:
            if not ok:
                # A refused publish leaves its message unacknowledged: redelivered later, and
                # scored again then (not a duplicate: its verdict never got out). The
                # machine's record still knows the reading, so its alert window counts it once.
                self.counters.publish_failures += 1
                self.metrics.publish_failures.inc()
                if target is not None and not target.failed:
                    target.failed = True
                    for identity, _digest in target.answered:
                        self.engine.seen.forget(identity)
            else:
                self.engine.confirmed(publish)
            if target is None:
                return
            target.remaining -= 1
            if target.remaining == 0 and not target.failed:
                for identity, digest in target.answered:
                    self.checkpoint.answered(identity, digest)
                self.transport.ack(target.token)

        self.transport.publish(
            publish.topic, publish.payload, retain=publish.retain, confirmed=confirmed
        )

    def _publish_status(self, state: str) -> None:
        status = ClientStatus(
            role="detector",
            client_id=self.settings.client_id,
            state="online" if state == "online" else "offline",
            ts=time.time(),
            model_version=self.model.version,
        )
        self._send(Publish(self._status_topic, status.encode(), retain=True), None)

    # -- model and drift ------------------------------------------------------------------------
    def check_drift(self) -> None:
        """Publish the drift window's figures as metrics; log when drift starts or ends."""
        report_drift(self.engine, self.metrics)

    def maybe_reload(self) -> bool:
        """Swap in newly promoted models between batches (never mid-batch)."""
        self.calibration.reload_routes(self.engine)
        return reload_model(
            self.engine, self.model_dir, self.settings.scorer, self.counters, self.metrics
        )

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Finish received work, publish offline, wait for confirmations, snapshot, stop."""
        inbox = self.transport.receive(0.0)
        for start in range(0, len(inbox), self.settings.batch_max):
            self._process(inbox[start : start + self.settings.batch_max])
        self._publish_status("offline")
        self.calibration.close()  # a fit cut short is asked for again after the restart
        if self.spb_out is not None:
            self.spb_out.close()
        self.transport.close(drain_timeout_s)
        self.checkpoint.save(self.engine.snapshot())
        self.checkpoint.close()
        if self._http is not None:
            self._http.shutdown()
        log.info("detector_stopped", **vars(self.counters))
