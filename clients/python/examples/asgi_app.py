"""A tiny raw ASGI application protected by authsvc's ``AuthsvcMiddleware``.

Run it against a running authsvc (``authsvc serve`` listens on localhost:50051)
with any ASGI server, for example:

    pip install uvicorn
    AUTHSVC_TARGET=localhost:50051 uvicorn --app-dir clients/python/examples asgi_app:app --port 8000
    # or: python clients/python/examples/asgi_app.py   (uses uvicorn too)

Then, with a key created as in the main README:

    curl -i localhost:8000/healthz                                  # 200, public
    curl -i localhost:8000/projects                                 # 401 + WWW-Authenticate
    curl -i -H "x-api-key: $KEY" localhost:8000/projects            # 200 with the principal
    curl -i -X POST -H "authorization: ApiKey $KEY" localhost:8000/projects   # 403 unless the key has write

No framework is needed; with Starlette or FastAPI the principal is
``request.state.authsvc_principal``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from authsvc_client import AsyncClient, AuthsvcMiddleware, current_principal

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def projects(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # lifespan and websockets are not used here
    principal = current_principal()  # same as scope["state"]["authsvc_principal"]
    body = json.dumps(
        {
            "path": scope["path"],
            "method": scope["method"],
            "org_id": principal.org_id if principal else None,
            "user_id": principal.user_id if principal else None,
            "scopes": list(principal.scopes) if principal else [],
            # The key header never gets here: the middleware removed it.
            "saw_key_header": any(name == b"x-api-key" for name, _ in scope["headers"]),
        }
    ).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


app = AuthsvcMiddleware(
    projects,
    client=AsyncClient(os.environ.get("AUTHSVC_TARGET", "localhost:50051")),
    scopes=[
        ("GET", "/", "read"),
        ("HEAD", "/", "read"),
        ("*", "/", "write"),  # every other method changes something
    ],
    public=["/healthz"],
)


if __name__ == "__main__":
    try:
        import uvicorn  # type: ignore[import-not-found]  # optional: any ASGI server will do
    except ImportError:
        raise SystemExit("this example needs an ASGI server: pip install uvicorn") from None
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
