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
from typing import TYPE_CHECKING

from authsvc import logs
from authsvc.config import Settings
from authsvc.core.errors import ConfigError, Unavailable

if TYPE_CHECKING:
    import grpc


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
    scan.add_argument(
        "--report",
        metavar="HOST:PORT",
        help="send the keys found to ReportLeakedKeys on that authsvc, which revokes them (needs no admin token)",
    )
    scan.add_argument("--source", default="authsvc scan", help="where the keys were found, for the revoke reason")
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
    scan.add_argument("--ca-file", help="with --report: CA certificates to trust (TLS); unset: plaintext")
    scan.add_argument("--cert-file", help="with --report: client certificate for mTLS")
    scan.add_argument("--key-file", help="with --report: its private key")
    scan.add_argument("--server-name", help="with --report: name to verify in the server's certificate")
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return _healthcheck(args)

    # The one place start-up errors become what the operator reads: one line, exit 2.
    try:
        if args.command in ("migrate", "scan", "audit"):
            settings = Settings.from_env()
            logs.configure(settings.log_level, settings.log_format)
            if args.command == "scan":
                return _scan(settings, args.paths, args.prefix, args if args.report else None)
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
    try:
        channel = _channel(target, ca_file, cert_file, key_file, args.server_name)
    except ConfigError as exc:
        print(f"authsvc: {exc}", file=sys.stderr)
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


def _channel(
    target: str, ca_file: str | None, cert_file: str | None, key_file: str | None, server_name: str | None
) -> grpc.Channel:
    """A channel as the command-line flags describe it: TLS when a CA or client certificate is given."""
    import grpc

    if bool(cert_file) != bool(key_file):
        raise ConfigError("--cert-file and --key-file go together")
    if not (ca_file or cert_file):
        return grpc.insecure_channel(target)
    try:
        credentials = grpc.ssl_channel_credentials(
            Path(ca_file).read_bytes() if ca_file else None,
            Path(key_file).read_bytes() if key_file else None,
            Path(cert_file).read_bytes() if cert_file else None,
        )
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def _migrate(settings: Settings) -> int:
    from authsvc import runtime

    applied = runtime.migrate(settings)
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'schema already at head'}")
    return 0


def _scan(settings: Settings, paths: list[str], extra_prefixes: list[str], report: argparse.Namespace | None) -> int:
    """Exit 1 when a key was found, 2 when a path could not be read (the scan is incomplete) or the report
    failed, else 0."""
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
    keys: dict[str, None] = {}  # distinct, in the order found
    try:
        for item in scanner.scan_paths(paths, sys.stdin.buffer):
            if isinstance(item, Unreadable):
                print(f"authsvc: cannot read {item.path}: {item.reason}", file=sys.stderr)
                incomplete = True
            else:
                print(item.line_text())
                found = True
                keys[item.key] = None
        sys.stdout.flush()
    except BrokenPipeError:  # `authsvc scan . | head`: the reader has seen enough
        sys.stderr.close()
        return 1 if found else 0
    if report is not None and keys and not _report(list(keys), report):
        return 2
    return 2 if incomplete else 1 if found else 0


def _report(keys: list[str], args: argparse.Namespace) -> bool:
    """Hand the keys to ReportLeakedKeys, 100 per call; one summary line on stderr, never a key."""
    import grpc
    from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc

    from authsvc.core.manager import MAX_LEAKED_KEYS

    channel = _channel(args.report, args.ca_file, args.cert_file, args.key_file, args.server_name)
    revoked = already = unknown = 0
    try:
        with channel:
            stub = authsvc_pb2_grpc.KeyServiceStub(channel)
            for start in range(0, len(keys), MAX_LEAKED_KEYS):
                batch = keys[start : start + MAX_LEAKED_KEYS]
                reply = stub.ReportLeakedKeys(
                    authsvc_pb2.ReportLeakedKeysRequest(keys=batch, source=args.source), timeout=30
                )
                revoked, already, unknown = (
                    revoked + reply.revoked,
                    already + reply.already_revoked,
                    unknown + reply.unknown,
                )
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else ""
        print(f"authsvc: reporting to {args.report} failed: {code} {details}".rstrip(), file=sys.stderr)
        return False
    print(
        f"reported {len(keys)} key(s) to {args.report}: "
        f"{revoked} revoked, {already} already revoked, {unknown} unknown",
        file=sys.stderr,
    )
    return True


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
