"""Issue 13: labels on keys and on every Authorize answer, and UpdateKey, through a real channel and PostgreSQL."""

from __future__ import annotations

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from google.protobuf.field_mask_pb2 import FieldMask

from tests.grpc.test_lifecycle import authorize, code_of, create
from tests.support import ADMIN, MEMBER, OWNER, Stub, new_org


async def update(
    stub: Stub, org: str, key_id: str, paths: list[str], actor: pb.Actor = ADMIN, **kw: object
) -> pb.UpdateKeyResponse:
    request = pb.UpdateKeyRequest(org_id=org, key_id=key_id, actor=actor, update_mask=FieldMask(paths=paths), **kw)  # type: ignore[arg-type]
    return await stub.UpdateKey(request)


async def test_13_labels_are_stored_listed_and_on_every_authorize_answer(stub: Stub) -> None:
    org = new_org()
    labels = {"tier": "gold", "env": "prod", "region.eu-west_1": "Zürich office"}
    created = await create(stub, org, labels=labels)
    assert dict(created.key.labels) == labels
    listed = (await stub.ListKeys(pb.ListKeysRequest(org_id=org, actor=MEMBER))).data
    assert dict(listed[0].labels) == labels
    for scope in ("read", "write"):  # allowed, and denied for scope: the principal carries them both times
        reply = await authorize(stub, created.secret, scope)
        assert dict(reply.principal.labels) == labels
    assert not (await authorize(stub, (await create(stub, org)).secret)).principal.labels


async def test_13_update_renames_and_replaces_labels_and_the_next_answer_shows_it(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org, name="old name", labels={"tier": "free", "env": "dev"})
    assert (await authorize(stub, created.secret)).principal.key_name == "old name"  # cached now
    renamed = await update(stub, org, created.key.id, ["name"], name="billing", labels={"ignored": "x"})
    assert renamed.key.name == "billing" and dict(renamed.key.labels) == {"tier": "free", "env": "dev"}
    relabelled = await update(stub, org, created.key.id, ["labels"], name="ignored", labels={"tier": "gold"})
    assert relabelled.key.name == "billing" and dict(relabelled.key.labels) == {"tier": "gold"}  # the whole map
    reply = await authorize(stub, created.secret)
    assert (reply.principal.key_name, dict(reply.principal.labels)) == ("billing", {"tier": "gold"})
    cleared = await update(stub, org, created.key.id, ["labels"])
    assert not cleared.key.labels and not (await authorize(stub, created.secret)).principal.labels
    # What the key may do never changed.
    assert list(cleared.key.scopes) == ["read"] and cleared.key.state == pb.KEY_STATE_ACTIVE


@pytest.mark.parametrize(
    ("paths", "message"),
    [
        ([], "update_mask must name the fields to change"),
        (["scopes"], "'scopes' cannot be changed"),
        (["expire_time"], "'expire_time' cannot be changed"),
        (["rate_limit"], "'rate_limit' cannot be changed"),
        (["name", "nmae"], "'nmae' cannot be changed"),
    ],
)
async def test_13_update_mask_must_name_name_or_labels(
    stub: Stub, db: asyncpg.Connection, paths: list[str], message: str
) -> None:
    org = new_org()
    created = await create(stub, org, name="keep")
    code, details = await code_of(update(stub, org, created.key.id, paths, name="changed"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert await db.fetchval("SELECT name FROM api_keys WHERE org_id = $1", org) == "keep"


async def test_13_a_revoked_key_cannot_be_updated(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    await stub.RevokeKey(pb.RevokeKeyRequest(org_id=org, key_id=created.key.id, actor=ADMIN))
    code, message = await code_of(update(stub, org, created.key.id, ["name"], name="x"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "revoked" in message


async def test_13_only_admins_and_owners_update_and_other_orgs_keys_are_not_found(stub: Stub) -> None:
    org = new_org()
    created = await create(stub, org)
    code, _ = await code_of(update(stub, org, created.key.id, ["name"], actor=MEMBER, name="x"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = await code_of(update(stub, new_org(), created.key.id, ["name"], name="x"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert (await update(stub, org, created.key.id, ["name"], actor=OWNER, name="x")).key.name == "x"


async def test_13_updates_are_audited(stub: Stub, db: asyncpg.Connection) -> None:
    org = new_org()
    created = await create(stub, org)
    await update(stub, org, created.key.id, ["labels"], labels={"tier": "gold"})
    row = await db.fetchrow(
        "SELECT outcome, actor_user_id, detail FROM audit_events WHERE org_id = $1 AND action = 'key.update'", org
    )
    assert row is not None and (row["outcome"], row["actor_user_id"]) == ("ok", "alice") and "gold" in row["detail"]


def _too_many() -> dict[str, str]:
    return {f"l{i}": "v" for i in range(17)}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (_too_many(), "labels: at most 16 per key, got 17"),
        ({"Tier": "gold"}, "labels: name 'Tier' must be"),
        ({"1tier": "gold"}, "must be 1-63 characters"),
        ({"tier gold": "x"}, "must be 1-63 characters"),
        ({"a" * 64: "x"}, "must be 1-63 characters"),
        ({"": "x"}, "must be 1-63 characters"),
        ({"tier": "x" * 257}, "labels[tier]: value must be at most 256 characters, got 257"),
        ({"tier": "gold\r\nx-evil: 1"}, "labels[tier]: value must not contain control characters"),
    ],
)
async def test_13_bad_labels_are_invalid_argument_and_write_nothing(
    stub: Stub, db: asyncpg.Connection, labels: dict[str, str], message: str
) -> None:
    org = new_org()
    code, details = await code_of(create(stub, org, labels=labels))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org) == 0
    existing = await create(stub, org, labels={"tier": "free"})
    code, details = await code_of(update(stub, org, existing.key.id, ["labels"], labels=labels))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, details
    assert await db.fetchval("SELECT labels::text FROM api_keys WHERE org_id = $1", org) == '{"tier": "free"}'


async def test_13_sixteen_labels_of_256_characters_are_fine(stub: Stub) -> None:
    labels = {f"l{i}": "v" * 256 for i in range(16)}
    created = await create(stub, new_org(), labels=labels)
    assert dict((await authorize(stub, created.secret)).principal.labels) == labels


async def test_13_a_label_or_a_name_holding_an_api_key_is_refused_without_echoing_it(
    stub: Stub, db: asyncpg.Connection
) -> None:
    org = new_org()
    pasted = (await create(stub, new_org())).secret
    code, message = await code_of(create(stub, org, labels={"note": f"use {pasted}"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "labels[note] holds an API key" in message
    assert pasted not in message and pasted[12:] not in message
    existing = await create(stub, org)
    for paths, kw in ((["labels"], {"labels": {"note": pasted}}), (["name"], {"name": pasted})):
        code, message = await code_of(update(stub, org, existing.key.id, paths, **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "holds an API key" in message and pasted not in message
    assert await db.fetchval("SELECT count(*) FROM api_keys WHERE org_id = $1", org) == 1
    assert await db.fetchval("SELECT name FROM api_keys WHERE org_id = $1", org) == "ci"
