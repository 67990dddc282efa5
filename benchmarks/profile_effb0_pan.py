"""Where the time of an EfficientNetB0-PAN train step goes, on TensorFlow CPU vs PyTorch.

The configuration of ``bench_models.py``: ``build_model("effb0_pan")`` at 256x256x1,
decoder_filters 64, batch 8, Adam(1e-4) + categorical cross entropy,
``train_on_batch``. Four parts, each optional (default: ``ops blocks repro``)::

    ops     TensorFlow profiler trace of a few train steps after warm-up; the
            .xplane.pb is parsed here (no TensorBoard plugin needed) and the op
            self times are summed per op type and per model part (depthwise
            convs, BatchNorm, swish, SE, ASPP dilated convs, resizes...), forward
            and backward apart, as a fraction of all op time.
    blocks  each sub-block alone (stem, MBConv stages 1-7, skip SEs, ASPP, FPA,
            the three GAUs, head), forward + backward with random inputs of the
            shapes it sees in the model, TensorFlow (tf.function) vs its PyTorch
            twin (benchmarks/torch_twins.py), best of N.
    repro   minimal reproductions of single kernels, forward + backward, TF vs
            PyTorch vs JAX (XLA:CPU): depthwise 3x3/5x5 convs, BatchNorm (Keras 3's
            unfused form and FusedBatchNormV3), swish, bilinear resizes, the ASPP
            dilated 3x3 conv at rate 6/12/18 on the 8x8 P5 map in three forms.
    whole   whole-model train step, each in its own subprocess: Keras/TF graph,
            Keras/TF jit_compile=True (XLA), Keras/JAX, PyTorch.

Every part that measures both frameworks runs them in separate processes: TF's and
PyTorch's thread pools spin while waiting and slow each other down several times.

Usage:
    python benchmarks/profile_effb0_pan.py                    # ops blocks repro
    python benchmarks/profile_effb0_pan.py --plain ops        # before: speed-ups undone
    python benchmarks/profile_effb0_pan.py ops --policy mixed_bfloat16
    python benchmarks/profile_effb0_pan.py whole              # XLA / JAX / torch
    python benchmarks/profile_effb0_pan.py blocks --no-torch

Prints Markdown tables; numbers are from a shared machine, so compare figures of
one run with each other. Findings: docs/perf-effb0_pan.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir, step_times, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE, CHANNELS, BATCH, DECODER_FILTERS, CLASSES = 256, 1, 8, 64, 3



# ---------------------------------------------------------------------------- helpers


def best_time(fn, repeats: int, warmup: int = 2) -> float:
    return min(step_times(fn, repeats, warmup))


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def keras_model_and_data():
    import keras
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from keras_livseg.models import build_model

    keras.config.set_dtype_policy(os.environ.get("PROFILE_POLICY", "float32"))
    model = build_model("effb0_pan", input_shape=(SIZE, SIZE, CHANNELS), decoder_filters=DECODER_FILTERS)
    if os.environ.get("PROFILE_PLAIN") == "1":
        use_plain_keras_layers(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, SIZE, SIZE, CHANNELS)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, CLASSES, (BATCH, SIZE, SIZE)), CLASSES)
    return model, x, y


def use_plain_keras_layers(model) -> None:
    """Undo keras_livseg's TF speed-ups in ``model`` (``--plain``): the code as it was before.

    Plain ``BatchNormalization`` and ``Activation`` instead of ``FusedBatchNormalization``
    and ``SwishActivation``, ASPP's dilated convolutions through ``keras.ops.conv``.
    """
    import keras

    from keras_livseg.models.layers import ConvBNReLU
    from keras_livseg.models.layers._fast_kernels import FusedBatchNormalization, SwishActivation

    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer) is FusedBatchNormalization:
            layer.__class__ = keras.layers.BatchNormalization
        elif type(layer) is SwishActivation:
            layer.__class__ = keras.layers.Activation
    ConvBNReLU.dilated_as_taps = False


def torch_twin():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from torch_twins import EffB0PAN

    torch.manual_seed(0)
    model = EffB0PAN(CHANNELS, CLASSES, decoder_filters=DECODER_FILTERS)
    model.train()
    return model


# ---------------------------------------------------------------------------- ops


def _part(name: str, op_type: str) -> str:
    """Model part of one TF op from its scoped name (``effb0_pan_1/.../block2a_bn_1/...``)."""
    if name.startswith("CpuExecutable"):  # XLA-compiled code: the swish gradient (SwishActivation)
        return "encoder swish"
    if op_type.startswith("Resize"):
        return "bilinear resize (GAU, FPA, head)"
    # A scope's "_<n>" suffix counts the objects of that name made before in the process
    # ("adam_1" when another optimizer came first): dropped before matching.
    scopes = [re.sub(r"_\d+$", "", s) for s in name.split("/")]
    if "adam" in scopes[:-1]:
        return "Adam update"
    if "compile_loss" in name or "/probabilities" in name:
        return "softmax + cross entropy"
    if "efficientnetb0_encoder" in scopes:
        layer = scopes[scopes.index("efficientnetb0_encoder") + 1] if scopes[-1] != "efficientnetb0_encoder" else ""
        if "dwconv" in layer:
            return "encoder depthwise conv"
        if layer.endswith("_bn"):
            return "encoder BatchNorm"
        if layer.endswith("_activation"):
            return "encoder swish"
        if "_se_" in layer:
            return "encoder MBConv SE"
        if layer.endswith(("expand_conv", "project_conv")) or layer == "stem_conv":
            return "encoder 1x1 convs + stem conv"
        if layer.endswith(("_drop", "_add")):
            return "encoder stochastic depth + residual add"
        if "pad" in layer:
            return "encoder padding"
        return "encoder other"
    for key, part in (
        ("se_p", "skip SE (se_p2..p4)"),
        ("aspp", "ASPP"),
        ("fpa", "FPA"),
        ("gau_p", "GAU"),
        ("logits", "head conv + upsample"),
    ):
        if any(s.startswith(key) for s in scopes):
            if part == "ASPP" and any(s.startswith("branch_rate") for s in scopes):
                return "ASPP dilated 3x3 branches"
            if part in ("ASPP", "GAU", "FPA") and "bn" in scopes:
                return "decoder BatchNorm"
            return part
    if not name.startswith(("effb0_pan", "gradient_tape")):
        # Unscoped ops: the swish gradient (tf.nn.silu's custom gradient recomputes
        # sigmoid: Sigmoid, sub, mul, add) and the AddN summing gradients of tensors
        # read twice (residuals, SE inputs).
        if op_type in ("Sigmoid", "Sub", "Mul", "AddV2"):
            return "encoder swish"
        if op_type == "AddN":
            return "gradient accumulation (AddN)"
    return "other"


def parse_xplane(logdir: str):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise RuntimeError(f"no .xplane.pb under {logdir}")
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(files[-1]).read_bytes())
    ops = []  # (scoped name, op type, backward?, self seconds)
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # inter-op threads run the op kernels
                continue
            events = []
            for event in line.events:
                label = plane.event_metadata[event.metadata_id].name
                if ":" not in label or label.startswith(("Threadpool", "ExecutorState")):
                    continue
                events.append((event.offset_ps, event.offset_ps + event.duration_ps, label))
            events.sort()
            # Self time: subtract nested op events on the same thread (function calls).
            stack = []
            for start, end, label in events:
                while stack and stack[-1][1] <= start:
                    stack.pop()
                if stack:
                    stack[-1][3] -= end - start
                record = [start, end, label, end - start]
                stack.append(record)
                ops.append(record)
    result = []
    for start, end, label, self_ps in ops:
        name, op_type = label.rsplit(":", 1)
        result.append((name, op_type.replace("_MklNative", "").replace("_Mkl", ""),
                       name.startswith("gradient_tape/"), self_ps / 1e12))
    return result


def run_ops(args) -> dict:
    import tensorflow as tf

    model, x, y = keras_model_and_data()
    for _ in range(args.warmup):
        model.train_on_batch(x, y)
    step = best_time(lambda: model.train_on_batch(x, y), args.trace_steps, warmup=0)
    logdir = tempfile.mkdtemp(prefix="effb0_pan_trace_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(args.trace_steps):
        model.train_on_batch(x, y)
    traced = (time.perf_counter() - start) / args.trace_steps
    tf.profiler.experimental.stop()
    ops = parse_xplane(logdir)
    total = sum(op[3] for op in ops)
    per_step = total / args.trace_steps
    print(f"\n## TF op self time, {args.trace_steps} traced steps "
          f"(effb0_pan {SIZE}x{SIZE}x{CHANNELS}, batch {BATCH})\n")
    print(f"step time untraced {step:.3f} s (best of {args.trace_steps}), traced {traced:.3f} s/step; "
          f"sum of op self times {per_step:.3f} s/step (2 inter-op threads can overlap ops).\n")

    by_type = collections.Counter()
    for name, op_type, backward, seconds in ops:
        by_type[op_type] += seconds
    rows = [(t, f"{s / args.trace_steps * 1e3:.1f}", f"{100 * s / total:.1f}%")
            for t, s in by_type.most_common(args.top)]
    print("### per op type (_Mkl/_MklNative prefixes of oneDNN kernels dropped)\n")
    print(md_table(["op type", "ms/step", "share"], rows))
    result = {"step_s_untraced": step, "step_s_traced": traced, "op_self_time_s_per_step": per_step,
              "trace_steps": args.trace_steps,
              "per_op_type": [{"op_type": t, "ms_per_step": s / args.trace_steps * 1e3, "share": s / total}
                              for t, s in by_type.most_common()]}

    parts = collections.defaultdict(lambda: [0.0, 0.0])
    for name, op_type, backward, seconds in ops:
        part = _part(name, op_type)
        # Unscoped gradient ops (swish gradient, AddN) run in the backward pass too.
        backward = backward or (part in ("encoder swish", "gradient accumulation (AddN)")
                                and not name.startswith("effb0_pan"))
        parts[part][int(backward)] += seconds
    rows = sorted(parts.items(), key=lambda kv: -sum(kv[1]))
    result["per_part"] = [{"part": p, "forward_ms_per_step": f / args.trace_steps * 1e3,
                           "backward_ms_per_step": b / args.trace_steps * 1e3, "share": (f + b) / total}
                          for p, (f, b) in rows]
    print("\n### per model part (forward / backward = ops under gradient_tape/)\n")
    print(md_table(
        ["part", "fwd ms/step", "bwd ms/step", "total ms/step", "share"],
        [(p, f"{f / args.trace_steps * 1e3:.1f}", f"{b / args.trace_steps * 1e3:.1f}",
          f"{(f + b) / args.trace_steps * 1e3:.1f}", f"{100 * (f + b) / total:.1f}%") for p, (f, b) in rows],
    ))
    by_name = collections.Counter()
    for name, op_type, backward, seconds in ops:
        by_name[f"{name}:{op_type}"] += seconds
    print(f"\n### top {args.top} single ops\n")
    print(md_table(["op", "ms/step", "share"],
                   [(n, f"{s / args.trace_steps * 1e3:.1f}", f"{100 * s / total:.1f}%")
                    for n, s in by_name.most_common(args.top)]))
    result["top_ops"] = [{"op": n, "ms_per_step": s / args.trace_steps * 1e3, "share": s / total}
                         for n, s in by_name.most_common(args.top)]
    return result


# ---------------------------------------------------------------------------- blocks
# TensorFlow and PyTorch never share a process here: their thread pools (Eigen,
# OpenMP) spin while waiting and slow each other down several times on 2 cores.


def _keras_blocks(model):
    """(label, callable(xs, training), input shapes NHWC, variables) for each sub-block."""
    import keras

    from keras_livseg.models.efficientnet_pan import ENCODER_NAME

    # Rebuilt from its config, every encoder layer has one node, so stage cuts connect.
    encoder = keras.Model.from_config(model.get_layer(ENCODER_NAME).get_config())
    encoder.set_weights(model.get_layer(ENCODER_NAME).get_weights())
    cuts = [
        ("stem", None, "stem_activation"),
        ("stage1 (block1a)", "block1a_dwconv", "block1a_project_bn"),
        ("stage2 (block2a-b)", "block2a_expand_conv", "block2b_add"),
        ("stage3 (block3a-b)", "block3a_expand_conv", "block3b_add"),
        ("stage4 (block4a-c)", "block4a_expand_conv", "block4c_add"),
        ("stage5 (block5a-c)", "block5a_expand_conv", "block5c_add"),
        ("stage6 (block6a-d)", "block6a_expand_conv", "block6d_add"),
        ("stage7 (block7a)", "block7a_expand_conv", "block7a_project_bn"),
    ]
    blocks = []
    for label, first, last in cuts:
        entry = encoder.input if first is None else encoder.get_layer(first).input
        sub = keras.Model(entry, encoder.get_layer(last).output)
        blocks.append((label, lambda xs, training, sub=sub: sub(xs[0], training=training),
                       [(BATCH,) + tuple(entry.shape[1:])], sub.trainable_variables))
    s, f = SIZE, DECODER_FILTERS
    p = [(BATCH, s // 4, s // 4, 24), (BATCH, s // 8, s // 8, 40), (BATCH, s // 16, s // 16, 112),
         (BATCH, s // 32, s // 32, 320)]
    for name, shape in (("se_p2", p[0]), ("se_p3", p[1]), ("se_p4", p[2])):
        layer = model.get_layer(name)
        blocks.append((f"skip SE {name}", lambda xs, training, layer=layer: layer(xs[0]), [shape],
                       layer.trainable_variables))
    aspp, fpa = model.get_layer("aspp"), model.get_layer("fpa")
    blocks.append(("ASPP", lambda xs, training: aspp(xs[0], training=training), [p[3]], aspp.trainable_variables))
    blocks.append(("FPA (+ residual)", lambda xs, training: xs[0] + fpa(xs[0], training=training),
                   [(BATCH, s // 32, s // 32, f)], fpa.trainable_variables))
    for name, low, high in (("gau_p4", p[2], (BATCH, s // 32, s // 32, f)),
                            ("gau_p3", p[1], (BATCH, s // 16, s // 16, f)),
                            ("gau_p2", p[0], (BATCH, s // 8, s // 8, f))):
        layer = model.get_layer(name)
        blocks.append((f"GAU {name}", lambda xs, training, layer=layer: layer(xs, training=training), [low, high],
                       layer.trainable_variables))
    logits, upsample = model.get_layer("logits"), model.get_layer("logits_upsample")
    head = model.get_layer("probabilities")
    blocks.append(("head (1x1 conv, 4x bilinear, softmax)", lambda xs, training: head(upsample(logits(xs[0]))),
                   [(BATCH, s // 4, s // 4, f)], logits.trainable_variables))
    return blocks


def _torch_blocks(twin):
    """The same sub-blocks of the PyTorch twin, in the same order (inputs NCHW)."""
    import torch.nn.functional as F

    enc = twin.encoder
    blocks = [lambda xs: enc.stem(F.pad(xs[0], (0, 1, 0, 1)))]
    blocks += [lambda xs, stage=stage: stage(xs[0]) for stage in enc.stages]
    blocks += [lambda xs, se=se: se(xs[0]) for se in twin.se]
    blocks.append(lambda xs: twin.aspp(xs[0]))
    blocks.append(lambda xs: xs[0] + twin.fpa(xs[0]))
    blocks += [lambda xs, gau=gau: gau(xs[0], xs[1]) for gau in (twin.gau4, twin.gau3, twin.gau2)]
    blocks.append(lambda xs: F.softmax(F.interpolate(twin.logits(xs[0]), scale_factor=4, mode="bilinear"), 1))
    return blocks


def worker_blocks(framework: str, repeats: int) -> list:
    import numpy as np

    results = []
    if framework == "tf":
        import tensorflow as tf

        model, _, _ = keras_model_and_data()
        for label, call, shapes, variables in _keras_blocks(model):
            rng = np.random.default_rng(1)
            xs = [tf.constant(rng.normal(size=shape).astype("float32")) for shape in shapes]

            @tf.function
            def step(xs, call=call, variables=variables):
                with tf.GradientTape() as tape:
                    tape.watch(xs)
                    out = call(xs, True)
                    weights = tf.reshape(tf.range(tf.size(out)) % 7, tf.shape(out))  # every element counts
                    loss = tf.reduce_sum(out * tf.cast(weights, out.dtype))
                return tape.gradient(loss, [*xs, *variables])

            seconds = best_time(lambda: [g.numpy() for g in step(xs) if g is not None], repeats)
            results.append((label, shapes, seconds))
    else:
        import torch

        twin = torch_twin()
        keras_shapes = [shapes for _, _, shapes, _ in _keras_blocks_shapes()]
        for call, shapes in zip(_torch_blocks(twin), keras_shapes):
            rng = np.random.default_rng(1)
            xs = [torch.from_numpy(rng.normal(size=(n, c, h, w)).astype("float32")).requires_grad_()
                  for n, h, w, c in shapes]

            def step(call=call, xs=xs):
                out = call(xs)
                (out * (torch.arange(out.numel()) % 7).reshape(out.shape).to(out.dtype)).sum().backward()
                for x in xs:
                    x.grad = None
                twin.zero_grad(set_to_none=True)

            results.append((None, shapes, best_time(step, repeats)))
    return results


def _keras_blocks_shapes():
    """Block input shapes (NHWC) without building the Keras model (for the PyTorch worker)."""
    s, f = SIZE, DECODER_FILTERS
    stem = [(BATCH, s, s, CHANNELS)]
    stages = [[(BATCH, h, h, c)] for c, h in ((32, s // 2), (16, s // 2), (24, s // 4), (40, s // 8), (80, s // 16),
                                                (112, s // 16), (192, s // 32))]
    p = [(BATCH, s // 4, s // 4, 24), (BATCH, s // 8, s // 8, 40), (BATCH, s // 16, s // 16, 112),
         (BATCH, s // 32, s // 32, 320)]
    shapes = [stem] + stages + [[p[0]], [p[1]], [p[2]], [p[3]], [(BATCH, s // 32, s // 32, f)],
                                [p[2], (BATCH, s // 32, s // 32, f)], [p[1], (BATCH, s // 16, s // 16, f)],
                                [p[0], (BATCH, s // 8, s // 8, f)], [(BATCH, s // 4, s // 4, f)]]
    return [(None, None, shape, None) for shape in shapes]


def _run_worker(kind: str, args) -> list:
    done = subprocess.run([sys.executable, __file__, "--worker", kind, "--repeats", str(args.repeats)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {kind} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_blocks(args) -> dict:
    tf_rows = pt_rows = None
    for _ in range(max(1, args.rounds)):  # alternate, keep the best: load from others comes and goes
        tf_new = _run_worker("blocks:tf", args)
        tf_rows = tf_new if tf_rows is None else [a if a[2] <= b[2] else b for a, b in zip(tf_rows, tf_new)]
        if not args.no_torch:
            pt_new = _run_worker("blocks:torch", args)
            pt_rows = pt_new if pt_rows is None else [a if a[2] <= b[2] else b for a, b in zip(pt_rows, pt_new)]
    if args.no_torch:
        pt_rows = [None] * len(tf_rows)
    total_tf = sum(r[2] for r in tf_rows)
    total_pt = sum(r[2] for r in pt_rows) if not args.no_torch else None
    rows = []
    for (label, shapes, tf_s), pt in zip(tf_rows, pt_rows):
        rows.append((label, f"{tf_s * 1e3:.1f}", f"{100 * tf_s / total_tf:.0f}%",
                     "–" if pt is None else f"{pt[2] * 1e3:.1f}", "–" if pt is None else f"{pt[2] / tf_s:.2f}"))
    rows.append(("**sum of blocks**", f"{total_tf * 1e3:.1f}", "100%",
                 "–" if total_pt is None else f"{total_pt * 1e3:.1f}",
                 "–" if total_pt is None else f"{total_pt / total_tf:.2f}"))
    print(f"\n## Sub-blocks alone, forward + backward (input and weight gradients), best of {args.repeats}\n")
    print(f"Each framework in its own process, best of {max(1, args.rounds)} alternating rounds; TF = the Keras "
          f"layers in a tf.function with a GradientTape; PyTorch = the twin's modules, eager.\n")
    print(md_table(["block", "TF ms", "TF share", "PyTorch ms", "TF speed / PyTorch"], rows))
    return {"repeats": args.repeats, "rounds": max(1, args.rounds),
            "blocks": [{"block": label, "shapes": shapes, "tf_s": tf_s, "torch_s": None if pt is None else pt[2]}
                       for (label, shapes, tf_s), pt in zip(tf_rows, pt_rows)]}


# ---------------------------------------------------------------------------- repro


def _repro_cases():
    """(label, TF fn, PyTorch fn or None, NHWC arrays): forward + backward of single kernels."""
    import numpy as np

    rng = np.random.default_rng(0)
    cases = []

    def tf_mod():
        import tensorflow as tf

        return tf

    def F():
        import torch.nn.functional as functional

        return functional

    # Depthwise convs of the encoder (the largest: block2a stride 2, block2b, block3b 5x5, block6).
    for h, c, k, stride in ((129, 96, 3, 2), (64, 144, 3, 1), (32, 240, 5, 1), (16, 672, 5, 1)):
        x = rng.normal(size=(BATCH, h, h, c)).astype("float32")
        w = (rng.normal(size=(k, k, c, 1)) * 0.1).astype("float32")
        pad = "SAME" if stride == 1 else "VALID"
        cases.append((
            f"depthwise {k}x{k} stride {stride} on {BATCH}x{h}x{h}x{c}",
            lambda x, w, stride=stride, pad=pad: tf_mod().nn.depthwise_conv2d(x, w, (1, stride, stride, 1), pad),
            lambda x, w, stride=stride, k=k, c=c: F().conv2d(
                x, w.permute(2, 3, 0, 1), stride=stride, padding=0 if stride == 2 else k // 2, groups=c),
            [x, w],
            lambda x, w, stride=stride, pad=pad, c=c: _jax_conv(x, w.reshape(w.shape[0], w.shape[1], 1, c),
                                                                 stride, pad, groups=c),
        ))
    # BatchNorm (training) and swish on the biggest encoder tensor.
    x = rng.normal(size=(BATCH, 128, 128, 96)).astype("float32")
    g, b = np.ones(96, "float32"), np.zeros(96, "float32")

    def tf_bn_unfused(x, g, b):
        tf = tf_mod()
        mean, var = tf.nn.moments(x, [0, 1, 2])
        return tf.nn.batch_normalization(x, mean, var, b, g, 1e-3)

    def tf_bn_fused(x, g, b):
        return tf_mod().compat.v1.nn.fused_batch_norm(x, g, b, epsilon=1e-3, is_training=True)[0]

    def torch_bn(x, g, b):
        return F().batch_norm(x, None, None, g, b, training=True, eps=1e-3)

    cases.append(("BatchNorm train, Keras 3 TF (tf.nn.moments + batch_normalization) 8x128x128x96",
                  tf_bn_unfused, torch_bn, [x, g, b]))
    cases.append(("BatchNorm train, FusedBatchNormV3 8x128x128x96", tf_bn_fused, torch_bn, [x, g, b]))
    cases.append(("swish (tf.nn.silu) 8x128x128x96", lambda x: tf_mod().nn.silu(x), lambda x: F().silu(x), [x]))
    # Bilinear resizes of the decoder and head (half-pixel centres in both frameworks).
    for h, c, factor in ((8, 64, 2), (32, 64, 2), (64, 3, 4)):
        x = rng.normal(size=(BATCH, h, h, c)).astype("float32")
        cases.append((
            f"bilinear resize x{factor} {BATCH}x{h}x{h}x{c}",
            lambda x, h=h, factor=factor: tf_mod().image.resize(x, (h * factor, h * factor), "bilinear"),
            lambda x, factor=factor: F().interpolate(x, scale_factor=factor, mode="bilinear"),
            [x],
        ))
    # The ASPP dilated branches on the 8x8 P5 map: as Keras runs them (tf.nn.convolution,
    # which falls back to SpaceToBatchND + conv + BatchToSpaceND for any dilation), as a
    # native dilated Conv2D (tf.nn.conv2d, oneDNN), and the centre tap they reduce to
    # when the rate reaches the map size.
    x = rng.normal(size=(BATCH, SIZE // 32, SIZE // 32, 320)).astype("float32")
    w = (rng.normal(size=(3, 3, 320, DECODER_FILTERS)) * 0.05).astype("float32")
    hw = SIZE // 32
    for rate in (6, 12, 18):
        torch_conv = (lambda x, w, rate=rate: F().conv2d(x, w.permute(3, 2, 0, 1), padding=rate, dilation=rate))
        cases.append((f"3x3 rate {rate} on {BATCH}x{hw}x{hw}x320->64, keras.ops.conv (SpaceToBatch)",
                      lambda x, w, rate=rate: _keras_conv(x, w, rate), torch_conv, [x, w],
                      lambda x, w, rate=rate: _jax_conv(x, w, 1, "SAME", dilation=rate)))
        cases.append((f"3x3 rate {rate} on {BATCH}x{hw}x{hw}x320->64, tf.nn.conv2d dilations=",
                      lambda x, w, rate=rate: tf_mod().nn.conv2d(x, w, 1, "SAME", dilations=rate), None, [x, w]))
        cases.append((f"3x3 rate {rate} on {BATCH}x{hw}x{hw}x320->64, keras_livseg tap-pruned",
                      lambda x, w, rate=rate: _livseg_dilated(x, w, rate), None, [x, w]))
    return [case + (None,) * (5 - len(case)) for case in cases]


def _jax_conv(x, w, stride, padding, groups=1, dilation=1):
    import jax

    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )


def _keras_conv(x, w, rate):
    import keras

    return keras.ops.conv(x, w, padding="same", dilation_rate=rate)


def _livseg_dilated(x, w, rate):
    sys.path.insert(0, str(ROOT))
    from keras_livseg.models.layers._conv_bn import dilated_conv_same

    return dilated_conv_same(x, w, rate)


def worker_repro(framework: str, repeats: int) -> list:
    import numpy as np

    results = []
    for label, tf_fn, torch_fn, arrays, jax_fn in _repro_cases():
        if framework == "jax":
            if jax_fn is None:
                results.append((label, None))
                continue
            import jax

            def loss(*args, fn=jax_fn):
                out = fn(*args)
                return (out * out).sum()

            grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(arrays)))))
            results.append((label, best_time(lambda: jax.block_until_ready(grad(*arrays)), repeats)))
        elif framework == "tf":
            import tensorflow as tf

            try:
                variables = [tf.Variable(a) for a in arrays]

                @tf.function
                def step(fn=tf_fn, variables=variables):
                    with tf.GradientTape() as tape:
                        out = fn(*variables)
                        loss = tf.reduce_sum(out * out)
                    return tape.gradient(loss, variables)

                results.append((label, best_time(lambda: [g.numpy() for g in step()], repeats)))
            except Exception as error:  # e.g. the tap-pruned helper missing in an old checkout
                results.append((label, f"error: {type(error).__name__}"))
        else:
            if torch_fn is None:
                results.append((label, None))
                continue
            import torch

            tensors = [torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.ndim == 4 and a is arrays[0]
                                        else a).requires_grad_() for a in arrays]

            def step(fn=torch_fn, tensors=tensors):
                out = fn(*tensors)
                (out * out).sum().backward()
                for t in tensors:
                    t.grad = None

            results.append((label, best_time(step, repeats)))
    return results


def run_repro(args) -> dict:
    tf_rows = _run_worker("repro:tf", args)
    pt_rows = _run_worker("repro:torch", args) if not args.no_torch else [(r[0], None) for r in tf_rows]
    jax_rows = _run_worker("repro:jax", args) if not args.no_jax else [(r[0], None) for r in tf_rows]
    rows = []

    def ms(value):
        return "–" if value is None else f"{value * 1e3:.2f}"

    for (label, tf_s), (_, pt_s), (_, jax_s) in zip(tf_rows, pt_rows, jax_rows):
        if isinstance(tf_s, str):
            rows.append((label, tf_s, ms(pt_s), "–", ms(jax_s)))
            continue
        rows.append((label, ms(tf_s), ms(pt_s), "–" if pt_s is None else f"{pt_s / tf_s:.2f}", ms(jax_s)))
    print(f"\n## Single kernels, forward + backward (all gradients), best of {args.repeats}\n")
    print("JAX = jax.jit(jax.grad) of the same op on XLA:CPU (what KERAS_BACKEND=jax and jit_compile=True run).\n")
    print(md_table(["kernel", "TF ms", "PyTorch ms", "TF speed / PyTorch", "JAX ms"], rows))
    return {"repeats": args.repeats,
            "kernels": [{"kernel": label, "tf_s": tf_s, "torch_s": pt_s, "jax_s": jax_s}
                        for (label, tf_s), (_, pt_s), (_, jax_s) in zip(tf_rows, pt_rows, jax_rows)]}


# ---------------------------------------------------------------------------- whole


def worker_whole(kind: str) -> dict:
    if kind == "torch":
        import torch

        model = torch_twin()
        optimizer = torch.optim.Adam(model.parameters(), 1e-4)
        loss_fn = torch.nn.CrossEntropyLoss()
        x = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
        y = torch.randint(0, CLASSES, (BATCH, SIZE, SIZE))

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
    else:
        import keras

        model, x, y = keras_model_and_data()
        if kind == "keras_xla":
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy", jit_compile=True)

        def step():
            model.train_on_batch(x, y)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    best = best_time(step, 4, warmup=1)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"first_step_s": first, "step_s": best, "peak_rss_mb": peak_rss_mb}


def run_whole(args) -> dict:
    kinds = [("Keras / TF graph (default)", "keras", {}),
             ("Keras / TF jit_compile=True (XLA)", "keras_xla", {}),
             ("Keras / JAX (jit)", "keras", {"KERAS_BACKEND": "jax"}),
             ("PyTorch eager", "torch", {})]
    rows, torch_step = [], None
    results = []
    for label, kind, env in kinds:
        if kind == "torch" and args.no_torch:
            continue
        done = subprocess.run([sys.executable, __file__, "--whole-worker", kind], capture_output=True, text=True,
                              env={**os.environ, **env})
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            results.append((label, {"error": lines[-1] if lines else f"exit status {done.returncode}"}))
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append((label, result))
        if kind == "torch":
            torch_step = result["step_s"]
    for label, r in results:
        if "error" in r:
            rows.append((label, "–", "–", "–", "–", r["error"]))
            continue
        ratio = f"{torch_step / r['step_s']:.2f}" if torch_step else "–"
        rows.append((label, f"{r['step_s']:.3f}", f"{BATCH / r['step_s']:.1f}", ratio, f"{r['first_step_s']:.1f}",
                     f"{r['peak_rss_mb']:.0f}"))
    print("\n## Whole train step, best of 4 after warm-up, each in its own process\n")
    print(md_table(["variant", "s/step", "slices/s", "speed / PyTorch", "first step s", "peak RSS MB"], rows))
    return {"variants": [{"variant": label, **r} for label, r in results]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="part", help="ops, blocks, repro, whole")
    parser.add_argument("--warmup", type=int, default=3, help="train steps before tracing")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per block / kernel")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-jax", action="store_true", help="skip the JAX column of repro")
    parser.add_argument("--policy", default="float32", help="Keras dtype policy (mixed_bfloat16...)")
    parser.add_argument("--plain", action="store_true",
                        help="profile the model with keras_livseg's TF speed-ups undone (the 'before')")
    parser.add_argument("--rounds", type=int, default=2,
                        help="blocks: TF and PyTorch workers alternate this many times; best per block")
    parser.add_argument("--no-json", action="store_true",
                        help="print only; by default each part's figures go to benchmarks/results/"
                             "profile_effb0_pan[_plain][_<policy>].json (other parts in that file are kept)")
    parser.add_argument("--whole-worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    framework = "torch" if args.whole_worker == "torch" else (args.worker or ":").split(":")[1]
    if framework not in ("torch", "jax") and os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
        # Quiet TensorFlow before it loads. Never in a PyTorch or JAX worker: loading TensorFlow
        # there would only cost memory, and TensorFlow and PyTorch in one process crash.
        from keras_livseg import cli

        cli.quiet_tensorflow()
    if args.whole_worker:
        print(json.dumps(worker_whole(args.whole_worker)))
        return 0
    if args.worker:
        part, framework = args.worker.split(":")
        worker = {"blocks": worker_blocks, "repro": worker_repro}[part]
        print(json.dumps(worker(framework, args.repeats)))
        return 0
    os.environ["PROFILE_POLICY"] = args.policy  # read by keras_model_and_data, in workers too
    os.environ["PROFILE_PLAIN"] = "1" if args.plain else "0"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"effb0_pan {SIZE}x{SIZE}x{CHANNELS}, batch {BATCH}, decoder {DECODER_FILTERS}, policy {args.policy}"
          f"{', PLAIN Keras layers (speed-ups undone)' if args.plain else ''}; {os.cpu_count()} CPUs, "
          f"load average {load} at start")
    parts = args.parts or ["ops", "blocks", "repro"]
    unknown = sorted(set(parts) - {"ops", "blocks", "repro", "whole"})
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from ops, blocks, repro, whole")
    name = "profile_effb0_pan" + ("_plain" if args.plain else "") + ("" if args.policy == "float32" else f"_{args.policy}")
    path = results_dir() / f"{name}.json"
    measured = json.loads(path.read_text()).get("parts", {}) if path.is_file() and not args.no_json else {}
    for part in parts:
        figures = {"ops": run_ops, "blocks": run_blocks, "repro": run_repro, "whole": run_whole}[part](args)
        sys.stdout.flush()
        if not args.no_json:  # each part as soon as it is measured, with the machine it ran on
            measured[part] = {**figures, "machine": machine()}
            config = {"model": "effb0_pan", "input": [SIZE, SIZE, CHANNELS], "batch": BATCH,
                      "decoder_filters": DECODER_FILTERS, "policy": args.policy, "plain": args.plain}
            print(f"wrote {write_json(name, {'config': config, 'parts': measured})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
