"""TLS for the server: its certificate and key and, for mTLS, the certificate authorities its
clients' certificates must come from, read from PEM files and read again on demand (`coffer
serve` does on SIGHUP), so that a renewed certificate is served without a restart.

The files are checked when read, with the standard library's `ssl` (the certificate parses,
the key is unencrypted and matches it, the client CAs parse): gRPC itself would only fail the
handshakes later, with nothing said. gRPC asks for the certificates at every new connection
(`grpc.dynamic_ssl_server_credentials`); `ServerTls` answers with the ones read last when they
are new, else with nothing (keep those in use). Connections already open keep theirs. A reload
that fails keeps the certificates in use, and says why in the log.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from coffer.clients.tls import pem_bytes_max

__all__ = ["Certificates", "ServerTls", "TlsError", "TlsFiles", "read_certificates"]

logger = logging.getLogger(__name__)


class TlsError(ValueError):
    """A TLS file that cannot be read, or is not what it should be; `setting` names it
    (`tls_cert`, `tls_key`, `tls_client_ca`), `problem` says what is wrong."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting} {problem}")
        self.setting = setting
        self.problem = problem


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the server's TLS files are: its certificate chain and key, and the client CAs
    (None: no client certificates asked for)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True, slots=True)
class Certificates:
    """What the files held when read, checked."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def read_certificates(files: TlsFiles) -> Certificates:
    """The files' contents, checked: raises TlsError naming the first that is wrong."""
    cert = _read("tls_cert", files.cert)
    key = _read("tls_key", files.key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key, password=_refuse_password)
    except _EncryptedKey:
        raise TlsError(
            "tls_key", f"must be unencrypted ({files.key}): gRPC takes no password"
        ) from None
    except (ssl.SSLError, OSError) as error:
        raise TlsError(
            "tls_cert",
            f"must be a PEM certificate chain that the PEM private key of --tls-key "
            f"matches ({files.cert}, {files.key}): {_reason(error)}",
        ) from None
    # ssl read the files again: the bytes served are the ones it checked, unless the files
    # were being replaced meanwhile.
    if _read("tls_cert", files.cert) != cert or _read("tls_key", files.key) != key:
        raise TlsError("tls_cert", "must not change, nor --tls-key, while being read: try again")
    client_ca = None
    if files.client_ca is not None:
        client_ca = _read("tls_client_ca", files.client_ca)
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, ValueError) as error:
            raise TlsError(
                "tls_client_ca",
                f"must hold PEM certificates ({files.client_ca}): {_reason(error)}",
            ) from None
    return Certificates(cert=cert, key=key, client_ca=client_ca)


class ServerTls:
    """The server's TLS credentials, over certificates that `reload` replaces for the
    connections that come after it. Thread-safe: gRPC asks for the certificates on threads
    of its own."""

    def __init__(self, files: TlsFiles) -> None:
        """Reads the files (TlsError if one is wrong)."""
        self.files = files
        certificates = read_certificates(files)
        # mTLS is on or off for the server's life; the CAs it trusts may change on reload.
        self.client_certificates_required = certificates.client_ca is not None
        self._initial = _configuration(certificates)
        self._lock = threading.Lock()
        # Read by the last reload and not yet handed to gRPC.
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            # gRPC documents None as "keep the configuration in use"; the typing stubs omit it.
            cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch),
            require_client_authentication=self.client_certificates_required,
        )

    def reload(self) -> bool:
        """Reads the files again; from the next connection on, the server presents (and, with
        mTLS, trusts) what they hold now. False, with a warning logged, when they cannot be
        read or are wrong: the certificates in use stay."""
        try:
            configuration = _configuration(read_certificates(self.files))
        except TlsError as error:
            logger.warning(
                "TLS reload failed, keeping the certificates in use: --%s %s",
                error.setting.replace("_", "-"),
                error.problem,
            )
            return False
        with self._lock:
            self._pending = configuration
        logger.info(
            "TLS certificates reloaded from %s: new connections get them",
            ", ".join(
                str(path)
                for path in (self.files.cert, self.files.key, self.files.client_ca)
                if path is not None
            ),
        )
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC's certificate configuration fetcher: None keeps the configuration in use.
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # ssl asks for a password only for an encrypted key; gRPC takes no password.
    raise _EncryptedKey


def _configuration(certificates: Certificates) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(certificates.key, certificates.cert)], root_certificates=certificates.client_ca
    )


def _read(setting: str, path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(pem_bytes_max + 1)
    except OSError as error:
        raise TlsError(
            setting, f"must be a readable file: {error.strerror or error} ({path})"
        ) from None
    if len(data) > pem_bytes_max:
        raise TlsError(setting, f"must be at most {pem_bytes_max} bytes ({path})")
    if b"-----BEGIN " not in data:
        raise TlsError(setting, f"must be a PEM file ({path})")
    return data


def _reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    return str(error)
