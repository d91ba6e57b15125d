"""Cluster partitions: which partition a machine's messages are filed under, and their names.

A subject mapping on the NATS cluster files every message a detector needs to see for a machine
under one partition, computed from the machine id alone (``fnv1a32(machine) % partitions``,
NATS's ``partition()``). ``ClusterLayout`` names one topic root's streams, consumers and buckets
(pure: no I/O); the detector's JetStream driver, the partition leases, the cluster launcher
(:mod:`factorywatch.cluster`) and the deployment tool all read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from factorywatch.topics import DEFAULT_ROOT, check_id

PARTITION_PREFIX: Final = "fwpart"
#: The stream NATS's MQTT layer stores every QoS 1 PUBLISH in before its PUBACK (R3 here)
MQTT_STREAM: Final = "$MQTT_msgs"
MQTT_SUBJECT_PREFIX: Final = "$MQTT.msgs."
DEFAULT_PARTITIONS: Final = 6
#: default partition lease lifetime (s): a killed detector's partitions move after it
LEASE_TTL_S: Final = 15.0
_FNV_OFFSET: Final = 0x811C9DC5
_FNV_PRIME: Final = 0x01000193


def fnv1a32(data: bytes) -> int:
    """The 32-bit FNV-1a hash NATS's ``partition()`` mapping function uses."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return value


def partition_of(machine_id: str, partitions: int) -> int:
    """The partition NATS files a machine under (same hash, same modulus as the server)."""
    return fnv1a32(machine_id.encode()) % partitions


def subject_of(topic: str) -> str:
    """The NATS subject an MQTT topic becomes (ids with ``.`` are refused on the cluster)."""
    return topic.replace("/", ".")


def topic_of(subject: str) -> str:
    """The MQTT topic a NATS subject is seen as."""
    return subject.replace(".", "/")


def _name(root: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in root)


@dataclass(frozen=True, slots=True)
class ClusterLayout:
    """Names and subjects of one topic root on the cluster (pure: no I/O)."""

    topic_root: str = DEFAULT_ROOT
    partitions: int = DEFAULT_PARTITIONS
    replicas: int = 3

    def __post_init__(self) -> None:
        for level in self.topic_root.split("/"):
            check_id(level, "topic root level")
            if "." in level:
                raise ValueError(f"topic root {self.topic_root!r}: no '.' on the cluster")
        if not 1 <= self.partitions <= 1024:
            raise ValueError(f"partitions must be 1..1024, not {self.partitions}")

    @property
    def root(self) -> str:
        """The topic root as subject tokens (``factory`` or ``site.factory``)."""
        return subject_of(self.topic_root)

    @property
    def input_stream(self) -> str:
        """The stream holding every partition's input: the MQTT layer's QoS 1 message store."""
        return MQTT_STREAM

    @property
    def output_stream(self) -> str:
        """The stream keeping verdicts, events, states and dead letters (de-duplicated)."""
        return f"FW_OUT_{_name(self.topic_root)}"

    @property
    def state_bucket(self) -> str:
        """The key-value bucket holding each machine's state."""
        return f"fw_state_{_name(self.topic_root)}"

    @property
    def model_bucket(self) -> str:
        """The object store holding fitted route models (``detector/model_store.py``)."""
        return f"fw_models_{_name(self.topic_root)}"

    @property
    def lease_bucket(self) -> str:
        """The key-value bucket holding each partition's lease (``detector/lease.py``)."""
        return f"fw_lease_{_name(self.topic_root)}"

    @property
    def input_filter(self) -> str:
        """Every partition's input in the input stream."""
        return f"{MQTT_SUBJECT_PREFIX}{PARTITION_PREFIX}.*.{self.root}.>"

    @property
    def output_subjects(self) -> list[str]:
        """What the output stream captures."""
        return [f"{self.root}.alerts.>", f"{self.root}.deadletter.>"]

    def partition_filter(self, partition: int) -> str:
        """The subject filter of one partition's durable consumer."""
        return f"{MQTT_SUBJECT_PREFIX}{PARTITION_PREFIX}.{partition}.{self.root}.>"

    def consumer(self, partition: int) -> str:
        """The durable consumer name of one partition (unique per topic root)."""
        return f"fw_{_name(self.topic_root)}_part_{partition}"

    def state_key(self, partition: int, machine_id: str) -> str:
        """The key-value key of one machine's state."""
        return f"{partition}.{machine_id}"

    def mappings(self) -> dict[str, str]:
        """Subject mappings filing each machine's messages under its partition."""
        r, n, pre = self.root, self.partitions, PARTITION_PREFIX
        return {
            f"{r}.telemetry.*.*": (
                f"{pre}.{{{{partition({n},2)}}}}.{r}.telemetry.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
            ),
            f"{r}.batch.*.*": (
                f"{pre}.{{{{partition({n},2)}}}}.{r}.batch.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
            ),
            f"{r}.commands.*.*.ack": (
                f"{pre}.{{{{partition({n},2)}}}}.{r}.commands.{{{{wildcard(1)}}}}"
                ".{{wildcard(2)}}.ack"
            ),
            # feedback stays unmapped: the recorder and the web view read it where it was
            # published (a mapping would move it); a cluster's detectors do not act on it
            f"{r}.commands.*.*.threshold": (
                f"{pre}.{{{{partition({n},2)}}}}.{r}.commands.{{{{wildcard(1)}}}}"
                ".{{wildcard(2)}}.threshold"
            ),
            f"{r}.status.sensor.*": (
                f"{pre}.{{{{partition({n},1)}}}}.{r}.status.sensor.{{{{wildcard(1)}}}}"
            ),
        }

    def unpartition(self, subject: str) -> tuple[int, str]:
        """``(partition, MQTT topic)`` of a subject read from the input stream."""
        subject = subject.removeprefix(MQTT_SUBJECT_PREFIX)
        prefix, _, rest = subject.partition(".")
        number, _, original = rest.partition(".")
        if prefix != PARTITION_PREFIX or not number.isdigit() or not original:
            raise ValueError(f"not a partitioned subject: {subject!r}")
        return int(number), topic_of(original)


def assign(partitions: int, detectors: int, index: int) -> list[int]:
    """The partitions detector ``index`` of ``detectors`` owns (round robin)."""
    if not 0 <= index < detectors:
        raise ValueError(f"detector index {index} not in 0..{detectors - 1}")
    return [p for p in range(partitions) if p % detectors == index]


def partitions_arg(value: str | None, count: int) -> list[int]:
    """Parse ``--partitions`` (``0,2,4`` or ``all``); a clear error on a bad value."""
    if value is None or value == "all":
        return list(range(count))
    try:
        chosen = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--partitions {value!r}: comma-separated integers") from None
    bad = [p for p in chosen if not 0 <= p < count]
    if bad or not chosen:
        raise ValueError(f"--partitions {value!r}: each must be in 0..{count - 1}")
    return chosen
