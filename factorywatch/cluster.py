"""A local N-node NATS cluster with JetStream and an MQTT listener (tests, bench, demo).

The clustered deployment keeps the devices on plain MQTT (3.1.1, QoS 1): NATS's MQTT
listener turns topic ``factory/telemetry/line1/m1`` into subject
``factory.telemetry.line1.m1``. A subject mapping (``ClusterLayout.mappings``) then files every
message a detector needs to see for a machine (its telemetry, its operators' acks, its
sensor's status) under one partition, computed by the server from the machine id alone::

    factory.telemetry.<line>.<machine>  ->  fwpart.<p>.factory.telemetry.<line>.<machine>
    p = fnv1a32(machine) % partitions       (``partition_of``, NATS's ``partition()``)

The input stream is the one NATS's MQTT layer stores each QoS 1 PUBLISH in before it sends
the PUBACK (``$MQTT_msgs``, subject ``$MQTT.msgs.fwpart.<p>.<root>....``, R3, interest
retention): a PUBACK therefore means the reading is replicated, and it stays until the
partition's durable consumer acknowledges it. (A stream of our own capturing ``fwpart.>``
loses what arrives while its leader is being re-elected after a node dies: the MQTT layer
does not wait for it.) Each detector owns some partitions through one durable pull consumer
each (``detector/jetstream.py``); ``provision`` creates every partition's consumer up front,
because the interest-retention stream drops a message no consumer wants. Verdicts, events
and states go back on ``<root>.alerts.>`` where MQTT subscribers (``mosquitto_sub``) see them,
and are also kept by an output stream (R3) that de-duplicates them by reading identity. Each
machine's state is a key ``<p>.<machine>`` of a key-value bucket (R3).

``LocalNatsCluster`` is ``broker.LocalBroker``'s counterpart: config generation (JetStream,
cluster routes, MQTT listener, users with per-machine publish permissions matching the
Mosquitto ACL, TLS on the client and MQTT listeners), start, ``kill -9`` of a node, restart.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from factorywatch.broker import free_port, wait_for_port
from factorywatch.errors import BrokerError
from factorywatch.partitions import LEASE_TTL_S, PARTITION_PREFIX, ClusterLayout, partition_of
from factorywatch.topics import check_id


# -- users and permissions ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClusterUser:
    """A NATS user: password, permissions, and which connection types it may use."""

    name: str
    password: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    connection_types: tuple[str, ...] = ("STANDARD",)


def cluster_users(
    layout: ClusterLayout, passwords: dict[str, str], machines: Iterable[str]
) -> list[ClusterUser]:
    """The Mosquitto ACL's roles as NATS users; one user per machine, publishing only its own.

    ``passwords`` must name ``admin`` (provisioning), ``detector``, ``viewer``, ``operator``,
    ``monitor`` and every machine.
    """
    r = layout.root
    inbox = "_INBOX.>"
    # An MQTT QoS 1 subscription is served by a JetStream consumer delivering to $MQTT.sub.*
    mqtt_sub = "$MQTT.sub.>"
    # Permissions are checked on the subject after the partition mapping.
    parts = f"{PARTITION_PREFIX}.*.{r}"
    # An MQTT filter `a/b/#` also matches `a/b` itself: NATS asks for both subjects.
    alerts, status = (f"{r}.alerts", f"{r}.alerts.>"), (f"{r}.status", f"{r}.status.>")
    users = [
        ClusterUser("admin", passwords["admin"], (">",), (">",), ("STANDARD", "MQTT")),
        ClusterUser(
            "detector",
            passwords["detector"],
            (
                f"{r}.alerts.>",
                f"{r}.deadletter.>",
                f"{r}.status.detector.>",
                "$JS.API.>",
                "$JS.ACK.>",
                f"$KV.{layout.state_bucket}.>",
                f"$KV.{layout.lease_bucket}.>",
                f"$O.{layout.model_bucket}.>",
            ),
            (inbox,),
            # MQTT: retained state goes through the MQTT listener (detector/retained.py)
            ("STANDARD", "MQTT"),
        ),
        ClusterUser(
            "viewer",
            passwords["viewer"],
            (),
            (*alerts, *status, inbox, mqtt_sub),
            ("STANDARD", "MQTT"),
        ),
        ClusterUser(
            "operator",
            passwords["operator"],
            (f"{parts}.commands.>",),
            (*alerts, *status, inbox, mqtt_sub),
            ("STANDARD", "MQTT"),
        ),
        ClusterUser(
            "monitor",
            passwords["monitor"],
            (),
            (r, f"{r}.>", f"{parts}.>", inbox, mqtt_sub),
            ("STANDARD", "MQTT"),
        ),
    ]
    for machine in machines:
        m = check_id(machine, "machine id")
        own = f"{PARTITION_PREFIX}.{partition_of(m, layout.partitions)}.{r}"
        users.append(
            ClusterUser(
                m,
                passwords[m],
                (f"{own}.telemetry.*.{m}", f"{own}.batch.*.{m}", f"{own}.status.sensor.{m}"),
                # Only its own dead letters and verdicts (the sensor listens for the answers
                # to its readings), as in the Mosquitto ACL; nothing else of anyone's.
                (f"{r}.deadletter.*.{m}", f"{r}.alerts.*.{m}.verdict"),
                ("MQTT",),
            )
        )
    return users


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_quote(v) for v in values) + "]"


def _permission(allow: Sequence[str]) -> str:
    # NATS reads an empty allow list as "no restriction": nothing allowed is a deny of all.
    return f"{{allow: {_list(allow)}}}" if allow else '{deny: [">"]}'


def _render_users(users: Sequence[ClusterUser]) -> str:
    lines = ["authorization {", "  users = ["]
    for user in users:
        lines.append(
            f"    {{user: {_quote(user.name)}, password: {_quote(user.password)}, "
            f"allowed_connection_types: {_list(user.connection_types)}, "
            f"permissions: {{publish: {_permission(user.publish)}, "
            f"subscribe: {_permission(user.subscribe)}}}}}"
        )
    lines += ["  ]", "}"]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class NodePorts:
    """The loopback ports of one node."""

    client: int
    cluster: int
    mqtt: int
    http: int


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """CA, certificate and key for the client and MQTT listeners."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_secrets(cls, secrets_dir: Path) -> TlsFiles:
        """The files ``credentials.make_certificates`` wrote under ``secrets_dir/certs``."""
        certs = secrets_dir / "certs"
        return cls(certs / "ca.crt", certs / "server.crt", certs / "server.key")


def _tls_block(tls: TlsFiles, *, verify: bool = False) -> str:
    extra = ", verify: true" if verify else ""
    return (
        f"  tls {{ cert_file: {_quote(str(tls.cert))}, key_file: {_quote(str(tls.key))}, "
        f"ca_file: {_quote(str(tls.ca))}, timeout: 5{extra} }}"
    )


def render_node_config(
    *,
    name: str,
    cluster_name: str,
    ports: NodePorts,
    routes: Sequence[str],
    store_dir: Path,
    layouts: Sequence[ClusterLayout],
    users: Sequence[ClusterUser] | None = None,
    tls: TlsFiles | None = None,
    route_tls: TlsFiles | None = None,
    host: str = "127.0.0.1",
) -> str:
    """One node's nats-server config: JetStream, cluster routes, MQTT listener, mappings.

    ``routes``: the other nodes' route URLs (``nats-route://n2:6222``); ``host``: the address
    this node listens on (``0.0.0.0`` in a container). ``tls``: TLS on the client and MQTT
    listeners; ``route_tls``: mutual TLS on the routes between nodes (each node presents its
    certificate and verifies its peer's against the CA; the certificate must name the host in
    the route URLs; a peer speaking plain TCP is refused).
    """
    mappings = {k: v for layout in layouts for k, v in layout.mappings().items()}
    lines = [
        f"server_name: {_quote(name)}",
        f"listen: {_quote(f'{host}:{ports.client}')}",
        f"http: {_quote(f'{host}:{ports.http}')}",
        "max_payload: 1MB",
        f"jetstream {{ store_dir: {_quote(str(store_dir))} }}",
        "cluster {",
        f"  name: {_quote(cluster_name)}",
        f"  listen: {_quote(f'{host}:{ports.cluster}')}",
        f"  routes: {_list(routes)}",
    ]
    if route_tls is not None:
        lines.append(_tls_block(route_tls, verify=True))
    lines += [
        "}",
        "mqtt {",
        f"  listen: {_quote(f'{host}:{ports.mqtt}')}",
        # How long a QoS 1 delivery to an MQTT subscriber waits for its PUBACK.
        "  ack_wait: 30s",
        # The MQTT layer's own streams (sessions, QoS 1 messages, retained): R3 like ours, so
        # a node's death leaves them a quorum (2.9 otherwise sizes them from the routes it
        # happens to see when the first MQTT client connects).
        f"  stream_replicas: {min(3, len(routes) + 1)}",
    ]
    if tls is not None:
        lines.append(_tls_block(tls))
    lines.append("}")
    if tls is not None:
        lines.append(_tls_block(tls).strip())
    lines.append("mappings = {")
    lines += [f"  {_quote(src)}: {_quote(dst)}" for src, dst in mappings.items()]
    lines.append("}")
    if users is not None:
        lines.append(_render_users(users))
    return "\n".join(lines) + "\n"


def nats_server_binary() -> str:
    """Path of ``nats-server`` or a clear error on how to install it."""
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if found is None:
        raise BrokerError(
            "nats-server is not installed: `apt-get install -y nats-server` (Debian/Ubuntu)"
        )
    return found


@dataclass
class LocalNode:
    """One nats-server process of a local cluster."""

    name: str
    ports: NodePorts
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        """Its rendered config."""
        return self.workdir / "nats.conf"

    @property
    def log_file(self) -> Path:
        """Its log (stderr)."""
        return self.workdir / "nats.log"

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None


def _unused_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class LocalNatsCluster:
    """N nats-server processes on loopback forming one JetStream cluster with MQTT."""

    workdir: Path
    nodes_count: int = 3
    layouts: Sequence[ClusterLayout] = (ClusterLayout(),)
    passwords: dict[str, str] | None = None
    machines: tuple[str, ...] = ()
    tls: TlsFiles | None = None
    #: mutual TLS on the routes between the nodes (None: plain TCP on loopback)
    route_tls: TlsFiles | None = None
    cluster_name: str = "factorywatch"
    nodes: list[LocalNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = _unused_ports(4 * self.nodes_count)
        for i in range(self.nodes_count):
            client, cluster, mqtt, http = ports[4 * i : 4 * i + 4]
            name = f"n{i + 1}"
            self.nodes.append(
                LocalNode(name, NodePorts(client, cluster, mqtt, http), self.workdir / name)
            )

    @property
    def layout(self) -> ClusterLayout:
        """The first (usually the only) topic root's layout."""
        return self.layouts[0]

    @property
    def servers(self) -> list[str]:
        """Client URLs of every node (``tls://`` when TLS is on)."""
        scheme = "tls" if self.tls is not None else "nats"
        return [f"{scheme}://127.0.0.1:{n.ports.client}" for n in self.nodes]

    def users(self) -> list[ClusterUser] | None:
        """The users the config declares (None: an open cluster)."""
        if self.passwords is None:
            return None
        users: list[ClusterUser] = []
        seen: set[str] = set()
        for layout in self.layouts:
            for user in cluster_users(layout, self.passwords, self.machines):
                if user.name not in seen:
                    seen.add(user.name)
                    users.append(user)
        return users

    def write_config(self, node: LocalNode) -> Path:
        """Render one node's config into its work directory."""
        node.workdir.mkdir(parents=True, exist_ok=True)
        node.config_file.write_text(
            render_node_config(
                name=node.name,
                cluster_name=self.cluster_name,
                ports=node.ports,
                routes=[
                    f"nats-route://127.0.0.1:{n.ports.cluster}" for n in self.nodes if n is not node
                ],
                store_dir=node.workdir / "js",
                layouts=self.layouts,
                users=self.users(),
                tls=self.tls,
                route_tls=self.route_tls,
            )
        )
        node.config_file.chmod(0o600)  # it holds the users' passwords
        return node.config_file

    def start_node(self, node: LocalNode) -> None:
        """Start (or restart, keeping its JetStream store) one node."""
        if node.running():
            raise BrokerError(f"node {node.name} already running")
        self.write_config(node)
        with node.log_file.open("ab") as err:
            node.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(node.config_file)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def start(self, timeout_s: float = 30.0) -> LocalNatsCluster:
        """Start every node and wait until JetStream has a meta leader and all listen."""
        for node in self.nodes:
            self.start_node(node)
        try:
            for node in self.nodes:
                self.wait_ready(node, timeout_s)
            self.create_mqtt_streams()
        except BrokerError:
            self.stop()
            raise
        return self

    def create_mqtt_streams(self) -> None:
        """Connect one MQTT client: the MQTT layer creates its streams on the first CONNECT."""
        user = "monitor" if self.passwords is not None else None
        password = self.passwords[user] if self.passwords is not None and user else None
        with MqttDevice(
            "fw-provision",
            self.nodes[0].ports.mqtt,
            user=user,
            password=password,
            tls_ca=self.tls.ca if self.tls is not None else None,
            clean_session=True,
        ) as device:
            device.wait_connected(30.0)

    def wait_ready(self, node: LocalNode, timeout_s: float = 30.0) -> None:
        """Wait until ``node`` listens (client, MQTT) and reports healthy JetStream."""
        wait_for_port("127.0.0.1", node.ports.client, timeout_s)
        wait_for_port("127.0.0.1", node.ports.mqtt, timeout_s)
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{node.ports.http}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if not node.running():
                raise BrokerError(f"node {node.name} exited: {self.log_tail(node)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200 and self._meta_leader(node):
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BrokerError(f"node {node.name} not ready after {timeout_s} s: {self.log_tail(node)}")

    def _meta_leader(self, node: LocalNode) -> str | None:
        import json  # noqa: PLC0415

        url = f"http://127.0.0.1:{node.ports.http}/jsz"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                data = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        leader = (data.get("meta_cluster") or {}).get("leader")
        return str(leader) if leader else None

    def kill(self, node: LocalNode) -> None:
        """``kill -9`` one node (its JetStream store stays for a restart)."""
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait(10)

    def stop_node(self, node: LocalNode, timeout_s: float = 10.0) -> None:
        """SIGTERM one node (SIGKILL if it does not stop in time)."""
        if node.process is None or node.process.poll() is not None:
            return
        node.process.terminate()
        try:
            node.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout_s)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            self.stop_node(node)

    def log_tail(self, node: LocalNode, lines: int = 15) -> str:
        """The end of a node's log (for error messages)."""
        try:
            return "\n".join(node.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def __enter__(self) -> LocalNatsCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def generate_passwords(machines: Iterable[str]) -> dict[str, str]:
    """Random passwords for the service users and each machine."""
    import secrets  # noqa: PLC0415

    names = ["admin", "detector", "viewer", "operator", "monitor", *machines]
    return {name: secrets.token_urlsafe(18) for name in names}


# -- CLI options (no nats-py needed to build the parser) -----------------------------------------
def add_detect_options(parser: argparse.ArgumentParser) -> None:
    """``factorywatch detect --engine jetstream`` options."""
    group = parser.add_argument_group("jetstream engine (--engine jetstream)")
    group.add_argument(
        "--nats-servers",
        help="comma-separated NATS URLs of the cluster (default $FACTORYWATCH_NATS_SERVERS)",
    )
    group.add_argument(
        "--partitions", help="comma-separated partitions this detector owns (default: all)"
    )
    group.add_argument(
        "--partition-count", type=int, default=None, help="partitions of the cluster (6)"
    )
    group.add_argument("--nats-user", help="NATS user (default: none)")
    group.add_argument("--nats-password-file", type=Path, help="file holding the password")
    group.add_argument("--nats-ca", type=Path, help="CA file: connect with TLS")
    group.add_argument("--ack-wait", type=float, default=10.0, help="redelivery after (s)")
    group.add_argument(
        "--nats-mqtt",
        help="comma-separated host:port of the cluster's MQTT listeners: each machine's state "
        "is published there retained, for MQTT subscribers that connect later",
    )
    group.add_argument(
        "--lease-ttl",
        type=float,
        default=LEASE_TTL_S,
        help="partition lease lifetime (s): a killed detector's partitions move after it "
        f"({LEASE_TTL_S:g}; the lease bucket keeps the TTL it was created with)",
    )


# -- an MQTT 3.1.1 device (NATS's MQTT listener speaks 3.1.1 only) ---------------------------------
class MqttDevice:
    """A QoS 1 MQTT 3.1.1 publisher that records which messages the server acknowledged.

    The project's own sensors speak MQTT 5 to Mosquitto; NATS 2.9 refuses MQTT 5 at CONNECT,
    so tests, the bench and a plant's 3.1.1 devices publish to the cluster like this.
    """

    def __init__(
        self,
        client_id: str,
        port: int,
        *,
        host: str = "127.0.0.1",
        user: str | None = None,
        password: str | None = None,
        tls_ca: Path | None = None,
        max_inflight: int = 100,
        clean_session: bool = False,
    ) -> None:
        import threading  # noqa: PLC0415

        import paho.mqtt.client as mqtt  # noqa: PLC0415
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

        self._lock = threading.Condition()
        self._mids: dict[int, str] = {}
        self._early: dict[int, bool] = {}
        self.acked: list[str] = []
        #: monotonic time of each acknowledgement, in order (stall and recovery figures)
        self.acked_at: list[float] = []
        self.refused: list[str] = []
        self.connects = 0
        self.refusals = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=clean_session,
        )
        if user is not None:
            self.client.username_pw_set(user, password)
        if tls_ca is not None:
            import ssl  # noqa: PLC0415

            self.client.tls_set(ca_certs=str(tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        with self._lock:
            if getattr(reason, "is_failure", False):
                self.refusals += 1
            else:
                self.connects += 1
            self._lock.notify_all()

    def _on_publish(self, _c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        failed = bool(getattr(reason, "is_failure", False))
        with self._lock:
            key = self._mids.pop(mid, None)
            if key is None:  # the PUBACK beat ``publish`` to recording the mid
                self._early[mid] = failed
            else:
                (self.refused if failed else self.acked).append(key)
            self.acked_at.append(time.monotonic())
            self._lock.notify_all()

    def wait_connected(self, timeout_s: float = 10.0) -> None:
        """Wait for the first CONNACK (raise ``BrokerError`` otherwise). A refusal is final,
        as in ``factorywatch.mqtt.connect``: the device stops (paho would retry it forever)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.connects or self.refusals, timeout_s):
                raise BrokerError("MQTT device not connected")
            refused = not self.connects
        if refused:
            self.close()
            raise BrokerError("MQTT device refused by the server (CONNACK)")

    def publish(self, topic: str, payload: bytes, key: str) -> None:
        """Queue one QoS 1 message; ``key`` is what ``acked`` will hold once PUBACKed."""
        info = self.client.publish(topic, payload, qos=1)  # not under our lock: paho calls back
        with self._lock:
            failed = self._early.pop(info.mid, None)
            if failed is None:
                self._mids[info.mid] = key
            else:
                (self.refused if failed else self.acked).append(key)  # time already noted
                self._lock.notify_all()

    def wait_acked(self, count: int, timeout_s: float = 30.0) -> bool:
        """Wait until ``count`` messages were acknowledged (or refused)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: len(self.acked) + len(self.refused) >= count, timeout_s
            )

    def close(self) -> None:
        """Disconnect and stop the network thread (a device left open keeps reconnecting)."""
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> MqttDevice:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
