"""DICOM sender (`DicomSenderSetting`): C-STORE of the received object to a remote SCP.

The object goes byte-exact (its dataset bytes streamed from the spool as they are) in its own
transfer syntax, as `OurAET` to `RemoteAET` at `RemoteHost:RemotePort`, with `TimeoutSeconds`
bounding the association, each operation and the response (`dicom.requestor`). Associations
are reused (`activities.connections.AssociationPool`): kept `KeepAssociationOpenSeconds`
after their last message, at most `MaxAssociations` per destination. A kept association
that turns out broken when used (the peer dropped it while idle) is replaced once at once;
an association that breaks otherwise makes the attempt fail (transient), and it is
discarded. An activity is recorded as done only after the destination answered. For a
compressed object an uncompressed context is proposed too: when the peer accepts only that,
the object is decoded (pydicom with numpy and Pillow) and sent decompressed, and the outcome
says so; an object that cannot be decoded here is dead with the reason. Statuses are
classified by `dicom.status` (PS3.4 Annex B.2.3): success and warnings succeed, the warning
is recorded; 0xA7xx (out of resources), an abort, a transient rejection or no connection are
transient; 0xA9xx, 0xCxxx, a permanent rejection or a refused transfer syntax are permanent.
"""

from __future__ import annotations

import io
from functools import partial

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from soupflow import tls
from soupflow.activities.base import Activity, Outcome
from soupflow.dicom import status
from soupflow.dicom.negotiation import Proposal
from soupflow.dicom.part10 import dataset_offset
from soupflow.dicom.requestor import (
    Association,
    AssociationLostError,
    Destination,
    RequestorError,
)
from soupflow.pipeline.errors import PermanentError, TransientError
from soupflow.workflow import model

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


def destination(setting: model.DicomSenderSetting, activity: Activity | None = None) -> Destination:
    """Where the setting sends; with `activity`, also how to reach it: the address the
    operator's `--allowed-tcp` allows (checked at each new connection) and the TLS context
    (`UseSsl`; relative certificate paths start at the workflow file's folder)."""
    host, port = setting.remote_host.strip(), setting.remote_port
    server_name = (setting.tls_server_name.strip() or host) if setting.use_ssl else ""
    context = None
    address = None
    if activity is not None:
        allowlist = activity.connections.egress.tcp
        address = partial(allowlist.address, host, port)
        if setting.use_ssl:
            folder = activity.context.workflow.path.parent
            try:
                context = tls.cached_client_context(tls.sender_tls(setting, server_name, folder))
            except tls.TlsError as exc:
                raise PermanentError(f"TLS to {host}:{port}: {exc}") from None
    return Destination(
        host=host,
        port=port,
        our_aet=setting.our_aet.strip(),
        remote_aet=setting.remote_aet.strip(),
        timeout_seconds=float(setting.timeout_seconds),
        tls_server_name=server_name,
        address=address,
        tls_context=context,
    )


def run(setting: model.DicomSenderSetting, activity: Activity) -> Outcome:
    arrival = activity.context.arrival
    where = destination(setting, activity)
    sop_class, syntax = arrival.sop_class_uid, arrival.transfer_syntax_uid
    compressed = UID(syntax).is_compressed
    needs = [Proposal(sop_class, (syntax,))]
    if compressed:
        needs.append(Proposal(sop_class, UNCOMPRESSED))
    pool = activity.connections.associations
    for retried in (False, True):
        try:
            association, reused = pool.take(where, needs, setting.max_associations)
        except RequestorError as exc:
            raise (TransientError if exc.transient else PermanentError)(str(exc)) from None
        try:
            code, note = _store(association, activity, compressed, where)
        except AssociationLostError as exc:
            pool.discard(association)
            if reused and not retried:
                continue  # the peer dropped it while it was idle: once more, at once
            raise TransientError(str(exc)) from None
        except BaseException:
            pool.give(association, setting.keep_association_open_seconds)
            raise
        pool.give(association, setting.keep_association_open_seconds)
        return Outcome(None, _outcome(where, code) + note)
    raise AssertionError("unreachable: the second try raises or returns")


def _store(
    association: Association, activity: Activity, compressed: bool, where: Destination
) -> tuple[int, str]:
    """(the C-STORE status, a note) on this association."""
    arrival = activity.context.arrival
    sop_class, syntax = arrival.sop_class_uid, arrival.transfer_syntax_uid
    context_id = association.context_for(sop_class, (syntax,))
    if context_id is not None:
        code = association.c_store_file(
            context_id, sop_class, arrival.sop_instance_uid, activity.context.object_path
        )
        return code, ""
    refused = PermanentError(f"{where} refused SOP class {sop_class} in transfer syntax {syntax}")
    context_id = association.context_for(sop_class, UNCOMPRESSED) if compressed else None
    if context_id is None:
        raise refused
    accepted = association.contexts[context_id].transfer_syntax
    dataset = _decompressed(activity, accepted, refused)
    code = association.c_store(context_id, sop_class, arrival.sop_instance_uid, io.BytesIO(dataset))
    return code, f" (sent decompressed: the peer refused {syntax})"


def _decompressed(activity: Activity, transfer_syntax: str, refused: PermanentError) -> bytes:
    """The object's dataset decoded and encoded in `transfer_syntax` (in memory)."""
    try:
        dataset = dcmread(activity.context.object_path)
        dataset.decompress(generate_instance_uid=False)  # the instance keeps its identity
        dataset.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
    except Exception as exc:  # no decoder for this transfer syntax here, or bad pixel data
        raise PermanentError(f"{refused}; decoding it here failed ({type(exc).__name__})") from None
    encoded = buffer.getvalue()
    return encoded[dataset_offset(encoded) :]


def _outcome(where: Destination, code: int) -> str:
    category = status.category(code)
    described = status.describe(code)
    if category in (status.Category.SUCCESS, status.Category.WARNING):
        return f"C-STORE {described}"
    if category == status.Category.TRANSIENT:
        raise TransientError(f"{where} answered C-STORE {described}")
    raise PermanentError(f"{where} answered C-STORE {described}")
