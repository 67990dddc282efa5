"""``python -m keras_livseg.predict``: CT volumes → uint8 label maps on each input's own grid.

Examples:
    python -m keras_livseg.predict --model runs/tam_unet/checkpoints/best.keras \\
        ../shared/data/real/dcmqi-ct-3slice --out predictions
    python -m keras_livseg.predict --model saved_models/tam_unet data/LiTS/volume-3.nii \\
        --out predictions --tta --save-probabilities
    python -m keras_livseg.predict --model saved_models/tam_unet/1 scans/ --out out \\
        --no-postprocess --batch-size 4
    python -m keras_livseg.predict --model runs/tam_unet/checkpoints/best.keras \\
        ../shared/data/real/dcmqi-ct-3slice/dicom --out seg --format dicom-seg
    python -m keras_livseg.predict --model runs/demo-seed0/checkpoints/best.keras \\
        --model runs/demo-seed1/checkpoints/best.keras scans/ --out out     # an ensemble
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Sequence

from keras_livseg import cli
from keras_livseg.data import storage
from keras_livseg.data.volumes import DataError

logger = logging.getLogger(__name__)


def parse_output_label_map(text: str | None) -> dict[int, int] | None:
    """``"1:6,2:7"`` → ``{1: 6, 2: 7}``: the value written for each model class (0..2).

    Classes not listed are written as 0.

    Example:
        >>> parse_output_label_map("1:6,2:7")
        {1: 6, 2: 7}
    """
    if text is None or not text.strip():
        return None
    mapping = {}
    for item in text.split(","):
        try:
            src, dst = (int(part) for part in item.strip().split(":"))
        except ValueError:
            raise DataError(f"bad --label-map entry {item.strip()!r}; write CLASS:VALUE pairs such as 1:6,2:7") from None
        if src not in (0, 1, 2) or not 0 <= dst <= 255:
            raise DataError(
                f"--label-map entry {item.strip()!r}: the class must be 0, 1 or 2 and the value 0..255"
            )
        mapping[src] = dst
    return mapping


def build_parser() -> argparse.ArgumentParser:
    parser = cli.make_parser("predict", "Segment liver and liver tumors in CT volumes (NIfTI) with a trained model.", __doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="a NIfTI file, a folder of them, a LiTS/MSD dataset, a folder of one DICOM CT series, or a .csv list")
    parser.add_argument("--model", required=True, action="append",
                        help=".keras checkpoint (with its run's preprocessing.json) or SavedModel folder; "
                             "repeat it to average several models' probabilities (folds or seeds, as nnU-Net does)")
    parser.add_argument("--out", required=True, help="output folder for the label maps")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    parser.add_argument("--tta", action="store_true", help="average with the predictions of the slices mirrored as the model was trained (refused for a model trained without flips)")
    parser.add_argument("--no-postprocess", action="store_true",
                        help="no largest-liver-component, tumor-in-liver or minimum-lesion clean-up")
    parser.add_argument("--min-lesion-mm3", type=float, default=None,
                        help="tumor components below this volume become liver (default: the size the model's run "
                             "chose on its validation cases, else 10 mm³; 0: off)")
    parser.add_argument("--liver-margin-mm", type=float, default=None,
                        help="tumor farther than this from the liver is removed (default: the model's, else 5 mm)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write 4D uint8 probability maps (0-255 per class)")
    parser.add_argument("--label-map", help="values written per class, CLASS:VALUE,... (default 0,1,2)")
    parser.add_argument("--format", choices=("nifti", "dicom-seg"), default="nifti",
                        help="nifti label maps (default), or for DICOM series inputs a DICOM-SEG object "
                             "(<case>_seg.dcm: segments Liver and Liver tumour, referencing the series)")
    parser.add_argument("--series", metavar="UID", help="the SeriesInstanceUID to read from DICOM folders that hold several")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TensorFlow is loaded once the inputs are found and their headers read: a broken input is
    # refused in about a second, not after TensorFlow's start-up and the model's load.
    cli.configure_logging(args.verbose)

    def body() -> int:
        from keras_livseg.data.cases import plan_outputs, resolve_inputs
        from keras_livseg.data.volumes import check_headers

        label_map = parse_output_label_map(args.label_map)
        models = [storage.local_model(path) for path in args.model]  # URLs: downloaded
        for path in models:
            if not path.exists():
                raise DataError(f"model {path} does not exist; pass a .keras checkpoint or a SavedModel folder")
        inputs = [storage.local_input(item) for item in args.inputs]  # URLs: their local mirrors
        cases = resolve_inputs(inputs, series_uid=args.series)
        if not storage.is_url(args.out):
            plan_outputs(cases, args.out, args.format, label_map)
        check_headers(cases)
        cli.quiet_tensorflow(args.verbose)
        from keras_livseg.inference import PostProcessing, SegmentationModel, predict_paths

        model = SegmentationModel.ensemble([SegmentationModel.load(path) for path in models])
        given = {key: value for key, value in (("min_lesion_mm3", args.min_lesion_mm3),
                                                ("liver_margin_mm", args.liver_margin_mm)) if value is not None}
        postprocess = None if args.no_postprocess else dataclasses.replace(model.postprocessing, **given)
        if postprocess is not None and postprocess != PostProcessing():
            logger.info("post-processing: %s", postprocess)
        # Predictions for a bucket are written locally, then uploaded beside whatever is there already.
        with storage.local_output(args.out, mirror=False) as out:
            written = predict_paths(
                model, cases, out, batch_size=args.batch_size, tta_flip=args.tta,
                postprocess=postprocess, save_probabilities=args.save_probabilities,
                label_map=label_map, progress=not args.no_progress, output_format=args.format, series_uid=args.series,
                check_inputs=False,  # checked above, before TensorFlow
            )
        for record in written:
            shown = f"{str(args.out).rstrip('/')}/{Path(record.output).name}" if storage.is_url(args.out) else record.output
            print(f"{record.input} -> {shown}")
        print(f"predicted {len(written)} case(s) into {args.out}")
        return 0

    return cli.run(body, "predict")


if __name__ == "__main__":
    sys.exit(main())
