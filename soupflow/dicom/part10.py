"""Part 10 objects: the header soupflow writes, and reading one back. Pure.

Upstream: acceptor (`file_meta`), ingest (`identify`: is a received object usable?),
requestor (`dataset_offset`: what to send), message.convert (`read_object`). pydicom is lenient: it stops quietly at bytes it cannot
read. `read_object` adds the check a router needs: the dataset holds elements, and none of
them claims more bytes than the object has. `identify` runs on every C-STORE before Success,
so it walks the element headers itself (no dataset is built) and leaves anything unusual to
`read_object`: it gives the same answer, only faster on well-formed objects.
"""

from __future__ import annotations

import mmap
import struct
import uuid
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# Values longer than this stay on disk (pixel data and other bulk values are never read).
DEFER_BYTES = 16 * 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF


# A UUID-derived UID (PS3.5 B.2): soupflow has no registered root of its own.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'soupflow:implementation').int}"
IMPLEMENTATION_VERSION_NAME = "SOUPFLOW_0_1"

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_MAX_NESTING = 32
_SOP_CLASS_UID = (0x0008, 0x0016)
_SOP_INSTANCE_UID = (0x0008, 0x0018)
_IDENTITY = frozenset((_SOP_CLASS_UID, _SOP_INSTANCE_UID))
# One unpack per element header, by byte order (PS3.5 7.1.2 explicit, 7.1.3 implicit).
_EXPLICIT_HEADER = {order: struct.Struct(order + "HH2sH") for order in "<>"}
_IMPLICIT_HEADER = {order: struct.Struct(order + "HHI") for order in "<>"}
_LENGTH = {order: struct.Struct(order + "I") for order in "<>"}


class MalformedObjectError(ValueError):
    """The object cannot be parsed as a DICOM dataset."""


class UnknownVRError(ValueError):
    """An explicit-VR element header whose VR is none of PS3.5's."""


def element_header(
    view: mmap.mmap, offset: int, implicit: bool, endian: str = "<"
) -> tuple[int, int, bytes, int, int]:
    """(group, element, VR, value length, where the value starts) of the element header at
    `offset`; the VR is b"" for implicit VR and for item and delimiter tags. struct.error
    when the header runs past the end."""
    if implicit:
        group, element, length = _IMPLICIT_HEADER[endian].unpack_from(view, offset)
        return group, element, b"", length, offset + 8
    group, element, vr, length = _EXPLICIT_HEADER[endian].unpack_from(view, offset)
    if group == 0xFFFE:  # item and delimiter tags have no VR
        (length,) = _LENGTH[endian].unpack_from(view, offset + 4)
        return group, element, b"", length, offset + 8
    if vr in SHORT_VRS:
        return group, element, vr, length, offset + 8
    if vr in LONG_VRS:
        (length,) = _LENGTH[endian].unpack_from(view, offset + 8)
        return group, element, vr, length, offset + 12
    raise UnknownVRError


def read_object(path: Path) -> Dataset:
    """The object's dataset (lazy), or MalformedObjectError saying what is wrong with it."""
    try:
        dataset = dcmread(path, defer_size=DEFER_BYTES)
    except Exception as exc:  # pydicom raises many kinds for unreadable input
        raise MalformedObjectError(f"{type(exc).__name__}: {exc}"[:300]) from exc
    size = path.stat().st_size
    if len(dataset) == 0:
        raise MalformedObjectError("the object holds no data elements")
    for element in dataset._dict.values():
        if (
            isinstance(element, RawDataElement)
            and element.length != _UNDEFINED_LENGTH
            and element.value_tell + element.length > size
        ):
            tag = int(element.tag)
            raise MalformedObjectError(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) claims {element.length} bytes "
                "past the end of the object (truncated?)"
            )
    return dataset


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information of a received object (PS3.10 7.1)."""
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", uid_bytes(sop_class_uid)),
            _meta_element(0x0003, b"UI", uid_bytes(sop_instance_uid)),
            _meta_element(0x0010, b"UI", uid_bytes(transfer_syntax_uid)),
            _meta_element(0x0012, b"UI", uid_bytes(IMPLEMENTATION_CLASS_UID)),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
        )
    )
    return (
        bytes(128)
        + b"DICM"
        + _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
        + elements
    )


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def uid_bytes(value: str) -> bytes:
    """A UI value as stored: ASCII, padded with NUL to an even length (PS3.5 9.1)."""
    encoded = value.encode("ascii")
    return encoded + b"\0" if len(encoded) % 2 else encoded


def uid_text(value: bytes) -> str:
    """A stored UI (or other text) value without its padding."""
    return value.decode("ascii", errors="replace").rstrip("\0 ")


def dataset_offset(head: bytes) -> int:
    """Where the dataset starts in a Part 10 file whose first bytes are `head`: after the
    preamble, the prefix and the file meta group (explicit VR little endian, PS3.10 7.1)."""
    if head[128:132] != b"DICM":
        raise MalformedObjectError("no DICM prefix: not a Part 10 file")
    offset = 132
    while head[offset : offset + 2] == b"\x02\x00":
        vr = head[offset + 4 : offset + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", head, offset + 8)
            offset += 12 + length
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            offset += 8 + length
    if offset > len(head):
        raise MalformedObjectError("the file meta group runs past the file's first bytes")
    return offset


def meta_end(view: mmap.mmap) -> tuple[int, str] | None:
    """(where the dataset starts, the transfer syntax) of a Part 10 object mapped in `view`,
    or None when its prefix or file meta group is not plainly well-formed."""
    if view[128:132] != b"DICM":
        return None
    offset, transfer_syntax = 132, None
    try:
        while view[offset : offset + 2] == b"\x02\x00":
            _, element, _, length, value_at = element_header(view, offset, implicit=False)
            if element == 0x0010:
                transfer_syntax = uid_text(view[value_at : value_at + length])
            offset = value_at + length
    except (UnknownVRError, struct.error):
        return None
    if transfer_syntax is None or offset > len(view):
        return None
    return offset, transfer_syntax


def identify(path: Path) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of a Part 10 object, or MalformedObjectError."""
    try:
        return _Walk(path).identify()
    except (_TruncatedError, struct.error):  # struct.error: a header runs past the end
        raise MalformedObjectError(
            "the dataset ends inside an element, item or sequence (truncated?)"
        ) from None
    except (_UnclearError, ValueError, OSError):
        dataset = read_object(path)
        return str(dataset.get("SOPClassUID", "")), str(dataset.get("SOPInstanceUID", ""))


class _UnclearError(Exception):
    """Not a plainly well-formed object: `read_object` decides."""


class _TruncatedError(_UnclearError):
    """Every element header read so far was sound, and the object ends inside a value, an
    item or a sequence: it is cut short, whatever a lenient reader would make of it."""


class _Walk:
    """Element headers of a Part 10 object, walked in place (mmap), values skipped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: dict[tuple[int, int], str] = {}

    def identify(self) -> tuple[str, str]:
        with (
            self.path.open("rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view,
        ):
            found = meta_end(view)
            if found is None:
                raise _UnclearError
            offset, transfer_syntax = found
            if transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN:
                implicit, endian = True, "<"
            elif transfer_syntax == EXPLICIT_VR_BIG_ENDIAN:
                implicit, endian = False, ">"
            elif transfer_syntax.endswith(".99"):  # deflated: pydicom inflates it
                raise _UnclearError
            else:
                implicit, endian = False, "<"
            end = self._dataset(view, offset, len(view), implicit, endian, depth=0)
            if end != len(view) or end == offset:
                raise _UnclearError
        return self.found.get(_SOP_CLASS_UID, ""), self.found.get(_SOP_INSTANCE_UID, "")

    def _dataset(
        self, view: mmap.mmap, offset: int, end: int, implicit: bool, endian: str, depth: int
    ) -> int:
        """Walk elements from `offset`; return where they end (an item's delimiter when nested)."""
        while offset < end:
            group, element, _, length, value_at = element_header(view, offset, implicit, endian)
            if group == 0xFFFE:
                if element == 0xE00D and depth > 0:
                    return value_at
                raise _UnclearError
            if length == _UNDEFINED_LENGTH:
                un = not implicit and view[offset + 4 : offset + 6] == b"UN"
                offset = self._items(
                    view, value_at, end, implicit or un, "<" if un else endian, depth
                )
                continue
            if value_at + length > end:
                raise _TruncatedError
            if group == 0x0008 and depth == 0 and (group, element) in _IDENTITY:
                self.found[(group, element)] = uid_text(view[value_at : value_at + length])
            offset = value_at + length
        if depth > 0:
            raise _TruncatedError  # an undefined-length item without its delimiter
        return offset

    def _items(
        self, view: mmap.mmap, offset: int, end: int, implicit: bool, endian: str, depth: int
    ) -> int:
        """Walk the items of an undefined-length value (a sequence or encapsulated pixels)."""
        if depth >= _MAX_NESTING:
            raise _UnclearError
        while offset + 8 <= end:
            group, element, length = _IMPLICIT_HEADER[endian].unpack_from(view, offset)
            offset += 8
            if (group, element) == (0xFFFE, 0xE0DD):
                return offset
            if (group, element) != (0xFFFE, 0xE000):
                raise _UnclearError
            if length == _UNDEFINED_LENGTH:
                offset = self._dataset(view, offset, end, implicit, endian, depth + 1)
            elif offset + length > end:
                raise _TruncatedError
            else:
                offset += length
        raise _TruncatedError  # the sequence (or the encapsulated pixel data) has no delimiter
