"""Workflow documents the tests build on: small, readable, and one that uses every class."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "integration-soup"
REPO = Path(__file__).resolve().parents[1]

RECEIVER_ID = "11111111-1111-4111-8111-111111111101"
FILTER_ID = "11111111-1111-4111-8111-111111111102"
VARIABLES_ID = "11111111-1111-4111-8111-111111111103"
FILE_WRITER_ID = "11111111-1111-4111-8111-111111111104"
HTTP_ID = "11111111-1111-4111-8111-111111111105"

NS_RECEIVERS = "HL7Soup.Functions.Settings.Receivers."
NS_SENDERS = "HL7Soup.Functions.Settings.Senders."
NS_SETTINGS = "HL7Soup.Functions.Settings."
NS_FILTERS = "HL7Soup.MessageFilters."


def type_of(name: str, namespace: str) -> str:
    return f"{namespace}{name}, HL7SoupWorkflow"


def receiver(**fields: Any) -> dict[str, Any]:
    return {
        "$type": type_of("DicomReceiverSetting", NS_RECEIVERS),
        "Id": RECEIVER_ID,
        "Name": "Intake",
        "WorkflowPatternName": "Intake",
        "Port": 11112,
        "OurAET": "SOUPFLOW",
        "AcceptedCallingAETs": "MODALITY01",
        **fields,
    }


def workflow(*settings: dict[str, Any], **receiver_fields: Any) -> dict[str, Any]:
    """A workflow whose receiver runs `settings` (senders) in order."""
    activities = [
        s["Id"] for s in settings if ".Senders." in s["$type"] or "Soupflow." in s["$type"]
    ]
    receiver_fields.setdefault("Activities", activities)
    return {
        "Name": "Intake",
        "WorkflowId": RECEIVER_ID,
        "WorkflowPattern": [receiver(**receiver_fields), *settings],
    }


def file_writer(setting_id: str = FILE_WRITER_ID, **fields: Any) -> dict[str, Any]:
    return {
        "$type": type_of("FileWriterSenderSetting", NS_SENDERS),
        "Id": setting_id,
        "Name": "Archive",
        "FilePathToWrite": "out/${SOPInstanceUID}.dcm",
        "MessageType": 16,
        **fields,
    }


def http_sender(setting_id: str = HTTP_ID, **fields: Any) -> dict[str, Any]:
    return {
        "$type": type_of("HttpSenderSetting", NS_SENDERS),
        "Id": setting_id,
        "Name": "Notify",
        "Server": "http://127.0.0.1:8080/hook",
        **fields,
    }


def transformer(setting_id: str, *actions: dict[str, Any]) -> dict[str, Any]:
    return {
        "$type": type_of("TransformerSetting", NS_SETTINGS),
        "Id": setting_id,
        "Name": "Variables",
        "Transformers": list(actions),
    }


def action(name: str, **fields: Any) -> dict[str, Any]:
    return {"$type": type_of(f"{name}TransformerAction", NS_SETTINGS), **fields}


def filter_host(setting_id: str, *items: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "$type": type_of("FilterHostSetting", NS_SETTINGS + "Filters."),
        "Id": setting_id,
        "Name": "Only CT",
        "Filters": list(items),
        **fields,
    }


def filter_item(name: str, **fields: Any) -> dict[str, Any]:
    return {"$type": type_of(name, NS_FILTERS), **fields}


def kitchen_sink() -> dict[str, Any]:
    """A valid workflow that uses every setting, filter item and action class."""
    variable = action(
        "CreateVariable",
        VariableName="Modality",
        FromPath="CommonFields/Modality",
        FromSetting=RECEIVER_ID,
        FromType=12,
        TextFormat="UpperCase",
    )
    mllp_id, code_id, dicom_id, stow_id = (
        f"11111111-1111-4111-8111-1111111111{n}" for n in (10, 11, 12, 13)
    )
    return workflow(
        file_writer(Filters=FILTER_ID, Transformers=VARIABLES_ID),
        http_sender(Method="PUT", Headers=[{"Name": "X-Source", "Value": "${CallingAET}"}]),
        {
            "$type": type_of("DicomSenderSetting", NS_SENDERS),
            "Id": dicom_id,
            "Name": "PACS",
            "RemoteAET": "ORTHANC",
            "RemotePort": 4242,
        },
        {
            "$type": type_of("MLLPSenderSetting", NS_SENDERS),
            "Id": mllp_id,
            "Name": "RIS",
            "FrameStart": [11],
            "FrameEnd": ["\u001c", 13],
            "MessageTemplate": "MSH|^~\\&|SOUPFLOW|||${CurrentDateTime}",
        },
        {
            "$type": type_of("CodeSenderSetting", NS_SENDERS),
            "Id": code_id,
            "Name": "Python step",
            "PythonCallable": "mypackage.steps:run",
        },
        {
            "$type": "Soupflow.Senders.StowRsSenderSetting, Soupflow",
            "Id": stow_id,
            "Name": "DICOMweb",
            "BaseUrl": "http://127.0.0.1:8042/dicom-web",
            "AuthenticationMode": 2,
            "BearerToken": "${env:HOME}",
        },
        filter_host(
            FILTER_ID,
            filter_item(
                "StringMessageFilter", Path="CommonFields/Modality", Value="CT", Conjunction=1
            ),
            filter_item(
                "DateMessageFilter", Path="CommonFields/StudyDate", Comparer=3, Value="20200101"
            ),
            filter_item("FilterGroup", Not=True),
            filter_item("ValidMessageFilter", Comparer="Valid"),
            filter_item(
                "StringMessageFilter",
                Path="jmespath:Tags.PatientSex",
                Comparer="InList",
                Value="F,M",
            ),
        ),
        transformer(
            VARIABLES_ID,
            variable,
            action("Comment", Comment="Route by modality"),
            action(
                "BeginConditional",
                Filters=[
                    filter_item("StringMessageFilter", Path="CommonFields/Modality", Value="SR")
                ],
            ),
            action("ForEach", FromPath="Report/Items", FromSetting=RECEIVER_ID, FromType=12),
            action(
                "AppendLine",
                FromPath="OBX|${ForEachIterator}|${Modality}",
                FromDirection=2,
                FromType=7,
                ToSetting=mllp_id,
            ),
            action("Next"),
            action("EndConditional"),
            action(
                "CreateMapping",
                FromPath="${Modality}",
                FromDirection=2,
                ToPath="PID-3.1",
                ToSetting=mllp_id,
                ToType=8,
            ),
            action("Code", PythonCallable="mypackage.steps:transform"),
        ),
        MessageTypeOptions={
            "$type": "HL7Soup.Workflow.MessageTypeOptions.DicomMessageTypeOptions, HL7SoupWorkflow",
            "IncludeReportNode": False,
            "TagsFormat": "DicomJson",
        },
        Filters=FILTER_ID,
        VariableTransformers=VARIABLES_ID,
    )


def fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return document


def with_dicom_receiver(document: dict[str, Any]) -> dict[str, Any]:
    """The same workflow with its directory-scan receiver swapped for a DICOM receiver."""
    document = copy.deepcopy(document)
    original = document["WorkflowPattern"][0]
    kept = ("Id", "Name", "WorkflowPatternName", "Activities", "Filters", "VariableTransformers")
    document["WorkflowPattern"][0] = {
        "$type": type_of("DicomReceiverSetting", NS_RECEIVERS),
        **{key: original[key] for key in kept if key in original},
    }
    return document


def write(path: Path, document: Any) -> str:
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def position_of(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based line and column of the n-th occurrence of `needle` in `text`."""
    offset = -1
    for _ in range(occurrence):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1
