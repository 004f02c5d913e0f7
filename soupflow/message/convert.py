"""A received object -> its DICOM message. Upstream: workers (pipeline). Pure.

See dicom-message.md: `Version`, `Association` (always), `CommonFields`, `Report` (SR only),
`Tags`, each node switched by `DicomMessageTypeOptions`. Conversion never loads pixel data,
never fails on odd values (they are kept as text), and yields a message with
`Association.ParseError` for an object that cannot be parsed at all. The same object gives
byte-identical JSON (`render`). Nothing here logs: the message is PHI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from soupflow.dicom.part10 import MalformedObjectError, read_object
from soupflow.message.raw import read_elements
from soupflow.message.report import Item, RawItem, is_structured_report, report
from soupflow.message.tags import dataset_tags
from soupflow.message.values import Element, Notes, elements, text_of
from soupflow.store.queue import Arrival, Origin
from soupflow.workflow.model import DicomMessageTypeOptions

VERSION = 1
CONTENT_SEQUENCE = 0x0040A730  # an SR's content tree: the Report node reads it

COMMON_FIELDS = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyInstanceUID",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "BodyPartExamined",
    "SOPClassUID",
    "SOPClassName",
    "SOPInstanceUID",
    "InstanceNumber",
    "InstitutionName",
    "StationName",
    "Manufacturer",
    "NumberOfFrames",
    "SpecificCharacterSet",
)


@dataclass(frozen=True)
class Options:
    common_fields: bool = True
    report: bool = True
    tags: bool = True
    tags_format: str = "Keyword"

    @classmethod
    def from_setting(cls, setting: DicomMessageTypeOptions | None) -> Options:
        if setting is None:
            return cls()
        return cls(
            setting.include_common_fields_node,
            setting.include_report_node,
            setting.include_tags_node,
            setting.tags_format,
        )


def received_at_text(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _association(arrival: Arrival) -> dict[str, Any]:
    association: dict[str, Any] = {
        "CallingAET": arrival.origin.calling_aet,
        "CalledAET": arrival.origin.called_aet,
        "PeerAddress": arrival.origin.peer_address,
        "PeerPort": arrival.origin.peer_port,
        "ReceivedAt": received_at_text(arrival.received_at),
        "TransferSyntaxUID": arrival.transfer_syntax_uid,
        "ByteCount": arrival.byte_count,
        "RequestId": arrival.request_id,
        "WorkflowId": arrival.workflow_id,
        "Warnings": [],
    }
    origin = arrival.origin
    if origin.client_cert_sha256:  # over TLS, with a client certificate
        association["ClientCertSha256"] = origin.client_cert_sha256
        association["ClientCertSubject"] = origin.client_cert_subject
    if origin.transport:  # STOW-RS: the AE titles are empty
        association["Transport"] = origin.transport
        association["Headers"] = transport_details(origin).get("Headers", {})
    return association


def transport_details(origin: Origin) -> dict[str, Any]:
    """What the transport recorded beside the peer (`Origin.details`), decoded."""
    if not origin.details:
        return {}
    found = json.loads(origin.details)
    return found if isinstance(found, dict) else {}


def _common_fields(top: dict[int, Element]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for keyword in COMMON_FIELDS:
        if keyword == "SOPClassName":
            uid = fields.get("SOPClassUID", "")
            name = UID(uid).name if uid else ""
            fields[keyword] = "" if name == uid else name
            continue
        tag = tag_for_keyword(keyword)
        fields[keyword] = text_of(top.get(tag)) if tag is not None else ""
    return fields


def convert(path: Path, arrival: Arrival, options: Options) -> dict[str, Any]:
    """The DICOM message of the Part 10 object at `path`."""
    message: dict[str, Any] = {"Version": VERSION, "Association": _association(arrival)}
    notes = Notes()
    found = read_elements(path)  # the plain objects, without pydicom
    tree: Item | None = None  # an SR's content tree, for the Report node
    if found is not None and options.report and any(e.tag == CONTENT_SEQUENCE for e in found):
        tree = RawItem(found)
    if found is None:
        try:
            dataset = read_object(path)
            found = list(elements(dataset, notes))
            tree = dataset
        except (
            MalformedObjectError,
            Exception,
        ) as exc:  # an unparseable object still becomes a message
            message["Association"]["ParseError"] = (
                str(exc) if isinstance(exc, MalformedObjectError) else type(exc).__name__
            )
            if options.common_fields:
                message["CommonFields"] = dict.fromkeys(COMMON_FIELDS, "")
            if options.tags:
                message["Tags"] = {}
            return message
    if options.common_fields:
        message["CommonFields"] = _common_fields({element.tag: element for element in found})
    if options.report and tree is not None:
        _add_report(tree, message, notes)
    if options.tags:
        message["Tags"] = dataset_tags(found, notes, options.tags_format)
    message["Association"]["Warnings"] = notes.warnings
    return message


def _add_report(dataset: Item, message: dict[str, Any], notes: Notes) -> None:
    try:
        if is_structured_report(dataset):
            message["Report"] = report(dataset)
    except Exception as exc:  # a malformed SR still gives the other nodes
        notes.add(f"the SR content tree could not be read ({type(exc).__name__}); Report left out")


def render(message: dict[str, Any]) -> str:
    """The message as JSON text: UTF-8 characters as they are, keys in dataset order."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))
