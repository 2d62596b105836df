"""Domain types to and from authsvc.v1 messages."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

from authsvc_client.v1 import authsvc_pb2 as pb
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from authsvc.core import validation
from authsvc.core.errors import InvalidArgument
from authsvc.core.keys import Actor, ApiKey, Decision, Principal, Reason
from authsvc.core.ports import AuditEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# google.protobuf.Timestamp's own range, 0001-01-01T00:00:00Z to
# 9999-12-31T23:59:59.999999999Z: exactly what datetime can hold.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_MAX_NANOS = 999_999_999


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def from_timestamp(ts: Timestamp, field: str) -> datetime:
    """The instant ``ts`` names, truncated to whole microseconds (what PostgreSQL keeps).

    Checked here, before the core sees it, because protobuf's own conversion
    normalises nanos outside 0..999,999,999 into the seconds (a different
    instant than the client meant) and fails with assorted errors outside
    datetime's range. Truncating rather than refusing sub-microsecond digits
    lets a client send its nanosecond clock as it is. Whether the instant can
    be stored at all (not ±infinity to the driver) is
    ``validation.timestamp``'s call.
    """
    if not 0 <= ts.nanos <= _MAX_NANOS:
        raise InvalidArgument(f"{field}.nanos must be between 0 and {_MAX_NANOS}, got {ts.nanos}")
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS:
        raise InvalidArgument(f"{field} {validation.TIMESTAMP_RANGE}, got seconds={ts.seconds}")
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def from_duration(value: Duration, field: str) -> timedelta:
    # A Duration's seconds and nanos must agree in sign; a mixed one is not a duration.
    if (value.seconds < 0 < value.nanos) or (value.nanos < 0 < value.seconds) or abs(value.nanos) > 999_999_999:
        raise InvalidArgument(f"{field} is not a valid duration")
    try:
        return value.ToTimedelta()
    except (ValueError, OverflowError):
        raise InvalidArgument(f"{field} is not a valid duration") from None


def actor(message: pb.Actor) -> Actor:
    return Actor(user_id=message.user_id, role=validation.role(message.role))


def api_key(key: ApiKey, now: datetime) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        org_id=key.org_id,
        name=key.name,
        prefix=key.prefix,
        scopes=key.scopes,
        created_by=key.created_by,
        create_time=timestamp(key.create_time),
        expire_time=timestamp(key.expire_time),
        revoke_time=timestamp(key.revoke_time),
        revoked_by=key.revoked_by,
        revoke_reason=key.revoke_reason,
        last_used_time=timestamp(key.last_used_time),
        state=int(key.state(now)),  # type: ignore[arg-type]  # IntEnum values match the proto enum
        rate_limit=key.rate_limit,
        labels=dict(key.labels),
        rotated_to=key.rotated_to,
        rotated_from=key.rotated_from,
    )


def audit_event(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=event.id,
        time=timestamp(event.time),
        org_id=event.org_id,
        actor=pb.Actor(user_id=event.actor.user_id, role=int(event.actor.role)),  # type: ignore[arg-type]
        caller=event.actor.caller or "",
        action=event.action,
        key_id=event.key_id or "",
        outcome=event.outcome,
        details={
            name: value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            for name, value in event.detail.items()
            if value is not None
        },
        hash=event.hash,
    )


def principal(value: Principal) -> pb.Principal:
    message = pb.Principal()
    _fill_principal(message, value)
    return message


def _fill_principal(message: pb.Principal, value: Principal) -> None:
    # Field by field into the message in place: a nested message passed to a
    # constructor (or CopyFrom) is built twice, and an empty map passed as
    # ``labels={}`` costs as much as the rest together (upb; every miss builds one).
    message.key_id = value.key_id
    message.org_id = value.org_id
    message.user_id = value.user_id
    message.scopes.extend(value.scopes)
    message.key_prefix = value.key_prefix
    message.key_name = value.key_name
    if value.labels:
        message.labels.update(value.labels)


def authorize_response(decision: Decision, _variant: object = None) -> pb.AuthorizeResponse:
    """A fresh response for ``decision``; the hot path reuses them through ``authsvc.memo``."""
    response = pb.AuthorizeResponse(
        allowed=decision.allowed,
        reason=int(decision.reason),  # type: ignore[arg-type]
        http_status=decision.http_status,
        message=decision.message,
    )
    if decision.principal is not None:
        _fill_principal(response.principal, decision.principal)
    rl = decision.rate_limit
    if rl is not None:
        limits = response.rate_limit
        limits.SetInParent()  # present even if every count were zero
        limits.limit, limits.remaining, limits.reset_seconds = rl.limit, rl.remaining, rl.reset_seconds
    return response


_MAX_TIMESTAMP_MICROS = 253402300799_999999  # 9999-12-31T23:59:59.999999Z


def authorize_response_for_client(decision: Decision, view: tuple[float | None, bool]) -> pb.AuthorizeResponse:
    """``authorize_response`` plus ``expire_time`` and ``cacheable`` for a client cache (``Authorizer.client_view``)."""
    response = authorize_response(decision)
    expire_at, cacheable = view
    # Only an identified key's answer, or an unknown key's, is worth keeping; never a rate-limited answer.
    response.cacheable = cacheable and decision.rate_limit is None and (
        decision.principal is not None or decision.reason is Reason.UNKNOWN_KEY
    )
    if expire_at is not None and decision.principal is not None:
        # Rounded down (a client expires it no later than the server does), within Timestamp's range.
        response.expire_time.FromMicroseconds(min(math.floor(expire_at * 1_000_000), _MAX_TIMESTAMP_MICROS))
    return response
