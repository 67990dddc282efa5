"""Which prediction goes with which reference: matching files to cases, reading the pairs.

Used by the report (:mod:`keras_livseg.evaluation.report`) and the overlay figures
(:mod:`keras_livseg.evaluation.plots`), which therefore do not import each other. File names
are :mod:`keras_livseg.data.cases`'s; this module adds the pairing, the prepared shard folders'
manifests (which cases a split holds, which cases a model was trained on), and
:func:`load_pair`, which reads a pair onto one canonical grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from keras_livseg.data.cases import (
    CaseFiles,
    case_key,
    discover_cases,
    lits_id,
    natural_key,
    nifti_files,
    prediction_files,
)
from keras_livseg.data.volumes import (
    REMAP_ADVICE,
    DataError,
    apply_label_map,
    canonical_spacing,
    image_zooms,
    load_label_image,
    read_array,
    to_canonical,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Matching files to cases
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatchedCase:
    """A prediction and its reference (and the CT, when the reference is a dataset; and the
    case's stratum, when the dataset or manifest names one)."""

    case_id: str
    prediction: Path
    reference: Path
    image: Path | None = None
    stratum: str | None = None


def match_cases(
    pred_dir: str | Path,
    ref: str | Path,
    *,
    images: str | Path | None = None,
    split: str | None = None,
) -> tuple[list[MatchedCase], list[Path], list[str]]:
    """Pair prediction files with reference label maps by case.

    Args:
        pred_dir: Folder of predicted label maps (``segmentation-N.nii[.gz]``, ``<case>.nii.gz``, or
            ``<case>_seg.dcm``, the DICOM-SEG of a case's DICOM series; probability maps are skipped).
        ref: A dataset (LiTS folder, MSD folder, ``.csv``; its CT volumes then feed the overlay
            figure), a plain folder of reference label maps (``volume-N`` files beside
            ``segmentation-N`` are taken as the CT), or a prepared shard folder holding
            ``manifest.json`` (then ``split`` picks the cases, read from their source files).
        images: Folder of the CT volumes (``volume-N.nii[.gz]``, ``<case>_0000.nii.gz`` or
            ``<case>.nii.gz``) for cases whose reference brings none (default None).
        split: With a shard folder as ``ref``: the split to score (``train``, ``val``, ``test``).

    Returns:
        ``(matched, unmatched_predictions, missing_predictions)``: the pairs, the prediction
        files without a reference, and the reference case ids without a prediction.

    Raises:
        DataError: a folder is missing or holds no NIfTI file, no prediction has a reference, or
            the manifest lacks ``split`` (the message names the splits it has).

    Example:
        >>> pairs, extra, missing = match_cases("predictions", "data/LiTS")  # doctest: +SKIP
        >>> pairs, _, _ = match_cases("eval/predictions", "shards/", split="test")  # doctest: +SKIP
    """
    pred_dir, ref = Path(pred_dir), Path(ref)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder {pred_dir} does not exist; pass the folder predict wrote")
    predictions = prediction_files(pred_dir)
    if not predictions:
        raise DataError(f"no cases found in {pred_dir}: it holds no .nii/.nii.gz prediction (nor a <case>_seg.dcm "
                        "DICOM-SEG)")
    if not ref.exists():
        raise DataError(f"reference {ref} does not exist; pass the dataset or folder of label maps")
    references: dict[str, tuple[Path, Path | None]] = {}
    aliases: dict[str, str] = {}  # other keys a prediction may carry (the CT file's stem)
    strata: dict[str, str | None] = {}
    if is_manifest(ref):
        for files in manifest_cases(ref, split):
            strata[files.case_id] = files.stratum
            # A CT that is gone only costs the overlay its background; the label is what scores.
            references[files.case_id] = (files.label, files.image if files.image.is_file() else None)  # type: ignore[assignment]
            for path in (files.image, files.label):
                aliases.setdefault(case_key(path), files.case_id)
    else:
        if split is not None:
            raise DataError(
                f"split={split!r} needs a prepared shard folder holding manifest.json, but {ref} "
                "has none; drop --split, or pass the folder prepare wrote"
            )
        try:
            for files in discover_cases(ref, require_labels=True):
                references[files.case_id] = (files.label, files.image)
                strata[files.case_id] = files.stratum
        except DataError:
            if not ref.is_dir():
                raise
            volumes = {case_key(p): p for p in nifti_files(ref) if lits_id(p.name) is not None}
            for path in nifti_files(ref):
                if lits_id(path.name) is None:
                    references[case_key(path)] = (path, volumes.get(case_key(path)))
    if images is not None:
        references = _attach_images(references, Path(images))
    if not references:
        raise DataError(f"no cases found in {ref}: no reference label maps (.nii/.nii.gz)")
    matched, unmatched = [], []
    seen: dict[str, Path] = {}
    for path in predictions:
        key = case_key(path)
        if key not in references and key in aliases:
            key = aliases[key]
        if key in seen:
            raise DataError(
                f"{seen[key]} and {path} both belong to case {key!r}; keep one of them in {pred_dir}"
            )
        seen[key] = path
        if key in references:
            label, image = references[key]
            matched.append(MatchedCase(key, path, label, image, strata.get(key)))
        else:
            unmatched.append(path)
    missing = sorted(set(references) - set(seen), key=natural_key)
    if unmatched:
        logger.warning(
            "%d prediction(s) have no reference in %s and are not scored: %s",
            len(unmatched), ref, ", ".join(p.name for p in unmatched),
        )
    if not matched:
        raise DataError(
            f"none of the {len(predictions)} predictions in {pred_dir} has a reference in {ref} "
            f"(prediction cases {sorted(seen)[:5]}, reference cases {sorted(references)[:5]}); "
            "name them alike (segmentation-N.nii.gz in both, or the same file names)"
        )
    return sorted(matched, key=lambda m: natural_key(m.case_id)), unmatched, missing


def _attach_images(
    references: dict[str, tuple[Path, Path | None]], images: Path
) -> dict[str, tuple[Path, Path | None]]:
    """Give each reference without a CT the volume of its case found in ``images``."""
    if not images.is_dir():
        raise DataError(f"images folder {images} does not exist; pass the folder of the CT volumes (--images)")
    found: dict[str, Path] = {}
    for path in nifti_files(images):
        if lits_id(path.name, "segmentation") is None:
            found.setdefault(case_key(path), path)
    out = {key: (label, image if image is not None else found.get(key)) for key, (label, image) in references.items()}
    lacking = sorted((key for key, (_, image) in out.items() if image is None), key=natural_key)
    if lacking:
        logger.warning("no CT volume in %s for case(s) %s; their overlays show the contours only",
                       images, ", ".join(lacking[:10]))
    return out


def load_pair(
    case: MatchedCase, label_map: Mapping[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a prediction and its reference, check they share a grid, reorient both alike.

    Args:
        case: The pair.
        label_map: Remapping of the reference's labels (e.g. ``{5: 1}`` for TotalSegmentator).

    Returns:
        ``(pred, ref, spacing)``: uint8 canonical ``[rows, cols, slices]`` arrays and the
        reference's spacing along those axes in mm.

    Raises:
        DataError: shapes or affines differ (the message names both shapes and spacings), or
            labels outside 0..2.
    """
    # Either may be a DICOM-SEG of the case's DICOM series (placed on the series' grid).
    pred_nii = load_label_image(case.prediction, case.image, "prediction")
    ref_nii = load_label_image(case.reference, case.image, "reference")
    pred_shape, ref_shape = tuple(pred_nii.shape[:3]), tuple(ref_nii.shape[:3])
    # A header without spacing is named as such, before the grids are compared (nibabel reads it as 1 mm).
    ref_spacing = image_zooms(ref_nii, case.reference)
    pred_zooms = tuple(round(z, 4) for z in image_zooms(pred_nii, case.prediction))
    ref_zooms = tuple(round(z, 4) for z in ref_spacing)
    if pred_shape != ref_shape or not np.allclose(pred_nii.affine, ref_nii.affine, atol=1e-3, rtol=1e-4):
        raise DataError(
            f"case {case.case_id}: prediction {case.prediction} (shape {pred_shape}, spacing "
            f"{pred_zooms} mm) and reference {case.reference} (shape {ref_shape}, spacing "
            f"{ref_zooms} mm) are not on the same grid; predict on the reference's own volume, "
            "or resample the prediction onto the reference grid"
        )
    pred = checked_labels(read_array(pred_nii, case.prediction, "prediction"), None, case.prediction, PREDICTION_ADVICE)
    ref = checked_labels(read_array(ref_nii, case.reference, "reference"), label_map, case.reference)
    affine = ref_nii.affine
    spacing = canonical_spacing(affine, ref_spacing)
    return to_canonical(pred, affine), to_canonical(ref, affine), spacing


#: A prediction's labels are scored as they are: --label-map remaps references only.
PREDICTION_ADVICE = ("a prediction is scored with the model's own labels: write it without predict's --label-map "
                     "(or map it back to 0, 1, 2 yourself)")


def checked_labels(array: np.ndarray, label_map: Mapping[int, int] | None, source: Path,
                   advice: str = REMAP_ADVICE) -> np.ndarray:
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise DataError(f"{source} holds non-integer labels; save it as an integer label map")
        array = array.astype(np.int32)
    return apply_label_map(array, label_map, str(source), advice)


# ---------------------------------------------------------------------------------------------
# Prepared shard folders and the cases a model was trained on
# ---------------------------------------------------------------------------------------------

_TRAINING_SPLITS = ("train", "val")


def is_manifest(path: str | Path) -> bool:
    """True when ``path`` is a prepared shard folder (it holds ``manifest.json``) or that file."""
    path = Path(path)
    return (path.is_dir() and (path / "manifest.json").is_file()) or (
        path.is_file() and path.name == "manifest.json"
    )


def run_shards(path: str | Path) -> Path | None:
    """The shard folder a ``fit`` run trained on, when ``path`` is that run's folder; else None.

    A run folder holds ``config.json`` whose ``data.shards`` names the shards (in the cache,
    under a digest of their settings, where a user would not look for them).

    Raises:
        DataError: the run names shards that are not there any more (or not from here).

    Example:
        >>> run_shards("runs/tam_unet-phantom_demo")  # doctest: +SKIP
        PosixPath('.cache/keras_livseg/shards-5c1f0e9a7b2d')
    """
    path = Path(path)
    if not path.is_dir() or (path / "manifest.json").exists() or not (path / "config.json").is_file():
        return None
    shards, manifest = _recorded_shards(path)
    if shards and manifest is None:
        raise DataError(
            f"{path} is a fit run whose shards {shards} are not there: run this from the folder fit ran in "
            "(with KERAS_LIVSEG_CACHE as it was then), or pass the shard folder itself"
        )
    return manifest.parent if manifest is not None else None


def _recorded_shards(run_dir: Path) -> tuple[str | None, Path | None]:
    """``(shards as the run's config.json names them, their manifest.json if it is there)``.

    A relative name is read from here, then from the run folder.
    """
    try:
        shards = (json.loads((run_dir / "config.json").read_text()).get("data") or {}).get("shards")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None, None
    if not shards:
        return None, None
    manifest = Path(shards) if Path(shards).name == "manifest.json" else Path(shards) / "manifest.json"
    if not manifest.is_absolute() and not manifest.is_file():
        manifest = run_dir / manifest
    return str(shards), (manifest if manifest.is_file() else None)


def _load_manifest(path: str | Path) -> dict[str, Any]:
    from keras_livseg.data.prepare import load_manifest

    return load_manifest(path)


def _source_path(manifest: Mapping[str, Any], recorded: str | None) -> Path | None:
    """A file the manifest names, found as recorded (absolute or relative to the working folder
    at prepare time), else under the manifest's ``source`` dataset or beside the manifest."""
    if not recorded:
        return None
    path = Path(recorded)
    candidates = [path]
    if not path.is_absolute():
        candidates += [Path(manifest.get("_dir", ".")) / path]
    for root in (manifest.get("source"), manifest.get("_dir")):
        if root:
            candidates += [Path(root) / path.name, Path(root) / path.parent.name / path.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def manifest_cases(data: str | Path, split: str | None) -> list[CaseFiles]:
    """The source NIfTI files of one split of a prepared shard folder.

    Args:
        data: The folder ``prepare`` wrote (or its ``manifest.json``).
        split: ``"train"``, ``"val"`` or ``"test"`` (one the manifest has, with cases).

    Returns:
        One :class:`~keras_livseg.data.volumes.CaseFiles` per case of the split, in the
        manifest's order, with the image and label paths resolved.

    Raises:
        DataError: no split given, a split the manifest lacks or that has no case (the message
            names the splits with their case counts), or a source file that is gone.

    Example:
        >>> [c.case_id for c in manifest_cases("shards/", "test")]  # doctest: +SKIP
        ['7', '12']
    """
    manifest = _load_manifest(data)
    splits = manifest.get("splits") or {}
    available = ", ".join(f"{name} ({len(info.get('cases') or [])} cases)" for name, info in splits.items())
    if split is None or split not in splits or not (splits[split].get("cases") or []):
        what = "no --split given" if split is None else (
            f"split {split!r} has no cases" if split in splits else f"split {split!r} is not in it"
        )
        raise DataError(
            f"{data} is a prepared shard folder and {what}; available splits: {available or 'none'}; "
            "pass --split with one of them"
        )
    cases = []
    for case_id in splits[split]["cases"]:
        record = (manifest.get("cases") or {}).get(case_id)
        if record is None:
            raise DataError(f"{data}: case {case_id!r} of split {split!r} has no entry in manifest.json; run prepare again")
        image, label = _source_path(manifest, record.get("image")), _source_path(manifest, record.get("label"))
        if label is None:
            raise DataError(
                f"{data}: the label map {record.get('label')} of case {case_id!r} does not exist any more; "
                f"restore the source dataset ({manifest.get('source')}) or score with --ref DATASET"
            )
        cases.append(CaseFiles(str(case_id), image if image is not None else Path(record.get("image", "")), label,
                               stratum=record.get("stratum")))
    return cases


def training_manifest_for_model(model_path: str | Path) -> Path | None:
    """The training manifest of the run a checkpoint comes from, if any.

    A checkpoint ``runs/<name>/checkpoints/<file>.keras`` belongs to the run ``runs/<name>``,
    whose ``config.json`` names the shards it trained on (``config["data"]["shards"]``).

    Returns:
        The shard folder's ``manifest.json``, or None (not a run's checkpoint, or the shards are
        gone: then a warning says that training cases cannot be checked).

    Example:
        >>> training_manifest_for_model("runs/tam/checkpoints/best.keras")  # doctest: +SKIP
        PosixPath('runs/tam/shards/manifest.json')
    """
    model_path = Path(model_path)
    run_dir = model_path.parent.parent if model_path.parent.name == "checkpoints" else model_path.parent
    exported_by = _exporting_run(model_path) if model_path.is_dir() else None
    if exported_by is not None:  # a SavedModel that fit exported: its run is recorded in it
        run_dir = exported_by
    if not (run_dir / "config.json").is_file():
        return None
    shards, manifest = _recorded_shards(run_dir)
    if shards is None:
        return None
    if manifest is None:
        logger.warning(
            "the run %s trained on %s, which holds no manifest.json any more; cannot check whether "
            "scored cases were training cases", run_dir, shards,
        )
        return None
    return manifest


def _exporting_run(model_dir: Path) -> Path | None:
    """The run folder a SavedModel (or a base folder of versions) records in its metadata, if any.

    Read from the version that is scored, the one predict loads: never an older version's run.
    """
    from keras_livseg.inference.predictor import saved_model_dir  # only for a model: TensorFlow is loaded anyway

    folder = saved_model_dir(model_dir, announce=False)
    if folder is None:
        return None
    try:
        run = json.loads((folder / "assets.extra" / "preprocessing.json").read_text()).get("run")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return Path(run) if run else None


def find_training_cases(
    cases: Sequence[MatchedCase], training_manifest: str | Path
) -> list[dict[str, Any]]:
    """The scored cases that were in the train or val split of a training manifest.

    A case matches a training case when its CT (or, without a CT, its label map) is the same
    file (resolved path) or has the same SHA-256 as the training case's. Hashing only happens
    when the paths differ.

    Args:
        cases: The scored cases.
        training_manifest: The shard folder (or ``manifest.json``) the model was trained on.

    Returns:
        One dict per scored training case: ``case_id``, ``training_case``, ``training_split``
        and ``matched_by`` (``"path"`` or ``"sha256"``), in the order of ``cases``.

    Example:
        >>> find_training_cases(matched, "runs/tam/shards")  # doctest: +SKIP
        [{'case_id': '3', 'training_case': '3', 'training_split': 'train', 'matched_by': 'path'}]
    """
    from keras_livseg.data.prepare import sha256_file

    manifest = _load_manifest(training_manifest)
    by_path: dict[Path, tuple[str, str]] = {}
    by_sha: dict[str, tuple[str, str]] = {}
    for case_id, record in (manifest.get("cases") or {}).items():
        split = record.get("split")
        if split not in _TRAINING_SPLITS:
            continue
        for kind in ("image", "label"):
            path = _source_path(manifest, record.get(kind))
            if path is not None:
                by_path[path.resolve()] = (str(case_id), split)
            if record.get(f"{kind}_sha256"):
                by_sha[f"{kind}:{record[f'{kind}_sha256']}"] = (str(case_id), split)
    found = []
    for case in cases:
        kind, path = ("image", case.image) if case.image is not None else ("label", case.reference)
        hit, how = by_path.get(Path(path).resolve()), "path"
        if hit is None and Path(path).is_file():
            hit, how = by_sha.get(f"{kind}:{sha256_file(Path(path))}"), "sha256"
        if hit is not None:
            found.append({"case_id": case.case_id, "training_case": hit[0], "training_split": hit[1],
                          "matched_by": how})
    if found:
        logger.warning(
            "%d scored case(s) were used in training (%s): %s", len(found), training_manifest,
            ", ".join(f"{f['case_id']} ({f['training_split']})" for f in found),
        )
    return found
