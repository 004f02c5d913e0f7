"""Generated benchmark data (never committed): CT-sized, tiny and very large instances."""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def images(folder: Path, count: int, rows: int, columns: int) -> list[Path]:
    """`count` CT instances of one study with `rows` x `columns` 16-bit pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    template = dcmread(str(get_testdata_file("CT_small.dcm")))
    template.Rows, template.Columns = rows, columns
    template.PixelData = bytes(range(256)) * (rows * columns * 2 // 256) + bytes(
        rows * columns * 2 % 256
    )
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    for number in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = number + 1
        path = folder / f"{number:05d}.dcm"
        template.save_as(path)
        paths.append(path)
    return paths


def large_instance(path: Path, pixel_bytes: int) -> Path:
    """A Secondary Capture with about `pixel_bytes` of pixel data, streamed to disk."""
    columns = 16384  # so that 1 GiB still fits the 16-bit Rows
    rows = max(1, pixel_bytes // (2 * columns))
    pixel_bytes = rows * columns * 2
    dataset = Dataset()
    dataset.SOPClassUID = SECONDARY_CAPTURE
    dataset.SOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientName, dataset.PatientID, dataset.Modality = "LARGE^INSTANCE", "LARGE1", "OT"
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = (
        16,
        16,
        15,
        0,
    )
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * 32768  # 8 MiB
    with path.open("ab") as stream:
        stream.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
        written = 0
        while written < pixel_bytes:
            part = chunk[: pixel_bytes - written]
            stream.write(part)
            written += len(part)
    return path
