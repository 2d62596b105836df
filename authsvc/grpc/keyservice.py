"""The authsvc.v1.KeyService adapter: messages in, core calls, messages out.

Management calls go to the ``KeyManager``, Authorize to the ``Authorizer``.
Errors are not handled here; the server's handler wrapper maps them
(``authsvc.grpc.status``). Management methods get the ``Caller`` the
wrapper authenticated and pass it on; the core never sees metadata.
"""

from __future__ import annotations

from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.core.authorizer import NOT_CACHEABLE, Authorizer, Pending
from authsvc.core.keyformat import digest
from authsvc.core.keys import Caller, Decision, Reason
from authsvc.core.manager import KeyManager
from authsvc.grpc import convert
from authsvc.grpc.watch import WatchAdapter
from authsvc.memo import ResponseMemo

View = tuple[float | None, bool]
#: The memo variant of answers ``check`` gave from the cache (see ``Authorize``).
FROM_CACHE = None


def _authorize_bytes(decision: Decision, view: View | None) -> bytes:
    return convert.authorize_response_for_client(decision, view or NOT_CACHEABLE).SerializeToString()


class KeyServiceAdapter:
    def __init__(self, manager: KeyManager, authorizer: Authorizer, watch: WatchAdapter) -> None:
        self._manager = manager
        self._authorizer = authorizer
        self.WatchDecisions = watch.WatchDecisions
        # Serialized once per principal too: the gRPC server passes bytes through (``authsvc.grpc.server``).
        self._responses: ResponseMemo[View | None, bytes] = ResponseMemo(_authorize_bytes)

    async def CreateKey(self, request: pb.CreateKeyRequest, caller: Caller) -> pb.CreateKeyResponse:
        expire = convert.from_timestamp(request.expire_time, "expire_time") if request.HasField("expire_time") else None
        created = await self._manager.create_key(
            request.org_id,
            convert.actor(request.actor),
            request.name,
            list(request.scopes),
            expire,
            request.rate_limit,
            dict(request.labels),
            caller=caller,
        )
        return pb.CreateKeyResponse(key=convert.api_key(created.key, self._manager.now()), secret=created.secret)

    async def GetKey(self, request: pb.GetKeyRequest, caller: Caller) -> pb.GetKeyResponse:
        key = await self._manager.get_key(request.org_id, convert.actor(request.actor), request.key_id, caller=caller)
        return pb.GetKeyResponse(key=convert.api_key(key, self._manager.now()))

    async def ListKeys(self, request: pb.ListKeysRequest, caller: Caller) -> pb.ListKeysResponse:
        state = request.state if request.HasField("state") else None
        page, number, limit = await self._manager.list_keys(
            request.org_id, convert.actor(request.actor), request.page, request.limit, state, caller=caller
        )
        now = self._manager.now()
        return pb.ListKeysResponse(
            data=[convert.api_key(k, now) for k in page.keys], total=page.total, page=number, limit=limit
        )

    async def RevokeKey(self, request: pb.RevokeKeyRequest, caller: Caller) -> pb.RevokeKeyResponse:
        key = await self._manager.revoke_key(
            request.org_id, convert.actor(request.actor), request.key_id, request.reason, caller=caller
        )
        return pb.RevokeKeyResponse(key=convert.api_key(key, self._manager.now()))

    async def RotateKey(self, request: pb.RotateKeyRequest, caller: Caller) -> pb.RotateKeyResponse:
        grace = convert.from_duration(request.grace_period, "grace_period")
        expire = convert.from_timestamp(request.expire_time, "expire_time") if request.HasField("expire_time") else None
        rotated = await self._manager.rotate_key(
            request.org_id, convert.actor(request.actor), request.key_id, grace, request.reason, expire, caller=caller
        )
        now = self._manager.now()
        return pb.RotateKeyResponse(
            key=convert.api_key(rotated.key, now),
            secret=rotated.secret,
            previous=convert.api_key(rotated.previous, now),
        )

    async def UpdateKey(self, request: pb.UpdateKeyRequest, caller: Caller) -> pb.UpdateKeyResponse:
        key = await self._manager.update_key(
            request.org_id,
            convert.actor(request.actor),
            request.key_id,
            list(request.update_mask.paths),
            request.name,
            dict(request.labels),
            caller=caller,
        )
        return pb.UpdateKeyResponse(key=convert.api_key(key, self._manager.now()))

    async def RevokeKeys(self, request: pb.RevokeKeysRequest, caller: Caller) -> pb.RevokeKeysResponse:
        keys = await self._manager.revoke_keys(
            request.org_id, convert.actor(request.actor), request.created_by, request.reason, caller=caller
        )
        now = self._manager.now()
        return pb.RevokeKeysResponse(keys=[convert.api_key(k, now) for k in keys])

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, caller: Caller) -> pb.ListAuditEventsResponse:
        start = convert.from_timestamp(request.start_time, "start_time") if request.HasField("start_time") else None
        end = convert.from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else None
        events, token = await self._manager.list_audit_events(
            request.org_id,
            convert.actor(request.actor),
            key_id=request.key_id,
            action=request.action,
            start_time=start,
            end_time=end,
            page_size=request.page_size,
            page_token=request.page_token,
            caller=caller,
        )
        return pb.ListAuditEventsResponse(events=[convert.audit_event(e) for e in events], next_page_token=token)

    async def ReportLeakedKeys(self, request: pb.ReportLeakedKeysRequest, address: str) -> pb.ReportLeakedKeysResponse:
        report = await self._manager.report_leaked_keys(
            list(request.keys), request.source, request.url, address=address
        )
        return pb.ReportLeakedKeysResponse(
            revoked=report.revoked, already_revoked=report.already_revoked, unknown=report.unknown
        )

    async def GetKeyUsage(self, request: pb.GetKeyUsageRequest, caller: Caller) -> pb.GetKeyUsageResponse:
        usage = await self._manager.get_key_usage(
            request.org_id, convert.actor(request.actor), request.key_id, request.days, caller=caller
        )
        return pb.GetKeyUsageResponse(
            days=[
                pb.KeyUsageDay(date=day.isoformat(), allowed=a, denied=d, rate_limited=r)
                for day, (a, d, r) in usage.days
            ],
            last_used_time=convert.timestamp(usage.last_used_time),
        )

    async def Authorize(self, request: pb.AuthorizeRequest) -> bytes:
        """The serialized ``AuthorizeResponse``.

        A hit (no await) is keyed ``FROM_CACHE``: what a client cache may keep
        of it depends on the cached grant alone, so the view is read back only
        when the response for that principal is first built. A lookup's view
        is read back every time (the cache may not have kept its answer).
        """
        key = request.key
        authorizer = self._authorizer
        answer = authorizer.check(key, request.required_scope)
        if isinstance(answer, Pending):  # a miss or a rate limit: the only await on this path
            decision = await authorizer.complete(answer)
            return self._responses(decision, authorizer.client_view(answer.digest))
        response = self._responses.get(answer, FROM_CACHE)
        if response is None:
            identified = answer.principal is not None or answer.reason is Reason.UNKNOWN_KEY
            view = authorizer.client_view(digest(key)) if identified else NOT_CACHEABLE
            response = self._responses.put(answer, FROM_CACHE, _authorize_bytes(answer, view))
        return response
