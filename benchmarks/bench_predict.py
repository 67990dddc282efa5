"""predict on a 512x512x119 volume: wall time against the model's own forward time, peak RSS.

Goals (DESIGN.md): predict wall time <= 1.3x the model's forward time over the same slices
(batch 8, 256x256); peak RSS <= 3 GB. Both run in fresh processes, taking turns ``--repeats``
times (default 3); the medians are compared.
The forward side is ``model.predict_on_batch`` on ready-made standardized batches; the
predict side is the whole command path: read the NIfTI, preprocess, forward, resize the
probabilities back to 512x512, post-process, write the label map.

    python benchmarks/bench_predict.py [--model tam_unet] [--filters 16]

A random model labels most of the volume, so post-processing then works on the whole scan.
``--train`` measures the product's own path instead: it first trains a 256-pixel TAM-U-Net on
the phantom (resampled to 1.5 mm per pixel, about 5 minutes, kept under ``runs/bench_predict``
for the next run) and predicts with it:

    python benchmarks/bench_predict.py --train --name predict_trained
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import phantom_volumes, table, write_json  # noqa: E402


_SETUP = """
import sys, keras
from keras_livseg.models import build_model
from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
n = int(sys.argv[4])
keras.utils.set_random_seed(0)  # the same random model every run: its output sets post-processing's work
model = build_model(sys.argv[2], input_shape=(n, n, 1), filters=int(sys.argv[3]))
model.save(sys.argv[1] + '/model.keras')
write_preprocessing_json(sys.argv[1] + '/preprocessing.json', Preprocessing(image_size=(n, n), mean=60.0, std=40.0))
"""

_FORWARD = """
import resource, sys, time, numpy as np, keras
import keras_livseg.models
model = keras.saving.load_model(sys.argv[1], compile=False)
slices = int(sys.argv[3])
_, n, _, channels = model.input_shape  # the model's own size and context
batches = [np.random.default_rng(i).normal(size=(8, n, n, channels)).astype('float32') for i in range(-(-slices // 8))]
model.predict_on_batch(batches[0])  # build and trace once, as predict does
t = time.perf_counter()
for b in batches:
    model.predict_on_batch(b)
seconds = (time.perf_counter() - t) * slices / (8 * len(batches))
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_PREDICT = """
import resource, sys, time
from keras_livseg.inference import SegmentationModel, predict_paths
model = SegmentationModel.load(sys.argv[1])
model.predict_slices(__import__('numpy').zeros((8, int(sys.argv[3]), int(sys.argv[3]), model.context), 'float32'), spacing=(0.8, 0.8))  # the same one-off tracing
t = time.perf_counter()
post = None if sys.argv[4] == "none" else __import__("keras_livseg.inference", fromlist=["PostProcessing"]).PostProcessing()
out = predict_paths(model, [sys.argv[2]], sys.argv[5], batch_size=8, progress=False, postprocess=post)
seconds, rss = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
labels = __import__("nibabel").load(str(out[0].output)).get_fdata()
print(seconds, rss, float((labels >= 1).mean()))  # the share of voxels labelled liver or tumour
"""


TRAINED_RUNS = Path(__file__).resolve().parents[1] / "runs" / "bench_predict"


def train_model(image_size: int, quick: bool) -> Path:
    """A TAM-U-Net trained briefly on the phantom at ``image_size`` (kept for the next run)."""
    name = f"tam_unet-{image_size}" + ("-quick" if quick else "")
    checkpoint = TRAINED_RUNS / name / "checkpoints" / "best.keras"
    if checkpoint.is_file():
        return checkpoint
    # Phantom spacing is drawn for 512 pixels and scaled to the phantom's size; 1.5 mm per
    # pixel puts a 384 mm field on the model's 256 pixels, as 3 mm does for the demo's 128.
    settings = (["--set", "data.phantom_cases=4", "--set", "data.phantom_size=64", "--set", "data.phantom_slices=[8, 10]",
                 "--set", "model.filters=4", "--set", "model.depth=2", "--epochs", "1", "--steps-per-epoch", "2"]
                if quick else
                ["--set", "data.phantom_cases=24", "--set", f"data.phantom_size={image_size}",
                 "--epochs", "4", "--steps-per-epoch", "40"])
    subprocess.run([sys.executable, "-m", "keras_livseg.fit", "--runs-dir", str(TRAINED_RUNS), "--name", name,
                    "--no-export", "--image-size", str(image_size),
                    "--set", f"preprocessing.spacing_mm={384.0 / image_size}", "--set", "training.score_volumes=false",
                    *settings], check=True, cwd=TRAINED_RUNS.parents[1])
    return checkpoint


def run(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return [float(v) for v in out.split()[-3:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tam_unet")
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--size", type=int, default=512, help="volume rows and columns")
    parser.add_argument("--slices", type=int, default=119)
    parser.add_argument("--image-size", type=int, default=256, help="the model's input size")
    parser.add_argument("--quick", action="store_true", help="a test of the script: a tiny volume and model")
    parser.add_argument("--name", default="predict", help="JSON file name (predict_long for the 1000-slice run)")
    parser.add_argument("--checkpoint", help="a trained .keras model (its run's preprocessing.json found as predict finds it) "
                        "instead of a random one, e.g. the demo's runs/tam_unet-phantom_demo/checkpoints/best.keras")
    parser.add_argument("--repeats", type=int, default=3,
                        help="forward and predict runs, taking turns; the medians are compared (default 3)")
    parser.add_argument("--train", action="store_true",
                        help="train a 256-pixel model on the phantom first (or reuse it) and predict with it")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: give 1 or more")
    if args.quick:
        args.filters, args.size, args.slices, args.image_size, args.repeats = 4, 64, 9, 32, 1
    if args.train:
        args.checkpoint = str(train_model(args.image_size, args.quick))
    src = phantom_volumes(1, size=args.size, slices=(args.slices, args.slices), seed=3)
    volume = sorted(src.glob("volume-*.nii.gz"))[0]
    with tempfile.TemporaryDirectory() as work:
        if args.checkpoint:
            if not Path(args.checkpoint).is_file():
                raise SystemExit(f"{args.checkpoint} does not exist: train it first (python benchmarks/bench_real.py demo, "
                                 "or python -m keras_livseg.fit), or pass another trained .keras")
            model_file = str(Path(args.checkpoint).resolve())
            config = Path(model_file).parents[1] / "config.json"
            if config.is_file():  # describe the trained model as its run recorded it
                import json

                recorded = json.loads(config.read_text())
                args.model, args.filters = recorded["model"]["name"], recorded["model"].get("filters", args.filters)
                args.image_size = recorded["preprocessing"]["image_size"]
        else:
            model_file = work + "/model.keras"
            subprocess.run([sys.executable, "-c", _SETUP, work, args.model, str(args.filters), str(args.image_size)],
                           check=True, capture_output=True)
        # Forward and predict take turns, each in a fresh process; the medians make the ratio,
        # because the forward pass alone moves by ~10 % between runs on a shared machine.
        forward_runs, predict_runs, bare_runs = [], [], []
        for _ in range(args.repeats):
            forward_runs.append(run(_FORWARD, model_file, str(args.image_size), str(args.slices))[-2:])
            predict_runs.append(run(_PREDICT, model_file, str(volume), str(args.size), "default", work + "/out"))
            bare_runs.append(run(_PREDICT, model_file, str(volume), str(args.size), "none", work + "/bare"))
        forward_s, predict_s, bare_s = (float(np.median([r[0] for r in runs])) for runs in (forward_runs, predict_runs, bare_runs))
        forward_kb, predict_kb, bare_kb = (max(r[1] for r in runs) for runs in (forward_runs, predict_runs, bare_runs))
        labelled = bare_runs[-1][2]
    rows = [
        {"what": f"model forward only ({args.model}, filters {args.filters}, batch 8)", "seconds": f"{forward_s:.1f}",
         "x forward": "1.00", "peak RSS GB": f"{forward_kb / 2**20:.2f}"},
        {"what": "predict without post-processing", "seconds": f"{bare_s:.1f}",
         "x forward": f"{bare_s / forward_s:.2f}", "peak RSS GB": f"{bare_kb / 2**20:.2f}"},
        {"what": "predict: NIfTI in -> NIfTI out", "seconds": f"{predict_s:.1f}",
         "x forward": f"{predict_s / forward_s:.2f}", "peak RSS GB": f"{predict_kb / 2**20:.2f}"},
    ]
    print(f"{args.size}x{args.size}x{args.slices} phantom volume, model at {args.image_size}x{args.image_size}\n")
    print(table(rows, ["what", "seconds", "x forward", "peak RSS GB"]))
    path = write_json(args.name, {"model": args.model, "filters": args.filters, "size": args.size, "slices": args.slices,
                                  "image_size": args.image_size, "forward_s": forward_s, "forward_peak_rss_gb": forward_kb / 2**20,
                                  "predict_s": predict_s, "ratio": predict_s / forward_s,
                                  "predict_without_postprocessing_s": bare_s, "labelled_fraction": labelled,
                                  "predict_without_postprocessing_peak_rss_gb": bare_kb / 2**20,
                                  "model_weights": (f"trained: {args.checkpoint}" if args.checkpoint else
                                                    "random (untrained): it labels most of the volume, so post-processing "
                                                    "works on the whole scan instead of the liver's bounding box"),
                                  "checkpoint": (str(Path(args.checkpoint).resolve().relative_to(TRAINED_RUNS.parents[1]))
                                                 if args.train else args.checkpoint),
                                  "trained_by": ("`bench_predict.py --train`, 160 steps of batch 8 on 24 phantom cases "
                                                 f"at {args.image_size} pixels, resampled to {384.0 / args.image_size:g} mm "
                                                 "per pixel" if args.train else None),
                                  "predict_peak_rss_gb": predict_kb / 2**20, "repeats": args.repeats,
                                  "forward_runs_s": [r[0] for r in forward_runs], "predict_runs_s": [r[0] for r in predict_runs],
                                  "predict_without_postprocessing_runs_s": [r[0] for r in bare_runs]})
    print(f"\ngoals: <= 1.3x forward; peak RSS <= 3 GB -> {path}")


if __name__ == "__main__":
    main()
