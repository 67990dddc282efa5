"""tf.data pipeline throughput at 256x256 with full augmentation, against a naive loader.

Goals (DESIGN.md): >= 1,000 slices/s on 2 cores; >= 20x a naive loader that re-reads the
NIfTI volumes every epoch (load, window, resize, standardize in NumPy, no augmentation:
the naive side is spared the augmentation it would also need).

    python benchmarks/bench_pipeline.py [--cases 4] [--batch-size 32] [--batches 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, phantom_volumes, table, write_json  # noqa: E402


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

    rows = [
        {"loader": "tf.data (shards, full augmentation, oversampling)", "slices/s": f"{pipeline_rate:,.0f}", "x naive": f"{pipeline_rate / naive_rate:.1f}"},
        {"loader": "naive (re-read NIfTI each epoch, no augmentation)", "slices/s": f"{naive_rate:,.0f}", "x naive": "1.0"},
    ]
    print(f"{manifest['splits']['train']['slices']} slices at 256x256, batch {args.batch_size}\n")
    print(table(rows, ["loader", "slices/s", "x naive"]))
    path = write_json("pipeline", {"pipeline_slices_per_s": pipeline_rate, "naive_slices_per_s": naive_rate,
                                   "ratio": pipeline_rate / naive_rate, "batch_size": args.batch_size})
    print(f"\ngoals: >= 1,000 slices/s; >= 20x naive -> {path}")


if __name__ == "__main__":
    main()
