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

A running detector follows the file (``RegistryFile``, the one part here that reads): the
runner (``detector/runner.py``) reads it again on its reload cadence when its modification
time, size or inode changed, and at once when a batch holds a reading from a sender the
registry in use does not know, so a machine added with ``broker add-user`` or the web view is
scored from its first reading and a removed one is dead-lettered within one reload interval
(``unknown_machine``, its detail saying it was removed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    #: machines an earlier registry of this detector had and this one has not (removed
    #: while it ran): their readings' dead letters say so
    removed: frozenset[str] = frozenset()
    #: who may publish on the telemetry and batch topics (their last level): a machine with
    #: its own account, a gateway
    senders: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "senders", self.direct | frozenset(self.gateways))

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

    def succeeding(self, previous: Registry | None) -> Registry:
        """This registry read after ``previous``: it remembers the machines removed since."""
        if previous is None:
            return self
        gone = (previous.removed | (previous.lines.keys() - self.lines.keys())) - self.lines.keys()
        return Registry(self.lines, self.direct, self.gateways, self.edge_nodes, frozenset(gone))

    def changes(self, previous: Registry | None) -> dict[str, Any]:
        """What changed since ``previous`` (for the log): machines added, removed, moved to
        another line or whose own login changed; gateways and edge nodes added, removed or
        given other rights."""
        before = previous if previous is not None else Registry({}, frozenset(), {})
        old, new = before.lines, self.lines
        return {
            "machines": len(new),
            "machines_added": sorted(new.keys() - old.keys()),
            "machines_removed": sorted(old.keys() - new.keys()),
            "machines_changed": sorted(
                m
                for m in new.keys() & old.keys()
                if new[m] != old[m] or (m in self.direct) != (m in before.direct)
            ),
            "gateways_changed": _changed_keys(before.gateways, self.gateways),
            "edge_nodes_changed": _changed_keys(before.edge_nodes, self.edge_nodes),
        }

    def refusal(self, sender: str, machine_id: str, line: str, reason: RegistryReason) -> str:
        """The dead letter's detail for a refused reading."""
        if reason == "unknown_machine" and machine_id in self.removed:
            return (
                f"machine {machine_id!r} was removed from the registry while this detector "
                "ran: its readings are no longer scored"
            )
        if reason == "unknown_machine":
            return f"machine {machine_id!r} is not in the registry"
        return f"{sender!r} may not send for {line}/{machine_id} (registry)"

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


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys added, removed or with another value."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


#: what identifies one version of the file: its modification time (which every rewrite moves
#: forward, ``accounts.write_registry``), size and inode
Stamp = tuple[int, int, int]


class RegistryFile:
    """The registry file a running detector follows (``broker add-user`` / ``remove-user``
    and the web view rewrite it in place, so a single-file bind mount in Docker Compose sees
    each change): ``read`` it, ask whether it ``changed`` since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: Stamp | None = None

    @classmethod
    def locate(cls, registry_file: Path | None, secrets_dir: Path | None) -> RegistryFile | None:
        """The file ``Registry.locate`` would read (None: an open broker, no registry)."""
        if registry_file is not None:
            return cls(registry_file)
        if secrets_dir is not None and (secrets_dir / REGISTRY_FILE).is_file():
            return cls(secrets_dir / REGISTRY_FILE)
        return None

    def _stat(self) -> Stamp | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> bool:
        """Whether the file is another one than was last read (one ``stat``)."""
        return self._stat() != self._stamp

    def read(self) -> Registry:
        """Read the file (raises ``RegistryError`` when missing or invalid); either way it
        counts as read, so a broken file is reported once, not at every reload."""
        self._stamp = self._stat()
        return Registry.load(self.path)
