"""Command sets: what pynetdicom sends is read; what soupflow answers, pynetdicom reads."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode

from soupflow.dicom import dimse


def _command_bytes(message: C_STORE_RQ | C_ECHO_RQ) -> bytes:
    fragments = list(message.encode_msg(1, 16382))
    return b"".join(fragment.presentation_data_value_list[0][1][1:] for fragment in fragments[:1])


def _store_request(sop_instance_uid: str) -> dimse.Command:
    primitive = C_STORE()
    primitive.MessageID = 513
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = sop_instance_uid
    primitive.Priority = 0
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return dimse.parse_command(_command_bytes(message))


def test_a_pynetdicom_c_store_rq_is_read() -> None:
    request = _store_request("1.2.3.4.5")
    assert request == dimse.Command(
        command_field=dimse.C_STORE_RQ,
        message_id=513,
        affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        affected_sop_instance_uid="1.2.3.4.5",
        has_data_set=True,
    )


def test_a_pynetdicom_c_echo_rq_is_read() -> None:
    primitive = C_ECHO()
    primitive.MessageID = 9
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    request = dimse.parse_command(_command_bytes(message))
    assert (request.command_field, request.message_id, request.has_data_set) == (
        dimse.C_ECHO_RQ,
        9,
        False,
    )


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4.5", "1.2.3.4.56"])  # odd, even length
def test_the_response_is_a_valid_command_set(sop_instance_uid: str) -> None:
    request = _store_request(sop_instance_uid)
    encoded = dimse.response(request, 0xA700)
    response = decode(BytesIO(encoded), True, True)
    assert response.CommandGroupLength == len(encoded) - 12
    assert response.CommandField == dimse.C_STORE_RSP
    assert response.MessageIDBeingRespondedTo == 513
    assert response.Status == 0xA700
    assert response.AffectedSOPInstanceUID == sop_instance_uid
    assert response.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert response.CommandDataSetType == dimse.NO_DATA_SET
    assert "ErrorComment" not in response


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x01",  # ends inside an element header
        b"\x08\x00\x16\x00\x02\x00\x00\x00ab",  # not group 0000
        b"\x00\x00\x00\x01\x02\x00\x00\x00",  # Command Field overruns
        b"\x00\x00\x02\x00\x02\x00\x00\x00ab",  # no Command Field
    ],
)
def test_an_unusable_command_set_is_an_error(data: bytes) -> None:
    with pytest.raises(dimse.CommandError):
        dimse.parse_command(data)
