"""Part 10 files: the header soupflow writes, and `identify`, the check run before Success."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from soupflow.dicom import part10 as dicomfile
from soupflow.dicom.part10 import (
    MalformedObjectError,
    dataset_offset,
    file_meta,
    identify,
    read_object,
)

SHIPPED = sorted(Path(str(get_testdata_file("CT_small.dcm"))).parent.glob("*.dcm"))


def _pydicom_verdict(path: Path) -> tuple[str, str] | str:
    try:
        dataset = read_object(path)
    except MalformedObjectError:
        return "malformed"
    return str(dataset.get("SOPClassUID", "")), str(dataset.get("SOPInstanceUID", ""))


def _verdict(path: Path) -> tuple[str, str] | str:
    try:
        return identify(path)
    except MalformedObjectError:
        return "malformed"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_identify_agrees_with_pydicom_on_every_shipped_file(path: Path) -> None:
    assert _verdict(path) == _pydicom_verdict(path)


def _nested(transfer_syntax: str, path: Path) -> tuple[str, str]:
    """An object with undefined-length sequences two deep and encapsulated-looking bytes."""
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "121071", "Finding"
    item = Dataset()
    item.TextValue = "x" * 33
    item.ConceptNameCodeSequence = Sequence([inner])
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    dataset.SOPInstanceUID = generate_uid()
    dataset.ContentSequence = Sequence([item, item])
    dataset.PatientName = "Doe^Jane"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    for sequence in (dataset.ContentSequence, item.ConceptNameCodeSequence):
        sequence.is_undefined_length = True
    for each in (item, inner):
        each.is_undefined_length_sequence_item = True
    dataset.save_as(path, enforce_file_format=True)
    return dataset.SOPClassUID, dataset.SOPInstanceUID


@pytest.mark.parametrize(
    "transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_identify_walks_undefined_length_sequences_without_pydicom(
    tmp_path: Path, transfer_syntax: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nested.dcm"
    expected = _nested(transfer_syntax, path)
    assert dcmread(path).ContentSequence[1].ConceptNameCodeSequence[0].CodeValue == "121071"

    def no_pydicom(_: Path) -> Dataset:
        raise AssertionError("identify fell back to pydicom on a well-formed object")

    monkeypatch.setattr(dicomfile, "read_object", no_pydicom)
    assert identify(path) == expected


def test_identify_finds_a_truncated_object_malformed(tmp_path: Path) -> None:
    path = tmp_path / "truncated.dcm"
    path.write_bytes(Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()[:-1000])
    with pytest.raises(MalformedObjectError, match="truncated"):
        identify(path)


def test_file_meta_is_what_pydicom_reads(tmp_path: Path) -> None:
    source = Path(str(get_testdata_file("MR_small.dcm")))
    original = dcmread(source)
    path = tmp_path / "received.dcm"
    raw = source.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")
    header = file_meta(
        original.SOPClassUID, original.SOPInstanceUID, original.file_meta.TransferSyntaxUID
    )
    path.write_bytes(header + raw[144 + group_length :])
    stored = dcmread(path)
    meta = stored.file_meta
    assert (meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID) == (
        original.SOPClassUID,
        original.SOPInstanceUID,
    )
    assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert meta.ImplementationClassUID == dicomfile.IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationClassUID.is_valid
    assert meta.FileMetaInformationGroupLength == len(header) - 144
    assert stored.PatientName == original.PatientName


SHIPPED = sorted((Path(str(get_testdata_file("CT_small.dcm"))).parent).glob("*.dcm"))


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_every_shipped_file_cut_short_is_malformed_or_ends_at_an_element(
    tmp_path: Path, fraction: float
) -> None:
    """identify() refuses a cut object unless the cut falls between two elements (then what
    remains is a complete, shorter dataset, and pydicom reads it whole)."""
    checked = 0
    for source in SHIPPED:
        raw = source.read_bytes()
        try:
            start = dataset_offset(raw[:65536])
            identify(source)
        except (MalformedObjectError, ValueError):
            continue  # the whole file is not one identify accepts: nothing to cut
        cut = tmp_path / source.name
        cut.write_bytes(raw[: start + int((len(raw) - start) * fraction)])
        checked += 1
        try:
            identify(cut)
        except MalformedObjectError:
            continue
        read_object(cut)  # raises when an element runs past the end
    assert checked > 50
