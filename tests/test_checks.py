"""What the schema cannot say: links, AE titles, structure, paths, templates, variables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from soupflow.workflow.load import load_text
from tests import documents
from tests.documents import action, filter_host, filter_item, transformer

OTHER_ID = "44444444-4444-4444-8444-444444444444"


def problems(document: Any) -> list[tuple[str, str, str]]:
    """(severity, pointer, message) of every issue, hints left out."""
    loaded = load_text(json.dumps(document, indent=2), Path("w.json"))
    return [(issue.severity, issue.pointer, issue.message) for issue in loaded.issues]


def variables(*actions: dict[str, Any]) -> dict[str, Any]:
    return transformer(documents.VARIABLES_ID, *actions)


def test_a_link_to_a_setting_of_the_wrong_kind_names_both() -> None:
    document = documents.workflow(documents.file_writer(), Filters=documents.FILE_WRITER_ID)
    assert problems(document) == [
        (
            "error",
            "/WorkflowPattern/0/Filters",
            'links to FileWriterSenderSetting "Archive", a sender; expected a FilterHostSetting',
        )
    ]


def test_a_bare_receiver_may_link_nothing() -> None:
    assert problems(documents.receiver()) == []
    assert problems(documents.receiver(Filters=documents.FILTER_ID)) == [
        (
            "error",
            "/Filters",
            f"a bare receiver links nothing, but this links {documents.FILTER_ID}",
        )
    ]
    zero = "00000000-0000-0000-0000-000000000000"
    assert problems(documents.receiver(Filters=zero, Activities=[zero, "", None])) == []


def test_exactly_one_receiver_and_unique_ids() -> None:
    twice = documents.workflow(documents.file_writer(documents.RECEIVER_ID))
    assert (
        "error",
        "/WorkflowPattern/1/Id",
        f'Id {documents.RECEIVER_ID} is already used by DicomReceiverSetting "Intake" at /WorkflowPattern/0',
    ) in problems(twice)
    none = {"Name": "x", "WorkflowPattern": [documents.file_writer()]}
    assert (
        "error",
        "/WorkflowPattern",
        "no receiver: a workflow has exactly one (DicomReceiverSetting or StowRsReceiverSetting)",
    ) in problems(none)
    two = documents.workflow()
    two["WorkflowPattern"].append(documents.receiver(Id=OTHER_ID))
    assert (
        "error",
        "/WorkflowPattern/1",
        "a second receiver: a workflow has exactly one (the first is at /WorkflowPattern/0)",
    ) in problems(two)


@pytest.mark.parametrize(
    ("allow_list", "expected"),
    [
        (" modality01 , CT2", []),
        ("*", []),
        ("", [("warning", "empty allow-list: every calling AE is rejected")]),
        ("CT1,,CT2", [("warning", "empty entry in 'CT1,,CT2' (two commas in a row?)")]),
        (
            "CT1, ct1",
            [("warning", "allow-list entry 'ct1' appears twice (entries are case-insensitive)")],
        ),
        ("CT1, BAD\\AE", [("error", "allow-list entry 'BAD\\\\AE' contains a backslash")]),
        (
            "A_VERY_LONG_AE_TITLE",
            [
                (
                    "error",
                    "allow-list entry 'A_VERY_LONG_AE_TITLE' has 20 characters; at most 16 are allowed",
                )
            ],
        ),
    ],
)
def test_allow_list_entries(allow_list: str, expected: list[tuple[str, str]]) -> None:
    found = problems(documents.workflow(AcceptedCallingAETs=allow_list))
    assert [(severity, message) for severity, _, message in found] == expected


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (
            ["FilterGroup", "StringMessageFilter"],
            "a FilterGroup marker cannot be first in the list",
        ),
        (["StringMessageFilter", "FilterGroup"], "a FilterGroup marker cannot be last in the list"),
        (
            ["StringMessageFilter", "FilterGroup", "FilterGroup", "StringMessageFilter"],
            "two FilterGroup markers in a row make an empty group",
        ),
    ],
)
def test_filter_group_markers_must_bracket_items(items: list[str], message: str) -> None:
    host = filter_host(
        documents.FILTER_ID,
        *(filter_item(name, Path="CommonFields/Modality", Value="CT") for name in items),
    )
    assert [m for _, _, m in problems(documents.workflow(host, Filters=documents.FILTER_ID))] == [
        message
    ]


def test_blocks_pair_up_and_nest() -> None:
    crossed = variables(
        action("ForEach", FromPath="Tags/X"),
        action("BeginConditional"),
        action("Next"),
        action("EndConditional"),
    )
    found = problems(documents.workflow(crossed, VariableTransformers=documents.VARIABLES_ID))
    assert [m for _, _, m in found] == [
        "Next closes the BeginConditional at /WorkflowPattern/1/Transformers/1",
        "EndConditional closes the ForEach at /WorkflowPattern/1/Transformers/0",
    ]
    stray = variables(action("Next"))
    assert [
        m
        for _, _, m in problems(
            documents.workflow(stray, VariableTransformers=documents.VARIABLES_ID)
        )
    ] == ["Next without a matching ForEach"]


@pytest.mark.parametrize(
    ("path", "from_type", "message"),
    [
        ("jmespath:Tags.[", 12, "JMESPath expression does not parse"),
        (
            "Tags/Sequence[0]/X",
            12,
            "index [0] in JSON path 'Tags/Sequence[0]/X': indexes count from 1",
        ),
        ("Tags//X", 12, "empty step in JSON path 'Tags//X' (two '/' in a row?)"),
        ("PID-5.x", 1, "'PID-5.x' is not an HL7 v2 path like PID-5.1 or OBX[2]-5"),
        (
            "CommonFields/PatientID",
            8,
            "'CommonFields/PatientID' is not an HL7 v2 path like PID-5.1 or OBX[2]-5",
        ),
        ("${Unclosed", 7, "template does not parse at character 1: '${' is never closed by '}'"),
    ],
)
def test_paths_and_templates_that_do_not_parse(path: str, from_type: int, message: str) -> None:
    found = problems(
        documents.workflow(
            variables(
                action("CreateVariable", VariableName="X", FromPath=path, FromType=from_type)
            ),
            VariableTransformers=documents.VARIABLES_ID,
        )
    )
    assert len(found) == 1
    assert found[0][:2] == ("error", "/WorkflowPattern/1/Transformers/0/FromPath")
    assert found[0][2].startswith(message)


def test_a_path_without_from_type_reads_the_dicom_message_as_json() -> None:
    reads = variables(
        action(
            "CreateVariable",
            VariableName="X",
            FromPath="Tags/ReferencedSeriesSequence[1]/SeriesInstanceUID",
        )
    )
    assert problems(documents.workflow(reads, VariableTransformers=documents.VARIABLES_ID)) == []


def test_a_variable_never_set_is_a_warning_with_a_suggestion() -> None:
    sets = variables(
        action("CreateVariable", VariableName="StudyUID", FromPath="CommonFields/StudyInstanceUID")
    )
    writer = documents.file_writer(
        FilePathToWrite="out/${StudyUid}/${SOPInstanceUID}/${Accession}.dcm"
    )
    found = problems(documents.workflow(writer, sets, VariableTransformers=documents.VARIABLES_ID))
    assert found == [
        (
            "warning",
            "/WorkflowPattern/1/FilePathToWrite",
            'variable ${Accession} is never set, so it expands to ""',
        )
    ]
    typo = documents.file_writer(FilePathToWrite="out/${StudyUD}.dcm")
    loaded = load_text(
        json.dumps(documents.workflow(typo, sets, VariableTransformers=documents.VARIABLES_ID)),
        Path("w.json"),
    )
    assert [issue.hint for issue in loaded.issues] == ["did you mean ${studyuid}?"]


def test_an_unset_environment_variable_is_a_warning(monkeypatch: Any) -> None:
    monkeypatch.delenv("SOUPFLOW_TEST_SECRET", raising=False)
    sender = documents.http_sender(
        Password="${env:SOUPFLOW_TEST_SECRET}", AuthenticationMode=1, UserName="u"
    )
    assert problems(documents.workflow(sender)) == [
        (
            "warning",
            "/WorkflowPattern/1/Password",
            "environment variable SOUPFLOW_TEST_SECRET is not set here",
        )
    ]
    monkeypatch.setenv("SOUPFLOW_TEST_SECRET", "s3cret")
    assert problems(documents.workflow(sender)) == []


def test_an_inline_secret_is_a_warning() -> None:
    sender = documents.http_sender(Password="hunter2", AuthenticationMode=1, UserName="u")
    assert problems(documents.workflow(sender)) == [
        ("warning", "/WorkflowPattern/1/Password", "a secret is written in the workflow file")
    ]


def test_code_steps_need_a_python_callable() -> None:
    code = {
        "$type": documents.type_of("CodeSenderSetting", documents.NS_SENDERS),
        "Id": OTHER_ID,
        "Code": "return 1;",
    }
    assert problems(documents.workflow(code)) == [
        ("error", "/WorkflowPattern/1/Code", "C# code is not run by soupflow")
    ]
    code["PythonCallable"] = "not a callable"
    assert problems(documents.workflow(code)) == [
        (
            "error",
            "/WorkflowPattern/1/PythonCallable",
            "'not a callable' is not `package.module:function`",
        )
    ]
    code["PythonCallable"] = "steps.dicom:route"
    assert problems(documents.workflow(code)) == []


def test_unsupported_sender_type_names_what_to_use() -> None:
    database = {
        "$type": documents.type_of("DatabaseSenderSetting", documents.NS_SENDERS),
        "Id": OTHER_ID,
    }
    [(severity, pointer, message)] = problems(documents.workflow(database))
    assert (severity, pointer) == ("error", "/WorkflowPattern/1/$type")
    assert message == (
        "sender type DatabaseSenderSetting is not run by soupflow; supported: FileWriterSenderSetting, "
        "HttpSenderSetting, DicomSenderSetting, MLLPSenderSetting, CodeSenderSetting, StowRsSenderSetting"
    )


def test_settings_nothing_runs_are_warned_about() -> None:
    document = documents.workflow(documents.file_writer(), Activities=[])
    assert problems(document) == [
        (
            "warning",
            "/WorkflowPattern/1",
            'FileWriterSenderSetting "Archive" is not in the receiver\'s Activities: it never runs',
        )
    ]


def test_in_datatable_is_refused_with_the_alternative() -> None:
    host = filter_host(
        documents.FILTER_ID,
        filter_item("StringMessageFilter", Path="CommonFields/Modality", Comparer=8),
    )
    loaded = load_text(
        json.dumps(documents.workflow(host, Filters=documents.FILTER_ID)), Path("w.json")
    )
    assert [(i.pointer, i.message, i.hint) for i in loaded.issues] == [
        (
            "/WorkflowPattern/1/Filters/0/Comparer",
            "Comparer 8 InDataTable is not supported by soupflow",
            "use 12 InList with a comma-separated Value",
        )
    ]


def test_a_broken_setting_is_still_checked_for_everything_else() -> None:
    sender = documents.http_sender(
        Method="PATCH", Server="ftp://nowhere", Filters="aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
    )
    found = problems(documents.workflow(sender))
    assert sorted((s, p) for s, p, _ in found) == [
        ("error", "/WorkflowPattern/1/Filters"),
        ("error", "/WorkflowPattern/1/Method"),
        ("error", "/WorkflowPattern/1/Server"),
    ]
