"""The published schema: generated from the model, checked in, and in agreement with it."""

from __future__ import annotations

import copy
import json
import typing
from typing import Any

import jsonschema
import pydantic
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from soupflow import schemas
from soupflow.cli import main
from soupflow.workflow import model, schema
from tests import documents

CHECKED_IN = documents.REPO / "schemas" / schemas.WORKFLOW_SCHEMA_FILE


def test_checked_in_schema_matches_the_model() -> None:
    assert schemas.stale_files(CHECKED_IN.parent) == [], "schemas/ drifted: run `soupflow schema`"


def test_schema_check_reports_a_stale_file_and_how_to_fix_it(tmp_path: Any, capsys: Any) -> None:
    (tmp_path / schemas.WORKFLOW_SCHEMA_FILE).write_text("{}\n", encoding="utf-8")
    assert main(["schema", "--check", "--out", str(tmp_path)]) == 1
    assert "run `soupflow schema`" in capsys.readouterr().err
    assert main(["schema", "--out", str(tmp_path)]) == 0
    assert main(["schema", "--check", "--out", str(tmp_path)]) == 0


def test_every_class_is_in_its_union_and_in_the_schema() -> None:
    definitions = schema.workflow_schema()["$defs"]
    for classes, union in (
        (model.SETTING_CLASSES, model.AnySetting),
        (model.FILTER_ITEM_CLASSES, model.AnyFilterItem),
        (model.ACTION_CLASSES, model.AnyAction),
    ):
        members = {str(tag) for tag in _tags(union)}
        assert members == {cls.__name__ for cls in classes}
        for cls in classes:
            assert cls.__name__ in definitions
            assert definitions[cls.__name__]["properties"]["$type"]["pattern"].startswith("^")


def _tags(union: Any) -> list[str]:
    inner = typing.get_args(union)[0]
    return [typing.get_args(member)[1].tag for member in typing.get_args(inner)]


def test_missing_server_on_an_http_sender_is_reported_as_exactly_that() -> None:
    document = documents.workflow(documents.http_sender())
    del document["WorkflowPattern"][1]["Server"]
    validator = jsonschema.Draft202012Validator(json.loads(CHECKED_IN.read_text()))
    errors = list(validator.iter_errors(document))
    assert [(list(e.absolute_path), e.message) for e in errors] == [
        (["WorkflowPattern", 1], "'Server' is a required property")
    ]


# ---------------------------------------------------------------------------- agreement
_GUIDS = [
    documents.RECEIVER_ID,
    documents.FILTER_ID,
    "00000000-0000-0000-0000-000000000000",
    "",
    "not-a-guid",
]
_TYPES = [
    f"{cls.TYPE_NAME}, HL7SoupWorkflow"
    for cls in (*model.SETTING_CLASSES, *model.FILTER_ITEM_CLASSES, *model.ACTION_CLASSES)
]
_STRINGS = st.sampled_from(
    [
        *_GUIDS,
        *_TYPES,
        model.DicomMessageTypeOptions.TYPE_NAME,
        _TYPES[0] + "\n",
        _TYPES[0].replace(",", " ,"),
        "HL7Soup.Functions.Settings.Receivers.DirectoryScanReceiverSetting, HL7SoupWorkflow",
        "Equals",
        "Contains",
        "POST",
        "UpperCase",
        "Keyword",
        "DicomJson",
        "104",
        "true",
    ]
) | st.text(max_size=6)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=70000)
    | st.sampled_from([0.0, 1.0, 2.5, 104.0, 1e20, -1.0])
    | _STRINGS
)
_NEAR_MISSES = st.sampled_from(
    ["104", "true", "null", "1", 1, 0, -1, 65536, 2.5, True, False, None, [], {}]
)
# Mostly scalars close to what a field expects, sometimes whole structures.
_VALUES = (
    _NEAR_MISSES
    | _SCALARS
    | st.recursive(
        _SCALARS,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(_STRINGS, children, max_size=3)
        ),
        max_leaves=6,
    )
)


def _objects(value: Any, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(value, dict):
        found.append(value)
        for child in value.values():
            _objects(child, found)
    elif isinstance(value, list):
        for child in value:
            _objects(child, found)
    return found


def _model_accepts(document: Any) -> bool:
    try:
        model.parse_document(document)
    except (pydantic.ValidationError, TypeError):
        return False
    return True


_SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads(CHECKED_IN.read_text(encoding="utf-8"))
)
_FIELD_NAMES = sorted(
    {
        name
        for cls in (*model.SETTING_CLASSES, *model.FILTER_ITEM_CLASSES, *model.ACTION_CLASSES)
        for name in model.known_fields(cls)
    }
    | {"WorkflowPattern", "WorkflowId", "MessageTypeOptions", "TagsFormat", "Headers", "Name"}
)


@pytest.mark.parametrize("base", ["workflow", "bare receiver"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_model_and_schema_accept_the_same_documents(base: str, data: st.DataObject) -> None:
    document: Any = documents.kitchen_sink() if base == "workflow" else documents.receiver()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        targets = _objects(document, [])
        if not targets:
            break
        target = data.draw(st.sampled_from(targets), label="object")
        keys = st.sampled_from(_FIELD_NAMES)
        existing = st.sampled_from(sorted(target))
        key = data.draw(existing | existing | keys if target else keys, label="key")
        if data.draw(st.booleans(), label="delete") and key in target:
            del target[key]
        else:
            # A copy: a drawn [] or {} is handed out again, and later mutations must not touch it.
            target[key] = copy.deepcopy(data.draw(_VALUES, label="value"))
    if data.draw(st.integers(0, 20), label="replace root") == 0:
        document = data.draw(_VALUES, label="root")
    document = copy.deepcopy(document)
    accepted = _SCHEMA_VALIDATOR.is_valid(document)
    event(f"schema accepts: {accepted}")
    assert _model_accepts(document) == accepted, json.dumps(document)[:2000]
