"""The account registry: which machines exist, on which line, and who may speak for them.

Written by ``factorywatch broker init`` / ``add-user`` / ``remove-user`` as
``<secrets dir>/registry.json`` beside the password file; read by the detector
(``factorywatch.detector.registry``) and by the broker set-up, which turns it into the ACL's
per-account blocks (gateways, detector shards). Roles:

- a **machine** with its own account (``direct``) publishes only its own telemetry;
- a **gateway** publishes batches for the machines registered to it, and nothing else;
  machines reached only through gateways have no account of their own;
- a **detector** account (``detector``, or one per shard such as ``detector-line2``) holds
  the detector's rights; its login is also its MQTT client id (``use_username_as_clientid``);
- an **edge node** (``edge-node``) is a Sparkplug B edge node (its account is its edge node
  id): it publishes births, deaths and data in its one Sparkplug group (= its line), for its
  registered devices (none registered: any device; each device is machine
  ``<edge node>.<device>``), and reads the commands addressed to it;
- a **service** account has the rights of ``viewer``, ``operator`` or ``monitor``. The broker
  makes every login its client id, so two processes can never share one account: each
  component that stays connected gets its own (``history``, ``web``, ``web-commands``,
  ``notify`` by default), and each person their own (``add-user alice --role viewer``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from factorywatch.errors import FactorywatchError
from factorywatch.topics import ID_PATTERN

REGISTRY_FILE: Final = "registry.json"
DEFAULT_LINE: Final = "line1"
DEFAULT_DETECTOR: Final = "detector"
# Accounts whose rights are fixed in broker/acl (no registry entry needed).
STATIC_ROLES: Final = ("detector", "viewer", "operator", "monitor", "healthcheck")
ServiceRole = Literal["viewer", "operator", "monitor"]
Role = Literal["machine", "gateway", "edge-node", "detector", "viewer", "operator", "monitor"]
# Accounts `broker init` creates for the components that connect at the same time as people
# do (a login is a client id: one connection per account), with the role each one has.
COMPONENT_ACCOUNTS: Final[dict[str, ServiceRole]] = {
    "history": "monitor",
    "web": "monitor",
    "web-commands": "operator",
    "notify": "viewer",
}

AccountId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class RegistryError(FactorywatchError):
    """The registry file is missing, unreadable or an account change is not allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MachineEntry(_Strict):
    """A registered machine."""

    line: AccountId
    direct: bool = Field(
        default=True, description="has an account of its own (False: only via a gateway)"
    )


class GatewayEntry(_Strict):
    """A gateway and the machines it may publish readings for."""

    machines: list[AccountId]


class EdgeNodeEntry(_Strict):
    """A Sparkplug B edge node: its group (a line) and the devices it may speak for."""

    line: AccountId
    devices: list[AccountId] = Field(
        default=[], description="device ids it may publish (empty: any device of its own)"
    )


class AccountRegistry(_Strict):
    """The whole registry file."""

    schema_version: Literal[1] = 1
    machines: dict[AccountId, MachineEntry] = {}
    gateways: dict[AccountId, GatewayEntry] = {}
    edge_nodes: dict[AccountId, EdgeNodeEntry] = {}
    detectors: list[AccountId] = [DEFAULT_DETECTOR]
    services: dict[AccountId, ServiceRole] = {}

    def role_of(self, account: str) -> Role | None:
        """The registered role of ``account`` (None when it has none here)."""
        if account in self.detectors:
            return "detector"
        if account in self.services:
            return self.services[account]
        if account in self.gateways:
            return "gateway"
        if account in self.edge_nodes:
            return "edge-node"
        entry = self.machines.get(account)
        return "machine" if entry is not None and entry.direct else None

    def gateway_lines(self, gateway: str) -> list[str]:
        """The lines a gateway's machines are on (the batch topics it may write)."""
        machines = self.gateways[gateway].machines
        return sorted({self.machines[m].line for m in machines if m in self.machines})

    # -- changes (pure: each returns a new registry) -----------------------------------------
    def with_machine(self, machine: str, line: str) -> AccountRegistry:
        """Register (or move) a machine with an account of its own."""
        self._free_for(machine, "machine")
        machines = {**self.machines, machine: MachineEntry(line=line, direct=True)}
        return self.model_copy(update={"machines": machines})

    def with_gateway(self, gateway: str, machines: list[str], line: str) -> AccountRegistry:
        """Register a gateway for ``machines``; unknown machines join ``line`` without accounts."""
        if not machines:
            raise RegistryError(f"gateway {gateway!r} needs --machines (who it speaks for)")
        self._free_for(gateway, "gateway")
        clash = [m for m in machines if m in self.gateways or m in self.detectors]
        if clash or gateway in machines:
            raise RegistryError(f"{clash or [gateway]} cannot be machines: they are accounts")
        known = dict(self.machines)
        for m in machines:
            known.setdefault(m, MachineEntry(line=line, direct=False))
        gateways = {**self.gateways, gateway: GatewayEntry(machines=sorted(set(machines)))}
        return self.model_copy(update={"machines": known, "gateways": gateways})

    def with_edge_node(self, node: str, line: str, devices: list[str]) -> AccountRegistry:
        """Register a Sparkplug edge node in group ``line`` for ``devices`` (empty: any)."""
        self._free_for(node, "edge-node")
        entry = EdgeNodeEntry(line=line, devices=sorted(set(devices)))
        return self.model_copy(update={"edge_nodes": {**self.edge_nodes, node: entry}})

    def with_detector(self, detector: str) -> AccountRegistry:
        """Register a detector account (one per shard)."""
        self._free_for(detector, "detector")
        if detector in self.detectors:
            return self
        return self.model_copy(update={"detectors": [*self.detectors, detector]})

    def with_service(self, account: str, role: ServiceRole) -> AccountRegistry:
        """Register an extra account with the rights of ``viewer``/``operator``/``monitor``."""
        self._free_for(account, role)
        return self.model_copy(update={"services": {**self.services, account: role}})

    def without(self, account: str) -> AccountRegistry:
        """Forget ``account``; a machine still reached through a gateway keeps its entry."""
        machines = dict(self.machines)
        gateways = dict(self.gateways)
        detectors = [d for d in self.detectors if d != account]
        if account in gateways:
            del gateways[account]
            still = {m for g in gateways.values() for m in g.machines}
            machines = {m: e for m, e in machines.items() if e.direct or m in still}
        if account in machines:
            if any(account in g.machines for g in gateways.values()):
                machines[account] = MachineEntry(line=machines[account].line, direct=False)
            else:
                del machines[account]
        services = {a: r for a, r in self.services.items() if a != account}
        edge_nodes = {a: e for a, e in self.edge_nodes.items() if a != account}
        return self.model_copy(
            update={
                "machines": machines,
                "gateways": gateways,
                "edge_nodes": edge_nodes,
                "detectors": detectors,
                "services": services,
            }
        )

    def _free_for(self, account: str, role: Role) -> None:
        current = self.role_of(account)
        if current is not None and current != role:
            raise RegistryError(f"{account!r} is already a {current}, not a {role}")
        if account in STATIC_ROLES and account != role:
            raise RegistryError(f"{account!r} is reserved for a service account")


def registry_path(secrets_dir: Path) -> Path:
    """Where the registry of ``secrets_dir`` lives."""
    return secrets_dir / REGISTRY_FILE


def parse_registry(text: str, source: str = REGISTRY_FILE) -> AccountRegistry:
    """Validate a registry document (pure)."""
    try:
        return AccountRegistry.model_validate_json(text)
    except ValidationError as exc:
        raise RegistryError(f"{source} is not a valid account registry: {exc}") from exc


def read_registry(path: Path, *, missing_ok: bool = False) -> AccountRegistry:
    """Read ``path``; a missing file is an empty registry only with ``missing_ok``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return AccountRegistry()
        raise RegistryError(
            f"no account registry at {path}: run `factorywatch broker init` first"
        ) from None
    return parse_registry(text, str(path))


def write_registry(path: Path, registry: AccountRegistry) -> None:
    """Write ``path``; an existing file is rewritten in place, keeping its inode.

    Docker Compose mounts the registry into the detector and the web view as a single file
    (a file secret is a bind mount of the file): a file replaced by a rename would stay
    invisible there until the container restarts, so a machine added with ``broker
    add-user`` would be dead-lettered meanwhile. In place, a reader may for an instant meet
    a half-written file (it then fails to parse, and the detector and the web view keep the
    registry they had). The modification time is set last, to strictly after every time the
    file had while it was written: a reader that stamped a half-written file
    (``RegistryFile``: time, size, inode) always sees it change and reads it again.
    """
    text = json.dumps(registry.model_dump(mode="json"), indent=2) + "\n"
    if not path.is_file():  # a new registry: created whole, readers never see half of it
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(path)
        return
    with path.open("r+") as fh:
        fh.write(text)
        fh.truncate()
    written = path.stat()
    os.utime(path, ns=(written.st_atime_ns, max(time.time_ns(), written.st_mtime_ns + 1)))
    path.chmod(0o644)
