"""Typed settings: one pydantic-settings class per role, read from env vars (and ``.env``).

Each is built once in the role's ``main`` and passed down; CLI flags override fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from factorywatch.contracts import DEFAULT_MAX_FUTURE_SKEW_S
from factorywatch.topics import DEFAULT_ROOT

# Relative paths: data, models and state live under the working directory (the project
# root for `make demo`, the container's WORKDIR in compose), never inside site-packages.
DEFAULT_DATA_DIR = Path("data")
DEFAULT_MODEL_DIR = Path("model") / "artifacts"
DEFAULT_STATE_DIR = Path("run") / "detector"

Port = Annotated[int, Field(ge=1, le=65535)]


class _Settings(BaseSettings):
    def with_overrides(self, **overrides: Any) -> Self:
        """Return a copy with the given fields replaced; ``None`` means "keep"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return self.model_validate({**self.model_dump(), **given})


class BrokerSettings(_Settings):
    """How to reach the MQTT broker (``FACTORYWATCH_MQTT_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYWATCH_MQTT_", env_file=".env", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: Port = 1883
    topic_root: str = DEFAULT_ROOT
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(
        default=None, description="file holding the password (e.g. a Docker secret)"
    )
    secrets_dir: Path | None = Field(
        default=None, description="directory of <user>.password files (`broker init`)"
    )
    tls_ca: Path | None = Field(default=None, description="CA bundle; setting it turns TLS on")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    connect_retries: Annotated[int, Field(ge=0)] = 10
    protocol: Literal["5", "3.1.1"] = Field(
        default="5",
        description="MQTT version: 5 (reason codes: a denied publish is seen) or 3.1.1",
    )

    @property
    def authenticates(self) -> bool:
        """True when this client logs in (as opposed to an anonymous client)."""
        return any(
            v is not None
            for v in (self.username, self.password, self.password_file, self.secrets_dir)
        )

    def resolved_password(self, username: str | None = None) -> str | None:
        """The password: given directly, from ``password_file``, or ``secrets_dir/<user>``."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        user = username or self.username
        if self.secrets_dir is not None and user is not None:
            path = self.secrets_dir / f"{user}.password"
            if path.is_file():
                return path.read_text().strip()
        return None

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Dump keeping the secret as a ``SecretStr`` so copies do not reveal it."""
        data = super().model_dump(**kwargs)
        data["password"] = self.password
        return data


class DataSettings(_Settings):
    """Where the training dataset comes from (``FACTORYWATCH_*``)."""

    model_config = SettingsConfigDict(env_prefix="FACTORYWATCH_", env_file=".env", extra="ignore")

    dataset: Path | None = Field(
        default=None, description="local CSV to use instead of downloading (--dataset)"
    )
    data_dir: Path = DEFAULT_DATA_DIR
    model_dir: Path = DEFAULT_MODEL_DIR
    dataset_dir: Path | None = Field(
        default=None,
        description="a (read-only) folder searched for the dataset before data_dir; compose "
        "mounts the host's ./data here",
    )


class DetectorSettings(_Settings):
    """The detector service (``FACTORYWATCH_DETECTOR_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYWATCH_DETECTOR_", env_file=".env", extra="ignore"
    )

    client_id: str = "factorywatch-detector"
    session_expiry_s: Annotated[int, Field(ge=0)] = 24 * 3600
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 256
    rebaseline: bool = Field(
        default=True,
        description="a machine whose alarm stays open as long as its model was trained "
        "(readings) re-baselines: its alert clears and it recalibrates on its next readings "
        "(models that name it: train --csv, live calibration)",
    )
    batch_linger_ms: Annotated[float, Field(ge=0, le=100)] = Field(
        default=2.0,
        description="while readings come faster than one per 2 x this, wait this long after "
        "a turn's first ones for more to score with them (0: never wait)",
    )
    max_clock_skew_s: Annotated[float, Field(gt=0)] = Field(
        default=7 * 24 * 3600.0, description="how far in the PAST a reading's ts may be"
    )
    max_future_skew_s: Annotated[float, Field(gt=0)] = Field(
        default=DEFAULT_MAX_FUTURE_SKEW_S,
        description="how far AHEAD of the detector's clock a reading's ts may be",
    )
    registry_file: Path | None = Field(
        default=None,
        description="account registry (default: <secrets dir>/registry.json when logging in "
        "with a secrets dir); readings of unregistered machines or from senders that may "
        "not speak for them are dead-lettered",
    )
    dedup_size: Annotated[int, Field(ge=0)] = 100_000
    answer_cache_size: Annotated[int, Field(ge=0, le=10_000_000)] = Field(
        default=10_000,
        description="verdicts kept (by reading id) to answer a reading its sensor sends again "
        "because it never heard the verdict (0: such a duplicate gets no answer)",
    )
    explain_top_k: Annotated[int, Field(ge=0, le=16)] = 3
    reload_interval_s: Annotated[float, Field(gt=0)] = 5.0
    heartbeat_s: Annotated[float, Field(gt=0)] = 15.0
    lines: str | None = Field(
        default=None,
        description="comma-separated production lines this detector serves (default: all)",
    )
    alert_k: Annotated[int, Field(ge=1)] = 3
    alert_n: Annotated[int, Field(ge=1)] = 5
    alert_m: Annotated[int, Field(ge=1)] = 10
    alert_clear_score: Annotated[float, Field(gt=0, le=1)] | None = Field(
        default=None,
        description="score at or below which a reading counts toward clearing an alert "
        "(default: the model card's clear_threshold)",
    )
    offline_after_s: Annotated[float, Field(gt=0)] = 60.0
    drift_window: Annotated[int, Field(ge=10)] = Field(
        default=5000, description="readings (all machines) the drift check looks back over"
    )
    drift_factor: Annotated[float, Field(gt=1)] = Field(
        default=3.0,
        description="drift when the recent share above the threshold is this many times the "
        "training one",
    )
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other containers
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9108
    transport: Literal["paho", "mqtt5"] | None = Field(
        default=None,
        description="MQTT client: mqtt5 (our own driver on the compiled mqtt5 codec: less CPU "
        "per message) or paho (paho-mqtt); both QoS 1, ack after the verdict. Unset: mqtt5, "
        "except paho where only paho serves (see transport_for)",
    )
    scorer: Literal["fast", "sklearn"] = Field(
        default="fast", description="sklearn = the prototype's per-call scikit-learn scoring"
    )
    state_dir: Path = Field(
        default=DEFAULT_STATE_DIR,
        description="where the checkpoint (snapshot + journal of per-machine state and answered "
        "readings) is kept; a restarted detector resumes from it",
    )
    checkpoint_records_every_s: Annotated[float, Field(gt=0, le=60)] = Field(
        default=1.0,
        description="how often changed machine state (windows, streaks, peaks) is journaled; "
        "alert transitions and acknowledgements are journaled at once",
    )
    snapshot_every_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="how often the whole state is written as a fresh snapshot"
    )
    sparkplug: bool = Field(
        default=False,
        description="also read Sparkplug B edge nodes (spBv1.0/...) as a host application",
    )
    asset_config: Path | None = Field(
        default=None,
        description="asset config (YAML, or JSON in the detector image): machine groups and "
        "live calibration for the router (a model per machine or group)",
    )
    sparkplug_groups: str | None = Field(
        default=None, description="comma-separated Sparkplug group ids to read (default: all)"
    )
    sparkplug_reorder_timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=2.0,
        description="how long a gap in an edge node's sequence numbers may stay open before "
        "the detector asks the node for a rebirth",
    )
    sparkplug_rebirth_backoff_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=5.0, description="least time between two rebirth requests to one edge node"
    )
    sparkplug_silence_timeout_s: Annotated[float, Field(gt=0)] | None = Field(
        default=None,
        description="seconds without data after which a living Sparkplug device is OFFLINE "
        "(default: never; a device reporting by exception is offline on its or its node's death)",
    )
    sparkplug_primary_host_id: (
        Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^/+#]+$")] | None
    ) = Field(
        default=None,
        description="be the Sparkplug primary host application of this id: publish the "
        "retained spBv1.0/STATE/<id> (online; offline as the connection's will), so edge nodes "
        "configured for it store and forward while the detector is away (needs sparkplug)",
    )
    sparkplug_out: bool = Field(
        default=False,
        description="also publish every machine's verdict and alert state as Sparkplug B "
        "metrics of the detector's own edge node (the JSON alerts tree stays)",
    )
    sparkplug_out_group: str = Field(
        default="factorywatch", description="Sparkplug group id of the detector's edge node"
    )
    sparkplug_out_node: str | None = Field(
        default=None, description="Sparkplug edge node id of the detector (default: client id)"
    )
    sparkplug_out_username: str | None = Field(
        default=None,
        description="on an authenticating broker: the account of the detector's edge node "
        "(`broker add-user NAME --role edge-node --line factorywatch`); it is also its node id",
    )
    sparkplug_out_password_file: Path | None = Field(
        default=None,
        description="its password file (default: <secrets dir>/<sparkplug_out_username>.password)",
    )

    def transport_for(self, protocol: str) -> tuple[Literal["paho", "mqtt5"], str | None]:
        """The MQTT client the Mosquitto detector runs on, and why it is not mqtt5 (or None).

        Unset, it is mqtt5, except paho where only paho serves: a Sparkplug primary host (its
        will, the STATE death, is stamped at each connect) and MQTT 3.1.1 (the mqtt5 driver
        speaks MQTT 5 only). Asking for mqtt5 there is refused (``ValueError``).
        """
        needs_paho = (
            "sparkplug_primary_host_id is set (its will is stamped at each connect)"
            if self.sparkplug_primary_host_id is not None
            else "MQTT 3.1.1 (the mqtt5 transport speaks MQTT 5 only)"
            if protocol == "3.1.1"
            else None
        )
        if self.transport == "mqtt5" and needs_paho is not None:
            raise ValueError(f"transport mqtt5 cannot serve here: {needs_paho}; use paho")
        if self.transport is not None:
            return self.transport, None
        return ("paho", needs_paho) if needs_paho is not None else ("mqtt5", None)


class SensorSettings(_Settings):
    """A sensor publisher (``FACTORYWATCH_SENSOR_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="FACTORYWATCH_SENSOR_", env_file=".env", extra="ignore"
    )

    line: str = "line1"
    rate_hz: Annotated[float, Field(gt=0, le=100_000)] = 1.0
    anomaly_rate: Annotated[float, Field(ge=0, le=1)] = 0.02
    buffer_size: Annotated[int, Field(ge=1)] = 100_000
    pending_size: Annotated[int, Field(ge=1, le=10_000_000)] = Field(
        default=10_000,
        description="readings per machine kept until the detector's answer (verdict or dead "
        "letter) is heard, to send again after a reconnect; the oldest is dropped beyond it",
    )
    republish_after_s: Annotated[float, Field(ge=0, le=86_400)] = Field(
        default=10.0,
        description="a reading acknowledged this long ago and still unanswered while a later "
        "one was answered is sent again (0: only after a reconnect)",
    )
    resend_answered_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        default=5.0,
        description="after a reconnect, readings answered this long before the connection was "
        "lost are sent again once (a killed broker may have lost their verdicts on the way to "
        "other consumers; 0: never, e.g. with a broker saving on every change)",
    )


def env_servers() -> list[str]:
    """``FACTORYWATCH_NATS_SERVERS`` (comma-separated URLs), default the local 4222."""
    value = os.environ.get("FACTORYWATCH_NATS_SERVERS", "nats://127.0.0.1:4222")
    return [s.strip() for s in value.split(",") if s.strip()]
