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

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BrokerError(FactorywatchError):
    """The MQTT broker could not be reached or refused the connection."""
