"""Secrets folders: readable by the containers' user, private on the host, reloadable."""

from __future__ import annotations

import stat
from pathlib import Path

from factorywatch.credentials import add_user, init_secrets, read_password, remove_user


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_private_folder_of_readable_files(tmp_path: Path) -> None:
    """The folder is 0700 (host users kept out), its files 0644 (compose mounts them as is)."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    assert _mode(secrets) == 0o700
    for path in [*secrets.glob("*.password"), secrets / "passwd"]:
        assert _mode(path) == 0o644, path.name
    assert read_password(secrets, "press-1")


def test_init_repairs_a_folder_made_with_0600_files(tmp_path: Path) -> None:
    """Re-running `broker init` on an older folder (0755, 0600 files) fixes the modes only."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ("press-1",))
    before = read_password(secrets, "press-1")
    secrets.chmod(0o755)
    (secrets / "press-1.password").chmod(0o600)
    assert init_secrets(secrets, ("press-1",)) == []
    assert _mode(secrets) == 0o700
    assert _mode(secrets / "press-1.password") == 0o644
    assert read_password(secrets, "press-1") == before


def test_adding_and_removing_users_keeps_the_password_file_inode(tmp_path: Path) -> None:
    """passwd is rewritten in place: a broker bind-mounting the file sees new users on reload."""
    secrets = tmp_path / "secrets"
    init_secrets(secrets, ())
    inode = (secrets / "passwd").stat().st_ino
    add_user(secrets, "weld-4")
    assert (secrets / "passwd").stat().st_ino == inode
    assert "weld-4:$7$" in (secrets / "passwd").read_text()
    remove_user(secrets, "weld-4")
    assert (secrets / "passwd").stat().st_ino == inode
    assert "weld-4" not in (secrets / "passwd").read_text()
    assert read_password(secrets, "weld-4") is None
