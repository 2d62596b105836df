"""``authsvc serve | migrate | healthcheck | scan | audit``: the operator's entry point.

Start-up problems (bad settings, unreachable database, port in use) print
one line naming what to change and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from authsvc import logs
from authsvc.config import Settings
from authsvc.core.errors import ConfigError, Unavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="authsvc", description="API-key authorization service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server (KeyService, Envoy Check, health, reflection)")
    serve.add_argument("--listen", help="host:port (default: AUTHSVC_LISTEN or 127.0.0.1:50051)")
    serve.add_argument("--workers", type=int, help="server processes; 0 = one per core (default: AUTHSVC_WORKERS or 0)")
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    health = commands.add_parser("healthcheck", help="exit 0 if the server at --target reports SERVING")
    health.add_argument("--target", help="host:port (default: AUTHSVC_LISTEN, with 0.0.0.0 read as 127.0.0.1)")
    scan = commands.add_parser(
        "scan", help="find authsvc keys (valid prefix and checksum) in files, directories or stdin; exit 1 if any"
    )
    scan.add_argument(
        "paths", nargs="*", metavar="PATH", help="file or directory (recursively, .git skipped); - or none: stdin"
    )
    scan.add_argument(
        "--prefix",
        action="append",
        default=[],
        help="also look for keys with this prefix (repeatable); AUTHSVC_KEY_PREFIX is always looked for",
    )
    audit = commands.add_parser("audit", help="check or prune the tamper-evident audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="walk the hash chains; print 'ok <count>' or the first broken event"
    )
    verify.add_argument("--org", help="only this organization's chain")
    audit_commands.add_parser("prune", help="delete events older than AUTHSVC_AUDIT_RETENTION_DAYS, in small batches")
    health.add_argument("--ca-file", help="CA certificates to trust (default with TLS: AUTHSVC_TLS_CERT_FILE)")
    health.add_argument("--cert-file", help="client certificate for mTLS (default with mTLS: AUTHSVC_TLS_CERT_FILE)")
    health.add_argument("--key-file", help="its private key (default with mTLS: AUTHSVC_TLS_KEY_FILE)")
    health.add_argument("--server-name", help="name to verify in the server's certificate (default: the target's host)")
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return _healthcheck(args)

    # The one place start-up errors become what the operator reads: one line, exit 2.
    try:
        if args.command in ("migrate", "scan", "audit"):
            settings = Settings.from_env()
            logs.configure(settings.log_level, settings.log_format)
            if args.command == "scan":
                return _scan(settings, args.paths, args.prefix)
            if args.command == "audit":
                return _audit(settings, args.audit_command, args.org if args.audit_command == "verify" else None)
            return _migrate(settings)
        settings = Settings.from_env(listen=args.listen, workers=args.workers)
        logs.configure(settings.log_level, settings.log_format)
        from authsvc import runtime  # imported late: the gRPC server stack is slow to import

        return runtime.serve(settings)
    except (ConfigError, Unavailable) as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _healthcheck(args: argparse.Namespace) -> int:
    """For container HEALTHCHECKs: no grpc_health_probe binary needed.

    With TLS configured in the environment it speaks TLS too, trusting the
    server's own certificate file (a self-signed certificate, or a chain
    file that includes its CA) and, under mTLS, presenting that same
    certificate as its client certificate; the flags override each.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target: str | None = args.target
    ca_file: str | None = args.ca_file
    cert_file: str | None = args.cert_file
    key_file: str | None = args.key_file
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
        return 2
    if target is None:
        host, _, port = settings.listen.rpartition(":")
        target = f"{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{port}"  # noqa: S104  # reading, not binding
    if settings.tls is not None:
        ca_file = ca_file or str(settings.tls.cert_file)
        if settings.tls.client_ca_file is not None:
            cert_file = cert_file or str(settings.tls.cert_file)
            key_file = key_file or str(settings.tls.key_file)
    if bool(cert_file) != bool(key_file):
        print("authsvc: --cert-file and --key-file go together", file=sys.stderr)
        return 2
    try:
        if ca_file or cert_file:
            credentials = grpc.ssl_channel_credentials(
                Path(ca_file).read_bytes() if ca_file else None,
                Path(key_file).read_bytes() if key_file else None,
                Path(cert_file).read_bytes() if cert_file else None,
            )
            options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target)
    except OSError as exc:
        print(f"authsvc: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError as exc:
        print(f"authsvc: {target} is not healthy: {exc.code().name}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _migrate(settings: Settings) -> int:
    from authsvc import runtime

    applied = runtime.migrate(settings)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'schema already at head'}")
    return 0


def _scan(settings: Settings, paths: list[str], extra_prefixes: list[str]) -> int:
    """Exit 1 when a key was found, 2 when a path could not be read (the scan is incomplete), else 0."""
    from authsvc.scan import STDIN, Scanner, Unreadable

    try:
        scanner = Scanner([settings.key_prefix, *extra_prefixes])
    except ValueError as exc:
        raise ConfigError(f"--prefix: {exc}") from None
    paths = paths or [STDIN]
    for path in paths:
        if path != STDIN and not os.path.exists(path):
            raise ConfigError(f"cannot read {path}: no such file or directory")
    found = incomplete = False
    try:
        for item in scanner.scan_paths(paths, sys.stdin.buffer):
            if isinstance(item, Unreadable):
                print(f"authsvc: cannot read {item.path}: {item.reason}", file=sys.stderr)
                incomplete = True
            else:
                print(item.line_text())
                found = True
        sys.stdout.flush()
    except BrokenPipeError:  # `authsvc scan . | head`: the reader has seen enough
        sys.stderr.close()
        return 1 if found else 0
    return 2 if incomplete else 1 if found else 0


def _audit(settings: Settings, command: str, org_id: str | None) -> int:
    from authsvc import runtime

    if command == "prune":
        pruned = asyncio.run(runtime.prune_audit(settings))
        print(f"pruned {pruned} event(s) older than {settings.audit_retention_days} days")
        return 0
    result = asyncio.run(runtime.verify_audit(settings, org_id))
    if result.broken is not None:
        print(f"broken: {result.broken.describe()}")
        return 1
    print(f"ok {result.events}")
    return 0
