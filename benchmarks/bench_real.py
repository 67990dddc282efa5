"""Real CT: the demo over seeds, sim-to-real, and leave-one-patient-out fine-tuning (issue 8).

Three parts, each printing a table and writing ``benchmarks/results/real_ct.json`` (parts
already measured are kept, so they can run one at a time):

- ``demo``: ``python -m keras_livseg.fit`` (the phantom demo) with training seeds 0, 1, 2: wall
  time and held-out phantom Dice on whole volumes (goal: liver >= 0.95, tumour >= 0.75, <= 5 min),
  and each model's Dice on 48 phantom cases of a seed no recipe trains on (``UNSEEN_PHANTOM``):
  the same cases for every recipe, whose own test split changes with its phantom size.
- ``fresh``: the demo once more as a newcomer runs it, with an empty cache (the phantom is
  generated, prepared and trained on in the timed run): the wall time the <= 5 min goal is about.
- ``sim2real``: the demo models (one per seed), phantom only, on the real scans in ../shared/data/real
  (3D-IRCADb patients 1 and 7, the TotalSegmentator crop with liver = label 5): liver Dice per
  scan (goal >= 0.90), each model alone and the seeds' ensemble (probabilities averaged, as
  ``predict --model A --model B ...`` does).
- ``lopo``: ``pipelines/ircadb_finetune.toml`` with ``--folds 2`` on the two IRCAD patients,
  warm-started from the seed-0 demo model: liver and tumour Dice per held-out patient
  (goals >= 0.93 and >= 0.60).
- ``ablation``: the demo with recipe changes (``--set KEY=VALUE``, as ``fit`` takes them) over the
  same seeds, scored as ``demo`` and ``sim2real`` are and kept under ``ablations`` by ``--label``:
  what a change of the recipe did, side by side with the recipe as shipped, on one machine.
- ``lopo-starts``: ``lopo`` from each other demo model (``--seeds`` after the first), kept
  under ``lopo_starts`` by seed: how much the starting model moves the fine-tuned figures.
- ``lopo-ablation``: ``lopo`` with changes of the fine-tuning recipe (``--set``), from the same
  seed-0 demo model, kept under ``lopo_ablations`` by ``--label``.
- ``sizes``: the demo models again, each volume (held-out test and unseen phantom) predicted once,
  then every minimum lesion size of :data:`SWEEP_DIAMETERS_MM` applied to it: per-case tumour Dice
  and the lesions still found, size by size, on the same predictions. What a larger cut buys in
  the LiTS score and costs in lesions found, without a training run's noise in between.

    python benchmarks/bench_real.py demo fresh sim2real lopo [--seeds 0 1 2] [--rerun] [--fresh-runs 3]
    python benchmarks/bench_real.py ablation --label "soft Dice" --set training.fn_weights=[]
    python benchmarks/bench_real.py lopo-ablation --label "Tversky loss" --set "training.fn_weights=[0.5, 0.7]"
    python benchmarks/bench_real.py sizes

Finished runs under ``runs/bench_real`` are reused (their recorded wall time with them), so an
interrupted benchmark continues where it stopped; ``--rerun`` trains them all again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"
RUNS = ROOT / "runs" / "bench_real"
ENSEMBLE = "ensemble of the demo models"
#: A demo run's test volumes scored again with the default minimum lesion size (its folder).
DEFAULT_POSTPROCESSING_EVAL = "eval_default_postprocessing"


def fit(args: list[str], runs: Path = RUNS, env: dict | None = None) -> float:
    """Run ``python -m keras_livseg.fit`` (progress on this terminal); return its wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "keras_livseg.fit", "--runs-dir", str(runs), *args], cwd=ROOT, check=True,
                   env=env)
    return time.perf_counter() - started


def recipe_digest(recipe: Path = ROOT / "pipelines" / "phantom_demo.toml") -> str:
    """The demo recipe's settings as a sha256 (12 hex digits; comments and layout do not count):
    what the demo and each ablation were measured on."""
    import hashlib

    from keras_livseg.training.recipe import load_recipe

    settings = json.dumps(load_recipe(recipe), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:12]


def lopo_recipe_digest() -> str:
    """What a leave-one-patient-out run was measured on: the fine-tuning recipe and the demo
    recipe of the model it starts from (12 hex digits each)."""
    return f"{recipe_digest(ROOT / 'pipelines' / 'ircadb_finetune.toml')}+{recipe_digest()}"


def drop_stale_ablations(results: dict, ablations: str = "ablations", base: str = "demo") -> list[str]:
    """Remove the ``results[ablations]`` measured against another recipe than ``results[base]``'s
    (a change beside a recipe that is gone compares nothing); return their labels.

    >>> results = {"demo": {"recipe": "aaa"}, "ablations": {"x": {"recipe": "aaa"}, "y": {"recipe": "bbb"}, "z": {}}}
    >>> drop_stale_ablations(results), sorted(results["ablations"])
    (['y', 'z'], ['x'])
    >>> results = {"lopo": {"recipe": "c+a"}, "lopo_ablations": {"t": {"recipe": "c+b"}}}
    >>> drop_stale_ablations(results, "lopo_ablations", "lopo"), results["lopo_ablations"]
    (['t'], {})
    """
    recipe = results.get(base, {}).get("recipe")
    stale = [label for label, ablation in results.get(ablations, {}).items() if ablation.get("recipe") != recipe]
    for label in stale:
        del results[ablations][label]
    return stale


def models_digest(checkpoints: Sequence[Path]) -> str:
    """The checkpoints' bytes as one sha256 (12 hex digits): which trained models a part scored.
    Retraining with the same recipe makes other weights, so the recipe's digest cannot tell.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.keras").write_bytes(b"seed 0"), (folder / "b.keras").write_bytes(b"seed 1")
    >>> models_digest([folder / "a.keras", folder / "b.keras"]) == models_digest([folder / "b.keras", folder / "a.keras"])
    False
    >>> len(models_digest([folder / "a.keras"]))
    12
    """
    import hashlib

    digest = hashlib.sha256()
    for checkpoint in checkpoints:
        with open(checkpoint, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def drop_parts_of_other_models(results: dict, seeds_digest: str, start_digests: dict[str, str]) -> list[str]:
    """Remove the parts that scored demo models no longer there (after the demo is trained
    again); return what went. ``sim2real`` and ``sizes`` recorded the seeds' models as
    ``models_digest``; ``lopo``, each ``lopo_starts`` entry and each leave-one-patient-out
    ablation recorded the model it started from (``init_from``, digest ``models_digest``), which
    ``start_digests`` maps to its digest now.

    >>> results = {"sizes": {"models_digest": "old"}, "sim2real": {"models_digest": "new"},
    ...            "lopo": {"init_from": "s0.keras", "models_digest": "a"},
    ...            "lopo_starts": {"1": {"init_from": "s1.keras", "models_digest": "b"}},
    ...            "lopo_ablations": {"x": {"init_from": "s0.keras", "models_digest": "z"}}}
    >>> drop_parts_of_other_models(results, "new", {"s0.keras": "a", "s1.keras": "b"})
    ['sizes', 'lopo ablation x']
    >>> sorted(results), results["lopo_starts"], results["lopo_ablations"]
    (['lopo', 'lopo_ablations', 'lopo_starts', 'sim2real'], {'1': {'init_from': 's1.keras', 'models_digest': 'b'}}, {})
    """
    def gone(part: dict) -> bool:
        return part.get("models_digest") != start_digests.get(part.get("init_from"))

    dropped = [part for part in ("sim2real", "sizes")
               if part in results and results[part].get("models_digest") != seeds_digest]
    dropped += [part for part in ("lopo",) if part in results and gone(results[part])]
    for part in dropped:
        del results[part]
    for group, name in (("lopo_starts", "lopo start"), ("lopo_ablations", "lopo ablation")):
        for label, measured in list(results.get(group, {}).items()):
            if gone(measured):
                del results[group][label]
                dropped.append(f"{name} {label}")
    return dropped


def relative(path: Path) -> str:
    """``path`` as the JSON records it: relative to the repository when inside it."""
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def slug(label: str) -> str:
    """A run-name-safe form of an ablation's label.

    >>> slug("soft Dice, no Tversky")
    'soft-dice-no-tversky'
    """
    return "-".join("".join(c if c.isalnum() else " " for c in label.lower()).split())


def demo(seeds: list[int], overrides: list[str] = (), label: str = "") -> dict:
    """The demo recipe (with ``--set`` overrides) trained once per seed and scored on its test volumes."""
    rows = []
    for seed in seeds:
        name = demo_run_name(seed, label)
        if not demo_runs_finished([seed], label):
            shutil.rmtree(RUNS / name, ignore_errors=True)  # a run cut short: fit would name the new one name-1
            sets = [arg for override in overrides for arg in ("--set", override)]
            wall = fit(["--name", name, "--no-export", "--set", f"run.seed={seed}", *sets])
        else:
            wall = json.loads((RUNS / name / "wall.json").read_text())["seconds"]
        (RUNS / name / "wall.json").write_text(json.dumps({"seconds": wall}))
        volumes = json.loads((RUNS / name / "eval" / "held_out_volumes.json").read_text())
        report = json.loads((RUNS / name / "eval" / "volumes" / "metrics.json").read_text())
        chosen, plain = default_postprocessing_scores(RUNS / name)
        plain_report = RUNS / name / DEFAULT_POSTPROCESSING_EVAL / "volumes" / "metrics.json"
        detection = {**lesion_detection(report),
                     **{f"{key}_default_postprocessing": value
                        for key, value in lesion_detection(json.loads(plain_report.read_text())).items()}}
        unseen = unseen_phantom_scores(RUNS / name)
        rows.append({"seed": seed, "minutes": round(wall / 60, 2), "cases": len(volumes["cases"]),
                     "liver_dice": volumes["liver_dice"], "tumor_dice": volumes["tumor_dice"],
                     "liver_dice_global": volumes["liver_dice_global"], "tumor_dice_global": volumes["tumor_dice_global"],
                     "min_lesion_mm3": chosen, "tumor_dice_default_postprocessing": plain["tumor_dice"],
                     "tumor_dice_global_default_postprocessing": plain["tumor_dice_global"],
                     "tumor_dice_by_phase": tumour_dice_by_phase(report.get("by_stratum", {})),
                     "tumor_dice_by_kind": tumour_dice_by_kind(report.get("by_stratum", {})), **detection,
                     **{f"unseen_{key}": value for key, value in unseen.items()}})
    import numpy as np

    summary = {key: {"mean": float(np.mean([r[key] for r in rows])), "min": float(np.min([r[key] for r in rows])),
                     "max": float(np.max([r[key] for r in rows]))}
               for key in ("minutes", "liver_dice", "tumor_dice", "liver_dice_global", "tumor_dice_global",
                           "tumor_dice_default_postprocessing", "unseen_liver_dice", "unseen_tumor_dice",
                           "unseen_tumor_dice_global", *detection)}
    print(table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["seed", "minutes", "cases", "liver_dice", "tumor_dice", "liver_dice_global", "tumor_dice_global",
                 "min_lesion_mm3", "tumor_dice_default_postprocessing", "unseen_liver_dice", "unseen_tumor_dice"]))
    return {"runs": rows, "summary": summary, "recipe": recipe_digest(), "unseen_phantom": UNSEEN_PHANTOM,
            "covers": "every slice of the held-out phantom test volumes, native grid, post-processed; mean per case and global"}


def lesion_detection(report: dict) -> dict[str, float]:
    """Lesion detection from a LiTS report (``eval/volumes/metrics.json``), as LiTS counts it: a
    reference lesion is found when a predicted one overlaps it with IoU > 0.5, the counts summed
    over the test volumes; recall also for lesions under 10 mm and of 10 mm or more."""
    found = report["detection"]["iou"]
    return {"lesion_precision": float(found["precision"]), "lesion_recall": float(found["recall"]),
            "lesion_recall_small": float(report["strata_3d"]["small"]["detection_recall"]),
            "lesion_recall_large": float(report["strata_3d"]["large"]["detection_recall"]),
            "lesions_small": int(report["strata_3d"]["small"]["n_lesions"]),
            "lesions_large": int(report["strata_3d"]["large"]["n_lesions"])}


def demo_runs_finished(seeds: list[int], label: str = "") -> bool:
    """Whether every seed's demo run (of ablation ``label``) is finished, so that :func:`demo`
    only scores it again."""
    return all((RUNS / demo_run_name(seed, label) / "eval" / "held_out_volumes.json").is_file() for seed in seeds)


def demo_run_name(seed: int, label: str = "") -> str:
    """The run folder of the demo's ``seed`` (of ablation ``label``) under :data:`RUNS`.

    >>> demo_run_name(2), demo_run_name(0, "soft Dice")
    ('demo-seed2', 'demo-seed0-soft-dice')
    """
    return f"demo-seed{seed}" + (f"-{slug(label)}" if label else "")


def tumour_dice_by_phase(by_stratum: dict[str, dict]) -> dict[str, dict]:
    """Held-out tumour Dice per case by contrast phase (a stratum's first part), from the
    ``by_stratum`` entry of the LiTS report (``eval/volumes/metrics.json``): ``{phase: {"cases",
    "tumor_dice"}}``; empty when the run was unstratified.

    >>> tumour_dice_by_phase({"portal/hypo": {"n_cases": 1, "tumor_dice": 0.25},
    ...                       "portal/none": {"n_cases": 3, "tumor_dice": 0.75}})
    {'portal': {'cases': 4, 'tumor_dice': 0.625}}
    """
    return _tumour_dice_grouped(by_stratum, 0)


def tumour_dice_by_kind(by_stratum: dict[str, dict]) -> dict[str, dict]:
    """The same by the case's lesion kind (a stratum's second part: ``hypo``, ``hyper``,
    ``mixed``, or ``none`` for a tumour-free case).

    >>> tumour_dice_by_kind({"portal/hyper": {"n_cases": 1, "tumor_dice": 0.2},
    ...                      "arterial/hyper": {"n_cases": 1, "tumor_dice": 0.0},
    ...                      "portal/hypo": {"n_cases": 2, "tumor_dice": 0.7}})
    {'hyper': {'cases': 2, 'tumor_dice': 0.1}, 'hypo': {'cases': 2, 'tumor_dice': 0.7}}
    """
    return _tumour_dice_grouped(by_stratum, 1)


def _tumour_dice_grouped(by_stratum: dict[str, dict], part: int) -> dict[str, dict]:
    """Case-weighted tumour Dice per value of the strata's ``part``-th ``/``-separated part."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for stratum, scores in by_stratum.items():
        parts = stratum.split("/")
        if stratum != "none" and len(parts) > part:  # "none": cases without a stratum
            groups.setdefault(parts[part], []).append((scores["n_cases"], scores["tumor_dice"]))
    return {name: {"cases": sum(n for n, _ in members),
                   "tumor_dice": sum(n * d for n, d in members) / sum(n for n, _ in members)}
            for name, members in sorted(groups.items())}


#: The unseen phantom set every demo model (and every ablation's) is also scored on: a seed no
#: recipe trains on, so that recipes with other phantom sizes or splits meet the same cases.
UNSEEN_PHANTOM = {"cases": 48, "seed": 1000}


def unseen_phantom_scores(run: Path) -> dict:
    """A demo run's best model on :data:`UNSEEN_PHANTOM` (made once, at the demo recipe's size and
    slice range): liver and tumour Dice per case and global, every slice, post-processed as
    ``predict`` does. Cached in the run's ``eval_unseen_phantom/``."""
    from keras_livseg.data.atomic import make_once
    from keras_livseg.data.phantom import write_phantom_dataset
    from keras_livseg.evaluation.report import evaluate_model
    from keras_livseg.training.recipe import load_recipe

    folder = run / "eval_unseen_phantom"
    if not (folder / "metrics.json").is_file():
        data = load_recipe(ROOT / "pipelines" / "phantom_demo.toml")["data"]
        phantom = RUNS / f"unseen-phantom-{UNSEEN_PHANTOM['seed']}"
        make_once(phantom, phantom / "phantom.json", "the unseen phantom",
                  lambda: write_phantom_dataset(phantom, UNSEEN_PHANTOM["cases"], UNSEEN_PHANTOM["seed"],
                                                size=int(data["phantom_size"]), slices=tuple(data["phantom_slices"]),
                                                overwrite=True, workers=2))
        evaluate_model([run / "checkpoints" / "best.keras"], phantom, folder, figures=False, progress=False, sample_voxels=0)
    volume = json.loads((folder / "metrics.json").read_text())["volume"]
    return {"liver_dice": volume["liver"]["dice"], "tumor_dice": volume["tumor"]["dice"],
            "tumor_dice_global": volume["tumor"]["dice_global"]}


def default_postprocessing_scores(run: Path) -> tuple[float, dict]:
    """The minimum lesion size a demo run chose on its validation volumes, and its test volumes
    scored again with the default size instead (10 mm³): what the choice changed."""
    from keras_livseg.data.prepare import load_manifest
    from keras_livseg.inference import PostProcessing
    from keras_livseg.training.fit import score_held_out_volumes

    chosen = json.loads((run / "preprocessing.json").read_text()).get("postprocessing", {})
    folder = run / DEFAULT_POSTPROCESSING_EVAL
    if not (folder / "held_out_volumes.json").is_file():
        manifest = load_manifest(json.loads((run / "config.json").read_text())["data"]["shards"])
        score_held_out_volumes(run / "checkpoints" / "best.keras", manifest, "test", folder, postprocess=PostProcessing())
    return float(chosen.get("min_lesion_mm3", PostProcessing().min_lesion_mm3)), json.loads((folder / "held_out_volumes.json").read_text())


#: Minimum lesion sizes the ``sizes`` part applies, as sphere diameters in mm; 0 is the default
#: rule (10 mm³). The demo chooses among 6 - 15 mm (``CANDIDATE_DIAMETERS_MM``).
SWEEP_DIAMETERS_MM = (0.0, 6.0, 10.0, 15.0, 20.0, 25.0)


def size_sweep(labels, reference, spacing, diameters_mm: Sequence[float] = SWEEP_DIAMETERS_MM) -> list[dict]:
    """One prediction (``labels``, post-processed but for the size rule) under each minimum lesion
    size: tumour Dice and LiTS's lesion counts (IoU > 0.5, and any overlap) against ``reference``.

    A diameter of 0 applies the default rule (10 mm³). Lesions of the reference are counted
    also by size: under 10 mm, 10 - 20 mm, and 20 mm or more (equivalent sphere diameter).

    >>> import numpy as np
    >>> ref = np.zeros((20, 20, 20), np.uint8); ref[2:8, 2:8, 2:8] = 2; ref[12:15, 12:15, 12:15] = 2
    >>> rows = size_sweep(ref.copy(), ref, (1.0, 1.0, 1.0), (0.0, 5.0))
    >>> [(r["diameter_mm"], round(r["tumor_dice"], 3), r["tp"], r["found_any"]) for r in rows]
    [(0.0, 1.0, 2, 2), (5.0, 0.941, 1, 1)]
    """
    import dataclasses

    import numpy as np

    from keras_livseg.evaluation.metrics.lesions import lesion_detection
    from keras_livseg.evaluation.metrics.overlap import dice
    from keras_livseg.inference.postprocess import PostProcessing, postprocess_labels
    from keras_livseg.inference.tuning import sphere_mm3

    truth = reference == 2
    rows = []
    for diameter in diameters_mm:
        trial = np.array(labels, copy=True)
        rule = PostProcessing().min_lesion_mm3 if diameter == 0 else sphere_mm3(diameter)
        postprocess_labels(trial, spacing, dataclasses.replace(PostProcessing.disabled(), min_lesion_mm3=rule))
        found = lesion_detection(trial, reference, spacing, lesion_metrics=False)
        row = {"diameter_mm": float(diameter), "tumor_dice": dice(trial == 2, truth),  # both empty: 1, as LiTS
               "tp": found.tp, "fp": found.fp, "fn": found.fn, "found_any": found.tp_any_overlap}
        for lesion in found.lesions:
            size = lesion["equivalent_diameter_mm"]
            band = "under_10" if size < 10 else ("10_20" if size < 20 else "20_up")
            row[f"lesions_{band}"] = row.get(f"lesions_{band}", 0) + 1
            row[f"found_{band}"] = row.get(f"found_{band}", 0) + int(bool(lesion["detected"]))
            row[f"found_any_{band}"] = row.get(f"found_any_{band}", 0) + int(bool(lesion["detected_any_overlap"]))
        rows.append(row)
    return rows


def sizes(seeds: list[int]) -> dict:
    """:func:`size_sweep` over the demo models' held-out test volumes and the unseen phantom cases."""
    import dataclasses

    import numpy as np

    from keras_livseg.data.cases import discover_cases
    from keras_livseg.data.prepare import load_manifest
    from keras_livseg.data.volumes import load_case
    from keras_livseg.evaluation.pairs import manifest_cases
    from keras_livseg.inference import PostProcessing, SegmentationModel
    from keras_livseg.inference.volume import predict_volume

    without_size = dataclasses.replace(PostProcessing(), min_lesion_mm3=0.0)
    unseen = RUNS / f"unseen-phantom-{UNSEEN_PHANTOM['seed']}"
    per_seed: dict[str, list[dict]] = {"test": [], "unseen": []}
    for seed in seeds:
        run = RUNS / demo_run_name(seed)
        unseen_phantom_scores(run)  # makes the unseen cases once
        model = SegmentationModel.load(run / "checkpoints" / "best.keras")  # once for both sets of cases
        shards = load_manifest(json.loads((run / "config.json").read_text())["data"]["shards"])["_dir"]
        for data, cases in (("test", manifest_cases(shards, "test")), ("unseen", discover_cases(unseen))):
            rows_by_case = []
            for files in cases:
                case = load_case(files)
                labels = predict_volume(model, case, postprocess=without_size, progress=False).labels
                rows_by_case.append(size_sweep(labels, case.labels, case.spacing))
            sizes_rows = []
            for k, diameter in enumerate(SWEEP_DIAMETERS_MM):
                rows = [case_rows[k] for case_rows in rows_by_case]
                summed = {key: sum(r.get(key, 0) for r in rows) for key in
                          ("tp", "fp", "fn", "found_any", *(f"{w}_{b}" for w in ("lesions", "found", "found_any")
                                                            for b in ("under_10", "10_20", "20_up")))}
                sizes_rows.append({"diameter_mm": diameter, "tumor_dice": float(np.mean([r["tumor_dice"] for r in rows])),
                                   "precision": summed["tp"] / max(summed["tp"] + summed["fp"], 1),
                                   "recall": summed["tp"] / max(summed["tp"] + summed["fn"], 1), **summed})
            per_seed[data].append({"seed": seed, "cases": len(cases), "sizes": sizes_rows})
    result = {}
    for data in ("test", "unseen"):
        mean = []
        for k, diameter in enumerate(SWEEP_DIAMETERS_MM):
            rows = [s["sizes"][k] for s in per_seed[data]]
            mean.append({"diameter_mm": diameter, **{key: float(np.mean([r[key] for r in rows]))
                                                     for key in rows[0] if key != "diameter_mm"}})
        print(f"{data}: mean over seeds {seeds}")
        print(table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in mean],
                    ["diameter_mm", "tumor_dice", "precision", "recall", "found_any_10_20", "lesions_10_20", "found_any_20_up",
                     "lesions_20_up"]))
        result[data] = {"runs": per_seed[data], "mean": mean}
    return {**result, "seeds": seeds, "recipe": recipe_digest(), "unseen_phantom": UNSEEN_PHANTOM,
            "models_digest": models_digest([RUNS / demo_run_name(seed) / "checkpoints" / "best.keras" for seed in seeds])}


def fresh(repeats: int = 1) -> dict:
    """The demo from an empty cache, as on a new machine: phantom, shards and training all timed.

    ``repeats`` runs, one after the other, each from its own empty cache: on a shared machine one
    run's time moves with the load, so ``minutes`` is their median and ``runs`` holds each.
    """
    import numpy as np

    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as scratch:
            env = {**os.environ, "KERAS_LIVSEG_CACHE": str(Path(scratch) / "cache")}
            wall = fit(["--name", "demo-fresh", "--no-export"], runs=Path(scratch) / "runs", env=env)
            volumes = json.loads((Path(scratch) / "runs" / "demo-fresh" / "eval" / "held_out_volumes.json").read_text())
        print(f"fresh demo: {wall / 60:.2f} min, held-out liver Dice {volumes['liver_dice']:.4f}, "
              f"tumour Dice {volumes['tumor_dice']:.4f}")
        runs.append({"minutes": round(wall / 60, 2), "liver_dice": volumes["liver_dice"],
                     "tumor_dice": volumes["tumor_dice"], "load_average_at_end": list(os.getloadavg())})
    return {"minutes": float(np.median([r["minutes"] for r in runs])), "runs": runs,
            "liver_dice": float(np.mean([r["liver_dice"] for r in runs])),
            "tumor_dice": float(np.mean([r["tumor_dice"] for r in runs])),
            "covers": "python -m keras_livseg.fit --no-export with an empty KERAS_LIVSEG_CACHE: phantom generation, "
                      "prepare, training and whole-volume scoring" + (f"; median of {repeats} runs" if repeats > 1 else "")}


def sim2real(checkpoints: list[Path]) -> dict:
    """Each demo model (one per training seed) on every real scan: liver (and tumour) Dice."""
    from keras_livseg.evaluation.report import EvaluationOptions, evaluate_model

    if not REAL.is_dir():
        print(f"skipped: {REAL} is absent")
        return {"skipped": f"{REAL} absent"}
    import csv

    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        pairs = Path(scratch) / "totalseg.csv"
        folder = REAL / "totalseg-example-ct"
        pairs.write_text(f"image,label,case_id\n{folder / 'example_ct_sm.nii.gz'},{folder / 'example_seg.nii.gz'},totalseg\n")
        # Each model alone, then all of them as one ensemble (their probabilities averaged), then
        # each alone taking adjacent context slices, as models did before preprocessing.context_mm.
        candidates = [(c.parent.parent.name, [c]) for c in checkpoints]
        if len(checkpoints) > 1:
            candidates.append((ENSEMBLE, list(checkpoints)))
        candidates += [(f"{c.parent.parent.name}{ADJACENT}", [adjacent]) for c in checkpoints
                       if (adjacent := with_adjacent_context(c, Path(scratch) / "adjacent")) is not None]
        for name, members in candidates:
            for data, label_map in ((REAL / "ircadb", None), (pairs, {5: 1})):
                out = Path(scratch) / f"{name}-{data.stem}"
                evaluate_model(members, data, out, options=EvaluationOptions(label_map=label_map), figures=False,
                               progress=False, sample_voxels=0)
                with (out / "per_case.csv").open() as handle:
                    for row in csv.DictReader(handle):
                        rows.append({"model": name, "case": row["case_id"],
                                     "liver_dice": float(row["liver_dice"]),
                                     "tumor_dice": float(row["tumor_dice"]) if label_map is None else None})
    print(table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["model", "case", "liver_dice", "tumor_dice"]))
    per_case, ensemble, adjacent = {}, {}, {}
    for case in sorted({r["case"] for r in rows}):
        single = [r for r in rows if r["case"] == case and r["model"] != ENSEMBLE and not r["model"].endswith(ADJACENT)]
        values = [r["liver_dice"] for r in single]
        per_case[case] = {"liver_dice_mean": float(np.mean(values)), "liver_dice_min": float(np.min(values)),
                          "liver_dice_max": float(np.max(values))}
        ensemble.update({case: r for r in rows if r["case"] == case and r["model"] == ENSEMBLE})
        moved = [r for r in rows if r["case"] == case and r["model"].endswith(ADJACENT)]
        if moved:
            tumours = [r["tumor_dice"] for r in moved if r["tumor_dice"] is not None]
            adjacent[case] = {"liver_dice_mean": float(np.mean([r["liver_dice"] for r in moved])),
                              "tumor_dice_mean": float(np.mean(tumours)) if tumours else None}
    return {"models": [str(c.relative_to(ROOT)) for c in checkpoints], "models_digest": models_digest(checkpoints),
            "cases": rows, "per_case": per_case,
            "ensemble": {case: {"liver_dice": r["liver_dice"], "tumor_dice": r["tumor_dice"]} for case, r in ensemble.items()},
            "adjacent_context": adjacent, "goal_liver_dice": 0.90}


ADJACENT = " (adjacent slices)"


def with_adjacent_context(checkpoint: Path, scratch: Path) -> Path | None:
    """The same model taking adjacent context slices: a run folder in ``scratch`` with the
    checkpoint linked and ``preprocessing.context_mm`` removed; ``None`` when it has none.

    The demo's phantom slices are 3.2 - 5 mm thick, so its training took adjacent slices with
    or without ``context_mm = 4.5``: this is the model the recipe made before that setting,
    and the comparison isolates how the context is picked on the thin-slice real scans.
    """
    source = checkpoint.parent.parent / "preprocessing.json"
    payload = json.loads(source.read_text())
    if payload["preprocessing"].get("context_mm") is None:
        return None
    payload["preprocessing"]["context_mm"] = None
    run = scratch / checkpoint.parent.parent.name
    (run / "checkpoints").mkdir(parents=True)
    (run / "preprocessing.json").write_text(json.dumps(payload))
    (run / "checkpoints" / checkpoint.name).symlink_to(checkpoint.resolve())
    return run / "checkpoints" / checkpoint.name


def lopo(checkpoint: Path, overrides: Sequence[str] = (), label: str = "") -> dict:
    """Leave one IRCAD patient out with ``pipelines/ircadb_finetune.toml`` warm-started from
    ``checkpoint``; with ``overrides`` (``fit --set``) and a ``label``, the same under its own
    run name: a change of the fine-tuning recipe, measured beside it."""
    if not (REAL / "ircadb").is_dir():
        print(f"skipped: {REAL / 'ircadb'} is absent")
        return {"skipped": "ircadb absent"}
    name = lopo_run_name(label)
    walls = RUNS / name / "wall.json"
    wall = json.loads(walls.read_text())["seconds"] if walls.is_file() else 0.0
    if not (walls.is_file() and (RUNS / name / "eval" / "metrics.json").is_file()):
        # A run cut short continues (--resume); its wall time adds to what the attempts before recorded.
        resume = ["--resume"] if (RUNS / name).exists() else []
        started = time.perf_counter()
        try:
            fit(["--pipeline", "pipelines/ircadb_finetune.toml", "--data", str(REAL / "ircadb"), "--folds", "2",
                 "--name", name, "--init-from", str(checkpoint)] + resume
                + [arg for change in overrides for arg in ("--set", change)])
        finally:
            wall += time.perf_counter() - started
            if (RUNS / name).is_dir():
                walls.write_text(json.dumps({"seconds": wall}))
    rows = []
    for fold in sorted((RUNS / name).glob("fold-*")):
        volumes = json.loads((fold / "eval" / "held_out_volumes.json").read_text())
        for case, scores in volumes["per_case"].items():
            rows.append({"fold": fold.name, "held_out_patient": case, **scores})
    print(table([{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["fold", "held_out_patient", "liver_dice", "tumor_dice"]))
    metrics = json.loads((RUNS / name / "eval" / "metrics.json").read_text())
    return {"minutes": round(wall / 60, 2), **({"set": list(overrides)} if overrides else {}), "init_from": relative(checkpoint),
            "recipe": lopo_recipe_digest(), "models_digest": models_digest([checkpoint]),
            "per_patient": rows, "goal": {"liver_dice": 0.93, "tumor_dice": 0.60},
            "out_of_fold": {"liver_dice": metrics["volume"]["liver"]["dice"], "tumor_dice": metrics["volume"]["tumor"]["dice"],
                            "tumor_dice_global": metrics["volume"]["tumor"]["dice_global"]}}


def lopo_run_name(label: str = "") -> str:
    """``ircadb-lopo``, or ``ircadb-lopo-<slug>`` for a change measured beside it.

    >>> lopo_run_name(), lopo_run_name("Tversky loss")
    ('ircadb-lopo', 'ircadb-lopo-tversky-loss')
    """
    return "ircadb-lopo" + (f"-{slug(label)}" if label else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", choices=["demo", "fresh", "sim2real", "lopo", "lopo-starts", "ablation", "lopo-ablation", "sizes"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rerun", action="store_true",
                        help="train the demo seeds and the fine-tuning folds again instead of reusing finished runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="ablation: a recipe change, as fit's --set (repeatable)")
    parser.add_argument("--label", default="", help="ablation: its name in the JSON and the README")
    parser.add_argument("--fresh-runs", type=int, default=1,
                        help="fresh: this many runs from an empty cache, one after the other; their median is quoted")
    args = parser.parse_args()
    for part in ("ablation", "lopo-ablation"):
        if part in args.parts and not (args.label and args.overrides):
            parser.error(f"{part} needs --label NAME and at least one --set KEY=VALUE")
    if args.rerun:
        stale = [demo_run_name(seed) for seed in args.seeds] if "demo" in args.parts else []
        stale += [demo_run_name(seed, args.label) for seed in args.seeds] if "ablation" in args.parts else []
        stale += ["ircadb-lopo"] if "lopo" in args.parts else []
        stale += [lopo_run_name(args.label)] if "lopo-ablation" in args.parts else []
        stale += [lopo_run_name(f"from demo seed {seed}") for seed in args.seeds[1:]] if "lopo-starts" in args.parts else []
        for name in stale:
            shutil.rmtree(RUNS / name, ignore_errors=True)
    # The in-process scoring imports TensorFlow: quietly, as the commands do (no cuInit lines on a CPU).
    from keras_livseg.cli import quiet_tensorflow

    quiet_tensorflow()
    path = results_dir() / "real_ct.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    previous = results.pop("machine", None)
    for part, value in results.items():  # parts from before each part kept its own
        if isinstance(value, dict) and "machine" not in value and previous and part not in ("ablations", "lopo_ablations", "lopo_starts"):
            value["machine"] = previous
    checkpoint = RUNS / demo_run_name(args.seeds[0]) / "checkpoints" / "best.keras"
    earlier = None  # the demo's machine, when its runs are only scored again
    for part in args.parts:
        if part == "demo":
            # Runs that are all finished are only scored again: their times (and so the machine
            # they were measured on, with its load) are the earlier ones.
            earlier = results.get("demo", {}).get("machine") if demo_runs_finished(args.seeds) else None
            results["demo"] = demo(args.seeds)
            for label in drop_stale_ablations(results):
                print(f"dropped the ablation {label!r}: it was measured beside another demo recipe; run it again "
                      f"with: python benchmarks/bench_real.py ablation --label {label!r} --set ...")
            # The parts that scored the models this replaced (a lone `demo --rerun`) score nothing here now.
            seeds = [RUNS / demo_run_name(seed) / "checkpoints" / "best.keras" for seed in args.seeds]
            starts = {relative(c): models_digest([c]) for c in seeds}
            for part_gone in drop_parts_of_other_models(results, models_digest(seeds), starts):
                again = {"lopo ablation": "lopo-ablation --label ... --set ...", "lopo start": "lopo-starts"}.get(
                    part_gone.rsplit(" ", 1)[0], part_gone)
                print(f"dropped {part_gone!r}: it scored demo models that were trained again; rerun it with: "
                      f"python benchmarks/bench_real.py {again}")
        elif part == "fresh":
            results["fresh"] = fresh(args.fresh_runs)
        elif part == "ablation":
            ablation = {"set": args.overrides, **demo(args.seeds, args.overrides, args.label), "machine": machine()}
            # The same models on the real scans: whether the change carries over to real CT.
            ablation["sim2real"] = sim2real([RUNS / demo_run_name(seed, args.label) / "checkpoints" / "best.keras"
                                             for seed in args.seeds])
            results.setdefault("ablations", {})[args.label] = ablation
            print(f"wrote {write_json('real_ct', results)}")
            continue
        elif part == "lopo-ablation":
            measured = {**lopo(checkpoint, args.overrides, args.label), "machine": machine()}
            results.setdefault("lopo_ablations", {})[args.label] = measured
            print(f"wrote {write_json('real_ct', results)}")
            continue
        elif part == "lopo-starts":
            # The same fine-tuning from each other demo model: how much the starting model moves it.
            for seed in args.seeds[1:]:
                start = RUNS / demo_run_name(seed) / "checkpoints" / "best.keras"
                measured = {**lopo(start, label=f"from demo seed {seed}"), "machine": machine()}
                results.setdefault("lopo_starts", {})[str(seed)] = measured
                print(f"wrote {write_json('real_ct', results)}")
            continue
        elif part == "sizes":
            results["sizes"] = sizes(args.seeds)
        elif part == "sim2real":
            results["sim2real"] = sim2real([RUNS / demo_run_name(seed) / "checkpoints" / "best.keras" for seed in args.seeds])
        else:
            results["lopo"] = lopo(checkpoint)
            for label in drop_stale_ablations(results, "lopo_ablations", "lopo"):
                print(f"dropped the leave-one-patient-out ablation {label!r}: it was measured beside another recipe; "
                      f"run it again with: python benchmarks/bench_real.py lopo-ablation --label {label!r} --set ...")
        # Parts are rerun one at a time, possibly on another machine: each keeps its own.
        results[part]["machine"] = earlier if part == "demo" and earlier else machine()
        print(f"wrote {write_json('real_ct', results)}")


if __name__ == "__main__":
    main()
