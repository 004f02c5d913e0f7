"""STOW-RS receiver (`StowRsReceiverSetting`): DICOM over HTTP into the same ingest as C-STORE.

Upstream: runtime. Downstream: receivers.server (accept loop, thread per connection, TLS),
ingest (what 200 means), h11 (HTTP/1.1), python-multipart (the multipart/related body).

`POST /{ServiceName}/studies[/{study}]` with `multipart/related; type="application/dicom"`,
one PS3.10 instance per part (Content-Length or chunked; `Expect: 100-continue` answered once
the headers, credentials and size pass). Each part streams to a file in the spool's incoming
folder as it arrives (memory stays flat for any size); only when the whole body is in and its
multipart framing is complete is each part checked and committed through `Ingest.store`, so a
truncated or malformed body leaves nothing stored. The answer goes after every part is
committed or has failed: a PS3.18 Store Instances Response (JSON), 200 when all were stored,
202 when some were, 503 with `Retry-After` when none were for want of resources (a full disk,
the queue, too many requests, shutting down), 409 when none were for their content (a study
other than the URL's, 0xA900), 400 when none parsed, 413, 415, 401 and 403 before the body.
A client silent past `RequestTimeoutSeconds` is disconnected (never 408: a sender reads 4xx as
"do not retry"). Logs carry the request id, the peer, a certificate fingerprint prefix, byte
and part counts and statuses: never a body, an `Authorization` header or a dataset value.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import h11
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from python_multipart.multipart import MultipartParser

from soupflow import tls
from soupflow.dicom import status
from soupflow.dicom.acceptor import ReceivedObject, WriteBehind
from soupflow.events import fields
from soupflow.ingest import Ingest
from soupflow.receivers.base import Admission, Sharing
from soupflow.receivers.http11 import next_event as _next_event
from soupflow.receivers.server import (
    HandedContexts,
    Limits,
    Server,
    drain,
    peer,
    server_contexts,
    tls_restart_key,
)
from soupflow.store.queue import Delivery, Origin, QueueError
from soupflow.workflow.model import StowRsReceiverSetting
from soupflow.workflow.types import StowAuthentication

log = logging.getLogger(__name__)

TRANSPORT = "STOW-RS"
_READ_BYTES = 256 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_RETRY_AFTER = "5"
_STOP_WAIT_SECONDS = 5.0
_LINGER_SECONDS = 2.0  # after an early answer, how long the rest of a body is read
_LINGER_BYTES = 64 * 2**20
_STUDY = re.compile(r"^[0-9.]{1,64}$")
PROCESSING_FAILURE = 0x0110  # PS3.18 I.2.2: the same delivery and instance, other bytes


@dataclass
class _Part:
    path: Path
    file: BinaryIO
    content_type: str = ""

    def __post_init__(self) -> None:
        self.behind = WriteBehind(self.file)


@dataclass
class _Body:
    """The parts of one request as they stream to disk."""

    incoming: Path
    parts: list[_Part] = field(default_factory=list)
    header_name: bytes = b""
    header_value: bytes = b""
    ended: bool = False  # the closing boundary came
    failure: OSError | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_part_data": self._data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _begin(self) -> None:
        path = self.incoming / f"{uuid.uuid4()}.part"
        try:
            self.parts.append(_Part(path, path.open("wb")))
        except OSError as exc:
            self.failure = self.failure or exc
            raise

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def _header_end(self) -> None:
        if self.header_name.strip().lower() == b"content-type" and self.parts:
            self.parts[-1].content_type = self.header_value.decode("latin-1").strip()
        self.header_name = self.header_value = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        try:
            part.file.write(data[start:end])
            part.behind.wrote(end - start)
        except OSError as exc:
            self.failure = self.failure or exc
            raise

    def _part_end(self) -> None:
        try:
            self.parts[-1].file.close()  # the buffered tail is written here
        except OSError as exc:
            self.failure = self.failure or exc
            raise

    def _end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        for part in self.parts:
            with contextlib.suppress(OSError):  # a full disk fails the flush again
                part.file.close()
            part.path.unlink(missing_ok=True)


class _RefusalError(Exception):
    """Answer `status` at once (before or instead of reading the body), then close."""

    def __init__(self, code: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(reason)
        self.code = code
        self.headers = headers


class StowListener:
    """One workflow's STOW-RS origin server on its port."""

    @staticmethod
    def restart_key(receiver: StowRsReceiverSetting) -> tuple[object, ...]:
        return (
            receiver.port,
            receiver.max_concurrent_requests,
            receiver.request_timeout_seconds,
            receiver.authentication_type,
            *tls_restart_key(receiver),
        )

    def __init__(
        self,
        workflow_id: str,
        receiver: StowRsReceiverSetting,
        host: str,
        ingest: Ingest,
        folder: Path,
    ) -> None:
        self.workflow_id = workflow_id
        self.receiver = receiver
        self.host = host
        self.ingest = ingest
        self.folder = folder
        self._server: Server | None = None
        self._stopping = threading.Event()
        self._busy = threading.BoundedSemaphore(receiver.max_concurrent_requests)
        self._inflight: set[str] = set()  # delivery ids being received now
        self._inflight_lock = threading.Lock()
        self._idle: set[socket.socket] = set()  # connections waiting for their next request
        self._sharing: Sharing | None = None
        self._handed = HandedContexts(receiver, folder)

    @property
    def port(self) -> int:
        return self._server.port if self._server is not None else self.receiver.port

    @property
    def active_connections(self) -> int:
        return self._server.active if self._server is not None else 0

    @classmethod
    def from_settings(
        cls, workflow_id: str, settings: dict[str, Any], folder: Path, ingest: Ingest
    ) -> StowListener:
        """The listener a worker process serves handed connections with (`settings`)."""
        receiver = StowRsReceiverSetting.model_validate(settings)
        return cls(workflow_id, receiver, "", ingest, folder)

    def settings(self) -> dict[str, Any]:
        return self.receiver.model_dump(mode="json", by_alias=True)

    def share(self, sharing: Sharing) -> None:
        self._sharing = sharing

    def _make_server(
        self, secure: tls.ServerContexts | None, handle: Callable[..., None] | None = None
    ) -> Server:
        receiver = self.receiver
        timeout = float(receiver.request_timeout_seconds)
        # Keep-alive connections idle between requests count too: room for twice as many.
        limits = Limits(timeout, 2 * receiver.max_concurrent_requests)
        server = Server(
            f"workflow {self.workflow_id}",
            self.host,
            receiver.port,
            limits,
            handle or self._serve,
            _close if secure else _busy_at_once,  # no cleartext answer on a TLS port
            secure,
        )
        server.fingerprints = frozenset()  # checked per request here: 403, not a silent close
        return server

    def start(self) -> None:
        secure = server_contexts(self.receiver, self.folder)
        server = self._make_server(secure)
        sharing = self._sharing
        if sharing is not None:
            server.hand = partial(sharing.offer, self)
        server.start()
        self.ingest.spool.incoming.mkdir(parents=True, exist_ok=True)
        self._server = server
        if sharing is not None:  # once it listens: a failed start leaves nothing
            sharing.share(self)
        log.info(
            "workflow %s listening on %s:%d for STOW-RS at /%s/studies%s",
            self.workflow_id,
            self.host,
            self.port,
            self.receiver.service_name.strip(),
            " (TLS)" if secure else "",
        )

    def update(self, receiver: StowRsReceiverSetting) -> None:
        """Credentials, header mapping and limits apply to the next request."""
        self.receiver = receiver

    def stop(self, grace_seconds: float = 10.0) -> None:
        server = self._server
        if server is None:
            return
        server.stop_accepting()
        self._stopping.set()  # requests still arriving hear 503
        self._end_idle()  # keep-alive connections between requests: closed now
        if self._sharing is not None:  # and those served by worker processes
            self._sharing.unshare(self)
        if not server.wait_idle(grace_seconds):
            self._end_idle()
            if self._sharing is not None:
                self._sharing.abort(self)
            server.wait_idle(_STOP_WAIT_SECONDS)
        self._server = None
        log.info("workflow %s stopped listening", self.workflow_id)

    def serve_handed(self, connection: socket.socket, admission: Admission) -> None:
        """Serve a connection the runtime accepted (in a worker process), TLS included."""
        server = self._make_server(self._handed.get(), partial(self._serve, admission=admission))
        server.serve_handed(connection)

    def stop_handed(self) -> None:
        self._stopping.set()
        self._end_idle()

    def abort_handed(self) -> None:
        self._end_idle()  # what has become idle since

    # ------------------------------------------------------------------ admissions
    def admit(self, slot: str) -> bool:
        """One of `MaxConcurrentRequests` ("request"), or a delivery no other request is
        receiving now ("delivery:<id>"): for this process's connections and for those its
        worker processes serve."""
        if slot == "request":
            if not self._busy.acquire(blocking=False):
                return False
            if self._stopping.is_set():
                self._busy.release()
                return False
            return True
        delivery_id = slot.removeprefix("delivery:")
        with self._inflight_lock:
            if delivery_id in self._inflight:
                return False
            self._inflight.add(delivery_id)
            return True

    def release(self, slot: str) -> None:
        if slot == "request":
            self._busy.release()
            return
        with self._inflight_lock:
            self._inflight.discard(slot.removeprefix("delivery:"))

    # ------------------------------------------------------------------ a connection
    def _serve(
        self,
        connection: socket.socket,
        certificate: tls.PeerCertificate | None,
        admission: Admission | None = None,
    ) -> None:
        """HTTP/1.1 requests on one connection, one at a time, until either side closes;
        `admission`: who counts its requests (this listener, or a worker process's runtime)."""
        admission = admission or self
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        where = peer(connection)
        connection.settimeout(float(self.receiver.request_timeout_seconds))
        while True:
            try:
                event = self._next_request(http, connection)
                if not isinstance(event, h11.Request):
                    return  # closed, or the peer went away between requests
                keep = self._request(http, connection, event, where, certificate, admission)
            except (TimeoutError, ConnectionError, OSError):
                return  # silent or gone: close, never 408
            except h11.RemoteProtocolError as exc:
                _answer(http, connection, 400, _error_body(f"malformed HTTP: {exc}"), close=True)
                return
            if not keep or http.our_state is h11.MUST_CLOSE:
                return
            try:
                http.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _next_request(self, http: h11.Connection, connection: socket.socket) -> object:
        """The next request's head; while waiting, `stop` may end the connection."""
        with self._inflight_lock:
            if self._stopping.is_set():
                return None
            self._idle.add(connection)
        try:
            return _next_event(http, connection)
        finally:
            with self._inflight_lock:
                self._idle.discard(connection)

    def _end_idle(self) -> None:
        """Wake the threads of idle connections (their read ends) so that they close."""
        with self._inflight_lock:
            idle = list(self._idle)
        for connection in idle:
            with contextlib.suppress(OSError):  # the plain socket's call, TLS or not
                socket.socket.shutdown(connection, socket.SHUT_RD)

    def _request(
        self,
        http: h11.Connection,
        connection: socket.socket,
        request: h11.Request,
        where: str,
        certificate: tls.PeerCertificate | None,
        admission: Admission,
    ) -> bool:
        """Serve one request; whether the connection may carry another."""
        request_id = str(uuid.uuid4())
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in request.headers
        }
        try:
            study = self._route(request)
            self._authorize(headers, certificate)
            boundary = _boundary(headers.get("content-type", ""))
            self._check_size(headers)
            if self._stopping.is_set() or not admission.admit("request"):
                raise _RefusalError(503, "too busy or stopping", (("Retry-After", _RETRY_AFTER),))
        except _RefusalError as exc:
            log.warning(
                "STOW-RS request %s from %s for workflow %s: %d %s",
                request_id,
                where,
                self.workflow_id,
                exc.code,
                exc,
            )
            if exc.code == 200:  # OPTIONS, HEAD: a health check
                _answer(http, connection, 200, b"", head=request.method == b"HEAD")
                return _drain_body(http, connection)
            _answer(http, connection, exc.code, _error_body(str(exc)), exc.headers, close=True)
            return False
        delivery_id = self._delivery_id(headers)
        claim = f"delivery:{delivery_id}"
        if delivery_id is not None and not admission.admit(claim):
            admission.release("request")
            log.warning(
                "STOW-RS request %s from %s for workflow %s: 503: delivery %s is still "
                "being received",
                request_id,
                where,
                self.workflow_id,
                delivery_id,
            )
            retry = (("Retry-After", _RETRY_AFTER),)
            busy = _error_body("the same delivery is in progress")
            _answer(http, connection, 503, busy, retry, close=True)
            return False
        slots = ["request"] if delivery_id is None else ["request", claim]

        def release() -> None:  # before the answer: its sender may send the next at once
            while slots:
                admission.release(slots.pop())

        try:
            return self._store(
                http,
                connection,
                request_id,
                where,
                certificate,
                headers,
                boundary,
                study,
                delivery_id,
                release,
            )
        finally:
            release()

    def _delivery_id(self, headers: dict[str, str]) -> str | None:
        name = self.receiver.deduplicate_header.strip().lower()
        value = headers.get(name, "").strip() if name else ""
        return value or None

    def _route(self, request: h11.Request) -> str:
        """The study UID in the URL ("" for /studies); _RefusalError for any other request."""
        target = request.target.decode("latin-1").split("?", 1)[0]
        prefix = f"/{self.receiver.service_name.strip()}/studies"
        if target != prefix and not target.startswith(prefix + "/"):
            raise _RefusalError(404, f"no such resource (STOW-RS is at {prefix})")
        study = target[len(prefix) :].strip("/")
        if study and not _STUDY.match(study):
            raise _RefusalError(404, "the path after /studies/ is not a Study Instance UID")
        if request.method in (b"OPTIONS", b"HEAD"):
            raise _RefusalError(200, "health check")
        if request.method != b"POST":
            raise _RefusalError(
                405, "only POST stores instances", (("Allow", "POST, OPTIONS, HEAD"),)
            )
        return study

    def _authorize(self, headers: dict[str, str], certificate: tls.PeerCertificate | None) -> None:
        receiver = self.receiver
        kind = receiver.authentication_type
        allowed = tls.fingerprints(receiver.client_certificate_thumb_print)
        if allowed and (certificate is None or certificate.sha256 not in allowed):
            raise _RefusalError(403, "client certificate not allowed (ClientCertificateThumbPrint)")
        if kind == StowAuthentication.Certificate and certificate is None:
            raise _RefusalError(403, "a client certificate is required")
        given = headers.get("authorization", "")
        challenge = (("WWW-Authenticate", 'Basic realm="soupflow"'),)
        if kind == StowAuthentication.Basic:
            expected = f"{tls.secret(receiver.user_name)}:{tls.secret(receiver.password)}"
            token = base64.b64encode(expected.encode("utf-8")).decode("ascii")
            if not hmac.compare_digest(given.encode(), f"Basic {token}".encode()):
                raise _RefusalError(401, "bad or missing credentials", challenge)
        elif kind == StowAuthentication.Bearer:
            token = tls.secret(receiver.bearer_token)
            if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise _RefusalError(
                    401, "bad or missing bearer token", (("WWW-Authenticate", "Bearer"),)
                )

    def _check_size(self, headers: dict[str, str]) -> None:
        limit = self.receiver.max_request_bytes
        declared = headers.get("content-length", "")
        if limit and declared.isdigit() and int(declared) > limit:
            raise _RefusalError(413, f"the body is larger than MaxRequestBytes ({limit})")

    def _store(
        self,
        http: h11.Connection,
        connection: socket.socket,
        request_id: str,
        where: str,
        certificate: tls.PeerCertificate | None,
        headers: dict[str, str],
        boundary: str,
        study: str,
        delivery_id: str | None,
        release: Callable[[], None],
    ) -> bool:
        if headers.get("expect", "").lower() == "100-continue":
            connection.sendall(http.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = _Body(self.ingest.spool.incoming)
        parser = MultipartParser(boundary, body.callbacks())  # type: ignore[arg-type]
        received = 0
        limit = self.receiver.max_request_bytes
        try:
            while True:
                event = _next_event(http, connection)
                if isinstance(event, h11.Data):
                    received += len(event.data)
                    if limit and received > limit:
                        raise _RefusalError(
                            413, f"the body is larger than MaxRequestBytes ({limit})"
                        )
                    parser.write(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # the peer closed mid-body
                    raise ConnectionError("the body was cut off")
            parser.finalize()
        except _RefusalError as exc:
            body.discard()
            _answer(http, connection, exc.code, _error_body(str(exc)), close=True)
            return False
        except OSError:
            body.discard()
            if body.failure is None:
                raise  # the connection: nothing stored, nothing to answer
            _answer(
                http,
                connection,
                503,
                _error_body("cannot write the request to disk (A700)"),
                (("Retry-After", _RETRY_AFTER),),
                close=True,
            )
            return False
        except Exception as exc:  # python-multipart's framing errors
            body.discard()
            _answer(
                http,
                connection,
                400,
                _error_body(f"malformed multipart body: {type(exc).__name__}"),
                close=True,
            )
            return False
        if not body.ended or not body.parts:
            body.discard()
            reason = "no closing boundary: the body is truncated" if body.parts else "no parts"
            _answer(http, connection, 400, _error_body(reason), close=True)
            return False
        address, _, port = where.rpartition(":")  # "" when the peer left before we looked
        origin = Origin(
            peer_address=address,
            peer_port=int(port) if port.isdigit() else 0,
            client_cert_sha256=certificate.sha256 if certificate else "",
            client_cert_subject=certificate.subject if certificate else "",
            transport=TRANSPORT,
            details=json.dumps(
                {"Headers": self._mapped(headers), "StowStudyInstanceUID": study}, sort_keys=True
            ),
        )
        results = [self._commit(part, origin, study, delivery_id) for part in body.parts]
        code, document = _response(results)
        stored = sum(
            1 for _, _, result in results if status.category(result) == status.Category.SUCCESS
        )
        log.info(
            "STOW-RS request %s from %s%s for workflow %s: %d parts, %d bytes, %d stored: %d",
            request_id,
            where,
            f" (certificate {certificate.sha256[:16]})" if certificate else "",
            self.workflow_id,
            len(results),
            received,
            stored,
            code,
            extra=fields(
                workflow=self.workflow_id,
                request_id=request_id,
                delivery_id=delivery_id,
                peer=where,
                certificate=certificate.sha256[:16] if certificate else None,
                parts=len(results),
                bytes=received,
                status=code,
            ),
        )
        if stored:
            self.ingest.hold(self.workflow_id)  # once per request, however many parts
        extra = (("Retry-After", _RETRY_AFTER),) if code == 503 else ()
        release()
        _answer(http, connection, code, json.dumps(document).encode(), extra, dicom_json=True)
        return True

    def _mapped(self, headers: dict[str, str]) -> dict[str, str]:
        return {
            name: headers[name.lower()]
            for name in self.receiver.header_parameters
            if name.lower() in headers
        }

    def _commit(
        self, part: _Part, origin: Origin, study: str, delivery_id: str | None
    ) -> tuple[str, str, int]:
        """(SOP class, SOP instance, status) of one part, committed through ingest; a replay
        of a delivery (same id, same instance, same bytes) is answered as stored again."""
        media = part.content_type.split(";", 1)[0].strip().lower()
        try:  # the file meta only: ingest checks the dataset against it (0xA900)
            meta = read_file_meta_info(part.path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            sop_instance = str(meta.MediaStorageSOPInstanceUID)
            syntax = str(meta.TransferSyntaxUID)
            found_study = _study(part.path) if study else ""
        except Exception:  # not a PS3.10 file: pydicom says why, in many ways
            part.path.unlink(missing_ok=True)
            return "", "", status.CANNOT_UNDERSTAND
        if media not in ("", "application/dicom"):
            part.path.unlink(missing_ok=True)
            return sop_class, sop_instance, status.CANNOT_UNDERSTAND
        if study and found_study != study:
            part.path.unlink(missing_ok=True)
            return sop_class, sop_instance, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        delivery = None
        if delivery_id is not None:
            delivery = Delivery(delivery_id, _sha256(part.path))
            try:
                seen = self.ingest.queue.delivered(self.workflow_id, delivery_id, sop_instance)
            except QueueError:
                part.path.unlink(missing_ok=True)
                return sop_class, sop_instance, status.OUT_OF_RESOURCES
            if seen is not None:
                part.path.unlink(missing_ok=True)
                if seen == delivery.sha256:
                    log.info(
                        "SOPInstanceUID %s of delivery %s was stored before: answered as "
                        "stored, not queued again",
                        sop_instance,
                        delivery_id,
                    )
                    return sop_class, sop_instance, status.SUCCESS
                log.warning(
                    "SOPInstanceUID %s of delivery %s came before with other bytes: refused "
                    "(0x0110)",
                    sop_instance,
                    delivery_id,
                )
                return sop_class, sop_instance, PROCESSING_FAILURE
        received = ReceivedObject(
            path=part.path,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_instance,
            transfer_syntax_uid=syntax,
        )
        code = self.ingest.store(
            self.workflow_id,
            origin,
            received,
            float(self.receiver.deduplicate_window_seconds),
            delivery,
        )
        return sop_class, sop_instance, code


def _study(path: Path) -> str:
    """The dataset's StudyInstanceUID (read only for /studies/{study})."""
    dataset = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
    return str(dataset.get("StudyInstanceUID", ""))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _drain_body(http: h11.Connection, connection: socket.socket) -> bool:
    """Read a request body we do not need, so that the connection can carry the next."""
    while True:
        event = _next_event(http, connection)
        if isinstance(event, h11.EndOfMessage):
            return True
        if not isinstance(event, h11.Data):
            return False


def _boundary(content_type: str) -> str:
    """The multipart boundary; _RefusalError 415 for another media type, 400 without a boundary."""
    media, _, parameters = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise _RefusalError(415, 'the body must be multipart/related; type="application/dicom"')
    values: dict[str, str] = {}
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        values[name.strip().lower()] = value.strip().strip('"')
    kind = values.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        raise _RefusalError(415, f"parts of type {kind} are not supported (PS3.10 instances only)")
    boundary = values.get("boundary", "")
    if not boundary:
        raise _RefusalError(400, "the multipart/related Content-Type has no boundary")
    return boundary


def _response(results: list[tuple[str, str, int]]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response (PS3.18 Annex I, JSON)."""
    stored = [(c, i) for c, i, code in results if status.category(code) == status.Category.SUCCESS]
    failed = [
        (c, i, code) for c, i, code in results if status.category(code) != status.Category.SUCCESS
    ]
    document: dict[str, Any] = {"00081190": {"vr": "UR"}}
    if stored:
        document["00081199"] = {
            "vr": "SQ",
            "Value": [_reference(sop_class, sop_instance) for sop_class, sop_instance in stored],
        }
    if failed:
        document["00081198"] = {
            "vr": "SQ",
            "Value": [
                _reference(sop_class, sop_instance) | {"00081197": {"vr": "US", "Value": [code]}}
                for sop_class, sop_instance, code in failed
            ],
        }
    if not failed:
        return 200, document
    if stored:
        return 202, document
    codes = [code for _, _, code in failed]
    if any(status.category(code) == status.Category.TRANSIENT for code in codes):
        return 503, document
    if all(code == status.CANNOT_UNDERSTAND for code in codes):
        return 400, document
    return 409, document


def _reference(sop_class: str, sop_instance: str) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


def _error_body(reason: str) -> bytes:
    return json.dumps({"error": reason}).encode("utf-8")


def _answer(
    http: h11.Connection,
    connection: socket.socket,
    code: int,
    body: bytes,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    close: bool = False,
    head: bool = False,
    dicom_json: bool = False,
) -> None:
    media = "application/dicom+json" if dicom_json else "application/json"
    fields = [
        ("Content-Type", media),
        ("Content-Length", str(len(body))),
        *headers,
    ]
    if close:
        fields.append(("Connection", "close"))
    try:
        data = http.send(h11.Response(status_code=code, headers=fields))
        if not head:
            data += http.send(h11.Data(data=body))
        data += http.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return
    connection.sendall(data)
    if close:
        _linger(connection)


def _linger(connection: socket.socket) -> None:
    """Answered before the body was read: end our side, then read (and drop) what the
    client still sends for a moment, so that closing does not reset the connection before
    it has read the answer (RFC 9112 9.6)."""
    try:
        connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _LINGER_SECONDS
        received = 0
        while received < _LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
            connection.settimeout(left)
            chunk = connection.recv(_READ_BYTES)
            if not chunk:
                return
            received += len(chunk)
    except OSError:
        return


def _close(connection: socket.socket) -> None:
    connection.close()


def _busy_at_once(connection: socket.socket) -> None:
    """Past the connection limit: 503 with Retry-After, without a thread."""
    try:
        drain(connection)
        connection.send(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: "
            + _RETRY_AFTER.encode()
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        connection.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        connection.close()
