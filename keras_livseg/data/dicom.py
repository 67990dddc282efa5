"""DICOM series in: a folder of one CT series → a NIfTI image in memory, on the series' own grid.

What the scanner wrote is read as DICOM defines it, not as file names suggest:

- **Slices** are ordered by their position along the slice normal (``ImagePositionPatient``
  projected on the cross product of the two ``ImageOrientationPatient`` cosines), not by file
  name or ``InstanceNumber``.
- **Spacing** between slices comes from those positions (``SliceThickness`` is the thickness
  of the slab, which may differ from the spacing); in-plane from ``PixelSpacing``.
- **Hounsfield units** are ``stored value × RescaleSlope + RescaleIntercept``.
- **Orientation** comes from ``ImageOrientationPatient``; the affine maps array indices
  ``[row, column, slice]`` to RAS millimetres (DICOM's LPS with x and y negated), so the
  canonical reorientation and ``predict``'s write-back work as for NIfTI.

Refused, each with one line saying why and what to do: a folder with several image series
(they are listed, with their UIDs, descriptions and slice counts: pass one series' folder), a
tilted gantry (positions not along the slice normal), irregular slice spacing (a missing slice),
slices of different size or orientation, files without position, orientation or pixel data,
pixel data shorter than its header says, compressed pixel data without a decoder. All but the
last are found from the files' headers alone (:func:`check_series`, which ``predict`` runs on
every input before it loads the model). Non-image objects beside the series (a DICOM-SEG,
reports) are ignored.

Example:
    >>> image = read_series("../shared/data/real/dcmqi-ct-3slice/dicom")  # doctest: +SKIP
    >>> image.shape, [round(z, 4) for z in image.header.get_zooms()]  # doctest: +SKIP
    ((512, 512, 3), [0.8105, 0.8105, 1.0])
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from keras_livseg.data.atomic import atomic_path
from keras_livseg.data.errors import DataError

logger = logging.getLogger(__name__)

#: Tolerance on the spread of slice spacings (fraction of the median) and on the gantry tilt.
SPACING_TOLERANCE = 0.01
#: SOP classes read as image slices (CT; MR and others the model was not trained on are refused).
CT_IMAGE_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1")


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DataError("reading DICOM needs pydicom: pip install pydicom (it is in keras_livseg's requirements)") from None
    return pydicom


def looks_like_dicom(path: Path) -> bool:
    """Whether a file is DICOM: a ``.dcm`` name or the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(folder: Path) -> bool:
    """Whether ``folder`` directly holds DICOM files (and so is read as a series)."""
    return folder.is_dir() and any(p.is_file() and not p.name.startswith(".") and looks_like_dicom(p)
                                   for p in folder.iterdir())


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder."""

    uid: str
    description: str
    files: tuple[Path, ...]


def list_series(folder: str | Path) -> dict[str, SeriesInfo]:
    """The image series in ``folder`` by SeriesInstanceUID (headers only; other objects skipped)."""
    pydicom = _pydicom()
    folder = Path(folder)
    found: dict[str, list[Path]] = {}
    descriptions: dict[str, str] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and looks_like_dicom(p)):
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as error:  # pydicom raises many types for damaged files
            raise DataError(f"{path} is not a readable DICOM file ({error}); remove it from the series folder") from None
        meta = getattr(header, "file_meta", None)
        sop_class = str(header.get("SOPClassUID") or getattr(meta, "MediaStorageSOPClassUID", "") or "")
        if not sop_class:  # every DICOM object names its class: this file was cut short or damaged
            raise DataError(f"{path} has no SOPClassUID: the file is damaged or cut short; remove it from the "
                            "series folder or export the series again")
        if "PixelData" not in header and sop_class not in CT_IMAGE_STORAGE:
            continue  # a SEG, a structured report, a presentation state: not a slice
        if str(header.get("Modality", "")) == "SEG":
            continue
        if "SeriesInstanceUID" not in header:  # pydicom reads a file cut inside its header without error
            raise DataError(f"{path} has no SeriesInstanceUID: the file is damaged or cut short; remove it from "
                            "the series folder or export the series again")
        uid = str(header.SeriesInstanceUID)
        found.setdefault(uid, []).append(path)
        descriptions.setdefault(uid, str(header.get("SeriesDescription", "")))
    return {uid: SeriesInfo(uid, descriptions[uid], tuple(paths)) for uid, paths in found.items()}


def slice_normal(orientation) -> np.ndarray:
    """The slice normal of an ``ImageOrientationPatient``: row cosine × column cosine. Slices are
    ordered by their position projected on it, by :func:`read_series` and the DICOM-SEG alike."""
    orientation = np.asarray([float(v) for v in orientation], float)
    return np.cross(orientation[:3], orientation[3:])


def _required(dataset, keyword: str, path: Path):
    value = dataset.get(keyword)
    if value is None:
        raise DataError(f"{path} has no {keyword}; the slice cannot be placed (re-export the series with positions)")
    return value


@dataclasses.dataclass(frozen=True)
class SeriesGeometry:
    """Where one series' slices lie, from their headers alone (see :func:`check_series`)."""

    uid: str
    files: tuple[Path, ...]  # ordered along the slice normal: the volume's slices
    shape: tuple[int, int, int]  # rows, columns, slices
    spacing: tuple[float, float, float]  # row, column, slice spacing in mm
    affine: np.ndarray  # array indices [row, column, slice] to RAS mm


def _pixel_bytes_missing(dataset, path: Path) -> int:
    """How many bytes of uncompressed pixel data the file lacks (0 when complete, or compressed).

    ``dataset`` was read with ``defer_size``: a large pixel data element is only located (its
    value's offset in the file), and kept unread here (``keep_deferred``); a small one was read.
    """
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_compressed or syntax.is_deflated:
        return 0  # compressed data has no fixed length; a deflated file's offsets are the inflated stream's
    element = dataset.get_item("PixelData", keep_deferred=True)
    bits = dataset.get("BitsAllocated")
    if bits is None:
        raise DataError(f"{path} has no BitsAllocated: its pixel data cannot be read; export the series again")
    expected = (int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1))
                * int(dataset.get("NumberOfFrames", 1) or 1) * int(bits) + 7) // 8
    if element.value is not None:
        return max(0, expected - len(element.value))
    return max(0, element.value_tell + expected - path.stat().st_size)


def check_series(folder: str | Path, series_uid: str | None = None) -> SeriesGeometry:
    """Check one CT series from its headers, without decoding a pixel: what :func:`read_series` refuses.

    Reads every file's header (the pixel data is skipped, not read), so ``predict`` refuses a
    broken series before it loads TensorFlow and the model. Checks: one image series (or the one
    named), position, orientation and spacing on every slice, the same size and orientation on
    every slice, slices neither duplicated nor tilted nor irregularly spaced, and uncompressed
    pixel data as long as the header says. Whether compressed pixel data decodes is found by
    :func:`read_series`.

    Args:
        folder: a folder holding the series' files (other DICOM objects may sit beside them).
        series_uid: which series, when the folder holds several.

    Returns:
        :class:`SeriesGeometry`: the files in slice order, shape ``(rows, columns, slices)``,
        spacing in mm and the RAS affine.

    Raises:
        DataError: the first problem found, naming the file or folder and the fix.

    Example:
        >>> check_series("../shared/data/real/dcmqi-ct-3slice/dicom").shape  # doctest: +SKIP
        (512, 512, 3)
    """
    pydicom = _pydicom()
    folder = Path(folder)
    series = list_series(folder)
    if not series:
        raise DataError(f"{folder} holds no DICOM image series; pass the folder of the CT series")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(f"{s.uid} ({s.description or 'no description'}, {len(s.files)} files)" for s in series.values())
        raise DataError(f"{folder} holds {len(series)} image series ({listing}); choose one with --series UID, "
                        "or put each series in its own folder")
    if series_uid is not None and series_uid not in series:
        raise DataError(f"{folder} has no series {series_uid}; it holds {', '.join(series)}")
    chosen = series[series_uid] if series_uid else next(iter(series.values()))

    slices = []
    for path in chosen.files:
        # defer_size: large values (the pixel data) are located, not read
        try:
            dataset = pydicom.dcmread(str(path), defer_size=4096)
        except Exception as error:  # pydicom raises many types for damaged files
            raise DataError(f"{path} is not a readable DICOM file ({error}); remove it from the series folder") from None
        orientation = np.asarray([float(v) for v in _required(dataset, "ImageOrientationPatient", path)], float)
        position = np.asarray([float(v) for v in _required(dataset, "ImagePositionPatient", path)], float)
        spacing = [float(v) for v in _required(dataset, "PixelSpacing", path)]
        size = (int(_required(dataset, "Rows", path)), int(_required(dataset, "Columns", path)))
        if "PixelData" not in dataset:
            raise DataError(f"{path} has no pixel data: the file is damaged or cut short, or not an image; remove it "
                            "from the series folder or export the series again")
        missing = _pixel_bytes_missing(dataset, path)
        if missing:
            raise DataError(f"{path}: its pixel data is cut short ({missing} bytes missing); the file is damaged "
                            "(copy or export the series again)")
        slices.append((path, orientation, position, spacing, size))

    first_orientation, first_spacing, shape = slices[0][1], slices[0][3], slices[0][4]
    for path, orientation, _, spacing, size in slices:
        if not np.allclose(orientation, first_orientation, atol=1e-4) or size != shape or \
                not np.allclose(spacing, first_spacing, rtol=1e-4):
            raise DataError(f"{path} differs in orientation, size or pixel spacing from {slices[0][0]}; "
                            "the folder mixes series: keep one series per folder")
    row_cosine, column_cosine = first_orientation[:3], first_orientation[3:]
    normal = slice_normal(first_orientation)
    slices.sort(key=lambda s: float(np.dot(s[2], normal)))
    positions = np.stack([s[2] for s in slices])
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        along = steps @ normal
        if np.any(along <= 1e-6):
            duplicate = slices[int(np.argmin(along))][0]
            raise DataError(f"{duplicate} sits at the same position as another slice; remove duplicates from {folder}")
        off_normal = np.linalg.norm(steps - along[:, None] * normal, axis=1)
        if np.any(off_normal > SPACING_TOLERANCE * along + 1e-3):
            raise DataError(
                f"{folder}: the slices step sideways along the series (gantry tilt of about "
                f"{np.degrees(np.arctan2(off_normal.max(), along.max())):.1f} degrees); resample it to an untilted "
                "grid first (e.g. dcm2niix with gantry-tilt correction)"
            )
        spacing_z = float(np.median(along))
        if np.ptp(along) > SPACING_TOLERANCE * spacing_z:
            raise DataError(
                f"{folder}: slice spacing varies from {along.min():.3f} to {along.max():.3f} mm (a missing or "
                "extra slice?); pass a complete series with regular spacing"
            )
    else:
        spacing_z = _thickness(slices[0][0], pydicom)

    # Array axes [row i, column j, slice k]. Moving along i goes down the rows, i.e. along the
    # column cosine by PixelSpacing[0] (row spacing); along j along the row cosine by PixelSpacing[1].
    lps = np.eye(4)
    lps[:3, 0] = column_cosine * first_spacing[0]
    lps[:3, 1] = row_cosine * first_spacing[1]
    lps[:3, 2] = normal * spacing_z
    lps[:3, 3] = positions[0]
    return SeriesGeometry(uid=chosen.uid, files=tuple(s[0] for s in slices), shape=(*shape, len(slices)),
                          spacing=(first_spacing[0], first_spacing[1], spacing_z),
                          affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)  # DICOM LPS → NIfTI RAS


def read_series(folder: str | Path, series_uid: str | None = None) -> nib.Nifti1Image:
    """Read one CT series as an in-memory NIfTI image (HU, float32 or int16) with its affine.

    Args:
        folder: a folder holding the series' files (other DICOM objects may sit beside them).
        series_uid: which series, when the folder holds several.

    Returns:
        ``nib.Nifti1Image`` of shape ``[rows, columns, slices]`` whose affine maps indices to RAS mm.

    Raises:
        DataError: what :func:`check_series` refuses, and pixel data that cannot be decoded.
    """
    pydicom = _pydicom()
    geometry = check_series(folder, series_uid)
    planes, slopes, intercepts = [], [], []
    for path in geometry.files:
        dataset = pydicom.dcmread(str(path))
        try:
            pixels = dataset.pixel_array
        except Exception as error:  # missing decoder or broken pixel data
            syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            raise DataError(
                f"{path}: its pixel data cannot be decoded ({error}; transfer syntax "
                f"{getattr(syntax, 'name', syntax)}); for compressed series pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg, or decompress with dcmdjpeg"
            ) from None
        if pixels.shape != geometry.shape[:2]:
            raise DataError(f"{path}: its pixel data is {pixels.shape}, its header says {geometry.shape[:2]}; "
                            "the file is damaged (copy or export the series again)")
        planes.append(pixels)
        slopes.append(float(dataset.get("RescaleSlope", 1.0)))
        intercepts.append(float(dataset.get("RescaleIntercept", 0.0)))

    stored = np.stack(planes, axis=-1)
    if set(slopes) == {1.0} and all(i.is_integer() for i in intercepts):
        # Integral HU: int16 when every slice fits (CT stores -1024..3071), like the scanner's files.
        volume = stored.astype(np.int32) + np.asarray(intercepts, np.int32)[None, None, :]
        if volume.min() >= np.iinfo(np.int16).min and volume.max() <= np.iinfo(np.int16).max:
            volume = volume.astype(np.int16)
    else:
        volume = stored.astype(np.float32) * np.asarray(slopes, np.float32) + np.asarray(intercepts, np.float32)
    image = nib.Nifti1Image(volume, geometry.affine)
    image.header.set_xyzt_units("mm")
    logger.info("read DICOM series %s from %s: %d slices of %dx%d, %.3f x %.3f x %.3f mm", geometry.uid, folder,
                *geometry.shape[2:], *geometry.shape[:2], *geometry.spacing)
    return image


def _thickness(path: Path, pydicom) -> float:
    """A single slice's depth: its SliceThickness, else 1 mm (nothing to measure it from)."""
    value = pydicom.dcmread(str(path), stop_before_pixels=True).get("SliceThickness")
    return float(value) if value else 1.0


# ---------------------------------------------------------------------------------------------
# DICOM-SEG out
# ---------------------------------------------------------------------------------------------

#: The segments written, in the LiTS sense: the liver is the whole organ (labels 1 and 2, a
#: tumour lies inside it), the tumour is label 2; the two overlap, which BINARY SEG allows.
SEGMENTS = (
    ("Liver", "liver", lambda labels: labels >= 1),
    ("Liver tumour", "tumor", lambda labels: labels == 2),
)


def _sorted_series_datasets(folder: Path, series_uid: str | None = None) -> list:
    """The series' datasets (headers) in the order :func:`read_series` stacks the slices."""
    pydicom = _pydicom()  # check_series names the series to choose from when the folder holds several
    return [pydicom.dcmread(str(path), stop_before_pixels=True) for path in check_series(folder, series_uid).files]


#: Segmented property types read as the liver (label 1) and as a liver tumour (label 2), by
#: code value: SNOMED CT, and the older SNOMED RT codes that dcmqi and 3D Slicer still write.
LIVER_CODES = frozenset({"10200004", "T-62000", "181268008"})
TUMOR_CODES = frozenset({"108369006", "M-80003", "4147007", "86049000", "363406005", "93870000"})


def read_segmentation(seg_path: str | Path, series_folder: str | Path, series_uid: str | None = None) -> np.ndarray:
    """A DICOM-SEG of a series as a label volume on that series' grid (0 background, 1 liver, 2 tumour).

    Segments are recognized by their segmented property type (:data:`LIVER_CODES`,
    :data:`TUMOR_CODES`); a tumour wins where both are drawn, as in LiTS. Other segments
    (organs of a multi-organ SEG) are ignored, with a log line naming them.

    Returns:
        ``uint8 [rows, columns, slices]``, in the order :func:`read_series` stacks the slices.

    Raises:
        DataError: not a SEG, a SEG of another series, or neither a liver nor a tumour segment.
    """
    _pydicom()
    import highdicom as hd

    seg_path = Path(seg_path)
    try:
        seg = hd.seg.segread(str(seg_path))
    except Exception as error:  # highdicom raises many types for non-SEG and damaged files
        raise DataError(f"{seg_path} is not a readable DICOM Segmentation ({error}); pass the SEG object of the series") from None
    datasets = _sorted_series_datasets(Path(series_folder), series_uid)
    uids = [str(d.SOPInstanceUID) for d in datasets]
    referenced = {str(item[2]) for item in seg.get_source_image_uids()}
    if not referenced & set(uids):
        raise DataError(f"{seg_path} segments another series than {series_folder} (none of its source images is "
                        "in that folder); pair each SEG with the series it references")
    liver, tumor, ignored = [], [], []
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        code = str(description.segmented_property_type.value)
        if code in LIVER_CODES:
            liver.append(number)
        elif code in TUMOR_CODES:
            tumor.append(number)
        else:
            ignored.append(f"{number} {description.segment_label!r} ({code})")
    if not liver and not tumor:
        raise DataError(f"{seg_path} has no liver or liver-tumour segment (it holds {'; '.join(ignored)}); "
                        f"keras_livseg reads segments coded liver ({', '.join(sorted(LIVER_CODES))}) or tumour "
                        f"({', '.join(sorted(TUMOR_CODES))})")
    if ignored:
        logger.info("%s: ignoring segments %s (neither liver nor liver tumour)", seg_path, "; ".join(ignored))
    present = [uid for uid in uids if uid in referenced]
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise DataError(f"{seg_path} has frames of {seg.Rows}x{seg.Columns} but the series' images are {rows}x{columns}; "
                        "keras_livseg reads SEGs drawn on the series' own pixel grid")
    try:
        # Frames are placed by the source image they reference, on its grid (checked above);
        # dcmqi and others leave SpatialLocationsPreserved unset, which highdicom then refuses.
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=present, segment_numbers=liver + tumor, combine_segments=False,
            assert_missing_frames_are_empty=True, ignore_spatial_locations=True,
        )  # [instances, rows, columns, segments]
    except (ValueError, RuntimeError, KeyError, AttributeError) as error:
        raise DataError(f"{seg_path}: its frames cannot be placed on the series ({error})") from None
    labels = np.zeros((rows, columns, len(uids)), dtype=np.uint8)
    position = {uid: k for k, uid in enumerate(uids)}
    for index, uid in enumerate(present):
        frame = pixels[index]
        if liver:
            labels[:, :, position[uid]][frame[..., : len(liver)].any(axis=-1)] = 1
        if tumor:
            labels[:, :, position[uid]][frame[..., len(liver):].any(axis=-1)] = 2
    return labels


def write_segmentation(labels: np.ndarray, series_folder: str | Path, path: str | Path, model_name: str = "keras_livseg",
                       software_version: str | None = None, series_uid: str | None = None) -> Path:
    """Write predicted labels as a DICOM Segmentation object that references the source series.

    Args:
        labels: uint8 ``[rows, columns, slices]`` on the series' own grid, slices in the order
            :func:`read_series` stacks them (0 background, 1 liver, 2 tumour).
        series_folder: the CT series the labels were predicted on.
        path: the ``.dcm`` file to write (atomically: a temporary name, then renamed).
        model_name: recorded as the manufacturer's model name and the algorithm's name.
        software_version: recorded as the software and algorithm version.
        series_uid: the series, when the folder holds several.

    Returns:
        ``path``. Segments: 1 "Liver" (SCT 10200004, the whole organ as LiTS scores it, tumour
        included) and 2 "Liver tumour" (SCT 108369006 Neoplasm), both AUTOMATIC, BINARY.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import keras_livseg

    series_folder, path = Path(series_folder), Path(path)
    sources = _sorted_series_datasets(series_folder, series_uid)
    for source in sources:  # in memory only: an empty SpecificCharacterSet (GE writes one) means the default
        if "SpecificCharacterSet" in source and not source.SpecificCharacterSet:
            del source.SpecificCharacterSet
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels.shape != (rows, columns, len(sources)):
        raise DataError(f"labels of shape {labels.shape} do not fit the series {series_folder} "
                        f"({rows} x {columns} x {len(sources)}); predict on this series")
    version = software_version or keras_livseg.__version__
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=version,
                                                   family=codes.DCM.ArtificialIntelligence)
    categories = {"liver": codes.SCT.AnatomicalStructure, "tumor": codes.SCT.MorphologicallyAbnormalStructure}
    types = {"liver": codes.SCT.Liver, "tumor": codes.SCT.Neoplasm}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=categories[key],
            segmented_property_type=types[key], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, (label, key, _) in enumerate(SEGMENTS, start=1)
    ]
    # [slices, rows, columns, segments], frames in the sources' order.
    masks = np.stack([select(labels) for _, _, select in SEGMENTS], axis=-1).transpose(2, 0, 1, 3).astype(np.uint8)
    with warnings.catch_warnings():
        # highdicom warns about the source's own single-component patient names; they are copied as is.
        warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
        segmentation = _segmentation(hd, sources, masks, descriptions, model_name, version)
    with atomic_path(path) as partial:
        segmentation.save_as(str(partial))
    return path


def _segmentation(hd, sources, masks, descriptions, model_name, version):
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="keras_livseg",
        manufacturer_model_name=model_name, software_versions=version, device_serial_number="none",
        series_description=f"{model_name} liver and tumour", omit_empty_frames=False,
    )
