"""``python -m keras_livseg.fit``: train, evaluate and export, from a recipe.

With no arguments it runs the built-in demo, ``pipelines/phantom_demo.toml``: a phantom
dataset is generated (or reused from ``.cache/``), prepared into shards, a small TAM-U-Net is
trained, scored on held-out phantom cases and exported to ``saved_models/``.

Examples:
    python -m keras_livseg.fit
    python -m keras_livseg.fit --pipeline pipelines/lits_tam_unet.toml --data /data/LiTS
    python -m keras_livseg.fit --model effb0_pan --epochs 50 --batch-size 16 --set training.learning_rate=3e-4
    python -m keras_livseg.fit --name tam_unet-phantom_demo --resume --epochs 30
    python -m keras_livseg.fit --pipeline pipelines/ircadb_finetune.toml --data ../shared/data/real/ircadb
    python -m keras_livseg.fit --pipeline pipelines/ircadb_finetune.toml --data ../shared/data/real/ircadb --folds 2
    python -m keras_livseg.fit --data my_scans/ --init-from runs/tam_unet-phantom_demo/checkpoints/best.keras \\
        --set training.validation=none

Cross-validation (--folds K) trains one run per fold, by patient (a CSV's patient column keeps a
patient's scans together), scores each fold's held-out patients on whole volumes, and writes one
out-of-fold LiTS report over every patient (runs/<name>/eval/report.md); nothing is exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from keras_livseg import cli

#: A peer worker of a multi-worker run was lost; restart every worker with --resume.
EXIT_WORKER_LOST = 4


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("fit", "Train a liver/tumor segmentation model from a recipe, evaluate it and export a SavedModel.", __doc__)
    cli.add_recipe_arguments(parser, name_help="run name (folder under runs/)",
                             set_help="override any recipe value, e.g. --set training.foreground_fraction=0.5 or "
                                      "--set training.augmentation.rotation=0.04 (repeatable)")
    parser.add_argument("--shards", help="where prepared shards go (default: a cache folder keyed by the settings)")
    parser.add_argument("--model", help="model name, e.g. tam_unet, unet, effb0_pan, linknet (an unknown name lists them all)")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--precision", choices=["auto", "float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--export-dir", help="TF Serving base folder for the export (default: the recipe's "
                        "export.out; saved_models/livseg for the demo)")
    parser.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    parser.add_argument("--resume", action="store_true", help="continue the run --name where it stopped")
    parser.add_argument("--folds", type=int, help="K-fold cross-validation by patient (K = patients: leave one out)")
    parser.add_argument("--fold", type=int, help="with --folds: run only this fold (0-based)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="warm start: load a .keras checkpoint's weights by layer name and shape")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict]:
    from keras_livseg.training.fit import parse_override

    overrides: dict[str, dict] = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("data", "src", args.data)
    put("data", "out", args.shards)
    put("model", "name", args.model)
    put("training", "epochs", args.epochs)
    put("training", "batch_size", args.batch_size)
    put("training", "steps_per_epoch", args.steps_per_epoch)
    put("training", "learning_rate", args.learning_rate)
    put("training", "precision", args.precision)
    put("preprocessing", "image_size", args.image_size)
    put("run", "name", args.name)
    put("run", "runs_dir", args.runs_dir)
    put("export", "out", args.export_dir)
    put("training", "init_from", args.init_from)
    if args.no_export:
        put("export", "enabled", False)
    for item in args.set:
        section, key, value = parse_override(item)
        put(section, key, value)
    return overrides


def format_summary(result) -> str:
    """The end-of-run summary: Dice per class, where everything is, how to watch it."""
    metrics = result.test_metrics
    if result.already_complete:
        lines = ["", f"{result.run_dir} had already finished its {result.epochs_done} epochs: nothing to do "
                 "(pass more --epochs with --resume to train on)"]
    else:
        lines = ["", f"finished {result.epochs_done} epochs in {result.seconds / 60:.1f} min"]
    if result.warm_start:
        lines.append(result.warm_start.splitlines()[0])
    volumes = result.volume_metrics
    if volumes:
        lines.append(
            f"held-out Dice ({volumes['covers']}): liver {_fmt(volumes['liver_dice'])}, tumor {_fmt(volumes['tumor_dice'])} "
            f"(mean per case); global liver {_fmt(volumes['liver_dice_global'])}, tumor {_fmt(volumes['tumor_dice_global'])}"
        )
    if metrics:
        lines.append(
            f"held-out ({metrics.get('split')}: {metrics.get('covers', 'shard slices')}) Dice: liver "
            f"{_fmt(metrics.get('liver_dice'))}, tumor {_fmt(metrics.get('tumor_dice'))}; IoU: liver {_fmt(metrics.get('liver_iou'))}, "
            f"tumor {_fmt(metrics.get('tumor_iou'))}; mean IoU {_fmt(metrics.get('mean_iou'))}"
        )
        if metrics.get("split") == "val":
            lines.append("                 (the validation cases also chose the checkpoint: add test cases for an unbiased figure)")
    elif not volumes:
        lines.append("held-out Dice:   none (no test or validation cases, or training.score_volumes and "
                     "training.score_slices both false)")
    lines += [
        f"run folder:      {result.run_dir}",
        f"best checkpoint: {result.best_checkpoint}",
        f"export:          {result.export_dir or ('(exported when it finished)' if result.already_complete else '(none)')}",
        f"watch it:        tensorboard --logdir {result.run_dir / 'tensorboard'}",
    ]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{float(value):.4f}"


def format_cv_summary(result) -> str:
    """The end of a cross-validation: per-patient Dice per fold, the out-of-fold figures, where."""
    lines = ["", f"cross-validation: {len(result.folds)} folds in {result.seconds / 60:.1f} min"]
    for index, fold in enumerate(result.fold_results):
        for case, scores in sorted(fold["per_case"].items()):
            lines.append(f"  fold {index}: case {case}: liver Dice {_fmt(scores['liver_dice'])}, tumor Dice {_fmt(scores['tumor_dice'])}")
    volume = result.summary["volume"]
    lines += [
        f"out-of-fold ({result.summary['n_cases']} cases, whole volumes): liver Dice {_fmt(volume['liver']['dice'])} "
        f"(global {_fmt(volume['liver']['dice_global'])}), tumor Dice {_fmt(volume['tumor']['dice'])} "
        f"(global {_fmt(volume['tumor']['dice_global'])})",
        f"report:          {result.report_dir / 'report.md'}",
        f"folds:           {result.cv_dir}",
    ]
    return "\n".join(lines)


def export_trained(config: Mapping[str, Any], result):
    """Export a finished run's best checkpoint as the recipe's ``[export]`` table says.

    Returns:
        ``result`` with ``export_dir`` set to the version folder written, or unchanged when the
        export is off or the run has no checkpoint.
    """
    export = config["export"]
    if not export["enabled"] or result.best_checkpoint is None or result.already_complete:
        return result  # a finished run resumed again was exported the first time
    from keras_livseg.data.preprocessing import find_preprocessing_json, model_record, read_preprocessing_json
    from keras_livseg.serving import export_to

    prep, stored = read_preprocessing_json(find_preprocessing_json(result.best_checkpoint))
    target = export_to(result.best_checkpoint, export["out"], prep, version=int(export["version"]) or None,
                                overwrite=bool(export["overwrite"]),
                                metadata={"model": config["model"]["name"], "run": str(Path(result.run_dir).resolve()), **model_record(stored)})
    return dataclasses.replace(result, export_dir=target)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose, tensorflow=True)

    def body() -> int:
        from keras_livseg.training.fit import cross_validate, resolve_config, train
        from keras_livseg.training.multi_worker import WorkerLost

        config = resolve_config(args.pipeline, overrides_from_args(args))
        if args.folds and os.environ.get("TF_CONFIG"):
            raise ValueError("--folds trains several models in one process, which TensorFlow's multi-worker strategy "
                             "cannot; run each fold as its own job of workers, or cross-validate without TF_CONFIG")
        if args.fold is not None and not args.folds:
            raise ValueError("--fold needs --folds K (the number of folds it belongs to)")
        if args.folds:
            try:
                cv = cross_validate(config, args.folds, only_fold=args.fold, resume=args.resume)
            except KeyboardInterrupt:
                print("fit: interrupted; finished folds are kept. Continue with the same command plus --resume "
                      "--name <cv folder name> (see runs/)", file=sys.stderr)
                return cli.EXIT_INTERRUPTED
            print(format_cv_summary(cv))
            return 0
        try:
            result = train(config, resume=args.resume)
        except WorkerLost as lost:
            print(f"fit: error: {lost}", file=sys.stderr)
            return EXIT_WORKER_LOST
        except KeyboardInterrupt:
            print(
                "fit: interrupted; checkpoints and the backup of the last finished epoch are intact. "
                "Continue with: python -m keras_livseg.fit --resume --name <run name> (see runs/)",
                file=sys.stderr,
            )
            return cli.EXIT_INTERRUPTED
        if result.stopped_on_nan is not None:
            epoch, batch = result.stopped_on_nan
            print(
                f"fit: error: the loss became NaN at epoch {epoch + 1}, batch {batch}; the last good checkpoint "
                f"is {result.best_checkpoint or '(none yet)'}. Lower the learning rate or use --precision float32.",
                file=sys.stderr,
            )
            return 3
        if not result.chief:
            # The other workers of a multi-worker run: the chief writes, exports and summarizes.
            print(f"worker finished {result.epochs_done} epochs with the chief (weights sha256 {result.weights_sha256}); "
                  f"the run is {result.run_dir}")
            return 0
        print(format_summary(export_trained(config, result)))
        return 0

    return cli.run(body, "fit")


if __name__ == "__main__":
    sys.exit(main())
