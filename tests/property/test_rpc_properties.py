"""Property-based tests: every RPC, fed what hypothesis can think of, through a real channel to a real server.

Each RPC of ``authsvc.v1.KeyService`` and Envoy's ``Check`` gets typed
requests built from strategies (strings with unicode, control characters and
100 kB runs, ints at their limits, timestamps at the extremes, enum numbers
out of range, real keys and ids next to near misses) and raw random bytes as
the request body (a generic ``unary_unary`` with identity serializers). For
every call:

- the status is never INTERNAL or UNKNOWN (nor anything but the codes the
  RPC documents), and the server answers health afterwards: nothing crashed;
- the rows written to ``api_keys`` and ``audit_events`` are exactly what the
  answer implies (``WRITES``): a refused call writes no key, bad input
  writes nothing at all.

``AUTHSVC_PROPERTY_EXAMPLES`` sets the examples per test (default 150, so
the module stays well under a minute on 2 cores); ``=10000`` for a long run.
Failures print the seed and a reproduction blob (``@reproduce_failure``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from authsvc_client.v1 import authsvc_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from authsvc.core.keyformat import KeyFormat
from authsvc.runtime import App
from tests.support import ADMIN, new_org

EXAMPLES = int(os.environ.get("AUTHSVC_PROPERTY_EXAMPLES", "150"))
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a real server on a loaded 2-core machine: latency is not the property
    database=None,  # no example files left in the work tree; failures print their blob instead
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,  # the fixtures are deliberately shared by all examples
    ],
)
C = grpc.StatusCode

# (method, status) -> (api_keys rows, audit_events rows) the call may add.
# Anything missing here, INTERNAL and UNKNOWN above all, fails the test.
# Bad input (INVALID_ARGUMENT) writes nothing, on every method.
WRITES: dict[tuple[str, C], tuple[int, int]] = {
    **{(m, C.INVALID_ARGUMENT): (0, 0) for m in ("CreateKey", "GetKey", "ListKeys", "RevokeKey", "Authorize", "Check")},
    ("CreateKey", C.OK): (1, 1),
    ("CreateKey", C.PERMISSION_DENIED): (0, 1),
    ("CreateKey", C.RESOURCE_EXHAUSTED): (0, 1),  # the org's active-key limit, audited as limit_reached
    ("GetKey", C.OK): (0, 1),
    ("GetKey", C.NOT_FOUND): (0, 1),
    ("GetKey", C.PERMISSION_DENIED): (0, 1),
    ("ListKeys", C.OK): (0, 1),
    ("ListKeys", C.PERMISSION_DENIED): (0, 1),
    ("RevokeKey", C.OK): (0, 1),
    ("RevokeKey", C.NOT_FOUND): (0, 1),
    ("RevokeKey", C.PERMISSION_DENIED): (0, 1),
    ("Authorize", C.OK): (0, 0),  # a denial is an answer
    ("Check", C.OK): (0, 0),  # so is an Envoy denial, whatever its HTTP status
    # The hot path's 100 ms store budget can run out on a loaded machine: failing
    # closed is a correct answer there (and writes nothing).
    ("Authorize", C.UNAVAILABLE): (0, 0),
    ("Check", C.UNAVAILABLE): (0, 0),
}
METHODS: dict[str, tuple[str, type[Message]]] = {
    "CreateKey": ("/authsvc.v1.KeyService/CreateKey", pb.CreateKeyResponse),
    "GetKey": ("/authsvc.v1.KeyService/GetKey", pb.GetKeyResponse),
    "ListKeys": ("/authsvc.v1.KeyService/ListKeys", pb.ListKeysResponse),
    "RevokeKey": ("/authsvc.v1.KeyService/RevokeKey", pb.RevokeKeyResponse),
    "Authorize": ("/authsvc.v1.KeyService/Authorize", pb.AuthorizeResponse),
    "Check": ("/envoy.service.auth.v3.Authorization/Check", ext.CheckResponse),
}


# The world the examples act on: one org with real keys, so that valid ids,
# secrets and roles meet the random ones.


@dataclass(frozen=True)
class World:
    org: str
    key_ids: tuple[str, ...]
    secrets: tuple[str, ...]


@pytest.fixture(scope="module")
async def world(app: App) -> World:
    org = new_org()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        create = channel.unary_unary(
            METHODS["CreateKey"][0],
            request_serializer=pb.CreateKeyRequest.SerializeToString,
            response_deserializer=pb.CreateKeyResponse.FromString,
        )
        created = [
            await create(pb.CreateKeyRequest(org_id=org, actor=ADMIN, name=f"k{i}", scopes=[s]))
            for i, s in enumerate(("read", "write", "delete"))
        ]
    return World(org, tuple(c.key.id for c in created), tuple(c.secret for c in created))


@pytest.fixture(scope="module")
async def raw_channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    # 4 MB out: the server's 1 MB limit is then the server's to enforce.
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.port}", options=[("grpc.max_send_message_length", 4 * 1024 * 1024)]
    ) as channel:
        yield channel


async def _counts(db: asyncpg.Connection) -> tuple[int, int]:
    row = await db.fetchrow("SELECT (SELECT count(*) FROM api_keys) AS k, (SELECT count(*) FROM audit_events) AS a")
    assert row is not None
    return int(row["k"]), int(row["a"])


async def call_and_check(channel: grpc.aio.Channel, db: asyncpg.Connection, method: str, body: bytes) -> C:
    """Send ``body`` as ``method``'s request; assert the status and the rows written agree."""
    path, response_class = METHODS[method]
    before = await _counts(db)
    raw: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
    try:
        reply = await raw(body, timeout=20)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        details = exc.details() or ""
    else:
        code, details = C.OK, ""
        response_class.FromString(reply)  # the answer is a well-formed response
    after = await _counts(db)
    expected = WRITES.get((method, code))
    assert expected is not None, f"{method} answered {code.name}: {details[:300]!r}"
    assert (after[0] - before[0], after[1] - before[1]) == expected, (method, code.name, details[:300])
    assert len(details) < 2000  # an error says what to fix; it does not echo the input back
    await still_serving(channel)  # nothing crashed
    event(f"{method} {code.name}")  # --hypothesis-show-statistics shows how the answers spread
    return code


async def still_serving(channel: grpc.aio.Channel, within: float = 5.0) -> None:
    """The server still answers health, SERVING, within ``within`` seconds.

    Not at this instant: one health ping that misses its budget (a stalled
    disk under the test database) reports NOT_SERVING until the next ping,
    half a second later, and that is the database, not this request. A
    crashed or wedged server never comes back.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + within
    while True:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return
        assert time.monotonic() < deadline, f"health is {reply.status} after {within:g} s"
        await asyncio.sleep(0.1)


# Strategies -----------------------------------------------------------------

INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 100, 101]))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, -1, 2**63 - 1, -(2**63)]))
# Any text protobuf can carry (surrogates cannot be UTF-8 encoded).
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
HUGE = st.builds(
    lambda s, n: (s or "x") * n,
    st.text(st.characters(exclude_categories=["Cs"]), max_size=3),
    st.integers(1_000, 50_000),
)
CONTROL = st.text(st.sampled_from("\x00\x1b\n\r\t\u2028\u2029\u200b\ufeff\x7f a"), min_size=1, max_size=10)


def mostly(likely: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``likely`` about seven times in eight: a request then often gets past validation and reaches the store.

    ``likely`` is the branch hypothesis shrinks towards (it favours small
    draws), so a failure shrinks to a plausible request with one wrong field.
    """
    return st.integers(0, 7).flatmap(lambda i: wrong if i == 7 else likely)


def text_or(valid: st.SearchStrategy[str], *near_misses: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly valid values; otherwise near misses, or wrong ones of every kind."""
    return mostly(valid, st.one_of(*near_misses, ANY_TEXT, CONTROL, HUGE, st.just("")))


def world_strategies(world: World) -> dict[str, st.SearchStrategy[Any]]:
    secret = st.sampled_from(world.secrets)
    key_id = st.sampled_from(world.key_ids)
    return {
        "org": text_or(
            st.one_of(st.just(world.org), st.builds(new_org)),
            st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True),  # valid too, mostly
            st.just("acme corp"),
        ),
        "key_id": text_or(
            st.one_of(key_id, st.uuids().map(str)),
            key_id.map(str.upper),
            st.uuids().map(lambda u: u.hex),
            key_id.map(lambda k: f"{{{k}}}"),
        ),
        "secret": text_or(
            st.one_of(secret, st.builds(lambda: KeyFormat("authsvc").generate().secret)),  # known, or unknown
            secret.map(lambda s: s[:-1] + ("A" if s[-1] != "A" else "B")),  # checksum broken
            secret.map(lambda s: s + " "),
            st.just("authsvc_"),
        ),
        "scope": text_or(st.sampled_from(["read", "write", "delete"]), st.sampled_from(["Read", "read ", "admin"])),
        "name": text_or(st.sampled_from(["ci", "  ci  ", "build-bot"]), secret.map(lambda s: f"for {s}")),
        "user": text_or(st.sampled_from(["alice", "bob"]), st.just(" alice"), secret),
    }


ROLE = mostly(st.sampled_from([2, 3, 1, 0]), INT32)  # admins first: they reach the store most
STATE = mostly(st.one_of(st.none(), st.sampled_from([0, 1, 2, 3])), INT32)
PAGING = mostly(st.integers(0, 101), INT32)
EXTREME_TIMESTAMPS = st.sampled_from(
    [
        (253_402_300_799, 999_999_999),
        (253_402_300_799, 999_999_000),
        (253_402_300_799, 999_998_000),
        (253_402_300_800, 0),
        (-62_135_596_800, 0),
        (-62_135_596_801, 0),
        (0, -1),
        (0, 1_000_000_000),
        (4_102_444_800, 123_456_789),  # 2100, with a nanosecond clock
    ]
)
# Mostly the extremes: each is one value among 2**95, random draws would never meet it.
TIMESTAMP = st.builds(
    lambda sn: Timestamp(seconds=sn[0], nanos=sn[1]),
    mostly(
        EXTREME_TIMESTAMPS,
        st.one_of(st.tuples(INT64, INT32), st.tuples(st.integers(1_800_000_000, 4_000_000_000), INT32)),
    ),
)


def actor(s: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[pb.Actor | None]:
    return mostly(st.builds(lambda u, r: pb.Actor(user_id=u, role=r), s["user"], ROLE), st.none())


def requests(world: World) -> dict[str, st.SearchStrategy[Message]]:
    s = world_strategies(world)

    def create(
        org: str, who: pb.Actor | None, name: str, scopes: list[str], expire: Timestamp | None, rate: int
    ) -> Message:
        message = pb.CreateKeyRequest(org_id=org, actor=who, name=name, scopes=scopes, rate_limit=rate)
        if expire is not None:
            message.expire_time.CopyFrom(expire)
        return message

    def list_keys(org: str, who: pb.Actor | None, page: int, limit: int, state: int | None) -> Message:
        message = pb.ListKeysRequest(org_id=org, actor=who, page=page, limit=limit)
        if state is not None:
            message.state = state  # type: ignore[assignment]  # out-of-range enum numbers on purpose
        return message

    scope_lists = mostly(
        st.lists(s["scope"], min_size=1, max_size=5),
        st.one_of(st.just([]), st.lists(st.just("read"), min_size=60, max_size=70)),
    )
    rate = mostly(st.integers(0, 1000), INT32)
    expire = st.one_of(st.none(), TIMESTAMP)
    return {
        "CreateKey": st.builds(create, s["org"], actor(s), s["name"], scope_lists, expire, rate),
        "GetKey": st.builds(
            lambda o, k, a: pb.GetKeyRequest(org_id=o, key_id=k, actor=a), s["org"], s["key_id"], actor(s)
        ),
        "ListKeys": st.builds(list_keys, s["org"], actor(s), PAGING, PAGING, STATE),
        "RevokeKey": st.builds(
            lambda o, k, a, r: pb.RevokeKeyRequest(org_id=o, key_id=k, actor=a, reason=r),
            s["org"],
            s["key_id"],
            actor(s),
            text_or(st.just("rotated"), s["secret"]),
        ),
        "Authorize": st.builds(
            lambda k, sc: pb.AuthorizeRequest(key=k, required_scope=sc), s["secret"], text_or(s["scope"])
        ),
        "Check": st.builds(
            check_request,
            st.dictionaries(
                text_or(st.sampled_from(["x-api-key", "authorization", "x-authsvc-org-id", "X-Api-Key"])),
                text_or(s["secret"], s["secret"].map(lambda k: f"ApiKey {k}"), s["secret"].map(lambda k: f"{k},{k}")),
                max_size=4,
            ),
            text_or(st.sampled_from(["GET", "POST", "HEAD", "DELETE", "get"])),
            text_or(st.sampled_from(["/items", "/admin/x", "/public/a"])),
            st.dictionaries(
                st.sampled_from(["scope", "public", "other"]), text_or(s["scope"], st.just("true")), max_size=2
            ),
            st.booleans(),
        ),
    }


def check_request(
    headers: dict[str, str], method: str, path: str, context: dict[str, str], raw_headers: bool
) -> ext.CheckRequest:
    request = ext.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = method, path
    if raw_headers:  # Envoy's encode_raw_headers form: one entry per header line, bytes values
        for name, value in headers.items():
            http.header_map.headers.add(key=name, raw_value=value.encode())
    else:
        http.headers.update(headers)
    request.attributes.context_extensions.update(context)
    return request


def mutated(body: bytes, data: st.DataObject) -> bytes:
    """A valid request with a few bytes flipped, cut or inserted: gets past the first byte of the parser."""
    out = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        if not out:
            break
        at = data.draw(st.integers(0, len(out) - 1), label="at")
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="action")
        if action == "flip":
            out[at] ^= data.draw(st.integers(1, 255), label="bits")
        elif action == "cut":
            del out[at:]
        else:
            out[at:at] = data.draw(st.binary(min_size=1, max_size=8), label="bytes")
    return bytes(out)


# The properties -------------------------------------------------------------

RPCS = list(METHODS)


@pytest.mark.parametrize("method", RPCS)
@PROPERTY
@given(data=st.data())
async def test_typed_requests_never_internal_and_write_what_the_answer_says(
    method: str, data: st.DataObject, world: World, raw_channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    request = data.draw(requests(world)[method], label="request")
    await call_and_check(raw_channel, db, method, request.SerializeToString())


@pytest.mark.parametrize("method", RPCS)
@PROPERTY
@given(data=st.data())
async def test_raw_bytes_never_internal_and_write_what_the_answer_says(
    method: str, data: st.DataObject, world: World, raw_channel: grpc.aio.Channel, db: asyncpg.Connection
) -> None:
    if data.draw(st.booleans(), label="mutate a valid request"):
        body = mutated(data.draw(requests(world)[method], label="request").SerializeToString(), data)
    else:
        body = data.draw(st.binary(max_size=512), label="body")
    await call_and_check(raw_channel, db, method, body)
