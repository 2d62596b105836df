"""Server TLS credentials that follow their files: rotation without a restart.

gRPC asks the fetcher for a certificate configuration before handshakes
(``grpc.dynamic_ssl_server_credentials``); it answers ``None`` (keep the
current one) unless the files were re-read since that port last asked.
When and how they are re-read is ``authsvc.tlsfiles.Reloading``'s rule, the
same for every listener: on a changed ``signature``, keeping the last good
set when the new one cannot be used. Connections already open keep the
certificate they were made with; new ones get the new files.
"""

from __future__ import annotations

import grpc

from authsvc.tlsfiles import Reloading, TlsFiles, TlsMaterial


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.certificate_chain)], root_certificates=material.client_ca
    )


class ReloadingCredentials:
    """``credentials()`` for ``add_secure_port``: one set per port, all following the same files.

    gRPC keeps a fetcher's state per port (it takes over the initial
    configuration, and "unchanged" means unchanged for that port), so each
    port gets a fetcher of its own, which remembers the version it last
    handed out; the files are read once per change for all of them.
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        # On every handshake, as gRPC asks: its fetcher runs on gRPC's own threads, not the event loop.
        self._reloading = Reloading(files, TlsFiles.load, listener="the gRPC listeners")

    def credentials(self) -> grpc.ServerCredentials:
        version, material = self._reloading.latest()
        return grpc.dynamic_ssl_server_credentials(
            _configuration(material),
            _Fetcher(self._reloading, version),  # type: ignore[arg-type]  # the stub omits None, which gRPC documents as "no change"
            require_client_authentication=self.files.client_ca_file is not None,
        )


class _Fetcher:
    def __init__(self, reloading: Reloading[TlsMaterial], version: int) -> None:
        self._reloading = reloading
        self._version = version

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        version, material = self._reloading.latest()
        if version == self._version:
            return None
        self._version = version
        return _configuration(material)
