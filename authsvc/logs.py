"""Log set-up: one line per event, with the structured fields we pass as ``extra``.

Only these fields are printed, and none of them can hold a secret: keys
appear by id and 12-character prefix only.
"""

from __future__ import annotations

import logging
import sys

FIELDS = (
    "org_id",
    "key_id",
    "key_prefix",
    "actor",
    "caller",
    "rotated_to",
    "created_by",
    "count",
    "listen",
    "http_authz_listen",
    "worker",
    "pgdata",
)


# Libraries whose logged exceptions are about the database being away (asyncpg
# retrying its pool floor, say): one line each, not a traceback every few
# seconds for as long as an outage lasts. Our own code keeps its tracebacks.
_ONE_LINE_LOGGERS = ("asyncpg",)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.name.startswith(_ONE_LINE_LOGGERS):
            error = record.exc_info[1]
            detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            record = logging.makeLogRecord(
                {**record.__dict__, "msg": f"{record.getMessage()} ({detail})", "args": None, "exc_info": None}
            )
        line = super().format(record)
        extras = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        return f"{line} {extras}" if extras else line


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
