"""A private PostgreSQL for fault tests: its own data folder and port, started and stopped at
will (the machine's shared server is never restarted). Debian's binaries; ``initdb`` refuses to
run as root, so as root the server runs as the ``postgres`` user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
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
    """``initdb`` into a folder of its own (trust auth, user ``postgres``), on a free loopback
    port. The folder is not under pytest's temporary root: every pytest session resets that
    root to mode 0700, which would lock the ``postgres`` user out of a running server's data."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        workdir = Path(tempfile.mkdtemp(prefix="factorywatch-pg-"))
        self.workdir = workdir
        self.data = workdir / "data"
        self.log = workdir / "postgres.log"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            shutil.chown(workdir, user.pw_uid, user.pw_gid)
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
        """Stop the server if it runs and remove its folder (idempotent)."""
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)
