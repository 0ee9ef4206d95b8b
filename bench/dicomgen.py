"""Synthetic but real DICOM files for tests and benchmarks: CT/MR slices written by pydicom, with a body
phantom and Gaussian noise in the pixels (so compression sees realistic entropy, not zeros).

    ct_slice(rng, patient="P1", study_uid=..., series_uid=..., sop_uid=...) -> bytes of a Part 10 file
"""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MG_IMAGE = "1.2.840.10008.5.1.4.1.1.1.2"  # digital mammography, for presentation


def phantom(rng: np.random.Generator, rows: int, cols: int, noise: float = 20.0) -> np.ndarray:
    """A CT-like slice in stored values (HU + 1024): air around an ellipse of soft tissue with a denser core."""
    y, x = np.ogrid[-1:1:rows * 1j, -1:1:cols * 1j]
    hu = np.full((rows, cols), -1000.0)
    hu[(x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1] = 40.0
    hu[(x / 0.3) ** 2 + ((y + 0.1) / 0.25) ** 2 <= 1] = 400.0
    hu += rng.normal(0.0, noise, hu.shape)
    return np.clip(hu + 1024, 0, 4095).astype(np.uint16)


def ct_slice(rng: np.random.Generator, *, patient: str, study_uid: str, series_uid: str, sop_uid: str = "",
             instance: int = 1, modality: str = "CT", study_date: str = "20190315", birth_date: str = "",
             rows: int = 512, cols: int = 512, sop_class: str = "") -> bytes:
    """One slice as a DICOM Part 10 file (Explicit VR Little Endian, uncompressed)."""
    sop_class = sop_class or {"CT": CT_IMAGE, "MR": MR_IMAGE, "MG": MG_IMAGE}.get(modality, CT_IMAGE)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate, ds.Modality = study_date, modality
    ds.PatientName, ds.PatientID = f"Test^{patient}", patient
    if birth_date:
        ds.PatientBirthDate = birth_date
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.InstanceNumber = instance
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = phantom(rng, rows, cols).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def series(rng: np.random.Generator, n: int, *, patient: str = "BENCH1", **kw: object) -> list[bytes]:
    """n slices of one study and series."""
    study, ser = generate_uid(), generate_uid()
    return [ct_slice(rng, patient=patient, study_uid=study, series_uid=ser, instance=i + 1, **kw) for i in range(n)]
