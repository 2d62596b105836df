"""The server's TLS files: read and checked together, at start-up and whenever they change.

Checked with the standard library's ``ssl`` (OpenSSL), so a wrong file is
found at start-up, in one line naming the variable, rather than at the first
handshake. Every listener follows the files through ``Reloading``, the one
reload rule: the gRPC ports as ``TlsMaterial`` (``authsvc.grpc.tls``), the
HTTP ext_authz and metrics listeners as the ``ssl.SSLContext`` that
``TlsFiles.server_context`` builds, the one place such a context is made.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from authsvc.core.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How often authsvc's own HTTP listeners look at the files (a few ``stat`` calls), at most.
CHECK_SECONDS = 1.0
#: Envoy's HTTP ext_authz client and Prometheus speak HTTP/1.1; no h2 is offered.
HTTP_ALPN = ("http/1.1",)


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes as gRPC takes them."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None
    """Set: clients must present a certificate issued by one of these (mTLS)."""


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def signature(self) -> tuple[tuple[int, int, int], ...]:
        """Changes when any file is replaced or rewritten (inode, size, mtime); symlinks are followed."""
        out = []
        for path in (self.cert_file, self.key_file, self.client_ca_file):
            if path is None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                out.append((0, 0, 0))
                continue
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def load(self) -> TlsMaterial:
        """The files' contents, checked; ``ConfigError`` naming the variable of the first bad file."""
        return self._read()[0]

    def server_context(self) -> ssl.SSLContext:
        """A server context for authsvc's own HTTP/1.1 listeners, checked like ``load``.

        TLS 1.2 at least, ALPN ``http/1.1`` only (never h2: these listeners
        speak HTTP/1.1), and with a client CA, a certificate it issued is
        required and verified (``CERT_REQUIRED``): a client without one, or
        with one from another CA, fails its handshake.
        """
        return self._read()[1]

    def _read(self) -> tuple[TlsMaterial, ssl.SSLContext]:
        cert = _read(self.cert_file, "AUTHSVC_TLS_CERT_FILE")
        key = _read(self.key_file, "AUTHSVC_TLS_KEY_FILE")
        _certificates(cert, "AUTHSVC_TLS_CERT_FILE", self.cert_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(list(HTTP_ALPN))
        try:
            # The password callback keeps OpenSSL from prompting on a terminal for an encrypted key.
            context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ConfigError(
                    f"AUTHSVC_TLS_KEY_FILE: {self.key_file} is not the key of the certificate in AUTHSVC_TLS_CERT_FILE"
                ) from None
            raise ConfigError(
                f"AUTHSVC_TLS_KEY_FILE: {self.key_file} is not an unencrypted PEM private key ({exc.reason})"
            ) from None
        ca = None
        if self.client_ca_file is not None:
            ca = _read(self.client_ca_file, "AUTHSVC_TLS_CLIENT_CA_FILE")
            _certificates(ca, "AUTHSVC_TLS_CLIENT_CA_FILE", self.client_ca_file, into=context)
            context.verify_mode = ssl.CERT_REQUIRED
        return TlsMaterial(cert, key, ca), context


class Reloading(Generic[T]):
    """What a listener builds from the TLS files (``build``), rebuilt when their ``signature`` changes.

    The rule for every listener: the files are re-read only when a file was
    replaced or rewritten; a set that cannot be used (a key that does not
    match, a half-written file: a rotation caught midway) is logged, once
    per change, and the last good one stays in use, so a bad file never
    takes a serving process off the air; the next change is tried again. A
    change made while the files were being read is read again next time.

    ``latest()`` checks at most every ``interval`` seconds (0: on every
    call) and is safe from any thread; between checks it costs an attribute
    read. The first build happens here, so a ``ConfigError`` stops the start.
    ``version`` counts the builds, for callers that must tell "changed since
    I last looked" (gRPC's certificate fetchers, one per port).
    """

    def __init__(
        self,
        files: TlsFiles,
        build: Callable[[TlsFiles], T],
        *,
        listener: str,
        interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self._build = build
        self._listener = listener
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._seen = files.signature()
        self._latest = (0, build(files))
        self._next_check = clock() + interval

    def latest(self) -> tuple[int, T]:
        """``(version, value)``: the value built from the newest usable files."""
        if self._interval and self._clock() < self._next_check:
            return self._latest
        with self._lock:
            self._next_check = self._clock() + self._interval
            signature = self.files.signature()
            if signature == self._seen:
                return self._latest
            self._seen = signature
            try:
                value = self._build(self.files)
            except ConfigError as exc:  # names a file and a variable, never its contents
                log.warning(
                    "TLS files changed but cannot be used on %s; still serving the previous ones: %s",
                    self._listener,
                    exc,
                )
                return self._latest
            except Exception:  # never into a handshake: keep serving the last good files
                log.exception(
                    "TLS files changed but reading them failed on %s; still serving the previous ones", self._listener
                )
                return self._latest
            if self.files.signature() != signature:
                self._seen = ()  # changed while being read: read again at the next check
            self._latest = (self._latest[0] + 1, value)
            log.info("TLS files changed; new connections to %s get the new certificate", self._listener)
            return self._latest

    def current(self) -> T:
        return self.latest()[1]


def http_contexts(files: TlsFiles, listener: str) -> Reloading[ssl.SSLContext]:
    """The current ``server_context`` for one of authsvc's own HTTP listeners, looked at once a second at most.

    Once a second bounds what a flood of new connections costs in ``stat``
    calls on the listener's thread (the event loop, for the ext_authz
    listener); a rotation shows within a second.
    """
    return Reloading(files, TlsFiles.server_context, listener=listener, interval=CHECK_SECONDS)


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def _certificates(pem: bytes, variable: str, path: Path, into: ssl.SSLContext | None = None) -> None:
    """One or more PEM certificates, parsed by OpenSSL (as the CAs ``into`` verifies with, when given)."""
    try:
        text = pem.decode("ascii")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError
        (into or ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)).load_verify_locations(cadata=text)
    except (ValueError, ssl.SSLError):
        raise ConfigError(f"{variable}: {path} does not hold PEM certificates") from None
