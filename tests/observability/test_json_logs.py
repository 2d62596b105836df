"""``AUTHSVC_LOG_FORMAT=json``: a real server's every log line is one JSON object with the structured fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import ADMIN, free_port, new_org, serve_process

TOKEN = "json-logs-admin-token-3f9a"
TOKENS = f"json-test:{TOKEN}"  # named, as AUTHSVC_ADMIN_TOKENS requires


def test_json_logs_are_one_object_per_line_with_the_structured_fields(tmp_path: Path, database_url: str) -> None:
    """Every line (supervisor and both workers, start to stop) parses; key events carry ids and prefix, no secret."""
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_LOG_FORMAT": "json",
        "AUTHSVC_LOG_LEVEL": "DEBUG",
        "AUTHSVC_ADMIN_TOKENS": TOKENS,
        "AUTHSVC_WORKERS": "2",
        "AUTHSVC_STORE_TIMEOUT_MS": "2000",  # the lookup must not time out on a busy machine
    }
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with serve_process(env, tmp_path) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            org = new_org()
            created = stub.CreateKey(
                pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"]), metadata=metadata, timeout=10
            )
            assert stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read"), timeout=10).allowed
            stub.RevokeKey(
                pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN), metadata=metadata, timeout=10
            )
        # Ready means one worker answers on the shared port; the other may still be starting.
        deadline = time.monotonic() + 30
        while _serving_workers(server.log()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.terminate() == 0
    text = server.log()
    lines = text.splitlines()
    assert len(lines) >= 6, text
    entries = []
    for line in lines:
        entry = json.loads(line)  # a line that is not JSON fails the test here
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        assert entry["time"].endswith("+00:00")
        entries.append(entry)
    by_message = {e["message"]: e for e in entries}
    for event in ("key created", "key revoked"):
        e = by_message[event]
        assert e["level"] == "INFO" and e["logger"] == "authsvc.core.manager"
        assert (e["org_id"], e["key_id"], e["key_prefix"], e["actor"]) == (
            org,
            created.key.id,
            created.key.prefix,
            ADMIN.user_id,
        )
    serving = [e for e in entries if e["message"] == "authsvc serving"]
    assert sorted(e["worker"] for e in serving) == [0, 1]  # both workers log in JSON too
    assert created.secret not in text and created.secret[12:] not in text
    assert TOKEN not in text


def test_an_unknown_log_format_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "authsvc", "serve"],
        env={**os.environ, "AUTHSVC_LISTEN": f"127.0.0.1:{free_port()}", "AUTHSVC_LOG_FORMAT": "yaml"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["authsvc: AUTHSVC_LOG_FORMAT must be text or json, got 'yaml'"]


@pytest.mark.parametrize("value", ["text", "JSON", " json "])
def test_log_format_accepts_text_and_json_in_any_case(value: str) -> None:
    from authsvc.config import Settings

    assert Settings.from_env({"AUTHSVC_LOG_FORMAT": value}).log_format == value.strip().lower()


def _serving_workers(text: str) -> int:
    """How many workers have logged that they serve (lines that are not JSON yet are left to the test)."""
    count = 0
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        count += isinstance(entry, dict) and entry.get("message") == "authsvc serving"
    return count
