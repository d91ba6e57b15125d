"""What both detector shells share around the engine: counters, metrics, drift reports, reloads.

The Mosquitto shell (``detector/mosquitto_shell.py``) and the JetStream runner
(``detector/jetstream.py``) drive the same engine; counting its outcomes, reporting drift and
swapping in a newly promoted model are the same for both, so they live here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog

from factorywatch.contracts import AlertEvent
from factorywatch.detector.engine import Engine, Outcome
from factorywatch.detector.metrics import Health, Metrics, serve
from factorywatch.detector.registry import RegistryFile
from factorywatch.errors import FactorywatchError, ModelError
from factorywatch.model import artifact
from factorywatch.model.artifact import ScorerKind

log = structlog.get_logger("detector")


@dataclass
class Counters:
    """What a detector has done since start (also exposed as metrics)."""

    received: int = 0
    verdicts: int = 0
    alerts: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    #: duplicates answered again with the verdict they already got (a sensor's resend)
    reanswered: int = 0
    publish_failures: int = 0
    reloads: int = 0
    #: times the account registry was read again because its file changed
    registry_reloads: int = 0
    restored_machines: int = 0
    #: machines whose live calibration window was fitted and served
    calibrated: int = 0
    #: batches acknowledged / given back for redelivery (the JetStream runner)
    batches: int = 0
    failed_batches: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    #: readings per partition (the JetStream runner)
    by_partition: dict[int, int] = field(default_factory=dict)


def tally(outcomes: Iterable[Outcome], counters: Counters, metrics: Metrics) -> int:
    """Count a batch's outcomes (counters and metrics), log rejects and events; its readings."""
    readings = verdicts = alerts = duplicates = calibrating = 0
    observe_latency = metrics.latency.observe
    for outcome in outcomes:
        readings += outcome.readings
        duplicates += outcome.duplicates
        counters.reanswered += outcome.reanswered
        verdicts += len(outcome.verdicts)
        for verdict in outcome.verdicts:
            observe_latency(verdict.latency_ms / 1000.0)
            if verdict.status == "ALERT":
                alerts += 1
                metrics.alerts.labels(machine=verdict.machine_id).inc()
            elif verdict.status == "CALIBRATING":
                calibrating += 1
        for error in outcome.rejected:
            counters.dead_letters += 1
            metrics.dead_letters.labels(reason=error.reason).inc()
            counters.by_reason[error.reason] = counters.by_reason.get(error.reason, 0) + 1
            log.warning(
                "payload_rejected",
                reason=error.reason,
                detail=error.detail[:200],
                topic=outcome.message.topic,
            )
        log_events(outcome.events, metrics)
        for notice in outcome.notices:
            log_notice(notice, metrics)
    counters.received += readings
    counters.verdicts += verdicts
    counters.alerts += alerts
    counters.duplicates += duplicates
    # each inc takes a lock: counters that did not move are left alone
    if readings:
        metrics.readings.inc(readings)
    if duplicates:
        metrics.duplicates.inc(duplicates)
    if verdicts - alerts - calibrating:
        metrics.normal_verdicts.inc(verdicts - alerts - calibrating)
    if calibrating:
        metrics.calibrating_verdicts.inc(calibrating)
    if alerts:
        metrics.alert_verdicts.inc(alerts)
    if verdicts:
        metrics.batch_size.observe(verdicts)
    return readings


def log_events(events: Iterable[AlertEvent], metrics: Metrics) -> None:
    """Count and log alert lifecycle events."""
    for event in events:
        metrics.events.labels(event=event.event).inc()
        log.info(
            "alert_event_published",
            machine_id=event.machine_id,
            kind=event.event,
            peak_score=event.peak_score,
        )


def log_notice(notice: dict[str, Any], metrics: Metrics) -> None:
    """Log (and count) a machine's threshold change, alarm-rate bound change or
    re-baseline."""
    fields = {k: v for k, v in notice.items() if k != "event"}
    kind = str(notice["event"])
    machine = str(notice["machine_id"])
    if kind == "threshold_changed":
        metrics.threshold_changes.labels(action=str(notice["action"])).inc()
        log.info(kind, **fields)
        return
    if kind in ("rebaseline_started", "rebaseline_unavailable"):
        metrics.rebaselines.labels(result=kind.removeprefix("rebaseline_")).inc()
        (log.info if kind == "rebaseline_started" else log.warning)(kind, **fields)
        return
    metrics.alarm_rate_out_of_bound.labels(machine=machine).set(
        1 if kind == "alarm_rate_out_of_bound" else 0
    )
    if kind == "alarm_rate_out_of_bound":
        log.warning(kind, **fields)
    else:
        log.info(kind, **fields)


def sync_drift_metrics(engine: Engine, metrics: Metrics) -> None:
    """The model's training baseline and the drift state as gauges (after start or a swap)."""
    drift = engine.drift
    metrics.training_alert_rate.set(drift.training_alert_rate)
    metrics.drifting.set(1 if drift.drifting else 0)


def report_drift(engine: Engine, metrics: Metrics) -> None:
    """Publish the drift window's figures as metrics; log when drift starts or ends (for the
    default model, and for each machine's or group's own model: logged only)."""
    for route, version, route_change, route_figures in engine.check_route_drift():
        (log.warning if route_change == "drift_started" else log.info)(
            route_change,
            route=route,
            model_version=version,
            window_readings=route_figures.readings,
            alert_rate=round(route_figures.alert_rate, 4),
            training_alert_rate=round(route_figures.training_alert_rate, 4),
        )
    change, figures = engine.check_drift()
    metrics.recent_alert_rate.set(figures.alert_rate)
    metrics.recent_score_median.set(figures.score_median)
    metrics.drifting.set(1 if engine.drift.drifting else 0)
    if change is not None:
        (log.warning if change == "drift_started" else log.info)(
            change,
            model_version=engine.model.version,
            window_readings=figures.readings,
            alert_rate=round(figures.alert_rate, 4),
            training_alert_rate=round(figures.training_alert_rate, 4),
            score_median=round(figures.score_median, 4),
            training_score_median=figures.training_score_median,
        )


def reload_model(
    engine: Engine, model_dir: Path, scorer: ScorerKind, counters: Counters, metrics: Metrics
) -> bool:
    """Swap in a newly promoted model between batches (never mid-batch); True when swapped."""
    version = artifact.current_version(model_dir)
    if version is None or version == engine.model.version:
        return False
    try:
        model = artifact.load(model_dir, version, scorer=scorer)
    except (ModelError, OSError) as exc:
        log.error("model_reload_failed", version=version, error=str(exc))
        return False
    previous = engine.model.version
    engine.swap_model(model)
    sync_drift_metrics(engine, metrics)
    counters.reloads += 1
    metrics.set_model(version)
    log.info("model_reloaded", previous=previous, version=version)
    return True


def reload_registry(engine: Engine, source: RegistryFile, counters: Counters) -> bool:
    """Check readings against the registry file as it is now, if it changed since it was
    last read (between batches, never mid-batch); True when the engine's registry changed.

    A missing or invalid file keeps the registry in use (logged once per change of file)."""
    if not source.changed():
        return False
    previous = engine.registry
    try:
        registry = source.read().succeeding(previous)
    except (FactorywatchError, OSError) as exc:
        log.error(
            "registry_reload_failed",
            path=str(source.path),
            error=str(exc).splitlines()[0],
            hint="the registry in use stays; fix the file (`factorywatch broker` writes it)",
        )
        return False
    if registry == previous:
        return False
    engine.set_registry(registry)
    counters.registry_reloads += 1
    log.info("registry_reloaded", path=str(source.path), **registry.changes(previous))
    return True


def serve_metrics(metrics: Metrics, health: Health, host: str, port: int) -> WSGIServer | None:
    """Serve ``/metrics`` and ``/healthz`` when ``port`` is set; None when off or unavailable
    (detection matters more than its metrics: the detector keeps going)."""
    if not port:
        return None
    try:
        server = serve(metrics, health, host, port)
    except OSError as exc:
        log.error("metrics_unavailable", port=port, error=str(exc))
        return None
    log.info("metrics_serving", port=port)
    return server
