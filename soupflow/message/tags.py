"""The Tags node: the dataset as JSON, keyed by keyword or in the PS3.18 F.2 JSON model. Pure.

Upstream: message.convert. Keyword format: keys are DICOM keywords (private, unknown and
repeated ones 8 uppercase hex digits); one value is a scalar, several a list, none "";
sequences are lists of objects; bulk data is `{"BulkData": {"VR", "Length"}}`. DicomJson:
PS3.18 F.2 (`{"00100010": {"vr": "PN", "Value": [{"Alphabetic": ...}]}}`), bulk data left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from pydicom.datadict import keyword_for_tag

from soupflow.message.values import Element, Notes, item_elements, tag_text, values_of

_PERSON_NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# An element's keyword-format value, by the Element (message.raw shares one among objects
# whose element has the same bytes). Bounded; lists are copied out, never shared.
_KEYWORD_VALUES: dict[Element, Any] = {}
_KEYWORD_VALUES_LIMIT = 8192


@cache
def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or tag_text(tag)


def keyword_tags(found: Iterable[Element], notes: Notes) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    for element in found:
        key = _keyword(element.tag)
        if key in tags:  # repeating groups (60xx) share a keyword
            key = tag_text(element.tag)
        tags[key] = _keyword_value(element, notes)
    return tags


# Text VRs whose one value, as the readers give it (a str), is its JSON scalar as it is.
_TEXT_AS_IS = frozenset(
    ["AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
)


def _keyword_value(element: Element, notes: Notes) -> Any:
    if type(element.value) is str and element.vr in _TEXT_AS_IS:  # most of a header
        return element.value
    if element.is_bulk:
        return {"BulkData": {"VR": element.vr, "Length": element.bulk_length}}
    if element.vr == "SQ":
        return [keyword_tags(item_elements(item, notes), notes) for item in element.value or []]
    value = _KEYWORD_VALUES.get(element)
    if value is None:
        values = values_of(element)
        value = "" if not values else values[0] if len(values) == 1 else values
        if len(_KEYWORD_VALUES) >= _KEYWORD_VALUES_LIMIT:
            _KEYWORD_VALUES.clear()
        _KEYWORD_VALUES[element] = value
    return list(value) if type(value) is list else value


def dicom_json(found: Iterable[Element], notes: Notes) -> dict[str, Any]:
    tags: dict[str, Any] = {}
    for element in found:
        entry: dict[str, Any] = {"vr": element.vr}
        if element.is_bulk:
            pass
        elif element.vr == "SQ":
            entry["Value"] = [
                dicom_json(item_elements(item, notes), notes) for item in element.value or []
            ]
        else:
            values = values_of(element)
            if element.vr == "PN":
                values = [_person_name(str(value)) for value in values]
            if values:
                entry["Value"] = values
        tags[tag_text(element.tag)] = entry
    return tags


def _person_name(text: str) -> dict[str, str]:
    groups = zip(_PERSON_NAME_GROUPS, text.split("="), strict=False)
    return {name: value for name, value in groups if value}


def dataset_tags(found: Iterable[Element], notes: Notes, tags_format: str) -> dict[str, Any]:
    return dicom_json(found, notes) if tags_format == "DicomJson" else keyword_tags(found, notes)
