"""Log set-up: one line per event, with the structured fields we pass as ``extra``.

Only these fields are printed, and none of them can hold a secret: keys
appear by id and 12-character prefix only.
"""

from __future__ import annotations

import logging
import sys

FIELDS = ("org_id", "key_id", "key_prefix", "actor", "listen", "worker", "pgdata")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        return f"{line} {extras}" if extras else line


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
