"""Partition leases: at most one detector serves a partition, the others stand by.

A lease is a key ``<partition>`` in the key-value bucket ``fw_lease_<root>`` (R3), whose
``ttl`` (the stream's ``max_age``) is the lease's lifetime. The owner took it with
``kv.create`` (refused while the key holds a live value) and renews it every ``ttl / 3``
with ``kv.update(last=revision)``, a compare-and-set on the key's revision: a renewal that
finds another revision means someone else owns the partition now. When the owner dies its
last value expires after ``ttl`` and a standby's next ``create`` succeeds: that is how a
partition moves when its owner is ``kill -9``ed. A stopping owner deletes its keys (with
``last=revision``) so a standby takes over at its next poll.

The owner counts its lease as valid until ``sent + ttl - margin``, where ``sent`` is when it
*sent* its last successful renewal: the server stores that renewal after ``sent``, so the
value cannot expire (and no standby can take it) before the owner stops trusting it. The
owner checks ``valid`` before it publishes, writes state and acknowledges. An untrusted lease
is renewed again before serving: success on our own revision proves nobody took it meanwhile;
another owner or an expired key means fenced (``detector/jetstream.py`` then forgets the
partition's machines and stands by for it; its other partitions go on). What a
lease cannot stop: a process paused (SIGSTOP, a VM freeze) between that check and the write
that follows; verdicts are still de-duplicated by reading id in the output stream, a state
write could be stale (see README, Scale-out).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from factorywatch.partitions import LEASE_TTL_S

__all__ = ["LEASE_TTL_S", "Held", "PartitionLeases", "lease_bucket"]

log = structlog.get_logger("detector.lease")
_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error)


@dataclass(slots=True)
class Held:
    """A lease this process holds: the key's revision and until when it is trusted."""

    revision: int
    valid_until: float  # monotonic


async def lease_bucket(
    js: JetStreamContext, bucket: str, ttl_s: float, replicas: int
) -> tuple[KeyValue, float]:
    """The lease bucket (created with ``ttl_s`` when missing) and its actual TTL."""
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            kv = await js.create_key_value(
                KeyValueConfig(bucket=bucket, history=1, ttl=ttl_s, replicas=replicas)
            )
            log.info("bucket_created", bucket=bucket, ttl_s=ttl_s, replicas=replicas)
        except nats.js.errors.BadRequestError:  # another detector created it meanwhile
            kv = await js.key_value(bucket)
    status = await kv.status()
    actual = float(status.ttl or 0.0)
    if actual <= 0:
        raise ValueError(f"lease bucket {bucket} has no TTL: delete it, a detector recreates it")
    if abs(actual - ttl_s) > 1e-3:
        log.warning("lease_ttl_from_bucket", bucket=bucket, requested_s=ttl_s, ttl_s=actual)
    return kv, actual


class PartitionLeases:
    """This process's leases in one bucket (asyncio; see the module docstring)."""

    def __init__(self, kv: KeyValue, ttl_s: float, client_id: str) -> None:
        self.kv = kv
        self.ttl_s = ttl_s
        #: trust a lease this much less than the server keeps it (clock granularity, RTT)
        self.margin_s = min(1.0, ttl_s / 10)
        self.token = uuid.uuid4().hex
        self.value = json.dumps(
            {
                "token": self.token,
                "client_id": client_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        ).encode()
        self.held: dict[int, Held] = {}

    @property
    def renew_every_s(self) -> float:
        """How often the owner renews (three chances before the value expires)."""
        return self.ttl_s / 3

    @property
    def poll_every_s(self) -> float:
        """How often a standby tries to take a partition."""
        return max(0.2, min(2.0, self.ttl_s / 5))

    def valid(self, partition: int, now: float | None = None) -> bool:
        """Whether this process may still act as the partition's owner."""
        held = self.held.get(partition)
        now = time.monotonic() if now is None else now
        return held is not None and now < held.valid_until

    def _trust(self, sent: float, revision: int) -> Held:
        return Held(revision, sent + self.ttl_s - self.margin_s)

    async def holder(self, partition: int) -> str | None:
        """Who holds the partition now (its client id), None when nobody does."""
        try:
            entry = await self.kv.get(str(partition))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except _ERRORS:
            return "unknown"
        if not entry.value:
            return None
        return str(json.loads(entry.value).get("client_id", "unknown"))

    async def acquire(self, partition: int) -> bool:
        """Take the partition if nobody holds it; True when it is ours now."""
        sent = time.monotonic()
        try:
            revision = await self.kv.create(str(partition), self.value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # held by someone (maybe a previous life of ours: it will expire)
        except _ERRORS as exc:
            log.warning("lease_acquire_failed", partition=partition, error=repr(exc))
            return False
        self.held[partition] = self._trust(sent, revision)
        return True

    async def renew(self, partition: int) -> bool:
        """Renew one held lease; False only when another process owns the partition now.

        A renewal that timed out leaves the lease trusted until its deadline (the caller
        checks ``valid``); one the server applied but whose answer was lost is recognised by
        our token at the next attempt.
        """
        held = self.held.get(partition)
        if held is None:
            return False
        sent = time.monotonic()
        try:
            revision = await self.kv.update(str(partition), self.value, last=held.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self._adopt(partition, sent)
        except _ERRORS as exc:
            log.warning("lease_renew_failed", partition=partition, error=repr(exc))
            return True
        self.held[partition] = self._trust(sent, revision)
        return True

    async def _adopt(self, partition: int, sent: float) -> bool:
        """The revision moved: ours (a renewal whose answer was lost) or someone else's."""
        try:
            entry = await self.kv.get(str(partition))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            entry = None  # expired: someone may take it any moment, it is not ours any more
        except _ERRORS as exc:
            log.warning("lease_renew_failed", partition=partition, error=repr(exc))
            return True
        if entry is not None and entry.value == self.value and entry.revision is not None:
            self.held[partition] = self._trust(sent, entry.revision)
            return True
        self.held.pop(partition, None)
        return False

    async def release(self, partition: int) -> None:
        """Give the partition up (a standby takes it at its next poll)."""
        held = self.held.pop(partition, None)
        if held is None:
            return
        try:
            await self.kv.delete(str(partition), last=held.revision)
        except _ERRORS as exc:  # it expires after the TTL anyway
            log.warning("lease_release_failed", partition=partition, error=repr(exc))
