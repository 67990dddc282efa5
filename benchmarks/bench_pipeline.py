"""tf.data pipeline throughput at 256x256 with full augmentation, against a naive loader.

Goals (DESIGN.md): >= 1,000 slices/s on 2 cores; >= 20x a naive loader that re-reads the
NIfTI volumes every epoch. Two naive loaders are measured, both spared the augmentation
they would also need:

- "typical": what a first training script does: ``get_fdata()`` (float64), then per slice
  ``scipy.ndimage.zoom`` (linear), window and standardize;
- "vectorized": the same I/O, but this package's vectorized NumPy preprocessing
  (``Preprocessing.model_input``): the floor for any loader that re-reads NIfTI.

    python benchmarks/bench_pipeline.py [--cases 4] [--batch-size 32] [--batches 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, phantom_volumes, table, write_json  # noqa: E402


def typical_naive_epoch(src: Path, prep) -> int:
    """One epoch of a first-script loader: float64 volumes, per-slice scipy zoom."""
    import glob

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    produced = 0
    for path in sorted(glob.glob(str(src / "volume-*.nii.gz"))):
        volume = nib.load(path).get_fdata()
        nib.load(path.replace("volume-", "segmentation-")).get_fdata()
        for k in range(volume.shape[2]):
            factor = (prep.image_size[0] / volume.shape[0], prep.image_size[1] / volume.shape[1])
            image = ndimage.zoom(np.clip(volume[:, :, k], *prep.window), factor, order=1)
            (image - prep.mean) / prep.std
            produced += 1
    return produced


def naive_epoch(src: Path, prep) -> int:
    """One epoch of a loader that reads NIfTI every time: returns the slices produced."""
    from keras_livseg.data.volumes import discover_cases, load_case

    produced = 0
    for files in discover_cases(src):
        case = load_case(files)
        slices = prep.model_input(case.image, range(case.image.shape[2]))
        produced += len(slices)
    return produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()

    from keras_livseg.data.dataset import make_dataset
    from keras_livseg.data.prepare import MANIFEST_NAME, PrepareOptions, load_manifest, prepare_dataset
    from keras_livseg.data.preprocessing import Preprocessing

    src = phantom_volumes(args.cases)
    shards = DATA / f"bench-shards-{src.name}-256"
    if not (shards / MANIFEST_NAME).is_file():
        prepare_dataset(PrepareOptions(src, shards, image_size=256, split=(1, 0, 0), progress=False, resume=True))
    manifest = load_manifest(shards)
    prep = Preprocessing.from_dict(manifest["preprocessing"])

    dataset = make_dataset(manifest, "train", args.batch_size, cache=True, seed=0)
    iterator = iter(dataset)
    for _ in range(max(5, manifest["splits"]["train"]["slices"] // args.batch_size + 2)):  # fill the cache
        next(iterator)
    started = time.perf_counter()
    for _ in range(args.batches):
        images, _masks = next(iterator)
    _ = images.numpy()
    pipeline_rate = args.batches * args.batch_size / (time.perf_counter() - started)

    started = time.perf_counter()
    produced = naive_epoch(src, prep)
    naive_rate = produced / (time.perf_counter() - started)
    started = time.perf_counter()
    produced = typical_naive_epoch(src, prep)
    typical_rate = produced / (time.perf_counter() - started)

    rows = [
        {"loader": "tf.data (shards, full augmentation, oversampling)", "slices/s": f"{pipeline_rate:,.0f}",
         "x typical naive": f"{pipeline_rate / typical_rate:.1f}", "x vectorized naive": f"{pipeline_rate / naive_rate:.1f}"},
        {"loader": "naive, typical (get_fdata + scipy zoom per slice)", "slices/s": f"{typical_rate:,.0f}",
         "x typical naive": "1.0", "x vectorized naive": f"{typical_rate / naive_rate:.2f}"},
        {"loader": "naive, vectorized (re-read NIfTI, our NumPy preprocessing)", "slices/s": f"{naive_rate:,.0f}",
         "x typical naive": f"{naive_rate / typical_rate:.1f}", "x vectorized naive": "1.0"},
    ]
    print(f"{manifest['splits']['train']['slices']} slices at 256x256, batch {args.batch_size}\n")
    print(table(rows, ["loader", "slices/s", "x typical naive", "x vectorized naive"]))
    path = write_json("pipeline", {"pipeline_slices_per_s": pipeline_rate, "naive_vectorized_slices_per_s": naive_rate,
                                   "naive_typical_slices_per_s": typical_rate, "batch_size": args.batch_size,
                                   "ratio_typical": pipeline_rate / typical_rate, "ratio_vectorized": pipeline_rate / naive_rate})
    print(f"\ngoals: >= 1,000 slices/s; >= 20x naive -> {path}")


if __name__ == "__main__":
    main()
