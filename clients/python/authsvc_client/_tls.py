"""``TlsConfig``: how a client reaches an authsvc that serves TLS, or mTLS.

A small frozen value instead of ``grpc.ChannelCredentials`` so callers need
not import ``grpc``; ``credentials=`` still takes ready-made credentials.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings for ``Client`` and ``AsyncClient`` (PEM bytes; ``from_files`` reads paths)."""

    root_certificates: bytes | None = None
    """CA certificates that may sign authsvc's certificate; ``None``: the system's trust store."""
    certificate_chain: bytes | None = None
    """This client's certificate, for mTLS (with ``private_key``)."""
    private_key: bytes | None = field(default=None, repr=False)
    """The key of ``certificate_chain``; never shown in a repr."""
    server_name: str | None = None
    """The name to verify in authsvc's certificate when it differs from the target's host."""

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TlsConfig: certificate_chain and private_key go together (mTLS), or neither")

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        private_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return cls(read(root_certificates), read(certificate_chain), read(private_key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
