"""Negotiation decisions and the status table, on plain values (no socket)."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from bench.scu import associate_request
from soupflow.dicom import negotiation, status
from soupflow.dicom.negotiation import Proposal

CT = "1.2.840.10008.5.1.4.1.1.2"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
PRIVATE = "1.2.826.0.1.3680043.9.9999.1"


def decided(contexts: list[tuple[int, str, str]]) -> dict[int, negotiation.AcceptedContext]:
    request = negotiation.decode_request(associate_request("CALLER", "SOUPFLOW", contexts))
    accepted, _ = negotiation.accept(request, 0)
    return accepted


def test_storage_is_accepted_in_the_transfer_syntax_proposed_first() -> None:
    accepted = decided([(1, CT, JPEGBaseline8Bit), (3, CT, ExplicitVRLittleEndian)])
    assert accepted[1] == negotiation.AcceptedContext(CT, JPEGBaseline8Bit)
    assert accepted[3].transfer_syntax == ExplicitVRLittleEndian


def test_private_and_unknown_sop_classes_are_taken_for_storage() -> None:
    assert decided([(1, PRIVATE, ExplicitVRLittleEndian)])[1].abstract_syntax == PRIVATE


def test_verification_is_accepted_and_other_services_refused_at_negotiation() -> None:
    accepted = decided(
        [
            (1, negotiation.VERIFICATION, ImplicitVRLittleEndian),
            (3, MODALITY_WORKLIST_FIND, ImplicitVRLittleEndian),
        ]
    )
    assert set(accepted) == {1}


def test_a_request_with_another_application_context_is_refused() -> None:
    pdu = associate_request(
        "CALLER", "SOUPFLOW", [(1, CT, ExplicitVRLittleEndian)], application_context="1.2.3"
    )
    request = negotiation.decode_request(pdu)
    assert request.rejection() == negotiation.APPLICATION_CONTEXT_NOT_SUPPORTED
    assert not request.rejection().transient  # type: ignore[union-attr]


def test_only_the_local_limit_rejection_is_transient() -> None:
    transient = {
        name
        for name in dir(negotiation)
        if isinstance(getattr(negotiation, name), negotiation.Rejection)
        and getattr(negotiation, name).transient
    }
    assert transient == {"LOCAL_LIMIT_EXCEEDED"}


def test_our_request_is_what_an_acceptor_reads_and_its_answer_what_we_read() -> None:
    proposals = [
        Proposal(CT, (JPEGBaseline8Bit,)),
        Proposal(CT, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    ]
    proposed, pdu = negotiation.request("SENDER", "PACS", proposals, 16384)
    assert set(proposed) == {1, 3}
    request = negotiation.decode_request(pdu)
    assert (request.calling_aet, request.called_aet, request.peer_max_pdu) == (
        "SENDER",
        "PACS",
        16384,
    )
    _, answer = negotiation.accept(request, 32768)
    acceptance = negotiation.decode_acceptance(answer, proposed)
    assert acceptance.peer_max_pdu == 32768
    assert acceptance.contexts == {
        1: negotiation.AcceptedContext(CT, JPEGBaseline8Bit),
        3: negotiation.AcceptedContext(CT, ExplicitVRLittleEndian),
    }


def test_a_transfer_syntax_we_did_not_offer_is_not_taken_as_accepted() -> None:
    proposed, pdu = negotiation.request("SENDER", "PACS", [Proposal(CT, (JPEGBaseline8Bit,))], 0)
    request = negotiation.decode_request(pdu)
    _, answer = negotiation.accept(request, 0)
    other = {1: Proposal(CT, (ExplicitVRLittleEndian,))}  # what the answer is checked against
    assert negotiation.decode_acceptance(answer, other).contexts == {}
    assert negotiation.decode_acceptance(answer, proposed).contexts != {}


def test_a_rejection_reads_back_by_name() -> None:
    pdu = negotiation.reject(negotiation.CALLING_AE_NOT_RECOGNIZED)
    assert negotiation.decode_rejection(pdu) == negotiation.CALLING_AE_NOT_RECOGNIZED


@pytest.mark.parametrize(
    ("code", "category"),
    [
        (0x0000, status.Category.SUCCESS),
        (0xB000, status.Category.WARNING),
        (0xB006, status.Category.WARNING),
        (0xB007, status.Category.WARNING),
        (0xA700, status.Category.TRANSIENT),
        (0xA7FF, status.Category.TRANSIENT),
        (0x0213, status.Category.TRANSIENT),
        (0xA900, status.Category.FAILURE),
        (0xC000, status.Category.FAILURE),
        (0xCFFF, status.Category.FAILURE),
        (0x0122, status.Category.FAILURE),
        (0x1234, status.Category.FAILURE),
    ],
)
def test_status_categories(code: int, category: status.Category) -> None:
    assert status.category(code) == category


def test_a_status_is_described_with_its_code_and_meaning() -> None:
    assert status.describe(0xA700) == "0xA700 Refused: Out of Resources"
    assert status.describe(0xC123) == "0xC123 Error: Cannot understand"


def test_deflate_is_not_accepted_the_next_proposed_syntax_is() -> None:
    accepted = decided(
        [
            (1, CT, "1.2.840.10008.1.2.1.99"),
            (3, CT, ExplicitVRLittleEndian),
        ]
    )
    assert set(accepted) == {3}  # a context that offers only deflate is refused


def test_a_context_offering_deflate_first_gets_its_next_syntax() -> None:
    pdu = associate_request("CALLER", "SOUPFLOW", [(1, CT, "1.2.840.10008.1.2.1.99")])
    request = negotiation.decode_request(pdu)
    request.primitive.presentation_context_definition_list[0].transfer_syntax.append(
        ExplicitVRLittleEndian
    )
    accepted, _ = negotiation.accept(request, 0)
    assert accepted[1].transfer_syntax == ExplicitVRLittleEndian
