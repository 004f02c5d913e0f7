"""The DICOM message: correct for real-world data, never failing, deterministic, schema-valid."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import jsonschema
import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from soupflow.message.convert import COMMON_FIELDS, Options, convert, render
from soupflow.message.report import one_line
from soupflow.store.queue import Arrival
from tests import documents, records

MESSAGE_SCHEMA = json.loads(
    (documents.REPO / "schemas" / "dicom-message.schema.json").read_text(encoding="utf-8")
)
VALIDATOR = jsonschema.Draft202012Validator(MESSAGE_SCHEMA)
TEST_FILES = sorted(
    path
    for path in Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*")
    if path.is_file()
)
CHARSET_FILES = sorted(Path(path) for path in get_charset_files("*.dcm"))


def arrival(byte_count: int = 0) -> Arrival:
    return records.arrival(byte_count=byte_count)


def message(path: Path, **options: Any) -> dict[str, Any]:
    converted = convert(path, arrival(), Options(**options))
    VALIDATOR.validate(converted)
    return converted


def test_there_are_many_test_files() -> None:
    assert len(TEST_FILES) >= 80


@pytest.mark.parametrize("path", TEST_FILES + CHARSET_FILES, ids=lambda path: path.name)
@pytest.mark.parametrize("tags_format", ["Keyword", "DicomJson"])
def test_every_shipped_file_converts_or_reports_a_parse_error(path: Path, tags_format: str) -> None:
    converted = message(path, tags_format=tags_format)
    if "ParseError" not in converted["Association"]:
        assert converted["Tags"], "a parsed object has tags"
    assert render(converted) == render(convert(path, arrival(), Options(tags_format=tags_format)))


def test_association_facts_are_carried() -> None:
    association = message(Path(get_testdata_file("CT_small.dcm")))["Association"]
    assert association == {
        "CallingAET": "MODALITY01",
        "CalledAET": "SOUPFLOW",
        "PeerAddress": "127.0.0.1",
        "PeerPort": 40001,
        "ReceivedAt": "2026-09-21T14:13:20.123Z",
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "ByteCount": 0,
        "RequestId": "8c7f0c1e-2b6a-4f7e-9a51-0d1c2b3a4f5e",
        "WorkflowId": "workflow-1",
        "Warnings": [],
    }


def test_common_fields_are_strings_as_in_the_dataset() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    fields = message(path)["CommonFields"]
    dataset = dcmread(path)
    assert list(fields) == list(COMMON_FIELDS)
    assert fields["PatientName"] == "CompressedSamples^CT1"
    assert fields["SOPClassName"] == "CT Image Storage"
    assert fields["SOPInstanceUID"] == dataset.SOPInstanceUID
    assert fields["AccessionNumber"] == ""
    assert fields["SeriesNumber"] == str(dataset.SeriesNumber)


def test_tags_values_by_vr() -> None:
    tags = message(Path(get_testdata_file("CT_small.dcm")))["Tags"]
    assert tags["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert tags["PatientName"] == "CompressedSamples^CT1"
    assert tags["Rows"] == 128
    assert tags["ImagePositionPatient"] == [-158.135803, -179.035797, -75.699997]
    assert tags["PixelData"] == {"BulkData": {"VR": "OW", "Length": 32768}}
    assert "00431028" in tags  # a GE private tag, by its hex


def test_dicom_json_matches_pydicoms_own_json_model() -> None:
    path = Path(get_testdata_file("MR_small.dcm"))
    ours = message(path, tags_format="DicomJson")["Tags"]
    theirs = dcmread(path).to_json_dict(bulk_data_threshold=1 << 30)
    for tag, entry in theirs.items():
        if entry["vr"] in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
            assert ours[tag] == {"vr": entry["vr"]}
        else:
            assert ours[tag] == entry, tag


def _items(dataset: Dataset) -> list[Dataset]:
    found = []
    for item in dataset.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _flatten(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for item in items:
        found.append(item)
        found.extend(_flatten(item.get("Items", [])))
    return found


@pytest.mark.parametrize("name", ["test-SR.dcm", "reportsi.dcm"])
def test_sr_report_matches_the_dataset_item_by_item(name: str) -> None:
    path = Path(get_testdata_file(name))
    dataset = dcmread(path)
    report = message(path)["Report"]
    assert report["Title"] == dataset.ConceptNameCodeSequence[0].CodeMeaning
    assert report["CompletionFlag"] == dataset.CompletionFlag
    assert report["VerificationFlag"] == dataset.VerificationFlag
    expected, produced = _items(dataset), _flatten(report["Items"])
    assert len(produced) == len(expected)
    texts = []
    for item, node in zip(expected, produced, strict=True):
        assert node["ValueType"] == item.get("ValueType", "")
        assert node["Relationship"] == item.get("RelationshipType", "")
        name_code = item.get("ConceptNameCodeSequence")
        assert node["Name"] == (name_code[0].CodeMeaning if name_code else "")
        if node["ValueType"] == "TEXT":
            assert node["Value"] == item.TextValue
            texts.append(item.TextValue)
        if node["ValueType"] == "CODE":
            assert node["Code"]["Meaning"] == item.ConceptCodeSequence[0].CodeMeaning
        if node["ValueType"] == "NUM":
            assert node["Numeric"] == float(item.MeasuredValueSequence[0].NumericValue)
    position = 0
    for text in texts:  # every TEXT value, in document order, on its one line
        position = report["Text"].index(one_line(text), position) + len(one_line(text))
    assert report["Text"].count("\n") == len(produced)  # the title, then one line per item


def test_line_breaks_inside_a_value_keep_text_one_line_per_item() -> None:
    path = Path(get_testdata_file("test-SR.dcm"))
    values = [item.get("TextValue", "") for item in _items(dcmread(path))]
    assert any("\r" in value or "\n" in value for value in values)  # the file has some
    text = message(path)["Report"]["Text"]
    assert "\r" not in text
    assert "Sample Text\\nA\\nB\\nC" in text
    assert one_line("a\\b\r\nc") == "a\\\\b\\nc"


def test_a_non_sr_object_has_no_report() -> None:
    assert "Report" not in message(Path(get_testdata_file("CT_small.dcm")))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
        ("chrI2.dcm", "Hong^Gildong=洪^吉洞=홍^길동"),
        ("chrX1.dcm", "Wang^XiaoDong=王^小東"),  # pydicom drops the empty phonetic group
        ("chrX2.dcm", "Wang^XiaoDong=王^小东"),
        ("chrFren.dcm", "Buc^Jérôme"),
        ("chrGerm.dcm", "Äneas^Rüdiger"),
        ("chrGreek.dcm", "Διονυσιος"),
        ("chrRuss.dcm", "Люкceмбypг"),  # noqa: RUF001 (the file mixes Latin and Cyrillic letters)
    ],
)
def test_names_in_other_character_sets_come_out_as_unicode(name: str, expected: str) -> None:
    [path] = [path for path in CHARSET_FILES if path.name == name]
    converted = message(path)
    assert converted["CommonFields"]["PatientName"] == expected
    assert converted["Tags"]["PatientName"] == expected
    assert converted["Association"]["Warnings"] == []


def test_a_sequence_with_its_own_character_set_is_decoded_with_it() -> None:
    [path] = [path for path in CHARSET_FILES if path.name == "chrSQEncoding.dcm"]
    tags = message(path)["Tags"]
    [item] = (
        tags["ReferencedPatientSequence"]
        if "ReferencedPatientSequence" in tags
        else next(v for v in tags.values() if isinstance(v, list) and v and isinstance(v[0], dict))
    )
    assert "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう" in item.values()


def written(folder: Path, raw: dict[int, tuple[str, bytes]] | None = None, **elements: Any) -> Path:
    """A generated object; `raw` values are written byte for byte (malformed ones too)."""
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = generate_uid()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    for tag, (vr, data) in (raw or {}).items():
        dataset[tag] = RawDataElement(Tag(tag), vr, len(data), data, 0, False, True)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / "generated.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_undecodable_bytes_are_replaced_and_noted_without_their_value(tmp_path: Path) -> None:
    path = written(tmp_path, SpecificCharacterSet="ISO_IR 192", PatientName=b"Caf\xe9^Ol\xff")
    converted = message(path)
    assert converted["Tags"]["PatientName"].startswith("Caf\ufffd")
    assert converted["Association"]["Warnings"] == [
        "undecodable bytes in (0010,0010) were replaced"
    ]


def test_malformed_numbers_are_kept_as_text(tmp_path: Path) -> None:
    path = written(
        tmp_path, raw={0x00200013: ("IS", b"12a "), 0x00180050: ("DS", b"1.2.3 ")}, Rows=512
    )
    tags = message(path)["Tags"]
    assert (tags["InstanceNumber"], tags["SliceThickness"], tags["Rows"]) == ("12a", "1.2.3", 512)


def test_an_unparseable_object_still_becomes_a_message(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(
        b"\x00" * 128 + b"DICM" + b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100\x10\x00\x10\x00PN\xff\xff"
    )
    converted = message(path)
    assert (
        converted["Association"]["ParseError"]
        == "element (0010,0010) claims 65535 bytes past the end of the object (truncated?)"
    )
    assert converted["CommonFields"] == dict.fromkeys(COMMON_FIELDS, "")
    assert converted["Tags"] == {}


@pytest.mark.parametrize(
    ("option", "node"), [("common_fields", "CommonFields"), ("report", "Report"), ("tags", "Tags")]
)
def test_switching_a_node_off_removes_exactly_that_node(option: str, node: str) -> None:
    path = Path(get_testdata_file("test-SR.dcm"))
    full = message(path)
    without = message(path, **{option: False})
    assert node in full
    assert without == {key: value for key, value in full.items() if key != node}


def test_pixel_data_is_never_loaded(tmp_path: Path) -> None:
    path = written(
        tmp_path,
        Rows=4096,
        Columns=4096,
        BitsAllocated=16,
        SamplesPerPixel=1,
        PixelData=bytes(4096 * 4096 * 2),
    )
    tracemalloc.start()
    try:
        converted = message(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert converted["Tags"]["PixelData"] == {"BulkData": {"VR": "OW", "Length": 4096 * 4096 * 2}}
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes for a 32 MB object"
