"""Volumes in and out: lazy NIfTI loading, canonical orientation, spacing, label maps.

Which files make a case (LiTS, MSD, CSV layouts) is :mod:`keras_livseg.data.cases`'s business;
:func:`~keras_livseg.data.cases.discover_cases`, :class:`~keras_livseg.data.cases.CaseFiles`
and :class:`~keras_livseg.data.errors.DataError` are re-exported here.

Canonical orientation. Every volume is reoriented (by axis permutation and flips only, never
resampled) so that its array axes run **posterior, patient-left, superior** (nibabel axis
codes ``("P", "L", "S")``): ``array[row, col, slice]`` with rows from anterior to posterior,
columns from the patient's right to left, slices from feet to head. An axial slice
``array[:, :, k]`` shown with ``imshow`` is then the radiological view every CT viewer shows
(anterior up, patient's right on the image's left). The original affine and shape are kept
on :class:`Case` so that predictions go back onto the input's own grid with
:func:`from_canonical`.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations

try:  # ISA-L's gzip: the same bytes as zlib's, inflated about twice as fast (see _read_gzip_proxy)
    from isal import igzip
    from isal.isal_zlib import error as IsalError
except ImportError:  # pragma: no cover - a platform without its wheel falls back to nibabel's reader
    igzip = None
    IsalError = zlib.error

# Discovery and file names live in cases.py; re-exported here because every stage reads both.
from keras_livseg.data.atomic import atomic_path
from keras_livseg.data.cases import CaseFiles, discover_cases  # noqa: F401
from keras_livseg.data.errors import DataError  # noqa: F401
from keras_livseg.data.labels import NUM_CLASSES  # noqa: F401

logger = logging.getLogger(__name__)

CANONICAL_AXCODES: tuple[str, str, str] = ("P", "L", "S")


@dataclasses.dataclass
class Case:
    """A loaded case in canonical orientation.

    Attributes:
        case_id: the case id.
        image: CT intensities in HU, shape ``[rows, cols, slices]`` in canonical orientation
            (float32, or the file's integer dtype when the header has no scaling).
        labels: uint8 label map of the same shape (``None`` if unlabelled).
        spacing: voxel size in mm along the canonical axes ``(row, col, slice)``.
        original_affine: the 4x4 affine of the file as read.
        original_shape: the 3D shape of the file as read.
        files: where the case came from.
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float]
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    files: CaseFiles


def parse_label_map(text: str | None) -> dict[int, int] | None:
    """Parse ``"SRC:DST,SRC:DST"`` into a mapping; unlisted labels later become 0.

    Example:
        >>> parse_label_map("5:1,13:2")
        {5: 1, 13: 2}
    """
    if text is None or not str(text).strip():
        return None
    mapping: dict[int, int] = {}
    for item in str(text).split(","):
        parts = item.strip().split(":")
        try:
            src, dst = (int(p) for p in parts)
        except ValueError:
            raise DataError(
                f"bad --label-map entry {item.strip()!r}; write SRC:DST pairs such as 5:1,13:2"
            ) from None
        if not 0 <= dst < NUM_CLASSES:
            raise DataError(
                f"--label-map target {dst} in {item.strip()!r} is not a class; use 0, 1 (liver) or 2 (tumor)"
            )
        mapping[src] = dst
    return mapping


#: What to do about labels outside 0..2 in a segmentation (a reference, or a training mask).
REMAP_ADVICE = "remap them with --label-map SRC:DST,... (e.g. --label-map 5:1 for TotalSegmentator's liver)"


def apply_label_map(labels: np.ndarray, mapping: Mapping[int, int] | None, source: str = "labels",
                    advice: str = REMAP_ADVICE) -> np.ndarray:
    """Remap label values; without a mapping, check that labels are in ``0..2``.

    Args:
        labels: integer label array of any shape.
        mapping: ``{source_label: class}``; every label not listed becomes 0.
        source: the file name used in error messages.
        advice: the fix the error message gives for labels outside ``0..2``.

    Returns:
        uint8 array of the same shape with values in ``{0, 1, 2}``.

    Raises:
        DataError: labels outside ``0..2`` and no mapping given.

    Example:
        >>> apply_label_map(np.array([0, 5, 7]), {5: 1}).tolist()
        [0, 1, 0]
    """
    if mapping is None:
        # min/max first: np.unique sorts the whole volume, seconds for a LiTS scan.
        if labels.size == 0 or (labels.min() >= 0 and labels.max() < NUM_CLASSES):
            return labels.astype(np.uint8, copy=False)
        values = np.unique(labels)
        bad = [int(v) for v in values if v < 0 or v >= NUM_CLASSES]
        if bad:
            shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
            raise DataError(
                f"{source} holds labels {shown} outside 0 (background), 1 (liver), 2 (tumor); {advice}"
            )
        return labels.astype(np.uint8, copy=False)
    lookup_size = int(max(int(labels.max(initial=0)), max(mapping, default=0))) + 1
    if labels.min(initial=0) < 0:
        raise DataError(f"{source} holds negative labels; a label map must be non-negative integers")
    lookup = np.zeros(lookup_size, dtype=np.uint8)
    for src, dst in mapping.items():
        if src >= 0:
            lookup[src] = dst
    return lookup[labels]


def canonical_transform(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation transform from a file's axes to the canonical ``P, L, S`` axes."""
    current = orientations.io_orientation(affine)
    target = orientations.axcodes2ornt(CANONICAL_AXCODES)
    return orientations.ornt_transform(current, target)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorient a 3D array from the file's grid to the canonical grid (a view where possible).

    Example:
        >>> affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # L, P, S as in DICOM-derived files
        >>> to_canonical(np.zeros((4, 5, 2)), affine).shape
        (5, 4, 2)
    """
    return orientations.apply_orientation(data, canonical_transform(affine))


def from_canonical(data: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical`: put a canonical array back on the file's own grid.

    Works for arrays with trailing channel axes (``[rows, cols, slices, C]``) too.
    """
    inverse = orientations.ornt_transform(
        orientations.axcodes2ornt(CANONICAL_AXCODES), orientations.io_orientation(original_affine)
    )
    return orientations.apply_orientation(data, inverse)


def affine_zooms(affine: np.ndarray, source: str | Path = "volume") -> tuple[float, float, float]:
    """Voxel size in mm along the file's axes, from the affine (the voxel-to-world map).

    The affine is what places voxels in the patient, so spacing is read from it (as ITK does)
    rather than from ``pixdim``, which nibabel silently sets to 1 when a header has 0 there.

    Raises:
        DataError: a zero, missing or non-finite spacing (a singular affine), naming ``source``.

    Example:
        >>> affine_zooms(np.diag([-0.8, -0.8, 2.5, 1.0]))
        (0.8, 0.8, 2.5)
    """
    zooms = tuple(float(z) for z in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))
    if not all(np.isfinite(z) and z > 1e-6 for z in zooms):
        raise DataError(
            f"{source} has voxel spacing {tuple(round(z, 6) for z in zooms)} mm in its header (a zero or "
            "missing pixdim/sform scale); write the scanner's true spacing into the header (e.g. nibabel's "
            "img.set_sform / set_qform with the voxel sizes) and try again"
        )
    return zooms  # type: ignore[return-value]


def image_zooms(image: nib.Nifti1Image, source: str | Path = "volume") -> tuple[float, float, float]:
    """Voxel size in mm along the file's axes, refusing a header that has none.

    Without an sform, nibabel builds the affine from ``pixdim``, and on loading it replaces a
    zero there by 1 (logging only "setting 0 dims to 1"), so a header without spacing would read
    as 1 mm voxels. This reads the file's header again, unfixed, in that case (a few hundred
    bytes) and refuses a zero or non-finite ``pixdim``; then :func:`affine_zooms` checks the
    affine itself.

    Raises:
        DataError: the spacing is zero, missing or not finite, naming ``source``.

    Example:
        >>> image_zooms(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.diag([0.8, 0.8, 2.5, 1.0])))
        (0.8, 0.8, 2.5)
    """
    header = image.header
    if isinstance(header, nib.Nifti1Header) and int(header["sform_code"]) == 0:
        raw = _unfixed_pixdim(image)
        # A negative pixdim (old Analyze-derived files) nibabel reads as its size: only zero is missing.
        if raw is not None and not all(np.isfinite(z) and abs(z) > 1e-6 for z in raw):
            raise DataError(
                f"{source} has voxel spacing {tuple(round(z, 6) for z in raw)} mm in its header (pixdim, and no "
                "sform); write the scanner's true spacing into the header (e.g. nibabel's "
                "img.header.set_zooms or img.set_sform with the voxel sizes) and try again"
            )
    return affine_zooms(image.affine, source)


def _unfixed_pixdim(image: nib.Nifti1Image) -> tuple[float, float, float] | None:
    """The header's ``pixdim[1:4]`` as the file holds it (``None`` for an in-memory image)."""
    holder = image.file_map.get("header") or image.file_map.get("image")  # a .nii holds both in one file
    filename = getattr(holder, "filename", None)
    if not filename:
        return None
    with nib.openers.ImageOpener(filename) as stream:
        raw = type(image.header).from_fileobj(stream, check=False)
    return tuple(float(z) for z in raw["pixdim"][1:4])  # type: ignore[return-value]


def canonical_spacing(affine: np.ndarray, zooms: Sequence[float]) -> tuple[float, float, float]:
    """Voxel spacing along the canonical axes, from the file's zooms."""
    transform = canonical_transform(affine)
    spacing = [0.0, 0.0, 0.0]
    for source_axis, (target_axis, _flip) in enumerate(transform):
        spacing[int(target_axis)] = float(zooms[source_axis])
    return tuple(spacing)  # type: ignore[return-value]


def load_nifti(path: Path, what: str = "volume", series_uid: str | None = None) -> nib.Nifti1Image:
    """Open a NIfTI file lazily (header only) with a clear error for unreadable files.

    A folder is read as a DICOM series (:func:`keras_livseg.data.dicom.read_series`), into an
    in-memory NIfTI image on the series' own grid (``series_uid`` picks one of several).
    """
    if Path(path).is_dir():
        from keras_livseg.data.dicom import read_series

        return read_series(path, series_uid)
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; check the path") from None
    except Exception as error:  # nibabel raises many types for damaged headers
        raise DataError(f"{path} is not a readable NIfTI {what} ({error}); re-export or remove it") from None
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        pass
    elif len(shape) != 3:
        raise DataError(
            f"{path} has shape {tuple(shape)}; a CT {what} must be 3D (a 4th axis of length 1 is accepted)"
        )
    _check_size(image, Path(path), what)
    return image


#: The most voxels a volume may claim, 2^31 (a whole-body CT at 512 x 512 x 3000 has 0.8e9): a
#: header beyond it is damaged, and reading it would try to allocate that much before finding out.
MAX_VOXELS = 2**31


def _check_size(image: nib.Nifti1Image, path: Path, what: str) -> None:
    """Refuse a header whose shape or data type the file cannot hold, before any allocation."""
    if any(int(n) <= 0 for n in image.shape):
        raise DataError(f"{path} has shape {tuple(image.shape)}: a size of zero or less; its header is damaged, re-export it")
    voxels = int(np.prod([int(n) for n in image.shape], dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise DataError(f"{path} claims shape {tuple(image.shape)} ({voxels:,} voxels), more than any CT {what}; "
                        "its header is damaged: re-export the file")
    dtype = image.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields is not None:
        # Complex, RGB or boolean data would be cast silently (the imaginary part dropped).
        raise DataError(f"{path} holds {dtype} data; a CT {what} must hold real numbers (integers or floats)")
    if path.name.endswith(".nii") and path.is_file():
        # The proxy's offset: nibabel resets the loaded header's vox_offset to 0.
        offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
        needed = offset + voxels * dtype.itemsize
        if needed > path.stat().st_size:
            raise DataError(f"{path} holds {path.stat().st_size:,} bytes but its header needs {needed:,} for shape "
                            f"{tuple(image.shape)}: the file is truncated or its header damaged; re-export it")


#: Bytes inflated per read: the file object's readinto copies through a temporary of this size.
_GZIP_CHUNK = 16 * 2**20


def _read_gzip_proxy(proxy) -> np.ndarray | None:
    """The unscaled array behind a ``.nii.gz`` proxy, decompressed by ISA-L; None where that does not apply.

    Intel's ISA-L inflates about twice as fast as zlib (``benchmarks/bench_prepare.py`` times
    both readers), the largest cost of ``predict`` after the network. The bytes are the same.
    Reading on to the gzip trailer checks its CRC, so damaged data fails here where nibabel
    returns it; a trailer cut off or followed by other bytes, after complete data, is accepted
    (with a warning once the data is read) as nibabel, which never reads the trailer, accepts
    it. None where nibabel should read instead: files it reads another way (uncompressed, in
    memory, an open file object), and streams that end early (nibabel then reads what is there
    or raises its own error).
    """
    if igzip is None or not isinstance(proxy, nib.arrayproxy.ArrayProxy):
        return None
    source = getattr(proxy, "file_like", None)
    if not isinstance(source, (str, Path)) or not str(source).endswith(".gz"):
        return None
    array = np.empty(proxy.shape, proxy.dtype, order=proxy.order)
    with igzip.open(source, "rb") as handle:
        handle.seek(int(proxy.offset))
        view = memoryview(array.reshape(-1, order="A")).cast("B")
        got = 0
        try:
            while got < array.nbytes:  # in bounded chunks: each readinto copies through a temporary
                read = handle.readinto(view[got:got + _GZIP_CHUNK])
                if not read:
                    break
                got += read
        except EOFError:  # ISA-L reads ahead into the trailer; nibabel's reader tells a short file from a cut trailer
            pass
        if got < array.nbytes:
            logger.debug("%s: ISA-L stopped %d bytes short; reading it with nibabel", source, array.nbytes - got)
            return None
        try:
            while handle.read(_GZIP_CHUNK):  # on to the trailer, whose CRC catches damaged data
                pass
        except EOFError:
            logger.warning("%s: the data is complete but the gzip trailer is cut off or followed by other bytes; "
                           "its checksum could not be checked", source)
    return array


def read_array(image: nib.Nifti1Image, path: Path, what: str = "volume", dtype=None) -> np.ndarray:
    """Read a 3D array (decompressing now), squeezing a singleton 4th axis.

    Integer data without header scaling keeps its dtype (int16 CT stays 2 bytes a voxel);
    scaled or float data is returned as float32, never float64.
    """
    try:
        proxy = image.dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        raw = _read_gzip_proxy(proxy)
        if raw is None:
            raw = np.asarray(proxy.get_unscaled()) if hasattr(proxy, "get_unscaled") else np.asarray(proxy)
    except (EOFError, zlib.error, IsalError, OSError, ValueError, OverflowError, MemoryError) as error:
        raise DataError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); re-download or re-export it"
        ) from None
    if raw.ndim == 4:
        raw = raw[..., 0]
    if raw.dtype.kind not in "iuf" or raw.dtype.fields is not None:
        # Complex, RGB or boolean data would be cast silently (the imaginary part dropped).
        raise DataError(f"{path} holds {raw.dtype} data; a CT {what} must hold real numbers (integers or floats)")
    unscaled = (slope in (None, 1.0) or np.isnan(slope)) and (inter in (None, 0.0) or np.isnan(inter))
    if unscaled and raw.dtype.kind in "iu":
        data = raw
    else:
        data = raw.astype(np.float32, copy=False)
        if not unscaled:
            data = data * np.float32(slope) + np.float32(inter)
        if not np.isfinite(data).all():
            raise DataError(
                f"{path} contains NaN or infinite voxels; replace them (e.g. with -1024 HU) before use"
            )
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data


def load_label_image(path: str | Path, image: str | Path | None, what: str = "segmentation",
                     series_uid: str | None = None, image_nii: nib.Nifti1Image | None = None) -> nib.Nifti1Image:
    """A label map as NIfTI: a NIfTI file, or a DICOM-SEG placed on the grid of its DICOM series ``image``.

    ``image_nii`` (the series already read) spares reading the series again.

    Raises:
        DataError: unreadable file, or a SEG without its series.
    """
    from keras_livseg.data.dicom import looks_like_dicom

    path = Path(path)
    if not (path.is_file() and looks_like_dicom(path)):
        return load_nifti(path, what)
    if image is None or not Path(image).is_dir():
        raise DataError(f"{path} is a DICOM Segmentation, which references a DICOM series, but the image "
                        f"{image} is {'missing' if image is None else 'NIfTI'}; pair the SEG with the series' folder, "
                        "or give a NIfTI label map")
    from keras_livseg.data.dicom import read_segmentation

    if image_nii is None:
        image_nii = load_nifti(image, "volume", series_uid)
    # The SEG's frames are placed on the series' own grid: the image's affine is theirs.
    return nib.Nifti1Image(read_segmentation(path, image, series_uid), image_nii.affine)


def load_case(
    files: CaseFiles,
    label_map: Mapping[int, int] | None = None,
    with_labels: bool = True,
) -> Case:
    """Load one case into canonical orientation, checking that image and labels agree.

    Args:
        files: the case's files, from :func:`discover_cases`.
        label_map: optional remapping of foreign label values (see :func:`apply_label_map`).
        with_labels: read the label map (when the case has one).

    Returns:
        The loaded :class:`Case`.

    Raises:
        DataError: unreadable file, 2D/4D data, NaN voxels, image/label shape or affine
            mismatch, or label values outside the map.

    Example:
        >>> case = load_case(discover_cases("../shared/data/real/dcmqi-ct-3slice")[0])  # doctest: +SKIP
        >>> case.image.shape, case.spacing
        ((512, 512, 3), (0.810547, 0.810547, 1.0))
    """
    image_nii = load_nifti(files.image, "volume", files.series_uid)
    zooms = image_zooms(image_nii, files.image)  # a header without spacing fails before any read
    labels = None
    if with_labels and files.label is not None:
        label_nii = load_label_image(files.label, files.image, "segmentation", files.series_uid, image_nii)
        _check_same_grid(label_nii, image_nii, files)
        raw_labels = read_array(label_nii, files.label, "segmentation")
        if raw_labels.dtype.kind == "f":
            if not np.array_equal(raw_labels, np.round(raw_labels)):
                raise DataError(f"{files.label} holds non-integer labels; save it as an integer label map")
            raw_labels = raw_labels.astype(np.int32)
        labels = to_canonical(apply_label_map(raw_labels, label_map, str(files.label)), image_nii.affine)
    volume = read_array(image_nii, files.image, "volume")
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise DataError(
            f"{files.image} contains NaN or infinite voxels; replace them (e.g. with -1024 HU) before use"
        )
    spacing = canonical_spacing(image_nii.affine, zooms)
    return Case(
        case_id=files.case_id,
        image=to_canonical(volume, image_nii.affine),
        labels=labels,
        spacing=spacing,
        original_affine=np.asarray(image_nii.affine, dtype=np.float64),
        original_shape=tuple(int(s) for s in image_nii.shape[:3]),
        files=files,
    )


#: ISA-L's deflate level for written ``.nii.gz``: its level 1 is several times faster than zlib's
#: level 1 (nibabel's default) and compresses label maps at least as tightly.
_ISAL_WRITE_LEVEL = 1
_ZLIB_WRITE_LEVEL = 1  # nibabel's own default for .gz


def _check_same_grid(label_nii: nib.Nifti1Image, image_nii: nib.Nifti1Image, files: CaseFiles) -> None:
    if tuple(label_nii.shape[:3]) != tuple(image_nii.shape[:3]):
        raise DataError(
            f"{files.label} has shape {tuple(label_nii.shape[:3])} but {files.image} has "
            f"{tuple(image_nii.shape[:3])}; they must be on the same grid (resample the segmentation)"
        )
    if not np.allclose(label_nii.affine, image_nii.affine, atol=1e-3, rtol=1e-4):
        raise DataError(
            f"{files.label} and {files.image} have different affines; resample the segmentation "
            "onto the volume's grid (same origin, spacing and orientation)"
        )


def check_label_grids(cases: Sequence[CaseFiles]) -> None:
    """Check, from the headers alone, that every NIfTI case's segmentation lies on its volume's grid.

    What :func:`load_case` checks before reading, for a command that reads the segmentations only
    after a long step (``evaluate --model`` predicts first). Cases of a DICOM series are skipped: a
    DICOM-SEG is placed on its series' grid when read.

    Raises:
        DataError: a shape or affine differs, naming both files and the fix.
    """
    for files in cases:
        if files.label is None or Path(files.image).is_dir() or Path(files.label).is_dir():
            continue
        image_nii = load_nifti(Path(files.image), "volume")
        _check_same_grid(load_nifti(Path(files.label), "segmentation"), image_nii, files)


def check_headers(cases: Sequence[CaseFiles], what: str = "volume") -> None:
    """Check every case's image header before any voxel is read: shape, size, affine, spacing.

    ``predict`` runs this over all its inputs first, so that a damaged header in the 57th file
    stops the run before the first case is predicted, and the command refuses it before loading
    TensorFlow and the model. A DICOM folder's series is checked from its files' headers
    (:func:`~keras_livseg.data.dicom.check_series`: one series, positions, spacing, pixel data
    as long as the header says). What only reading finds (NaN voxels, a scale factor that
    overflows, a gzip stream cut short inside the data, compressed pixel data that does not
    decode) is still found when that case is read.

    Args:
        cases: the cases, from :func:`~keras_livseg.data.cases.resolve_inputs` or
            :func:`~keras_livseg.data.cases.discover_cases`.
        what: what the images are, for the message (default ``"volume"``).

    Raises:
        DataError: the first unreadable header, naming its file and the fix.

    Example:
        >>> check_headers([CaseFiles("1", Path("volume-1.nii.gz"), None)])  # doctest: +SKIP
        Traceback (most recent call last):
        keras_livseg.data.errors.DataError: volume-1.nii.gz does not exist; check the path
    """
    for files in cases:
        if Path(files.image).is_dir():
            from keras_livseg.data.dicom import check_series

            check_series(files.image, files.series_uid)
            continue
        image = load_nifti(Path(files.image), what)
        image_zooms(image, files.image)


def write_nifti(image: nib.Nifti1Image, path: str | Path, *, reproducible: bool = False) -> Path:
    """Write ``image`` to ``path`` atomically: a temporary name in the same folder, then a rename.

    ``.nii.gz`` is deflated by ISA-L where it is installed (standard gzip: nibabel, zlib and
    every other reader open it), otherwise by zlib, with an empty name and a zero time in the
    gzip header. A half-written file never carries the final name, and the temporary is removed
    if writing fails.

    Args:
        image: the NIfTI image.
        path: ``.nii`` or ``.nii.gz`` file name.
        reproducible: deflate with zlib even where ISA-L is installed, so that one image is the
            same bytes whichever process writes it (the phantom's files, whose checksums
            manifests record). ISA-L's stream was seen to differ once for the same image
            written in a spawned worker process (the same NIfTI inside; the test suite's
            ``test_slice_counts_and_workers_give_the_same_files``); zlib's depends only on its
            input, level and version. Default False: ISA-L's speed (predicted label maps).

    Example:
        >>> write_nifti(nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4)), "out/seg.nii.gz")  # doctest: +SKIP
        PosixPath('out/seg.nii.gz')
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_path(path, unique=True) as temporary:
        if suffix == ".nii.gz":
            # gzip's header would otherwise hold the temporary's name (with this process's id) and the time.
            fast = igzip is not None and not reproducible
            deflate = igzip.IGzipFile if fast else gzip.GzipFile
            level = _ISAL_WRITE_LEVEL if fast else _ZLIB_WRITE_LEVEL
            with open(temporary, "wb") as raw, deflate(filename="", mode="wb", compresslevel=level, fileobj=raw,
                                                       mtime=0) as handle:
                image.to_file_map({"image": nib.FileHolder(filename=str(temporary), fileobj=handle)})
        else:
            nib.save(image, str(temporary))
    return path


def save_like(
    data: np.ndarray,
    reference_affine: np.ndarray,
    path: str | Path,
    reference_header: nib.Nifti1Header | None = None,
) -> Path:
    """Write a canonical-orientation array back on a reference grid as NIfTI, atomically.

    The array is reoriented with :func:`from_canonical`, written to a temporary name and
    renamed, so a half-written file never carries the final name.

    Example:
        >>> save_like(case.labels, case.original_affine, "out/segmentation-3.nii.gz")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # NIfTI stores Fortran order: an array already in it is written without a transposing copy.
    native = np.asfortranarray(from_canonical(data, reference_affine))
    image = nib.Nifti1Image(native, reference_affine, header=reference_header)
    image.set_data_dtype(native.dtype)
    if reference_header is not None:
        image.header.set_qform(reference_affine, code=int(reference_header["qform_code"]) or 1)
        image.header.set_sform(reference_affine, code=int(reference_header["sform_code"]) or 1)
        image.header.set_slope_inter(1.0, 0.0)
    return write_nifti(image, path)
