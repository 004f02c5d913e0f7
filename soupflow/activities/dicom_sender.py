"""DICOM sender (`DicomSenderSetting`): C-STORE of the received object to a remote SCP.

The object goes byte-exact (pynetdicom sends the stored dataset bytes as they are) in its own
transfer syntax, as `OurAET` to `RemoteAET` at `RemoteHost:RemotePort`, with `TimeoutSeconds`
on the association, the network and the response. For a compressed object an uncompressed
context is proposed too: when the peer accepts only that, the object is decoded (pydicom with
numpy and Pillow) and sent decompressed, and the outcome says so; an object that cannot be
decoded here is dead with the reason. Status mapping (PS3.4 Annex B.2.3):
Success and the warnings (0xB000, 0xB006, 0xB007) succeed, the warning is recorded;
0xA7xx (out of resources), an abort, a transient rejection or no connection are transient;
0xA9xx, 0xCxxx, a permanent rejection or a refused transfer syntax are permanent.
"""

from __future__ import annotations

from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from soupflow.activities.base import Activity
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model

# Send stored objects as they are: no decode, no re-encode (byte-exact forwarding).
_config.STORE_SEND_CHUNKED_DATASET = True

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
SUCCESS = 0x0000
WARNINGS = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
_REJECTED_TRANSIENT = 0x02


def run(setting: model.DicomSenderSetting, activity: Activity) -> str | None:
    arrival = activity.context.arrival
    ae = _application_entity(setting.our_aet.strip(), float(setting.timeout_seconds))
    ae.add_requested_context(arrival.sop_class_uid, arrival.transfer_syntax_uid)
    compressed = UID(arrival.transfer_syntax_uid).is_compressed
    if compressed:
        ae.add_requested_context(arrival.sop_class_uid, UNCOMPRESSED)
    refused = PermanentError(
        f"{_where(setting)} refused SOP class {arrival.sop_class_uid} "
        f"in transfer syntax {arrival.transfer_syntax_uid}"
    )
    assoc = _associate(ae, setting, refused)
    note = ""
    try:
        accepted = {
            cx.transfer_syntax[0]
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == arrival.sop_class_uid
        }
        if arrival.transfer_syntax_uid in accepted:
            response: Any = assoc.send_c_store(activity.context.object_path)
        elif compressed and accepted:
            response = assoc.send_c_store(_decompressed(activity, refused))
            note = f" (sent decompressed: the peer refused {arrival.transfer_syntax_uid})"
        else:
            raise refused
    finally:
        if assoc.is_established:
            assoc.release()
    return _outcome(setting, response) + note


def _decompressed(activity: Activity, refused: PermanentError) -> Dataset:
    try:
        dataset = dcmread(activity.context.object_path)
        dataset.decompress(generate_instance_uid=False)  # the instance keeps its identity
    except Exception as exc:  # no decoder for this transfer syntax here, or bad pixel data
        raise PermanentError(f"{refused}; decoding it here failed ({type(exc).__name__})") from None
    return dataset


def _where(setting: model.DicomSenderSetting) -> str:
    return f"{setting.remote_aet} at {setting.remote_host}:{setting.remote_port}"


def _application_entity(our_aet: str, timeout: float) -> AE:
    ae = AE(ae_title=our_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    return ae


def _associate(ae: AE, setting: model.DicomSenderSetting, refused: PermanentError) -> Any:
    assoc = ae.associate(
        setting.remote_host, setting.remote_port, ae_title=setting.remote_aet.strip()
    )
    if assoc.is_established:
        return assoc
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        raise refused  # pynetdicom aborts an association whose every context was refused
    if assoc.is_rejected:
        result, rejection = _rejection(assoc)
        reason = f"{_where(setting)} rejected the association ({rejection})"
        raise (TransientError if result == _REJECTED_TRANSIENT else PermanentError)(reason)
    raise TransientError(
        f"cannot associate with {_where(setting)} (no connection, timeout or abort)"
    )


def _rejection(assoc: Any) -> tuple[int, str]:
    """The A-ASSOCIATE-RJ's result and a description (PS3.8 9.3.4)."""
    reply = assoc.acceptor.primitive
    if reply is None:
        return 0, "no reason given"
    return int(
        reply.result
    ), f"result {reply.result}, source {reply.result_source}, reason {reply.diagnostic}"


def _outcome(setting: model.DicomSenderSetting, response: Any) -> str:
    where = _where(setting)
    if "Status" not in response:
        raise TransientError(f"no C-STORE response from {where} (timeout or abort)")
    status = int(response.Status)
    if status == SUCCESS:
        return "C-STORE 0x0000 Success"
    if status in WARNINGS:
        return f"C-STORE 0x{status:04X} Warning: {WARNINGS[status]}"
    if status >> 8 == 0xA7:
        raise TransientError(f"{where} answered C-STORE 0x{status:04X} (out of resources)")
    raise PermanentError(f"{where} answered C-STORE 0x{status:04X}")


def echo(host: str, port: int, our_aet: str, called_aet: str, timeout: float) -> tuple[bool, str]:
    """C-ECHO: can we associate with the peer and does it answer? (ok, what happened)"""
    ae = _application_entity(our_aet, timeout)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        if assoc.is_rejected:
            return False, f"association rejected ({_rejection(assoc)[1]})"
        return False, "no association (connection refused, timeout or abort)"
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        return False, "no C-ECHO response"
    status = int(response.Status)
    return status == SUCCESS, f"C-ECHO status 0x{status:04X}"
