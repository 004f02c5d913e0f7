"""The dataset's elements read straight from the stored bytes, for the common objects. Pure.

Upstream: message.convert. pydicom builds a Python object for every element before
conversion reads it; for a CT header that costs more than the conversion itself, in the
worker that shares the interpreter with the listener. Here the element headers are walked in
place (mmap: bulk values are never read) and each value is decoded by its VR, the way
pydicom's converters decode it. Anything less plain returns None, and conversion reads that
object through pydicom (`values.elements`): big endian, deflated, a character set other than
the default, Latin-1 or UTF-8 (or one set inside an item), an implicit VR the dictionary
does not know or leaves open, elements out of order, an undefined-length UN, a value that
does not fit its VR, and anything truncated. Both readers give the same message for every
object both read (tests/test_message_raw.py holds them to it over pydicom's test files).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR

from soupflow.dicom.part10 import (
    EXPLICIT_VR_BIG_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    LONG_VRS,
    SHORT_VRS,
    element_header,
    meta_end,
)
from soupflow.message.values import (
    BULK_VRS,
    PIXEL_TAGS,
    REPLACEMENT,
    UNDEFINED_LENGTH,
    Element,
    bulk_vr,
)

_IMPLICIT = struct.Struct("<HHI")  # an item's or delimiter's header
_VR_TEXT = {vr: vr.decode() for vr in LONG_VRS | SHORT_VRS}
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_CHARACTER_SET = 0x00080005
_MAX_NESTING = 32
# The objects of a series repeat most of their header byte for byte: an element read once is
# handed again to the objects after it (by tag, VR, bytes and character set). Bounded in
# count and in value size; the values are PHI and stay in this process's memory, like the
# messages themselves.
_SEEN: dict[tuple[int, str, bytes, str], Element] = {}
_SEEN_LIMIT = 8192
_SEEN_VALUE_BYTES = 256
# pydicom's default encoding ("iso8859") is Latin-1; ISO_IR 192 is UTF-8.
_ENCODINGS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8"}
_NUMBERS = {
    "US": "H",
    "SS": "h",
    "UL": "L",
    "SL": "l",
    "UV": "Q",
    "SV": "q",
    "FL": "f",
    "FD": "d",
    "AT": "HH",
}
_TEXT_VRS = frozenset(("SH", "LO", "UC"))  # split on backslash, each value right-stripped
_SINGLE_TEXT_VRS = frozenset(("ST", "LT", "UT"))  # one value, right-stripped


class _UnsupportedError(Exception):
    """Not a plain object: pydicom reads it."""


def read_elements(path: Path) -> list[Element] | None:
    """The top-level elements of the object at `path` in tag order, or None for pydicom."""
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            found = meta_end(view)
            if found is None:
                return None
            offset, transfer_syntax = found
            if transfer_syntax == EXPLICIT_VR_BIG_ENDIAN or transfer_syntax.endswith(".99"):
                return None
            reader = _Reader(view, implicit=transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN)
            elements, end = reader.dataset(offset, len(view), depth=0)
            if end != len(view) or not elements:
                return None
            return elements
    except (_UnsupportedError, struct.error, UnicodeDecodeError, ValueError, OSError):
        return None


class _Reader:
    def __init__(self, view: mmap.mmap, implicit: bool) -> None:
        self.view = view
        self.implicit = implicit
        self.encoding = "latin_1"

    def dataset(
        self, offset: int, end: int, depth: int, delimited: bool = False
    ) -> tuple[list[Element], int]:
        """Elements from `offset` to `end`, or to the item delimiter when `delimited`."""
        view, previous = self.view, -1
        found: list[Element] = []
        while offset < end:
            tag, vr, length, value_at = self._header(offset)
            if tag == _ITEM_END and delimited:
                return found, value_at
            if tag <= previous or tag >> 16 == 0xFFFE:
                raise _UnsupportedError
            previous = tag
            if tag in PIXEL_TAGS or vr in BULK_VRS:
                if length == UNDEFINED_LENGTH:
                    if vr == "UN":
                        raise _UnsupportedError
                    offset = self._skip_items(value_at, end)
                    found.append(Element(tag, bulk_vr(vr), None, None, is_bulk=True))
                    continue
                offset = self._within(value_at, length, end)
                found.append(Element(tag, bulk_vr(vr), None, length, is_bulk=True))
                continue
            if vr == "SQ":
                items, offset = self._items(value_at, length, end, depth)
                found.append(Element(tag, vr, items))
                continue
            if length == UNDEFINED_LENGTH:
                raise _UnsupportedError
            offset = self._within(value_at, length, end)
            element = self._element(tag, vr, view[value_at:offset])
            if tag == _CHARACTER_SET:
                if depth > 0:
                    raise _UnsupportedError
                self.encoding = _encoding(element.value)
            found.append(element)
        if delimited:
            raise _UnsupportedError  # an undefined-length item without its delimiter
        return found, offset

    def _header(self, offset: int) -> tuple[int, str, int, int]:
        """(tag, VR, value length, where the value starts) of the element at `offset`."""
        group, element, vr, length, value_at = element_header(self.view, offset, self.implicit)
        tag = group << 16 | element
        if self.implicit and group != 0xFFFE:
            return tag, _dictionary_vr(tag), length, value_at
        return tag, _VR_TEXT.get(vr, ""), length, value_at

    def _element(self, tag: int, vr: str, data: bytes) -> Element:
        """The element with these bytes: the one read before, or read now."""
        key = (tag, vr, data, self.encoding)
        element = _SEEN.get(key)
        if element is None:
            element = Element(tag, vr, _decode(vr, data, self.encoding))
            if len(data) <= _SEEN_VALUE_BYTES:
                if len(_SEEN) >= _SEEN_LIMIT:
                    _SEEN.clear()
                _SEEN[key] = element
        return element

    def _within(self, value_at: int, length: int, end: int) -> int:
        if value_at + length > end:
            raise _UnsupportedError
        return value_at + length

    def _items(
        self, value_at: int, length: int, end: int, depth: int
    ) -> tuple[list[list[Element]], int]:
        """A sequence's items (each its elements) and where the sequence ends."""
        if depth >= _MAX_NESTING:
            raise _UnsupportedError
        stop = end if length == UNDEFINED_LENGTH else self._within(value_at, length, end)
        items: list[list[Element]] = []
        offset = value_at
        while offset < stop:
            (group, element, item_length) = _IMPLICIT.unpack_from(self.view, offset)
            tag, offset = group << 16 | element, offset + 8
            if tag == _SEQUENCE_END and length == UNDEFINED_LENGTH:
                return items, offset
            if tag != _ITEM:
                raise _UnsupportedError
            if item_length == UNDEFINED_LENGTH:
                item, offset = self.dataset(offset, stop, depth + 1, delimited=True)
            else:
                item_end = self._within(offset, item_length, stop)
                item, offset = self.dataset(offset, item_end, depth + 1)
                if offset != item_end:
                    raise _UnsupportedError
            items.append(item)
        if length == UNDEFINED_LENGTH:
            raise _UnsupportedError  # no sequence delimiter
        return items, offset

    def _skip_items(self, offset: int, end: int) -> int:
        """Past the fragments of encapsulated pixel data (or another undefined-length value)."""
        while offset + 8 <= end:
            group, element, length = _IMPLICIT.unpack_from(self.view, offset)
            tag, offset = group << 16 | element, offset + 8
            if tag == _SEQUENCE_END:
                return offset
            if tag != _ITEM or length == UNDEFINED_LENGTH:
                raise _UnsupportedError
            offset = self._within(offset, length, end)
        raise _UnsupportedError


@cache
def _dictionary_vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        raise _UnsupportedError from None  # private or unknown: pydicom decides
    if " or " in vr and vr not in BULK_VRS:
        raise _UnsupportedError  # "US or SS": pydicom resolves it from the dataset
    return vr


def _encoding(value: Any) -> str:
    terms = value if isinstance(value, list) else [value]
    if len(terms) != 1 or terms[0] not in _ENCODINGS:
        raise _UnsupportedError
    return _ENCODINGS[terms[0]]


def _decode(vr: str, data: bytes, encoding: str) -> Any:
    """A value as pydicom's converter for `vr` decodes it (values.py, pydicom 3)."""
    if not data:
        return None if vr in _NUMBERS else ""
    if vr in _NUMBERS:
        return _numbers(vr, data)
    if vr in _TEXT_VRS or vr in _SINGLE_TEXT_VRS or vr == "PN":
        if b"\x1b" in data:  # ISO 2022 escape sequences
            raise _UnsupportedError
        text = (data.rstrip(b"\x00 ") if vr == "PN" else data).decode(encoding)
        if REPLACEMENT in text:  # pydicom would note it as undecodable
            raise _UnsupportedError
        if vr == "PN":  # str(PersonName) drops empty trailing component groups
            return _split_each(text, lambda name: name.rstrip("="))
        if vr in _SINGLE_TEXT_VRS:
            return text.rstrip("\0 ")
        return _split_each(text, lambda item: item.rstrip("\0 "))
    decoder = _STRING_DECODERS.get(vr)
    if decoder is None:
        raise _UnsupportedError
    return decoder(data.decode("latin_1"))


def _numbers(vr: str, data: bytes) -> Any:
    code = _NUMBERS[vr]
    size = struct.calcsize("<" + code)
    if len(data) % size:
        raise _UnsupportedError
    values = struct.unpack(f"<{len(data) // size * len(code)}{code[0]}", data)
    if vr == "AT":
        values = tuple(values[i] << 16 | values[i + 1] for i in range(0, len(values), 2))
    return values[0] if len(values) == 1 else list(values)


def _multi(text: str) -> str | list[str]:
    return _split_each(text.rstrip(" \x00"))


_STRING_DECODERS: dict[str, Callable[[str], Any]] = {
    "AE": lambda text: _split_each(text, str.strip),
    "AS": _multi,
    "CS": _multi,
    "DA": _multi,
    "DT": _multi,
    "TM": _multi,
    "UI": lambda text: _multi(text.rstrip("\0 ")),
    "UR": str.rstrip,
    "DS": lambda text: _split_each(text.strip().rstrip(" \x00"), str.strip),
    "IS": lambda text: _split_each(text.rstrip(" \x00"), str.strip),
}


def _split_each(text: str, tidy: Callable[[str], str] | None = None) -> str | list[str]:
    """One value, or the list of a multi-valued one (backslash-separated), each tidied."""
    items = text.split("\\")
    if tidy is not None:
        items = [tidy(item) for item in items]
    return items[0] if len(items) == 1 else items
