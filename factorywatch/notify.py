"""Notifications through Prometheus Alertmanager: raised and cleared alerts pushed to its v2 API.

Alertmanager then does what plants configure there: grouping, routing (email, Slack,
webhooks), inhibition, silences and maintenance windows. An open alert is re-sent every
``resend_s`` with ``endsAt`` a few intervals ahead (as Prometheus does), so Alertmanager keeps
it firing while the notifier lives and resolves it by itself if the notifier dies; a clear
sends ``endsAt`` = the clear time. On start the retained ``state`` topics say which machines
are in ALERT or OFFLINE right now, so a restarted notifier neither forgets nor misses a clear.

Nothing is lost while Alertmanager is down or hung: the book keeps every open alert and
every resolution until a POST that carried it succeeded (bounded: the oldest resolutions go
first past :data:`MAX_TRACKED`), and re-sends all of them after a failure with a growing
back-off (1 s doubling up to ``resend_s``). An alert that fired and cleared while
Alertmanager was away is delivered firing first and resolved at the next re-send, so its
receivers are told about it (Alertmanager notifies no one of an alert it first learns of
resolved). Messages are drained in bursts and posted as one batch, in chunks of
:data:`CHUNK` sent in parallel, each with a :data:`HTTP_TIMEOUT_S` timeout: a hung
Alertmanager costs one timeout per burst, not one per alert. At start the notifier reads
Alertmanager's configuration and warns (``alertmanager_receiver_missing``) when the receiver
it routes to has no channel: such alerts are visible in its UI but notify no one.

Two alert names, labelled ``machine``, ``line`` and ``severity`` (plus any ``--label k=v``):
``FactorywatchAnomaly`` (ALERT_RAISED .. ALERT_CLEARED) and ``FactorywatchMachineOffline``
(MACHINE_OFFLINE .. MACHINE_ONLINE). An anomaly is ``critical`` when a driving feature lies
``critical_z`` (4) or more standard deviations from its training mean, else ``warning``;
an offline machine is ``warning``. Alertmanager routes on the label (page for critical,
a ticket or a channel for warning).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import paho.mqtt.client as mqtt
import structlog
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from factorywatch import contracts
from factorywatch import mqtt as fwmqtt
from factorywatch.contracts import AlertEvent, Contribution, MachineState
from factorywatch.errors import BrokerError, PayloadError
from factorywatch.settings import BrokerSettings
from factorywatch.topics import Topics

log = structlog.get_logger("factorywatch.notify")

ANOMALY: Final = "FactorywatchAnomaly"
OFFLINE: Final = "FactorywatchMachineOffline"
HTTP_TIMEOUT_S: Final = 5.0
CHUNK: Final = 200  # alerts per POST
PARALLEL_POSTS: Final = 4
FIRST_RETRY_S: Final = 1.0  # after a failed post; doubles up to resend_s
MAX_TRACKED: Final = 20_000  # alerts the book keeps (open plus resolutions not yet delivered)
DRAIN_MAX: Final = 5_000  # messages applied before the next post
_Key = tuple[str, str, str]


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
    critical_z: float = Field(
        default=4.0,
        gt=0,
        description="an anomaly is critical when a driving feature's |z| reaches this, "
        "else a warning",
    )


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
class _Tracked:
    """One alert the book keeps until Alertmanager has what it needs to know of it."""

    alert: dict[str, Any]  # labels, annotations, startsAt (endsAt is added when sent)
    delivered: bool = False  # Alertmanager has had it firing at least once
    resolved_at: float | None = None


@dataclass
class AlertBook:
    """Which Alertmanager alerts are firing, built from alert events and states, and which
    resolutions Alertmanager still has to receive (pure)."""

    extra_labels: Mapping[str, str] = field(default_factory=dict)
    web_url: str | None = None
    tracked: dict[_Key, _Tracked] = field(default_factory=dict)
    max_tracked: int = MAX_TRACKED
    critical_z: float = 4.0
    dropped: int = 0  # resolutions forgotten undelivered because the book was full

    @property
    def firing(self) -> dict[_Key, dict[str, Any]]:
        """The open alerts by (alertname, line, machine)."""
        return {k: t.alert for k, t in self.tracked.items() if t.resolved_at is None}

    def _alert(self, name: str, line: str, machine: str, starts: float) -> dict[str, Any]:
        key = (name, line, machine)
        found = self.tracked.get(key)
        if found is not None and found.resolved_at is None:
            return found.alert
        alert: dict[str, Any] = {
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
        self.tracked.pop(key, None)  # a new episode replaces an old one's pending resolution
        self.tracked[key] = _Tracked(alert)
        self._bound()
        return alert

    def _bound(self) -> None:
        while len(self.tracked) > self.max_tracked:
            victim = next((k for k, t in self.tracked.items() if t.resolved_at is not None), None)
            if victim is None:
                return  # only open alerts: each is one machine's, kept
            del self.tracked[victim]
            self.dropped += 1

    def _resolve(self, name: str, line: str, machine: str, at: float) -> dict[str, Any]:
        """Mark the alert resolved at ``at``; what to post now: the resolution, or the alert
        firing when Alertmanager has not had it yet (the resolution follows at a re-send)."""
        key = (name, line, machine)
        found = self.tracked.get(key)
        if found is None:
            self._alert(name, line, machine, at)
            found = self.tracked[key]
            # never seen firing here: an earlier notifier told Alertmanager, or nothing
            # fired; a resolution alone is right (and harmless) in both cases
            found.delivered = True
        if found.resolved_at is None:
            found.resolved_at = at
        if not found.delivered:
            return found.alert
        return {**found.alert, "endsAt": rfc3339(found.resolved_at)}

    def _severity(self, explanation: list[Contribution] | None) -> str:
        far = max((abs(c.z) for c in explanation or []), default=0.0)
        # no explanation: nothing says it is mild, so it pages
        return "critical" if not explanation or far >= self.critical_z else "warning"

    def on_event(self, event: AlertEvent) -> list[dict[str, Any]]:
        """Apply one event; return the alerts to post now (resolved ones carry ``endsAt``)."""
        line, machine = event.line, event.machine_id
        kind = event.event
        if kind == "ALERT_RAISED":
            self.tracked.pop((ANOMALY, line, machine), None)  # a new episode
            alert = self._alert(ANOMALY, line, machine, event.at)
            alert["labels"]["severity"] = self._severity(event.explanation)
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
            alert["labels"]["severity"] = self._severity(state.explanation)
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
        """Everything Alertmanager must hear again: each open alert (and each resolved one it
        never had firing) with ``endsAt`` pushed ahead, and each undelivered resolution."""
        ends = rfc3339(now + 4 * resend_s)
        out = []
        for t in self.tracked.values():
            if t.resolved_at is None or not t.delivered:
                out.append({**t.alert, "endsAt": ends})
            else:
                out.append({**t.alert, "endsAt": rfc3339(t.resolved_at)})
        return out

    def delivered(self, alerts: list[dict[str, Any]]) -> None:
        """Alertmanager accepted ``alerts`` (as sent): a delivered resolution is forgotten,
        a delivered firing alert is marked so its resolution can follow."""
        for sent in alerts:
            labels = sent["labels"]
            key = (labels["alertname"], labels["line"], labels["machine"])
            found = self.tracked.get(key)
            if found is None or found.alert["startsAt"] != sent["startsAt"]:
                continue  # an older episode's
            if found.resolved_at is not None and sent.get("endsAt") == rfc3339(found.resolved_at):
                del self.tracked[key]
            else:
                found.delivered = True


def receivers_without_channels(config_yaml: str) -> list[str]:
    """The receivers Alertmanager's routes send to that have no notification channel (no
    ``*_configs``): their alerts are visible in its UI and reach no one. Pure."""
    config = yaml.safe_load(config_yaml) or {}
    if not isinstance(config, dict):
        return []
    channels = {
        r.get("name"): any(k.endswith("_configs") and v for k, v in r.items())
        for r in config.get("receivers") or []
        if isinstance(r, dict)
    }
    used, routes = set(), [config.get("route") or {}]
    while routes:
        route = routes.pop()
        if isinstance(route, dict):
            if route.get("receiver"):
                used.add(route["receiver"])
            routes.extend(route.get("routes") or [])
    return sorted(name for name in used if not channels.get(name, False))


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
        self.book = AlertBook(
            parse_labels(settings.labels), settings.web_url, critical_z=settings.critical_z
        )
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
        self._pool = ThreadPoolExecutor(PARALLEL_POSTS, thread_name_prefix="notify-post")
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

    def _post(self, alerts: list[dict[str, Any]]) -> bool:
        """Post ``alerts`` (chunks in parallel); mark what arrived; True when all did."""
        if not alerts:
            return True
        now = time.time()
        ends = rfc3339(now + 4 * self.settings.resend_s)  # firing: kept alive by re-sends
        alerts = [a if "endsAt" in a else {**a, "endsAt": ends} for a in alerts]
        chunks = [alerts[i : i + CHUNK] for i in range(0, len(alerts), CHUNK)]

        def send(chunk: list[dict[str, Any]]) -> str | None:
            try:
                post_alerts(self.settings.alertmanager_url, chunk)
            except (OSError, urllib.error.URLError) as exc:  # TimeoutError is an OSError
                return str(exc) or type(exc).__name__
            return None

        errors = list(self._pool.map(send, chunks))
        for chunk, error in zip(chunks, errors, strict=True):
            if error is not None:
                self.failures += 1
                log.warning("alertmanager_post_failed", error=error, alerts=len(chunk))
                continue
            self.book.delivered(chunk)
            self.sent += len(chunk)
            for a in chunk:
                log.info(
                    "alert_notified",
                    alertname=a["labels"]["alertname"],
                    machine=a["labels"]["machine"],
                    resolved=a["endsAt"] <= rfc3339(now),
                )
        return all(e is None for e in errors)

    def _drain(self, first_wait_s: float) -> list[dict[str, Any]]:
        """Apply every message waiting (up to :data:`DRAIN_MAX`); the alerts they changed."""
        changed: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        wait: float | None = first_wait_s
        for _ in range(DRAIN_MAX):
            try:
                topic, payload, retained = (
                    self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
                )
            except queue.Empty:
                break
            wait = None
            for alert in self.handle(topic, payload, time.time(), retained=retained):
                labels = alert["labels"]
                # the latest word on each alert wins (a raise then its clear: the clear)
                key = (labels["alertname"], labels["line"], labels["machine"], alert["startsAt"])
                changed[key] = alert
        return list(changed.values())

    def check_receivers(self) -> list[str] | None:
        """Warn when Alertmanager routes to a receiver without a channel; the names (None:
        its configuration could not be read)."""
        url = f"{self.settings.alertmanager_url.rstrip('/')}/api/v2/status"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:  # noqa: S310
                original = json.loads(resp.read())["config"]["original"]
            empty = receivers_without_channels(original)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
            log.warning("alertmanager_config_unreadable", url=url, error=str(exc)[:200])
            return None
        if empty:
            log.warning(
                "alertmanager_receiver_missing",
                receivers=empty,
                remedy="alerts reach Alertmanager but notify no one: add email_configs, "
                "slack_configs or webhook_configs to these receivers in alertmanager.yml",
            )
        return empty

    def run(self, stop: threading.Event) -> None:
        """Notify until ``stop``; raises ``BrokerError`` if the subscription is refused."""
        fwmqtt.connect(self._client, self.broker, self._waiter)
        # asked beside the loop: a hung Alertmanager must not delay the first notifications
        receivers = self._pool.submit(self.check_receivers)
        try:
            if not self._subscribed.wait(10) or self._refused:
                raise BrokerError(f"notify subscription refused ({self._refused or 'no SUBACK'})")
            resend = self.settings.resend_s
            next_flush, retry = time.monotonic() + resend, FIRST_RETRY_S
            while not stop.is_set():
                changed = self._drain(0.2)
                if time.monotonic() >= next_flush:  # everything pending, not only the news
                    ok = self._post(self.book.refresh(time.time(), resend))
                elif changed:
                    ok = self._post(changed)
                else:
                    continue
                if ok:
                    if receivers.done() and receivers.result() is None:  # it is back: ask again
                        receivers = self._pool.submit(self.check_receivers)
                    if time.monotonic() >= next_flush or retry > FIRST_RETRY_S:
                        next_flush, retry = time.monotonic() + resend, FIRST_RETRY_S
                else:  # try everything again soon, then less and less often
                    next_flush = time.monotonic() + retry
                    retry = min(retry * 2, resend)
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._client.disconnect()
            self._client.loop_stop()
            log.info(
                "notifier_stopped",
                sent=self.sent,
                failures=self.failures,
                pending=len(self.book.tracked),
                dropped=self.book.dropped,
            )
