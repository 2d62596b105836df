"""The always-OK Envoy ext_authz baseline: ``envoy.service.auth.v3.Authorization/Check``.

Parses Envoy's CheckRequest like authsvc does and answers OK without
looking at it. Envoy in front of this server vs in front of authsvc's Check
isolates what authsvc's decision costs on the real gateway path.

    python -m bench.ok_check_server --listen 127.0.0.1:50071 --workers 2 [--base-port P]
"""

from __future__ import annotations

import sys

from envoy.service.auth.v3 import external_auth_pb2 as ext
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]  # no stubs shipped

from bench import serving

RESPONSE = ext.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ext.OkHttpResponse())


handler = serving.constant_handler("envoy.service.auth.v3.Authorization", "Check", ext.CheckRequest, RESPONSE)


if __name__ == "__main__":
    sys.exit(serving.main("bench.ok_check_server", handler, __doc__ or ""))
