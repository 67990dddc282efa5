"""``python -m keras_livseg.compare``: several models, one recipe, data split, budget and seeds.

Trains every model (``--models``, default all) with every seed on the same recipe (default the
phantom demo), scores each on the same held-out volumes as LiTS does, and writes one report:
parameters, FLOPs, training and inference slices/s, Dice over seeds, a paired Wilcoxon test per
case against the first model, the papers' Tables I-IV, and figures (Dice against speed, every
model on the same slices). Finished runs are reused, interrupted ones resume: rerun the same
command after a stop.

The recipe's [model] options go to every model that takes them (filters and depth to the
U-Nets); ``--set model.<name>.<key>=value`` sets one model's option only.

Examples:
    python -m keras_livseg.compare --models unet,tam_unet --seeds 3
    python -m keras_livseg.compare --models unet,tam_unet,effb0_pan --epochs 5 --name quick
    python -m keras_livseg.compare --models unet,manet --epochs 100 --minutes 30 --seeds 3
    python -m keras_livseg.compare --pipeline pipelines/lits_tam_unet.toml --data /data/LiTS --seeds 3 \\
        --set model.linknet.encoder=resnet18
    python -m keras_livseg.compare --runs runs/tam_unet-lits runs/unet-lits --out runs/compare-lits
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from keras_livseg import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("compare", "Train and compare several segmentation models on the same data, split, "
                             "recipe and seeds.", __doc__)
    parser.add_argument("--models", help="comma-separated registry names, the baseline first (default: all)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds 0..N-1 per model (default 1)")
    cli.add_recipe_arguments(parser, name_help="folder under runs/ (default compare-<recipe>)",
                             set_help="override a recipe value for every model, or model.<name>.<key>=value for one")
    parser.add_argument("--minutes", type=float, help="time budget per run: stop after the first epoch that ends past "
                        "it (the same wall time for every model; set --epochs high enough)")
    parser.add_argument("--no-speed", action="store_true", help="skip the training/inference timing")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="compare these finished fit runs instead of training")
    parser.add_argument("--out", help="with --runs: the output folder")
    return parser


def split_overrides(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, dict]]:
    """``(overrides for every model, {model: options})`` from the command line."""
    from keras_livseg.training.fit import parse_override

    shared: dict[str, dict] = {}
    per_model: dict[str, dict] = {}
    for section, key, value in ((("data", "src", args.data), ("training", "epochs", args.epochs),
                                 ("training", "steps_per_epoch", args.steps_per_epoch),
                                 ("training", "batch_size", args.batch_size), ("training", "max_minutes", args.minutes),
                                 ("run", "runs_dir", args.runs_dir))):
        if value is not None:
            shared.setdefault(section, {})[key] = value
    for item in args.set:
        section, key, value = parse_override(item)
        if section == "model" and "." in key:
            model, option = key.split(".", 1)
            per_model.setdefault(model, {})[option] = value
        else:
            shared.setdefault(section, {})[key] = value
    return shared, per_model


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose, tensorflow=True)

    def body() -> int:
        from keras_livseg.models import available_models
        from keras_livseg.training.compare import compare_runs, run_comparison
        from keras_livseg.training.fit import resolve_config

        if args.runs:
            if not args.out:
                raise ValueError("--runs needs --out, the folder for the comparison report")
            compare_runs(args.runs, args.out, measure_speed=not args.no_speed)
            print(f"report: {args.out}/report.md")
            return 0
        if args.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(available_models())
        shared, per_model = split_overrides(args)
        config = resolve_config(args.pipeline, shared)
        try:
            result = run_comparison(config, models, list(range(args.seeds)), name=args.name, per_model=per_model,
                                    measure_speed=not args.no_speed)
        except KeyboardInterrupt:
            print("compare: interrupted; finished runs are kept. Rerun the same command to continue.", file=sys.stderr)
            return cli.EXIT_INTERRUPTED
        for model in result.summary["models"]:
            liver, tumor = model["mean"]["volume"]["liver"]["dice"], model["mean"]["volume"]["tumor"]["dice"]
            print(f"{model['name']:>16}: liver Dice {liver if liver is not None else float('nan'):.4f}, "
                  f"tumor Dice {tumor if tumor is not None else float('nan'):.4f} (mean over {len(model['seeds'])} seed(s))")
        print(f"report: {result.report}")
        return 0

    return cli.run(body, "compare")


if __name__ == "__main__":
    sys.exit(main())
