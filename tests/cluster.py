"""A PostgreSQL primary and streaming standbys of the test's own, to stop, freeze and promote.

Tests that break the database must never touch the shared servers, so this
starts real PostgreSQL servers (initdb, ``pg_basebackup -R``, ``pg_ctl``
from ``/usr/lib/postgresql/*/bin``) on 127.0.0.1 ports of their own, in
temporary directories removed afterwards::

    with primary_and_standby() as (primary, standby):
        url = multi_host_url(primary, standby, application_name="authsvc-a")
        primary.stop(); primary.start()
        standby.pause_replay(); standby.promote()
        primary.freeze_backends("authsvc-a"); primary.thaw()

Run as root (as on our CI machines), the servers run as the ``postgres``
user, since PostgreSQL refuses to run as root. Every command has a timeout.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import free_port

_TIMEOUT = 30.0


def _bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (apt install postgresql)")
    return candidates[-1].parent


def _run_as() -> dict[str, Any]:
    """subprocess arguments that run a server binary as a user PostgreSQL accepts."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": "postgres"}


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


class Postgres:
    """One PostgreSQL server: a data directory, a port on 127.0.0.1, a log."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.data = root / name
        self.port = free_port()
        self.log = root / f"{name}.log"
        self.socket_dir = root / f"{name}-socket"
        self.socket_dir.mkdir()
        _chown(self.socket_dir)
        self._frozen: list[int] = []

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _tool(self, tool: str, *args: str, timeout: float = _TIMEOUT) -> str:
        result = subprocess.run(
            [str(_bin_dir() / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
            **_run_as(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return str(result.stdout)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one statement over TCP; the unaligned, tuples-only output."""
        result = subprocess.run(
            [str(_bin_dir() / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", self.url(database)],
            input=sql,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql on {self.name} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def initdb(self) -> None:
        self._tool("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        with (self.data / "postgresql.conf").open("a") as conf:
            # Speed over durability: these servers live for one test.
            conf.write("fsync = off\nfull_page_writes = off\nshared_buffers = 16MB\n")
            conf.write("max_wal_senders = 4\nwal_keep_size = 64MB\nhot_standby = on\n")

    def base_backup_of(self, primary: Postgres) -> None:
        """Clone ``primary`` into a streaming standby (``-R`` writes standby.signal and primary_conninfo)."""
        self._tool(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.socket_dir}"
        self._tool("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "20", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown (standbys receive all WAL first); ``immediate``: a crash."""
        self.thaw()
        self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "20", "stop")

    def running(self) -> bool:
        result = subprocess.run(
            [str(_bin_dir() / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
            **_run_as(),
        )
        return result.returncode == 0

    def promote(self) -> None:
        self._tool("pg_ctl", "-D", str(self.data), "-w", "-t", "20", "promote")

    def in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    def pause_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while self.psql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            assert time.monotonic() < deadline, "replay did not pause"
            time.sleep(0.02)

    def resume_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")

    def wait_replayed(self, primary: Postgres, timeout: float = 10.0) -> None:
        """Until this standby has replayed everything ``primary`` has written so far."""
        target = primary.psql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        while self.psql(f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") != "t":
            assert time.monotonic() < deadline, f"{self.name} did not replay up to {target}"
            time.sleep(0.02)

    def backends(self, application_name: str) -> list[int]:
        """Pids of the server processes serving connections that named themselves ``application_name``."""
        out = self.psql(
            "SELECT pid FROM pg_stat_activity "
            f"WHERE application_name = '{application_name}' AND pid <> pg_backend_pid()"
        )
        return [int(line) for line in out.splitlines() if line]

    def freeze_backends(self, application_name: str) -> list[int]:
        """SIGSTOP those backends: their connections stay open and answer nothing (a hung database)."""
        pids = self.backends(application_name)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        self._frozen += pids
        return pids

    def thaw(self) -> None:
        """SIGCONT every backend this object froze."""
        frozen, self._frozen = self._frozen, []
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def multi_host_url(*servers: Postgres, database: str = "authsvc", **params: str) -> str:
    """``postgresql://postgres@127.0.0.1:P1,127.0.0.1:P2/db?...``: the URL an operator gives authsvc."""
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"postgresql://postgres@{hosts}/{database}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def temp_root() -> Iterator[Path]:
    # Not pytest's tmp_path: the postgres user must be able to enter it.
    root = Path(tempfile.mkdtemp(prefix="authsvc-cluster-"))
    _chown(root)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def primary_only(database: str = "authsvc") -> Iterator[Postgres]:
    """One server of the test's own, with ``database`` created."""
    with temp_root() as root:
        primary = Postgres(root, "primary")
        primary.initdb()
        primary.start()
        try:
            primary.psql(f'CREATE DATABASE "{database}"')
            yield primary
        finally:
            _stop_quietly(primary)


@contextlib.contextmanager
def primary_and_standby(database: str = "authsvc") -> Iterator[tuple[Postgres, Postgres]]:
    """A primary with ``database`` and one streaming standby cloned from it, both running."""
    with temp_root() as root:
        primary = Postgres(root, "primary")
        standby = Postgres(root, "standby")
        primary.initdb()
        primary.start()
        try:
            primary.psql(f'CREATE DATABASE "{database}"')
            standby.base_backup_of(primary)
            standby.start()
            yield primary, standby
        finally:
            _stop_quietly(standby)
            _stop_quietly(primary)


def _stop_quietly(server: Postgres) -> None:
    server.thaw()
    if server.data.exists() and server.running():
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            server.stop("immediate")
