"""The open-file limit: raised to its hard limit at start, and the connection cap kept below it.

Every connection is a file descriptor. With the usual soft limit of 1024 a
few thousand idle or half-open connections used to exhaust a worker: it
then could not accept Envoy's connections, nor open database connections.
The hard limit is what the administrator allows; the soft one is only a
default, so a server raises it. The connection cap leaves ``RESERVED``
descriptors for everything else (database pool, LISTEN connection,
Redis, logs, the certificate files), so at the cap the process still works.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

RESERVED = 128


def raise_open_file_limit() -> int:
    """Set the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. a sandbox that refuses; keep what we have
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(wanted: int, open_file_limit: int) -> int:
    """``wanted`` connections, lowered to leave ``RESERVED`` descriptors free (at least 1)."""
    cap = min(wanted, open_file_limit - RESERVED)
    if cap < wanted:
        log.warning(
            "AUTHSVC_MAX_CONNECTIONS=%d lowered to %d: the open-file limit is %d; raise it (ulimit -Hn, LimitNOFILE=)",
            wanted,
            max(cap, 1),
            open_file_limit,
        )
    return max(cap, 1)
