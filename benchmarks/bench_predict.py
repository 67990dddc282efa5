"""predict on a 512x512x119 volume: wall time against the model's own forward time, peak RSS.

Goals (DESIGN.md): predict wall time <= 1.3x the model's forward time over the same slices
(batch 8, 256x256); peak RSS <= 3 GB. Both run in fresh processes, one after the other.
The forward side is ``model.predict_on_batch`` on ready-made standardized batches; the
predict side is the whole command path: read the NIfTI, preprocess, forward, resize the
probabilities back to 512x512, post-process, write the label map.

    python benchmarks/bench_predict.py [--model tam_unet] [--filters 16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import phantom_volumes, table, write_json  # noqa: E402

_SETUP = """
import sys, keras
from keras_livseg.models import build_model
from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
model = build_model(sys.argv[2], input_shape=(256, 256, 1), filters=int(sys.argv[3]))
model.save(sys.argv[1] + '/model.keras')
write_preprocessing_json(sys.argv[1] + '/preprocessing.json', Preprocessing(image_size=(256, 256), mean=60.0, std=40.0))
"""

_FORWARD = """
import resource, sys, time, numpy as np, keras
import keras_livseg.models
model = keras.saving.load_model(sys.argv[1] + '/model.keras', compile=False)
batches = [np.random.default_rng(i).normal(size=(8, 256, 256, 1)).astype('float32') for i in range(15)]
model.predict_on_batch(batches[0])  # build and trace once, as predict does
t = time.perf_counter()
for b in batches:
    model.predict_on_batch(b)
seconds = (time.perf_counter() - t) * 119 / 120
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

_PREDICT = """
import resource, sys, time
from keras_livseg.inference import SegmentationModel, predict_paths
model = SegmentationModel.load(sys.argv[1] + '/model.keras')
model.predict_slices(__import__('numpy').zeros((8, 512, 512), 'float32'))  # the same one-off tracing
t = time.perf_counter()
predict_paths(model, [sys.argv[2]], sys.argv[1] + '/out', batch_size=8, progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout
    return [float(v) for v in out.split()[-2:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tam_unet")
    parser.add_argument("--filters", type=int, default=16)
    args = parser.parse_args()
    src = phantom_volumes(1, size=512, slices=(119, 119), seed=3)
    volume = sorted(src.glob("volume-*.nii.gz"))[0]
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-c", _SETUP, work, args.model, str(args.filters)], check=True, capture_output=True)
        forward_s, forward_kb = run(_FORWARD, work)
        predict_s, predict_kb = run(_PREDICT, work, str(volume))
    rows = [
        {"what": f"model forward only ({args.model}, filters {args.filters}, batch 8)", "seconds": f"{forward_s:.1f}",
         "x forward": "1.00", "peak RSS GB": f"{forward_kb / 2**20:.2f}"},
        {"what": "predict: NIfTI in -> NIfTI out", "seconds": f"{predict_s:.1f}",
         "x forward": f"{predict_s / forward_s:.2f}", "peak RSS GB": f"{predict_kb / 2**20:.2f}"},
    ]
    print("512x512x119 phantom volume, model at 256x256\n")
    print(table(rows, ["what", "seconds", "x forward", "peak RSS GB"]))
    path = write_json("predict", {"model": args.model, "filters": args.filters, "forward_s": forward_s,
                                  "predict_s": predict_s, "ratio": predict_s / forward_s,
                                  "predict_peak_rss_gb": predict_kb / 2**20})
    print(f"\ngoals: <= 1.3x forward; peak RSS <= 3 GB -> {path}")


if __name__ == "__main__":
    main()
