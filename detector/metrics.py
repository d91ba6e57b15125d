"""Prometheus metrics and a health endpoint for the detector (``/metrics``, ``/healthz``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

Health = Callable[[], tuple[bool, dict[str, Any]]]
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    """The detector's counters, in their own registry (one detector per process or test)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.readings = Counter(
            "factorywatch_readings_received", "Telemetry messages received", registry=r
        )
        self.verdicts = Counter(
            "factorywatch_verdicts_published", "Verdicts published", ["status"], registry=r
        )
        self.alerts = Counter(
            "factorywatch_alert_verdicts", "ALERT verdicts by machine", ["machine"], registry=r
        )
        self.events = Counter(
            "factorywatch_alert_events", "Alert lifecycle events", ["event"], registry=r
        )
        self.dead_letters = Counter(
            "factorywatch_dead_letters", "Rejected payloads by reason", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "factorywatch_duplicates", "Redelivered readings not scored again", registry=r
        )
        self.publish_failures = Counter(
            "factorywatch_publish_failures", "Publishes the broker refused", registry=r
        )
        self.threshold_changes = Counter(
            "factorywatch_threshold_changes",
            "Changes of a machine's own threshold (false-alarm feedback, widen, reset)",
            ["action"],
            registry=r,
        )
        self.rebaselines = Counter(
            "factorywatch_rebaselines",
            "Machines that re-baselined after a sustained alarm (started), or could not "
            "(unavailable: no scikit-learn to fit their family)",
            ["result"],
            registry=r,
        )
        self.alarm_rate_out_of_bound = Gauge(
            "factorywatch_alarm_rate_out_of_bound",
            "1 while a machine's realized alarm rate is above 3 x its target",
            ["machine"],
            registry=r,
        )
        self.latency = Histogram(
            "factorywatch_processing_seconds",
            "Receive-to-verdict processing time per reading",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "factorywatch_batch_size",
            "Readings scored per vectorised call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.model = Gauge(
            "factorywatch_model_info", "The model in use (value 1)", ["version"], registry=r
        )
        self.recent_alert_rate = Gauge(
            "factorywatch_recent_alert_rate",
            "Share of readings scored above the threshold over the drift window (all machines)",
            registry=r,
        )
        self.recent_score_median = Gauge(
            "factorywatch_recent_score_median", "Median score over the drift window", registry=r
        )
        self.training_alert_rate = Gauge(
            "factorywatch_training_alert_rate",
            "Share of the model's training readings above its threshold",
            registry=r,
        )
        self.drifting = Gauge(
            "factorywatch_drifting",
            "1 while the recent ALERT share is drift_factor x the training one or more",
            registry=r,
        )
        self.connected = Gauge(
            "factorywatch_broker_connected", "1 while connected to the broker", registry=r
        )
        # Bound once: labels() costs a dict lookup and locking per call on the hot path.
        self.normal_verdicts = self.verdicts.labels(status="NORMAL")
        self.alert_verdicts = self.verdicts.labels(status="ALERT")
        self.calibrating_verdicts = self.verdicts.labels(status="CALIBRATING")
        self.calibrations = Counter(
            "factorywatch_calibrations",
            "Live calibration fits by result (served, failed)",
            ["result"],
            registry=r,
        )

    def watch_ingest(self, ingest: _CountingIngest) -> None:
        """Expose a stateful ingest's counters (Sparkplug: births, deaths, gaps, rebirth
        requests sent/suppressed, historical readings, ...) as
        ``factorywatch_<name>_events_total{event=...}``, read at each scrape."""
        self.registry.register(_IngestCollector(ingest))

    def set_model(self, version: str) -> None:
        """Expose ``version`` as the only model in use."""
        self.model.clear()
        self.model.labels(version=version).set(1)


class _CountingIngest(Protocol):
    name: str
    stats: dict[str, int]


class _IngestCollector(Collector):
    """A stateful ingest's own counters, read when scraped (the pure ingest keeps them)."""

    def __init__(self, ingest: _CountingIngest) -> None:
        self.ingest = ingest

    def collect(self) -> Iterable[Metric]:
        """One counter family, one sample per event."""
        family = CounterMetricFamily(
            f"factorywatch_{self.ingest.name}_events",
            f"{self.ingest.name} ingest events by kind",
            labels=["event"],
        )
        for event, count in sorted(self.ingest.stats.items()):
            family.add_metric([event], count)
        yield family


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def serve(metrics: Metrics, health: Health, host: str, port: int) -> WSGIServer:
    """Serve ``/metrics`` and ``/healthz`` on a daemon thread; return the server."""
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, detail = health()
            body = json.dumps({"ok": ok, **detail, "time": time.time()}).encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        return prometheus(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
