"""A private PostgreSQL for fault tests: its own data folder and port, started and stopped at
will (the machine's shared server is never restarted). Debian's binaries; ``initdb`` refuses to
run as root, so as root the server runs as the ``postgres`` user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import sqlalchemy as sa

from factorywatch.broker import free_port
from tests.support import wait_until


def _bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb; fails loudly when missing."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    assert found, "PostgreSQL server binaries missing: apt-get install postgresql"
    return found[-1].parent


class PrivatePostgres:
    """``initdb`` into ``workdir`` (trust auth, user ``postgres``), on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.bin = _bin_dir()
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            shutil.chown(workdir, user.pw_uid, user.pw_gid)
            for parent in workdir.parents:  # the server must reach its folder
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
            self._as = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
            "--no-sync",
        )  # fmt: skip

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the server's ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"{tool} failed: {done.stdout[-1000:]}{done.stderr[-1000:]}"

    def start(self) -> None:
        """Start the server and wait until it answers a query."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        wait_until(self.answers, timeout=30, what="the private PostgreSQL answering")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back sessions; ``immediate``: like a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def answers(self) -> bool:
        """True when a query succeeds."""
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("select 1"))
            return True
        except sa.exc.OperationalError:
            return False
        finally:
            engine.dispose()

    def close(self) -> None:
        """Stop the server if it runs (idempotent)."""
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
