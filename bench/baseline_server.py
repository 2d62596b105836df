"""The empty-handler baseline: ``authsvc.v1.KeyService/Authorize`` that does nothing.

Same method path, same request and response messages as authsvc, so the
load generator's traffic is byte-for-byte the same: it parses the
AuthorizeRequest and returns one fixed AuthorizeResponse shaped like an
allowed cache hit (principal, scopes). What authsvc costs on top of this is
the price of authorization itself.

    python -m bench.baseline_server --listen 127.0.0.1:50061 --workers 2 [--base-port P]
"""

from __future__ import annotations

import sys

from authsvc_client.v1 import authsvc_pb2 as pb

from bench import serving

RESPONSE = pb.AuthorizeResponse(
    allowed=True,
    reason=pb.REASON_OK,
    http_status=200,
    message="allowed",
    principal=pb.Principal(
        key_id="00000000-0000-4000-8000-000000000000",
        org_id="org-bench-000000",
        user_id="bench-user",
        scopes=["read", "write"],
        key_prefix="authsvc_XXXX",
        key_name="bench key",
    ),
)


handler = serving.constant_handler("authsvc.v1.KeyService", "Authorize", pb.AuthorizeRequest, RESPONSE)


if __name__ == "__main__":
    sys.exit(serving.main("bench.baseline_server", handler, __doc__ or ""))
