"""DICOM message conversion speed, side by side with pydicom's own JSON on the same data.

    python -m bench.message [--rounds N] [--smoke]

Both sides read the object from disk and produce a JSON-ready dict: soupflow's `convert`
(every node on) and pydicom's `dcmread` + `Dataset.to_json_dict()`. Data: pydicom's
CT_small.dcm (a CT-sized header), and an SR with 300 content items generated here. Rounds
alternate the two sides; the table shows medians and the ratio (higher is better for us).

The CT case is a series made from CT_small: each instance its own SOPInstanceUID,
InstanceNumber, ImagePositionPatient, SliceLocation and content time, as in a scanner's
series, so that what soupflow reads once per series (message.raw shares elements that are
the same bytes) is counted as it would be, not as one file converted over and over.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from soupflow.message.convert import Options, convert
from soupflow.store.queue import Arrival, Origin

ARRIVAL = Arrival(
    request_id="r",
    workflow_id="w",
    object_path="o",
    byte_count=0,
    sop_class_uid="",
    sop_instance_uid="",
    transfer_syntax_uid=ExplicitVRLittleEndian,
    origin=Origin(calling_aet="A", called_aet="B", peer_address="127.0.0.1", peer_port=1),
    received_at=0.0,
)


def _code(value: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "99TEST", meaning
    return code


def structured_report(path: Path, items: int) -> Path:
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality, dataset.ValueType = "SR", "CONTAINER"
    dataset.ConceptNameCodeSequence = Sequence([_code("R-0001", "Report")])
    dataset.CompletionFlag, dataset.VerificationFlag = "COMPLETE", "VERIFIED"
    content = []
    for number in range(items):
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ConceptNameCodeSequence = Sequence([_code(f"F-{number}", f"Finding {number}")])
        if number % 3 == 0:
            item.ValueType, item.TextValue = "TEXT", f"Observation number {number} in the report."
        elif number % 3 == 1:
            item.ValueType = "CODE"
            item.ConceptCodeSequence = Sequence([_code(f"C-{number}", f"Code {number}")])
        else:
            measured = Dataset()
            measured.NumericValue = str(number / 10)
            measured.MeasurementUnitsCodeSequence = Sequence([_code("mm", "millimeter")])
            item.ValueType, item.MeasuredValueSequence = "NUM", Sequence([measured])
        content.append(item)
    dataset.ContentSequence = Sequence(content)
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    return path


def ct_series(folder: Path, count: int) -> list[Path]:
    """`count` instances of one CT series from CT_small, differing where a series' do."""
    dataset = dcmread(str(get_testdata_file("CT_small.dcm")))
    dataset.SeriesInstanceUID = generate_uid()
    paths = []
    for number in range(count):
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number + 1
        dataset.ImagePositionPatient = [-158.1, -179.0, -75.7 + 1.25 * number]
        dataset.SliceLocation = -75.7 + 1.25 * number
        dataset.ContentTime = f"{102030 + number:06d}.{number:06d}"
        path = folder / f"ct{number:04d}.dcm"
        dataset.save_as(path)
        paths.append(path)
    return paths


def per_second(work: Callable[[Path], object], paths: list[Path], count: int) -> float:
    start = time.perf_counter()
    for number in range(count):
        work(paths[number % len(paths)])
    return count / (time.perf_counter() - start)


def compare(paths: list[Path], count: int, rounds: int) -> tuple[float, float]:
    options = Options()
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(per_second(lambda path: convert(path, ARRIVAL, options), paths, count))
        theirs.append(per_second(lambda path: dcmread(path).to_json_dict(), paths, count))
    return statistics.median(ours), statistics.median(theirs)


def main(arguments: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--smoke", action="store_true", help="a few conversions, to keep the harness working"
    )
    args = parser.parse_args(arguments)
    scale = 1 if args.smoke else 20
    with tempfile.TemporaryDirectory() as folder:
        cases = [
            (
                "a CT series from CT_small (32 KB pixels)",
                ct_series(Path(folder), 10 * scale),
                10 * scale,
            ),
            (
                "SR with 300 content items",
                [structured_report(Path(folder) / "sr.dcm", 300)],
                2 * scale,
            ),
        ]
        rounds = 1 if args.smoke else args.rounds
        results = [(name, *compare(path, count, rounds)) for name, path, count in cases]
    print(f"{'data':38} {'soupflow msg/s':>15} {'pydicom to_json_dict msg/s':>27} {'ratio':>6}")
    for name, ours, theirs in results:
        print(f"{name:38} {ours:15.0f} {theirs:27.0f} {ours / theirs:6.2f}")
    return results


if __name__ == "__main__":
    main()
