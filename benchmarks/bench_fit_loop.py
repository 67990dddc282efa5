"""Training-loop overhead: ``fit`` from TFRecord shards (augmentation, oversampling, metrics)
against the same model's step rate on in-memory random tensors, side by side.

Goal (issue 12): shards ≥ 0.9× in-memory: the input pipeline and the metrics must not
starve the model. Model and data: the demo's (TAM-U-Net base 16, 128×128×3, batch 8), on whole
slices, and then as the demo trains it: the any-size twin on the recipe's patches
(``training.crop_size``, 64×64), with the recipe's augmentation, tumour sampling, optimizer and
loss. A patch step is several times cheaper than a whole-slice one, so there the pipeline's
share of the two cores is largest. Each patch measurement alternates in-memory and shards for
``--rounds`` rounds and keeps each one's best.

    python benchmarks/bench_fit_loop.py [--steps 40] [--patch-steps 120] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402


class _Timer:
    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self):
        import keras

        timer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                timer.times.append(time.perf_counter())

        return Callback()


def steps_per_second(model, data, steps: int, warmup: int) -> float:
    timer = _Timer()
    model.fit(data, epochs=1, steps_per_epoch=steps + warmup, verbose=0, callbacks=[timer()])
    spans = timer.times[warmup:]
    return (len(spans) - 1) / (spans[-1] - spans[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--patch-steps", type=int, default=120, help="timed steps of each patch measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the patch measurements")
    parser.add_argument("--quick", action="store_true", help="a test of the script: tiny phantom, model and step count")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from keras_livseg.data.dataset import make_dataset
    from keras_livseg.data.prepare import load_manifest
    from keras_livseg.models import build_model
    from keras_livseg.training.fit import _model_options, ensure_data, resolve_config
    from keras_livseg.training.losses import CombinedCEDiceLoss
    from keras_livseg.training.metrics import default_metrics
    from keras_livseg.training.precision import apply_precision

    overrides = {}
    if args.quick:
        args.steps, args.warmup, args.patch_steps, args.rounds = 3, 1, 3, 1
        overrides = {"data": {"phantom_cases": 4, "phantom_size": 64, "phantom_slices": [8, 10]},
                     "preprocessing": {"image_size": 32, "spacing_mm": 6.0},
                     "model": {"filters": 4, "depth": 2}, "training": {"batch_size": 2, "crop_size": 16}}
    config = resolve_config("phantom_demo.toml", overrides)
    manifest = load_manifest(ensure_data(config))
    height, width = manifest["preprocessing"]["image_size"]
    context = manifest["preprocessing"]["context"]
    batch = int(config["training"]["batch_size"])
    policy = apply_precision(config["training"]["precision"])
    options = _model_options(config)  # what fit passes to build_model

    def compiled(with_metrics: bool):
        keras.utils.set_random_seed(0)
        model = build_model(config["model"]["name"], input_shape=(height, width, context), **options)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=CombinedCEDiceLoss(),
                      metrics=default_metrics() if with_metrics else None)
        return model

    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch * 4, height, width, context)).astype("float32")
    masks = rng.integers(0, 3, size=(batch * 4, height, width)).astype("int32")
    in_memory = tf.data.Dataset.from_tensor_slices((images, masks)).batch(batch).repeat().prefetch(2)
    shards = make_dataset(manifest, "train", batch, cache=True, seed=0,
                          foreground_fraction=float(config["training"]["foreground_fraction"]))

    memory_rate = steps_per_second(compiled(False), in_memory, args.steps, args.warmup)
    shard_rate = steps_per_second(compiled(True), shards, args.steps, args.warmup)
    patches = patch_rates(config, manifest, options, args.patch_steps, args.warmup, args.rounds)
    rows = [
        {"input": "in-memory random tensors, no metrics", "steps/s": f"{memory_rate:.2f}",
         "slices/s": f"{memory_rate * batch:.1f}", "ratio": "1.00"},
        {"input": "TFRecord shards, augmentation, oversampling, all metrics", "steps/s": f"{shard_rate:.2f}",
         "slices/s": f"{shard_rate * batch:.1f}", "ratio": f"{shard_rate / memory_rate:.2f}"},
    ]
    crop = patches["crop"]
    rows += [
        {"input": f"{crop}x{crop} patches, in-memory random tensors, no metrics", "steps/s": f"{patches['in_memory_steps_per_s']:.2f}",
         "slices/s": f"{patches['in_memory_steps_per_s'] * batch:.1f}", "ratio": "1.00"},
        {"input": f"{crop}x{crop} patches from the shards, all metrics, as fit trains the demo", "steps/s": f"{patches['shards_steps_per_s']:.2f}",
         "slices/s": f"{patches['shards_steps_per_s'] * batch:.1f}", "ratio": f"{patches['ratio']:.2f}"},
    ]
    print(f"{config['model']['name']} at {height}x{width}x{context}, batch {batch}, {policy}\n")
    print(table(rows, ["input", "steps/s", "slices/s", "ratio"]))
    path = write_json("fit_loop", {"in_memory_steps_per_s": memory_rate, "shards_steps_per_s": shard_rate,
                                   "ratio": shard_rate / memory_rate, "policy": policy, "batch": batch,
                                   "model": config["model"]["name"], "input": [height, width, context],
                                   "steps": args.steps, "patches": patches, "quick": args.quick})
    print(f"\ngoal: ratio >= 0.9 (whole slices {shard_rate / memory_rate:.2f}, patches {patches['ratio']:.2f}) -> {path}")


def patch_rates(config: dict, manifest: dict, options: dict, steps: int, warmup: int, rounds: int) -> dict:
    """Steps/s of the demo's patch training from the shards and from in-memory tensors (best of ``rounds``)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_livseg.data.augment import Augmentation
    from keras_livseg.data.dataset import make_dataset
    from keras_livseg.models import any_size, build_model
    from keras_livseg.training.fit import build_loss, build_optimizer
    from keras_livseg.training.metrics import default_metrics
    from keras_livseg.training.optimizers import build_optimizer_variables

    training = config["training"]
    crop, batch = int(training["crop_size"]), int(training["batch_size"])
    height, width = manifest["preprocessing"]["image_size"]
    context = manifest["preprocessing"]["context"]

    def trainer(with_metrics: bool):  # compiled as fit compiles it
        keras.utils.set_random_seed(0)
        model = any_size(build_model(config["model"]["name"], input_shape=(height, width, context), **options), crop)
        model.compile(optimizer=build_optimizer(training, 10_000), loss=build_loss(training, "softmax"),
                      metrics=default_metrics(head="softmax") if with_metrics else None)
        build_optimizer_variables(model)
        return model

    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch * 4, crop, crop, context)).astype("float32")
    masks = rng.integers(0, 3, size=(batch * 4, crop, crop)).astype("int32")
    in_memory = tf.data.Dataset.from_tensor_slices((images, masks)).batch(batch).repeat().prefetch(2)
    shards = make_dataset(manifest, "train", batch, augmentation=Augmentation.from_config(training["augmentation"]),
                          crop_size=crop, foreground_fraction=float(training["foreground_fraction"]),
                          tumor_sampling=str(training["tumor_sampling"]), cache=bool(training["cache"]), seed=0,
                          shuffle_buffer=int(training["shuffle_buffer"]))
    memory_model, shard_model = trainer(False), trainer(True)  # as the whole-slice rows: the loop's whole cost
    memory_runs, shard_runs = [], []
    for _ in range(rounds):  # alternating: a change in the machine's load falls on both
        memory_runs.append(steps_per_second(memory_model, in_memory, steps, warmup))
        shard_runs.append(steps_per_second(shard_model, shards, steps, warmup))
    return {"crop": crop, "in_memory_steps_per_s": max(memory_runs), "shards_steps_per_s": max(shard_runs),
            "ratio": max(shard_runs) / max(memory_runs), "in_memory_runs": memory_runs, "shards_runs": shard_runs,
            "steps": steps, "rounds": rounds}


if __name__ == "__main__":
    main()
