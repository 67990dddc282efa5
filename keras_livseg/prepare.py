"""``python -m keras_livseg.prepare``: CT volumes → TFRecord slice shards + manifest.json.

Examples:
    python -m keras_livseg.prepare --src data/LiTS --out shards/lits --image-size 256 --context 3
    python -m keras_livseg.prepare --src ../shared/data/real/totalseg-example-ct/pairs.csv \\
        --out shards/ts --label-map 5:1
    python -m keras_livseg.prepare --pipeline pipelines/lits_tam_unet.toml --resume
    python -m keras_livseg.prepare --src pairs.csv --out shards/mine --stratify   # CSV column 'stratum'
    python -m keras_livseg.prepare --engine beam --src data/LiTS --out shards/lits --workers 2
    python -m keras_livseg.prepare --engine beam --runner FlinkRunner --src /shared/LiTS \
        --out /shared/shards --flink_master=flink:8081 --parallelism=16

With --engine beam, arguments this command does not know are Beam pipeline options
(--project, --flink_master, --parallelism, ...) and go to the runner as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from keras_livseg import cli
from keras_livseg.training.recipe import DATA_KEYS, PREPROCESSING_KEYS, check_keys, load_recipe
from keras_livseg.data import storage
from keras_livseg.data.prepare import PrepareOptions, prepare_dataset

ENGINES = ("local", "beam")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("prepare", "Window, standardize-statistics, resize and shard CT volumes into TFRecords.", __doc__)
    parser.add_argument("--src", help="dataset folder (LiTS or MSD layout) or a CSV of image,label pairs; "
                        "local, s3:// or gs://")
    parser.add_argument("--out", help="output folder for shards and manifest.json; local, s3:// or gs://")
    parser.add_argument("--pipeline", help="recipe TOML (its [data] and [preprocessing] tables)")
    parser.add_argument("--label-map", help="remap labels, SRC:DST,... (unlisted labels become 0)")
    parser.add_argument("--window", type=_floats, help="HU window low,high (default -200,250)")
    parser.add_argument("--image-size", type=int, help="model input size in pixels (default 256)")
    parser.add_argument("--context", type=int, help="adjacent slices as channels: 1 (default) or 3, 5...")
    parser.add_argument("--normalization", choices=["foreground", "volume", "none"])
    parser.add_argument("--spacing-mm", type=float,
                        help="resample slices in-plane to this pixel spacing (mm), then crop/pad to --image-size "
                        "(field of view = size x spacing); default: resize ignoring spacing")
    parser.add_argument("--context-mm", type=float,
                        help="take the --context slices this many mm apart (the nearest whole number of slices), "
                        "so that thin- and thick-slice scans give the model the same through-plane context; "
                        "default: adjacent slices")
    parser.add_argument("--slices", choices=["all", "liver"], help="all slices or liver slices + margin")
    parser.add_argument("--margin", type=int, help="slices kept beyond the liver with --slices liver")
    parser.add_argument("--split", type=_floats, help="train,val,test fractions by patient (0.7,0.15,0.15)")
    parser.add_argument("--seed", type=int, help="seed of the patient-level split (default 0)")
    parser.add_argument("--stratify", action="store_true", default=None,
                        help="share each stratum (a CSV's 'stratum' column; a phantom's contrast phase and lesion "
                        "kind) among train, val and test in the split's proportions")
    parser.add_argument("--gzip", action="store_true", default=None, help="GZIP-compress the shards")
    parser.add_argument("--shard-mb", type=float, help="target shard size in MB (default 150)")
    parser.add_argument("--workers", type=int, help="worker processes (default: one per core, at most 4)")
    parser.add_argument("--on-error", choices=["stop", "skip"], help="stop at a bad case (default) or skip it")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished output folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--engine", choices=ENGINES, default="local",
                        help="local worker processes (default) or an Apache Beam pipeline (extra [beam])")
    parser.add_argument("--runner", default="DirectRunner",
                        help="Beam runner with --engine beam: DirectRunner (default; --workers processes), "
                        "FlinkRunner, SparkRunner, DataflowRunner, PortableRunner, PrismRunner")
    return parser


def options_from_args(args: argparse.Namespace) -> PrepareOptions:
    """Recipe values first, then the command line's."""
    values: dict = {}
    if args.pipeline:
        recipe = load_recipe(args.pipeline)
        data = dict(recipe.get("data", {}))
        preprocessing = dict(recipe.get("preprocessing", {}))
        check_keys(data, DATA_KEYS, "data")
        check_keys(preprocessing, PREPROCESSING_KEYS, "preprocessing")
        values.update({k: v for k, v in data.items() if k in PrepareOptions.__dataclass_fields__})
        values.update(preprocessing)
        if "compression" in values and str(values["compression"]).lower() in ("none", ""):
            values["compression"] = None
    overrides = {
        "src": args.src,
        "out": args.out,
        "label_map": args.label_map,
        "window": args.window,
        "image_size": args.image_size,
        "context": args.context,
        "normalization": args.normalization,
        "spacing_mm": args.spacing_mm,
        "context_mm": args.context_mm,
        "slices": args.slices,
        "margin": args.margin,
        "split": args.split,
        "seed": args.seed,
        "stratify": args.stratify,
        "compression": "GZIP" if args.gzip else None,
        "shard_mb": args.shard_mb,
        "workers": args.workers,
        "on_error": args.on_error,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    for required in ("src", "out"):
        if not values.get(required):
            raise ValueError(f"--{required} is required (or give it in the recipe's [data] table)")
    return PrepareOptions(
        **values, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and args.engine != "beam":
        parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam pipeline options need --engine beam)")
    if args.runner != "DirectRunner" and args.engine != "beam":
        parser.error("--runner needs --engine beam")
    cli.configure_logging(args.verbose)

    def body() -> int:
        options = options_from_args(args)
        # gs:// and s3:// work through local mirrors: the source downloaded, the output uploaded
        # (manifest last) once prepare has finished; a finished output in the bucket counts as one.
        with storage.local_output(options.out, pull=True) as out:
            local = dataclasses.replace(options, src=storage.local_input(options.src), out=out)
            if args.engine == "beam":
                from keras_livseg.data.prepare_beam import prepare_with_beam

                manifest = prepare_with_beam(local, args.runner, beam_args, args.verbose)
            else:
                manifest = prepare_dataset(local)
        splits = manifest["splits"]
        print(
            "prepared "
            + ", ".join(f"{s}: {splits[s]['slices']} slices from {len(splits[s]['cases'])} cases" for s in splits)
            + f" -> {options.out if storage.is_url(options.out) else manifest['_dir']}"
        )
        return 0

    return cli.run(body, "prepare")


if __name__ == "__main__":
    sys.exit(main())
