"""The server's TLS files: read and checked together, at start-up and whenever they change.

Checked with the standard library's ``ssl`` (OpenSSL), so a wrong file is
found at start-up, in one line naming the variable, rather than at the first
handshake. The gRPC server's certificate fetcher (``authsvc.grpc.tls``)
re-reads them through ``TlsFiles.load`` when their ``signature`` changes.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from authsvc.core.errors import ConfigError


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
        cert = _read(self.cert_file, "AUTHSVC_TLS_CERT_FILE")
        key = _read(self.key_file, "AUTHSVC_TLS_KEY_FILE")
        _certificates(cert, "AUTHSVC_TLS_CERT_FILE", self.cert_file)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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
            _certificates(ca, "AUTHSVC_TLS_CLIENT_CA_FILE", self.client_ca_file)
        return TlsMaterial(cert, key, ca)


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def _certificates(pem: bytes, variable: str, path: Path) -> None:
    """One or more PEM certificates, parsed by OpenSSL."""
    try:
        text = pem.decode("ascii")
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ValueError
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ValueError, ssl.SSLError):
        raise ConfigError(f"{variable}: {path} does not hold PEM certificates") from None
