"""Lossless frame containers: multi-frame XA DICOM, FFV1 in Matroska, 16-bit PNG sequences."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from rau_rt.errors import InputError
from rau_rt.synthetic.projection import SOURCE_TO_DETECTOR_MM, SOURCE_TO_PATIENT_MM
from rau_rt.synthetic.render import BITS_STORED
from rau_rt.synthetic.sequence import Sequence

FORMATS = ("dicom", "mkv", "png")
FRAME_FILES = {"dicom": "sequence.dcm", "mkv": "sequence.mkv", "png": "frames"}
_PNG_PATTERN = "frame_{:05d}.png"


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 3 or frames.dtype != np.uint16:
        raise InputError(f"frames: expected a (frames, rows, cols) uint16 array, got "
                         f"{frames.dtype} {frames.shape}")


def write_dicom(path: str | Path, sequence: Sequence) -> None:
    """A multi-frame X-Ray Angiographic Image (explicit VR little endian, 12 of 16 bits), with
    the cine timing, C-arm angles and pixel spacing a real XA run carries."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    frames, meta = sequence.frames, sequence.meta
    _check_frames(frames)
    cfg = meta.config
    # UIDs derive from the parameters, so equal sequences give byte-identical files
    key = [repr(cfg)]
    study, series, instance = (generate_uid(entropy_srcs=[*key, part])
                               for part in ("study", "series", "instance"))
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = XRayAngiographicImageStorage
    file_meta.MediaStorageSOPInstanceUID = instance
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = instance
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "XA"
    ds.PatientName = f"SYNTHETIC^SEED{cfg.seed}"
    ds.PatientID = f"rau-rt-synthetic-{cfg.seed}"
    ds.SeriesDescription = f"synthetic {cfg.artery} coronary, {meta.view.name}"
    ds.ImageType = ["DERIVED", "SECONDARY", "SINGLE PLANE"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.FrameTime = f"{1000.0 / cfg.fps:.4f}"  # ms
    ds.CineRate = round(cfg.fps)  # an integer string (IS) in DICOM; FrameTime is exact
    ds.RecommendedDisplayFrameRate = round(cfg.fps)
    ds.FrameIncrementPointer = 0x00181063  # (0018,1063) FrameTime
    spacing = meta.imager_pixel_spacing_mm
    ds.ImagerPixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.PositionerPrimaryAngle = f"{meta.view.primary_deg:.2f}"
    ds.PositionerSecondaryAngle = f"{meta.view.secondary_deg:.2f}"
    ds.DistanceSourceToDetector = f"{SOURCE_TO_DETECTOR_MM:g}"
    ds.DistanceSourceToPatient = f"{SOURCE_TO_PATIENT_MM:g}"
    centre, width = meta.window
    ds.WindowCenter = f"{centre:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.PixelData = np.ascontiguousarray(frames, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> None:
    """FFV1 (lossless) 16-bit grey in Matroska; exact frame rates such as 7.5 are kept."""
    import av

    _check_frames(frames)
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "gray16le"
        # 12 significant bits in 16-bit samples: rau_rt.io.sources reads this tag back
        container.metadata["BITS_STORED"] = str(BITS_STORED)
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="gray16le")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_png_sequence(folder: str | Path, frames: np.ndarray) -> None:
    """One 16-bit greyscale PNG per frame: frame_00000.png, frame_00001.png, ..."""
    _check_frames(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(frames):
        if not cv2.imwrite(str(folder / _PNG_PATTERN.format(k)), image):
            raise InputError(f"{folder}: could not write {_PNG_PATTERN.format(k)}")


def write_frames(out: Path, sequence: Sequence, fmt: str) -> Path:
    """Write the frames in `fmt` (dicom, mkv or png) under `out`; returns the written path."""
    if fmt not in FORMATS:
        raise InputError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    target = out / FRAME_FILES[fmt]
    if fmt == "dicom":
        write_dicom(target, sequence)
    elif fmt == "mkv":
        write_video(target, sequence.frames, sequence.meta.config.fps)
    else:
        write_png_sequence(target, sequence.frames)
    return target


