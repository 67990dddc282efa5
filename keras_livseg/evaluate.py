"""``python -m keras_livseg.evaluate``: LiTS-conformant scores, the papers' tables, curves, overlays.

Either predict a labelled dataset and score it (``--model`` with ``--data``), or score label maps
predicted elsewhere (``--pred`` with ``--ref``); files are matched by case (``segmentation-N``
in both folders, or the same file names). Writes metrics.json, per_case.csv, per_lesion.csv,
report.md and figures/ into ``--out``.

Scoring follows the LiTS script: surfaces by 18-neighbourhood erosion (``--connectivity 2``, the
default; 1 is medpy's 6-neighbourhood); per-lesion Dice, VOE, RVD, ASSD, RMSD and MSD of each
detected lesion, averaged over detected lesions. A case whose prediction or reference is empty
(but not both) gets the surface-distance penalty of ``--empty-surface`` (default ``diagonal``: the
diagonal of the volume's extent in mm) and stays in the means; both empty scores Dice 1 and
distance 0. RVD with an empty reference is undefined and left out of the RVD mean (counted).

``--data`` (or ``--ref``) may be a prepared shard folder (manifest.json), or with ``--model`` the
folder of a ``fit`` run (the shards it trained on): ``--split`` then picks the cases, read from the
source NIfTI files. A checkpoint under ``runs/<name>/checkpoints/`` is
checked against its run's training manifest, and scored training cases are flagged.

Examples:
    python -m keras_livseg.evaluate --model runs/tam_unet/checkpoints/best.keras \\
        --data data/LiTS-test --out runs/tam_unet/eval --history runs/tam_unet/history.csv
    python -m keras_livseg.evaluate --model runs/tam_unet/checkpoints/best.keras \\
        --data runs/tam_unet --split test --out runs/tam_unet/eval   # a fit run: the shards it trained on
    python -m keras_livseg.evaluate --pred predictions --ref data/LiTS-test --out eval
    python -m keras_livseg.evaluate --pred predictions --ref labels/ --images ct/ --out eval
    python -m keras_livseg.evaluate --pred predictions --ref data/LiTS-test --out eval/all \\
        --compare runs/unet runs/effb0_pan
    python -m keras_livseg.evaluate --model saved_models/tam_unet \\
        --data ts.csv --label-map 5:1 --out eval/ts   # ts.csv: image,label rows (a TotalSegmentator
                                                      # folder holds the CT and its label map side by side)
    python -m keras_livseg.evaluate --model runs/demo-seed0/checkpoints/best.keras \\
        --model runs/demo-seed1/checkpoints/best.keras --data ../shared/data/real/ircadb --out eval/ens
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from keras_livseg import cli
from keras_livseg.data import storage


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("evaluate", "Score liver and liver-tumor segmentations as the LiTS challenge and the papers do.", __doc__)
    parser.add_argument("--model", action="append",
                        help=".keras checkpoint or SavedModel: predict --data first; repeat it to score the "
                             "average of several models (an ensemble of folds or seeds)")
    parser.add_argument("--data", help="labelled dataset (LiTS, MSD or .csv), prepared shard folder "
                        "(manifest.json, with --split), or a fit run's folder (its shards) to predict and score")
    parser.add_argument("--split", metavar="SPLIT",
                        help="with a shard folder as --data/--ref: score the cases of this split "
                        "(train, val or test; an error lists the splits the manifest has)")
    parser.add_argument("--pred", help="folder of predicted label maps")
    parser.add_argument("--ref", help="reference dataset, folder of reference label maps, or shard folder")
    parser.add_argument("--images", help="with --pred: folder of the CT volumes for the overlays "
                        "(found automatically when --ref is a LiTS folder with volume-N files)")
    parser.add_argument("--train-manifest", metavar="RUN_OR_SHARDS",
                        help="flag scored cases of this training manifest's train/val splits (a shard "
                        "folder, its manifest.json, or a run folder); with --model found from the run")
    parser.add_argument("--out", required=True, help="output folder of the report")
    parser.add_argument("--name", help="model name in the tables (default: the run or folder name)")
    parser.add_argument("--label-map", help="remap reference labels, SRC:DST,... (e.g. 5:1)")
    parser.add_argument("--small-mm", type=float, default=10.0,
                        help="small/large tumor cut on the equivalent diameter (default 10 mm)")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="lesion detection IoU (default 0.5)")
    parser.add_argument("--connectivity", type=int, choices=[1, 2], default=2,
                        help="surface voxels by erosion with generate_binary_structure(3, C): 2 = the "
                        "18-neighbourhood of the LiTS script (default), 1 = medpy's 6-neighbourhood")
    parser.add_argument("--empty-surface", default="diagonal", metavar="POLICY",
                        help="surface distances when exactly one mask is empty: diagonal (default: the "
                        "volume's extent diagonal in mm, the largest possible distance), lits (9001), "
                        "nan (leave such cases out of the distance means), or a number of mm")
    parser.add_argument("--history", help="a run's history.csv (or run folder): training curves, stability")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN_OR_EVAL_DIR",
                        help="other evaluations (their metrics.json) to set side by side")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: slices per forward pass")
    parser.add_argument("--tta", action="store_true", help="with --model: mirrored test-time augmentation, as the model was trained (refused for a model trained without flips)")
    parser.add_argument("--no-postprocess", action="store_true", help="with --model: no post-processing")
    parser.add_argument("--sample-voxels", type=int, default=200_000,
                        help="with --model: voxels sampled for ROC/PR curves (default 200000)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _empty_surface(text: str) -> float | str:
    """``--empty-surface``: a policy name or a number of mm."""
    try:
        return float(text)
    except ValueError:
        return text


def _training_manifest(path: str | None) -> Path | None:
    """``--train-manifest``: a shard folder, its manifest.json, or a run folder (its config.json)."""
    if path is None:
        return None
    candidate = Path(path)
    if (candidate / "config.json").is_file() and not (candidate / "manifest.json").is_file():
        from keras_livseg.evaluation.pairs import training_manifest_for_model

        found = training_manifest_for_model(candidate / "checkpoints" / "model.keras")
        if found is None:
            raise ValueError(f"--train-manifest {path}: the run's config.json names no shard folder with a manifest.json")
        return found
    if not (candidate.is_file() or (candidate / "manifest.json").is_file()):
        raise ValueError(
            f"--train-manifest {path} is neither a shard folder with manifest.json nor a run folder with config.json"
        )
    return candidate


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose, tensorflow=bool(args.model))

    def body() -> int:
        from keras_livseg.data.volumes import parse_label_map
        from keras_livseg.evaluation.report import EvaluationOptions, evaluate_folders, evaluate_model

        if bool(args.model) == bool(args.pred):
            raise ValueError("give either --model with --data (predict, then score) or --pred with --ref")
        if args.model and not args.data:
            raise ValueError("--model needs --data, the labelled dataset to predict and score")
        if args.pred and not args.ref:
            raise ValueError("--pred needs --ref, the reference dataset or folder of label maps")
        if args.images and not args.pred:
            raise ValueError("--images goes with --pred/--ref; with --model the CT comes from --data")
        options = EvaluationOptions(
            threshold_mm=args.small_mm, iou_threshold=args.iou_threshold,
            connectivity=args.connectivity, label_map=parse_label_map(args.label_map),
            empty_surface=_empty_surface(args.empty_surface),
        )
        training_manifest = _training_manifest(args.train_manifest)
        common = dict(options=options, history=args.history, compare=args.compare, figures=not args.no_figures,
                      split=args.split, training_manifest=training_manifest)
        def local(value):  # s3:// and gs:// inputs: their local mirrors
            return storage.local_input(value) if value else value

        # The report for a bucket is written locally and uploaded beside what is there.
        with storage.local_output(args.out, mirror=False) as out:
            if args.model:
                summary = evaluate_model(
                    [storage.local_model(path) for path in args.model], local(args.data), out, batch_size=args.batch_size,
                    tta_flip=args.tta, postprocess=None if args.no_postprocess else "model",
                    sample_voxels=args.sample_voxels, progress=not args.no_progress, model_name=args.name, **common,
                )
            else:
                summary = evaluate_folders(local(args.pred), local(args.ref), out, model_name=args.name,
                                           images=local(args.images), **common)
        volume = summary["volume"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"{summary['n_cases']} case(s): liver Dice {fmt(volume['liver']['dice'])} "
            f"(global {fmt(volume['liver']['dice_global'])}), tumor Dice {fmt(volume['tumor']['dice'])} "
            f"(global {fmt(volume['tumor']['dice_global'])}) -> {args.out}/report.md"
        )
        if summary["unmatched_predictions"]:
            print(f"not scored (no reference): {', '.join(summary['unmatched_predictions'])}")
        if summary.get("scored_training_cases"):
            print(f"warning: scored case(s) used in training: {', '.join(summary['scored_training_cases'])}")
        return 0

    return cli.run(body, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
