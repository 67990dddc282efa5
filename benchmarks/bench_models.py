"""Benchmark every model of the registry: parameters, GFLOPs, train step time, peak RSS, vs PyTorch.

For each model at SIZE x SIZE, batch BATCH, on this machine: parameters, forward
GFLOPs per slice (TensorFlow profiler on the frozen inference graph, multiply-add =
2 FLOPs), train step time in float32 and mixed_bfloat16 (Adam, categorical cross
entropy, ``train_on_batch``; the best of the timed steps after warm-up, the one
least disturbed by other users of a shared machine; medians are in the JSON), peak
RSS of the process. The same architecture in PyTorch is timed in the same run,
float32, and the table gives Keras slices/s over PyTorch slices/s (goal >= 1.5).

The PyTorch side (:func:`torch_side`, :data:`SMP_CONFIGS`): segmentation_models.pytorch
0.6 where it has the architecture (linknet, pspnet, manet, segformer; no pretrained
weights), the hand-written twins of ``torch_twins.py`` otherwise (the U-Nets,
effb0_pan); parameter counts checked equal, counting only the modules a forward pass
runs (smp's PSPNet builds ResNet stages it never calls). deeplabv3plus is keras-cv's
(ResNetV2 backbone), which smp has no twin of: its row times the closest smp
DeepLabV3Plus (ResNet-18), not the same architecture, so its ratio is reported and
not judged. deeplabv3plus and segformer need the [cv] extra on the Keras side.

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
from _common import machine  # noqa: E402

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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))

    keras.config.set_dtype_policy(args.policy)
    shape = (args.size, args.size, args.channels)
    model = build_keras(args, args.model)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch,) + shape).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, (args.batch, args.size, args.size)), 3)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # trace (and XLA-compile when jit is on)
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        model.train_on_batch(x, y)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
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
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(args.batch, args.channels, args.size, args.size)).astype("float32"))
    y = torch.from_numpy(rng.integers(0, 3, (args.batch, args.size, args.size)))
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
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


def ratio_cell(ratio: float | None, row: dict) -> str:
    if ratio is None:
        return "–"
    if not row.get("torch_side", {}).get("same_architecture", True):
        return f"{ratio:.2f} (not comparable)"
    return f"{ratio:.2f}"


def table(rows, args) -> str:
    lines = [
        f"Models at {args.size}×{args.size}×{args.channels}, batch {args.batch}, train step = Adam + "
        f"cross entropy; U-Nets base {args.filters}, depth {args.depth}; effb0_pan decoder "
        f"{args.decoder_filters}; the others at their registry defaults; {os.cpu_count()} CPU cores (shared); "
        f"s/step = best of {args.steps} steps after {args.warmup} warm-up (medians in models.json).",
        "",
        "| model | params | GFLOPs/slice (fwd) | Keras f32 s/step | Keras bf16 s/step | PyTorch f32 s/step "
        "| Keras f32 slices/s | PyTorch slices/s | Keras/PyTorch | PyTorch side | params = PyTorch's "
        "| peak RSS MB (Keras f32 / bf16 / PyTorch) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for row in rows:
        k32, kbf, pt = row.get("keras_float32", {}), row.get("keras_mixed_bfloat16", {}), row.get("torch_float32", {})
        k_rate = args.batch / k32["step_s"] if "step_s" in k32 else None
        p_rate = args.batch / pt["step_s"] if "step_s" in pt else None
        ratio = k_rate / p_rate if k_rate and p_rate else None
        rss = " / ".join(fmt(d.get("peak_rss_mb"), ".0f") for d in (k32, kbf, pt))
        lines.append(
            f"| {row['model']} | {fmt(k32.get('params'), ',')} | {fmt(k32.get('gflops_per_slice'), '.2f')} "
            f"| {fmt(k32.get('step_s'), '.3f')} | {fmt(kbf.get('step_s'), '.3f')} | {fmt(pt.get('step_s'), '.3f')} "
            f"| {fmt(k_rate, '.1f')} | {fmt(p_rate, '.1f')} | {ratio_cell(ratio, row)} "
            f"| {row['torch_side']['built_by']} | {params_cell(row)} | {rss} |"
        )
        row["keras_over_torch"] = ratio
    errors = [
        f"- {row['model']} {key}: {value['error']}"
        for row in rows for key, value in row.items() if isinstance(value, dict) and "error" in value
    ]
    return "\n".join(lines + ([""] + errors if errors else []))


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
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 1

    if args.worker:
        result = worker_keras(args) if args.worker == "keras" else worker_torch(args)
        print(json.dumps(result))
        return 0

    rows = []
    for name in args.models:
        row = {"model": name, "keras_options": keras_options(args, name), "torch_side": torch_side(name)}
        runs = [("keras", "float32"), ("torch", "float32"), ("keras", "mixed_bfloat16")]
        for framework, policy in runs:
            if framework == "torch" and args.no_torch:
                continue
            print(f"[bench] {name} {framework} {policy} ...", file=sys.stderr, flush=True)
            row[f"{framework}_{policy}"] = run_worker(args, framework, name, policy)
        row["params_match"] = params_match(row["keras_float32"], row.get("torch_float32", {}))
        rows.append(row)

    text = table(rows, args)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "model", "policy", "output")},
        "machine": machine(),
        "rows": rows,
        "table": text,
    }
    args.output.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
