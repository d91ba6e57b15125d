"""Logins against the broker's own accounts: the Mosquitto password file and two roles.

The web view checks a user's password against the same ``passwd`` file the broker uses
(``$7$`` PBKDF2-SHA512 hashes, written by ``factorywatch broker init/add-user``), so there
is one set of accounts. Roles mirror the broker ACL: viewers read; operators may also
acknowledge alerts and label them (the ACL lets ``operator`` write the command topics);
admins are operators named in ``FACTORYWATCH_WEB_ADMINS`` who may also add and remove the
broker's accounts from the view.

A user's role is the registry's (``broker add-user alice --role operator``, written to
``registry.json`` beside the password file) or, for accounts without a registry entry, the
configured lists. Both files are re-read when they change, so every request sees the
accounts as they are now: :meth:`Accounts.current` is what a session is checked against.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from factorywatch.accounts import COMPONENT_ACCOUNTS, REGISTRY_FILE, RegistryError, read_registry
from factorywatch.credentials import hash_password

Role = Literal["viewer", "operator", "admin"]
_SCHEME: Final = "7"
_MAX_ITERATIONS: Final = 1_000_000  # a corrupt entry must not stall a login for minutes


@dataclass(frozen=True)
class Identity:
    """Who a user is right now: the role and a fingerprint of the password entry (a session
    opened before the password changed, or before the user was removed and added again, no
    longer matches)."""

    user: str
    role: Role
    fingerprint: str


@dataclass
class _Cached:
    stamp: tuple[int, int, int] | None = None
    value: dict[str, str] = field(default_factory=dict)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class Accounts:
    """Who may log in, with which role; passwords checked against a Mosquitto passwd file."""

    passwd_file: Path
    operators: frozenset[str]
    viewers: frozenset[str]
    admins: frozenset[str] = frozenset()  # operators who may also manage accounts
    _hashes: _Cached = field(default_factory=_Cached, repr=False)
    _roles: _Cached = field(default_factory=_Cached, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Verified when the user is unknown or has no web role, so a refusal costs the same
    # PBKDF2 work whether or not the account exists (no timing oracle for account names).
    _dummy: str = field(
        default_factory=lambda: hash_password(secrets.token_urlsafe(16)), repr=False
    )

    def role_of(self, user: str) -> Role | None:
        """The web role of ``user``: the registry's when it has an entry, else the configured
        lists (operator wins); an operator in ``admins`` is an admin; None when it may not
        log in."""
        role = self._base_role(user)
        return "admin" if role == "operator" and user in self.admins else role

    def _base_role(self, user: str) -> Role | None:
        if user in COMPONENT_ACCOUNTS:  # components' accounts, never people's
            return None
        registered = self._registry_roles().get(user)
        if registered is not None:
            return registered if registered in ("viewer", "operator") else None  # type: ignore[return-value]
        if user in self.operators:
            return "operator"
        if user in self.viewers:
            return "viewer"
        return None

    def current(self, user: str) -> Identity | None:
        """The user's identity now (None: removed, or no web role any more)."""
        stored = self._passwd().get(user)
        role = self.role_of(user)
        if stored is None or role is None:
            return None
        return Identity(user, role, _fingerprint(stored))

    def authenticate(self, user: str, password: str) -> Identity | None:
        """The user's identity when the password is right and the user has a role, else None.

        Always runs one PBKDF2 verification (against a dummy hash when the user is unknown
        or has no role), so the time taken does not tell which accounts exist.
        """
        stored = self._passwd().get(user)
        role = self.role_of(user)
        ok = verify_password(password, stored if stored is not None else self._dummy)
        if not ok or stored is None or role is None or not password:
            return None
        return Identity(user, role, _fingerprint(stored))

    def _passwd(self) -> dict[str, str]:
        with self._lock:
            stamp = _stamp(self.passwd_file)
            if stamp != self._hashes.stamp:
                self._hashes = _Cached(stamp, _hashes(self.passwd_file) if stamp else {})
            return self._hashes.value

    def _registry_roles(self) -> dict[str, str]:
        path = self.passwd_file.parent / REGISTRY_FILE
        with self._lock:
            stamp = _stamp(path)
            if stamp != self._roles.stamp:
                try:
                    registry = read_registry(path, missing_ok=True)
                except (RegistryError, OSError):
                    # a half-edited registry must not open the door: keep what was known
                    return self._roles.value
                roles = {name: str(role) for name, role in registry.services.items()}
                for name in [*registry.machines, *registry.gateways, *registry.detectors]:
                    roles.setdefault(name, "none")
                self._roles = _Cached(stamp, roles)
            return self._roles.value


def _fingerprint(stored: str) -> str:
    return hashlib.sha256(stored.encode()).hexdigest()[:32]


def _hashes(passwd_file: Path) -> dict[str, str]:
    """``user -> hash`` from the password file."""
    entries = {}
    for line in passwd_file.read_text().splitlines():
        name, sep, hashed = line.partition(":")
        if sep and name:
            entries[name] = hashed
    return entries


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches a Mosquitto ``$7$iterations$salt$hash`` entry."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != _SCHEME or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if not digest or not 0 < int(parts[2]) <= _MAX_ITERATIONS:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(digest))
    return hmac.compare_digest(candidate, digest)
