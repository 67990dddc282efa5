"""Training throughput on an accelerator with the JAX backend, and its share of the device's peak.

For each model: build it from the registry, compile (Adam, the project's CE + Dice loss, XLA),
train on in-memory random batches already on the device, and time ``train_on_batch`` after a
warm-up. FLOPs of a training step are 3x the forward pass's, counted by XLA itself
(``cost_analysis`` of the jitted forward); the peak is measured on the same device as the
rate of a large bf16 matrix product (not the data sheet's figure). Goal (issue 10): the U-Net at
base 64 filters, 256x256, reaches at least 40 % of the measured bf16 matrix peak.

Runs without TensorFlow (the accelerator machines have JAX and PyTorch only): nothing here
imports it, and ``tests/benchmarks/test_bench_gpu.py`` runs ``--quick`` with TensorFlow's
import blocked.

    KERAS_BACKEND=jax python benchmarks/bench_gpu.py                      # U-Net, TAM-U-Net, EfficientNetB0-PAN
    KERAS_BACKEND=jax python benchmarks/bench_gpu.py --models unet --batch 32 --precision mixed_bfloat16
    python benchmarks/bench_gpu.py --quick                                # a test of the script on a CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import table, write_json  # noqa: E402

DEFAULT_MODELS = ("unet", "tam_unet", "effb0_pan")
#: Model options of the figures: the papers' sizes (base 64 for the U-Nets).
MODEL_OPTIONS = {"unet": {"filters": 64}, "tam_unet": {"filters": 64}, "effb0_pan": {}}
GOAL_SHARE = 0.40


def matmul_peak(dtype: str = "bfloat16", n: int = 8192, repeats: int = 20) -> float:
    """Measured FLOP/s of an ``n x n`` matrix product in ``dtype`` on the default device."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), dtype=jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype=jnp.float32).astype(dtype)
    product = jax.jit(lambda x, y: x @ y)
    product(a, b).block_until_ready()
    started = time.perf_counter()
    for _ in range(repeats):
        out = product(a, b)
    out.block_until_ready()
    return 2.0 * n**3 * repeats / (time.perf_counter() - started)


def forward_flops(model, batch) -> float | None:
    """FLOPs of one forward pass on ``batch``, as XLA counts them (None where it does not say)."""
    import jax

    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=True)[0]

    lowered = jax.jit(forward).lower(
        [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], batch
    )
    analysis = lowered.compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None


def measure(name: str, size: int, batch: int, precision: str, steps: int, warmup: int, options: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from keras_livseg.models import build_model
    from keras_livseg.training.losses import CombinedCEDiceLoss

    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model = build_model(name, input_shape=(size, size, 1), **options)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=CombinedCEDiceLoss(), jit_compile=True)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, size, size, 1)).astype("float32"))
    masks = jnp.asarray(rng.integers(0, 3, size=(batch, size, size)).astype("int32"))
    for _ in range(warmup):  # compilation and autotuning
        model.train_on_batch(images, masks)
    started = time.perf_counter()
    for _ in range(steps):
        loss = model.train_on_batch(images, masks)  # returns host floats: each step is synchronized
    seconds = (time.perf_counter() - started) / steps
    flops = forward_flops(model, images)
    return {
        "model": name, "options": options, "size": size, "batch": batch, "precision": precision,
        "step_ms": seconds * 1e3, "slices_per_s": batch / seconds, "loss": float(np.asarray(loss).ravel()[0]),
        "parameters": int(model.count_params()),
        "train_flops_per_step": 3 * flops if flops else None,
        "achieved_tflops": 3 * flops / seconds / 1e12 if flops else None,
        "device": str(jax.devices()[0].device_kind),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default=None,
                        help="Keras dtype policy (default: mixed_bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-n", type=int, default=8192, help="side of the matrices of the peak measurement")
    parser.add_argument("--quick", action="store_true", help="a test of the script: tiny models and sizes, any device")
    parser.add_argument("--name", default="gpu", help="results/NAME.json")
    args = parser.parse_args()

    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("bench_gpu measures the JAX backend: run it with KERAS_BACKEND=jax")
    device = jax.devices()[0]
    on_accelerator = device.platform != "cpu"
    precision = args.precision or ("mixed_bfloat16" if on_accelerator else "float32")
    options = dict(MODEL_OPTIONS)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup, args.peak_n = 32, 2, 2, 1, 512
        options = {"unet": {"filters": 4, "depth": 2}, "tam_unet": {"filters": 4, "depth": 2},
                   "effb0_pan": {"decoder_filters": 8}}
    print(f"device: {device.device_kind} ({device.platform}); policy {precision}; measuring the bf16 matrix peak ...", flush=True)
    peak = matmul_peak("bfloat16", args.peak_n)
    rows, results = [], []
    for name in args.models:
        print(f"{name}: {args.size}x{args.size}, batch {args.batch} ...", flush=True)
        result = measure(name, args.size, args.batch, precision, args.steps, args.warmup, options.get(name, {}))
        result["share_of_peak"] = result["achieved_tflops"] * 1e12 / peak if result["achieved_tflops"] else None
        results.append(result)
        share = result["share_of_peak"]
        rows.append({
            "model": name, "slices/s": f"{result['slices_per_s']:.1f}", "step ms": f"{result['step_ms']:.1f}",
            "TFLOP/s": f"{result['achieved_tflops']:.2f}" if result["achieved_tflops"] else "–",
            "share of peak": f"{share:.1%}" if share is not None else "–",
        })
    print(f"\nmeasured bf16 matrix peak: {peak / 1e12:.1f} TFLOP/s ({args.peak_n}x{args.peak_n})\n")
    print(table(rows, ["model", "slices/s", "step ms", "TFLOP/s", "share of peak"]))
    payload = {"device": str(device.device_kind), "platform": device.platform, "precision": precision,
               "size": args.size, "batch": args.batch, "steps": args.steps, "peak_bf16_tflops": peak / 1e12,
               "goal_share_unet": GOAL_SHARE, "quick": args.quick, "results": results}
    print(f"\ngoal: U-Net (base 64, 256x256) >= {GOAL_SHARE:.0%} of the measured peak -> {write_json(args.name, payload)}")


if __name__ == "__main__":
    main()
