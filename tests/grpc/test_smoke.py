"""The fixtures themselves: a real server answers over a real channel."""

from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc

from tests.support import ADMIN, new_org


async def test_created_key_authorizes_over_grpc(stub: authsvc_pb2_grpc.KeyServiceStub) -> None:
    created = await stub.CreateKey(pb.CreateKeyRequest(org_id=new_org(), actor=ADMIN, name="ci", scopes=["read"]))
    reply = await stub.Authorize(pb.AuthorizeRequest(key=created.secret, required_scope="read"))
    assert reply.allowed and reply.http_status == 200
    assert reply.principal.key_id == created.key.id
