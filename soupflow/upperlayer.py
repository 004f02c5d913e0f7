"""DICOM upper layer (PS3.8) for an acceptor: PDU framing and association negotiation.

Upstream: association. Pure: bytes in, bytes out. The A-ASSOCIATE PDUs (rich, rare) are
decoded and encoded with pynetdicom's PDU classes and its unrestricted-storage context
negotiation; the PDUs of the data phase (P-DATA-TF, A-RELEASE, A-ABORT: simple, one per
fragment) are framed here, so the ACK path runs no generic PDU machinery.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import cast

from pydicom.uid import UID
from pynetdicom import _globals
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_unrestricted
from pynetdicom.service_class import ServiceClass, StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

from soupflow.dicomfile import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# PDU types, PS3.8 9.3.1.
A_ASSOCIATE_RQ_PDU = 0x01
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

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # rejected-transient, presentation, local limit exceeded

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1
VERIFICATION = "1.2.840.10008.1.1"
# Bounds for the PDUs read whole (not P-DATA): an A-ASSOCIATE-RQ with 128 contexts is ~20 KB;
# user identity items may carry SAML assertions or Kerberos tickets of up to 64 KB each.
MAX_CONTROL_PDU_BYTES = 1024 * 1024


class ProtocolError(ValueError):
    """The peer broke the upper layer protocol; the association is aborted with `reason`."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PDU_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class AcceptedContext:
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class Request:
    """An A-ASSOCIATE-RQ, as far as an acceptor decides on it."""

    calling_aet: str
    called_aet: str
    primitive: A_ASSOCIATE
    protocol_version: int

    @property
    def peer_max_pdu(self) -> int:
        """The largest PDU the requestor receives (0: no limit)."""
        return int(self.primitive.maximum_length_received or 0)

    def rejection(self) -> tuple[int, int, int] | None:
        """Why the request cannot be accepted by any acceptor, or None."""
        if not self.protocol_version & 0x0001:
            return REJECT_PROTOCOL_VERSION
        if str(self.primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            return REJECT_APPLICATION_CONTEXT
        return None


def decode_request(pdu: bytes) -> Request:
    """An A-ASSOCIATE-RQ PDU (header included), or ProtocolError."""
    decoded = A_ASSOCIATE_RQ()
    try:
        decoded.decode(pdu)
        primitive = decoded.to_primitive()
    except Exception as exc:  # pynetdicom raises many kinds for undecodable items
        raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {type(exc).__name__}") from exc
    return Request(
        calling_aet=str(primitive.calling_ae_title).strip(),
        called_aet=str(primitive.called_ae_title).strip(),
        primitive=primitive,
        protocol_version=int(decoded.protocol_version),
    )


_SUPPORTED = [build_context(VERIFICATION, _globals.DEFAULT_TRANSFER_SYNTAXES)]
_SERVED_CLASSES = (StorageServiceClass, VerificationServiceClass, ServiceClass)
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03  # presentation context result, PS3.8 9.3.3.2


def accept(request: Request, our_max_pdu: int) -> tuple[dict[int, AcceptedContext], bytes]:
    """The accepted presentation contexts and the A-ASSOCIATE-AC PDU.

    Verification with the default transfer syntaxes; every storage SOP class, private and
    unknown ones included, in the first transfer syntax proposed (PS3.4 B.2.2 lets a
    storage SCP accept any); other services are rejected. SCP/SCU role selection is
    answered; asynchronous operations, extended negotiation and user identity are not (so
    the defaults apply: one operation at a time, PS3.7 D.3.3.3).
    """
    requested = request.primitive
    roles = {uid: (item.scu_role, item.scp_role) for uid, item in _role_items(requested).items()}
    results, reply_roles = negotiate_unrestricted(
        requested.presentation_context_definition_list, _SUPPORTED, roles
    )
    for context in results:
        if context.result == 0x00 and not _storage_or_verification(str(context.abstract_syntax)):
            context.result = ABSTRACT_SYNTAX_NOT_SUPPORTED
    refused = _refused(results)
    reply_roles = [role for role in reply_roles if role.sop_class_uid not in refused]
    accepted = {
        cast(int, context.context_id): AcceptedContext(
            str(context.abstract_syntax), str(context.transfer_syntax[0])
        )
        for context in results
        if context.result == 0x00
    }
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = our_max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = requested.calling_ae_title
    primitive.called_ae_title = requested.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = [maximum, implementation, version, *reply_roles]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(primitive)
    return accepted, pdu.encode()


def _storage_or_verification(abstract_syntax: str) -> bool:
    """Not a known service other than Storage or Verification (unknown and private SOP
    classes are taken for storage). pynetdicom's unrestricted negotiation alone also lets
    some query services through (it looks them up by a keyword its tables spell differently)."""
    return uid_to_service_class(abstract_syntax) in _SERVED_CLASSES


def _refused(results: list[PresentationContext]) -> set[str]:
    return {str(context.abstract_syntax) for context in results if context.result != 0x00}


def _role_items(primitive: A_ASSOCIATE) -> dict[UID, SCP_SCU_RoleSelectionNegotiation]:
    return {
        cast(UID, item.sop_class_uid): item
        for item in primitive.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
    }


def reject(result: int, source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def release_response() -> bytes:
    """An A-RELEASE-RP PDU."""
    return PDU_HEADER.pack(A_RELEASE_RP_PDU, 4) + bytes(4)


def abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (us) with `reason`."""
    return PDU_HEADER.pack(A_ABORT_PDU, 4) + bytes((0, 0, ABORT_SERVICE_PROVIDER, reason))


def command_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying `command`, fragmented to the peer's maximum PDU length."""
    # The maximum length counts the PDU's variable field: PDV header and value (PS3.8 D.1).
    room = max(peer_max_pdu - PDV_HEADER.size, 1) if peer_max_pdu else max(len(command), 1)
    fragments = [command[start : start + room] for start in range(0, len(command), room)]
    pdus = []
    for index, fragment in enumerate(fragments):
        control = COMMAND_FRAGMENT | (LAST_FRAGMENT if index == len(fragments) - 1 else 0)
        item = PDV_HEADER.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(PDU_HEADER.pack(P_DATA_TF_PDU, len(item)) + item)
    return b"".join(pdus)
