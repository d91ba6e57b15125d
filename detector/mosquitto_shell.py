"""The Mosquitto detector's shell: a paho driver, the runner, a checkpoint, metrics and health.

One loop on one thread: ``driver.receive`` (paho's ``loop()`` for Mosquitto) returns what
arrived and runs the confirmations of earlier publishes; the runner (``detector/runner.py``)
handles it in batches of up to ``batch_max`` messages (one vectorised scoring call each) and
says what to publish. At the end of each turn the checkpoint (``detector/checkpoint.py``) is
written and flushed, and only then are the messages whose every publish was confirmed
acknowledged (``detector/transport.py``'s ``send``/``commit``).

Between batches, when the runner says they are due: offline detection, model reload (the
default ``current`` and every machine's and group's own, ``models/{machines,groups}/<name>/
current``) and account registry reload (``Runner.reload_registry``), drift check, heartbeat,
every changed record and a full snapshot.

Routes and live calibration: ``detector/route_models.py`` (shared with the JetStream
shell) binds promoted route models and fits full calibration windows on a worker thread;
each turn polls it between batches.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import structlog

from factorywatch.contracts import ClientStatus
from factorywatch.detector.alerting import AlertPolicy
from factorywatch.detector.checkpoint import FileCheckpoint
from factorywatch.detector.dedup import SeenCache
from factorywatch.detector.engine import Engine, EngineSettings, Inbound, Outcome
from factorywatch.detector.ingest import StatefulIngest
from factorywatch.detector.metrics import Metrics
from factorywatch.detector.mqtt5_transport import Mqtt5Transport
from factorywatch.detector.mqtt_transport import PahoTransport
from factorywatch.detector.registry import Registry, RegistryFile
from factorywatch.detector.route_models import CalibrationWorker, make_router
from factorywatch.detector.runner import Due, Runner, RunnerSettings, Send
from factorywatch.detector.shell_common import (
    Counters,
    reload_model,
    serve_metrics,
    sync_drift_metrics,
)
from factorywatch.detector.transport import Driver, commit, send
from factorywatch.model.artifact import LoadedModel
from factorywatch.settings import BrokerSettings, DetectorSettings
from factorywatch.topics import Topics, sparkplug_filters

if TYPE_CHECKING:
    from factorywatch.detector.primary_host import PrimaryHost
    from factorywatch.detector.sparkplug_out import SparkplugOut

log = structlog.get_logger("detector")

#: a turn that received this many messages scores them at once, without lingering for more
LINGER_BELOW = 32


def registry_file(
    settings: DetectorSettings, broker: BrokerSettings | None = None
) -> RegistryFile | None:
    """The account registry's file the detector follows: ``registry_file`` in the settings,
    else ``<secrets dir>/registry.json`` (found via ``broker``); None: an open broker."""
    secrets_dir = broker.secrets_dir if broker is not None else None
    return RegistryFile.locate(settings.registry_file, secrets_dir)


def engine_settings(
    settings: DetectorSettings,
    broker: BrokerSettings | None = None,
    registry: RegistryFile | None = None,
) -> EngineSettings:
    """The engine's part of the detector's settings, with the registry read from
    ``registry`` (else the file ``registry_file`` finds via ``broker``)."""
    source = registry if registry is not None else registry_file(settings, broker)
    return EngineSettings(
        policy=AlertPolicy(
            k=settings.alert_k,
            n=settings.alert_n,
            m=settings.alert_m,
            offline_after_s=settings.offline_after_s,
        ),
        max_clock_skew_s=settings.max_clock_skew_s,
        dedup_size=settings.dedup_size,
        answer_cache_size=settings.answer_cache_size,
        explain_top_k=settings.explain_top_k,
        alert_clear_score=settings.alert_clear_score,
        drift_window=settings.drift_window,
        drift_factor=settings.drift_factor,
        max_future_skew_s=settings.max_future_skew_s,
        registry=source.read() if source is not None else None,
        rebaseline=settings.rebaseline,
    )


def runner_settings(settings: DetectorSettings) -> RunnerSettings:
    """The runner's periods and identity from the detector's settings."""
    return RunnerSettings(
        client_id=settings.client_id,
        heartbeat_s=settings.heartbeat_s,
        reload_interval_s=settings.reload_interval_s,
        records_every_s=settings.checkpoint_records_every_s,
        snapshot_every_s=settings.snapshot_every_s,
    )


def sparkplug_ingests(
    settings: DetectorSettings, registry: Registry | None = None
) -> tuple[list[StatefulIngest], list[str]]:
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
            silence_timeout_s=settings.sparkplug_silence_timeout_s,
        ),
        groups or None,
        # the detector's own verdicts (Sparkplug out) are not readings
        ignore_groups=[settings.sparkplug_out_group] if settings.sparkplug_out else (),
        registry=registry,
    )
    return [ingest], sparkplug_filters(groups or None)


def _sparkplug_out(settings: DetectorSettings, broker: BrokerSettings) -> SparkplugOut | None:
    """The detector's own Sparkplug edge node for verdicts, when enabled (else None)."""
    if not settings.sparkplug_out:
        return None
    from factorywatch.detector.sparkplug_out import SparkplugOut, out_broker  # noqa: PLC0415

    if broker.authenticates:
        # Its own connection needs its own account: client ids are bound to logins
        # (use_username_as_clientid), and the ACL ties an edge node's topics to its login.
        out = out_broker(
            broker, settings.sparkplug_out_username, settings.sparkplug_out_password_file
        )
        node = out.username or ""
        return SparkplugOut(out, node, settings.sparkplug_out_group, node)
    node = settings.sparkplug_out_node or settings.client_id
    return SparkplugOut(broker, f"{settings.client_id}-spb", settings.sparkplug_out_group, node)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _primary_host(settings: DetectorSettings) -> PrimaryHost | None:
    """The Sparkplug primary host application, when configured (it needs Sparkplug)."""
    if settings.sparkplug_primary_host_id is None:
        return None
    if not settings.sparkplug:
        raise ValueError("sparkplug_primary_host_id needs sparkplug")
    from factorywatch.detector.primary_host import PrimaryHost  # noqa: PLC0415

    return PrimaryHost(settings.sparkplug_primary_host_id)


class DetectorService:
    """Runs the detector until ``stop`` is set; then drains in-flight work and stops."""

    def __init__(
        self,
        settings: DetectorSettings,
        broker: BrokerSettings,
        model_dir: Path,
        model: LoadedModel,
        *,
        transport: Driver | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.model_dir = model_dir
        self.topics = Topics(broker.topic_root)
        self.counters = Counters()
        self.metrics = Metrics()
        self.metrics.set_model(model.version)
        self.stop = stop if stop is not None else threading.Event()
        #: the account registry's file, followed while running (``Runner.reload_registry``)
        self.registry_file = registry_file(settings, broker)
        spb_settings = engine_settings(settings, broker, self.registry_file)
        if model_dir is None:  # nowhere to save a re-baselined machine's model
            spb_settings = replace(spb_settings, rebaseline=False)
        extra, spb_filters = sparkplug_ingests(settings, spb_settings.registry)
        for ingest in extra:
            self.metrics.watch_ingest(ingest)
        self.spb_out = _sparkplug_out(settings, broker)
        self.engine = Engine(
            model,
            self.topics,
            spb_settings,
            extra_ingests=extra,
            router=make_router(settings.asset_config, model),
            seen=SeenCache(settings.dedup_size),
            perf_clock=time.perf_counter,
        )
        self.runner = Runner(
            self.engine,
            runner_settings(settings),
            counters=self.counters,
            metrics=self.metrics,
            registry_file=self.registry_file,
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
        self.runner.turned(time.monotonic())
        self._last_arrival = float("-inf")  # when the last turn's messages arrived (_linger)
        self._status_topic = self.topics.status("detector", settings.client_id)
        # The first reading of a model version that it cannot score (missing channels): said
        # loudly once (log + /healthz), not only as a stream of dead letters.
        self._unscorable: dict[str, str] | None = None
        lines = (
            [x.strip() for x in settings.lines.split(",") if x.strip()] if settings.lines else None
        )
        self.input_filters = self.topics.input_filters(lines) + spb_filters
        filters = [
            *self.input_filters,
            *self.topics.command_filters,
            self.topics.sensor_status_filter,
        ]
        offline = ClientStatus(role="detector", client_id=settings.client_id, state="offline")
        will: tuple[str, bytes] | Callable[[], tuple[str, bytes]] = (
            self._status_topic,
            offline.encode(),
        )
        self.primary = _primary_host(settings)
        if self.primary is not None:
            # One connection has one will: the STATE death replaces the status will (the
            # status heartbeats go on), and edge nodes must see it on the connection that
            # subscribes (the spec), so a crash tells them to store and forward.
            primary = self.primary
            filters.append(primary.topic)
            will = lambda: primary.will(_now_ms())  # noqa: E731 - stamped at each connect
        self.transport: Driver
        chosen, why_paho = settings.transport_for(broker.protocol)
        if transport is None and why_paho is not None:
            log.info("transport_chosen", transport=chosen, reason=why_paho)
        if transport is not None:
            self.transport = transport
        elif chosen == "mqtt5":
            # detector/mqtt5_transport.py: the compiled codec, the same connection promises
            self.transport = Mqtt5Transport(
                broker,
                settings.client_id,
                filters=filters,
                will=(self._status_topic, offline.encode()),
                session_expiry_s=settings.session_expiry_s,
                stop=self.stop,
                on_connected=lambda: self._publish_status("online"),
                on_connection_change=lambda up: self.metrics.connected.set(1 if up else 0),
            )
        else:
            self.transport = PahoTransport(
                broker,
                settings.client_id,
                filters=filters,
                will=will,
                session_expiry_s=settings.session_expiry_s,
                stop=self.stop,
                on_connected=lambda: self._publish_status("online"),
                on_connection_change=lambda up: self.metrics.connected.set(1 if up else 0),
                on_subscribed=self._publish_state_birth,
            )

    @property
    def model(self) -> LoadedModel:
        """The model serving now."""
        return self.engine.model

    # -- restart ------------------------------------------------------------------------------
    def _restore(self) -> None:
        """Take over what the checkpoint holds (nothing on a first start)."""
        restored = self.checkpoint.load()
        self.runner.restore(restored)
        if not restored.empty:
            log.info("state_restored", answered=len(restored.answered), **self.engine.summary())

    # -- health -------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while connected and the loop turned within the last 10 s."""
        healthy, detail = self.runner.health(
            connected=self.transport.is_connected(),
            now=time.monotonic(),
            fitting=self.calibration.fitting,
        )
        if self._unscorable is not None:
            detail["unscorable_readings"] = self._unscorable
        return healthy, detail

    def start(self) -> None:
        """Serve metrics, connect (bounded retries) and republish unconfirmed events."""
        self._http = serve_metrics(
            self.metrics, self.health, self.settings.metrics_host, self.settings.metrics_port
        )
        self.transport.connect()
        if self.spb_out is not None:
            self.spb_out.start()
        send(self.runner, self.transport, self.runner.recover())
        log.info("detector_started", model_version=self.model.version)

    # -- the loop -----------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Receive, handle and publish until ``stop`` is set, then drain and stop."""
        stop = stop if stop is not None else self.stop
        while not stop.is_set():
            # changed records still to be journaled (a slice per turn): no waiting meanwhile
            self.turn(timeout=0.0 if self.runner.journaling else 0.1)
        self.shutdown()

    def turn(self, timeout: float) -> None:
        """One turn of the loop: I/O, every batch that arrived, housekeeping, then the
        checkpoint is flushed and only then are the settled messages acknowledged."""
        inbox = self.transport.receive(timeout)
        if inbox:
            inbox = self._linger(inbox)
        self._process_all(inbox)
        self.calibration.poll(self.engine)
        now = time.monotonic()
        self.runner.turned(now)
        due = self.runner.due(now)
        self._housekeeping(due)
        commit(
            self.runner,
            self.transport,
            self.checkpoint,
            records=due.records,
            snapshot=due.snapshot,
        )

    def _linger(self, inbox: list[Inbound]) -> list[Inbound]:
        """While messages come faster than one per two ``batch_linger_ms`` (the previous ones
        arrived that recently), wait ``batch_linger_ms`` once for more to join the few that
        arrived: one batch, one turn and one scoring call for several readings instead of
        one each (less CPU per reading at a steady rate, up to that much more latency)."""
        now = time.monotonic()
        previous, self._last_arrival = self._last_arrival, now
        linger = self.settings.batch_linger_ms / 1000.0
        if not linger or len(inbox) >= LINGER_BELOW or now - previous > 2 * linger:
            return inbox
        time.sleep(linger)
        return inbox + self.transport.receive(0.0)

    def _housekeeping(self, due: Due) -> None:
        sends, events = self.runner.tick(time.time(), silence=due.silence)
        if sends:
            send(self.runner, self.transport, sends)
        for ingest in self.engine.extra_ingests:
            for name, fields in ingest.take_notes():
                log.info(name, **fields)
        if self.spb_out is not None:
            for event in events:
                self.spb_out.observe(self.engine.tracker.state(event.machine_id), None)
            self.spb_out.flush(time.time())
        if due.reload:
            self.maybe_reload()
        if due.drift:
            self.check_drift()
        if due.heartbeat:
            self._publish_status("online")

    def _process_all(self, inbox: list[Inbound]) -> None:
        if self.primary is not None:
            inbox = self._answer_state(inbox)
        batch_max = self.settings.batch_max
        for start in range(0, len(inbox), batch_max):
            self._process(inbox[start : start + batch_max])

    def _process(self, batch: list[Inbound]) -> None:
        handled = self.runner.handle(batch, time.time())
        self._note_unscorable(handled.outcomes)
        if self.spb_out is not None:
            state = self.engine.tracker.state
            for outcome in handled.outcomes:
                for verdict in outcome.verdicts:
                    if not verdict.historical:  # tags show the present
                        self.spb_out.observe(state(verdict.machine_id), verdict)
                for event in outcome.events:
                    self.spb_out.observe(state(event.machine_id), None)
        send(self.runner, self.transport, handled.sends)

    def _note_unscorable(self, outcomes: list[Outcome]) -> None:
        version = self.model.version
        if self._unscorable is not None and self._unscorable["model_version"] == version:
            return
        for outcome in outcomes:
            for error in outcome.rejected:
                if error.reason != "missing_channel":
                    continue
                self._unscorable = {
                    "model_version": version,
                    "topic": outcome.message.topic,
                    "detail": error.detail[:200],
                }
                log.error(
                    "model_cannot_score_readings",
                    model_version=version,
                    topic=outcome.message.topic,
                    detail=error.detail[:200],
                    hint="the model was trained on other channels (train --csv promotes its "
                    "model as everyone's default): `factorywatch models list`, then "
                    "`models promote VERSION` of a model of these channels, or train one per "
                    "machine with --machine",
                )
                return

    def _publish_state_birth(self) -> None:
        """Subscriptions acknowledged: say online (tck-id-host-topic-phid-birth-required)."""
        if self.primary is not None:
            send(self.runner, self.transport, [Send(self.primary.birth())])
            log.info("sparkplug_primary_host_online", host_id=self.primary.host_id)

    def _answer_state(self, inbox: list[Inbound]) -> list[Inbound]:
        """Our own STATE topic's messages are the shell's: an offline one is answered with
        online at once; each is acknowledged at once (it changes no state to confirm)."""
        assert self.primary is not None
        rest: list[Inbound] = []
        for message in inbox:
            if message.topic != self.primary.topic:
                rest.append(message)
                continue
            answer = self.primary.answer(message.payload)
            if answer is not None:
                send(self.runner, self.transport, [Send(answer)])
                log.warning("sparkplug_primary_host_offline_answered", host_id=self.primary.host_id)
            self.transport.ack(message.token)
        return rest

    def _publish_status(self, state: str) -> None:
        send(self.runner, self.transport, [Send(self.runner.status(state, time.time()))])

    # -- model and drift ------------------------------------------------------------------------
    def check_drift(self) -> None:
        """Publish the drift window's figures as metrics; log when drift starts or ends."""
        self.runner.check_drift()

    def maybe_reload(self) -> bool:
        """Swap in newly promoted models and a changed account registry between batches
        (never mid-batch)."""
        self.runner.reload_registry()
        self.calibration.reload_routes(self.engine)
        return reload_model(
            self.engine, self.model_dir, self.settings.scorer, self.counters, self.metrics
        )

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Finish received work, publish offline, wait for confirmations, snapshot, stop."""
        self._process_all(self.transport.receive(0.0))
        self._publish_status("offline")
        if self.primary is not None:  # before the disconnect, which sends no will
            send(self.runner, self.transport, [Send(self.primary.death(_now_ms()))])
        self.calibration.close()  # a fit cut short is asked for again after the restart
        if self.spb_out is not None:
            self.spb_out.close()
        self.transport.drain(drain_timeout_s)
        # what the drain confirmed is durable before its acks leave with the disconnect
        commit(self.runner, self.transport, self.checkpoint, records=True, snapshot=True)
        self.transport.close(0.0)
        self.checkpoint.close()
        if self._http is not None:
            self._http.shutdown()
        log.info("detector_stopped", **vars(self.counters))
