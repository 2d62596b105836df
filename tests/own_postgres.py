"""A throwaway PostgreSQL cluster of a test's own, for tests that kill, stop or reconfigure the database.

The shared servers (127.0.0.1:5432, or the suite's embedded one) are never
disturbed: this one lives in a temporary directory, listens on a free
127.0.0.1 port and is stopped and deleted afterwards. It uses the system's
``initdb``/``pg_ctl`` (``/usr/lib/postgresql/*/bin``). As root, where
PostgreSQL refuses to run, the cluster belongs to the ``postgres`` system
user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support import free_port


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    return Path(found[-1]).parent


@contextlib.contextmanager
def own_postgres(*settings: str) -> Iterator[str]:
    """Start a cluster and yield the URL of its ``postgres`` database; ``settings`` are extra ``name=value``."""
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="authsvc-own-pg-"))
    user: str | None = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data = root / "data"
    port = free_port()

    def run(*args: str | Path, check: bool = True) -> None:
        subprocess.run([str(a) for a in args], user=user, check=check, capture_output=True, timeout=60)

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = " ".join(
            [
                f"-p {port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={root}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                *(f"-c {s}" for s in settings),
            ]
        )
        run(bin_dir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options, "-w", "-t", "30", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "-t", "30", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
