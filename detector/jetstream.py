"""The detector on NATS JetStream: the pure engine driven by durable consumers per partition.

Each detector owns some partitions of the input stream (``factorywatch/cluster.py`` says how
machines are filed under partitions). Per partition it binds one durable pull consumer and
loops: fetch a batch -> ``runner.handle`` (``detector/runner.py``, the same policy as on
Mosquitto) -> publish every verdict, event and state through the ``JetStreamDriver`` (a
``PubAck`` from the output stream; verdicts carry ``Nats-Msg-Id: <reading identity>``, so a
redelivered reading's second verdict is dropped by the stream) -> write the state of every
machine the settled messages touched to the key-value bucket (``KvStore``, key
``<partition>.<machine>``, ``MachineRecord.snapshot()``) -> acknowledge them. A message with
a refused publish is given back (``nak``) and only its reading ids are forgotten, so its
redelivery is scored again; a crash anywhere before the acks makes JetStream redeliver after
``ack_wait``; the machine records' ``recent`` identities keep a redelivered reading from
counting twice in the alert window. Housekeeping (offline, drift, reload of models and of the
account registry, the heartbeat every ``heartbeat_s``) is due when the runner says, with the
Mosquitto detector's periods.

A detector serves a partition only while it holds the partition's lease
(``detector/lease.py``); for the partitions of its ``--partitions`` that another detector
holds it stands by and takes over when that lease is released or expires. A fenced owner (its
lease taken while it was paused or cut off) forgets that partition's machines
(``engine.forget``: their records here are stale) and stands by for it again; its other
partitions go on being served. On start (or when a
partition moves here) the partition's machine records are read back from the bucket before its
consumer is bound, so alert state, windows (calibration windows too) and unconfirmed events
resume where the previous owner left them. Each machine's retained state goes through the
cluster's MQTT listener (``detector/retained.py``): NATS clients cannot publish MQTT-retained
messages.

With ``--asset-config`` the engine routes machines to their own or their group's model and
calibrates new machines live, exactly as on Mosquitto (``detector/route_models.py``,
polled between batches under the engine's lock; fits run on a worker thread, never on the
event loop). A fitted model is saved and promoted in the model directory and uploaded to the
cluster's object store (``detector/model_store.py``), from which every detector downloads the
promoted route models its own model directory lacks before each route reload: the machine's
next owner serves the model on any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from factorywatch.detector.dedup import SeenCache
from factorywatch.detector.engine import Engine, EngineSettings, Inbound, Publish
from factorywatch.detector.lease import LEASE_TTL_S, PartitionLeases, lease_bucket
from factorywatch.detector.metrics import Metrics
from factorywatch.detector.model_store import STORE_ERRORS, ModelStore, open_store
from factorywatch.detector.registry import RegistryFile
from factorywatch.detector.retained import RetainedPublisher, parse_endpoints
from factorywatch.detector.route_models import CalibrationWorker, make_router
from factorywatch.detector.runner import Runner, RunnerSettings, Send
from factorywatch.detector.shell_common import (
    Counters,
    reload_model,
    serve_metrics,
    sync_drift_metrics,
)
from factorywatch.detector.store import KvStore
from factorywatch.detector.transport import acommit, asend
from factorywatch.errors import BrokerError
from factorywatch.model.artifact import LoadedModel, ScorerKind
from factorywatch.partitions import DEFAULT_PARTITIONS, ClusterLayout, partition_of, partitions_arg
from factorywatch.settings import DetectorSettings, env_servers
from factorywatch.topics import Topics

log = structlog.get_logger("detector.jetstream")

#: how long the output stream remembers a verdict's id (redeliveries inside it are dropped)
DUPLICATE_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class JetStreamOptions:
    """Where the cluster is, which partitions this detector owns, and its knobs."""

    servers: Sequence[str]
    layout: ClusterLayout
    partitions: Sequence[int]
    client_id: str = "factorywatch-detector"
    user: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    batch_max: int = 256
    ack_wait_s: float = 10.0
    publish_timeout_s: float = 5.0
    fetch_timeout_s: float = 0.5
    #: where promoted models are (a newly promoted one is swapped in); None: never reload
    model_dir: Path | None = None
    scorer: ScorerKind = "fast"
    reload_interval_s: float = 5.0
    #: how often the retained status says "online" (the Mosquitto detector's ``heartbeat_s``)
    heartbeat_s: float = 15.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no /metrics, /healthz
    provision: bool = True
    #: lifetime of a partition lease (the bucket keeps the TTL it was created with)
    lease_ttl_s: float = LEASE_TTL_S
    #: the cluster's MQTT listeners: retained state goes through them (empty: not retained)
    mqtt_endpoints: Sequence[tuple[str, int]] = ()
    #: machine groups and live calibration (``detector/route_models.py``); None: one model
    asset_config: Path | None = None


def tls_context(ca: Path | None) -> ssl.SSLContext | None:
    """A client TLS context trusting ``ca`` (None: plain TCP)."""
    if ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def connect(
    servers: Sequence[str],
    *,
    name: str,
    user: str | None = None,
    password: str | None = None,
    tls_ca: Path | None = None,
) -> NatsClient:
    """A NATS connection that reconnects to any node for ever (it logs its state changes)."""

    async def disconnected() -> None:
        log.warning("nats_disconnected", client=name)

    async def reconnected() -> None:
        log.info("nats_reconnected", client=name)

    async def error(exc: Exception) -> None:
        log.warning("nats_error_reported", client=name, error=str(exc))

    return await nats.connect(
        servers=list(servers),
        name=name,
        user=user,
        password=password,
        tls=tls_context(tls_ca),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=5,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
    )


def consumer_config(layout: ClusterLayout, partition: int, ack_wait_s: float) -> ConsumerConfig:
    """The durable pull consumer of one partition."""
    return ConsumerConfig(
        durable_name=layout.consumer(partition),
        filter_subject=layout.partition_filter(partition),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_ack_pending=20_000,
        max_deliver=-1,
        num_replicas=layout.replicas,
    )


async def provision(
    js: JetStreamContext,
    layout: ClusterLayout,
    *,
    ack_wait_s: float = 10.0,
    wait_s: float = 300.0,
) -> KeyValue:
    """Every partition's durable consumer, the output stream and the state bucket; the bucket.

    Idempotent. The input stream is the MQTT layer's: it exists once an MQTT client has
    connected to the cluster, so this waits for it (up to ``wait_s``).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await js.stream_info(layout.input_stream)
            break
        except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            log.info("waiting_for_mqtt_streams", stream=layout.input_stream)
            await asyncio.sleep(1.0)  # backoff until the first MQTT client connects
    for partition in range(layout.partitions):
        try:
            await js.consumer_info(layout.input_stream, layout.consumer(partition))
        except nats.js.errors.NotFoundError:
            await js.add_consumer(
                layout.input_stream, consumer_config(layout, partition, ack_wait_s)
            )
            log.info("consumer_created", partition=partition, replicas=layout.replicas)
    output = StreamConfig(
        name=layout.output_stream,
        subjects=layout.output_subjects,
        num_replicas=layout.replicas,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=7 * 24 * 3600.0,
    )
    try:
        await js.stream_info(layout.output_stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(output)
        log.info("stream_created", stream=output.name, replicas=output.num_replicas)
    try:
        return await js.key_value(layout.state_bucket)
    except nats.js.errors.BucketNotFoundError:
        kv = await js.create_key_value(
            KeyValueConfig(bucket=layout.state_bucket, history=1, replicas=layout.replicas)
        )
        log.info("bucket_created", bucket=layout.state_bucket, replicas=layout.replicas)
        return kv


class JetStreamDriver:
    """Publishes and acknowledges for the JetStream detector (the ``AsyncDriver`` protocol).

    A publish is confirmed by the output stream's PubAck (verdicts carry ``Nats-Msg-Id``, so
    a redelivered reading's second verdict is dropped by the stream); a retained one goes
    through the cluster's MQTT listener (``detector/retained.py``) when there is one.
    """

    def __init__(
        self,
        js: JetStreamContext,
        nc: NatsClient,
        timeout_s: float,
        retained: RetainedPublisher | None,
    ) -> None:
        self.js = js
        self.nc = nc
        self.timeout_s = timeout_s
        self.retained = retained

    async def publish(self, publish: Publish, msg_id: str | None) -> bool:
        """True once the output stream (or the MQTT listener, for retained) confirmed it."""
        if publish.retain and self.retained is not None:
            future = self.retained.publish(publish.topic, publish.payload)
            try:
                ok = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                ok = False
            if not ok:
                log.warning("retained_publish_failed", topic=publish.topic)
            return ok
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        subject = publish.topic.replace("/", ".")
        try:
            await self.js.publish(subject, publish.payload, timeout=self.timeout_s, headers=headers)
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("publish_failed", subject=subject, error=repr(exc))
            return False
        return True

    async def ack(self, token: Any) -> None:
        """Acknowledge the JetStream message (``token``)."""
        with contextlib.suppress(Exception):
            await token.ack()

    async def give_back(self, token: Any) -> None:
        """Ask for the message's redelivery soon (rather than after ``ack_wait``)."""
        with contextlib.suppress(Exception):
            await token.nak(delay=0.5)

    def is_connected(self) -> bool:
        """The NATS connection's state."""
        return bool(self.nc.is_connected)


class JetStreamDetector:
    """Drives an ``Engine`` from the partitions' durable consumers (asyncio, one process)."""

    def __init__(
        self,
        options: JetStreamOptions,
        model: LoadedModel,
        settings: EngineSettings | None = None,
        *,
        registry_file: RegistryFile | None = None,
    ) -> None:
        self.options = options
        self.layout = options.layout
        self.topics = Topics(options.layout.topic_root)
        knobs = settings if settings is not None else EngineSettings()
        if options.model_dir is None:  # nowhere to save a re-baselined machine's model
            knobs = replace(knobs, rebaseline=False)
        self.engine = Engine(
            model,
            self.topics,
            knobs,
            router=make_router(options.asset_config, model),
            seen=SeenCache(knobs.dedup_size),
            perf_clock=time.perf_counter,
        )
        self.counters = Counters()
        self.metrics = Metrics()
        self.runner = Runner(
            self.engine,
            RunnerSettings(
                client_id=options.client_id,
                heartbeat_s=options.heartbeat_s,
                reload_interval_s=options.reload_interval_s,
            ),
            counters=self.counters,
            metrics=self.metrics,
            registry_file=registry_file,
        )
        self.calibration = CalibrationWorker(
            options.model_dir, options.scorer, self.counters, self.metrics
        )
        self.metrics.set_model(model.version)
        sync_drift_metrics(self.engine, self.metrics)
        self.runner.turned(time.monotonic())
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._driver: JetStreamDriver | None = None
        self._store: KvStore | None = None
        self._leases: PartitionLeases | None = None
        self.retained: RetainedPublisher | None = None
        #: fitted route models shared with detectors on other hosts (None: not reachable)
        self.model_store: ModelStore | None = None
        self._uploads: list[tuple[str, str]] = []
        self._sync_lock = asyncio.Lock()
        self._lock = asyncio.Lock()
        #: True once connected, provisioned and restored (a stop then drains in-flight work)
        self.started = False

    # -- I/O helpers ----------------------------------------------------------------------------
    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (after ``start``)."""
        if self._js is None:
            raise RuntimeError("detector not started")
        return self._js

    @property
    def driver(self) -> JetStreamDriver:
        """Publishes and acks (after ``start``)."""
        if self._driver is None:
            raise RuntimeError("detector not started")
        return self._driver

    @property
    def store(self) -> KvStore:
        """The state bucket (after ``start``)."""
        if self._store is None:
            raise RuntimeError("detector not started")
        return self._store

    @property
    def leases(self) -> PartitionLeases:
        """The partition leases (after ``start``)."""
        if self._leases is None:
            raise RuntimeError("detector not started")
        return self._leases

    @property
    def owned(self) -> list[int]:
        """The partitions this detector serves now (it stands by for the others)."""
        if self._leases is None:
            return []
        return sorted(p for p in self.options.partitions if p in self._leases.held)

    # -- start ----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while connected and the loop turned within the last 10 s."""
        owned = self.owned
        return self.runner.health(
            connected=self._nc is not None and self._nc.is_connected,
            now=time.monotonic(),
            fitting=self.calibration.fitting,
            partitions=owned,
            standby=[p for p in self.options.partitions if p not in owned],
            retained_connected=None if self.retained is None else self.retained.is_connected(),
        )

    async def start(self) -> None:
        """Connect, provision, take the free partitions' leases, restore them, republish."""
        opts = self.options
        serve_metrics(self.metrics, self.health, opts.metrics_host, opts.metrics_port)
        self._nc = await connect(
            opts.servers,
            name=opts.client_id,
            user=opts.user,
            password=opts.password,
            tls_ca=opts.tls_ca,
        )
        self._js = self._nc.jetstream(timeout=opts.publish_timeout_s)
        if opts.provision:
            kv = await provision(self._js, self.layout, ack_wait_s=opts.ack_wait_s)
        else:
            kv = await self._js.key_value(self.layout.state_bucket)
        count = self.layout.partitions
        self._store = KvStore(
            kv, lambda machine: self.layout.state_key(partition_of(machine, count), machine)
        )
        lease_kv, ttl_s = await lease_bucket(
            self._js, self.layout.lease_bucket, opts.lease_ttl_s, self.layout.replicas
        )
        self._leases = PartitionLeases(lease_kv, ttl_s, opts.client_id)
        if opts.mqtt_endpoints:
            offline = self._status_payload("offline")
            self.retained = RetainedPublisher(
                opts.mqtt_endpoints,
                # unique per process: two processes sharing a client id by mistake must not
                # take this MQTT connection from each other for ever
                f"{opts.client_id}-retained-{self.leases.token[:8]}",
                user=opts.user,
                password=opts.password,
                tls_ca=opts.tls_ca,
                will=(self.topics.status("detector", opts.client_id), offline),
            )
            await self.retained.start()
        self._driver = JetStreamDriver(self._js, self._nc, opts.publish_timeout_s, self.retained)
        if opts.model_dir is not None:
            await self._open_model_store(opts.model_dir)
        # before the restore: a window already fitted (by any detector) is not refitted
        await self._sync_models()
        self.calibration.reload_routes(self.engine)
        for partition in opts.partitions:
            if await self.leases.acquire(partition):
                await self.restore_partition(partition)
        self.engine.take_dirty()
        await asend(self.runner, self.driver, self.runner.recover())
        self.counters.restored_machines = self.engine.machine_count()
        self.started = True

    async def _open_model_store(self, model_dir: Path) -> None:
        try:
            store = await open_store(self.js, self.layout.model_bucket, self.layout.replicas)
        except STORE_ERRORS as exc:  # detection goes on; models stay on this host only
            log.error("model_store_unavailable", bucket=self.layout.model_bucket, error=repr(exc))
            return
        self.model_store = ModelStore(store, model_dir, self.options.scorer)

    async def _sync_models(self) -> None:
        """Upload the models fitted here (until it worked), fetch those fitted elsewhere."""
        store = self.model_store
        self._uploads += self.calibration.take_fitted()
        if store is None:
            self._uploads.clear()
            return
        async with self._sync_lock:
            try:
                while self._uploads:
                    machine, version = self._uploads[0]
                    await store.upload("machine", machine, version)
                    self._uploads.pop(0)
                await store.download()
            except STORE_ERRORS as exc:  # tried again at the next reload
                log.warning("model_store_sync_failed", error=repr(exc), pending=len(self._uploads))

    async def restore_partition(self, partition: int) -> set[str]:
        """Load every machine record of ``partition`` from the bucket; their machine ids."""
        loaded = await self.store.load(str(partition))
        # a full calibration window (its fit cut short by a crash or a move) is asked for again
        self.runner.restore(loaded)
        restored = {record["machine_id"] for record in loaded.records}
        log.info("partition_restored", partition=partition, machines=len(restored))
        return restored

    # -- the loop -------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serve the owned partitions until ``stop`` is set; then finish batches and close."""
        await self.start()
        opts = self.options
        tasks = [
            asyncio.create_task(self._partition(partition, stop), name=f"partition-{partition}")
            for partition in opts.partitions
        ]
        tasks.append(asyncio.create_task(self._housekeeping(stop), name="housekeeping"))
        tasks.append(asyncio.create_task(self._renew(stop), name="leases"))
        await self._status("online")
        owned = self.owned
        log.info(
            "jetstream_detector_started",
            partitions=owned,
            standby=[p for p in opts.partitions if p not in owned],
            lease_ttl_s=self.leases.ttl_s,
            retained_state=self.retained is not None,
            restored_machines=self.counters.restored_machines,
            model_version=self.engine.model.version,
        )
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self.calibration.close()  # a fit cut short is asked for again by the next owner
            with contextlib.suppress(Exception):
                await self._sync_models()  # models fitted since the last reload: upload them
            if self._leases is not None:
                for partition in self.owned:  # after the last batch: a standby may go on
                    with contextlib.suppress(Exception):
                        await self._leases.release(partition)
            with contextlib.suppress(Exception):
                await self._status("offline")
            if self.retained is not None:
                self.retained.close()
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.flush(timeout=2)  # the last acks leave before we close
                with contextlib.suppress(Exception):
                    await self._nc.close()
            log.info("jetstream_detector_stopped", **self._figures())

    def _figures(self) -> dict[str, Any]:
        c = self.counters
        return {
            "received": c.received,
            "verdicts": c.verdicts,
            "duplicates": c.duplicates,
            "reanswered": c.reanswered,
            "failed_batches": c.failed_batches,
        }

    def _status_payload(self, state: str) -> bytes:
        return self.runner.status(state, time.time()).payload

    async def _status(self, state: str) -> None:
        status = self.runner.status(state, time.time())
        if self.retained is not None:  # retained, as on Mosquitto
            await asend(self.runner, self.driver, [Send(status)])
            return
        if self._nc is None or self._nc.is_closed:
            return
        await self._nc.publish(status.topic.replace("/", "."), status.payload)

    async def _drop(self, partition: int) -> None:
        """Another detector owns the partition now (this one was fenced): forget its machines,
        whose records here are stale from now on, and stand by for it again. The other
        partitions go on being served."""
        self.leases.held.pop(partition, None)
        count = self.layout.partitions
        async with self._lock:
            machines = {m for m in self.engine.machines() if partition_of(m, count) == partition}
            self.engine.forget(machines)  # and every reading id: they are not kept per machine
            self.calibration.forget(machines)
        log.error(
            "partition_lease_lost",
            partition=partition,
            machines_dropped=len(machines),
            action="another detector owns this partition now: its machines are dropped "
            "here and this detector stands by for it",
        )

    async def _renew(self, stop: asyncio.Event) -> None:
        """Renew every held lease each ``ttl / 3``."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.leases.renew_every_s)
            if stop.is_set():
                return
            for partition in self.owned:
                if not await self.leases.renew(partition):
                    # no longer held: its task stops serving it and drops it (_serve)
                    log.warning("partition_lease_taken", partition=partition)

    async def _take_over(self, partition: int, stop: asyncio.Event) -> bool:
        """Stand by until the partition's lease is free, take it, restore its machines."""
        log.info(
            "partition_standby",
            partition=partition,
            holder=await self.leases.holder(partition),
        )
        while not stop.is_set():
            if await self.leases.acquire(partition):
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.leases.poll_every_s)
        else:
            return False
        await self._sync_models()
        async with self._lock:
            self.calibration.reload_routes(self.engine)  # a model fitted by the previous owner
            machines = await self.restore_partition(partition)
            recovered = [
                s for s in self.runner.recover() if s.publish.topic.rsplit("/", 2)[-2] in machines
            ]
            await asend(self.runner, self.driver, recovered)
        log.info("partition_lease_acquired", partition=partition, machines=len(machines))
        return True

    async def _hold(self, partition: int, stop: asyncio.Event) -> bool:
        """The lease is no longer trusted (renewals failed, e.g. while the cluster re-elects):
        serve nothing until a renewal succeeds. A compare-and-set renewal on our own revision
        proves nobody took the partition meanwhile (True); finding another owner or an
        expired key means someone may have (False: fenced)."""
        log.warning("partition_lease_unconfirmed", partition=partition)
        while not stop.is_set():
            if not await self.leases.renew(partition):
                return False
            if self.leases.valid(partition):
                log.info("partition_lease_confirmed", partition=partition)
                return True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.leases.poll_every_s)
        return False

    async def _subscribe(self, partition: int) -> JetStreamContext.PullSubscription:
        while True:
            try:
                return await self.js.pull_subscribe_bind(
                    durable=self.layout.consumer(partition), stream=self.layout.input_stream
                )
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("consumer_bind_failed", partition=partition, error=repr(exc))
                await asyncio.sleep(0.5)  # backoff while the cluster elects a leader

    async def _partition(self, partition: int, stop: asyncio.Event) -> None:
        """Serve the partition while its lease is ours; stand by for it otherwise."""
        while not stop.is_set():
            if partition not in self.leases.held and not await self._take_over(partition, stop):
                return
            await self._serve(partition, stop)

    async def _serve(self, partition: int, stop: asyncio.Event) -> None:
        sub = await self._subscribe(partition)
        try:
            await self._fetch_loop(partition, sub, stop)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _fetch_loop(
        self, partition: int, sub: JetStreamContext.PullSubscription, stop: asyncio.Event
    ) -> None:
        opts = self.options
        while not stop.is_set():
            self.runner.turned(time.monotonic())
            if not self.leases.valid(partition) and not await self._hold(partition, stop):
                if not stop.is_set():
                    await self._drop(partition)
                return
            try:
                msgs = await sub.fetch(opts.batch_max, timeout=opts.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("fetch_failed", partition=partition, error=repr(exc))
                await asyncio.sleep(0.2)  # backoff: the cluster is electing or reconnecting
                continue
            if msgs:
                await self._process(partition, msgs)

    async def _process(self, partition: int, msgs: list[Msg]) -> None:
        now = time.time()
        perf = time.perf_counter()
        inbound = []
        for msg in msgs:
            try:
                _, topic = self.layout.unpartition(msg.subject)
            except ValueError:
                topic = msg.subject.replace(".", "/")
            inbound.append(Inbound(topic, msg.data, now, perf, token=msg))
        async with self._lock:  # the engine's state and seen cache change only here
            if not self.leases.valid(partition):
                return  # not acknowledged: redelivered to whoever holds the lease (_hold)
            handled = self.runner.handle(inbound, now)
            by_partition = self.counters.by_partition
            by_partition[partition] = by_partition.get(partition, 0) + handled.readings
            refused = await asend(self.runner, self.driver, handled.sends)
            changed = self._owned_machines(self.calibration.poll(self.engine))
            # acked only while the lease is ours: otherwise redelivered to its holder (_hold)
            stored = await acommit(
                self.runner,
                self.driver,
                self.store,
                machines=changed,
                may_ack=lambda: self.leases.valid(partition),
            )
        if refused or not stored:
            self.counters.failed_batches += 1
        else:
            self.counters.batches += 1

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Offline detection every second; the drift check, model reload and heartbeat when
        the runner says they are due (as on Mosquitto, with the same periods)."""
        while not stop.is_set():
            self.metrics.connected.set(1 if self._nc is not None and self._nc.is_connected else 0)
            due = self.runner.due(time.monotonic())
            changed: set[str] = set()
            if due.reload:
                await self._sync_models()
                async with self._lock:
                    self.runner.reload_registry()
                    changed |= self.calibration.reload_routes(self.engine)
                    self.maybe_reload()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            async with self._lock:
                # a fit that finished while no batch came: bind it now
                changed |= self.calibration.poll(self.engine)
                sends, events = self.runner.tick(time.time())
                if due.drift:
                    self.runner.check_drift()
                await asend(self.runner, self.driver, sends)
                touched = self._owned_machines(changed | {e.machine_id for e in events})
                await acommit(self.runner, self.driver, self.store, machines=touched)
            if due.heartbeat:
                with contextlib.suppress(Exception):
                    await self._status("online")

    def _owned_machines(self, machines: set[str]) -> set[str]:
        """Those of ``machines`` in a partition this detector serves (only those are written)."""
        owned = set(self.owned)
        return {m for m in machines if partition_of(m, self.layout.partitions) in owned}

    def maybe_reload(self) -> bool:
        """Swap in a newly promoted default model between batches (never mid-batch)."""
        model_dir = self.options.model_dir
        if model_dir is None:
            return False
        return reload_model(
            self.engine, model_dir, self.options.scorer, self.counters, self.metrics
        )


# -- CLI ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClusterOptions:
    """What ``detect --engine jetstream`` was told about the cluster (the CLI builds it)."""

    nats_servers: str | None = None
    partitions: str | None = None
    partition_count: int | None = None
    nats_user: str | None = None
    nats_password_file: Path | None = None
    nats_ca: Path | None = None
    ack_wait_s: float = 10.0
    nats_mqtt: str | None = None
    lease_ttl_s: float = LEASE_TTL_S


def run_cli(
    cluster: ClusterOptions,
    model: LoadedModel,
    detector: DetectorSettings,
    *,
    topic_root: str,
    model_dir: Path,
) -> int:
    """Serve until SIGTERM/SIGINT (the CLI's ``detect --engine jetstream``)."""
    from factorywatch.detector.mosquitto_shell import engine_settings, registry_file  # noqa: PLC0415

    count = cluster.partition_count or DEFAULT_PARTITIONS
    servers = (
        [s.strip() for s in cluster.nats_servers.split(",") if s.strip()]
        if cluster.nats_servers
        else env_servers()
    )
    password = (
        cluster.nats_password_file.read_text().strip() if cluster.nats_password_file else None
    )
    try:
        layout = ClusterLayout(topic_root=topic_root, partitions=count)
        partitions = partitions_arg(cluster.partitions, count)
        mqtt_endpoints = parse_endpoints(cluster.nats_mqtt) if cluster.nats_mqtt else []
        if cluster.lease_ttl_s <= 0:
            raise ValueError(f"--lease-ttl {cluster.lease_ttl_s}: must be > 0 seconds")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    options = JetStreamOptions(
        servers=servers,
        layout=layout,
        partitions=partitions,
        client_id=detector.client_id,
        user=cluster.nats_user,
        password=password,
        tls_ca=cluster.nats_ca,
        batch_max=detector.batch_max,
        ack_wait_s=cluster.ack_wait_s,
        model_dir=model_dir,
        scorer=detector.scorer,
        reload_interval_s=detector.reload_interval_s,
        heartbeat_s=detector.heartbeat_s,
        metrics_host=detector.metrics_host,
        metrics_port=detector.metrics_port,
        lease_ttl_s=cluster.lease_ttl_s,
        mqtt_endpoints=mqtt_endpoints,
        asset_config=detector.asset_config,
    )
    registry = registry_file(detector)
    settings = engine_settings(detector, registry=registry)
    if not mqtt_endpoints:
        log.warning(
            "retained_state_off",
            reason="no --nats-mqtt: MQTT subscribers connecting later get no machine state",
        )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        detector = JetStreamDetector(options, model, settings, registry_file=registry)
        running = asyncio.create_task(detector.run(stop))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not detector.started:
            running.cancel()  # still waiting for the cluster: nothing in flight to finish
            log.info("jetstream_detector_stopped_before_start")
        with contextlib.suppress(asyncio.CancelledError):
            await running
        stopping.cancel()

    try:
        asyncio.run(main())
    except (nats.errors.NoServersError, OSError) as exc:
        raise SystemExit(
            f"error: cannot reach the NATS cluster at {', '.join(servers)}: {exc}"
        ) from None
    except BrokerError as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0
