"""Element values as JSON: one function per VR family, shared by both tag formats. Pure.

Upstream: message.tags, message.fields, message.report. Values are read from pydicom's raw
elements; bulk and binary values are never read (their length is known from the header).
"""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName

# soupflow reads leniently: an odd value is kept as text, never an error or a warning that
# would print it (warnings can carry values, values are PHI).
config.settings.reading_validation_mode = config.IGNORE

BULK_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"}
)
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
UNDEFINED_LENGTH = 0xFFFFFFFF
REPLACEMENT = "\ufffd"


@dataclass
class Notes:
    """What conversion noticed (undecodable bytes, unreadable elements); never values."""

    warnings: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)


@dataclass(frozen=True, eq=False)
class Element:
    """One element ready for JSON: its tag, VR, and either a value or a bulk length.

    Compared and hashed by identity: message.raw hands the same Element to every object
    whose element has the same bytes, and message.tags remembers its JSON value by it.
    """

    tag: int
    vr: str
    # str | int | float | list | PersonName...; None when bulk; for SQ a list of items, each
    # a Dataset (read by pydicom) or its elements (read by message.raw)
    value: Any
    bulk_length: int | None = None  # set for bulk data (None length when undefined)
    is_bulk: bool = False


def tag_text(tag: int) -> str:
    return f"{tag >> 16:04X}{tag & 0xFFFF:04X}"


def _tag_label(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _declared_vr(raw: RawDataElement) -> str | None:
    if raw.VR:
        return str(raw.VR)
    try:
        return str(dictionary_VR(raw.tag))
    except KeyError:
        return None


def elements(dataset: Dataset, notes: Notes) -> Iterator[Element]:
    """The dataset's elements in tag order, converted without touching bulk values."""
    # Not `dataset.elements()`: it reads deferred (large) values from the file.
    raw_elements = dataset._dict
    encoding = dataset._character_set  # a property that looks the charset up on every call
    for tag in sorted(raw_elements):
        item = raw_elements[tag]
        if isinstance(item, RawDataElement):
            declared = _declared_vr(item)
            deferred = item.value is None and item.length not in (0, UNDEFINED_LENGTH)
            if item.tag in PIXEL_TAGS or declared in BULK_VRS or (declared is None and deferred):
                length = None if item.length == UNDEFINED_LENGTH else int(item.length)
                yield Element(int(item.tag), bulk_vr(declared), None, length, is_bulk=True)
                continue
            try:
                if deferred:  # a long text value (not bulk) stays on disk until read here
                    element = dataset[item.tag]
                else:
                    element = convert_raw_data_element(item, encoding=encoding, ds=dataset)
            except Exception:  # an unreadable element is kept as text, never fatal
                notes.add(f"element {_tag_label(int(item.tag))} could not be decoded; kept as text")
                raw_bytes = item.value or b""
                yield Element(
                    int(item.tag), declared or "UN", raw_bytes.decode("latin-1").strip(" \x00")
                )
                continue
        else:
            element = item
        yield _from_element(_resolved(element, dataset), notes)


def item_elements(item: Dataset | list[Element], notes: Notes) -> Iterable[Element]:
    """A sequence item's elements, however it was read."""
    return item if isinstance(item, list) else elements(item, notes)


def bulk_vr(declared: str | None) -> str:
    if declared is None or " or " in declared:
        return "OB" if declared is None else "OW"
    return declared


def _resolved(element: DataElement, dataset: Dataset) -> DataElement:
    """An element whose VR the dictionary leaves open ("US or SS") decided from the dataset
    (PS3.5 6.2: e.g. by PixelRepresentation), else read as the first choice."""
    if " or " not in str(element.VR):
        return element
    little_endian = (
        (dataset.original_encoding[1] is not False) if dataset.original_encoding else True
    )
    with contextlib.suppress(Exception):
        corrected = correct_ambiguous_vr_element(element, dataset, little_endian)
        if isinstance(corrected, DataElement) and " or " not in str(corrected.VR):
            return corrected
    first = str(element.VR).split(" or ")[0]
    value = element.value
    if first in ("US", "SS") and isinstance(value, bytes) and len(value) % 2 == 0:
        numbers = struct.unpack(
            f"{'<' if little_endian else '>'}{len(value) // 2}{'H' if first == 'US' else 'h'}",
            value,
        )
        return DataElement(element.tag, first, list(numbers) if len(numbers) != 1 else numbers[0])
    return DataElement(element.tag, first if first not in BULK_VRS else "OB", value)


def _from_element(element: DataElement, notes: Notes) -> Element:
    vr = str(element.VR)
    if vr in BULK_VRS or element.tag in PIXEL_TAGS:
        length = None if element.is_undefined_length else len(element.value or b"")
        return Element(int(element.tag), bulk_vr(vr), None, length, is_bulk=True)
    value = element.value
    if _has_replacement(value):
        notes.add(f"undecodable bytes in {_tag_label(int(element.tag))} were replaced")
    return Element(int(element.tag), vr, value)


def _has_replacement(value: Any) -> bool:
    if isinstance(value, str):
        return REPLACEMENT in value
    if isinstance(value, PersonName):
        return REPLACEMENT in str(value)
    if isinstance(value, MultiValue | list) and not isinstance(value, Sequence):
        return any(_has_replacement(item) for item in value)
    return False


def values_of(element: Element) -> list[Any]:
    """The element's values as JSON scalars (an empty list when it has none)."""
    value = element.value
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [
        scalar for scalar in (_scalar(element.vr, item) for item in items) if scalar is not None
    ]


def _scalar(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if vr == "AT":
        return tag_text(int(value))
    if vr == "IS":
        return _number(value, integer=True)
    if vr == "DS":
        return _number(value, integer=False)
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return int(value)
    if vr in ("FL", "FD"):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \x00")
    return str(value)


def _number(value: Any, *, integer: bool) -> Any:
    """IS and DS as JSON numbers; a malformed one is kept as its text."""
    text = _as_written(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    if integer:
        return int(number) if number.is_integer() else text
    return (
        int(number)
        if number.is_integer() and "." not in text and "e" not in text.lower()
        else number
    )


def text_of(element: Element | None) -> str:
    """A value as the dataset writes it: multi-valued joined with a backslash; "" when absent."""
    if element is None or element.is_bulk:
        return ""
    if element.vr == "SQ":
        return ""
    value = element.value
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return "\\".join("" if item is None else _as_written(item) for item in items)


def _as_written(item: Any) -> str:
    """IS and DS keep the text the dataset had ("1.50", not 1.5)."""
    if isinstance(item, IS | DSfloat | DSdecimal):
        original = getattr(item, "original_string", None)
        if isinstance(original, str):
            return original
    return str(item)
