"""DICOM upper layer PDUs (PS3.8 9.3): framing for both roles. Pure: bytes in, bytes out.

Upstream: acceptor (and the requestor to come). The data-phase PDUs (P-DATA-TF, A-RELEASE,
A-ABORT: simple, one per fragment) are framed here, so the ACK path runs no generic PDU
machinery; the A-ASSOCIATE PDUs are in `negotiation`.
"""

from __future__ import annotations

import struct

# PDU types, PS3.8 9.3.1.
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))

PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length
PDV_HEADER = struct.Struct(">IBB")  # item length, presentation context id, message control
COMMAND_FRAGMENT = 0x01  # message control header bit 0: command (else dataset), PS3.8 E.2
LAST_FRAGMENT = 0x02  # bit 1: last fragment of the command or dataset

# A-ABORT source and reason, PS3.8 9.3.8.
ABORT_SERVICE_PROVIDER = 0x02
REASON_NOT_SPECIFIED = 0x00  # timeouts and shutdown
REASON_UNRECOGNIZED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PDU_PARAMETER = 0x06

# Bounds for the PDUs read whole (not P-DATA): an A-ASSOCIATE-RQ with 128 contexts is ~20 KB;
# user identity items may carry SAML assertions or Kerberos tickets of up to 64 KB each.
MAX_CONTROL_PDU_BYTES = 1024 * 1024


class ProtocolError(ValueError):
    """The peer broke the upper layer protocol; the association is aborted with `reason`."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def release_response() -> bytes:
    """An A-RELEASE-RP PDU."""
    return PDU_HEADER.pack(A_RELEASE_RP_PDU, 4) + bytes(4)


def abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (us) with `reason`."""
    return PDU_HEADER.pack(A_ABORT_PDU, 4) + bytes((0, 0, ABORT_SERVICE_PROVIDER, reason))


def p_data(context_id: int, payload: bytes, peer_max_pdu: int, *, command: bool) -> bytes:
    """P-DATA-TF PDUs carrying `payload` (a command set or dataset bytes), fragmented to the
    peer's maximum PDU length; the last fragment is marked as such."""
    # The maximum length counts the PDU's variable field: PDV header and value (PS3.8 D.1).
    room = max(peer_max_pdu - PDV_HEADER.size, 1) if peer_max_pdu else max(len(payload), 1)
    fragments = [payload[start : start + room] for start in range(0, len(payload), room)]
    kind = COMMAND_FRAGMENT if command else 0
    pdus = []
    for index, fragment in enumerate(fragments):
        control = kind | (LAST_FRAGMENT if index == len(fragments) - 1 else 0)
        item = PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(PDU_HEADER.pack(P_DATA_TF_PDU, len(item)) + item)
    return b"".join(pdus)
