"""The DICOM message's shape, as types; `schemas/dicom-message.schema.json` is made from them.

Upstream: schemas (publishing), tests (every produced message validates against it).
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal, NotRequired

from pydantic import TypeAdapter
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

SCHEMA_ID = "https://soupflow.dev/schemas/dicom-message.schema.json"


class Code(TypedDict):
    Value: str
    Scheme: str
    Meaning: str


class ReportItem(TypedDict):
    Relationship: str
    ValueType: str
    Name: str
    NameCode: NotRequired[Code]
    Value: str
    Code: NotRequired[Code]
    Numeric: NotRequired[float]
    Unit: NotRequired[str]
    ReferencedSOPClassUID: NotRequired[str]
    ReferencedSOPInstanceUID: NotRequired[str]
    GraphicType: NotRequired[str]
    ReferencedContentItem: NotRequired[str]
    Items: NotRequired[list[ReportItem]]


class Report(TypedDict):
    Title: str
    TitleCode: NotRequired[Code]
    CompletionFlag: str
    VerificationFlag: str
    ContentDate: str
    ContentTime: str
    Items: list[ReportItem]
    Text: str


class Association(TypedDict):
    CallingAET: str
    CalledAET: str
    PeerAddress: str
    PeerPort: int
    ReceivedAt: str
    TransferSyntaxUID: str
    ByteCount: int
    RequestId: str
    WorkflowId: str
    Warnings: list[str]
    ParseError: NotRequired[str]
    ClientCertSha256: NotRequired[str]  # over TLS, when the client sent a certificate
    ClientCertSubject: NotRequired[str]
    Transport: NotRequired[str]  # "STOW-RS" for an instance received over HTTP
    Headers: NotRequired[dict[str, str]]  # with Transport: the mapped request headers


class CommonFields(TypedDict):
    """Every key always present: the value as in the dataset, "" when absent."""

    PatientID: str
    PatientName: str
    PatientBirthDate: str
    PatientSex: str
    AccessionNumber: str
    StudyInstanceUID: str
    StudyID: str
    StudyDate: str
    StudyTime: str
    StudyDescription: str
    ReferringPhysicianName: str
    SeriesInstanceUID: str
    SeriesNumber: str
    SeriesDescription: str
    Modality: str
    BodyPartExamined: str
    SOPClassUID: str
    SOPClassName: str
    SOPInstanceUID: str
    InstanceNumber: str
    InstitutionName: str
    StationName: str
    Manufacturer: str
    NumberOfFrames: str
    SpecificCharacterSet: str


class Message(TypedDict):
    Version: Literal[1]
    Association: Association
    CommonFields: NotRequired[CommonFields]
    Report: NotRequired[Report]
    Tags: NotRequired[dict[str, Any]]


_SCALAR = {"type": ["string", "number"]}
_TAGS = {
    "description": "Keyword format: keys are DICOM keywords (private, unknown and repeated tags: "
    "8 uppercase hex digits). DicomJson format: PS3.18 F.2, keyed by 8 hex digits, bulk data left out.",
    "type": "object",
    "additionalProperties": {"$ref": "#/$defs/TagValue"},
}
_TAG_DEFINITIONS = {
    "TagValue": {
        "anyOf": [
            _SCALAR,
            {"type": "array", "items": _SCALAR},
            {"type": "array", "items": {"$ref": "#/$defs/Tags"}},
            {
                "type": "object",
                "required": ["BulkData"],
                "properties": {
                    "BulkData": {
                        "type": "object",
                        "required": ["VR", "Length"],
                        "properties": {
                            "VR": {"type": "string"},
                            "Length": {"type": ["integer", "null"]},
                        },
                    }
                },
            },
            {
                "type": "object",
                "required": ["vr"],
                "properties": {
                    "vr": {"type": "string", "pattern": "^[A-Z]{2}$"},
                    "Value": {"type": "array"},
                },
            },
        ]
    },
    "Tags": _TAGS,
}


@cache
def message_schema() -> dict[str, Any]:
    generated = TypeAdapter(Message).json_schema(ref_template="#/$defs/{model}")
    definitions = {**generated.pop("$defs", {}), **_TAG_DEFINITIONS}
    generated["properties"]["Tags"] = {"$ref": "#/$defs/Tags"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "soupflow DICOM message",
        "description": "What each received DICOM instance becomes (see dicom-message.md). Version 1.",
        **{key: value for key, value in generated.items() if key != "title"},
        "$defs": definitions,
    }
