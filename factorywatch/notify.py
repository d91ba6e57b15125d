"""Notifications through Prometheus Alertmanager: raised and cleared alerts pushed to its v2 API.

Alertmanager then does what plants configure there: grouping, routing (email, Slack,
webhooks), inhibition, silences and maintenance windows. An open alert is re-sent every
``resend_s`` with ``endsAt`` a few intervals ahead (as Prometheus does), so Alertmanager keeps
it firing while the notifier lives and resolves it by itself if the notifier dies; a clear
sends ``endsAt`` = the clear time. On start the retained ``state`` topics say which machines
are in ALERT or OFFLINE right now, so a restarted notifier neither forgets nor misses a clear.

Two alert names, labelled ``machine`` and ``line`` (plus any ``--label k=v``):
``FactorywatchAnomaly`` (ALERT_RAISED .. ALERT_CLEARED) and ``FactorywatchMachineOffline``
(MACHINE_OFFLINE .. MACHINE_ONLINE).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from factorywatch import contracts
from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AlertEvent, MachineState
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

log = structlog.get_logger("factorywatch.notify")

ANOMALY: Final = "FactorywatchAnomaly"
OFFLINE: Final = "FactorywatchMachineOffline"
HTTP_TIMEOUT_S: Final = 5.0


class NotifySettings(BaseSettings):
    """Where to send notifications (``FACTORYWATCH_NOTIFY_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYWATCH_NOTIFY_", env_file=".env", extra="ignore"
    )

    alertmanager_url: str = Field(
        default="http://127.0.0.1:9093", description="Alertmanager base URL"
    )
    resend_s: float = Field(default=60.0, gt=0, description="re-send open alerts this often")
    web_url: str | None = Field(
        default=None, description="base URL of `factorywatch web` for links in notifications"
    )
    labels: str = Field(default="", description="extra labels k=v,k2=v2 on every alert")


def rfc3339(ts: float) -> str:
    """Unix seconds as the RFC 3339 time Alertmanager's API takes."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_labels(text: str) -> dict[str, str]:
    """``"site=plant1,team=maint"`` -> a dict (clear error on a malformed pair)."""
    labels = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"invalid label {pair!r}: use name=value")
        labels[key.strip()] = value.strip()
    return labels


@dataclass
class AlertBook:
    """Which Alertmanager alerts are firing, built from alert events and states (pure)."""

    extra_labels: Mapping[str, str] = field(default_factory=dict)
    web_url: str | None = None
    firing: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)

    def _alert(self, name: str, line: str, machine: str, starts: float) -> dict[str, Any]:
        key = (name, line, machine)
        alert = self.firing.get(key)
        if alert is None:
            alert = {
                "labels": {
                    **self.extra_labels,
                    "alertname": name,
                    "machine": machine,
                    "line": line,
                    "severity": "warning" if name == OFFLINE else "critical",
                },
                "annotations": {},
                "startsAt": rfc3339(starts),
            }
            if self.web_url:
                alert["generatorURL"] = f"{self.web_url.rstrip('/')}/machine/{line}/{machine}"
            self.firing[key] = alert
        return alert

    def _resolve(self, name: str, line: str, machine: str, at: float) -> dict[str, Any]:
        alert = self.firing.pop((name, line, machine), None) or self._alert(name, line, machine, at)
        self.firing.pop((name, line, machine), None)
        return {**alert, "endsAt": rfc3339(at)}

    def on_event(self, event: AlertEvent) -> list[dict[str, Any]]:
        """Apply one event; return the alerts to post now (resolved ones carry ``endsAt``)."""
        line, machine = event.line, event.machine_id
        kind = event.event
        if kind == "ALERT_RAISED":
            self.firing.pop((ANOMALY, line, machine), None)  # a new episode
            alert = self._alert(ANOMALY, line, machine, event.at)
            alert["annotations"] = {
                "summary": f"{machine} ({line}): anomalous readings",
                "alert_id": event.alert_id or "",
                "peak_score": f"{event.peak_score:.3f}" if event.peak_score is not None else "",
                "features": ", ".join(
                    f"{c.feature}={c.value:.4g} (z {c.z:+.1f})" for c in event.explanation or []
                ),
            }
            return [alert]
        if kind == "ALERT_ACKNOWLEDGED":
            open_alert = self.firing.get((ANOMALY, line, machine))
            if open_alert is None:
                return []
            open_alert["annotations"] = {
                **open_alert["annotations"],
                "acknowledged_by": event.acknowledged_by or "",
                "note": event.note or "",
            }
            return [open_alert]
        if kind == "ALERT_CLEARED":
            return [self._resolve(ANOMALY, line, machine, event.at)]
        if kind == "MACHINE_OFFLINE":
            alert = self._alert(OFFLINE, line, machine, event.at)
            alert["annotations"] = {
                "summary": f"{machine} ({line}): no readings ({event.reason or 'silence'})"
            }
            return [alert]
        return [self._resolve(OFFLINE, line, machine, event.at)]  # MACHINE_ONLINE

    def on_state(self, state: MachineState, now: float) -> list[dict[str, Any]]:
        """Reconcile with a retained state (start-up): fire what is open, resolve the rest.

        The rest is resolved even when this book never saw it firing: a clear that came
        while no notifier ran must still reach Alertmanager (resolving an alert it does not
        know notifies no one).
        """
        line, machine = state.line, state.machine_id
        out = []
        if state.alert_id is not None:
            alert = self._alert(ANOMALY, line, machine, state.alert_since or state.since)
            alert["annotations"] = {
                "summary": f"{machine} ({line}): anomalous readings",
                "alert_id": state.alert_id,
                "peak_score": f"{state.peak_score:.3f}" if state.peak_score is not None else "",
                **({"acknowledged_by": state.acknowledged_by} if state.acknowledged_by else {}),
            }
            out.append(alert)
        else:
            out.append(self._resolve(ANOMALY, line, machine, now))
        if state.state == "OFFLINE":
            alert = self._alert(OFFLINE, line, machine, state.since)
            alert["annotations"] = {"summary": f"{machine} ({line}): no readings"}
            out.append(alert)
        else:
            out.append(self._resolve(OFFLINE, line, machine, now))
        return out

    def refresh(self, now: float, resend_s: float) -> list[dict[str, Any]]:
        """Every firing alert with ``endsAt`` pushed ahead (Alertmanager keeps it active)."""
        ends = rfc3339(now + 4 * resend_s)
        return [{**a, "endsAt": ends} for a in self.firing.values()]


def post_alerts(base_url: str, alerts: list[dict[str, Any]]) -> None:
    """POST alerts to Alertmanager's ``/api/v2/alerts``; raises ``OSError`` on failure."""
    request = urllib.request.Request(  # noqa: S310 - the configured Alertmanager URL
        f"{base_url.rstrip('/')}/api/v2/alerts",
        data=json.dumps(alerts).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:  # noqa: S310
        if resp.status >= 300:
            raise OSError(f"alertmanager answered HTTP {resp.status}")


class Notifier:
    """Subscribes to alert events and states and keeps Alertmanager in step."""

    def __init__(self, broker: BrokerSettings, settings: NotifySettings) -> None:
        self.broker, self.settings = broker, settings
        self.topics = Topics(broker.topic_root)
        self.book = AlertBook(parse_labels(settings.labels), settings.web_url)
        self.sent = 0
        self.failures = 0
        self.rejected = 0
        self._inbox: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._subscribed = threading.Event()
        self._refused: str | None = None
        self._waiter = fwmqtt.ConnectWaiter()
        self._client = fwmqtt.new_client(broker, f"factorywatch-notify-{time.time_ns() % 10**9}")
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = lambda _c, _u, m: self._inbox.put(
            (m.topic, bytes(m.payload), bool(m.retain))
        )

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self._waiter.record(rc)
        if not rc.is_failure:
            root = self.topics.root
            client.subscribe([(f"{root}/alerts/+/+/{leaf}", 1) for leaf in ("event", "state")])

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        failed = [str(c) for c in codes if fwmqtt.reason_failed(c)]
        self._refused = ", ".join(failed) or None
        self._subscribed.set()
        log.info("notify_subscribed", alertmanager=self.settings.alertmanager_url)

    def handle(
        self, topic: str, payload: bytes, now: float, *, retained: bool = True
    ) -> list[dict[str, Any]]:
        """Alerts to post for one message (bad messages are logged and skipped).

        States are reconciled only when ``retained`` (delivered on subscribing): afterwards
        the events say everything, and a state follows each of them.
        """
        try:
            line, machine, leaf = self.topics.parse_alert(topic)
            if not payload:
                return []
            if leaf == "event":
                event = contracts.decode(AlertEvent, payload, now=now)
                if (event.line, event.machine_id) == (line, machine):
                    return self.book.on_event(event)
            elif leaf == "state" and retained:
                state = contracts.decode(MachineState, payload, now=now)
                if (state.line, state.machine_id) == (line, machine):
                    return self.book.on_state(state, now)
        except PayloadError as exc:
            self.rejected += 1
            log.warning(
                "notify_message_rejected", topic=topic, reason=exc.reason, error=str(exc)[:200]
            )
        return []

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        if not alerts:
            return
        now = time.time()
        ends = rfc3339(now + 4 * self.settings.resend_s)  # firing: kept alive by re-sends
        alerts = [a if "endsAt" in a else {**a, "endsAt": ends} for a in alerts]
        try:
            post_alerts(self.settings.alertmanager_url, alerts)
        except (OSError, urllib.error.URLError) as exc:
            self.failures += 1
            log.warning("alertmanager_post_failed", error=str(exc), alerts=len(alerts))
            return
        self.sent += len(alerts)
        for a in alerts:
            log.info(
                "alert_notified",
                alertname=a["labels"]["alertname"],
                machine=a["labels"]["machine"],
                resolved=a["endsAt"] <= rfc3339(now),
            )

    def run(self, stop: threading.Event) -> None:
        """Notify until ``stop``; raises ``BrokerError`` if the subscription is refused."""
        fwmqtt.connect(self._client, self.broker, self._waiter)
        try:
            if not self._subscribed.wait(10) or self._refused:
                raise BrokerError(f"notify subscription refused ({self._refused or 'no SUBACK'})")
            next_refresh = time.monotonic() + self.settings.resend_s
            while not stop.is_set():
                try:
                    topic, payload, retained = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    pass
                else:
                    self._post(self.handle(topic, payload, time.time(), retained=retained))
                if time.monotonic() >= next_refresh:
                    self._post(self.book.refresh(time.time(), self.settings.resend_s))
                    next_refresh = time.monotonic() + self.settings.resend_s
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            log.info("notifier_stopped", sent=self.sent, failures=self.failures)
