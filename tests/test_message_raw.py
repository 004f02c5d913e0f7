"""message.raw reads plain objects without pydicom: the message must be the same either way."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bench.message import structured_report
from soupflow.dicom.part10 import read_object
from soupflow.message import convert as conversion
from soupflow.message.convert import Options, convert, render
from soupflow.message.raw import read_elements
from soupflow.message.values import Notes, elements
from tests import records
from tests.test_message import CHARSET_FILES, TEST_FILES

FILES = TEST_FILES + CHARSET_FILES
CYRILLIC_NAME = "\u0418\u0432\u0430\u043d\u043e\u0432^\u0418\u0432\u0430\u043d"


def _both(path: Path, options: Options, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """The message through message.raw, and through pydicom alone."""
    arrival = records.arrival()
    direct = render(convert(path, arrival, options))
    with monkeypatch.context() as patch:
        patch.setattr(conversion, "read_elements", lambda _path: None)
        through_pydicom = render(convert(path, arrival, options))
    return direct, through_pydicom


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
@pytest.mark.parametrize("tags_format", ["Keyword", "DicomJson"])
def test_raw_reading_gives_pydicoms_message(
    path: Path, tags_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct, through_pydicom = _both(path, Options(tags_format=tags_format), monkeypatch)
    assert direct == through_pydicom


def test_most_shipped_files_are_read_without_pydicom() -> None:
    read = [path.name for path in FILES if read_elements(path) is not None]
    assert len(read) >= 60, read
    assert "CT_small.dcm" in read and "MR_small.dcm" in read


@pytest.mark.parametrize(
    "name",
    [
        "ExplVR_BigEnd.dcm",  # big endian
        "image_dfl.dcm",  # deflated
        "ExplVR_LitEndNoMeta.dcm",  # no file meta
    ],
)
def test_what_raw_reading_leaves_to_pydicom(name: str) -> None:
    assert read_elements(Path(get_testdata_file(name))) is None


def test_a_character_set_it_does_not_handle_is_left_to_pydicom(tmp_path: Path) -> None:
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SpecificCharacterSet = "ISO_IR 144"  # Cyrillic
    dataset.PatientName = CYRILLIC_NAME
    path = tmp_path / "cyrillic.dcm"
    dataset.save_as(path)
    assert read_elements(path) is None
    fields = convert(path, records.arrival(), Options())["CommonFields"]
    assert fields["PatientName"] == CYRILLIC_NAME


@pytest.mark.parametrize("items", [0, 1, 30])
def test_an_srs_report_is_the_same_read_raw_or_through_pydicom(
    items: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TEXT, CODE and NUM items (bench.message's SR) and pydicom's own test-SR.dcm."""
    generated = structured_report(tmp_path / "sr.dcm", items)
    assert len(convert(generated, records.arrival(), Options())["Report"]["Items"]) == items
    for path in (Path(get_testdata_file("test-SR.dcm")), generated):
        assert read_elements(path) is not None  # the Report is read from the raw elements
        assert "Report" in convert(path, records.arrival(), Options())
        direct, through_pydicom = _both(path, Options(), monkeypatch)
        assert direct == through_pydicom


def test_a_long_text_value_is_kept_by_both_readers(tmp_path: Path) -> None:
    """pydicom leaves values over 16 KB on disk; a long UT is text, not bulk, and is read."""
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.ImageComments = "x" * 10  # LT
    dataset.add_new(0x00400280, "ST", "comment")
    dataset.add_new(0x00189917, "UT", "long " * 8000)  # InstructionDescription, 40 KB
    path = tmp_path / "long.dcm"
    dataset.save_as(path)
    read = read_elements(path)
    assert read is not None
    through_pydicom = list(elements(read_object(path), Notes()))
    for found in (read, through_pydicom):
        (long_text,) = (element for element in found if element.tag == 0x00189917)
        assert long_text.value == ("long " * 8000).rstrip()


def _series(tmp_path: Path, count: int, edit: Callable[[Dataset, int], None]) -> list[Path]:
    """`count` objects of one CT series made from pydicom's CT_small, each changed by `edit`."""
    paths = []
    for number in range(count):
        dataset = dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        edit(dataset, number)
        path = tmp_path / f"{number}.dcm"
        dataset.save_as(path)
        paths.append(path)
    return paths


def test_the_objects_of_a_series_share_the_elements_they_have_byte_for_byte(
    tmp_path: Path,
) -> None:
    def position(dataset: Dataset, number: int) -> None:
        dataset.ImagePositionPatient = [0, 0, number]

    first, second = (read_elements(path) for path in _series(tmp_path, 2, position))
    assert first is not None and second is not None
    pairs = {element.tag: (element, other) for element, other in zip(first, second, strict=True)}
    study, _ = pairs[0x0020000D]  # StudyInstanceUID: the same bytes, read once
    assert study is pairs[0x0020000D][1]
    for tag in (0x00080018, 0x00200032):  # SOPInstanceUID, ImagePositionPatient: read each time
        element, other = pairs[tag]
        assert element is not other and element.value != other.value


def test_a_value_changed_in_one_message_does_not_reach_the_next(tmp_path: Path) -> None:
    """Elements and their JSON values are shared between objects; a message's are its own."""
    paths = _series(tmp_path, 2, lambda _dataset, _number: None)
    first = convert(paths[0], records.arrival(), Options())
    expected = render(convert(paths[1], records.arrival(), Options()))
    first["Tags"]["ImagePositionPatient"].append(99)
    first["Tags"]["ImageType"][0] = "CHANGED"
    assert render(convert(paths[1], records.arrival(), Options())) == expected


def test_the_same_bytes_under_another_character_set_are_read_again(tmp_path: Path) -> None:
    name, written = "Buc^J\u00e9r\u00f4me", "Buc^J##r$$me"  # as many bytes as its UTF-8

    def character_set(dataset: Dataset, number: int) -> None:
        dataset.SpecificCharacterSet = "ISO_IR 192" if number else "ISO_IR 100"
        dataset.PatientName = written

    paths = _series(tmp_path, 2, character_set)
    for path in paths:  # the same PatientName bytes in both objects
        data = path.read_bytes().replace(b"##", "\u00e9".encode()).replace(b"$$", "\u00f4".encode())
        path.write_bytes(data)
    latin, utf8 = (convert(path, records.arrival(), Options()) for path in paths)
    assert latin["Tags"]["PatientName"] == name.encode("utf_8").decode("latin_1")
    assert utf8["CommonFields"]["PatientName"] == utf8["Tags"]["PatientName"] == name


def test_an_srs_other_value_types_are_the_same_read_raw_or_through_pydicom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = structured_report(tmp_path / "sr.dcm", 3)
    dataset = dcmread(path)
    extra = []
    for value_type, keyword, value in [
        ("PNAME", "PersonName", "Doe^Jane^^Dr"),
        ("DATE", "Date", "20261203"),
        ("UIDREF", "UID", "1.2.3.4"),
        ("NUM", None, None),
    ]:
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", value_type
        if keyword:
            setattr(item, keyword, value)
        extra.append(item)
    by_reference = Dataset()
    by_reference.RelationshipType = "INFERRED FROM"
    by_reference.ReferencedContentItemIdentifier = [1, 2]
    image = Dataset()
    image.RelationshipType, image.ValueType = "CONTAINS", "IMAGE"
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    referenced.ReferencedSOPInstanceUID = "1.2.3.4.5"
    image.ReferencedSOPSequence = [referenced]
    dataset.ContentSequence[0].ContentSequence = [*extra, by_reference, image]
    dataset.save_as(path)
    assert read_elements(path) is not None
    items = convert(path, records.arrival(), Options())["Report"]["Items"][0]["Items"]
    assert [item["Value"] for item in items][:3] == ["Doe^Jane^^Dr", "20261203", "1.2.3.4"]
    assert items[4]["ReferencedContentItem"] == "1.2"
    direct, through_pydicom = _both(path, Options(), monkeypatch)
    assert direct == through_pydicom
