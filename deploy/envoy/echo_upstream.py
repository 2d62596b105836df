"""A sample upstream for trying authsvc behind Envoy: answers every request with the headers it received, as JSON.

Run it next to ``envoy -c deploy/envoy/envoy.yaml`` to see exactly what a
protected service gets: the ``x-authsvc-*`` identity headers, and never the
key. Standard library only, so it runs anywhere Python does.

    python deploy/envoy/echo_upstream.py [--port 8000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream connections expect

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)  # drain the body so the connection stays usable
        body = (
            json.dumps(
                {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}},
                indent=2,
                sort_keys=True,
            ).encode()
            + b"\n"
        )  # a terminal prompt after `curl` starts on its own line
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: Envoy's access log already records every request."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), Echo)
    print(f"echo upstream on http://{args.host}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the way to stop it
        server.serve_forever()


if __name__ == "__main__":
    main()
