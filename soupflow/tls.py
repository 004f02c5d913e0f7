"""TLS for every listener and sender: contexts, the handshake under a deadline, peer identity.

Upstream: receivers (the server side), activities and dicom.requestor (the client side),
workflow.checks (a certificate, key or password that cannot be loaded is a validation error).

The profile follows PS3.15 Annex B and BCP 195, as dcmtk's default does: TLS 1.2 or later,
forward-secret AEAD suites only (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3's own
suites are all of that kind). A client always verifies the chain and the server name; there
is no switch to turn that off. A listener's certificate, key and trusted files are read again
when they change on disk, so a renewed certificate applies to the next connection.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soupflow.workflow import model

CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
}
# CPython's hook for SSL_CTX_set_msg_callback (private, 3.8 and later); without it a
# refused client certificate is logged without its fingerprint
_CAN_NAME = hasattr(ssl.SSLContext, "_msg_callback")
_ENV = re.compile(r"^\s*\$\{\s*env:([A-Za-z_][A-Za-z0-9_]*)\s*\}\s*$")


class TlsError(Exception):
    """A certificate, key or password that cannot be used; the text says which and why, and
    `field` which of them: "certificate", "key", "password" or "trusted"."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def secret(value: str) -> str:
    """A password as written (`${env:NAME}` read from the environment)."""
    match = _ENV.match(value)
    if match is None:
        return value
    return os.environ.get(match.group(1), "")


def normalized_fingerprint(text: str) -> str:
    """`AB:CD...`, `ab cd...` and `abcd...` are one SHA-256 fingerprint."""
    return re.sub(r"[\s:]", "", text).lower()


def fingerprints(text: str) -> frozenset[str]:
    """`ClientCertificateThumbPrint`: comma-separated SHA-256 fingerprints."""
    return frozenset(filter(None, (normalized_fingerprint(part) for part in text.split(","))))


@dataclass(frozen=True)
class ServerTls:
    """What a TLS listener needs, resolved to absolute paths."""

    certificate_file: Path
    private_key_file: Path
    private_key_password: str
    trusted_certificates_file: Path | None  # None: no client certificate asked for
    require_client_certificate: bool
    allowed_fingerprints: frozenset[str]  # empty: any certificate the trusted file verifies
    minimum_version: str = "1.2"

    def files(self) -> tuple[Path, ...]:
        trusted = (self.trusted_certificates_file,) if self.trusted_certificates_file else ()
        return (self.certificate_file, self.private_key_file, *trusted)


@dataclass(frozen=True)
class ClientTls:
    """What a TLS client needs; `trusted_certificates_file` None is the system store."""

    server_name: str
    trusted_certificates_file: Path | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    private_key_password: str = ""
    minimum_version: str = "1.2"


@dataclass(frozen=True)
class PeerCertificate:
    sha256: str
    subject: str


def _base(purpose: ssl.Purpose, minimum_version: str) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = _VERSIONS.get(minimum_version, ssl.TLSVersion.TLSv1_2)
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, certificate: Path, key: Path, password: str) -> None:
    for path, field in ((certificate, "certificate"), (key, "key")):
        if not path.is_file():
            raise TlsError(f"{path} does not exist or is not a file", field)
    try:
        _readable_certificates(context, certificate)
        context.load_cert_chain(certificate, key, password=password or _no_password)
    except ssl.SSLError as exc:
        raise _key_problem(exc, certificate, key) from None
    except OSError as exc:
        raise TlsError(
            f"cannot read {certificate} or {key}: {exc.strerror or exc}", "key"
        ) from None


def _key_problem(exc: ssl.SSLError, certificate: Path, key: Path) -> TlsError:
    encrypted = b"ENCRYPTED" in key.read_bytes()[:200]
    if exc.reason == "KEY_VALUES_MISMATCH":
        return TlsError(
            f"the key {key.name} does not match the certificate {certificate.name}", "key"
        )
    if encrypted:
        return TlsError(f"the password does not decrypt the key {key.name}", "password")
    return TlsError(f"cannot read the key {key.name}: it is not a PEM private key", "key")


def _readable_certificates(context: ssl.SSLContext, path: Path) -> None:
    """Certificates in PEM that OpenSSL reads (a half-written file fails here, by name)."""
    text = path.read_text(encoding="ascii", errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise TlsError(f"{path} holds no PEM certificate", "certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise TlsError(
            f"{path} does not parse as PEM certificates: {_reason(exc)}", "certificate"
        ) from None


def _no_password() -> str:
    raise TlsError("the private key is encrypted and no password is set", "password")


def _load_trusted(context: ssl.SSLContext, trusted: Path) -> None:
    if not trusted.is_file():
        raise TlsError(f"{trusted} does not exist or is not a file", "trusted")
    try:
        context.load_verify_locations(cafile=trusted)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"cannot load trusted certificates from {trusted}: {_reason(exc)}", "trusted"
        ) from None


def server_context(settings: ServerTls, *, naming_certificates: bool = False) -> ssl.SSLContext:
    """`naming_certificates`: keep the certificate a client offers, so that a refused one is
    logged by its fingerprint (OpenSSL's message callback; it costs the lock of the
    interpreter for every record read, so only handshakes after a refusal use it)."""
    context = _base(ssl.Purpose.CLIENT_AUTH, settings.minimum_version)
    _load_chain(
        context,
        settings.certificate_file,
        settings.private_key_file,
        settings.private_key_password,
    )
    if settings.trusted_certificates_file is not None:
        _load_trusted(context, settings.trusted_certificates_file)
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
        )
        if naming_certificates and _CAN_NAME:
            context._msg_callback = _keep_offered_certificate  # type: ignore[attr-defined]
    return context


def client_context(settings: ClientTls) -> ssl.SSLContext:
    context = _base(ssl.Purpose.SERVER_AUTH, settings.minimum_version)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.trusted_certificates_file is not None:
        context.load_default_certs()
        _load_trusted(context, settings.trusted_certificates_file)
    if settings.certificate_file is not None:
        _load_chain(
            context,
            settings.certificate_file,
            settings.private_key_file or settings.certificate_file,
            settings.private_key_password,
        )
    return context


class ServerContexts:
    """A listener's contexts, made again when one of its files changes on disk (checked at
    each new connection: a stat of two or three files). A file that fails to load (half
    written, say) keeps the previous contexts in use, with the error kept for the log.

    A handshake that refuses a client's certificate cannot see it afterwards; the next
    handshakes from that address, for NAMING_SECONDS, use a context that keeps it, so that
    a refused certificate is named by its fingerprint from the second attempt on."""

    NAMING_SECONDS = 600.0
    _NAMING_ADDRESSES = 256

    def __init__(self, settings: ServerTls) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._contexts = self._made()
        self._naming: dict[str, float] = {}  # address: until (monotonic)
        self.reload_error: str | None = None

    @property
    def _names_certificates(self) -> bool:
        """A client certificate is asked for, and this Python can see the one offered."""
        return self.settings.trusted_certificates_file is not None and _CAN_NAME

    def _made(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        plain = server_context(self.settings)
        if not self._names_certificates:
            return plain, plain
        return plain, server_context(self.settings, naming_certificates=True)

    def _stamps(self) -> tuple[tuple[int, int], ...]:
        return tuple(_stamp(path) for path in self.settings.files())

    def current(self, address: str) -> ssl.SSLContext:
        """The context for a handshake with a client at `address` (its IP)."""
        stamp = self._stamps()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._contexts = self._made()
                    self.reload_error = None
                except TlsError as exc:
                    self.reload_error = str(exc)
            plain, naming = self._contexts
            until = self._naming.get(address)
            if until is not None and until < time.monotonic():
                del self._naming[address]
                until = None
            return plain if until is None else naming

    def refused(self, address: str, error: HandshakeError) -> bool:
        """After a failed handshake: True when the next ones from `address` will name the
        certificate that this one refused without seeing it."""
        if error.offered is not None or not error.certificate_refused:
            return False
        if not self._names_certificates:
            return False
        with self._lock:
            self._naming.pop(address, None)
            self._naming[address] = time.monotonic() + self.NAMING_SECONDS
            while len(self._naming) > self._NAMING_ADDRESSES:
                del self._naming[next(iter(self._naming))]
        return True

    def accepted(self, address: str) -> None:
        if self._naming:
            with self._lock:
                self._naming.pop(address, None)


class HandshakeError(OSError):
    """A listener's handshake that failed: why, in one line, and the SHA-256 fingerprint of
    the certificate the client offered (None: it offered none, or failed before)."""

    def __init__(self, reason: str, offered: str | None, *, certificate_refused: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offered = offered
        self.certificate_refused = certificate_refused  # OpenSSL refused its certificate

    def __str__(self) -> str:
        offered = f" (client certificate sha256 {self.offered})" if self.offered else ""
        return f"{self.reason}{offered}"


_HANDSHAKE = 22  # the TLS record content type, and the Certificate message's type:
_CERTIFICATE = 11  # RFC 8446 B.3, RFC 5246 7.4
_TLS_1_3 = 0x0304
_offered = threading.local()  # the certificate this thread's handshake was offered


def _keep_offered_certificate(
    connection: object, direction: str, version: int, content: int, kind: int, data: bytes
) -> None:
    """OpenSSL's message callback on a listener that asks for client certificates: the
    client's Certificate message, seen before OpenSSL verifies it, so that a refused
    handshake can name the certificate it refused. It runs in the handshaking thread."""
    if direction == "read" and content == _HANDSHAKE and kind == _CERTIFICATE:
        _offered.der = leaf_certificate(data, version)


def leaf_certificate(message: bytes, version: int) -> bytes | None:
    """The first (the peer's own) certificate of a TLS Certificate handshake message, as DER;
    None for an empty list or a message that does not parse."""
    body = memoryview(message)[4:]  # after the message type and its 3-byte length
    if version >= _TLS_1_3 and body:  # a certificate_request_context comes first
        body = body[1 + body[0] :]
    if len(body) < 6:
        return None
    length = int.from_bytes(body[3:6], "big")
    return bytes(body[6 : 6 + length]) if 0 < length <= len(body) - 6 else None


def handshake(context: ssl.SSLContext, connection: socket.socket, deadline: float) -> ssl.SSLSocket:
    """The listener's side: wrap `connection` and finish the handshake before `deadline`
    (monotonic), however the peer trickles it; the socket comes back blocking, with its
    previous timeout. HandshakeError says why not."""
    timeout = connection.gettimeout()
    _offered.der = None
    try:
        tls = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
    except OSError as exc:  # the peer already left
        raise HandshakeError(failure_reason(exc), None, certificate_refused=False) from exc
    tls.setblocking(False)
    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                readable, writable = [tls], []
            except ssl.SSLWantWriteError:
                readable, writable = [], [tls]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not any(select.select(readable, writable, [], remaining)):
                raise TimeoutError("the TLS handshake did not finish within the timeout")
    except OSError as exc:
        tls.close()
        der = _offered.der
        raise HandshakeError(
            failure_reason(exc),
            hashlib.sha256(der).hexdigest() if der else None,
            certificate_refused=isinstance(exc, ssl.SSLCertVerificationError),
        ) from exc
    except BaseException:
        tls.close()
        raise
    finally:
        _offered.der = None
    tls.settimeout(timeout)
    return tls


def peer_certificate(tls: ssl.SSLSocket) -> PeerCertificate | None:
    der = tls.getpeercert(binary_form=True)
    if not der:
        return None
    described: Any = tls.getpeercert() or {}
    subject = ",".join(
        f"{_SHORT_NAMES.get(name, name)}={value}"
        for rdn in described.get("subject", ())
        for name, value in rdn
    )
    return PeerCertificate(hashlib.sha256(der).hexdigest(), subject)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or "certificate verify failed"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def failure_reason(exc: BaseException) -> str:
    """One line for a failed handshake: no value from the peer beyond OpenSSL's reason."""
    return _reason(exc).replace("_", " ").lower()


def _path(text: str, folder: Path) -> Path:
    path = Path(text.strip()).expanduser()
    return path if path.is_absolute() else folder / path


def listener_tls(fields: model.ListenerTlsFields, require_client: bool, folder: Path) -> ServerTls:
    """A listener's TLS settings; relative paths are relative to the workflow file's folder."""
    trusted = fields.trusted_certificates_file.strip()
    return ServerTls(
        certificate_file=_path(fields.certificate_file, folder),
        private_key_file=_path(fields.private_key_file, folder),
        private_key_password=secret(fields.private_key_password),
        trusted_certificates_file=_path(trusted, folder) if trusted else None,
        require_client_certificate=require_client,
        allowed_fingerprints=fingerprints(fields.client_certificate_thumb_print),
        minimum_version=fields.tls_minimum_version,
    )


def sender_tls(fields: model.ClientTlsFields, server_name: str, folder: Path) -> ClientTls:
    """A sender's TLS settings; relative paths are relative to the workflow file's folder."""
    trusted = fields.trusted_certificates_file.strip()
    certificate = fields.client_certificate_file.strip()
    key = fields.client_private_key_file.strip()
    return ClientTls(
        server_name=server_name,
        trusted_certificates_file=_path(trusted, folder) if trusted else None,
        certificate_file=_path(certificate, folder) if certificate else None,
        private_key_file=_path(key, folder) if key else None,
        private_key_password=secret(fields.client_private_key_password),
    )


_client_contexts: dict[ClientTls, tuple[tuple[tuple[int, int], ...], ssl.SSLContext]] = {}
_client_lock = threading.Lock()


def cached_client_context(settings: ClientTls) -> ssl.SSLContext:
    """A sender's context, made once per settings and again when one of its files changes."""
    files = [
        path
        for path in (
            settings.trusted_certificates_file,
            settings.certificate_file,
            settings.private_key_file,
        )
        if path is not None
    ]
    stamp = tuple(_stamp(path) for path in files)
    with _client_lock:
        known = _client_contexts.get(settings)
        if known is not None and known[0] == stamp:
            return known[1]
    context = client_context(settings)
    with _client_lock:
        _client_contexts[settings] = (stamp, context)
    return context


def _stamp(path: Path) -> tuple[int, int]:
    try:
        status = path.stat()
    except OSError:
        return (0, 0)
    return (status.st_mtime_ns, status.st_size)
