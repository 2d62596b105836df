"""Real keys in a fresh organization, and the address of the in-process authsvc."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.core.keyformat import KeyFormat
from authsvc.runtime import App
from tests.support import ADMIN, Stub, free_port, new_org


@dataclass(frozen=True)
class Keys:
    """Secrets of real keys, one per outcome the tests need."""

    org: str
    reader: str  # scopes: read
    reader_id: str
    writer: str  # scopes: write (implies read)
    revoked: str
    unknown: str  # well formed, valid checksum, never issued


@pytest.fixture
def target(app: App) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture
def dead_target() -> str:
    """An address where nothing listens: authsvc unreachable."""
    return f"127.0.0.1:{free_port()}"


async def create_key(stub: Stub, org: str, scopes: list[str], *, rate_limit: int = 0) -> pb.CreateKeyResponse:
    return await stub.CreateKey(
        pb.CreateKeyRequest(org_id=org, actor=ADMIN, name="clients-test", scopes=scopes, rate_limit=rate_limit)
    )


@pytest.fixture
async def keys(stub: Stub) -> Keys:
    org = new_org()
    reader = await create_key(stub, org, ["read"])
    writer = await create_key(stub, org, ["write"])
    revoked = await create_key(stub, org, ["read"])
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=revoked.key.id, actor=ADMIN, reason="test"))
    return Keys(
        org=org,
        reader=reader.secret,
        reader_id=reader.key.id,
        writer=writer.secret,
        revoked=revoked.secret,
        unknown=KeyFormat("authsvc").generate().secret,
    )
