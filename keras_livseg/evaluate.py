"""``python -m keras_livseg.evaluate``: LiTS-conformant scores, the papers' tables, curves, overlays.

Either predict a labelled dataset and score it (``--model`` with ``--data``), or score label maps
predicted elsewhere (``--pred`` with ``--ref``); files are matched by case (``segmentation-N``
in both folders, or the same file names). Writes metrics.json, per_case.csv, report.md and
figures/ into ``--out``.

Examples:
    python -m keras_livseg.evaluate --model runs/tam_unet/checkpoints/best.keras \\
        --data data/LiTS-test --out runs/tam_unet/eval --history runs/tam_unet/history.csv
    python -m keras_livseg.evaluate --pred predictions --ref data/LiTS-test --out eval
    python -m keras_livseg.evaluate --pred predictions --ref data/LiTS-test --out eval/all \\
        --compare runs/unet runs/effb0_pan
    python -m keras_livseg.evaluate --model saved_models/tam_unet \\
        --data ../shared/data/real/totalseg-example-ct/pairs.csv --label-map 5:1 --out eval/ts
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from keras_livseg import cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m keras_livseg.evaluate",
        description="Score liver and liver-tumor segmentations as the LiTS challenge and the papers do.",
        epilog=__doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help=".keras checkpoint or SavedModel: predict --data first")
    parser.add_argument("--data", help="labelled dataset (LiTS, MSD or .csv) to predict and score")
    parser.add_argument("--pred", help="folder of predicted label maps")
    parser.add_argument("--ref", help="reference dataset or folder of reference label maps")
    parser.add_argument("--out", required=True, help="output folder of the report")
    parser.add_argument("--name", help="model name in the tables (default: the run or folder name)")
    parser.add_argument("--label-map", help="remap reference labels, SRC:DST,... (e.g. 5:1)")
    parser.add_argument("--small-mm", type=float, default=10.0,
                        help="small/large tumor cut on the equivalent diameter (default 10 mm)")
    parser.add_argument("--iou-threshold", type=float, default=0.5, help="lesion detection IoU (default 0.5)")
    parser.add_argument("--connectivity", type=int, choices=[1, 2], default=1,
                        help="surface neighbourhood: 1 as medpy (default), 2 as the LiTS script")
    parser.add_argument("--history", help="a run's history.csv (or run folder): training curves, stability")
    parser.add_argument("--compare", nargs="+", default=[], metavar="RUN_OR_EVAL_DIR",
                        help="other evaluations (their metrics.json) to set side by side")
    parser.add_argument("--batch-size", type=int, default=8, help="with --model: slices per forward pass")
    parser.add_argument("--tta", action="store_true", help="with --model: flip test-time augmentation")
    parser.add_argument("--no-postprocess", action="store_true", help="with --model: no post-processing")
    parser.add_argument("--sample-voxels", type=int, default=200_000,
                        help="with --model: voxels sampled for ROC/PR curves (default 200000)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose)

    def body() -> int:
        from keras_livseg.data.volumes import parse_label_map
        from keras_livseg.evaluation.report import EvaluationOptions, evaluate_folders, evaluate_model

        if bool(args.model) == bool(args.pred):
            raise ValueError("give either --model with --data (predict, then score) or --pred with --ref")
        if args.model and not args.data:
            raise ValueError("--model needs --data, the labelled dataset to predict and score")
        if args.pred and not args.ref:
            raise ValueError("--pred needs --ref, the reference dataset or folder of label maps")
        options = EvaluationOptions(
            threshold_mm=args.small_mm, iou_threshold=args.iou_threshold,
            connectivity=args.connectivity, label_map=parse_label_map(args.label_map),
        )
        common = dict(options=options, history=args.history, compare=args.compare, figures=not args.no_figures)
        if args.model:
            summary = evaluate_model(
                args.model, args.data, args.out, batch_size=args.batch_size, tta_flip=args.tta,
                postprocess=None if args.no_postprocess else "default", sample_voxels=args.sample_voxels,
                progress=not args.no_progress, model_name=args.name, **common,
            )
        else:
            summary = evaluate_folders(args.pred, args.ref, args.out, model_name=args.name, **common)
        volume = summary["volume"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print(
            f"{summary['n_cases']} case(s): liver Dice {fmt(volume['liver']['dice'])} "
            f"(global {fmt(volume['liver']['dice_global'])}), tumor Dice {fmt(volume['tumor']['dice'])} "
            f"(global {fmt(volume['tumor']['dice_global'])}) -> {args.out}/report.md"
        )
        if summary["unmatched_predictions"]:
            print(f"not scored (no reference): {', '.join(summary['unmatched_predictions'])}")
        return 0

    return cli.run(body, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
