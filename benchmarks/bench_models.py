"""Benchmark every model of the registry: parameters, GFLOPs, train step time, peak RSS, vs PyTorch.

For each model at SIZE x SIZE, batch BATCH, on this machine: parameters, forward
GFLOPs per slice (TensorFlow profiler on the frozen inference graph, multiply-add =
2 FLOPs), train step time in float32 and mixed_bfloat16 (Adam as ``fit`` makes it,
categorical cross entropy, ``train_on_batch``; the best of the timed steps after warm-up, the one
least disturbed by other users of a shared machine; medians are in the JSON), peak
RSS of the process. The same architecture in PyTorch is timed in the same run,
float32, and the table gives Keras slices/s over PyTorch slices/s (goal >= 1.5); both are
also timed in mixed bfloat16 (Keras' ``mixed_bfloat16`` policy, PyTorch's CPU autocast), the
precision ``precision = "auto"`` trains in on a CPU with native bfloat16 where it is faster.

The PyTorch side (:func:`torch_side`, :data:`SMP_CONFIGS`): segmentation_models.pytorch
0.6 where it has the architecture (linknet, pspnet, manet, segformer; no pretrained
weights), the hand-written twins of ``torch_twins.py`` otherwise (the U-Nets,
effb0_pan); parameter counts checked equal, counting only the modules a forward pass
runs (smp's PSPNet builds ResNet stages it never calls). deeplabv3plus is keras-cv's
(ResNetV2 backbone), which smp has no twin of: its row times the closest smp
DeepLabV3Plus (ResNet-18), not the same architecture, so its ratio is reported and
not judged. deeplabv3plus and segformer need the [cv] extra on the Keras side.

Share of peak: the machine's float32 matrix-multiply peak is measured in the same run
(:func:`worker_peak`: the best GFLOP/s of 2048x2048 matmuls, TensorFlow and PyTorch each in
its own process, the higher kept), and each side's train step is put against it at 3x the
forward GFLOPs (forward, input gradient, weight gradient). A model whose Keras step already
runs near the peak cannot be made faster without doing less arithmetic.

Keras options: the U-Nets at --filters/--depth, effb0_pan at --decoder-filters, the
others at their registry defaults.

Every measurement runs in its own subprocess (fresh peak RSS, fresh dtype policy),
Keras and PyTorch alternating per model so that load from other users of the
machine hits both alike.

Usage:
    python benchmarks/bench_models.py                 # all ten models, U-Nets at base 16
    python benchmarks/bench_models.py --quick         # fewer steps
    python benchmarks/bench_models.py --filters 64 --models unet
    python benchmarks/bench_models.py --quick --size 64 --models linknet attention_unet
Writes benchmarks/results/models.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, step_times  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("KERAS_LIVSEG_BENCH_RESULTS") or ROOT / "benchmarks" / "results") / "models.json"
# keras_livseg.models.available_models(), spelled out so that this process imports neither
# TensorFlow nor torch (a test checks the two agree).
MODELS = (
    "unet", "tam_unet", "effb0_pan", "attention_unet", "unet_cbam",
    "linknet", "pspnet", "manet", "deeplabv3plus", "segformer",
)
UNETS = ("unet", "tam_unet", "attention_unet", "unet_cbam")

# smp 0.6 configurations: the Keras model's defaults, layer for layer, except deeplabv3plus.
SMP_CONFIGS = {
    "linknet": ("Linknet", {"encoder_name": "resnet34", "encoder_depth": 5, "decoder_use_norm": "batchnorm"}),
    "pspnet": ("PSPNet", {"encoder_name": "resnet34", "encoder_depth": 3, "psp_out_channels": 512,
                          "decoder_use_norm": "batchnorm", "psp_dropout": 0.2, "upsampling": 8}),
    "manet": ("MAnet", {"encoder_name": "resnet34", "encoder_depth": 5, "decoder_use_norm": "batchnorm",
                        "decoder_channels": (256, 128, 64, 32, 16), "decoder_pab_channels": 64,
                        "decoder_interpolation": "nearest"}),
    "segformer": ("Segformer", {"encoder_name": "mit_b0", "decoder_segmentation_channels": 256}),
    "deeplabv3plus": ("DeepLabV3Plus", {"encoder_name": "resnet18", "encoder_output_stride": 16,
                                        "decoder_channels": 256, "decoder_atrous_rates": (6, 12, 18),
                                        "decoder_aspp_separable": False, "upsampling": 4}),
}


def torch_side(name: str) -> dict:
    """How the PyTorch side of ``name`` is built: ``built_by`` (the table's words), ``same_architecture``."""
    if name in SMP_CONFIGS:
        cls, options = SMP_CONFIGS[name]
        same = name != "deeplabv3plus"
        built_by = f"smp.{cls}" if same else f"closest smp ({cls}, {options['encoder_name']}), not the same architecture"
        return {"built_by": built_by, "same_architecture": same, "smp_class": cls,
                "smp_options": {**options, "encoder_weights": None}}
    twin = "EffB0PAN" if name == "effb0_pan" else f'UNet(variant="{name}")'
    return {"built_by": "hand-written twin", "same_architecture": True, "twin": f"torch_twins.{twin}"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def keras_options(args, name) -> dict:
    if name == "effb0_pan":
        return {"decoder_filters": args.decoder_filters}
    if name in UNETS:
        return {"filters": args.filters, "depth": args.depth}
    return {}


def build_keras(args, name):
    from keras_livseg.models import build_model

    return build_model(name, input_shape=(args.size, args.size, args.channels), **keras_options(args, name))


def build_torch(args, name):
    """The PyTorch side of ``name`` (see :func:`torch_side`), logits out, ``(N, C, H, W)`` in."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_twins import EffB0PAN, UNet

    if name in SMP_CONFIGS:
        import segmentation_models_pytorch as smp

        cls, options = SMP_CONFIGS[name]
        return getattr(smp, cls)(encoder_weights=None, in_channels=args.channels, classes=3, **options)
    if name == "effb0_pan":
        return EffB0PAN(args.channels, 3, decoder_filters=args.decoder_filters)
    return UNet(args.channels, 3, args.filters, args.depth, variant=name)


def worker_keras(args) -> dict:
    from keras_livseg import cli

    cli.quiet_tensorflow()
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))

    from keras_livseg.training.optimizers import FusedAdam, build_optimizer_variables

    keras.config.set_dtype_policy(args.policy)
    shape = (args.size, args.size, args.channels)
    model = build_keras(args, args.model)
    # The optimizer as `fit` makes it: Keras' Adam with one fused update per variable, its
    # variables built before the first step (keras_livseg/training/optimizers.py).
    model.compile(optimizer=FusedAdam(1e-4), loss="categorical_crossentropy")
    build_optimizer_variables(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch,) + shape).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, (args.batch, args.size, args.size)), 3)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # trace (and XLA-compile when jit is on)
    first = time.perf_counter() - start
    times = step_times(lambda: model.train_on_batch(x, y), args.steps, warmup=args.warmup - 1)
    result = {
        "params": int(model.count_params()),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "first_step_s": first,
        "step_s": min(times),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "jit_compile": bool(getattr(model, "jit_compile", False)),
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.policy == "float32":
        from keras_livseg.models.complexity import count_flops

        result["gflops_per_slice"] = count_flops(model) / 1e9
    return result


def worker_torch(args) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_twins import count_used_params

    torch.manual_seed(0)
    model = build_torch(args, args.model)
    counts = count_used_params(model, torch.zeros(1, args.channels, args.size, args.size))
    flops = forward_gflops_torch(model, torch.zeros(1, args.channels, args.size, args.size))
    # PyTorch's own fused Adam kernel, the counterpart of the Keras side's FusedAdam
    optimizer = torch.optim.Adam(model.parameters(), 1e-4, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(args.batch, args.channels, args.size, args.size)).astype("float32"))
    y = torch.from_numpy(rng.integers(0, 3, (args.batch, args.size, args.size)))
    model.train()

    # mixed_bfloat16: torch.autocast on the CPU, PyTorch's counterpart of Keras' mixed policy
    # (convolutions and matmuls in bfloat16, weights and the loss in float32).
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.policy == "mixed_bfloat16")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = step_times(step, args.steps, warmup=args.warmup - 1)
    return {
        "params": counts["params"],
        "trainable_params": counts["trainable"],
        "params_all_modules": counts["params_all_modules"],
        "matmul_conv_gflops_per_slice": flops,
        "first_step_s": first,
        "step_s": min(times),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_rss_mb": peak_rss_mb(),
    }


def worker_peak(framework: str, size: int = 2048, repeats: int = 10) -> dict:
    """Best float32 GFLOP/s of ``size x size`` matmuls in ``framework`` (2 size^3 FLOPs each)."""
    import numpy as np

    a = np.random.default_rng(0).normal(size=(size, size)).astype("float32")
    if framework == "keras":
        from keras_livseg import cli

        cli.quiet_tensorflow()
        import tensorflow as tf

        x = tf.constant(a)
        run = lambda: tf.linalg.matmul(x, x).numpy()  # noqa: E731
    else:
        import torch

        x = torch.from_numpy(a)
        run = lambda: torch.mm(x, x)  # noqa: E731
    times = step_times(run, repeats, warmup=3)
    return {"gflops_per_s": 2 * size**3 / min(times) / 1e9, "size": size}


def share_of_peak(result: dict, gflops_per_slice: float | None, batch: int, peak: float | None) -> float | None:
    """A train step's FLOP rate (3x forward) as a fraction of the measured matmul peak."""
    if not gflops_per_slice or not peak or "step_s" not in result:
        return None
    return 3 * gflops_per_slice * batch / result["step_s"] / peak


def forward_gflops_torch(model, sample) -> float:
    """Convolution and matmul GFLOPs of one forward pass (torch's FlopCounterMode; elementwise ops not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(sample)
    finally:
        model.train()
    return counter.get_total_flops() / 1e9


def run_worker(args, framework, model, policy) -> dict:
    command = [
        sys.executable, __file__, "--worker", framework, "--model", model, "--policy", policy,
        "--size", str(args.size), "--batch", str(args.batch), "--channels", str(args.channels),
        "--filters", str(args.filters), "--depth", str(args.depth),
        "--decoder-filters", str(args.decoder_filters),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]
    started, load = time.perf_counter(), os.getloadavg()[0]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        return {"error": " | ".join(tail)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # torch's OpenMP threads stall at every barrier when another process holds a core: the load shows it.
    result["wall_s"], result["load_average_at_start"] = time.perf_counter() - started, load
    return result


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def params_match(keras_result: dict, torch_result: dict) -> bool | None:
    """Trainable parameters equal, and parameters plus BatchNorm statistics equal; None when one side failed."""
    keys = ("params", "trainable_params")
    if not all(key in keras_result and key in torch_result for key in keys):
        return None
    return all(keras_result[key] == torch_result[key] for key in keys)


def params_cell(row: dict) -> str:
    match, side = row.get("params_match"), row.get("torch_side", {})
    if match is None:
        return "–"
    if match:
        # smp's PSPNet(encoder_depth=3) builds ResNet stages that never run; the check counts what runs.
        unused = row["torch_float32"].get("params_all_modules", 0) - row["torch_float32"]["params"]
        return f"✓ equal (PyTorch: {unused:,} more in modules never run)" if unused else "✓ equal"
    theirs = f"PyTorch {row['torch_float32']['trainable_params']:,} trainable"
    return f"✗ {theirs}" if side.get("same_architecture", True) else f"differs ({theirs})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="registry names (default: all ten)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--filters", type=int, default=16, help="U-Net base filters (paper: 64)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--decoder-filters", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 timed steps, 1 warm-up")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--policy", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("keras", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1

    if args.worker:
        if args.peak:
            result = worker_peak(args.worker)
        else:
            result = worker_keras(args) if args.worker == "keras" else worker_torch(args)
        print(json.dumps(result))
        return 0

    peaks = {}
    for framework in ("keras",) + (() if args.no_torch else ("torch",)):
        print(f"[bench] float32 matmul peak, {framework} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--worker", framework, "--peak"], capture_output=True, text=True)
        if done.returncode == 0:
            peaks[framework] = json.loads(done.stdout.strip().splitlines()[-1])["gflops_per_s"]
    peak = max(peaks.values()) if peaks else None

    rows = []
    for name in args.models:
        row = {"model": name, "keras_options": keras_options(args, name), "torch_side": torch_side(name)}
        runs = [("keras", "float32"), ("torch", "float32"), ("keras", "mixed_bfloat16"), ("torch", "mixed_bfloat16")]
        for framework, policy in runs:
            if framework == "torch" and args.no_torch:
                continue
            print(f"[bench] {name} {framework} {policy} ...", file=sys.stderr, flush=True)
            row[f"{framework}_{policy}"] = run_worker(args, framework, name, policy)
        row["params_match"] = params_match(row["keras_float32"], row.get("torch_float32", {}))
        flops = row["keras_float32"].get("gflops_per_slice")
        row["keras_share_of_peak"] = share_of_peak(row["keras_float32"], flops, args.batch, peak)
        if row.get("torch_side", {}).get("same_architecture", True):
            row["torch_share_of_peak"] = share_of_peak(row.get("torch_float32", {}), flops, args.batch, peak)
        rows.append(row)

    for row in rows:
        k32, p32 = row.get("keras_float32", {}), row.get("torch_float32", {})
        row["keras_over_torch"] = p32["step_s"] / k32["step_s"] if "step_s" in k32 and "step_s" in p32 else None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("worker", "model", "policy", "output")},
                     "keras_optimizer": "fit"},  # FusedAdam, built before the first step (worker_keras)
        "machine": machine(),
        "float32_matmul_peak_gflops": {"by_framework": peaks, "peak": peak},
        "rows": rows,
    }
    from readme_tables import render_models  # the README's table, printed as the README shows it

    payload["table"] = render_models(payload)
    print(payload["table"])
    args.output.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
