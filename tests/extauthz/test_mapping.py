"""The Envoy adapter's mapping, case by case: Decision -> CheckResponse, headers -> key, route -> scope.

These drive ``AuthorizationAdapter`` directly over the real ``KeyService``
rules with an in-memory store that only answers the hot-path lookup. They pin
the table; ``test_envoy_e2e.py`` is the proof that Envoy reads it as meant.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

import pytest
from authsvc_client._decision import MESSAGES
from authsvc_client._http import Credentials
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.rpc import code_pb2  # type: ignore[import-untyped]  # googleapis-common-protos ships no stubs

from authsvc.config import DEFAULT_CATALOG, Settings, load_catalog
from authsvc.core.authorizer import Authorizer
from authsvc.core.errors import Unavailable
from authsvc.core.keyformat import KeyFormat
from authsvc.core.keys import Decision, Principal, RateLimit, Reason
from authsvc.core.ports import Found, NewKey
from authsvc.extauthz import AuthorizationAdapter, RoutePolicy
from authsvc.storage.memory import InMemoryStore

FORMAT = KeyFormat("authsvc")
POLICY = Settings().http_policy
ROUTES = RoutePolicy.from_settings(Settings())
PRINCIPAL = Principal(
    key_id="key-1", org_id="acme", user_id="alice", scopes=("read", "write"), key_prefix="authsvc_abcd", key_name="ci"
)


class LookupStore(InMemoryStore):
    """The in-memory store, counting hot-path lookups, and failing them like an unreachable database when ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.lookups = 0

    def add(self, scopes: tuple[str, ...]) -> str:
        issued = FORMAT.generate()
        self.insert(
            NewKey("acme", "ci", issued.display_prefix, issued.digest, scopes, "alice", None, 0), datetime.now(UTC)
        )
        return issued.secret

    async def find_by_digest(self, digest: bytes) -> Found:
        self.lookups += 1
        if self.down:
            raise Unavailable("the key store did not answer in time")
        return await super().find_by_digest(digest)


@pytest.fixture
def store() -> LookupStore:
    return LookupStore()


def make_adapter(settings: Settings | None = None, store: LookupStore | None = None) -> AuthorizationAdapter:
    """The adapter as ``authsvc serve`` builds it, over the real core and an in-memory store."""
    settings = settings or Settings()
    authorizer = Authorizer(store or LookupStore(), load_catalog(DEFAULT_CATALOG), FORMAT, clock=time.time)
    return AuthorizationAdapter(authorizer, RoutePolicy.from_settings(settings))


@pytest.fixture
def adapter(store: LookupStore) -> AuthorizationAdapter:
    return make_adapter(store=store)


def check_request(
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    context: Mapping[str, str] | None = None,
    raw_headers: Sequence[tuple[str, str]] = (),
) -> ext.CheckRequest:
    request = ext.CheckRequest()
    http = request.attributes.request.http
    http.method = method
    http.path = "/items"
    http.headers.update({":path": "/items", ":method": method, **(headers or {})})
    for name, value in raw_headers:  # Envoy's encode_raw_headers form: one entry per header line
        http.header_map.headers.add(key=name, raw_value=value.encode())
    request.attributes.context_extensions.update(context or {})
    return request


def header_dict(options: Sequence[HeaderValueOption]) -> dict[str, str]:
    out = {o.header.key: o.header.value for o in options}
    assert len(out) == len(options), "a header is set twice"
    assert all(o.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for o in options)
    return out


# -- Decision -> CheckResponse ----------------------------------------------

DENIALS = [
    # reason, HTTP status, google.rpc code, body code, challenge?
    (Reason.MISSING_KEY, 401, code_pb2.UNAUTHENTICATED, "missing_key", True),
    (Reason.MALFORMED_KEY, 401, code_pb2.UNAUTHENTICATED, "malformed_key", True),
    (Reason.UNKNOWN_KEY, 401, code_pb2.UNAUTHENTICATED, "unknown_key", True),
    (Reason.REVOKED, 401, code_pb2.UNAUTHENTICATED, "revoked", True),
    (Reason.EXPIRED, 401, code_pb2.UNAUTHENTICATED, "expired", True),
    (Reason.INSUFFICIENT_SCOPE, 403, code_pb2.PERMISSION_DENIED, "insufficient_scope", False),
    (Reason.RATE_LIMITED, 429, code_pb2.RESOURCE_EXHAUSTED, "rate_limited", False),
]


def test_the_denial_table_covers_every_denying_reason() -> None:
    assert {row[0] for row in DENIALS} == set(Reason) - {Reason.UNSPECIFIED, Reason.OK}


@pytest.mark.parametrize(("reason", "http_status", "rpc_code", "body_code", "challenge"), DENIALS)
def test_each_denial_carries_its_http_status_rpc_code_body_and_challenge(
    adapter: AuthorizationAdapter, reason: Reason, http_status: int, rpc_code: int, body_code: str, challenge: bool
) -> None:
    response = adapter.denied(Decision(reason, PRINCIPAL if reason is not Reason.MISSING_KEY else None))
    assert response.status.code == rpc_code
    assert response.HasField("denied_response")
    # Envoy turns a denial without an explicit status into 403: it must be set.
    assert response.denied_response.status.code == http_status
    headers = header_dict(response.denied_response.headers)
    assert headers["content-type"] == "application/json"
    assert ("www-authenticate" in headers) is challenge
    if challenge:
        assert headers["www-authenticate"] == 'ApiKey realm="authsvc", header="x-api-key"'
    assert json.loads(response.denied_response.body) == {"error": {"code": body_code, "message": MESSAGES[reason]}}
    assert not response.HasField("ok_response")


def test_429_says_when_to_retry_and_where_the_key_stands() -> None:
    decision = Decision(Reason.RATE_LIMITED, PRINCIPAL, RateLimit(limit=100, remaining=0, reset_seconds=17))
    headers = header_dict(make_adapter().denied(decision).denied_response.headers)
    assert headers["retry-after"] == "17"
    assert (headers["ratelimit-limit"], headers["ratelimit-remaining"], headers["ratelimit-reset"]) == (
        "100",
        "0",
        "17",
    )


def test_429_without_a_window_still_has_retry_after() -> None:
    headers = header_dict(make_adapter().denied(Decision(Reason.RATE_LIMITED, PRINCIPAL)).denied_response.headers)
    assert headers["retry-after"] == "1"


def test_allowed_under_a_rate_limit_tells_the_client_its_budget() -> None:
    decision = Decision(Reason.OK, PRINCIPAL, RateLimit(limit=100, remaining=42, reset_seconds=9))
    ok = make_adapter().allowed(decision, []).ok_response
    assert header_dict(ok.response_headers_to_add) == {
        "ratelimit-limit": "100",
        "ratelimit-remaining": "42",
        "ratelimit-reset": "9",
    }


def test_the_challenge_names_the_configured_key_header() -> None:
    adapter = make_adapter(Settings(key_headers=("x-token",)))
    headers = header_dict(adapter.denied(Decision(Reason.MISSING_KEY)).denied_response.headers)
    assert headers["www-authenticate"] == 'ApiKey realm="authsvc", header="x-token"'


def test_allowed_sets_identity_headers_metadata_and_strips_what_it_is_told() -> None:
    response = make_adapter().allowed(
        Decision(Reason.OK, PRINCIPAL), ["x-authsvc-org-id", "x-authsvc-role", "x-api-key"]
    )
    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    assert header_dict(ok.headers) == {
        "x-authsvc-org-id": "acme",
        "x-authsvc-key-id": "key-1",
        "x-authsvc-user-id": "alice",
        "x-authsvc-scopes": "read write",
    }
    # A forged header with an identity name is overwritten, not removed:
    # Envoy removes after it sets, so removing it would drop the real value.
    assert list(ok.headers_to_remove) == ["x-authsvc-role", "x-api-key"]
    assert dict(response.dynamic_metadata) == {
        "org_id": "acme",
        "key_id": "key-1",
        "user_id": "alice",
        "scopes": "read write",
    }


def test_labels_become_identity_headers_under_the_prefix() -> None:
    labelled = Principal(
        key_id="key-1",
        org_id="acme",
        user_id="alice",
        scopes=("read",),
        key_prefix="authsvc_abcd",
        key_name="ci",
        labels=(("env", "prod"), ("tier", "gold")),
    )
    ok = make_adapter().allowed(Decision(Reason.OK, labelled), ["x-authsvc-label-tier", "x-authsvc-label-x"])
    headers = header_dict(ok.ok_response.headers)
    assert (headers["x-authsvc-label-env"], headers["x-authsvc-label-tier"]) == ("prod", "gold")
    # The forged label of the same name is overwritten; another forged label is removed.
    assert list(ok.ok_response.headers_to_remove) == ["x-authsvc-label-x"]


def test_identity_header_names_follow_the_configured_prefix() -> None:
    adapter = make_adapter(Settings(identity_header_prefix="x-auth-"))
    ok = adapter.allowed(Decision(Reason.OK, PRINCIPAL), []).ok_response
    assert set(header_dict(ok.headers)) == {"x-auth-org-id", "x-auth-key-id", "x-auth-user-id", "x-auth-scopes"}


# -- headers -> key -----------------------------------------------------------

K1, K2 = FORMAT.generate().secret, FORMAT.generate().secret


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-api-key": K1}, Credentials(K1, ("x-api-key",))),
        ({"x-api-key": f"  {K1} "}, Credentials(K1, ("x-api-key",))),
        ({"authorization": f"ApiKey {K1}"}, Credentials(K1, ("authorization",))),
        ({"authorization": f"apikey {K1}"}, Credentials(K1, ("authorization",))),
        ({"authorization": f"Bearer {K1}"}, Credentials("", ())),  # another scheme is not ours: left alone
        ({"x-api-key": K1, "authorization": f"ApiKey {K1}"}, Credentials(K1, ("x-api-key", "authorization"))),
        ({"x-api-key": K1, "authorization": f"ApiKey {K2}"}, Credentials("", ("x-api-key", "authorization"), True)),
        ({"x-api-key": f"{K1},{K1}"}, Credentials(K1, ("x-api-key",))),  # a repeated header, joined by Envoy
        ({"x-api-key": f"{K1},{K2}"}, Credentials("", ("x-api-key",), True)),
        ({"x-api-key": ""}, Credentials("", ("x-api-key",))),  # empty, but still stripped
        ({"authorization": "ApiKey"}, Credentials("", ("authorization",))),
        ({}, Credentials("", ())),
    ],
    ids=[
        "x-api-key",
        "x-api-key-padded",
        "authorization-apikey",
        "scheme-case-insensitive",
        "bearer-ignored",
        "same-key-both-forms",
        "different-keys",
        "same-key-repeated",
        "different-keys-repeated",
        "empty-header",
        "scheme-without-key",
        "nothing",
    ],
)
def test_key_extraction(headers: dict[str, str], expected: Credentials) -> None:
    assert POLICY.credentials(headers) == expected


def test_configured_key_headers_replace_x_api_key() -> None:
    policy = Settings(key_headers=("x-token", "x-key")).http_policy
    assert policy.credentials({"x-api-key": K1, "x-key": K2}) == Credentials(K2, ("x-key",))


def test_an_empty_authorization_scheme_disables_the_authorization_form() -> None:
    policy = Settings(authorization_scheme="").http_policy
    assert policy.credentials({"authorization": f"ApiKey {K1}"}) == Credentials("", ())


def test_credentials_repr_never_shows_the_key() -> None:
    assert K1 not in repr(Credentials(K1, ("x-api-key",)))


# -- route -> scope -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "context", "expected"),
    [
        ("GET", {}, "read"),
        ("HEAD", {}, "read"),
        ("OPTIONS", {}, "read"),
        ("get", {}, "read"),
        ("POST", {}, "write"),
        ("PUT", {}, "write"),
        ("PATCH", {}, "write"),
        ("DELETE", {}, "write"),
        ("GET", {"scope": "write"}, "write"),  # the route's own scope wins over the method rules
        ("POST", {"scope": "read"}, "read"),
        ("POST", {"scope": " read "}, "read"),
    ],
)
def test_required_scope(method: str, context: dict[str, str], expected: str) -> None:
    assert ROUTES.required_scope(method, context) == expected


# -- Check, end to end inside the process ---------------------------------------


async def test_check_allows_a_good_key_and_strips_it_and_forged_identity(
    adapter: AuthorizationAdapter, store: LookupStore
) -> None:
    secret = store.add(("read",))
    response = await adapter.Check(
        check_request(headers={"x-api-key": secret, "x-authsvc-org-id": "evil", "x-authsvc-admin": "1"})
    )
    assert response.status.code == code_pb2.OK
    ok = response.ok_response
    assert header_dict(ok.headers)["x-authsvc-org-id"] == "acme"
    assert sorted(ok.headers_to_remove) == ["x-api-key", "x-authsvc-admin"]


async def test_check_reads_envoys_raw_header_map_too(adapter: AuthorizationAdapter, store: LookupStore) -> None:
    secret = store.add(("read",))
    request = check_request(
        raw_headers=[("x-api-key", secret), ("x-api-key", secret), ("authorization", f"ApiKey {secret}")]
    )
    request.attributes.request.http.ClearField("headers")
    response = await adapter.Check(request)
    assert response.status.code == code_pb2.OK
    assert sorted(response.ok_response.headers_to_remove) == ["authorization", "x-api-key"]


@pytest.mark.parametrize(
    ("method", "context", "scopes", "status"),
    [
        ("GET", {}, ("read",), 200),
        ("POST", {}, ("read",), 403),
        ("POST", {}, ("write",), 200),
        ("GET", {"scope": "write"}, ("read",), 403),
        ("GET", {"scope": "write"}, ("write",), 200),
    ],
)
async def test_check_applies_the_resolved_scope(
    adapter: AuthorizationAdapter,
    store: LookupStore,
    method: str,
    context: dict[str, str],
    scopes: tuple[str, ...],
    status: int,
) -> None:
    secret = store.add(scopes)
    response = await adapter.Check(check_request(method, {"x-api-key": secret}, context))
    if status == 200:
        assert response.status.code == code_pb2.OK
    else:
        assert response.denied_response.status.code == status


async def test_check_denies_two_different_keys_without_looking_either_up(
    adapter: AuthorizationAdapter, store: LookupStore
) -> None:
    first, second = store.add(("read",)), store.add(("read",))
    response = await adapter.Check(check_request(headers={"x-api-key": first, "authorization": f"ApiKey {second}"}))
    assert response.denied_response.status.code == 401
    assert json.loads(response.denied_response.body)["error"]["code"] == "malformed_key"
    assert store.lookups == 0
    serialized = response.SerializeToString()
    assert first.encode() not in serialized
    assert second.encode() not in serialized


@pytest.mark.parametrize("public", ["true", "TRUE", " true "])
async def test_public_route_allows_without_a_key_and_adds_no_identity(
    adapter: AuthorizationAdapter, public: str
) -> None:
    response = await adapter.Check(check_request("POST", {"x-authsvc-org-id": "evil"}, {"public": public}))
    assert response.status.code == code_pb2.OK
    assert list(response.ok_response.headers) == []
    assert list(response.ok_response.headers_to_remove) == ["x-authsvc-org-id"]


async def test_public_route_strips_every_key_even_conflicting_ones(adapter: AuthorizationAdapter) -> None:
    response = await adapter.Check(
        check_request(headers={"x-api-key": K1, "authorization": f"ApiKey {K2}"}, context={"public": "true"})
    )
    assert response.status.code == code_pb2.OK
    assert sorted(response.ok_response.headers_to_remove) == ["authorization", "x-api-key"]


@pytest.mark.parametrize("value", ["false", "yes", "1", ""])
async def test_only_public_true_makes_a_route_public(adapter: AuthorizationAdapter, value: str) -> None:
    response = await adapter.Check(check_request(context={"public": value}))
    assert response.denied_response.status.code == 401


async def test_unreachable_store_raises_unavailable_never_allows(
    adapter: AuthorizationAdapter, store: LookupStore
) -> None:
    """The gRPC wrapper turns this into UNAVAILABLE, so Envoy applies status_on_error (503)."""
    secret = store.add(("read",))
    store.down = True
    with pytest.raises(Unavailable):
        await adapter.Check(check_request(headers={"x-api-key": secret}))


@pytest.mark.parametrize(
    ("method_scopes", "context"),
    [
        (Settings.method_scopes, {"scope": ""}),  # an empty route scope (say, a template left blank)
        (Settings.method_scopes, {"scope": "  "}),
        ((("GET", "read"),), {}),  # method rules without a default, built around Settings.from_env's check
    ],
)
async def test_a_route_without_a_scope_is_a_500_never_an_allow(
    store: LookupStore,
    caplog: pytest.LogCaptureFixture,
    method_scopes: tuple[tuple[str, str], ...],
    context: dict[str, str],
) -> None:
    """A read-only key must not DELETE just because nobody wrote down a scope for the route."""
    adapter = make_adapter(Settings(method_scopes=method_scopes), store)
    secret = store.add(("read",))
    with caplog.at_level(logging.ERROR, logger="authsvc.extauthz"):
        response = await adapter.Check(check_request(method="DELETE", headers={"x-api-key": secret}, context=context))
    assert response.status.code != code_pb2.OK
    assert response.denied_response.status.code == 500
    assert json.loads(response.denied_response.body)["error"]["code"] == "misconfigured_route"
    assert "requires no scope" in caplog.text


async def test_a_route_scope_missing_from_the_catalog_is_a_500_and_logged(
    adapter: AuthorizationAdapter, store: LookupStore, caplog: pytest.LogCaptureFixture
) -> None:
    secret = store.add(("read", "write"))
    with caplog.at_level(logging.ERROR, logger="authsvc.extauthz"):
        response = await adapter.Check(
            check_request(headers={"x-api-key": secret}, context={"scope": "projects:admin"})
        )
    assert response.status.code != code_pb2.OK
    assert response.denied_response.status.code == 500
    body = json.loads(response.denied_response.body)
    assert body["error"]["code"] == "misconfigured_route"
    assert "projects:admin" not in response.denied_response.body  # the catalog stays private ...
    assert "projects:admin" in caplog.text  # ... the operator's log names it
    assert secret not in caplog.text
