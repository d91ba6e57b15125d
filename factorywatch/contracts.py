"""Wire contracts: every JSON message on the broker is one of these pydantic models.

Validated only at the edges with ``model_validate_json``; encoded with ``encode`` (no NaN).
Readings are *named channels* whose names carry their unit (``torque_nm``), so a machine
with other sensors needs a model trained on those channels, not new detector code.

``Telemetry`` schema version 2 carries any named numeric channels (``readings``; names from
real systems such as ``Vibration1RMS`` or ``Pump/Flow Rate`` are mapped to channel names by
``factorywatch.channels.canonical``) and optional string ``attributes`` (the AI4I product
type is one: ``{"product_type": "L"}``). Version 1 (``product_type`` at the top level,
channel names already canonical) is still accepted and normalised to the same in-memory
shape: a version 2 reading.
Scores have one direction everywhere: higher = more anomalous.

Every field is bounded at the door (integers within signed 63 bits, string lengths, list and
channel counts, finite floats, timestamps within a window of the receiver's time), and every
consumer decodes with ``decode`` / ``decode_batch`` here, so no accepted message can break a
store downstream (SQLite INTEGER, orjson, PostgreSQL BIGINT all stop at 2**63 - 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from factorywatch.channels import CHANNEL_PATTERN, ChannelNameError, canonical
from factorywatch.errors import DeadLetterReason, PayloadError
from factorywatch.topics import ID_PATTERN

SCHEMA_VERSION: Final = 1
TELEMETRY_SCHEMA_VERSION: Final = 2
MAX_ATTRIBUTES: Final = 16
PRODUCT_TYPE: Final = "product_type"
MAX_PAYLOAD_BYTES: Final = 64 * 1024
MAX_BATCH_BYTES: Final = 512 * 1024
MAX_BATCH_READINGS: Final = 1000
MAX_CHANNELS: Final = 64
# Readings stamped further ahead of the detector's clock than this are dead-lettered
# (clock_skew); FACTORYWATCH_DETECTOR_MAX_FUTURE_SKEW_S overrides it.
DEFAULT_MAX_FUTURE_SKEW_S: Final = 300.0
# Readings stamped further behind the receiver's clock than this are refused by default (the
# detector's FACTORYWATCH_DETECTOR_MAX_CLOCK_SKEW_S, a persistent session's expiry).
DEFAULT_MAX_PAST_SKEW_S: Final = 7 * 24 * 3600.0
# The largest integer any store takes: SQLite INTEGER, PostgreSQL BIGINT, orjson (signed 64).
MAX_INT: Final = 2**63 - 1
MAX_ID_TEXT: Final = 128  # alert ids, model versions, client ids, feature names
MAX_DETAIL: Final = 500  # a dead letter's detail, an operator's note
MAX_EXCERPT: Final = 1000  # a dead letter's payload excerpt (200 bytes, each maybe U+FFFD)
MAX_TOPIC: Final = 1024
MAX_EXPLANATION: Final = 64
MAX_THRESHOLD_CHANGES: Final = 5  # a machine state shows its latest threshold changes
# Event time must be Unix seconds: this window rejects milliseconds and nonsense early.
MIN_TS: Final = 946_684_800.0  # 2000-01-01
MAX_TS: Final = 4_102_444_800.0  # 2100-01-01

# The channels of the AI4I 2020 milling machine, with their units in the names.
AIR_TEMPERATURE: Final = "air_temperature_k"
PROCESS_TEMPERATURE: Final = "process_temperature_k"
ROTATIONAL_SPEED: Final = "rotational_speed_rpm"
TORQUE: Final = "torque_nm"
TOOL_WEAR: Final = "tool_wear_min"
AI4I_CHANNELS: Final = (AIR_TEMPERATURE, PROCESS_TEMPERATURE, ROTATIONAL_SPEED, TORQUE, TOOL_WEAR)

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ChannelName = Annotated[str, StringConstraints(pattern=CHANNEL_PATTERN)]
AttributeValue = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]
ProductType = Literal["L", "M", "H"]
#: CALIBRATING: the machine has no model yet; its readings are collected to fit one (no alert
#: state counts them). Consumers treat it as "not judged" (neither normal nor anomalous).
Status = Literal["NORMAL", "ALERT", "CALIBRATING"]
AnomalyKind = Literal[
    "rpm_spike",
    "heat_dissipation",
    "power",
    "overstrain",
    "tool_wear",
    "stuck_sensor",
    "drift",
]
ANOMALY_KINDS: Final[tuple[str, ...]] = AnomalyKind.__args__  # type: ignore[attr-defined]
EventTime = Annotated[float, Field(ge=MIN_TS, le=MAX_TS, description="Unix seconds")]
#: A count or sequence number: what a signed 64-bit store column holds, never negative.
Count = Annotated[int, Field(ge=0, le=MAX_INT)]
IdText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_TEXT)]
W = TypeVar("W", bound="_Wire")


class _Wire(BaseModel):
    """Base of every wire model: strict, frozen, no unknown keys, finite numbers only."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    #: fields holding a time (Unix seconds) that must not lie ahead of the receiver's clock
    times: ClassVar[tuple[str, ...]] = ()

    def event_times(self) -> Iterator[tuple[str, float]]:
        """``(field, value)`` of each time the message carries (``None`` ones left out)."""
        for name in self.times:
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def encode(self) -> bytes:
        """Serialise to compact JSON bytes (never NaN or Infinity)."""
        return self.model_dump_json(exclude_none=True).encode()


class Telemetry(_Wire):
    """One reading of one machine: named numeric channels plus optional string attributes.

    In memory every reading is schema version 2. A version 1 message (``product_type`` at
    the top level, AI4I-era) is normalised on the way in: its product type becomes the
    attribute ``product_type``. Version 2 channel and attribute names are mapped by
    ``factorywatch.channels.canonical``; two names mapping to one channel are a schema error.
    """

    times: ClassVar[tuple[str, ...]] = ("ts",)
    schema_version: Literal[2] = TELEMETRY_SCHEMA_VERSION
    machine_id: Identifier
    line: Identifier
    seq: Annotated[Count, Field(description="per-machine sequence number, unique")]
    ts: EventTime
    readings: Annotated[dict[ChannelName, float], Field(min_length=1, max_length=MAX_CHANNELS)]
    attributes: Annotated[
        dict[ChannelName, AttributeValue],
        Field(max_length=MAX_ATTRIBUTES, description="string context, e.g. product_type"),
    ] = {}
    injected: AnomalyKind | None = Field(
        default=None,
        description="simulator ground truth: the anomaly injected into this reading. "
        "Ignored by the detector; used to measure detection end to end.",
    )

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        """Version 1 -> version 2 shape; version 2 names -> channel names."""
        if not isinstance(data, dict):
            return data
        # Version 1 senders could leave the version out; their product_type says which it is.
        version = data.get("schema_version", 1 if PRODUCT_TYPE in data else 2)
        if version == 1:
            return _from_v1(data)
        if version != TELEMETRY_SCHEMA_VERSION:
            return data
        out = dict(data)
        for key in ("readings", "attributes"):
            if isinstance(out.get(key), dict):
                out[key] = _canonical_keys(out[key])
        return out

    @property
    def product_type(self) -> str | None:
        """The AI4I product type (``attributes["product_type"]``), if the reading has one."""
        return self.attributes.get(PRODUCT_TYPE)


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 message in version 2 shape (names stay as strict as version 1 had them)."""
    out = dict(data)
    out["schema_version"] = TELEMETRY_SCHEMA_VERSION
    if PRODUCT_TYPE not in out:
        raise PydanticCustomError("missing", "product_type: field required in schema version 1")
    product = out.pop(PRODUCT_TYPE)
    if not isinstance(product, str) or product not in ("L", "M", "H"):
        raise PydanticCustomError(
            "literal_error", "product_type: must be one of 'L', 'M', 'H' in schema version 1"
        )
    if "attributes" in out:
        raise ValueError("attributes: not part of schema version 1")
    out["attributes"] = {PRODUCT_TYPE: product}
    return out


def _canonical_keys(values: dict[Any, Any]) -> dict[Any, Any]:
    """Map every key with ``canonical``; a collision or an unusable name is a ValueError."""
    out: dict[Any, Any] = {}
    owner: dict[str, Any] = {}
    for raw, value in values.items():
        try:
            name = canonical(raw)
        except ChannelNameError as exc:
            raise ValueError(str(exc)) from None
        if name in owner:
            raise ValueError(f"names {owner[name]!r} and {raw!r} both map to channel {name!r}")
        owner[name] = raw
        out[name] = value
    return out


class TelemetryBatch(_Wire):
    """Many readings in one message (a gateway's), on ``<root>/batch/<line>/<gateway>``.

    Every reading must belong to the topic's line; each gets its own verdict on its machine's
    verdict topic, exactly as if it had been published alone.
    """

    schema_version: Literal[1, 2] = TELEMETRY_SCHEMA_VERSION
    readings: Annotated[list[Telemetry], Field(min_length=1, max_length=MAX_BATCH_READINGS)]


class Contribution(_Wire):
    """How much one feature pushed a reading away from the training distribution."""

    feature: IdText
    value: float
    z: float = Field(description="robust z-score of the value against training data")


class Calibration(_Wire):
    """A calibrating machine's progress: ``seen`` of the ``needed`` readings collected."""

    seen: Count
    needed: Annotated[Count, Field(ge=1)]
    fitting: bool = Field(
        default=False, description="all readings collected; the model is being fitted"
    )


class Verdict(_Wire):
    """The detector's decision on one reading."""

    times: ClassVar[tuple[str, ...]] = ("reading_ts",)
    schema_version: Literal[1] = SCHEMA_VERSION
    machine_id: Identifier
    line: Identifier
    seq: Count
    reading_ts: EventTime
    status: Status
    score: float = Field(
        description="Isolation Forest anomaly score s(x) in (0, 1]; higher = more anomalous"
    )
    threshold: float = Field(
        description="status is ALERT when score > threshold, or when outside_training or "
        "surprise is set"
    )
    model_version: IdText
    latency_ms: float = Field(description="receive-to-publish processing time in the detector")
    explanation: Annotated[list[Contribution], Field(max_length=MAX_EXPLANATION)] | None = None
    outside_training: Annotated[list[ChannelName], Field(max_length=MAX_CHANNELS + 1)] | None = (
        Field(
            default=None,
            description="channels (or temp_diff_k, process minus air temperature) whose value lies "
            "outside the range the model was trained on (model.envelope): an ALERT whatever "
            "the score",
        )
    )
    surprise: float | None = Field(
        default=None,
        description="set when the machine's recent scores (the mean of its last 10) lie so far "
        "above its own recent score levels that such a level is seen less than once in a "
        "thousand readings: -log10 of that tail probability (3 = one in a thousand), above "
        "the model's surprise threshold; an ALERT whatever the score",
    )
    calibration: Calibration | None = Field(
        default=None,
        description="set when status is CALIBRATING (score and threshold are then 0 and "
        "model_version is 'calibrating'): the machine's own model is being calibrated",
    )
    historical: bool | None = Field(
        default=None,
        description="true for store-and-forward data (a Sparkplug edge node's is_historical "
        "metrics, replayed after the detector was away): scored, but it neither raises nor "
        "clears live alerts; absent otherwise",
    )


class DeadLetter(_Wire):
    """A payload the detector could not accept, with a machine-readable reason."""

    times: ClassVar[tuple[str, ...]] = ("received_at",)
    schema_version: Literal[1] = SCHEMA_VERSION
    reason: DeadLetterReason
    detail: Annotated[str, StringConstraints(max_length=MAX_DETAIL)]
    topic: Annotated[str, StringConstraints(max_length=MAX_TOPIC)]
    payload_bytes: Count
    payload_excerpt: Annotated[str, StringConstraints(max_length=MAX_EXCERPT)]
    # Not EventTime: the detector builds it from its own clock, and building it must not fail.
    received_at: Annotated[float, Field(ge=0)]


class ClientStatus(_Wire):
    """Retained liveness of a client; the broker publishes ``offline`` as its last will."""

    times: ClassVar[tuple[str, ...]] = ("ts",)
    schema_version: Literal[1] = SCHEMA_VERSION
    role: IdText
    client_id: IdText
    state: Literal["online", "offline"]
    ts: EventTime | None = None
    model_version: IdText | None = None


# -- the alert lifecycle (detector/alerting.py decides, the detector shell publishes) --------
AlertEventKind = Literal[
    "ALERT_RAISED", "ALERT_CLEARED", "ALERT_ACKNOWLEDGED", "MACHINE_OFFLINE", "MACHINE_ONLINE"
]
ALERT_EVENT_KINDS: Final[tuple[str, ...]] = AlertEventKind.__args__  # type: ignore[attr-defined]
MachineCondition = Literal["NORMAL", "ALERT", "OFFLINE"]
# silence: no readings; last_will: a sensor's will; ndeath/ddeath: a Sparkplug node's or
# device's death certificate
OfflineReason = Literal["silence", "last_will", "ndeath", "ddeath"]
# Free text typed by operators ends up on terminals: no control characters (no ANSI escapes).
OperatorName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")
]
OperatorNote = Annotated[
    str, StringConstraints(max_length=MAX_DETAIL, pattern=r"^[^\x00-\x1f\x7f]*$")
]


class AlertEvent(_Wire):
    """A transition of one machine's alert state, published on transitions only.

    ``ALERT_RAISED`` when k of the last n readings were anomalous, ``ALERT_CLEARED`` after m
    consecutive normal readings, ``ALERT_ACKNOWLEDGED`` when an operator acknowledged the open
    alert, ``MACHINE_OFFLINE`` / ``MACHINE_ONLINE`` when readings stop / resume.
    """

    times: ClassVar[tuple[str, ...]] = ("at",)
    schema_version: Literal[1] = SCHEMA_VERSION
    machine_id: Identifier
    line: Identifier
    event: AlertEventKind
    at: EventTime = Field(description="when the detector decided it (Unix seconds, its clock)")
    seq: Count | None = Field(
        default=None, description="seq of the reading that triggered it; None for ack/offline"
    )
    alert_id: IdText | None = Field(
        default=None, description="the alert episode this concerns (None when none is open)"
    )
    peak_score: float | None = Field(
        default=None, description="highest score of the open alert's readings so far"
    )
    duration_s: float | None = Field(
        default=None,
        ge=0,
        description="RAISED: 0; CLEARED/ACKNOWLEDGED: how long the alert has been open; "
        "MACHINE_OFFLINE: seconds since the last reading; MACHINE_ONLINE: seconds offline",
    )
    anomalous_in_window: Count | None = Field(
        default=None, description="anomalous readings among the last n when it happened"
    )
    explanation: Annotated[list[Contribution], Field(max_length=MAX_EXPLANATION)] | None = Field(
        default=None, description="the features that drove the peak-score reading"
    )
    acknowledged_by: OperatorName | None = None
    note: OperatorNote | None = Field(
        default=None,
        description="ACKNOWLEDGED: the operator's note; CLEARED by a re-baseline (an alert "
        "open as long as the model was trained, model/rebaseline.py): why",
    )
    reason: OfflineReason | None = Field(
        default=None,
        description="MACHINE_OFFLINE only: no readings (silence), last will, Sparkplug "
        "NDEATH or DDEATH",
    )


ThresholdChangeAction = Literal["false_alarm", "widen", "reset"]


class ThresholdChange(_Wire):
    """One change of a machine's own threshold: who, when, why, before and after."""

    schema_version: Literal[1] = SCHEMA_VERSION
    at: EventTime
    by: OperatorName
    action: ThresholdChangeAction
    alert_id: IdText | None = None
    note: OperatorNote | None = None
    before: float
    after: float
    # the machine's surprise threshold before and after (models with the surprise rule)
    surprise_before: float | None = None
    surprise_after: float | None = None


class MachineState(_Wire):
    """The current alert state of one machine, retained on its ``state`` topic."""

    times: ClassVar[tuple[str, ...]] = ("since", "last_seen", "alert_since")
    schema_version: Literal[1] = SCHEMA_VERSION
    machine_id: Identifier
    line: Identifier
    state: MachineCondition
    since: EventTime = Field(description="when the machine entered this state (detector clock)")
    last_seen: EventTime | None = Field(
        default=None, description="detector clock at the last accepted reading"
    )
    last_seq: Count | None = None
    last_score: float | None = None
    alert_id: IdText | None = Field(
        default=None, description="the open alert; stays set while the machine is OFFLINE"
    )
    alert_since: EventTime | None = None
    acknowledged: bool = False
    acknowledged_by: OperatorName | None = None
    peak_score: float | None = Field(default=None, description="peak score of the open alert")
    explanation: Annotated[list[Contribution], Field(max_length=MAX_EXPLANATION)] | None = Field(
        default=None, description="the features that drove the open alert's peak reading"
    )
    anomalous_in_window: Count = 0
    window_size: Count = Field(ge=1, description="n: how many recent readings the window holds")
    alerts_raised: Count = Field(default=0, description="alerts raised since detector start")
    threshold: float | None = Field(
        default=None,
        description="the machine's own threshold, set by false-alarm feedback or an operator; "
        "absent: its model's",
    )
    threshold_changes: (
        Annotated[list[ThresholdChange], Field(max_length=MAX_THRESHOLD_CHANGES)] | None
    ) = Field(default=None, description="the latest changes of its threshold, oldest first")
    alarm_rate: float | None = Field(
        default=None,
        description="realized share of ALERT verdicts (exponentially weighted, live readings); "
        "absent until it has counted the readings its bound is judged on",
    )
    alarm_rate_bound: float | None = Field(
        default=None, description="the rate above which it is out of bound (3 x its target)"
    )
    alarm_rate_out_of_bound: bool = False


class AckCommand(_Wire):
    """An operator acknowledges a machine's open alert (``<root>/commands/<line>/<m>/ack``)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    machine_id: Identifier
    by: OperatorName
    note: OperatorNote | None = None
    alert_id: IdText | None = Field(
        default=None,
        description="acknowledge only this alert: a late ack for an alert that has already "
        "cleared then cannot acknowledge a newer one",
    )


FeedbackLabel = Literal["false_alarm", "confirmed"]
FEEDBACK_LABELS: Final[tuple[str, ...]] = FeedbackLabel.__args__  # type: ignore[attr-defined]


class FeedbackCommand(_Wire):
    """An operator labels one alert (``<root>/commands/<line>/<m>/feedback``).

    ``false_alarm``: the readings of that alert were normal operation (they may be used as
    normal training data); ``confirmed``: a real fault. The latest label of an alert wins.
    """

    times: ClassVar[tuple[str, ...]] = ("at",)
    schema_version: Literal[1] = SCHEMA_VERSION
    machine_id: Identifier
    alert_id: IdText
    label: FeedbackLabel
    by: OperatorName
    at: EventTime = Field(description="when the operator gave it (Unix seconds)")
    note: OperatorNote | None = None


ThresholdAction = Literal["widen", "reset", "recalibrate"]


class ThresholdCommand(_Wire):
    """An operator changes one machine's own threshold
    (``<root>/commands/<line>/<m>/threshold``): ``widen`` raises it one step, ``reset`` puts
    back its model's (``detector/tuning.py``); ``recalibrate`` re-baselines it now: its open
    alert clears and it fits a new model on its next readings (``model/rebaseline.py``). The
    detector records who and when."""

    times: ClassVar[tuple[str, ...]] = ("at",)
    schema_version: Literal[1] = SCHEMA_VERSION
    machine_id: Identifier
    action: ThresholdAction
    by: OperatorName
    at: EventTime = Field(description="when the operator gave it (Unix seconds)")
    note: OperatorNote | None = None


# -- the one decoder every consumer uses ------------------------------------------------------
_OUT_OF_RANGE: Final = frozenset({"greater_than_equal", "less_than_equal"})
_TIME_FIELDS: Final = frozenset(
    {"ts", "at", "reading_ts", "since", "last_seen", "alert_since", "received_at"}
)


def check_bytes(payload: bytes, limit: int) -> None:
    """Refuse an empty, oversize or non-UTF-8 payload before parsing it."""
    if not payload:
        raise PayloadError("empty_payload", "zero-length payload")
    if len(payload) > limit:
        raise PayloadError("oversize", f"{len(payload)} bytes > {limit}")
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("not_utf8", str(exc)) from None


def classify(exc: ValidationError) -> DeadLetterReason:
    """The dead-letter reason of a validation failure."""
    errors = exc.errors()
    kinds = {err["type"] for err in errors}
    if kinds & {"json_invalid", "json_type"}:
        return "invalid_json"
    if "finite_number" in kinds:
        return "non_finite"
    # A time outside 2000..2100 is a clock problem (milliseconds, say), not a shape one.
    if all(
        err["type"] in _OUT_OF_RANGE and (err["loc"] or ("",))[-1] in _TIME_FIELDS for err in errors
    ):
        return "clock_skew"
    return "schema"


def summary(exc: ValidationError) -> str:
    """The first few validation errors on one line."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def check_time(
    name: str, ts: float, now: float, *, max_future_s: float, max_past_s: float | None
) -> None:
    """Refuse a time further than ``max_future_s`` ahead of ``now`` (or ``max_past_s`` behind)."""
    skew = ts - now
    if skew > max_future_s or (max_past_s is not None and -skew > max_past_s):
        behind = "" if max_past_s is None else f", {max_past_s:g} s behind"
        raise PayloadError(
            "clock_skew",
            f"{name} is {skew:+.0f} s from the receiver's clock (max {max_future_s:g} s ahead"
            f"{behind})",
        )


def check_times(
    message: _Wire, now: float, *, max_future_s: float, max_past_s: float | None
) -> None:
    """``check_time`` on every time ``message`` carries."""
    for name, value in message.event_times():
        check_time(name, value, now, max_future_s=max_future_s, max_past_s=max_past_s)


def decode(
    model: type[W],
    payload: bytes,
    *,
    now: float,
    limit: int = MAX_PAYLOAD_BYTES,
    max_future_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
    max_past_s: float | None = None,
) -> W:
    """One message as ``model``, every bound checked; ``PayloadError`` with a reason if not.

    ``now`` is the receiver's clock (the caller reads it: this function stays pure). Times
    may lie at most ``max_future_s`` ahead of it and, if given, ``max_past_s`` behind it.
    """
    check_bytes(payload, limit)
    try:
        message = model.model_validate_json(payload)
    except ValidationError as exc:
        raise PayloadError(classify(exc), summary(exc)) from None
    except RecursionError:
        raise PayloadError("invalid_json", "nesting too deep") from None
    check_times(message, now, max_future_s=max_future_s, max_past_s=max_past_s)
    return message


def decode_batch(
    payload: bytes,
    *,
    now: float,
    max_future_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
    max_past_s: float | None = DEFAULT_MAX_PAST_SKEW_S,
) -> list[Telemetry | PayloadError]:
    """A gateway's batch: each reading, or why it was refused, in order.

    A payload that is not a batch at all raises ``PayloadError``; one bad reading never
    costs the others their place.
    """
    check_bytes(payload, MAX_BATCH_BYTES)
    try:
        items: list[Telemetry | PayloadError] = list(
            TelemetryBatch.model_validate_json(payload).readings
        )
    except ValidationError as exc:
        items = _salvage(payload, exc)
    return [
        _timely(index, item, now, max_future_s, max_past_s) if isinstance(item, Telemetry) else item
        for index, item in enumerate(items)
    ]


def _timely(
    index: int, reading: Telemetry, now: float, max_future_s: float, max_past_s: float | None
) -> Telemetry | PayloadError:
    try:
        check_times(reading, now, max_future_s=max_future_s, max_past_s=max_past_s)
    except PayloadError as error:
        return PayloadError(error.reason, f"readings[{index}]: {error.detail}")
    return reading


def _salvage(payload: bytes, exc: ValidationError) -> list[Telemetry | PayloadError]:
    """A batch failed validation: keep its good readings, name each bad one's reason."""
    try:
        # Plain json (NaN allowed here): a NaN reading is rejected alone, below.
        document = json.loads(payload)
    except (ValueError, RecursionError):
        raise PayloadError(classify(exc), summary(exc)) from None
    if not isinstance(document, dict):
        raise PayloadError("schema", summary(exc))
    items = document.get("readings")
    wrapper_ok = set(document) <= {"schema_version", "readings"} and document.get(
        "schema_version", 1
    ) in (1, 2)
    if not wrapper_ok or not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH_READINGS:
        raise PayloadError("schema", summary(exc))
    out: list[Telemetry | PayloadError] = []
    for index, item in enumerate(items):
        try:
            out.append(Telemetry.model_validate_json(json.dumps(item, allow_nan=True)))
        except ValidationError as item_exc:
            out.append(PayloadError(classify(item_exc), f"readings[{index}]: " + summary(item_exc)))
        except RecursionError:
            out.append(PayloadError("invalid_json", f"readings[{index}]: nesting too deep"))
    return out
