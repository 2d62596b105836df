"""The authsvc.v1.KeyService adapter: messages in, core calls, messages out.

Errors are not handled here; the server's handler wrapper maps them
(``authsvc.grpc.status``).
"""

from __future__ import annotations

from authsvc_client.v1 import authsvc_pb2 as pb

from authsvc.grpc import convert
from authsvc.service import KeyService, utcnow


class KeyServiceAdapter:
    def __init__(self, service: KeyService) -> None:
        self._service = service
        self._responses = convert.AuthorizeResponses()

    async def CreateKey(self, request: pb.CreateKeyRequest) -> pb.CreateKeyResponse:
        expire = convert.from_timestamp(request.expire_time, "expire_time") if request.HasField("expire_time") else None
        created = await self._service.create_key(
            request.org_id, convert.actor(request.actor), request.name, list(request.scopes), expire, request.rate_limit
        )
        return pb.CreateKeyResponse(key=convert.api_key(created.key, utcnow()), secret=created.secret)

    async def GetKey(self, request: pb.GetKeyRequest) -> pb.GetKeyResponse:
        key = await self._service.get_key(request.org_id, convert.actor(request.actor), request.key_id)
        return pb.GetKeyResponse(key=convert.api_key(key, utcnow()))

    async def ListKeys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
        state = request.state if request.HasField("state") else None
        page, number, limit = await self._service.list_keys(
            request.org_id, convert.actor(request.actor), request.page, request.limit, state
        )
        now = utcnow()
        return pb.ListKeysResponse(
            data=[convert.api_key(k, now) for k in page.keys], total=page.total, page=number, limit=limit
        )

    async def RevokeKey(self, request: pb.RevokeKeyRequest) -> pb.RevokeKeyResponse:
        key = await self._service.revoke_key(
            request.org_id, convert.actor(request.actor), request.key_id, request.reason
        )
        return pb.RevokeKeyResponse(key=convert.api_key(key, utcnow()))

    async def Authorize(self, request: pb.AuthorizeRequest) -> pb.AuthorizeResponse:
        return self._responses(await self._service.authorize(request.key, request.required_scope))
