"""Exception tree of factorywatch.

FactorywatchError
├── DatasetError            dataset missing, unreadable or with an unknown layout
│   └── DatasetChecksumError  a file whose sha256 matches no known release
├── ModelError              model artifact problems
│   ├── ModelNotFoundError  no artifact where one was expected
│   └── ModelMismatchError  artifact metadata does not fit this code or these features
├── PayloadError            a wire message that cannot be accepted (carries a reason code)
└── BrokerError             broker unreachable after bounded retries, or refused us
"""

from __future__ import annotations

from typing import Final, Literal

# Why a payload was rejected: the machine-readable ``reason`` of every dead letter.
DeadLetterReason = Literal[
    "bad_topic",  # not a telemetry/batch topic of this root, or invalid ids in it
    "empty_payload",
    "oversize",  # over MAX_PAYLOAD_BYTES (MAX_BATCH_BYTES for batches)
    "not_utf8",
    "invalid_json",  # includes nesting too deep to parse
    "non_finite",  # NaN, Infinity, 1e400
    "schema",  # wrong shape, types, missing or unknown keys
    "topic_mismatch",  # payload machine/line differs from the (trusted) topic
    "unknown_machine",  # not in the detector's registry, when one is configured
    "unauthorized_machine",  # registered, but the sender (topic) may not speak for it
    "clock_skew",  # event time too far from the detector's clock
    "missing_channel",  # lacks a channel the model needs
    "duplicate_id",  # a reading id already seen with different content (e.g. a reused seq)
    "invalid_protobuf",  # not a Sparkplug B protobuf payload
    "no_birth",  # Sparkplug data before its birth certificate (a rebirth was requested)
    "processing_failed",  # accepted, then failed in scoring/settling/encoding (poison message)
    "type_mismatch",  # a Sparkplug metric's value is not of the data type its birth declared
    "unknown_alert",  # feedback names an alert the detector does not know for that machine
    "cannot_recalibrate",  # an operator's recalibrate for a machine that cannot re-baseline
]
DEAD_LETTER_REASONS: Final[tuple[str, ...]] = DeadLetterReason.__args__  # type: ignore[attr-defined]


class FactorywatchError(Exception):
    """Root of every error factorywatch raises on purpose."""


class DatasetError(FactorywatchError):
    """The training dataset is missing, unreadable or has an unknown layout."""


class DatasetChecksumError(DatasetError):
    """A dataset file's sha256 matches no known release of the AI4I data."""


class ModelError(FactorywatchError):
    """A model artifact cannot be used."""


class ModelNotFoundError(ModelError):
    """No model artifact exists where one was expected."""


class ModelMismatchError(ModelError):
    """The artifact's metadata does not match this code (features, versions, format)."""


class PayloadError(FactorywatchError):
    """A wire message was rejected; ``reason`` is a stable machine-readable code."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BrokerError(FactorywatchError):
    """The MQTT broker could not be reached or refused the connection."""
