"""Association negotiation (PS3.8 7.1, 9.3.2-9.3.4): what an acceptor decides. Pure.

Upstream: acceptor. The A-ASSOCIATE PDUs (rich, rare) are decoded and encoded with
pynetdicom's PDU classes and its unrestricted-storage context negotiation; the rules soupflow
adds (which services it serves, why a request is refused) are here, by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast

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

from soupflow.dicom.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from soupflow.dicom.pdu import ProtocolError


# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
class Rejection(NamedTuple):
    result: int  # 1 rejected-permanent, 2 rejected-transient
    source: int  # 1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)
    diagnostic: int

    @property
    def transient(self) -> bool:
        return self.result == 0x02


CALLING_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x03)
CALLED_AE_NOT_RECOGNIZED = Rejection(0x01, 0x01, 0x07)
APPLICATION_CONTEXT_NOT_SUPPORTED = Rejection(0x01, 0x01, 0x02)
PROTOCOL_VERSION_NOT_SUPPORTED = Rejection(0x01, 0x02, 0x02)
LOCAL_LIMIT_EXCEEDED = Rejection(0x02, 0x03, 0x02)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1
VERIFICATION = "1.2.840.10008.1.1"


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

    def rejection(self) -> Rejection | None:
        """Why the request cannot be accepted by any acceptor, or None."""
        if not self.protocol_version & 0x0001:
            return PROTOCOL_VERSION_NOT_SUPPORTED
        if str(self.primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            return APPLICATION_CONTEXT_NOT_SUPPORTED
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
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
# Stored as received, a deflated dataset could not be checked or converted here.
DEFLATED = "1.2.840.10008.1.2.1.99"


def accept(request: Request, our_max_pdu: int) -> tuple[dict[int, AcceptedContext], bytes]:
    """The accepted presentation contexts and the A-ASSOCIATE-AC PDU.

    Verification with the default transfer syntaxes; every storage SOP class, private and
    unknown ones included, in the first transfer syntax proposed (PS3.4 B.2.2 lets a
    storage SCP accept any) except Deflated Explicit VR Little Endian: the next syntax
    proposed is taken instead, and a context that proposes only deflate is refused
    (transfer syntaxes not supported), so a sender falls back at negotiation rather than
    hear 0xC000 for every store. Other services are rejected. SCP/SCU role selection is
    answered; asynchronous operations, extended negotiation and user identity are not (so
    the defaults apply: one operation at a time, PS3.7 D.3.3.3).
    """
    requested = request.primitive
    roles = {uid: (item.scu_role, item.scp_role) for uid, item in _role_items(requested).items()}
    results, reply_roles = negotiate_unrestricted(
        requested.presentation_context_definition_list, _SUPPORTED, roles
    )
    proposed = {
        cast(int, context.context_id): [str(syntax) for syntax in context.transfer_syntax]
        for context in requested.presentation_context_definition_list
    }
    for context in results:
        if context.result == 0x00 and not _storage_or_verification(str(context.abstract_syntax)):
            context.result = ABSTRACT_SYNTAX_NOT_SUPPORTED
        elif context.result == 0x00 and str(context.transfer_syntax[0]) == DEFLATED:
            others = [s for s in proposed.get(cast(int, context.context_id), []) if s != DEFLATED]
            if others:
                context.transfer_syntax = [UID(others[0])]
            else:
                context.result = TRANSFER_SYNTAXES_NOT_SUPPORTED
    refused = _refused(results)
    reply_roles = [role for role in reply_roles if role.sop_class_uid not in refused]
    accepted = {
        cast(int, context.context_id): AcceptedContext(
            str(context.abstract_syntax), str(context.transfer_syntax[0])
        )
        for context in results
        if context.result == 0x00
    }
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = requested.calling_ae_title
    primitive.called_ae_title = requested.called_ae_title
    primitive.result = 0x00
    primitive.result_source = 0x01
    primitive.presentation_context_definition_results_list = results
    primitive.user_information = [*_our_user_information(our_max_pdu), *reply_roles]
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


def reject(rejection: Rejection) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    primitive = A_ASSOCIATE()
    primitive.result = rejection.result
    primitive.result_source = rejection.source
    primitive.diagnostic = rejection.diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(primitive)
    return pdu.encode()


_UserItem = (
    MaximumLengthNotification
    | ImplementationClassUIDNotification
    | ImplementationVersionNameNotification
    | SCP_SCU_RoleSelectionNegotiation
)


def _our_user_information(our_max_pdu: int) -> list[_UserItem]:
    """Maximum length, implementation class UID and version name (PS3.7 D.3.3.1-2)."""
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = our_max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    return [maximum, implementation, version]


# ------------------------------------------------------------------ the requestor's side
@dataclass(frozen=True)
class Proposal:
    """One presentation context we propose: a SOP class in any of some transfer syntaxes."""

    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class Acceptance:
    """An A-ASSOCIATE-AC, as far as a requestor acts on it."""

    contexts: dict[int, AcceptedContext]  # by presentation context id
    peer_max_pdu: int  # the largest PDU the acceptor receives (0: no limit)


def request(
    calling_aet: str, called_aet: str, proposals: list[Proposal], our_max_pdu: int
) -> tuple[dict[int, Proposal], bytes]:
    """The A-ASSOCIATE-RQ PDU and the proposals by context id (odd numbers, PS3.8 9.3.2.2)."""
    by_id = {2 * index + 1: proposal for index, proposal in enumerate(proposals)}
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    primitive.calling_ae_title = calling_aet
    primitive.called_ae_title = called_aet
    for context_id, proposal in by_id.items():
        context = build_context(proposal.abstract_syntax, list(proposal.transfer_syntaxes))
        context.context_id = context_id
        primitive.presentation_context_definition_list.append(context)
    primitive.user_information = _our_user_information(our_max_pdu)  # type: ignore[assignment]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return by_id, bytes(pdu.encode())


def decode_acceptance(pdu: bytes, proposed: dict[int, Proposal]) -> Acceptance:
    """An A-ASSOCIATE-AC PDU (header included): the contexts accepted, or ProtocolError."""
    decoded = A_ASSOCIATE_AC()
    try:
        decoded.decode(pdu)
        primitive = decoded.to_primitive()
        results = primitive.presentation_context_definition_results_list
    except Exception as exc:  # pynetdicom raises many kinds for undecodable items
        raise ProtocolError(f"undecodable A-ASSOCIATE-AC: {type(exc).__name__}") from exc
    contexts: dict[int, AcceptedContext] = {}
    for context in results:
        context_id = cast(int, context.context_id)
        offered = proposed.get(context_id)
        if context.result != 0x00 or offered is None or not context.transfer_syntax:
            continue
        syntax = str(context.transfer_syntax[0])
        if syntax in offered.transfer_syntaxes:  # an acceptor may not pick one we did not offer
            contexts[context_id] = AcceptedContext(offered.abstract_syntax, syntax)
    return Acceptance(contexts, int(primitive.maximum_length_received or 0))


def decode_rejection(pdu: bytes) -> Rejection:
    """An A-ASSOCIATE-RJ PDU (header included)."""
    decoded = A_ASSOCIATE_RJ()
    try:
        decoded.decode(pdu)
    except Exception as exc:
        raise ProtocolError(f"undecodable A-ASSOCIATE-RJ: {type(exc).__name__}") from exc
    return Rejection(
        int(decoded.result or 0), int(decoded.source or 0), int(decoded.reason_diagnostic or 0)
    )
