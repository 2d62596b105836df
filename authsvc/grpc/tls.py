"""Server TLS credentials that follow their files: rotation without a restart.

gRPC asks the fetcher for a certificate configuration before handshakes
(``grpc.dynamic_ssl_server_credentials``); it answers ``None`` (keep the
current one) unless a file's signature changed, and then re-reads and checks
them. Connections already open keep the certificate they were made with;
new ones get the new files. A half-written or broken set (a rotation caught
midway) is logged, once per change, and the last good configuration is kept,
so a bad file never takes a serving process off the air; the next change is
tried again.
"""

from __future__ import annotations

import logging
import threading

import grpc

from authsvc.core.errors import ConfigError
from authsvc.tlsfiles import TlsFiles, TlsMaterial

log = logging.getLogger(__name__)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.certificate_chain)], root_certificates=material.client_ca
    )


class ReloadingCredentials:
    """``credentials()`` for ``add_secure_port``: one set per port.

    gRPC keeps a fetcher's state per port (it takes over the initial
    configuration, and "unchanged" means unchanged for that port), so each
    port gets a fetcher of its own; all of them follow the same files.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._signature = files.signature()
        self._material = files.load()

    def credentials(self) -> grpc.ServerCredentials:
        fetcher = _Fetcher(self.files, self._signature)
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._material),
            fetcher,  # type: ignore[arg-type]  # the stub omits None, which gRPC documents as "no change"
            require_client_authentication=self.files.client_ca_file is not None,
        )


class _Fetcher:
    def __init__(self, files: TlsFiles, signature: tuple[tuple[int, int, int], ...]) -> None:
        self.files = files
        self._seen = signature
        self._lock = threading.Lock()  # called on gRPC's threads

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            signature = self.files.signature()
            if signature == self._seen:
                return None
            self._seen = signature
            try:
                material = self.files.load()
            except ConfigError as exc:
                log.warning("TLS files changed but cannot be used; still serving the previous ones: %s", exc)
                return None
            except Exception:  # never into gRPC's handshake thread; keep serving the last good files
                log.exception("TLS files changed but reading them failed; still serving the previous ones")
                return None
            if self.files.signature() != signature:
                self._seen = ()  # changed while being read: read again at the next handshake
            log.info("TLS files changed; new connections get the new certificate")
            return _configuration(material)
