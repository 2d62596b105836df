"""The embedded PostgreSQL used when no database URL is configured.

A newcomer runs ``authsvc serve`` and gets a private server in the data
directory (the ``pgserver`` package ships the binaries); it stops when the
last authsvc process using it exits.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from authsvc.core.errors import ConfigError

log = logging.getLogger(__name__)


def start(data_dir: Path) -> str:
    """Start (or join) the embedded server and return its asyncpg DSN."""
    pgdata = (data_dir / "pgdata").resolve()
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"AUTHSVC_DATA_DIR: cannot create {pgdata.parent}: {exc.strerror}") from None
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # platformdirs warns on every start when XDG_RUNTIME_DIR is unset (containers, CI); nothing to act on.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import pgserver  # imported lazily: it is slow to import and unused with a URL

            server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]  # untyped re-export
    except Exception as exc:  # pgserver raises bare Exceptions; report them in one line
        raise ConfigError(
            f"cannot start the embedded PostgreSQL in {pgdata} ({exc}); "
            "set AUTHSVC_DATABASE_URL to use an existing server"
        ) from None
    log.info("embedded PostgreSQL running", extra={"pgdata": str(pgdata)})
    uri: str = server.get_uri()
    return uri
