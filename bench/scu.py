"""A minimal C-STORE SCU on a plain socket, for timing each acknowledgement.

pynetdicom's SCU polls its reactors (1 ms sleeps) and storescu prints no per-instance
times, so ACK latency is measured with this client: it encodes the PDUs itself (the
A-ASSOCIATE PDUs with pynetdicom's codec), sends each instance as soon as it is due at a
fixed rate, and times from the first byte sent to the last byte of the C-STORE response.
"""

from __future__ import annotations

import socket
import struct
import time
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

_PDU = struct.Struct(">BxI")
_PDV = struct.Struct(">IBB")
_SECONDS = 30.0
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# The bytes a requestor sends and reads (PS3.8 9.3), shared with the tests' raw peer.
RELEASE_REQUEST = _PDU.pack(0x05, 4) + bytes(4)


def associate_request(
    calling_aet: str,
    called_aet: str,
    contexts: list[tuple[int, str, str]],
    max_pdu: int = 0,
    application_context: str = APPLICATION_CONTEXT,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing (context id, SOP class, transfer syntax) contexts."""
    request = A_ASSOCIATE()
    request.application_context_name = application_context
    request.calling_ae_title, request.called_ae_title = calling_aet, called_aet
    for context_id, sop_class, syntax in contexts:
        context = build_context(sop_class, syntax)
        context.context_id = context_id
        request.presentation_context_definition_list.append(context)
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    request.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return bytes(pdu.encode())


def store_command(
    sop_class: str, sop_instance: str, message_id: int, command_field: int = 0x0001
) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian, with its group length)."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = command_field
    command.MessageID = message_id
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance
    encoded = encode(command, True, True)
    assert encoded is not None
    return struct.pack("<HHII", 0, 0, 4, len(encoded)) + encoded


def pdv_pdu(context: int, control: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV."""
    item = _PDV.pack(len(value) + 2, context, control) + value
    return _PDU.pack(0x04, len(item)) + item


def read_pdu(connection: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body) of the next PDU; EOFError when the peer closes first."""
    pdu_type, length = _PDU.unpack(_read(connection, _PDU.size))
    return pdu_type, _read(connection, length)


def _read(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise EOFError("the receiver closed the connection")
        data += chunk
    return bytes(data)


class StoreClient:
    """One association to `port`, proposing the SOP classes and transfer syntaxes of `files`."""

    def __init__(self, port: int, files: list[Path], called_aet: str = "SOUPFLOW") -> None:
        self.connection = socket.create_connection(("127.0.0.1", port), timeout=_SECONDS)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.objects = [_split(path) for path in files]
        proposals = sorted({(sop_class, syntax) for sop_class, syntax, *_ in self.objects})
        self.context_of = {proposal: 2 * index + 1 for index, proposal in enumerate(proposals)}
        contexts = [
            (cid, sop_class, syntax) for (sop_class, syntax), cid in self.context_of.items()
        ]
        self.connection.sendall(associate_request("BENCH", called_aet, contexts))
        pdu_type, body = read_pdu(self.connection)
        if pdu_type != 0x02:
            raise RuntimeError(f"association not accepted (PDU type 0x{pdu_type:02X})")
        accept = A_ASSOCIATE_AC()
        accept.decode(_PDU.pack(pdu_type, len(body)) + body)
        self.fragment = (accept.to_primitive().maximum_length_received or 1 << 20) - _PDV.size

    def latencies(self, rate: float) -> list[float]:
        """Send every object, the n-th when n / rate seconds have passed; each ACK's delay."""
        delays: list[float] = []
        start = time.perf_counter()
        for number, (sop_class, syntax, sop_instance, data) in enumerate(self.objects):
            due = start + number / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent = time.perf_counter()
            context = self.context_of[(sop_class, syntax)]
            command = store_command(sop_class, sop_instance, number + 1)
            self.connection.sendall(self._store_pdus(context, command, data))
            status = self._response_status()
            delays.append(time.perf_counter() - sent)
            if status != 0x0000:
                raise RuntimeError(f"C-STORE answered 0x{status:04X}")
        return delays

    def release(self) -> None:
        self.connection.sendall(RELEASE_REQUEST)
        read_pdu(self.connection)
        self.connection.close()

    def _store_pdus(self, context: int, command: bytes, data: bytes) -> bytes:
        parts = [pdv_pdu(context, 0x03, command)]
        for start in range(0, len(data), self.fragment):
            last = start + self.fragment >= len(data)
            parts.append(
                pdv_pdu(context, 0x02 if last else 0x00, data[start : start + self.fragment])
            )
        return b"".join(parts)

    def _response_status(self) -> int:
        command = b""
        while True:
            pdu_type, body = read_pdu(self.connection)
            if pdu_type != 0x04:
                raise RuntimeError(f"expected P-DATA, got PDU type 0x{pdu_type:02X}")
            _, _, control = _PDV.unpack_from(body)
            command += body[_PDV.size :]
            if control & 0x02:
                return int(decode(BytesIO(command), True, True).Status)


def _split(path: Path) -> tuple[str, str, str, bytes]:
    """(SOP class, transfer syntax, SOP instance, dataset bytes) of a Part 10 file."""
    meta = dcmread(path, stop_before_pixels=True).file_meta
    raw = path.read_bytes()
    (group_length,) = struct.unpack("<I", raw[140:144])
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPInstanceUID),
        raw[144 + group_length :],
    )
