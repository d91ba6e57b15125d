"""Run Mosquitto locally with the project's own ``broker/`` config (demo, tests, bench).

The config is used as written except for the lines marked LOCAL: listener port and bind
address, persistence location and log destination.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final

from factorywatch.accounts import DEFAULT_DETECTOR, AccountRegistry, read_registry, registry_path
from factorywatch.errors import BrokerError
from factorywatch.topics import sparkplug_line, sparkplug_machine_id

# The project's broker/ folder, installed as package data (factorywatch/broker_config).
BROKER_DIR: Final = Path(str(resources.files("factorywatch") / "broker_config"))
BASE_CONFIG: Final = BROKER_DIR / "mosquitto.conf"
BASE_ACL: Final = BROKER_DIR / "acl"
BROKER_USER: Final = "mosquitto"
# Written by `broker serve` and `demo` in their work directory: the process that reloads the
# broker on SIGHUP (a new ACL from the registry, fresh copies of the password file).
RELOAD_PID_FILE: Final = "reload.pid"


def announce_reload_pid(workdir: Path) -> Path:
    """Write this process's id to ``<workdir>/reload.pid``: SIGHUP it to reload the broker."""
    path = workdir / RELOAD_PID_FILE
    path.write_text(f"{os.getpid()}\n")
    return path


def send_reload(pid_file: Path) -> int:
    """SIGHUP the process named in ``pid_file`` (see :func:`announce_reload_pid`); its id.

    Raises ``BrokerError`` when the file is missing or unreadable or names no process.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise BrokerError(f"no broker process to reload in {pid_file} ({exc})") from None
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise BrokerError(f"cannot signal the broker process {pid} ({exc})") from None
    return pid


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def render_acl(base: str, topic_root: str) -> str:
    """The project's ACL with its topic root ``factory`` replaced by ``topic_root``."""
    return re.sub(
        r"(?m)^((?:topic|pattern)(?: read| write| readwrite)? )factory/",
        rf"\g<1>{topic_root}/",
        base,
    )


def _user_block(base: str, user: str) -> list[str]:
    """The ``topic`` lines of every ``user`` block of ``user`` in the base ACL."""
    block: list[str] = []
    current = None
    for line in base.splitlines():
        if line.startswith("user "):
            current = line.removeprefix("user ").strip()
        elif line.startswith("pattern "):
            current = None
        elif line.startswith("topic ") and current == user:
            block.append(line)
    return block


def acl_with_accounts(base: str, registry: AccountRegistry) -> str:
    """The base ACL plus one block per machine, gateway, edge node, extra detector and service
    account.

    A machine may publish its own readings and sensor status (``sensor_rights``). A gateway
    may do the same on its own id and write ``factory/batch/<line>/<its id>`` for the lines
    of its machines, and nothing else the machines may not; which readings it may carry is
    checked by the detector (the broker cannot look inside a payload). A detector shard gets
    exactly the rights of ``detector``.
    """
    out = [base.rstrip("\n"), "", "# --- Generated from registry.json by `factorywatch broker`."]
    detector = _user_block(base, DEFAULT_DETECTOR)
    for account in registry.detectors:
        if account != DEFAULT_DETECTOR:
            out += ["", f"user {account}", *detector]
    for account, role in sorted(registry.services.items()):
        out += ["", f"user {account}", *_user_block(base, role)]
    for node in sorted(registry.edge_nodes):
        entry = registry.edge_nodes[node]
        out += ["", f"user {node}", *sparkplug_edge_rights(node, entry.line, entry.devices)]
    for machine in sorted(m for m, entry in registry.machines.items() if entry.direct):
        out += ["", f"user {machine}", *sensor_rights(machine)]
    for gateway in sorted(registry.gateways):
        out += ["", f"user {gateway}", *sensor_rights(gateway)]
        out += [
            f"topic write factory/batch/{line}/{gateway}"
            for line in registry.gateway_lines(gateway)
        ]
    return "\n".join(out) + "\n"


def sensor_rights(account: str) -> list[str]:
    """The ACL lines of a machine's (or gateway's) publisher: its own telemetry and sensor
    status, its identity's lease, and the detector's answers about its own readings."""
    return [
        f"topic write factory/telemetry/+/{account}",
        f"topic write factory/status/sensor/{account}",
        f"topic readwrite factory/status/sensor/{account}/lease",
        f"topic read factory/deadletter/+/{account}",
        f"topic read factory/alerts/+/{account}/verdict",
    ]


def sparkplug_edge_rights(node: str, group: str, devices: Sequence[str] = ()) -> list[str]:
    """The ACL lines of Sparkplug edge node ``node`` in ``group``: its own births, deaths and
    data (devices: any; the detector checks them against the registry), the commands
    addressed to it, the primary host's STATE (it may wait for the host to be online), and the
    detector's answers about each registered device's readings (its verdicts and dead letters
    on the group's line: the edge node keeps a reading until it hears one). A node registered
    without devices reads no answers: no pattern could name its devices' machines only."""
    base = f"spBv1.0/{group}"
    line = sparkplug_line(group)
    machines = [sparkplug_machine_id(node, device) for device in devices]
    return [
        *(f"topic write {base}/{kind}/{node}" for kind in ("NBIRTH", "NDEATH", "NDATA")),
        *(f"topic write {base}/{kind}/{node}/+" for kind in ("DBIRTH", "DDEATH", "DDATA")),
        f"topic read {base}/NCMD/{node}",
        f"topic read {base}/DCMD/{node}/+",
        "topic read spBv1.0/STATE/+",
        *(f"topic read factory/alerts/{line}/{m}/verdict" for m in machines),
        *(f"topic read factory/deadletter/{line}/{m}" for m in machines),
    ]


def acl_for_secrets(secrets_dir: Path) -> str:
    """The full ACL (topic root ``factory``) for the accounts registered in ``secrets_dir``."""
    registry = read_registry(registry_path(secrets_dir), missing_ok=True)
    return acl_with_accounts(BASE_ACL.read_text(), registry)


def render_config(
    base: str,
    *,
    port: int,
    data_dir: Path,
    log_file: Path,
    bind: str = "127.0.0.1",
    tls_port: int | None = None,
    secrets_dir: Path | None = None,
    acl_file: Path | None = None,
) -> str:
    """Rewrite the LOCAL lines of the project's config for a local run.

    With ``secrets_dir`` the config stays secure (authentication, ACL, TLS listener on
    ``tls_port``); without it the broker is open: anonymous, no ACL, no TLS listener.
    """
    rules: list[tuple[str, str]] = [
        (r"^listener 1883$", f"listener {port} {bind}"),
        (r"^persistence_location .*$", f"persistence_location {data_dir}/"),
        (r"^log_dest .*$", f"log_dest file {log_file}"),
    ]
    if secrets_dir is not None:
        certs = secrets_dir / "certs"
        rules += [
            (r"^listener 8883$", f"listener {tls_port or free_port()} {bind}"),
            (r"^cafile .*$", f"cafile {certs / 'ca.crt'}"),
            (r"^certfile .*$", f"certfile {certs / 'server.crt'}"),
            (r"^keyfile .*$", f"keyfile {certs / 'server.key'}"),
            (r"^password_file .*$", f"password_file {secrets_dir / 'passwd'}"),
            (r"^acl_file .*$", f"acl_file {acl_file}"),
        ]
    else:
        rules += [
            (r"^listener 8883\n(?:(?!listener|\n).*\n)*", ""),
            (r"^allow_anonymous false$", "allow_anonymous true"),
            # Anonymous clients have no user name to take as their client id.
            (r"^use_username_as_clientid true$", "use_username_as_clientid false"),
            (r"^password_file .*\n", ""),
            (r"^acl_file .*\n", ""),
        ]
    replaced = base
    for pattern, line in rules:
        replaced, n = re.subn(pattern, line, replaced, count=1, flags=re.MULTILINE)
        if n != 1:
            raise BrokerError(f"broker config lacks a line matching {pattern!r}")
    return replaced


def mosquitto_binary() -> str:
    """Path of the ``mosquitto`` binary, or a clear error on how to install it."""
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise BrokerError(
            "mosquitto is not installed: `apt-get install -y mosquitto mosquitto-clients` "
            "(Debian/Ubuntu) or `brew install mosquitto`"
        )
    return found


def _give_to_broker_user(path: Path) -> None:
    """As root, Mosquitto drops to user ``mosquitto``: let it write its persistence dir."""
    if os.geteuid() != 0:
        return
    try:
        entry = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return
    for item in (path, *path.rglob("*")):
        os.chown(item, entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let the broker user reach ``path``: add only the search (x) bit on its ancestors.

    Temporary directories (pytest's among them) are often 0700; Mosquitto, having dropped
    root, could then neither write its persistence file nor read the password file.
    """
    if os.geteuid() != 0:
        return
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001:
            folder.chmod(mode | 0o001)


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until ``host:port`` accepts TCP connections."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"nothing listens on {host}:{port} after {timeout_s} s")


class LocalBroker:
    """A Mosquitto process with the project's config on a loopback port."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        config: Path = BASE_CONFIG,
        secrets_dir: Path | None = None,
        topic_root: str = "factory",
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.secrets_dir = secrets_dir
        self.topic_root = topic_root
        self.tls_port = None
        while secrets_dir is not None and self.tls_port in (None, self.port):
            self.tls_port = free_port()
        self.acl_file = workdir / "acl"
        self.host = "127.0.0.1"
        self.config_source = config
        self.data_dir = workdir / "data"
        self.log_file = workdir / "mosquitto.log"
        self.config_file = workdir / "mosquitto.conf"
        self.process: subprocess.Popen[bytes] | None = None

    def write_config(self) -> Path:
        """Render the config into the work directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        if self.secrets_dir is not None:
            acl = acl_for_secrets(self.secrets_dir)
            self.acl_file.write_text(render_acl(acl, self.topic_root))
            self._copy_secrets()
        self.config_file.write_text(
            render_config(
                self.config_source.read_text(),
                port=self.port,
                data_dir=self.data_dir,
                log_file=self.log_file,
                tls_port=self.tls_port,
                secrets_dir=None if self.secrets_dir is None else self.broker_secrets,
                acl_file=self.acl_file,
            )
        )
        _give_to_broker_user(self.workdir)
        _make_traversable(self.workdir)
        # The broker user (not the owner when we run as root) must traverse the work dir.
        self.workdir.chmod(0o755)
        return self.config_file

    @property
    def broker_secrets(self) -> Path:
        """The broker's own copy of the password file and TLS material."""
        return self.workdir / "secrets"

    def _copy_secrets(self) -> None:
        """Copy what the broker reads out of the secrets folder, which stays private (0700).

        Mosquitto started as root drops to its own user, which may not enter that folder.
        """
        assert self.secrets_dir is not None
        certs = self.broker_secrets / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        self.broker_secrets.chmod(0o700)
        shutil.copyfile(self.secrets_dir / "passwd", self.broker_secrets / "passwd")
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copyfile(self.secrets_dir / "certs" / name, certs / name)
        _give_to_broker_user(self.broker_secrets)

    def start(self) -> LocalBroker:
        """Start (or restart) the broker and wait until it listens."""
        if self.process is not None and self.process.poll() is None:
            raise BrokerError("broker already running")
        self.write_config()
        with (self.workdir / "mosquitto.stderr").open("ab") as err:
            self.process = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.config_file)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            wait_for_port(self.host, self.port)
            if self.tls_port is not None:
                wait_for_port(self.host, self.tls_port)
        except BrokerError as exc:
            self.stop()
            raise BrokerError(f"{exc}; log: {self.log_tail()}") from exc
        return self

    def stop(self, *, kill: bool = False, timeout_s: float = 10.0) -> None:
        """SIGTERM (persisting its database) or, with ``kill``, SIGKILL the broker."""
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password file and the ACL, regenerated from the
        registry (after ``broker add-user`` / ``remove-user``)."""
        if self.process is not None and self.process.poll() is None:
            if self.secrets_dir is not None:
                self.write_config()  # the ACL from the registry, and fresh copies of secrets
            self.process.send_signal(signal.SIGHUP)
            time.sleep(0.3)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the broker's log (for error messages)."""
        try:
            return "\n".join(self.log_file.read_text().splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
