"""A malformed database or Redis URL stops ``serve`` and ``migrate`` in one line that never shows its password.

In a malformed URL nobody can tell where the password ends, so parsers
quote pieces of it in their errors (``Port could not be cast to integer
value as 's3cr3t'``). Each case runs the real ``authsvc serve`` and
``authsvc migrate`` and checks what an operator's terminal (or a log
collector) would receive.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.support import free_port

DB = "AUTHSVC_DATABASE_URL"
REDIS = "AUTHSVC_REDIS_URL"
UNREACHABLE_DB = "postgresql://postgres@127.0.0.1:1/none"

# (variable, URL, the password an operator meant, what is wrong)
CASES: list[tuple[str, str, str, str]] = [
    (DB, "postgresql://svc:s3cr3t?x@127.0.0.1:1/db", "s3cr3t?x", "? in password"),
    (DB, "postgresql://svc:s3cr3t#x@127.0.0.1:1/db", "s3cr3t#x", "# in password"),
    (DB, "postgresql://svc:s3cr3t/x@127.0.0.1:1/db", "s3cr3t/x", "slash in password"),
    (DB, "postgresql://svc:p@ss:s3cr3t@127.0.0.1:1/db", "p@ss:s3cr3t", "@ and : in password"),
    (DB, "postgres://svc:s3cr3t@@127.0.0.1:1/db", "s3cr3t@", "double @"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:abc/db", "s3cr3t", "port not a number"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:99999/db", "s3cr3t", "port out of range"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:-1/db", "s3cr3t", "negative port"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1:2/db", "s3cr3t", "two ports"),
    (DB, "postgresql://svc:s3cr3t@[::1/db", "s3cr3t", "unclosed IPv6 bracket"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1,127.0.0.2:x/db", "s3cr3t", "bad port of second host"),
    (DB, "postgresql://svc:s3cr3t%zz@127.0.0.1:1/db", "s3cr3t%zz", "bad percent escape"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1/db?sslmode=bogus", "s3cr3t", "driver rejects sslmode"),
    (DB, "postgresql://svc@127.0.0.1:1/db?password=s3cr3t&sslmode=bogus", "s3cr3t", "password in query"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1/db?sslpassword=k3yp4ss&sslmode=x", "k3yp4ss", "sslpassword in query"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1/db?target_session_attrs=bogus", "s3cr3t", "bad target_session_attrs"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1/db?gsslib=bogus", "s3cr3t", "bad gsslib"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1/db?sslmode=verify-full&sslrootcert=/nope", "s3cr3t", "missing CA"),
    (DB, "mysql://svc:s3cr3t@127.0.0.1/db", "s3cr3t", "wrong scheme"),
    (DB, "postgresql:/svc:s3cr3t@127.0.0.1/db", "s3cr3t", "one slash"),
    (DB, "postgresql://svc:s3cr3t@127.0.0.1:1/db", "s3cr3t", "unreachable"),
    (DB, "postgresql://:s3cr3t@127.0.0.1:1/db", "s3cr3t", "unreachable, no user"),
    (DB, "postgresql://svc:s3%2Fcr3t@127.0.0.1:1/db", "s3/cr3t", "unreachable, encoded password"),
    (DB, "postgresql://svc:s3 cr3t@127.0.0.1:1/db", "s3 cr3t", "unreachable, space in password"),
    (REDIS, "redis://:s3cr3t?x@127.0.0.1:6379/0", "s3cr3t?x", "? in password"),
    (REDIS, "redis://:s3cr3t#x@127.0.0.1:6379/0", "s3cr3t#x", "# in password"),
    (REDIS, "redis://:s3cr3t/x@127.0.0.1:6379/0", "s3cr3t/x", "slash in password"),
    (REDIS, "redis://svc:p@ss:s3cr3t@127.0.0.1:6379/0", "p@ss:s3cr3t", "@ and : in password"),
    (REDIS, "rediss://:s3cr3t@@127.0.0.1:6379/0", "s3cr3t@", "double @"),
    (REDIS, "redis://:s3cr3t@127.0.0.1:abc/0", "s3cr3t", "port not a number"),
    (REDIS, "redis://:s3cr3t@127.0.0.1:99999/0", "s3cr3t", "port out of range"),
    (REDIS, "redis://:s3cr3t@[::1/0", "s3cr3t", "unclosed IPv6 bracket"),
    (REDIS, "redis://:s3cr3t@127.0.0.1:6379/zero", "s3cr3t", "database not a number"),
    (REDIS, "redis://:s3cr3t@127.0.0.1:6379/0?socket_timeout=abc", "s3cr3t", "driver rejects a parameter"),
    (REDIS, "redis://127.0.0.1:6379/0?password=s3cr3t&socket_timeout=abc", "s3cr3t", "password in query"),
    (REDIS, "redis://:s3cr3t%zz@127.0.0.1:6379/0", "s3cr3t%zz", "bad percent escape"),
    (REDIS, "unix://:s3cr3t@/tmp/redis.sock?db=zero", "s3cr3t", "unix socket, bad db"),
    (REDIS, "http://:s3cr3t@127.0.0.1:6379/0", "s3cr3t", "wrong scheme"),
    (REDIS, "redis:/:s3cr3t@127.0.0.1:6379/0", "s3cr3t", "one slash"),
]


def leaked_pieces(output: str, password: str) -> list[str]:
    """Every spelling of the password, and every run of 4 of its characters, found in ``output``."""
    found = []
    for form in {password, urllib.parse.quote(password, safe=""), urllib.parse.quote_plus(password)}:
        size = min(4, len(form))
        found += [form[i : i + size] for i in range(len(form) - size + 1) if form[i : i + size] in output]
    return found


def start(command: str, env: dict[str, str], tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "authsvc", command],
        env={**os.environ, "AUTHSVC_LISTEN": f"127.0.0.1:{free_port()}", "AUTHSVC_WORKERS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
    )


def test_the_table_covers_both_variables_and_many_forms() -> None:
    assert len(CASES) >= 24
    assert {variable for variable, *_ in CASES} == {DB, REDIS}


@pytest.mark.parametrize(("variable", "url", "password", "what"), CASES, ids=[f"{c[0][8:]}: {c[3]}" for c in CASES])
def test_malformed_url_stops_serve_and_migrate_without_showing_the_password(
    variable: str, url: str, password: str, what: str, tmp_path: Path
) -> None:
    # A Redis case gets an unreachable database: should its URL slip through
    # the checks, the start fails on the database instead, naming the wrong variable.
    env = {variable: url} if variable == DB else {variable: url, DB: UNREACHABLE_DB}
    procs = {command: start(command, env, tmp_path) for command in ("serve", "migrate")}  # both at once: quicker
    for command, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, f"{command}: exit {proc.returncode}: {stderr}"
        assert len(lines) == 1 and lines[0].startswith("authsvc: "), f"{command}: {stderr}"
        assert variable in lines[0], f"{command}: {lines[0]}"
        assert leaked_pieces(stdout + stderr, password) == [], f"{command}: {lines[0]}"
