"""Who may speak for which machine: the detector's view of the account registry (pure).

The broker's ACL ties a topic's last level to the login (a machine writes only
``<root>/telemetry/<line>/<its id>``, a gateway only ``<root>/batch/<line>/<its id>``), so
the topic names the *sender*. The broker cannot look inside a payload: which readings a
sender may carry is decided here, from the registry ``factorywatch broker`` writes.

``Registry.check(sender, machine_id)`` returns ``None`` when the reading is acceptable, else
the dead-letter reason: ``unknown_machine`` (not registered: never creates state) or
``unauthorized_machine`` (registered, but this sender may not speak for it, or it claims
another line than its registered one).

Sparkplug B topics name the edge node (the login the ACL ties them to), the group and the
device: ``Registry.check_sparkplug`` lets a registered edge node speak only in its own
group, only for its registered devices (none registered: any), and never for a machine
registered otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from factorywatch.accounts import REGISTRY_FILE, AccountRegistry, parse_registry, read_registry

RegistryReason = Literal["unknown_machine", "unauthorized_machine"]


@dataclass(frozen=True, slots=True)
class Registry:
    """Machines with their lines, machines with their own account, gateways' machines."""

    lines: dict[str, str]
    direct: frozenset[str]
    gateways: dict[str, frozenset[str]]
    #: Sparkplug edge node -> (its group, its devices; empty: any)
    edge_nodes: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def from_accounts(cls, accounts: AccountRegistry) -> Registry:
        """Build from a parsed registry document."""
        return cls(
            lines={m: e.line for m, e in accounts.machines.items()},
            direct=frozenset(m for m, e in accounts.machines.items() if e.direct),
            gateways={g: frozenset(e.machines) for g, e in accounts.gateways.items()},
            edge_nodes={n: (e.line, frozenset(e.devices)) for n, e in accounts.edge_nodes.items()},
        )

    @classmethod
    def parse(cls, text: str) -> Registry:
        """Build from the registry file's text (raises ``RegistryError`` when invalid)."""
        return cls.from_accounts(parse_registry(text))

    @classmethod
    def load(cls, path: Path) -> Registry:
        """Read ``<secrets dir>/registry.json`` (raises ``RegistryError`` when missing)."""
        return cls.from_accounts(read_registry(path))

    @classmethod
    def locate(cls, registry_file: Path | None, secrets_dir: Path | None) -> Registry | None:
        """The registry a detector should use: ``registry_file`` if given (it must exist),
        else ``<secrets_dir>/registry.json`` when logging in with a secrets directory that
        has one; ``None`` (no registry check) for an open broker."""
        if registry_file is not None:
            return cls.load(registry_file)
        if secrets_dir is not None and (secrets_dir / REGISTRY_FILE).is_file():
            return cls.load(secrets_dir / REGISTRY_FILE)
        return None

    def check(self, sender: str, machine_id: str, line: str | None = None) -> RegistryReason | None:
        """May ``sender`` (the topic's last level) publish ``machine_id``'s reading on ``line``?

        A machine speaks only for itself, a gateway only for its registered machines.
        """
        registered_line = self.lines.get(machine_id)
        if registered_line is None:
            return "unknown_machine"
        if line is not None and line != registered_line:
            return "unauthorized_machine"
        if sender == machine_id:
            return None if machine_id in self.direct else "unauthorized_machine"
        if machine_id in self.gateways.get(sender, frozenset()):
            return None
        return "unauthorized_machine"

    def check_sparkplug(
        self, group: str, node: str, device: str | None, machine_id: str
    ) -> RegistryReason | None:
        """May edge node ``node`` publish in ``group`` for ``device`` (machine ``machine_id``)?

        Only a registered edge node, in its own group, for its registered devices (or any
        when it registered none), and never as a machine registered as a JSON sender.
        """
        entry = self.edge_nodes.get(node)
        if entry is None:
            return "unauthorized_machine"
        line, devices = entry
        if group != line or machine_id in self.lines:
            return "unauthorized_machine"
        if device is not None and devices and device not in devices:
            return "unauthorized_machine"
        return None

    def machine_line(self, machine_id: str) -> str | None:
        """The registered line of ``machine_id`` (None when unknown)."""
        return self.lines.get(machine_id)
