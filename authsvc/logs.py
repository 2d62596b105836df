"""Log set-up: one line per event, with the structured fields we pass as ``extra``.

Only these fields are printed, and none of them can hold a secret: keys
appear by id and 12-character prefix only.

Two formats (``AUTHSVC_LOG_FORMAT``): ``text`` for people, and ``json``, one
object per line for log pipelines, with the same fields under their own names.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the structured fields, then any traceback.

    The message is rendered with its arguments first, so a log pipeline gets
    the same sentence a person reads; a traceback is kept in one string field
    (``exc``) so that it never breaks the one-object-per-line framing.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                value = getattr(record, name)
                entry[name] = value if isinstance(value, int | float | bool) or value is None else str(value)
        if record.exc_info:
            error = record.exc_info[1]
            if record.name.startswith(_ONE_LINE_LOGGERS):
                detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
                entry["message"] = f"{entry['message']} ({detail})"
            else:
                entry["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
