"""The README's grpcurl walkthrough, run as printed with the real grpcurl against a running server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from tests.support import ROOT, bin_path, serve_process


def walkthrough_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- walkthrough -->", 1)[1].split("<!-- /walkthrough -->", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith(("#", "```"))]


def test_readme_walkthrough_works_as_printed(tmp_path: Path, database_url: str) -> None:
    lines = walkthrough_lines()
    assert [line.split()[0].split("=")[0] for line in lines] == [
        "grpcurl",
        "grpcurl",
        "KEY",
        "KEY_ID",
        "grpcurl",
        "grpcurl",
        "NEW_KEY",
        "grpcurl",
        "grpcurl",
        "grpcurl",
        "grpcurl",
        "grpcurl",
        "grpcurl",
        "grpcurl",
    ]
    # The commands are under test here, not the lookup budget (test_hardening's test_14_* are): a first
    # lookup on a loaded 2-core machine can pass the default 100 ms and turn an allow into UNAVAILABLE.
    # Usage counts are flushed every 0.5 s here (5 s by default), so GetKeyUsage can wait for them briefly.
    env_vars = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_STORE_TIMEOUT_MS": "2000",
        "AUTHSVC_LAST_USED_FLUSH_SECONDS": "0.5",
    }
    with serve_process(env_vars, tmp_path) as server:
        env = {**os.environ}
        outputs: list[str] = []
        for line in lines:
            if line.startswith(("KEY=", "KEY_ID=", "NEW_KEY=")):
                continue  # the reader pastes these from CreateKey's and RotateKey's answers; so do we, below
            command = line.replace("localhost:50051", server.target)
            if "GetKeyUsage" in command:
                time.sleep(1.5)  # as the README says: counts arrive within the flush interval
            result = subprocess.run(
                ["bash", "-c", command],
                env={**env, "PATH": f"{Path(bin_path('grpcurl')).parent}:{env['PATH']}"},
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 0, (command, result.stderr)
            outputs.append(result.stdout)
            if "CreateKey" in command:
                created = json.loads(result.stdout)
                env["KEY"], env["KEY_ID"] = created["secret"], created["key"]["id"]
            if "RotateKey" in command:
                env["NEW_KEY"] = json.loads(result.stdout)["secret"]

    listed, created_out, allowed, rotated_out, new_allowed, old_in_grace, revoked, denied, keys, usage, trail = outputs
    assert {"authsvc.v1.KeyService", "envoy.service.auth.v3.Authorization", "grpc.health.v1.Health"} <= set(
        listed.split()
    )
    assert re.fullmatch(r"authsvc_[0-9A-Za-z]{49}", json.loads(created_out)["secret"])
    assert json.loads(allowed)["allowed"] is True
    assert json.loads(allowed)["principal"]["scopes"] == ["read", "write"]
    rotated = json.loads(rotated_out)
    new_id = rotated["key"]["id"]
    assert rotated["key"]["rotated_from"] == env["KEY_ID"] and rotated["key"]["created_by"] == "bob"
    assert rotated["previous"]["rotated_to"] == new_id and rotated["previous"]["state"] == "KEY_STATE_ACTIVE"
    assert json.loads(new_allowed)["allowed"] is True and json.loads(new_allowed)["principal"]["key_id"] == new_id
    assert json.loads(old_in_grace)["allowed"] is True
    assert json.loads(old_in_grace)["principal"]["key_id"] == env["KEY_ID"]
    assert json.loads(revoked)["key"]["state"] == "KEY_STATE_REVOKED"
    assert (json.loads(denied)["reason"], json.loads(denied)["http_status"]) == ("REASON_REVOKED", 401)
    listed_keys = json.loads(keys)["data"]
    assert any(
        k["id"] == env["KEY_ID"] and k["revoked_by"] == "alice" and k["rotated_to"] == new_id for k in listed_keys
    )
    assert any(k["id"] == new_id and k["rotated_from"] == env["KEY_ID"] for k in listed_keys)
    assert env["KEY"] not in keys and env["NEW_KEY"] not in keys
    days = json.loads(usage)["days"]
    # Two allowed answers (before the rotation, in the grace); the denial after revocation is not a use.
    assert len(days) == 7 and days[-1] == {"date": days[-1]["date"], "allowed": "2"}
    assert all(set(d) == {"date"} for d in days[:-1]) and json.loads(usage)["last_used_time"]
    events = json.loads(trail)["events"]
    assert [(e["action"], e["actor"]["user_id"]) for e in events] == [
        ("key.usage", "bob"),
        ("key.revoke", "alice"),
        ("key.rotate", "bob"),
        ("key.create", "alice"),
    ]
    assert events[1]["details"]["reason"] == "rotated" and all(e["hash"] for e in events)
    assert env["KEY"] not in trail and env["NEW_KEY"] not in trail
