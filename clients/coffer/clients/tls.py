"""TLS for the client: which certificate authorities to trust, and for mTLS the client's own
certificate and key.

    tls = Tls.from_files(ca="ca.pem")                                    # TLS
    tls = Tls.from_files(ca="ca.pem", cert="me.pem", key="me-key.pem")   # mTLS
    async with Client("coffer.internal:50051", tls=tls) as coffer: ...

`Tls` holds the PEM bytes themselves, so that a client made from secrets held in memory needs
no files; `from_files` reads them from paths. The contents are checked only for being PEM:
gRPC checks the rest when it connects, and a certificate it cannot use fails the calls with
UNAVAILABLE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

__all__ = ["Tls", "pem_bytes_max"]

# A PEM file of certificates or a key: larger ones are not what they should be.
pem_bytes_max = 1024 * 1024

_PathLike = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class Tls:
    """`ca`: the PEM certificates of the authorities to trust (None: the system's);
    `cert`, `key`: the client's PEM certificate chain and unencrypted private key, both or
    neither, for a server that requires client certificates (mTLS). Raises ValueError when
    one is not PEM, or only one of `cert` and `key` is given."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes) or b"-----BEGIN " not in value):
                raise ValueError(f"tls {name} must be PEM bytes (-----BEGIN …)")
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls cert and key go together: give both, or neither")

    @classmethod
    def from_files(
        cls,
        *,
        ca: _PathLike | None = None,
        cert: _PathLike | None = None,
        key: _PathLike | None = None,
    ) -> Tls:
        """Reads the PEM files at these paths; ValueError names the one that cannot be read."""
        return cls(ca=_read("ca", ca), cert=_read("cert", cert), key=_read("key", key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read(name: str, path: _PathLike | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            data = file.read(pem_bytes_max + 1)
    except OSError as error:
        raise ValueError(
            f"tls {name} cannot be read: {error.strerror or error} ({os.fspath(path)})"
        ) from None
    if len(data) > pem_bytes_max:
        raise ValueError(f"tls {name} is larger than {pem_bytes_max} bytes ({os.fspath(path)})")
    if b"-----BEGIN " not in data:
        raise ValueError(f"tls {name} is not a PEM file ({os.fspath(path)})")
    return data
