"""DIMSE command sets for C-STORE and C-ECHO, both roles. Pure. Upstream: acceptor, requestor.

A command set is always Implicit VR Little Endian (PS3.7 6.3.1), holds group 0000 only, and
its elements are few and simple, so it is read and written here directly: no dataset is
built on the ACK path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from soupflow.dicom.part10 import uid_bytes, uid_text

# Command Field values, PS3.7 Annex E (Table E.1-1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101  # Command Data Set Type: no dataset follows
_DATA_SET_PRESENT = 0x0000  # any other value means one follows; 0x0000 is the usual one
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

_AFFECTED_SOP_CLASS_UID = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
_PRIORITY = 0x00000700
_COMMAND_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_AFFECTED_SOP_INSTANCE_UID = 0x00001000
_ELEMENT_HEADER = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class CommandError(ValueError):
    """The bytes are not a usable command set."""


@dataclass(frozen=True)
class Command:
    """The fields of a request that the SCP acts on."""

    command_field: int
    message_id: int
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    has_data_set: bool


@dataclass(frozen=True)
class Response:
    """The fields of a response that the SCU acts on."""

    command_field: int
    message_id_being_responded_to: int
    status: int


def _values(data: bytes) -> dict[int, bytes]:
    """Element number -> value bytes of a group 0000 command set."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if offset + _ELEMENT_HEADER.size > end:
            raise CommandError("the command set ends inside an element header")
        group, element, length = _ELEMENT_HEADER.unpack_from(data, offset)
        offset += _ELEMENT_HEADER.size
        if group != 0 or offset + length > end:
            raise CommandError(
                f"element ({group:04X},{element:04X}) is not a command element or overruns"
            )
        values[element] = data[offset : offset + length]
        offset += length
    return values


def _unsigned(values: dict[int, bytes], *elements: int, lacking: str) -> list[int]:
    """The US values of required elements, or CommandError saying what is `lacking`."""
    try:
        return [_US.unpack(values[element][:2])[0] for element in elements]
    except (KeyError, struct.error) as exc:
        raise CommandError(f"the command set lacks {lacking}") from exc


def parse_command(data: bytes) -> Command:
    """The request in a command set (PS3.7 9.3.1.1 for C-STORE, 9.3.5.1 for C-ECHO)."""
    values = _values(data)
    command_field, message_id, data_set_type = _unsigned(
        values,
        _COMMAND_FIELD,
        _MESSAGE_ID,
        _COMMAND_DATA_SET_TYPE,
        lacking="Command Field, Message ID or Data Set Type",
    )
    return Command(
        command_field=command_field,
        message_id=message_id,
        affected_sop_class_uid=uid_text(values.get(_AFFECTED_SOP_CLASS_UID, b"")),
        affected_sop_instance_uid=uid_text(values.get(_AFFECTED_SOP_INSTANCE_UID, b"")),
        has_data_set=data_set_type != NO_DATA_SET,
    )


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def response(request: Command, status: int) -> bytes:
    """The response command set to a C-STORE-RQ or C-ECHO-RQ (PS3.7 9.3.1.2, 9.3.5.2)."""
    is_store = request.command_field == C_STORE_RQ
    elements = [
        _element(_AFFECTED_SOP_CLASS_UID, uid_bytes(request.affected_sop_class_uid)),
        _element(_COMMAND_FIELD, _US.pack(C_STORE_RSP if is_store else C_ECHO_RSP)),
        _element(_MESSAGE_ID_BEING_RESPONDED_TO, _US.pack(request.message_id)),
        _element(_COMMAND_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        _element(_STATUS, _US.pack(status)),
    ]
    if is_store:
        elements.append(
            _element(_AFFECTED_SOP_INSTANCE_UID, uid_bytes(request.affected_sop_instance_uid))
        )
    return _command_set(elements)


def parse_response(data: bytes) -> Response:
    """The response in a command set (PS3.7 9.3.1.2 for C-STORE, 9.3.5.2 for C-ECHO)."""
    command_field, responded_to, code = _unsigned(
        _values(data),
        _COMMAND_FIELD,
        _MESSAGE_ID_BEING_RESPONDED_TO,
        _STATUS,
        lacking="Command Field, Message ID Being Responded To or Status",
    )
    return Response(command_field, responded_to, code)


def _command_set(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(0x00000000, _UL.pack(len(body))) + body


def store_request(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set, priority medium, a dataset follows (PS3.7 9.3.1.1)."""
    return _command_set(
        [
            _element(_AFFECTED_SOP_CLASS_UID, uid_bytes(sop_class_uid)),
            _element(_COMMAND_FIELD, _US.pack(C_STORE_RQ)),
            _element(_MESSAGE_ID, _US.pack(message_id)),
            _element(_PRIORITY, _US.pack(0)),
            _element(_COMMAND_DATA_SET_TYPE, _US.pack(_DATA_SET_PRESENT)),
            _element(_AFFECTED_SOP_INSTANCE_UID, uid_bytes(sop_instance_uid)),
        ]
    )


def echo_request(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return _command_set(
        [
            _element(_AFFECTED_SOP_CLASS_UID, uid_bytes(VERIFICATION_SOP_CLASS)),
            _element(_COMMAND_FIELD, _US.pack(C_ECHO_RQ)),
            _element(_MESSAGE_ID, _US.pack(message_id)),
            _element(_COMMAND_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        ]
    )
