"""``prepare``: CT volumes → windowed, resized TFRecord slice shards and ``manifest.json``.

One pass over the data. Each case is read once, in a worker process, and turned into a
per-case TFRecord file under ``<out>/.work/`` together with a small JSON summary (class
pixel counts, per-slice tumor area, the mergeable foreground statistics of
:class:`~keras_livseg.data.preprocessing.ForegroundStatistics`). When every case is done,
the per-case files are concatenated into shards of about ``shard_mb`` per split, the
standardization statistics are merged from the **training split only**, and
``manifest.json`` is written last, atomically. A folder without a manifest is an unfinished
run; ``--resume`` reuses the per-case files whose sources and parameters are unchanged.

The split is by patient (:func:`split_cases`), stratified on request (``stratify``): each
stratum — a CSV's ``stratum`` column, a phantom case's contrast phase and lesion kind — is
shared among train, val and test in their proportions.

Output is byte-identical for the same inputs and seed, whatever the number of workers.

Example:
    >>> from keras_livseg.data.prepare import PrepareOptions, prepare_dataset
    >>> manifest = prepare_dataset(PrepareOptions(src="phantom/", out="shards/"))  # doctest: +SKIP
    >>> manifest["splits"]["train"]["slices"]  # doctest: +SKIP
    412
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from keras_livseg import __version__
from keras_livseg.data import shards
from keras_livseg.data.atomic import atomic_write_json
from keras_livseg.data.preprocessing import (
    BodyStatistics,
    ForegroundStatistics,
    Preprocessing,
    body_floor,
    merge_foreground,
)
from keras_livseg.data.volumes import CaseFiles, DataError, discover_cases, load_case, parse_label_map

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
WORK_DIR = ".work"
#: In the work folder while an --overwrite run has not yet replaced the finished run beside it:
#: --resume then continues that run instead of comparing itself with the old manifest.
REPLACING = "replacing"
SPLITS = ("train", "val", "test")
SLICE_SELECTIONS = ("all", "liver")
_CHUNK_SLICES = 32  # slices windowed and resized at once: bounds float32 temporaries


@dataclasses.dataclass
class PrepareOptions:
    """Everything ``prepare`` needs; the CLI and recipes fill it.

    Attributes:
        src: dataset folder (LiTS or MSD layout) or CSV of pairs.
        out: output folder for shards and manifest.
        window: HU window.
        image_size: model input size (square int or ``(height, width)``).
        context: adjacent slices stacked as channels (odd).
        normalization: ``"foreground"`` (training-split foreground statistics), ``"volume"`` or ``"none"``.
        spacing_mm: resample slices in-plane to this pixel spacing (mm) before the centre
            crop/pad to ``image_size``; ``None`` resizes whatever the spacing.
        context_mm: take the context slices this far apart (mm, the nearest whole number of
            slices); ``None`` takes adjacent slices whatever their thickness.
        slices: ``"all"`` or ``"liver"`` (slices with liver plus ``margin`` on each side).
        margin: slices kept beyond the liver in ``"liver"`` mode.
        split: fractions of cases for train, val, test (by patient).
        seed: seed of the patient-level split.
        stratify: share each stratum (a CSV's ``stratum`` column, a phantom's contrast phase
            and lesion kind) among train, val and test in the split's proportions
            (:func:`split_cases`); a source that names no stratum is split as usual.
        assignment: explicit split of every case, ``{case_id: "train"|"val"|"test"}`` (a
            cross-validation fold); overrides ``split`` when given.
        label_map: ``"SRC:DST,..."`` remapping of foreign label maps.
        compression: ``None`` or ``"GZIP"``.
        shard_mb: target shard size in MB (uncompressed).
        workers: worker processes (0 = one per CPU, at most 4).
        on_error: ``"stop"`` on the first bad case, or ``"skip"`` it and record why in the manifest.
        overwrite: replace an existing finished output.
        resume: continue an interrupted run, redoing only missing cases.
        progress: show a progress bar (on a terminal).
    """

    src: str | Path
    out: str | Path
    window: Sequence[float] = (-200.0, 250.0)
    image_size: int | Sequence[int] = 256
    context: int = 1
    normalization: str = "foreground"
    spacing_mm: float | None = None
    context_mm: float | None = None
    slices: str = "all"
    margin: int = 5
    split: Sequence[float] = (0.7, 0.15, 0.15)
    seed: int = 0
    stratify: bool = False
    assignment: Mapping[str, str] | None = None
    label_map: str | None = None
    compression: str | None = None
    shard_mb: float = 150.0
    workers: int = 0
    on_error: str = "stop"
    overwrite: bool = False
    resume: bool = False
    progress: bool = True

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            window=tuple(self.window),
            image_size=self.image_size,  # type: ignore[arg-type]
            context=int(self.context),
            normalization=self.normalization,
            spacing_mm=self.spacing_mm,
            context_mm=self.context_mm,
        )

    def strata(self, cases: Sequence[CaseFiles]) -> dict[str, str] | None:
        """The cases' strata when the split is to be stratified (an explicit assignment is not), else None.

        Raises:
            DataError: ``stratify`` with some cases that name a stratum and some that do not.
        """
        return case_strata(cases, self.src) if self.stratify and self.assignment is None else None

    def validate(self) -> None:
        if self.slices not in SLICE_SELECTIONS:
            raise DataError(f"slices must be one of {SLICE_SELECTIONS}, got {self.slices!r}")
        if self.margin < 0:
            raise DataError(f"margin must be >= 0 slices, got {self.margin}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or not self.split[0] > 0:
            raise DataError(f"split must be three fractions train,val,test with train > 0, got {list(self.split)}")
        if not isinstance(self.stratify, bool):  # "flase" in a recipe would otherwise read as true
            raise DataError(f"stratify must be true or false, got {self.stratify!r}")
        if self.compression not in (None, "", "GZIP"):
            raise DataError(f"compression must be none or GZIP, got {self.compression!r}")
        if self.on_error not in ("stop", "skip"):
            raise DataError(f"on_error must be 'stop' or 'skip', got {self.on_error!r}")
        if self.assignment is not None:
            wrong = sorted({v for v in self.assignment.values() if v not in SPLITS})
            if wrong:
                raise DataError(f"assignment names splits {wrong}; use {', '.join(SPLITS)}")
        if self.shard_mb <= 0:
            raise DataError(f"shard size must be positive, got {self.shard_mb} MB")
        try:
            self.preprocessing()
        except ValueError as error:
            raise DataError(str(error)) from None

    def case_parameters(self) -> dict[str, Any]:
        """The parameters a per-case file depends on (resume reuses it only if they match)."""
        prep = self.preprocessing()
        parameters = {
            "window": list(prep.window),
            "image_size": list(prep.image_size),
            "context": prep.context,
            "spacing_mm": prep.spacing_mm,
            "slices": self.slices,
            "margin": self.margin,
            "label_map": parse_label_map(self.label_map),
        }
        if prep.context_mm is not None:  # absent otherwise, so that files from before it still resume
            parameters["context_mm"] = prep.context_mm
        return parameters


def sha256_file(path: Path) -> str:
    """SHA-256 of a file; of a folder (a DICOM series), of its files' names and bytes in name order."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _person_strata(owner: Mapping[str, str], strata: Mapping[str, str] | None) -> dict[str, str] | None:
    """Each patient's stratum: that of their first case in id order (a patient's scans share one split).

    ``None`` without strata, or when every patient is in one stratum (then stratifying changes
    nothing, and the split is the unstratified one for the seed).

    Raises:
        DataError: a case has no stratum.
    """
    if strata is None:
        return None
    missing = [cid for cid in sorted(owner) if cid not in strata]
    if missing:
        raise DataError(f"case(s) {', '.join(missing[:5])} have no stratum; give every case one or none")
    by_person: dict[str, str] = {}
    for cid in sorted(owner):
        first = by_person.setdefault(owner[cid], str(strata[cid]))
        if first != str(strata[cid]):
            logger.warning("patient %s has scans in strata %r and %r; the split counts the patient in %r",
                           owner[cid], first, strata[cid], first)
    return by_person if len(set(by_person.values())) > 1 else None


def _stratum_counts(sizes: Mapping[str, int], parts: Mapping[str, int], rng: np.random.Generator) -> dict[str, dict[str, int]]:
    """How many patients of each stratum go to each part: every count the floor or the ceiling of
    the stratum's share, each stratum's counts summing to its size and each part's to its size.

    Such a rounding always exists (the shares form a table whose rows and columns sum to integers;
    a flow through it is integral). The floors are taken first; the remaining patients are matched
    to parts by augmenting paths over the (stratum, part) pairs whose share has a fraction, tried
    in a seeded random order, so the seed decides which strata round up where.
    """
    total = sum(sizes.values())
    counts = {name: {part: (size * want) // total for part, want in parts.items()} for name, size in sizes.items()}
    open_pairs = [(name, part) for name, size in sizes.items() for part, want in parts.items() if (size * want) % total]
    options: dict[str, list[str]] = {name: [] for name in sizes}
    for index in rng.permutation(len(open_pairs)):
        name, part = open_pairs[int(index)]
        options[name].append(part)
    room = {part: want - sum(counts[name][part] for name in sizes) for part, want in parts.items()}
    taken: dict[str, list[str]] = {part: [] for part in parts}  # strata rounded up in each part

    def place(name: str, seen: set[str]) -> bool:
        for part in options[name]:
            if part in seen or name in taken[part]:
                continue
            seen.add(part)
            if len(taken[part]) < room[part]:
                taken[part].append(name)
                return True
            for other in list(taken[part]):  # make room: move another stratum's extra patient elsewhere
                taken[part].remove(other)
                if place(other, seen):
                    taken[part].append(name)
                    return True
                taken[part].append(other)
        return False

    for name in [sorted(sizes)[int(i)] for i in rng.permutation(len(sizes))]:
        for _ in range(sizes[name] - sum(counts[name].values())):
            if not place(name, set()):  # cannot happen (see above); a bug if it does
                raise RuntimeError(f"no rounding of the strata {dict(sizes)} into parts {dict(parts)}")
    for part, names in taken.items():
        for name in names:
            counts[name][part] += 1
    return counts


def split_cases(
    case_ids: Sequence[str], fractions: Sequence[float], seed: int, patients: Mapping[str, str] | None = None,
    strata: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Patient-level split: each patient (with all their cases) goes to exactly one of train, val, test.

    Val and test get ``round(fraction * n_patients)`` patients each, train at least one; the
    assignment depends only on the sorted ids and the seed. ``patients`` maps case id →
    patient id (default: every case is its own patient).

    ``strata`` (case id → a group such as the contrast phase) stratifies the split, as
    scikit-learn's stratified splits do: the same split sizes, and each stratum's patients shared
    among train, val and test in those proportions, rounded down or up, so that a rare kind of
    case cannot fall mostly into one split by chance. A patient counts in the stratum of their
    first case. One stratum for everyone is no stratification.

    Raises:
        DataError: ``strata`` misses a case.

    Example:
        >>> parts = split_cases([str(i) for i in range(10)], (0.8, 0.1, 0.1), seed=0)
        >>> [len(parts[s]) for s in ("train", "val", "test")]
        [8, 1, 1]
        >>> split_cases(["a1", "a2", "b"], (0.5, 0.0, 0.5), 0, {"a1": "A", "a2": "A", "b": "B"})["test"] in (["a1", "a2"], ["b"])
        True
        >>> kinds = {str(i): "rare" if i < 4 else "common" for i in range(20)}
        >>> sum(kinds[c] == "rare" for c in split_cases(list(kinds), (0.5, 0.0, 0.5), 0, strata=kinds)["test"])
        2
    """
    ids = sorted(case_ids)
    owner = {cid: (patients or {}).get(cid) or cid for cid in ids}
    people = sorted(set(owner.values()))
    total = sum(fractions)
    person_strata = _person_strata(owner, strata)
    rng = np.random.default_rng(seed)
    n_val = int(round(fractions[1] / total * len(people)))
    n_test = int(round(fractions[2] / total * len(people)))
    while n_val + n_test >= len(people) and (n_val or n_test):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    if person_strata is None:
        order = rng.permutation(len(people))
        val_people = {people[i] for i in order[:n_val]}
        test_people = {people[i] for i in order[n_val : n_val + n_test]}
    else:
        groups: dict[str, list[str]] = {}
        for person in people:
            groups.setdefault(person_strata[person], []).append(person)
        counts = _stratum_counts({name: len(groups[name]) for name in sorted(groups)},
                                 {"val": n_val, "test": n_test, "train": len(people) - n_val - n_test}, rng)
        val_people, test_people = set(), set()
        for name in sorted(groups):
            members = [groups[name][int(i)] for i in rng.permutation(len(groups[name]))]
            val_people.update(members[:counts[name]["val"]])
            test_people.update(members[counts[name]["val"]:counts[name]["val"] + counts[name]["test"]])
    val = [i for i in ids if owner[i] in val_people]
    test = [i for i in ids if owner[i] in test_people]
    train = [i for i in ids if owner[i] not in val_people | test_people]
    return {"train": train, "val": val, "test": test}


def assign_folds(
    case_ids: Sequence[str], folds: int, seed: int = 0, patients: Mapping[str, str] | None = None,
    strata: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Cross-validation folds by patient: ``folds`` lists of case ids, no patient in two folds.

    Patients are shuffled with ``seed`` and dealt round-robin, so fold sizes differ by at most
    one patient. ``folds`` equal to the number of patients gives leave-one-patient-out. With
    ``strata`` (case id → group) each stratum's patients are dealt one after another, so every
    fold holds its share of each (to within one patient).

    Raises:
        DataError: fewer than 2 folds, or more folds than patients (the message says how many
            patients there are and what to pass).

    Example:
        >>> assign_folds(["1", "7"], 2, seed=0) in ([["1"], ["7"]], [["7"], ["1"]])
        True
    """
    ids = sorted(case_ids)
    owner = {cid: (patients or {}).get(cid) or cid for cid in ids}
    people = sorted(set(owner.values()))
    if folds < 2:
        raise DataError(f"--folds must be at least 2 (2 = two halves; {len(people)} = leave one patient out), got {folds}")
    if folds > len(people):
        raise DataError(
            f"--folds {folds} needs at least {folds} patients but the data holds {len(people)} "
            f"({', '.join(people[:8])}{' ...' if len(people) > 8 else ''}); pass --folds {len(people)} "
            "(leave one patient out) or fewer"
        )
    person_strata = _person_strata(owner, strata)
    rng = np.random.default_rng(seed)
    if person_strata is None:
        order = [int(i) for i in rng.permutation(len(people))]
    else:  # the strata in random order, each one's patients shuffled together: dealt out evenly
        groups: dict[str, list[int]] = {}
        for index, person in enumerate(people):
            groups.setdefault(person_strata[person], []).append(index)
        order = []
        for name in [sorted(groups)[int(i)] for i in rng.permutation(len(groups))]:
            order += [groups[name][int(i)] for i in rng.permutation(len(groups[name]))]
    fold_of = {people[index]: position % folds for position, index in enumerate(order)}
    return [[cid for cid in ids if fold_of[owner[cid]] == fold] for fold in range(folds)]


def _selected_slices(labels: np.ndarray, mode: str, margin: int) -> np.ndarray:
    count = labels.shape[2]
    if mode == "all":
        return np.arange(count)
    has_liver = np.flatnonzero(labels.reshape(-1, count).any(axis=0))
    if has_liver.size == 0:
        return has_liver
    return np.arange(max(has_liver[0] - margin, 0), min(has_liver[-1] + margin + 1, count))


def _window_resize_volume(
    image: np.ndarray, labels: np.ndarray, prep: Preprocessing, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, float, float, ForegroundStatistics]:
    """Window + resize every slice, chunk by chunk, in one pass over the volume.

    With ``prep.spacing_mm`` the slices are resampled to that spacing from ``spacing`` (the
    volume's ``(row, col)`` mm) and centre-cropped/padded, exactly as
    :meth:`Preprocessing.slices_to_model_grid` does.

    Returns the resized volume ``[n_slices, H, W]`` (float16), the volume's body statistics
    (for per-volume normalization, exactly as ``predict`` computes them) and the foreground
    statistics (the voxels nnU-Net samples), both on the native grid.
    """
    count = image.shape[2]
    height, width = prep.image_size
    # float16 as in the shards: the same bytes get written, at half the memory of float32.
    resized = np.empty((count, height, width), dtype=shards.IMAGE_DTYPE)
    body = BodyStatistics(body_floor(image, prep.window))
    stats = ForegroundStatistics(prep.window)
    # Slices first: NIfTI data is Fortran-ordered, so each canonical slice is contiguous.
    slices_first = np.moveaxis(image, 2, 0)
    labels_first = np.moveaxis(labels, 2, 0)
    for start in range(0, count, _CHUNK_SLICES):
        chunk = prep.window_hu(slices_first[start : start + _CHUNK_SLICES])
        foreground = labels_first[start : start + _CHUNK_SLICES] > 0
        if foreground.any():
            stats.update(chunk[foreground])
        body.update(chunk)
        resized[start : start + _CHUNK_SLICES] = prep.stack_to_model_grid(chunk, spacing)
    mean, std = body.result()
    return resized, mean, std, stats


def process_case(files: CaseFiles, options: PrepareOptions, work_dir: Path) -> dict[str, Any]:
    """Read one case and write its examples to ``work_dir/<id>.tfrecord`` plus a summary JSON.

    Returns the summary: sources with SHA-256, shapes, slices written, class pixel counts,
    per-slice tumor/liver areas and the case's foreground statistics (with histogram).
    """
    prep = options.preprocessing()
    case = load_case(files, parse_label_map(options.label_map))
    if case.labels is None:
        raise DataError(f"{files.image} has no segmentation; prepare needs labelled cases")
    resized, volume_mean, volume_std, stats = _window_resize_volume(case.image, case.labels, prep, case.spacing)
    selected = _selected_slices(case.labels, options.slices, options.margin)
    count = case.image.shape[2]
    class_pixels = np.zeros(3, dtype=np.int64)
    tumor_pixels: list[int] = []
    liver_pixels: list[int] = []
    record_path = work_dir / f"{files.case_id}.tfrecord"
    with shards.TFRecordWriter(record_path, digest=False) as writer:  # a work file: nobody asks its hash
        try:
            offsets = prep.context_offsets(case.spacing[2])
        except ValueError as error:
            raise DataError(f"{files.image}: {error}") from None
        for index in selected:
            picks = np.clip(index + offsets, 0, count - 1)
            mask = prep.labels_to_model_grid(case.labels[:, :, index], case.spacing)
            counts = np.bincount(mask.ravel(), minlength=3)[:3]
            class_pixels += counts
            tumor_pixels.append(int(counts[2]))
            liver_pixels.append(int(counts[1] + counts[2]))
            writer.write(
                shards.slice_example(np.moveaxis(resized[picks], 0, -1), mask, files.case_id, int(index), volume_mean, volume_std)
            )
    summary = {
        "case_id": files.case_id,
        "image": str(files.image),
        "image_sha256": sha256_file(files.image),
        "label": str(files.label),
        "label_sha256": sha256_file(files.label) if files.label else None,
        "parameters": options.case_parameters(),
        "shape": list(case.image.shape),
        "spacing": [round(float(s), 6) for s in case.spacing],
        "slices_total": int(case.image.shape[2]),
        "slice_indices": [int(i) for i in selected],
        "tumor_pixels": tumor_pixels,
        "liver_pixels": liver_pixels,
        "class_pixels": [int(c) for c in class_pixels],
        "record_bytes": record_path.stat().st_size,
        "volume_statistics": {"mean": volume_mean, "std": volume_std},
        "foreground": {
            "count": stats.count,
            "total": stats.total,
            "total_sq": stats.total_sq,
            "histogram": stats.histogram.tolist(),
        },
    }
    atomic_write_json(work_dir / f"{files.case_id}.json", summary, sort_keys=True)
    return summary


def _worker(arguments: tuple[CaseFiles, PrepareOptions, Path]) -> tuple[str, dict | None, str | None]:
    files, options, work_dir = arguments
    try:
        return files.case_id, process_case(files, options, work_dir), None
    except DataError as error:
        return files.case_id, None, str(error)
    except MemoryError:
        return files.case_id, None, f"{files.image} does not fit in memory; use fewer --workers"


def _reusable_summary(files: CaseFiles, options: PrepareOptions, work_dir: Path) -> dict | None:
    summary_path = work_dir / f"{files.case_id}.json"
    record_path = work_dir / f"{files.case_id}.tfrecord"
    if not (summary_path.is_file() and record_path.is_file()):
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (
        summary.get("parameters") == json.loads(json.dumps(options.case_parameters()))
        and summary.get("image_sha256") == sha256_file(files.image)
        and summary.get("record_bytes") == record_path.stat().st_size
    )
    return summary if same else None


def _finished_run_differences(manifest: Mapping[str, Any], options: PrepareOptions, case_ids: set[str],
                              strata: Mapping[str, str] | None = None) -> list[str]:
    """What a finished run's manifest says differently from the run asked for (empty: the same)."""
    prep = manifest.get("preprocessing", {})
    asked = options.preprocessing().to_dict()
    differences = [
        f"preprocessing.{key} {prep.get(key)!r} (asked {asked[key]!r})"
        for key in ("window", "image_size", "context", "normalization", "spacing_mm", "context_mm")
        if json.loads(json.dumps(prep.get(key))) != json.loads(json.dumps(asked[key]))
    ]
    checks = {
        "source": (manifest.get("source"), str(Path(options.src).resolve())),
        "slices": (manifest.get("selection", {}).get("slices"), options.slices),
        "margin": (manifest.get("selection", {}).get("margin"), options.margin),
        "label_map": (manifest.get("label_map"), parse_label_map(options.label_map)),
        "split": (manifest.get("split", {}).get("fractions"), list(options.split)),
        "seed": (manifest.get("split", {}).get("seed"), options.seed),
        "stratify": (manifest.get("split", {}).get("stratify", False), options.stratify),
        "compression": (manifest.get("compression"), options.compression or None),
    }
    for key, (done, wanted) in checks.items():
        if json.loads(json.dumps(done, default=str)) != json.loads(json.dumps(wanted, default=str)):
            differences.append(f"{key} {done!r} (asked {wanted!r})")
    finished = set(manifest.get("cases", {})) | {s["case_id"] for s in manifest.get("skipped", [])}
    if case_ids != finished:
        differences.append(f"cases: {len(case_ids - finished)} new and {len(finished - case_ids)} gone in the source")
    # A stratum edited in the CSV since moves cases between splits: not the same run.
    changed = sorted(cid for cid, record in manifest.get("cases", {}).items()
                     if record.get("stratum") != (strata or {}).get(cid))
    if changed:
        differences.append(f"strata of {len(changed)} case(s) ({', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''})")
    return differences


def _check_output(out: Path, options: PrepareOptions, case_ids: set[str], strata: Mapping[str, str] | None) -> bool:
    """Make ``out`` ready for a run; True when ``--resume`` finds the same run already complete."""
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        if options.resume and not options.overwrite and (out / WORK_DIR / REPLACING).exists():
            return False  # an --overwrite run stopped before it replaced the finished one: continue it
        if options.resume and not options.overwrite:
            # A scheduler simply reruns a job: a finished identical run is success, not an error.
            differences = _finished_run_differences(json.loads(manifest.read_text()), options, case_ids, strata)
            if not differences:
                return True
            raise DataError(
                f"{out} holds a finished prepare run that differs from this one ({'; '.join(differences)}); "
                "pass --overwrite to replace it or choose another --out"
            )
        if not options.overwrite:
            raise DataError(f"{manifest} already exists; pass --overwrite to replace it or choose another --out")
        # The finished run stays until every new case has been read (remove_finished_run): a bad
        # case that stops this run then leaves the old shards as they were.
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    elif (out / WORK_DIR).exists() and not (options.resume or options.overwrite):
        raise DataError(
            f"{out} holds an unfinished prepare run; pass --resume to continue it or --overwrite to start again"
        )
    elif options.overwrite:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return False


def remove_finished_run(out: Path) -> None:
    """Delete the finished run that ``--overwrite`` replaces: its manifest, then the shards it lists.

    Called once every case of the new run has been read and split, just before the new shards
    are written. The manifest goes first: from then on the folder reads as unfinished, never as
    stale-but-finished. Files the manifest does not list are never touched (without a manifest,
    nothing is removed).
    """
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        return
    try:
        shards = [name for split in json.loads(manifest.read_text()).get("splits", {}).values()
                  for name in split.get("shards", [])]
    except (ValueError, AttributeError):
        shards = []  # unreadable: the new run's shards replace whatever has the same names
    manifest.unlink()
    for name in shards:
        (out / Path(name).name).unlink(missing_ok=True)


def _progress(iterable: Iterable, total: int, enabled: bool, description: str) -> Iterable:
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=description, unit="case")
    return iterable


def _pool_context() -> multiprocessing.context.BaseContext:
    # Forking a process that has TensorFlow loaded is unsafe; spawn then (prepare's own CLI never loads it).
    return multiprocessing.get_context("spawn" if "tensorflow" in sys.modules else "fork")


def _run_cases(todo: list[CaseFiles], options: PrepareOptions, work_dir: Path) -> Iterable[tuple]:
    workers = options.workers or min(os.cpu_count() or 1, 4)
    workers = max(1, min(workers, len(todo)))
    jobs = [(files, options, work_dir) for files in todo]
    if workers == 1:
        yield from map(_worker, jobs)
        return
    with _pool_context().Pool(workers, maxtasksperchild=8) as pool:
        yield from pool.imap(_worker, jobs, chunksize=1)


def plan_split_shards(split: str, summaries: Sequence[Mapping[str, Any]], options: PrepareOptions) -> list[tuple[str, list[str]]]:
    """Shards of one split, cases kept whole: ``[(shard name, [case id, ...]), ...]`` of about ``shard_mb`` each."""
    counts = shards.plan_shards([s["record_bytes"] for s in summaries], int(options.shard_mb * 1e6))
    plan = []
    position = 0
    for shard_index, count in enumerate(counts):
        name = shards.shard_name(split, shard_index, len(counts), options.compression or None)
        plan.append((name, [s["case_id"] for s in summaries[position : position + count]]))
        position += count
    return plan


def write_shard(out: Path, work_dir: Path, name: str, case_ids: Sequence[str], compression: str | None) -> dict[str, Any]:
    """Concatenate the per-case record files of ``case_ids`` into ``out/name``.

    Uncompressed shards are the case files' bytes one after the other (TFRecord framing is
    self-contained); GZIP shards take the records one by one into the compressed stream.
    Returns ``{"name", "sha256", "bytes", "cases"}`` of the written shard, as the manifest lists them.
    """
    with shards.TFRecordWriter(out / name, compression or None) as writer:
        for case_id in case_ids:
            if compression:
                for record in shards.read_records(work_dir / f"{case_id}.tfrecord"):
                    writer.write(record)
            else:
                writer.append_file(work_dir / f"{case_id}.tfrecord")
    return {"name": name, "sha256": writer.sha256, "bytes": (out / name).stat().st_size, "cases": list(case_ids)}


def case_strata(cases: Sequence[CaseFiles], source: str | Path) -> dict[str, str] | None:
    """Each case's stratum, for a stratified split or folds; ``None`` when no case names one.

    A source without strata (a LiTS folder of real scans) is split as usual, with a warning:
    the demo's recipe stratifies its phantom, and ``fit --data DIR`` keeps that recipe.

    Raises:
        DataError: some cases name a stratum and others do not (the message says which).
    """
    missing = [c.case_id for c in cases if not c.stratum]
    if len(missing) == len(cases):
        logger.warning("no stratum to stratify by in %s (a CSV's 'stratum' column, or a phantom's phantom.json): "
                       "the split is not stratified", source)
        return None
    if missing:
        raise DataError(
            f"a stratified split needs every case's stratum, and {len(missing)} case(s) have none "
            f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}) in {source}; give each one (a CSV's "
            "'stratum' column; a phantom's phantom.json, written again by python -m keras_livseg.phantom) or split "
            "unstratified (prepare without --stratify; fit: --set data.stratify=false)"
        )
    return {c.case_id: str(c.stratum) for c in cases}


def assign_splits(options: PrepareOptions, order: Sequence[str], patients: Mapping[str, str],
                  strata: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """The split of the prepared cases ``order``: the explicit assignment, else by patient with
    the seed (stratified by ``strata``, :meth:`PrepareOptions.strata`'s, when given).

    Raises:
        DataError: the assignment misses a case or leaves train empty.
    """
    if options.assignment is None:
        splits = split_cases(order, options.split, options.seed, patients, strata)
        for split, fraction in zip(SPLITS, options.split):
            if fraction > 0 and not splits[split]:
                count = len({patients.get(cid, cid) for cid in order})
                logger.warning("the %s split gets no case: %g of %d patient(s) rounds to none; give it a larger "
                               "fraction, or more cases, or measure with fit --folds", split, fraction, count)
        return splits
    missing = [cid for cid in order if cid not in options.assignment]
    if missing:
        raise DataError(f"the split assignment has no entry for cases {', '.join(missing[:8])}; assign every case")
    splits = {split: [cid for cid in order if options.assignment[cid] == split] for split in SPLITS}
    if not splits["train"]:
        raise DataError("the split assignment puts no case in train; a model needs training cases")
    return splits


def standardized_preprocessing(options: PrepareOptions, foreground: ForegroundStatistics) -> Preprocessing:
    """The manifest's preprocessing: with the training split's foreground mean and std where asked.

    Raises:
        DataError: foreground normalization with no foreground voxel in the training split.
    """
    prep = options.preprocessing()
    if prep.normalization != "foreground":
        return prep
    if foreground.count == 0:
        raise DataError("the training split has no foreground (label > 0) voxels; check the labels or --label-map")
    return prep.with_statistics(foreground.mean, foreground.std)


def split_record(members: Sequence[Mapping[str, Any]], written: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One split's entry in the manifest, from its cases' summaries and its written shards."""
    return {
        "cases": [m["case_id"] for m in members],
        "slices": int(sum(len(m["slice_indices"]) for m in members)),
        "shards": [w["name"] for w in written],
        # Checked before training (verify_shards): a shard changed since is named, not read.
        "shard_sha256": {w["name"]: w["sha256"] for w in written},
        "shard_bytes": {w["name"]: w["bytes"] for w in written},
        # Which cases each shard holds: workers that read their own shards know their slices.
        "shard_cases": {w["name"]: w["cases"] for w in written},
        "class_pixels": [int(sum(m["class_pixels"][k] for m in members)) for k in range(3)],
        "tumor_slices": int(sum(sum(1 for t in m["tumor_pixels"] if t > 0) for m in members)),
    }


_CASE_KEYS = (
    "image", "image_sha256", "label", "label_sha256", "shape", "spacing", "slices_total",
    "slice_indices", "tumor_pixels", "liver_pixels", "class_pixels", "volume_statistics",
)


def build_manifest(
    options: PrepareOptions,
    prep: Preprocessing,
    foreground: ForegroundStatistics,
    splits: Mapping[str, Sequence[str]],
    split_info: Mapping[str, Any],
    by_id: Mapping[str, Mapping[str, Any]],
    patients: Mapping[str, str],
    skipped: Sequence[Mapping[str, str]],
    strata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The manifest of a finished run; every engine writes exactly this.

    ``by_id`` holds the prepared cases' summaries in the source's case order.
    """
    return {
        "format_version": FORMAT_VERSION,
        "tool": "keras_livseg",
        "tool_version": __version__,
        "source": str(Path(options.src).resolve()),
        "preprocessing": prep.to_dict(),
        "selection": {"slices": options.slices, "margin": options.margin},
        "label_map": parse_label_map(options.label_map),
        "split": {"fractions": list(options.split), "seed": options.seed,
                  "assignment": dict(options.assignment) if options.assignment is not None else None,
                  "stratify": bool(options.stratify),
                  # None when not stratified (not asked, an explicit assignment, or no stratum named).
                  # How many cases of each stratum each split holds: the check that they are shared out.
                  "strata": None if strata is None else {
                      split: dict(sorted(Counter(strata[cid] for cid in splits[split]).items())) for split in SPLITS}},
        "compression": options.compression or None,
        "statistics": {"computed_on": "train", "foreground": foreground.to_dict()},
        "splits": dict(split_info),
        "cases": {
            cid: {key: by_id[cid][key] for key in _CASE_KEYS}
            | {"split": next(s for s in SPLITS if cid in splits[s]), "patient": patients[cid]}
            | ({"stratum": strata[cid]} if strata is not None else {})
            for cid in by_id
        },
        "skipped": list(skipped),
    }


def start_run(options: PrepareOptions) -> tuple[Path, list[CaseFiles], dict[str, dict] | None, dict[str, str] | None]:
    """Validate, find the cases and make ``out`` ready: ``(out, cases, reused summaries, strata)``.

    The summaries are ``None`` when ``--resume`` finds the same run already complete. The strata
    are :meth:`PrepareOptions.strata`'s (checked here, before any case is read).
    """
    options.validate()
    out = Path(options.out)
    all_cases = discover_cases(options.src)
    strata = options.strata(all_cases)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    if _check_output(out, options, {c.case_id for c in all_cases}, strata):
        logger.info("%s is already complete (same source, cases and parameters): nothing to do", out / MANIFEST_NAME)
        return out, all_cases, None, strata
    work_dir = out / WORK_DIR
    work_dir.mkdir(exist_ok=True)
    if (out / MANIFEST_NAME).exists():
        (work_dir / REPLACING).touch()
    reused: dict[str, dict] = {}
    if options.resume:
        for files in all_cases:
            summary = _reusable_summary(files, options, work_dir)
            if summary is not None:
                reused[files.case_id] = summary
        logger.info("resume: %d cases done before, %d to do", len(reused), len(all_cases) - len(reused))
    return out, all_cases, reused, strata


def finish_run(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest last, atomically, then drop the per-case work files."""
    atomic_write_json(out / MANIFEST_NAME, manifest, sort_keys=True)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    manifest["_dir"] = str(out)  # as load_manifest sets it; not part of the file
    info = manifest["splits"]
    logger.info(
        "wrote %s: %s",
        out / MANIFEST_NAME,
        ", ".join(f"{s} {info[s]['slices']} slices / {len(info[s]['cases'])} cases" for s in SPLITS),
    )
    return manifest


def prepare_dataset(options: PrepareOptions) -> dict[str, Any]:
    """Run ``prepare`` with local worker processes and return the manifest (also ``<out>/manifest.json``).

    Raises:
        DataError: any bad input, with the file and the fix in the message.
    """
    out, all_cases, summaries, strata = start_run(options)
    if summaries is None:
        return load_manifest(out)
    work_dir = out / WORK_DIR
    todo = [files for files in all_cases if files.case_id not in summaries]
    skipped: list[dict[str, str]] = []
    for case_id, summary, error in _progress(_run_cases(todo, options, work_dir), len(todo), options.progress, "prepare"):
        if error is not None:
            if options.on_error == "stop":
                raise DataError(error)
            logger.warning("skipping case %s: %s", case_id, error)
            skipped.append({"case_id": case_id, "reason": error})
            continue
        summaries[case_id] = summary

    if not summaries:
        raise DataError(f"every case in {options.src} was skipped; see the warnings above")
    by_id = {c.case_id: summaries[c.case_id] for c in all_cases if c.case_id in summaries}
    patients = {c.case_id: c.patient for c in all_cases}
    splits = assign_splits(options, list(by_id), patients, strata)
    foreground = merge_foreground(options.preprocessing().window, (by_id[cid]["foreground"] for cid in splits["train"]))
    prep = standardized_preprocessing(options, foreground)
    members = {split: [by_id[cid] for cid in splits[split]] for split in SPLITS}
    plans = {split: plan_split_shards(split, members[split], options) for split in SPLITS}
    remove_finished_run(out)
    # Shards are written by threads, two at a time: copying, hashing (hashlib lets go of the
    # GIL) and fsync of one overlap with the next instead of running one after another.
    with ThreadPoolExecutor(max_workers=2) as threads:
        written = {split: [threads.submit(write_shard, out, work_dir, name, case_ids, options.compression)
                           for name, case_ids in plans[split]] for split in SPLITS}
        try:
            split_info = {split: split_record(members[split], [job.result() for job in written[split]])
                          for split in SPLITS}
        except BaseException:  # one shard failed, or Ctrl-C: the queued ones are not started
            threads.shutdown(cancel_futures=True)
            raise
    return finish_run(out, build_manifest(options, prep, foreground, splits, split_info, by_id, patients, skipped, strata))


def prepare_in_fresh_process(options: PrepareOptions) -> dict[str, Any]:
    """Run :func:`prepare_dataset` in a new interpreter and return its manifest.

    For callers that have TensorFlow loaded (``fit``, notebooks, scripts): forking such a
    process is unsafe, and spawned workers would re-run the caller's ``__main__`` script.
    A fresh ``python -c`` process without TensorFlow forks its workers safely.

    Raises:
        DataError: prepare refused the input (its one-line message is passed on).
    """
    import subprocess

    payload = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(options).items()})
    code = (
        "import json, sys\n"
        "from keras_livseg.data.prepare import PrepareOptions, prepare_dataset\n"
        "from keras_livseg.data.volumes import DataError\n"
        "try:\n"
        "    prepare_dataset(PrepareOptions(**json.loads(sys.argv[1])))\n"
        "except DataError as error:\n"
        "    print(error, file=sys.stderr)\n"
        "    sys.exit(2)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, payload], stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise DataError(lines[-1] if lines else f"prepare failed with exit status {result.returncode}")
    return load_manifest(options.out)


def verify_shards(manifest: Mapping[str, Any], splits: Sequence[str] = SPLITS) -> int:
    """Check that every shard of ``splits`` is the one ``prepare`` wrote (size, then SHA-256).

    Returns:
        The number of shards checked (0 for a manifest from before checksums were recorded).

    Raises:
        DataError: a shard is missing or changed; the message names it and the fix.
    """
    folder = Path(manifest["_dir"])
    checked = 0
    for split in splits:
        info = manifest["splits"].get(split, {})
        digests, sizes = info.get("shard_sha256"), info.get("shard_bytes", {})
        if digests is None:
            continue
        for name, digest in digests.items():
            path = folder / name
            fix = f"run prepare again on the source with --out {folder} --overwrite"
            if not path.is_file():
                raise DataError(f"shard {path} listed in the manifest is missing; {fix}")
            if name in sizes and path.stat().st_size != sizes[name]:
                raise DataError(f"shard {path} has {path.stat().st_size} bytes, the manifest says {sizes[name]}: it changed after prepare; {fix}")
            if sha256_file(path) != digest:
                raise DataError(f"shard {path} does not match its SHA-256 in the manifest: it changed after prepare; {fix}")
            checked += 1
    return checked


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` from a shard folder (or the file itself), with a clear error."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.is_file():
        raise DataError(
            f"{manifest_path} not found: {path} is not a finished prepare output; "
            "run python -m keras_livseg.prepare --src DATA --out DIR (or --resume it)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{manifest_path} is not valid JSON ({error}); run prepare again with --overwrite") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path} has format version {manifest.get('format_version')}, this tool reads "
            f"{FORMAT_VERSION}; run prepare again with --overwrite"
        )
    manifest["_dir"] = str(manifest_path.parent)
    return manifest
