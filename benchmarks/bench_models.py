"""Benchmark the three models: parameters, GFLOPs, train step time, peak RSS, vs PyTorch.

For each model at SIZE x SIZE, batch BATCH, on this machine: parameters, forward
GFLOPs per slice (TensorFlow profiler on the frozen inference graph, multiply-add =
2 FLOPs), train step time in float32 and mixed_bfloat16 (Adam, categorical cross
entropy, ``train_on_batch``; the best of the timed steps after warm-up, the one
least disturbed by other users of a shared machine; medians are in the JSON), peak
RSS of the process. The same networks written in PyTorch (``torch_twins.py``, parameter
counts checked equal) are timed in the same run, float32, and the table gives
Keras slices/s over PyTorch slices/s for the same architecture (goal >= 1.5).

Every measurement runs in its own subprocess (fresh peak RSS, fresh dtype policy),
Keras and PyTorch alternating per model so that load from other users of the
machine hits both alike.

Usage:
    python benchmarks/bench_models.py                 # U-Nets at base 16, ~8 min on 2 cores
    python benchmarks/bench_models.py --quick         # fewer steps
    python benchmarks/bench_models.py --filters 64 --models unet
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
MODELS = ("unet", "tam_unet", "effb0_pan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def keras_options(args, name):
    if name == "effb0_pan":
        return {"decoder_filters": args.decoder_filters}
    return {"filters": args.filters, "depth": args.depth}


def worker_keras(args) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from keras_livseg.models import build_model

    keras.config.set_dtype_policy(args.policy)
    shape = (args.size, args.size, args.channels)
    model = build_model(args.model, input_shape=shape, **keras_options(args, args.model))
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
        "first_step_s": first,
        "step_s": min(times),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "jit_compile": bool(getattr(model, "jit_compile", False)),
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.policy == "float32":
        result["gflops_per_slice"] = tf_profiler_gflops(model, shape)
    return result


def tf_profiler_gflops(model, shape) -> float:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec((1,) + shape, tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(
        graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
    )
    return profile.total_float_ops / 1e9


def worker_torch(args) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from torch_twins import EffB0PAN, UNet, count_params_like_keras

    torch.manual_seed(0)
    if args.model == "effb0_pan":
        model = EffB0PAN(args.channels, 3, decoder_filters=args.decoder_filters)
    else:
        model = UNet(args.channels, 3, args.filters, args.depth, tam=args.model == "tam_unet")
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
        "params": count_params_like_keras(model),
        "first_step_s": first,
        "step_s": min(times),
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_worker(args, framework, model, policy) -> dict:
    command = [
        sys.executable, __file__, "--worker", framework, "--model", model, "--policy", policy,
        "--size", str(args.size), "--batch", str(args.batch), "--channels", str(args.channels),
        "--filters", str(args.filters), "--depth", str(args.depth),
        "--decoder-filters", str(args.decoder_filters),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        return {"error": " | ".join(tail)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def table(rows, args) -> str:
    lines = [
        f"Models at {args.size}×{args.size}×{args.channels}, batch {args.batch}, train step = Adam + "
        f"cross entropy; U-Nets base {args.filters}, depth {args.depth}; effb0_pan decoder "
        f"{args.decoder_filters}; {os.cpu_count()} CPU cores (shared); s/step = best of {args.steps} "
        f"steps after {args.warmup} warm-up (medians in models.json).",
        "",
        "| model | params | GFLOPs/slice (fwd) | Keras f32 s/step | Keras bf16 s/step | PyTorch f32 s/step "
        "| Keras f32 slices/s | PyTorch slices/s | Keras/PyTorch | peak RSS MB (Keras f32 / bf16 / PyTorch) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
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
            f"| {fmt(k_rate, '.1f')} | {fmt(p_rate, '.1f')} | {fmt(ratio, '.2f')} | {rss} |"
        )
        row["keras_over_torch"] = ratio
    errors = [
        f"- {row['model']} {key}: {value['error']}"
        for row in rows for key, value in row.items() if isinstance(value, dict) and "error" in value
    ]
    return "\n".join(lines + ([""] + errors if errors else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
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
        row = {"model": name}
        runs = [("keras", "float32"), ("torch", "float32"), ("keras", "mixed_bfloat16")]
        for framework, policy in runs:
            if framework == "torch" and args.no_torch:
                continue
            print(f"[bench] {name} {framework} {policy} ...", file=sys.stderr, flush=True)
            row[f"{framework}_{policy}"] = run_worker(args, framework, name, policy)
        k_params = row["keras_float32"].get("params")
        t_params = row.get("torch_float32", {}).get("params")
        row["params_match"] = None if t_params is None else k_params == t_params
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
