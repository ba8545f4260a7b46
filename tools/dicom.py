"""DICOM films: recognise a DICOM file, read its headers, turn its pixels into the displayed film,
and write one (the demo generator and the tests do).

Only :mod:`tools.dataset` reads films, and it calls :func:`read_film` for DICOM files. The film
is built in the order of DICOM's grayscale pipeline (PS3.3 C.11, PS3.4 N.2.1.1), in float at
full bit depth, nothing truncated to 8 bits:

1. the stored values, decoded by pydicom (native, RLE, and with the pylibjpeg plugins JPEG
   baseline/extended/lossless, JPEG-LS and JPEG 2000);
2. the modality LUT: RescaleSlope/RescaleIntercept or a Modality LUT Sequence
   (``pydicom.pixels.apply_modality_lut``);
3. the value-of-interest range chosen by ``window`` (``--dicom-window``), mapped linearly to
   [0, 1] and clipped:

   | mode         | range mapped to [0, 1]                                                              |
   | ------------ | ----------------------------------------------------------------------------------- |
   | `file`       | the file's VOI LUT Sequence, else its first WindowCenter/WindowWidth pair, through   |
   |              | ``pydicom.pixels.apply_voi`` / ``apply_windowing`` (VOILUTFunction LINEAR,           |
   |              | LINEAR_EXACT or SIGMOID); a file with neither is read as `bits`                      |
   | `bits`       | every value BitsStored can hold (0 .. 2^BitsStored - 1, or the signed range) through |
   |              | the modality LUT                                                                    |
   | `minmax`     | the smallest and largest modality value of the film                                 |
   | `percentile` | the 0.5th and 99.5th percentiles (:data:`PERCENTILES`, numpy's linear               |
   |              | interpolation) of the film's modality values, all pixels counted                    |

4. MONOCHROME1 (the smallest value displayed white) inverted: film = 1 - film.

RGB and YBR films are read as grey (ITU-R BT.601 luma of the RGB values pydicom gives, over
2^BitsStored - 1) with a warning; windows do not apply to them. A file that is not a single-frame
image (several frames; a structured report, a presentation state or anything else without pixel
data; palette colour) and a truncated or corrupt file raise :class:`tools.errors.ImageError`
naming the file and what it is.

pydicom is imported inside the functions: a run on PNG files never loads it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from tools.errors import ImageError

log = logging.getLogger("cxr")

WINDOW_MODES = ("file", "bits", "minmax", "percentile")
PERCENTILES = (0.5, 99.5)  # the `percentile` window, in percent of the film's pixels
GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
# Objects without pixels a DICOM folder often holds, by Modality (PS3.3 C.7.3.1.1.1).
NOT_IMAGES = {"SR": "a structured report", "PR": "a presentation state", "KO": "a key-object selection",
              "DOC": "an encapsulated document"}
PREAMBLE_END = 132  # the 128-byte preamble, then "DICM" (PS3.10 7.1)
# ViewPosition values of a lateral chest film (DICOM's LL and RL; LATERAL and XTABLE LATERAL as MIMIC-CXR has them)
LATERAL_VIEW_POSITIONS = ("LL", "RL", "LATERAL", "XTABLE LATERAL")


# ====== recognising a DICOM file ======

def has_preamble(path) -> bool:
    """True when bytes 128-131 of the file are ``DICM`` (the DICOM file-format prefix)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(PREAMBLE_END)
    except OSError:
        return False
    return head[128:PREAMBLE_END] == b"DICM"


def is_dicom(path) -> bool:
    """A ``.dcm`` file, or any file carrying the DICM prefix (DICOM files are often named by their
    UID, without an extension)."""
    return Path(path).suffix.lower() == ".dcm" or has_preamble(path)


def can_decode(transfer_syntax) -> bool:
    """Whether this installation has a pixel-data decoder for the transfer syntax UID."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    if not transfer_syntax:
        return False
    try:
        return bool(get_decoder(UID(str(transfer_syntax))).is_available)
    except NotImplementedError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _read(path, stop_before_pixels: bool = False):
    """The dataset of ``path``; a file without the DICM prefix (a ``.dcm`` written without the
    file meta header) is read with pydicom's ``force``. ImageError when it cannot be parsed."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=not has_preamble(path))
    except Exception as exc:  # pydicom raises many kinds (InvalidDicomError, EOFError, struct.error, ...)
        raise ImageError(path, f"cannot be decoded (truncated or corrupt DICOM; {_first_line(exc)})") from None
    if len(ds) == 0:
        # pydicom meets the end of a truncated file with a warning and drops every element read
        # so far: an empty dataset, not an error
        raise ImageError(path, "cannot be decoded (truncated or corrupt DICOM; no data element could be read)")
    return ds


# ====== headers ======

def age_in_years(text) -> float | None:
    """PatientAge (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``) in years; None when absent or
    malformed. "045Y" -> 45.0, "006M" -> 0.5, "020D" -> 0.055."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([DWMY])\s*", str(text or "").upper())
    if not match:
        return None
    per_year = {"D": 365.25, "W": 365.25 / 7, "M": 12.0, "Y": 1.0}[match.group(2)]
    return round(int(match.group(1)) / per_year, 3)


def is_lateral(view_position) -> bool:
    """Whether a ViewPosition names a lateral film."""
    return str(view_position or "").strip().upper() in LATERAL_VIEW_POSITIONS


def _text(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _spacing(ds) -> float | None:
    """Row spacing in mm: PixelSpacing, else ImagerPixelSpacing (DX films often carry only that)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value:
            try:
                return float(value[0])
            except (TypeError, ValueError, IndexError):
                return None
    return None


def _int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def header_fields(ds) -> dict:
    """What the suite reads from a dataset's headers (missing attributes are None):
    ``patient_id, study_uid, view, sex, age`` (years), ``manufacturer, model, institution,
    modality, photometric, bits_stored, rows, columns, pixel_spacing`` (row spacing in mm),
    ``transfer_syntax`` (UID), and for checks ``sop_class`` (its name), ``frames``,
    ``samples``, ``has_window`` (a VOI LUT Sequence or a WindowCenter/WindowWidth pair)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    sop = ds.get("SOPClassUID")
    return {
        "patient_id": _text(ds.get("PatientID")),
        "study_uid": _text(ds.get("StudyInstanceUID")),
        "view": _text(ds.get("ViewPosition")),
        "sex": _text(ds.get("PatientSex")),
        "age": age_in_years(ds.get("PatientAge")),
        "manufacturer": _text(ds.get("Manufacturer")),
        "model": _text(ds.get("ManufacturerModelName")),
        "institution": _text(ds.get("InstitutionName")),
        "modality": _text(ds.get("Modality")),
        "photometric": _text(ds.get("PhotometricInterpretation")),
        "bits_stored": _int(ds.get("BitsStored")),
        "rows": _int(ds.get("Rows")),
        "columns": _int(ds.get("Columns")),
        "pixel_spacing": _spacing(ds),
        "transfer_syntax": _text(syntax),
        "sop_class": (getattr(sop, "name", None) or _text(sop)) if sop else None,
        "frames": _int(ds.get("NumberOfFrames")) or 1,
        "samples": _int(ds.get("SamplesPerPixel")),
        "has_window": bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds),
    }


def read_header(path) -> dict:
    """:func:`header_fields` of the file, read without its pixel data (``stop_before_pixels``)."""
    return header_fields(_read(path, stop_before_pixels=True))


# ====== pixels ======

def _what(ds) -> str:
    sop = ds.get("SOPClassUID")
    name = getattr(sop, "name", None) or (str(sop) if sop else "not given")
    return f"SOP class '{name}', modality {ds.get('Modality') or 'not given'}"


def _check_film(ds, path) -> None:
    """ImageError unless ``ds`` holds one frame of grayscale or RGB/YBR pixels."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        kind = NOT_IMAGES.get(str(ds.get("Modality", "")).upper(), "a DICOM object")
        raise ImageError(path, f"{kind} without pixel data ({_what(ds)}), not a film",
                         "leave it out of the input (tools.dicom_index lists films only)")
    frames = _int(ds.get("NumberOfFrames")) or 1
    if frames > 1:
        raise ImageError(path, f"a multi-frame DICOM ({frames} frames; {_what(ds)}); the suite reads "
                         "single-frame films", "export the frame to analyse as a file of its own, or leave it out")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in GREY + COLOUR:
        raise ImageError(path, f"photometric interpretation {photometric or 'not given'} ({_what(ds)}) is not "
                         "supported (MONOCHROME1, MONOCHROME2, or RGB/YBR read as grey)",
                         "convert it to a grayscale film, or leave it out")


def _decode(ds, path) -> np.ndarray:
    """The stored values (pydicom's ``pixel_array``); ImageError when the installation lacks the
    decoder or the pixel data are truncated or corrupt."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if syntax is not None and syntax.is_compressed and not can_decode(syntax):
        raise ImageError(path, f"transfer syntax {syntax.name} ({syntax}) cannot be decoded by this installation",
                         "install the pinned pylibjpeg plugins (requirements.txt) or convert the file")
    try:
        return ds.pixel_array
    except Exception as exc:  # decoders raise ValueError, RuntimeError, OSError, ... on bad data
        raise ImageError(path, f"cannot be decoded (truncated or corrupt DICOM pixel data; {_first_line(exc)})") from None


def stored_pixels(path) -> np.ndarray:
    """The film's stored values as decoded (HxW, or HxWx3 for colour), after checking that the
    file is a single-frame image: what ``tools.dataset.read_raw`` returns for a DICOM file."""
    ds = _read(path)
    _check_film(ds, path)
    return _decode(ds, path)


def stored_range(ds) -> tuple[int, int]:
    """Smallest and largest value BitsStored can hold (signed when PixelRepresentation is 1)."""
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _window(values: np.ndarray, ds, mode: str, path) -> tuple[np.ndarray, float, float]:
    """(values after the VOI transform, the value shown black, the value shown white) for
    ``mode`` (one of WINDOW_MODES); the film is then (shown - black) / (white - black), clipped."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    if mode == "file" and ds.get("VOILUTSequence"):
        # the LUT's own output range: every entry, from the first value mapped (0 entries = 2^16)
        count, first = ds.VOILUTSequence[0].LUTDescriptor[:2]
        entries = apply_voi(np.arange(first, first + (count or 2**16)), ds, 0)
        shown = apply_voi(np.rint(values).astype(np.int64), ds, 0).astype(np.float64)
        return shown, float(entries.min()), float(entries.max())
    if mode == "file" and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            # the window's own output range: where it sends everything below and above it
            black, white = apply_windowing(np.array([-np.inf, np.inf]), ds, 0)
            return apply_windowing(values, ds, 0), float(black), float(white)
        except (ValueError, TypeError, IndexError) as exc:
            raise ImageError(path, f"its window cannot be applied ({_first_line(exc)})",
                             "pass --dicom-window bits, minmax or percentile") from None
    if mode in ("file", "bits"):
        black, white = apply_modality_lut(np.array(stored_range(ds)), ds).astype(np.float64)
        return values, float(black), float(white)
    if mode == "minmax":
        return values, float(values.min()), float(values.max())
    black, white = np.percentile(values, PERCENTILES)
    return values, float(black), float(white)


def _to_unit(shown: np.ndarray, black: float, white: float) -> np.ndarray:
    if white == black:  # a flat film (or a window of one value): nothing to show
        return np.zeros(shown.shape, np.float32)
    return np.clip((shown - black) / (white - black), 0.0, 1.0).astype(np.float32)


def read_film(path, window: str = "file") -> np.ndarray:
    """The displayed film of a DICOM file: float32 HxW on [0, 1] (0 black), built as the module
    docstring says. ImageError (naming the file) for anything that is not a readable single-frame
    film; ValueError for an unknown ``window``."""
    from pydicom.pixels import apply_modality_lut

    if window not in WINDOW_MODES:
        raise ValueError(f"--dicom-window {window!r}: choose one of {', '.join(WINDOW_MODES)}")
    ds = _read(path)
    _check_film(ds, path)
    stored = _decode(ds, path)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric in COLOUR:
        log.warning("image %s: %s DICOM read as grey (BT.601 luma); windows do not apply to colour films",
                    path, photometric)
        rgb = stored.astype(np.float64)
        luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return _to_unit(luma, 0.0, float(2 ** int(ds.BitsStored) - 1))
    if stored.ndim != 2:
        raise ImageError(path, f"pixel data of shape {stored.shape} is not one grayscale frame ({_what(ds)})",
                         "export a single grayscale frame")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    film = _to_unit(*_window(values, ds, window, path))
    return 1.0 - film if photometric == "MONOCHROME1" else film


# ====== writing ======

def write_dicom(path, stored: np.ndarray, attributes: dict, transfer_syntax: str) -> None:
    """Write one single-frame film: ``stored`` (uint8 or uint16 HxW) as its pixel data, every
    ``attributes`` entry (a DICOM keyword -> value; SOPClassUID, SOPInstanceUID,
    PhotometricInterpretation and BitsStored among them) as a data element, encoded with
    ``transfer_syntax`` (native, or compressed by pydicom's encoders: RLE Lossless natively,
    JPEG 2000 with pylibjpeg-openjpeg). The file meta header is filled from the attributes; the
    same arguments give the same bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID

    stored = np.ascontiguousarray(stored)
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 8 * stored.dtype.itemsize
    ds.HighBit = int(ds.BitsStored) - 1
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    syntax = UID(transfer_syntax)
    if syntax.is_compressed:
        ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")  # compress() starts from a native dataset
        # generate_instance_uid=False: compress() would otherwise draw a new, random SOPInstanceUID
        ds.compress(syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
