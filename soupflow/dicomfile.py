"""Reading a stored Part 10 object: element headers only, large values left on disk. Pure.

Upstream: listener (is a received object usable?), message.convert. pydicom is lenient: it
stops quietly at bytes it cannot read. `read_object` adds the check a router needs: the
dataset holds elements, and none of them claims more bytes than the object has.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# Values longer than this stay on disk (pixel data and other bulk values are never read).
DEFER_BYTES = 16 * 1024
_UNDEFINED_LENGTH = 0xFFFFFFFF


class MalformedObjectError(ValueError):
    """The object cannot be parsed as a DICOM dataset."""


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
