"""Logins against the broker's own accounts: the Mosquitto password file and two roles.

The web view checks a user's password against the same ``passwd`` file the broker uses
(``$7$`` PBKDF2-SHA512 hashes, written by ``factorywatch broker init/add-user``), so there
is one set of accounts. Roles mirror the broker ACL: viewers read; operators may also
acknowledge alerts and label them (the ACL lets ``operator`` write the command topics).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

Role = Literal["viewer", "operator"]
_SCHEME: Final = "7"
_MAX_ITERATIONS: Final = 1_000_000  # a corrupt entry must not stall a login for minutes


@dataclass(frozen=True)
class Accounts:
    """Who may log in, with which role; passwords checked against a Mosquitto passwd file."""

    passwd_file: Path
    operators: frozenset[str]
    viewers: frozenset[str]

    def role_of(self, user: str) -> Role | None:
        """The role of ``user`` (operator wins), or None when it may not log in."""
        if user in self.operators:
            return "operator"
        if user in self.viewers:
            return "viewer"
        return None

    def authenticate(self, user: str, password: str) -> Role | None:
        """The user's role when the password is right and the user has a role, else None."""
        role = self.role_of(user)
        if role is None or not password:
            return None
        stored = _hashes(self.passwd_file).get(user)
        if stored is None:
            return None
        return role if verify_password(password, stored) else None


def _hashes(passwd_file: Path) -> dict[str, str]:
    """``user -> hash`` from the password file (re-read each login: rotation applies at once)."""
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
