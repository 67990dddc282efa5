"""Where the cases are and what their files are called: the one place that knows file names.

Every stage that meets files on disk asks this module: ``prepare`` and ``fit`` discover training
cases (:func:`discover_cases`), ``predict`` resolves its inputs and names its outputs
(:func:`resolve_inputs`, :func:`output_names`), and ``evaluate`` pairs predictions with
references by case (:func:`case_key`, :func:`nifti_files`).

Layouts understood:

- **LiTS**: ``volume-N.nii[.gz]`` beside ``segmentation-N.nii[.gz]`` (any folder depth).
- **Medical Segmentation Decathlon**: ``imagesTr/<case>.nii.gz`` with ``labelsTr/<case>.nii.gz``
  (nnU-Net's channel suffix ``_0000`` is dropped from the case id; ``imagesTs/`` is ignored for
  training).
- **CSV list of pairs**: a ``.csv`` file with the columns ``image,label`` and optionally
  ``case_id``, ``patient`` (or ``patient_id``: several scans of one patient never fall into
  different splits or folds) and ``stratum`` (a group such as the contrast phase, which
  ``prepare --stratify`` shares out evenly among the splits); relative paths are taken relative
  to the CSV file.
- **Phantom**: a LiTS folder written by ``python -m keras_livseg.phantom`` also holds
  ``phantom.json``, whose record of each case's contrast phase and lesion kind is its stratum.
- **Predictions**: ``segmentation-N.nii[.gz]`` and ``probabilities-N.nii[.gz]`` for a LiTS
  input, ``<case>.nii.gz`` and ``<case>_probabilities.nii.gz`` for any other.

Only file names and folders are read here (no NIfTI is opened), so this module imports nothing
heavier than the standard library.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

from keras_livseg.data.errors import DataError

logger = logging.getLogger(__name__)

#: NIfTI file name endings, longest first (so ``.nii.gz`` is not taken for ``.gz``).
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(?:\.gz)?$")
_LITS_VOLUME = re.compile(r"^volume-(?P<id>.+?)\.nii(\.gz)?$")
_LITS_STEM = re.compile(r"^(?:segmentation|volume|probabilities)-(?P<id>.+)$")
#: Prefixes of the files a dataset folder holds beside its CT volumes.
_NOT_CT_PREFIXES = ("segmentation-", "probabilities-", ".")


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """One case on disk: an image and (for training data) its label map.

    Attributes:
        case_id: unique id of the case (``"3"`` for ``volume-3.nii``).
        image: path of the CT volume.
        label: path of the label map, or ``None`` for unlabelled inference input.
        patient_id: the patient the scan belongs to (splits and folds keep a patient's scans
            together); ``None`` means the case is its own patient.
        series_uid: for an image that is a DICOM folder holding several series, the one to read.
        stratum: the case's group for a stratified split (``prepare --stratify``), e.g.
            ``"arterial/hyper"``; ``None`` when the source names none.
    """

    case_id: str
    image: Path
    label: Path | None
    patient_id: str | None = None
    series_uid: str | None = None
    stratum: str | None = None

    @property
    def patient(self) -> str:
        """The patient id, or the case id when none was given."""
        return self.patient_id if self.patient_id else self.case_id


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key that puts ``2`` before ``10`` and never compares a number with a word.

    Example:
        >>> sorted(["10", "2", "b", "a1"], key=natural_key)
        ['2', '10', 'a1', 'b']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def is_nifti_name(name: str) -> bool:
    """Whether a file name ends in ``.nii`` or ``.nii.gz``."""
    return name.endswith(NIFTI_SUFFIXES)


def nifti_suffix(path: Path) -> str:
    """``.nii`` or ``.nii.gz`` as the file has it (``.nii.gz`` for anything else)."""
    return next((s for s in NIFTI_SUFFIXES if path.name.endswith(s)), ".nii.gz")


def strip_nifti_suffix(name: str) -> str:
    """The name without ``.nii``/``.nii.gz``.

    Example:
        >>> strip_nifti_suffix("liver_3_0000.nii.gz")
        'liver_3_0000'
    """
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def lits_id(name: str, prefix: str = "volume") -> str | None:
    """The case id of a LiTS file name (``volume-3.nii`` → ``"3"``), or ``None``.

    Example:
        >>> lits_id("volume-3.nii"), lits_id("segmentation-3.nii.gz", "segmentation"), lits_id("a.nii")
        ('3', '3', None)
    """
    if not name.startswith(f"{prefix}-") or not is_nifti_name(name):
        return None
    return strip_nifti_suffix(name)[len(prefix) + 1:] or None


def lits_names(case_id: str, suffix: str = ".nii.gz") -> tuple[str, str]:
    """The LiTS file names of a case's CT volume and label map.

    Example:
        >>> lits_names("3", ".nii")
        ('volume-3.nii', 'segmentation-3.nii')
    """
    return f"volume-{case_id}{suffix}", f"segmentation-{case_id}{suffix}"


def case_key(path: Path) -> str:
    """The case a NIfTI file belongs to: ``segmentation-3.nii`` and ``volume-3.nii`` → ``"3"``,
    ``liver_3_0000.nii.gz`` and ``liver_3.nii.gz`` → ``"liver_3"``.

    Example:
        >>> case_key(Path("segmentation-12.nii.gz")), case_key(Path("liver_3_0000.nii.gz"))
        ('12', 'liver_3')
    """
    if path.name.endswith(DICOM_SEG_SUFFIX):  # predict --format dicom-seg writes <case>_seg.dcm
        return path.name[: -len(DICOM_SEG_SUFFIX)]
    match = _NIFTI.match(path.name)
    stem = match.group("stem") if match else path.stem
    lits = _LITS_STEM.match(stem)
    if lits:
        return lits.group("id")
    return re.sub(r"_0000$", "", stem)


def is_probability_file(name: str) -> bool:
    """Whether a file is a probability map written by ``predict`` (never a label map)."""
    return name.startswith("probabilities-") or "_probabilities." in name


#: The name ending of a DICOM-SEG that ``predict --format dicom-seg`` writes for a case.
DICOM_SEG_SUFFIX = "_seg.dcm"


def prediction_files(folder: Path) -> list[Path]:
    """The label maps ``predict`` wrote in ``folder``: NIfTI files and ``<case>_seg.dcm`` DICOM-SEGs (sorted)."""
    segs = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(DICOM_SEG_SUFFIX)
            and not p.name.startswith(".")]
    return sorted(nifti_files(folder) + segs)


def nifti_files(folder: Path) -> list[Path]:
    """The NIfTI files directly in ``folder`` (sorted), without hidden files and probability maps."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and _NIFTI.match(p.name) and not p.name.startswith(".")
        and not is_probability_file(p.name)
    )


def output_names(files: CaseFiles) -> tuple[str, str]:
    """File names of a case's predicted label map and probability map.

    ``volume-N.nii[.gz]`` gives ``segmentation-N.nii[.gz]`` and ``probabilities-N.nii[.gz]``
    (the LiTS names); any other input gives ``<case_id><suffix>`` and
    ``<case_id>_probabilities<suffix>``.

    Example:
        >>> output_names(CaseFiles("3", Path("volume-3.nii"), None))
        ('segmentation-3.nii', 'probabilities-3.nii')
        >>> output_names(CaseFiles("liver_7", Path("imagesTr/liver_7_0000.nii.gz"), None))
        ('liver_7.nii.gz', 'liver_7_probabilities.nii.gz')
    """
    suffix = nifti_suffix(files.image)
    case = lits_id(files.image.name)
    if case is not None:
        return f"segmentation-{case}{suffix}", f"probabilities-{case}{suffix}"
    return f"{files.case_id}{suffix}", f"{files.case_id}_probabilities{suffix}"


#: What ``predict`` can write: NIfTI label maps, or DICOM-SEG objects for DICOM series inputs.
OUTPUT_FORMATS = ("nifti", "dicom-seg")


def plan_outputs(cases: Sequence[CaseFiles], out_dir: str | Path, output_format: str = "nifti",
                 label_map: Mapping[int, int] | None = None) -> list[Path]:
    """Each case's label-map path under ``out_dir``, the request checked before any work.

    Args:
        cases: the cases to predict, from :func:`resolve_inputs`.
        out_dir: the output folder.
        output_format: one of :data:`OUTPUT_FORMATS`; ``"dicom-seg"`` writes ``<case>_seg.dcm``.
        label_map: the values to write per class (NIfTI only).

    Raises:
        DataError: an unknown format, DICOM-SEG for NIfTI inputs or with a label map, or an
            output that would overwrite its input or the input's label.

    Example:
        >>> plan_outputs([CaseFiles("3", Path("data/volume-3.nii"), None)], "out")
        [PosixPath('out/segmentation-3.nii')]
    """
    if output_format not in OUTPUT_FORMATS:
        raise DataError(f"output format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "dicom-seg":
        not_dicom = [str(c.image) for c in cases if not c.image.is_dir()]
        if not_dicom:
            raise DataError(f"--format dicom-seg needs DICOM series inputs (a DICOM-SEG references its series), but "
                            f"{', '.join(not_dicom[:3])} {'is' if len(not_dicom) == 1 else 'are'} NIfTI; use --format nifti")
        if label_map is not None:
            raise DataError("--label-map does not apply to DICOM-SEG, whose segments are coded concepts; drop it")
    outputs = []
    for files in cases:
        name = f"{files.case_id}{DICOM_SEG_SUFFIX}" if output_format == "dicom-seg" else output_names(files)[0]
        output = Path(out_dir) / name
        if output.resolve() == files.image.resolve() or (files.label and output.resolve() == files.label.resolve()):
            raise DataError(f"writing {output} would overwrite the input {files.image} or its label; choose "
                            "another --out folder")
        outputs.append(output)
    return outputs


def _sibling_label(image: Path, case: str) -> Path | None:
    """``segmentation-<case>.nii[.gz]`` beside a LiTS volume, if it exists."""
    return next(
        (image.with_name(f"segmentation-{case}{s}") for s in NIFTI_SUFFIXES
         if image.with_name(f"segmentation-{case}{s}").is_file()),
        None,
    )


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def _check_unique(cases: Sequence[CaseFiles]) -> None:
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(
                f"two cases share the id {case.case_id!r}: {seen[case.case_id]} and {case.image}; "
                "remove or rename one of them"
            )
        seen[case.case_id] = case.image


#: The file in which the phantom generator describes its cases (see :mod:`keras_livseg.data.phantom`).
PHANTOM_RECORD = "phantom.json"


def phantom_strata(folder: Path) -> dict[str, str]:
    """Each phantom case's stratum, ``"<contrast phase>/<lesion kind>"``, from ``phantom.json``.

    The lesion kind is ``none``, ``hypo``, ``hyper`` or ``mixed`` (both kinds): the two things
    that decide how hard a phantom case's tumours are to find. Empty when the folder holds no
    phantom record (or one without phases).

    Example:
        >>> phantom_strata(Path(".cache/keras_livseg/phantom-2581bfd4d41d"))["12"]  # doctest: +SKIP
        'arterial/hyper'
    """
    import json

    record = folder / PHANTOM_RECORD
    if not record.is_file():
        return {}
    try:
        entries = json.loads(record.read_text()).get("cases", [])
        strata = {}
        for entry in entries:
            if "phase" not in entry or "id" not in entry:
                continue
            kinds = sorted({str(t["kind"]) for t in entry.get("tumors") or []})
            strata[str(entry["id"])] = f"{entry['phase']}/{'none' if not kinds else kinds[0] if len(kinds) == 1 else 'mixed'}"
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as error:
        # Strata only matter to a stratified split, which then says that none was found: a
        # damaged record must not stop the commands that merely find the cases.
        logger.warning("%s cannot be read as the phantom's record (%s: %s); its cases name no stratum",
                       record, type(error).__name__, error)
        return {}
    return strata


def _discover_lits(src: Path, require_labels: bool) -> list[CaseFiles]:
    cases = []
    strata = phantom_strata(src)
    for image in sorted(src.rglob("volume-*.nii*")):
        match = _LITS_VOLUME.match(image.name)
        if not match or not image.is_file():
            continue
        case_id = match.group("id")
        label = _sibling_label(image, case_id)
        if label is None and require_labels:
            raise DataError(
                f"{image} has no segmentation-{case_id}.nii[.gz] beside it; "
                "add the label file or move the volume out of the folder"
            )
        cases.append(CaseFiles(case_id, image, label, stratum=strata.get(case_id)))
    unknown = [c.case_id for c in cases if c.stratum is None]
    if strata and unknown:
        # Cases added to a phantom folder since: its record no longer describes the folder.
        logger.warning("%s does not describe case(s) %s of %s; the folder's cases name no stratum",
                       PHANTOM_RECORD, ", ".join(unknown[:5]), src)
        cases = [dataclasses.replace(c, stratum=None) for c in cases]
    return cases


def _discover_msd(src: Path, require_labels: bool) -> list[CaseFiles]:
    cases = []
    for image in sorted((src / "imagesTr").iterdir()):
        if not (image.is_file() and is_nifti_name(image.name)) or image.name.startswith("._"):
            continue
        # MSD images may carry a channel suffix (case_0000.nii.gz in nnU-Net's raw format).
        case_id = re.sub(r"_0000$", "", strip_nifti_suffix(image.name))
        label = next(
            (src / "labelsTr" / f"{case_id}{s}" for s in NIFTI_SUFFIXES if (src / "labelsTr" / f"{case_id}{s}").is_file()),
            None,
        )
        if label is None and require_labels:
            raise DataError(
                f"{image} has no label {src / 'labelsTr' / (case_id + '.nii.gz')}; "
                "add the label file or remove the image"
            )
        cases.append(CaseFiles(case_id, image, label))
    return cases


def _discover_csv(csv_path: Path, require_labels: bool) -> list[CaseFiles]:
    base = csv_path.parent
    cases = []
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise DataError(
                f"{csv_path} needs a header row with the columns image,label[,case_id][,patient][,stratum]; "
                f"found {reader.fieldnames}"
            )
        for line_number, row in enumerate(reader, start=2):
            image = Path(row["image"].strip())
            image = image if image.is_absolute() else base / image
            label_text = (row.get("label") or "").strip()
            label = None
            if label_text:
                label = Path(label_text)
                label = label if label.is_absolute() else base / label
            case_id = (row.get("case_id") or "").strip() or strip_nifti_suffix(image.name)
            patient = (row.get("patient") or row.get("patient_id") or "").strip() or None
            series_uid = (row.get("series_uid") or "").strip() or None
            stratum = (row.get("stratum") or "").strip() or None
            if image.is_dir():
                from keras_livseg.data.dicom import is_dicom_folder

                if not is_dicom_folder(image):
                    raise DataError(f"{csv_path}:{line_number}: image {image} is a folder without DICOM files; "
                                    "give a NIfTI file or the folder of one DICOM CT series")
            elif not image.is_file():
                raise DataError(f"{csv_path}:{line_number}: image {image} does not exist; fix the path")
            if label is not None and not label.is_file():
                raise DataError(f"{csv_path}:{line_number}: label {label} does not exist; fix the path")
            if label is None and require_labels:
                raise DataError(f"{csv_path}:{line_number}: {image} has no label; fill the label column")
            cases.append(CaseFiles(case_id, image, label, patient, series_uid=series_uid, stratum=stratum))
    return cases


def discover_cases(src: str | Path, require_labels: bool = True) -> list[CaseFiles]:
    """Find the cases of a dataset in the LiTS, MSD or CSV layout.

    Args:
        src: a folder (LiTS or MSD layout) or a ``.csv`` file of image/label pairs.
        require_labels: when True (training data) a volume without its label map is an error.

    Returns:
        The cases sorted by id (natural order, so ``2`` comes before ``10``).

    Raises:
        DataError: the folder does not exist or holds no case, a volume lacks its label map,
            or two cases share an id.

    Example:
        >>> cases = discover_cases("../shared/data/real/ircadb")  # doctest: +SKIP
        >>> [c.case_id for c in cases]  # doctest: +SKIP
        ['1', '7']
    """
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src} does not exist; pass the folder that holds the volumes")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise DataError(f"{src} is a file but not a .csv list of image,label pairs")
        cases = _discover_csv(src, require_labels)
        layout = "csv"
    elif (src / "imagesTr").is_dir():
        cases = _discover_msd(src, require_labels)
        layout = "msd"
    else:
        cases = _discover_lits(src, require_labels)
        layout = "lits"
    if not cases:
        raise DataError(
            f"no cases found in {src}; expected volume-N.nii[.gz] with segmentation-N.nii[.gz] "
            "(LiTS), imagesTr/ with labelsTr/ (MSD), or a .csv of image,label pairs"
        )
    _check_unique(cases)
    logger.info("found %d cases in %s (%s layout)", len(cases), src, layout)
    return sorted(cases, key=lambda c: natural_key(c.case_id))


def resolve_inputs(inputs: Sequence[str | Path], series_uid: str | None = None) -> list[CaseFiles]:
    """The cases behind ``predict``'s INPUTs.

    Each INPUT is a NIfTI file, a LiTS or MSD dataset folder (its volumes, labelled or not), a
    folder of NIfTI files (every ``.nii``/``.nii.gz`` in it except ``segmentation-*`` and
    ``probabilities-*``), a folder of one DICOM series (the case is named after the folder), or
    a ``.csv`` of image,label pairs. ``series_uid`` picks the series of DICOM folders that hold
    several.

    Raises:
        DataError: an INPUT does not exist, a folder holds no NIfTI volume, or two inputs share
            a case id (their outputs would overwrite each other).

    Example:
        >>> [c.case_id for c in resolve_inputs(["../shared/data/real/dcmqi-ct-3slice"])]  # doctest: +SKIP
        ['3slice']
    """
    cases: list[CaseFiles] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input {path} does not exist; pass a NIfTI file, a folder or a dataset")
        if path.is_file():
            if path.suffix.lower() == ".csv":
                cases.extend(discover_cases(path, require_labels=False))
                continue
            if not is_nifti_name(path.name):
                raise DataError(f"input {path} is not a .nii or .nii.gz file; convert it to NIfTI first")
            case = lits_id(path.name)
            if case is not None:
                cases.append(CaseFiles(case, path, _sibling_label(path, case)))
            else:
                cases.append(CaseFiles(strip_nifti_suffix(path.name), path, None))
            continue
        if (path / "imagesTr").is_dir() or any(path.rglob("volume-*.nii*")):
            cases.extend(discover_cases(path, require_labels=False))
            continue
        if not any(is_nifti_name(p.name) for p in path.iterdir()):
            from keras_livseg.data.dicom import is_dicom_folder

            if is_dicom_folder(path):  # one DICOM series: the folder is the case
                cases.append(CaseFiles(path.resolve().name, path, None, series_uid=series_uid))
                continue
        found = sorted(
            p for p in path.iterdir()
            if p.is_file() and is_nifti_name(p.name) and not p.name.startswith(_NOT_CT_PREFIXES)
        )
        if not found:
            raise DataError(
                f"no cases found in {path}: no .nii/.nii.gz volumes, no LiTS volume-N files, no "
                "MSD imagesTr/; pass the folder that holds the CT volumes"
            )
        cases.extend(CaseFiles(strip_nifti_suffix(p.name), p, None) for p in found)
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen and seen[case.case_id] != case.image:
            raise DataError(
                f"{seen[case.case_id]} and {case.image} both give case {case.case_id!r}; their "
                "predictions would overwrite each other: predict them into different --out folders"
            )
        seen[case.case_id] = case.image
    unique = {case.image.resolve(): case for case in cases}
    return list(unique.values())
