"""``python -m keras_livseg.export``: a ``.keras`` checkpoint → SavedModel for TF Serving.

The SavedModel's ``serving_default`` takes raw HU slices of any size and returns class
probabilities and the label mask at the input's size (see :mod:`keras_livseg.serving`).

Examples:
    python -m keras_livseg.export --model runs/demo/checkpoints/best.keras --out saved_models/livseg
    python -m keras_livseg.export --model runs/demo/checkpoints/best.keras --out saved_models/livseg \\
        --version 3 --overwrite
    python -m keras_livseg.export --model best.keras --out saved_models/livseg \\
        --preprocessing runs/demo/preprocessing.json

    tensorflow_model_server --rest_api_port=8501 --model_name=livseg \\
        --model_base_path=$PWD/saved_models/livseg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from keras_livseg import cli
from keras_livseg.data import storage
from keras_livseg.data.preprocessing import PREPROCESSING_FILE, find_preprocessing_json, model_record, read_preprocessing_json


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("export", "Export a trained .keras model as a SavedModel (TF Serving layout <out>/<version>/) "
        "whose serving_default signature takes raw Hounsfield units.", __doc__)
    parser.add_argument("--model", required=True, help="the .keras checkpoint, e.g. RUN/checkpoints/best.keras "
                        "(local, s3:// or gs://)")
    parser.add_argument("--out", required=True, help="model base folder, e.g. saved_models/livseg or gs://bucket/livseg")
    parser.add_argument("--version", type=int, help="version number (default: 1 + the largest existing one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    parser.add_argument("--metadata", type=_json_object, default={},
                        help="JSON object of extra entries for assets.extra/preprocessing.json (e.g. the run)")
    parser.add_argument(
        "--preprocessing",
        help=f"the run's {PREPROCESSING_FILE} (default: found beside the checkpoint or in its run folder)",
    )
    return parser


def resolve_preprocessing(model_path: str, preprocessing: str | None):
    """The ``(Preprocessing, metadata)`` for a model: the given file, or the run's."""
    if preprocessing:
        path = Path(preprocessing)
        if not path.is_file():
            raise FileNotFoundError(f"preprocessing file {path} does not exist")
    else:
        path = find_preprocessing_json(model_path)
        if path is None:
            model = Path(model_path)
            looked = ", ".join(str(p / PREPROCESSING_FILE) for p in (model.parent, model.parent.parent))
            raise FileNotFoundError(
                f"no {PREPROCESSING_FILE} found for {model} (looked in {looked}); "
                f"pass --preprocessing RUN/{PREPROCESSING_FILE}"
            )
    try:
        return read_preprocessing_json(path)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid {PREPROCESSING_FILE} ({error!r}); pass the run's file") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging(args.verbose, tensorflow=True)

    def body() -> int:
        model_path = storage.local_model(args.model)
        if model_path.suffix != ".keras":
            raise ValueError(
                f"{model_path} is not a .keras model file; pass a checkpoint such as RUN/checkpoints/best.keras"
            )
        if not model_path.is_file():
            raise FileNotFoundError(f"model file {model_path} does not exist")
        prep, stored = resolve_preprocessing(str(model_path), storage.local_input(args.preprocessing) if args.preprocessing else None)
        # What the run recorded of its model (post-processing, trained flips) travels with it;
        # --metadata may override it.
        metadata = {**model_record(stored), **(args.metadata or {})}
        # TensorFlow is imported only once the arguments are known to be good.
        from keras_livseg.serving import export_to

        target = export_to(
            model_path, args.out, prep, version=args.version, overwrite=args.overwrite, metadata=metadata or None
        )
        print(f"exported {args.model} -> {target}")
        base = str(target).rsplit("/", 1)[0] if storage.is_url(target) else Path(target).parent.resolve()
        print(
            "serve it with: tensorflow_model_server --rest_api_port=8501 "
            f"--model_name={str(base).rstrip('/').rsplit('/', 1)[-1]} --model_base_path={base}"
        )
        return 0

    return cli.run(body, "export")


if __name__ == "__main__":
    sys.exit(main())
