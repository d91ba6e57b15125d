"""Broker credentials and certificates: users, hashed password file, TLS material.

Layout of a secrets directory (never committed; ``secrets/`` is git-ignored)::

    secrets/                     mode 0700: only its owner may enter it
    secrets/passwd               Mosquitto password file (PBKDF2-SHA512 hashes, ``$7$``)
    secrets/<user>.password      one client's plaintext password (mode 0644, see below)
    secrets/registry.json        machines, their lines, gateways, detector and service
                                 accounts (factorywatch.accounts; the detector reads it)
    secrets/acl                  broker/acl plus the registry's per-account blocks
    secrets/certs/ca.crt         CA that signed the broker certificate (give it to clients)
    secrets/certs/server.{crt,key}  the broker's certificate and key (TLS listener 8883)

The hashes are the ones ``mosquitto_passwd`` writes (``$7$101$salt$hash``), computed here so
users can create credentials on a host without Mosquitto installed.

Why the files are 0644 in a 0700 folder, not 0600: Docker Compose mounts a file secret as
it is (it ignores a file secret's ``uid``/``gid``/``mode``), and the containers run as uid
10001, not as the host user who ran ``broker init``; a 0600 file is unreadable there (the
detector died with ``PermissionError``). On the host the folder keeps other users out.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import secrets as _random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from factorywatch.accounts import (
    COMPONENT_ACCOUNTS,
    DEFAULT_LINE,
    STATIC_ROLES,
    AccountRegistry,
    RegistryError,
    Role,
    read_registry,
    registry_path,
    write_registry,
)
from factorywatch.broker import acl_for_secrets
from factorywatch.topics import check_id

SERVICE_USERS: Final = ("detector", "viewer", "operator", "monitor", "healthcheck")
PASSWD_FILE: Final = "passwd"  # noqa: S105 - a file name, not a password
ACL_FILE: Final = "acl"
CERTS_DIR: Final = "certs"
DIR_MODE: Final = 0o700  # only the owner enters the folder ...
FILE_MODE: Final = 0o644  # ... so its files can be readable by containers' users
_ITERATIONS: Final = 101  # what mosquitto_passwd 2.0 uses
ROLES: Final[tuple[Role, ...]] = Role.__args__  # type: ignore[attr-defined]
RELOAD_HINT: Final = (
    "Reload the broker: `docker compose kill -s SIGHUP broker`, or `kill -HUP` the "
    "`factorywatch broker serve` or `factorywatch demo` process."
)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A Mosquitto 2.x password-file hash (``$7$``: PBKDF2-HMAC-SHA512, 101 rounds)."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _ITERATIONS, 64)
    return f"$7${_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_path(secrets_dir: Path, user: str) -> Path:
    """Where ``user``'s plaintext password is kept."""
    return secrets_dir / f"{check_id(user, 'user')}.password"


def read_password(secrets_dir: Path, user: str) -> str | None:
    """``user``'s password from the secrets directory, if there is one."""
    path = password_path(secrets_dir, user)
    return path.read_text().strip() if path.is_file() else None


def add_user(secrets_dir: Path, user: str, password: str | None = None) -> str:
    """Create or rotate ``user``: new password file entry and plaintext file; return it."""
    _make_private_dir(secrets_dir)
    password = password or _random.token_urlsafe(18)
    passwd = secrets_dir / PASSWD_FILE
    entries = {}
    if passwd.is_file():
        for line in passwd.read_text().splitlines():
            name, _, hashed = line.partition(":")
            if name and hashed:
                entries[name] = hashed
    entries[user] = hash_password(password)
    _write_in_place(passwd, "".join(f"{n}:{h}\n" for n, h in entries.items()))
    _write(password_path(secrets_dir, user), password + "\n", FILE_MODE)
    return password


def passwd_users(secrets_dir: Path) -> set[str]:
    """The user names of the password file (none when there is none)."""
    passwd = secrets_dir / PASSWD_FILE
    if not passwd.is_file():
        return set()
    return {ln.split(":", 1)[0] for ln in passwd.read_text().splitlines() if ":" in ln}


def remove_user(secrets_dir: Path, user: str) -> None:
    """Delete ``user``'s password entry, plaintext password and registry entry.

    Raises ``RegistryError`` when no such user exists (nothing is changed then).
    """
    registry = read_registry(registry_path(secrets_dir), missing_ok=True)
    known = user in passwd_users(secrets_dir) or registry.role_of(user) is not None
    if not known:
        raise RegistryError(f"no user {user!r} in {secrets_dir}: nothing removed")
    passwd = secrets_dir / PASSWD_FILE
    if passwd.is_file():
        kept = [ln for ln in passwd.read_text().splitlines() if ln.split(":", 1)[0] != user]
        _write_in_place(passwd, "".join(f"{ln}\n" for ln in kept))
    password_path(secrets_dir, user).unlink(missing_ok=True)
    save_registry(secrets_dir, registry.without(user))


@dataclass(frozen=True)
class NewAccount:
    """What :func:`create_account` made: the account, its role, a description, its password."""

    user: str
    role: str
    what: str
    password: str


def check_machine_ids(ids: Sequence[str]) -> tuple[str, ...]:
    """Valid, distinct machine ids that are not service accounts (else ``RegistryError``)."""
    try:
        checked = tuple(check_id(m, "machine id") for m in ids)
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    if len(set(checked)) != len(checked):
        raise RegistryError(f"duplicate machine ids in {list(checked)}")
    reserved = sorted(set(checked) & {*SERVICE_USERS, *COMPONENT_ACCOUNTS})
    if reserved:
        raise RegistryError(f"machine ids {reserved} are reserved for service users")
    return checked


def create_account(
    secrets_dir: Path,
    user: str,
    role: str | None = None,
    *,
    line: str = DEFAULT_LINE,
    machines: Sequence[str] = (),
) -> NewAccount:
    """Register ``user`` (``broker add-user``): a machine by default, or ``role``; give it
    a new password (an existing account's is rotated). Reload the broker afterwards.

    ``machines``: a gateway's machines (at least one), an edge node's devices (none: any).
    Raises ``RegistryError`` for a bad id or a role the name cannot have; nothing is
    written then.
    """
    try:
        user = check_id(user, "user")
        line = check_id(line, "line")
    except ValueError as exc:
        raise RegistryError(str(exc)) from None
    if role is None:
        role = user if user in STATIC_ROLES and user != "healthcheck" else "machine"
    if role not in ROLES:
        raise RegistryError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if machines and role not in ("gateway", "edge-node"):
        raise RegistryError("--machines is for a gateway: add --gateway")
    what = user
    if role == "gateway":
        if not machines:
            raise RegistryError(f"gateway {user!r} needs --machines (who it speaks for)")
        listed = check_machine_ids(machines)
        register(secrets_dir, user, "gateway", line=line, machines=listed)
        what = f"gateway {user} (may publish batches for {', '.join(listed)})"
    elif role == "edge-node":
        devices = check_machine_ids(machines) if machines else ()
        register(secrets_dir, user, "edge-node", line=line, machines=devices)
        what = (
            f"Sparkplug edge node {user} in group {line} (devices: {', '.join(devices) or 'any'})"
        )
    elif role == "detector":
        register(secrets_dir, user, "detector")
        what = f"detector account {user} (its client id; run `detect --username {user}`)"
    elif role == "machine" and user != "healthcheck":
        check_machine_ids([user])
        register(secrets_dir, user, "machine", line=line)
        what = f"machine {user} on {line}"
    elif role in ("viewer", "operator", "monitor"):
        register(secrets_dir, user, role)
        what = f"{role} account {user}"
    password = add_user(secrets_dir, user)
    return NewAccount(user, str(role), what, password)


def register(
    secrets_dir: Path,
    user: str,
    role: Role,
    *,
    line: str = DEFAULT_LINE,
    machines: tuple[str, ...] = (),
) -> AccountRegistry:
    """Record ``user``'s role in the registry (and the ACL made from it); return the registry."""
    registry = read_registry(registry_path(secrets_dir), missing_ok=True)
    if role == "machine":
        registry = registry.with_machine(user, line)
    elif role == "gateway":
        registry = registry.with_gateway(user, list(machines), line)
    elif role == "edge-node":
        registry = registry.with_edge_node(user, line, list(machines))
    elif role == "detector":
        registry = registry.with_detector(user)
    elif user != role:  # the base accounts viewer/operator/monitor need no entry
        registry = registry.with_service(user, role)
    save_registry(secrets_dir, registry)
    return registry


def save_registry(secrets_dir: Path, registry: AccountRegistry) -> None:
    """Write the registry and regenerate ``secrets/acl`` from it (reload the broker after).

    The ACL is rewritten in place: compose bind-mounts it as a single file (as ``passwd``).
    """
    _make_private_dir(secrets_dir)
    write_registry(registry_path(secrets_dir), registry)
    _write_in_place(secrets_dir / ACL_FILE, acl_for_secrets(secrets_dir))


def _make_private_dir(secrets_dir: Path) -> None:
    secrets_dir.mkdir(parents=True, exist_ok=True)
    secrets_dir.chmod(DIR_MODE)


def _write_in_place(path: Path, text: str) -> None:
    """Rewrite ``path`` keeping its inode (``_write`` replaces the file).

    Compose bind-mounts ``passwd`` into the broker container as a single file: a replaced
    file would stay invisible there, and the SIGHUP reload after ``add-user`` would re-read
    the old users.
    """
    if not path.is_file():
        _write(path, text, FILE_MODE)
        return
    with path.open("r+") as fh:
        fh.write(text)
        fh.truncate()
    path.chmod(FILE_MODE)


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def make_certificates(
    certs_dir: Path, *, hosts: tuple[str, ...] = ("localhost", "broker", "127.0.0.1")
) -> None:
    """A private CA and a broker certificate for ``hosts`` (valid two years)."""
    from cryptography import x509  # noqa: PLC0415 - only needed when making certificates
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    certs_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "factorywatch test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=730))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=730))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    _write(certs_dir / "ca.crt", ca_cert.public_bytes(pem).decode(), 0o644)
    _write(certs_dir / "server.crt", cert.public_bytes(pem).decode(), 0o644)
    # The broker drops to its own user: it must be able to read its key (see README).
    _write(
        certs_dir / "server.key",
        key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        0o644,
    )


def init_secrets(
    secrets_dir: Path,
    machines: tuple[str, ...],
    *,
    force: bool = False,
    line: str = DEFAULT_LINE,
) -> list[str]:
    """Create service and component users, one user per machine (on ``line``), the registry,
    the ACL made from it and TLS material; return the users created."""
    created = []
    for user in (*SERVICE_USERS, *COMPONENT_ACCOUNTS, *machines):
        if force or read_password(secrets_dir, user) is None:
            add_user(secrets_dir, user)
            created.append(user)
    registry = read_registry(registry_path(secrets_dir), missing_ok=True)
    for account, role in COMPONENT_ACCOUNTS.items():
        if registry.role_of(account) != role:
            registry = registry.with_service(account, role)
    for machine in machines:
        if registry.role_of(machine) != "machine" or registry.machines[machine].line != line:
            registry = registry.with_machine(machine, line)
    save_registry(secrets_dir, registry)
    if force or not (secrets_dir / CERTS_DIR / "server.crt").is_file():
        make_certificates(secrets_dir / CERTS_DIR)
    repair_modes(secrets_dir)
    return created


def repair_modes(secrets_dir: Path) -> None:
    """Give an existing secrets folder the modes above (folders made by older versions)."""
    _make_private_dir(secrets_dir)
    for path in secrets_dir.glob("*.password"):
        path.chmod(FILE_MODE)
