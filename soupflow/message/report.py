"""The Report node: a Structured Report's content tree, and its text for an HL7 OBX. Pure.

Upstream: message.convert. Present only for SR documents (root ValueType CONTAINER with a
ContentSequence). Every item has `Value` as a display string; typed extras sit beside it.
The tree is read from a pydicom Dataset or, for the plain objects, from message.raw's
elements (`RawItem`): the same Report either way (tests/test_message_raw.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID

from soupflow.message.values import Element

_INDENT = "  "


class Item(Protocol):
    """What the Report reads of a dataset or an item: a pydicom Dataset is one."""

    def get(self, keyword: str, default: Any = None) -> Any: ...

    def __contains__(self, keyword: str) -> bool: ...


class RawItem:
    """message.raw's elements of a dataset or an item, read as report() reads a Dataset:
    values as the raw reader decoded them (pydicom's), sequences as lists of items."""

    def __init__(self, elements: list[Element]) -> None:
        self._elements = {element.tag: element for element in elements}

    def _element(self, keyword: str) -> Element | None:
        tag = tag_for_keyword(keyword)
        return None if tag is None else self._elements.get(tag)

    def get(self, keyword: str, default: Any = None) -> Any:
        element = self._element(keyword)
        if element is None:
            return default
        if element.vr == "SQ":
            return [RawItem(item) for item in element.value or []]
        return element.value

    def __contains__(self, keyword: str) -> bool:
        return self._element(keyword) is not None


def is_structured_report(dataset: Item) -> bool:
    return str(dataset.get("ValueType", "")) == "CONTAINER" and "ContentSequence" in dataset


def _text(dataset: Item, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value)


def _code(sequence_owner: Item, keyword: str) -> dict[str, str] | None:
    sequence = sequence_owner.get(keyword)
    if not sequence:
        return None
    item = sequence[0]
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
    return {
        "Value": value,
        "Scheme": _text(item, "CodingSchemeDesignator"),
        "Meaning": _text(item, "CodeMeaning"),
    }


def report(dataset: Item) -> dict[str, Any]:
    title = _code(dataset, "ConceptNameCodeSequence")
    node: dict[str, Any] = {"Title": title["Meaning"] if title else ""}
    if title:
        node["TitleCode"] = title
    for keyword in ("CompletionFlag", "VerificationFlag", "ContentDate", "ContentTime"):
        node[keyword] = _text(dataset, keyword)
    node["Items"] = [_item(child) for child in dataset.get("ContentSequence")]
    lines = [node["Title"]] if node["Title"] else []
    _render(node["Items"], 0, lines)
    node["Text"] = "\n".join(lines)
    return node


def _item(dataset: Item) -> dict[str, Any]:
    value_type = _text(dataset, "ValueType")
    name = _code(dataset, "ConceptNameCodeSequence")
    item: dict[str, Any] = {
        "Relationship": _text(dataset, "RelationshipType"),
        "ValueType": value_type,
    }
    item["Name"] = name["Meaning"] if name else ""
    if name:
        item["NameCode"] = name
    if "ReferencedContentItemIdentifier" in dataset:
        identifiers = dataset.get("ReferencedContentItemIdentifier")
        identifiers = (
            identifiers
            if isinstance(identifiers, list | tuple) or hasattr(identifiers, "__iter__")
            else [identifiers]
        )
        item["ReferencedContentItem"] = ".".join(str(int(number)) for number in identifiers)
        item["Value"] = ""
    else:
        item.update(_typed_value(dataset, value_type))
    if "ContentSequence" in dataset:
        item["Items"] = [_item(child) for child in dataset.get("ContentSequence")]
    return item


def _typed_value(dataset: Item, value_type: str) -> dict[str, Any]:
    if value_type == "TEXT":
        return {"Value": _text(dataset, "TextValue")}
    if value_type == "CODE":
        code = _code(dataset, "ConceptCodeSequence")
        return {"Value": code["Meaning"], "Code": code} if code else {"Value": ""}
    if value_type == "NUM":
        return _numeric(dataset)
    simple = {
        "PNAME": "PersonName",
        "DATE": "Date",
        "TIME": "Time",
        "DATETIME": "DateTime",
        "UIDREF": "UID",
    }
    if value_type in simple:
        return {"Value": _text(dataset, simple[value_type])}
    if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        referenced = dataset.get("ReferencedSOPSequence")
        if not referenced:
            return {"Value": ""}
        sop_class, sop_instance = (
            _text(referenced[0], "ReferencedSOPClassUID"),
            _text(referenced[0], "ReferencedSOPInstanceUID"),
        )
        name = UID(sop_class).name if sop_class else ""
        return {
            "Value": f"{name} {sop_instance}".strip(),
            "ReferencedSOPClassUID": sop_class,
            "ReferencedSOPInstanceUID": sop_instance,
        }
    if value_type in ("SCOORD", "SCOORD3D"):
        graphic = _text(dataset, "GraphicType")
        return {"Value": graphic, "GraphicType": graphic}
    if value_type == "TCOORD":
        return {"Value": _text(dataset, "TemporalRangeType")}
    return {"Value": ""}


def _numeric(dataset: Item) -> dict[str, Any]:
    measured = dataset.get("MeasuredValueSequence")
    if not measured:
        return {"Value": ""}
    text = _text(measured[0], "NumericValue")
    unit = _code(measured[0], "MeasurementUnitsCodeSequence")
    value: dict[str, Any] = {"Value": f"{text} {unit['Value']}".strip() if unit else text}
    with contextlib.suppress(ValueError):
        value["Numeric"] = float(text)
    if unit:
        value["Unit"] = unit["Meaning"]
    return value


def one_line(text: str) -> str:
    """`text` on one line: a backslash becomes `\\\\` and each line break (CR LF, CR or LF)
    the two characters `\\n`, so `Text` keeps one line per item and stays reversible."""
    return (
        text.replace("\\", "\\\\").replace("\r\n", "\\n").replace("\r", "\\n").replace("\n", "\\n")
    )


def _render(items: list[dict[str, Any]], depth: int, lines: list[str]) -> None:
    for item in items:
        label, value = one_line(item["Name"]), one_line(item["Value"])
        line = f"{label}: {value}" if label and value else label or value or item["ValueType"]
        lines.append(_INDENT * depth + line)
        _render(item.get("Items", []), depth + 1, lines)
