"""Where a Keras train step's peak memory goes on the CPU, beside PyTorch's, model by model.

``bench_models.py`` finds Keras' peak RSS above PyTorch's for every model. This script splits
Keras' figure into what TensorFlow's tensors need and what its allocator keeps:

- ``base``: RSS after import, model build and compile, before the first step; the optimizer
  is the one ``fit`` makes (``FusedAdam``, its variables built before the first step), and
  ``keras.optimizers.Adam`` built by Keras inside the first traced step is measured beside it;
- ``peak``: the process's peak RSS after a few train steps (what ``bench_models`` reports);
- ``live tensors``: the peak bytes in use in TensorFlow's CPU allocator during one train step
  (``tf.config.experimental.get_memory_info``): every activation, gradient and temporary alive
  at the same moment. The allocator counts blocks of 256 KB and more (its pool); smaller ones go to
  ``malloc`` and fall into ``rest``;
- ``graph``: the RSS rise of the same model's steps at 64 px and batch 1 (a separate process),
  where tensors are tiny: the traced train function, Grappler's rewrites, kernels and caches.
  It does not depend on the input size;
- ``rest``: the step's RSS rise less the graph and the live tensors. TensorFlow's oneDNN CPU
  allocator ("mklcpu") is a BFC pool that grows by regions of doubling size and never returns
  them; ``mallinfo2``'s mmapped bytes after a step (when almost no tensor is alive) are shown
  beside it.

PyTorch's side (the twins and smp models of ``bench_models``) frees each block back to ``malloc``
at once, so its RSS increase over a step is its live peak.

    python benchmarks/bench_memory.py                       # effb0_pan, segformer, unet at 256 px, batch 8
    python benchmarks/bench_memory.py --models pspnet linknet
    python benchmarks/bench_memory.py --quick               # a test of the script: 32 px, batch 2

Each measurement runs in its own process. Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import table, write_json  # noqa: E402

MB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mapped_mb() -> float | None:
    """Bytes ``malloc`` holds in mmapped blocks (glibc's ``mallinfo2().hblkhd``), in MB; None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc.mallinfo2().hblkhd / MB


def rss_mb() -> float:
    """The process's peak RSS so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def keras_step_memory(model_name: str, size: int, batch: int, steps: int = 3, options: dict | None = None,
                      optimizer: str = "fit") -> dict:
    """Train ``model_name`` (Adam + categorical cross entropy, float32) for ``steps`` steps; memory in MB.

    ``optimizer="fit"``: the optimizer as ``fit`` makes it (``FusedAdam``, variables built before the
    first step); ``"keras"``: ``keras.optimizers.Adam``, built by Keras inside the first traced step.
    """
    from keras_livseg import cli

    cli.quiet_tensorflow()
    # The live-tensor statistics come from oneDNN's allocator: keras_livseg (imported by _common,
    # before TensorFlow) asks for it on every CPU.
    import keras
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(HERE.parent))
    from keras_livseg.models import build_model

    model = build_model(model_name, input_shape=(size, size, 1), **(options or {}))
    from keras_livseg.training.optimizers import FusedAdam, build_optimizer_variables

    if optimizer == "fit":
        model.compile(optimizer=FusedAdam(1e-4), loss="categorical_crossentropy")
        build_optimizer_variables(model)
    else:
        model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 1)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, (batch, size, size)), 3)
    base = rss_mb()
    for _ in range(max(1, steps - 1)):
        model.train_on_batch(x, y)
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError as error:  # the plain CPU allocator (oneDNN off) keeps no statistics
        raise SystemExit(f"TensorFlow's CPU allocator keeps no statistics here ({error}); run with oneDNN on "
                         "(TF_ENABLE_ONEDNN_OPTS=1, set before TensorFlow is imported)") from None
    model.train_on_batch(x, y)
    info = tf.config.experimental.get_memory_info("CPU:0")
    return {
        "base_rss_mb": base,
        "peak_rss_mb": rss_mb(),
        "live_peak_mb": info["peak"] / MB,
        "live_between_steps_mb": info["current"] / MB,
        "malloc_mapped_between_steps_mb": malloc_mapped_mb(),
    }


def torch_step_memory(model_name: str, size: int, batch: int, steps: int = 3, options: dict | None = None) -> dict:
    """The same train step on the PyTorch side of ``bench_models``; memory in MB."""
    import numpy as np
    import torch

    from bench_models import build_torch

    class Args:  # the fields build_torch reads
        channels, filters, depth, decoder_filters = 1, 16, 4, 64

    for key, value in (options or {}).items():
        setattr(Args, key, value)
    torch.manual_seed(0)
    model = build_torch(Args, model_name)
    model.train()
    # PyTorch's own fused Adam kernel, the counterpart of the Keras side's FusedAdam
    optimizer = torch.optim.Adam(model.parameters(), 1e-4, fused=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch, 1, size, size)).astype("float32"))
    y = torch.from_numpy(rng.integers(0, 3, (batch, size, size)))
    base = rss_mb()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
    return {"base_rss_mb": base, "peak_rss_mb": rss_mb(), "malloc_mapped_between_steps_mb": malloc_mapped_mb()}


def _options(args, name: str) -> dict:
    if name == "effb0_pan":
        return {"decoder_filters": args.decoder_filters}
    if name in ("unet", "tam_unet", "attention_unet", "unet_cbam"):
        return {"filters": args.filters, "depth": args.depth}
    return {}


def _worker(framework: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", framework, "--models", args.models[0], "--size", str(args.size),
               "--batch", str(args.batch), "--filters", str(args.filters), "--depth", str(args.depth),
               "--decoder-filters", str(args.decoder_filters)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} worker for {args.models[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(model: str, keras_side: dict, torch_side: dict | None, graph_side: dict, keras_adam_side: dict | None = None) -> dict:
    """One table row in MB: Keras' step RSS rise split into graph, live tensors and the rest.

    ``keras_side`` and ``graph_side`` train with ``fit``'s optimizer; ``keras_adam_side`` (optional)
    with ``keras.optimizers.Adam`` built inside the first step, for comparison.
    """
    step = keras_side["peak_rss_mb"] - keras_side["base_rss_mb"]
    graph = graph_side["peak_rss_mb"] - graph_side["base_rss_mb"]
    out = {
        "model": model,
        "keras_peak_rss_mb": keras_side["peak_rss_mb"],
        "keras_step_rss_mb": step,
        "keras_graph_mb": graph,
        "keras_live_peak_mb": keras_side["live_peak_mb"],
        "keras_rest_mb": step - graph - keras_side["live_peak_mb"],
        "keras_mapped_after_step_mb": keras_side["malloc_mapped_between_steps_mb"],
        "keras_adam_peak_rss_mb": keras_adam_side["peak_rss_mb"] if keras_adam_side else None,
    }
    if torch_side:
        out["torch_peak_rss_mb"] = torch_side["peak_rss_mb"]
        out["torch_step_rss_mb"] = torch_side["peak_rss_mb"] - torch_side["base_rss_mb"]
        out["live_over_torch_step"] = out["keras_live_peak_mb"] / out["torch_step_rss_mb"]
    return out


COLUMNS = ["model", "Keras peak RSS (Keras' Adam)", "Keras peak RSS", "Keras step (RSS rise)", "graph (64 px, batch 1)", "live tensors (TF's peak in a step)",
           "rest (allocator pool)", "malloc-mapped after a step", "PyTorch peak RSS", "PyTorch step (RSS rise)"]


def markdown(rows: list[dict]) -> str:
    def mb(value):
        return "–" if value is None else f"{value:,.0f}"

    return table([{
        "model": r["model"], "Keras peak RSS (Keras' Adam)": mb(r.get("keras_adam_peak_rss_mb")),
        "Keras peak RSS": mb(r["keras_peak_rss_mb"]), "Keras step (RSS rise)": mb(r["keras_step_rss_mb"]),
        "graph (64 px, batch 1)": mb(r["keras_graph_mb"]), "live tensors (TF's peak in a step)": mb(r["keras_live_peak_mb"]),
        "rest (allocator pool)": mb(r["keras_rest_mb"]), "malloc-mapped after a step": mb(r["keras_mapped_after_step_mb"]),
        "PyTorch peak RSS": mb(r.get("torch_peak_rss_mb")), "PyTorch step (RSS rise)": mb(r.get("torch_step_rss_mb")),
    } for r in rows], COLUMNS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="default effb0_pan segformer unet (--quick: effb0_pan unet)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--decoder-filters", type=int, default=64)
    parser.add_argument("--no-torch", action="store_true", help="Keras only")
    parser.add_argument("--quick", action="store_true", help="a test of the script: 32 px, batch 2, small models")
    parser.add_argument("--name", default="memory", help="JSON name under benchmarks/results")
    parser.add_argument("--worker", choices=["keras", "keras_adam", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.filters, args.depth, args.decoder_filters = 32, 2, 4, 2, 8
    args.models = args.models or (["effb0_pan", "unet"] if args.quick else ["effb0_pan", "segformer", "unet"])
    if args.worker:
        name, options = args.models[0], _options(args, args.models[0])
        if args.worker == "torch":
            measured = torch_step_memory(name, args.size, args.batch, options=options)
        else:
            measured = keras_step_memory(name, args.size, args.batch, options=options,
                                         optimizer="keras" if args.worker == "keras_adam" else "fit")
        print(json.dumps(measured))
        return 0
    rows = []
    for name in args.models:
        single = argparse.Namespace(**{**vars(args), "models": [name]})
        keras_side = _worker("keras", single)
        graph_side = _worker("keras", argparse.Namespace(**{**vars(single), "size": 64, "batch": 1}))
        keras_adam_side = _worker("keras_adam", single)
        torch_side = None if args.no_torch else _worker("torch", single)
        rows.append({**row(name, keras_side, torch_side, graph_side, keras_adam_side), "keras": keras_side,
                     "keras_64px_batch1": graph_side, "keras_adam": keras_adam_side, "torch": torch_side})
        print(f"{name}: done", flush=True)
    print(markdown(rows))
    path = write_json(args.name, {
        "config": {"size": args.size, "batch": args.batch, "channels": 1, "optimizer": "Adam(1e-4)",
                   "loss": "categorical cross entropy", "policy": "float32", "filters": args.filters,
                   "depth": args.depth, "decoder_filters": args.decoder_filters, "quick": args.quick},
        "rows": rows,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
