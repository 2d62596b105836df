"""The server's log lines: one line per event, also for a library's retries during an outage."""

from __future__ import annotations

import logging
import sys

from authsvc.logs import _Formatter


def _render(name: str, error: BaseException) -> str:
    try:
        raise error
    except BaseException:
        record = logging.getLogger(name).makeRecord(
            name, logging.WARNING, __file__, 1, "Failed to restore the pool connection floor; retrying", (), None
        )
        record.exc_info = sys.exc_info()
    return _Formatter("%(levelname)s %(name)s: %(message)s").format(record)


def test_asyncpg_retries_are_one_line_naming_the_error() -> None:
    line = _render("asyncpg.pool", TimeoutError())
    assert line == "WARNING asyncpg.pool: Failed to restore the pool connection floor; retrying (TimeoutError)"
    line = _render("asyncpg.pool", ConnectionRefusedError(111, "Connect call failed"))
    assert "\n" not in line and line.endswith("(ConnectionRefusedError: [Errno 111] Connect call failed)")


def test_our_own_errors_keep_their_traceback() -> None:
    text = _render("authsvc.app", RuntimeError("a bug"))
    assert "Traceback (most recent call last)" in text and "RuntimeError: a bug" in text


def test_json_lines_carry_the_extra_fields_and_keep_a_traceback_in_one_field() -> None:
    import json

    from authsvc.logs import _JsonFormatter

    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        record = logging.getLogger("authsvc.app").makeRecord(
            "authsvc.app",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("here",),
            sys.exc_info(),
            extra={"key_id": "k1", "key_prefix": "authsvc_abcd", "worker": 1},
        )
    line = _JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed here" and entry["level"] == "ERROR" and entry["logger"] == "authsvc.app"
    assert (entry["key_id"], entry["key_prefix"], entry["worker"]) == ("k1", "authsvc_abcd", 1)
    assert "RuntimeError: a bug" in entry["exc"]
