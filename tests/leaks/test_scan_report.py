"""``authsvc scan --report``: what the scan finds reaches ReportLeakedKeys over TLS, and the keys stop working.

A real ``authsvc serve`` with TLS and an admin token (which the report does
not need), the real scanner process, and the real PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from authsvc.core.keyformat import KeyFormat
from tests.leaks.test_scan import assert_no_secret
from tests.support import ADMIN, new_org, serve_process
from tests.tls import CertificateAuthority

TOKEN = "scan-report-token-0123456789"
pytestmark = pytest.mark.slow


def test_scan_report_revokes_what_it_finds_over_tls(tmp_path: Path, database_url: str) -> None:
    ca = CertificateAuthority(tmp_path)
    issued = ca.server()
    cert, key, ca_file = tmp_path / "server.pem", tmp_path / "server-key.pem", tmp_path / "ca.pem"
    cert.write_bytes(issued.cert_pem + ca.cert_pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    ca_file.write_bytes(ca.cert_pem)
    env = {
        "AUTHSVC_DATABASE_URL": database_url,
        "AUTHSVC_TLS_CERT_FILE": str(cert),
        "AUTHSVC_TLS_KEY_FILE": str(key),
        "AUTHSVC_ADMIN_TOKENS": f"deployer:{TOKEN}",
    }
    credentials = grpc.ssl_channel_credentials(ca.cert_pem)
    with serve_process(env, tmp_path, credentials=credentials) as server:
        target = server.target  # 127.0.0.1, which the server's certificate names
        with grpc.secure_channel(target, credentials) as channel:
            stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            org = new_org()
            auth = (("authorization", f"Bearer {TOKEN}"),)

            def create() -> pb.CreateKeyResponse:
                request = pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="ci", scopes=["read"])
                return stub.CreateKey(request, metadata=auth, timeout=10)

            active, revoked, untouched = create(), create(), create()
            stub.RevokeKey(
                pb.RevokeKeyRequest(org_id=org, actor=ADMIN, key_id=revoked.key.id, reason="old"),
                metadata=auth,
                timeout=10,
            )
            unknown = KeyFormat("authsvc").generate().secret
            lookalike = active.secret[:-1] + ("A" if active.secret[-1] != "A" else "B")
            tree = tmp_path / "repo"
            (tree / "src").mkdir(parents=True)
            (tree / "src" / "settings.py").write_text(f"KEY = '{active.secret}'\nOLD = '{revoked.secret}'\n")
            (tree / ".env").write_text(f"A={active.secret}\nB={unknown}\nC={lookalike}\n")
            clean_env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHSVC_")}
            result = subprocess.run(
                [sys.executable, "-m", "authsvc", "scan", str(tree), "--report", target, "--ca-file", str(ca_file)],
                capture_output=True,
                text=True,
                env=clean_env,
                timeout=60,
                check=False,
            )
            assert result.returncode == 1, result.stderr  # keys were found
            assert len(result.stdout.splitlines()) == 4  # active twice, revoked, unknown; not the look-alike
            assert result.stderr.strip() == (f"reported 3 key(s) to {target}: 1 revoked, 1 already revoked, 1 unknown")
            assert_no_secret(result.stdout + result.stderr, [active.secret, revoked.secret, unknown])
            answer = stub.Authorize(pb.AuthorizeRequest(key=active.secret), timeout=10)
            assert answer.reason == pb.REASON_REVOKED
            assert stub.Authorize(pb.AuthorizeRequest(key=untouched.secret), timeout=10).allowed
            got = stub.GetKey(pb.GetKeyRequest(org_id=org, actor=ADMIN, key_id=active.key.id), metadata=auth).key
            assert (got.revoked_by, got.revoke_reason) == ("leak-report", "leaked: reported via authsvc scan")

            # Plaintext to a TLS port: the report fails in one line, exit 2, and says nothing of the keys.
            failed = subprocess.run(
                [sys.executable, "-m", "authsvc", "scan", str(tree), "--report", target],
                capture_output=True,
                text=True,
                env=clean_env,
                timeout=60,
                check=False,
            )
            assert failed.returncode == 2
            assert failed.stderr.startswith(f"authsvc: reporting to {target} failed: UNAVAILABLE")
            assert len(failed.stderr.strip().splitlines()) == 1 and "Traceback" not in failed.stderr
            assert_no_secret(failed.stdout + failed.stderr, [active.secret, revoked.secret, unknown])
