"""Mixed-precision policy: ``auto`` | ``float32`` | ``mixed_float16`` | ``mixed_bfloat16``.

``auto`` follows DESIGN.md: float16 on a GPU (with Keras's loss scaling), float32 on a CPU
without native bf16, and on a CPU whose instruction set has native bf16 (AVX512_BF16 or AMX)
whichever of bfloat16 and float32 trains *this model* faster: bfloat16 is not faster for every
network (EfficientNetB0-PAN's depthwise convolutions ran slower in bfloat16 on our reference
CPU). :func:`choose_cpu_policy` times a few train steps of the model under both policies once
and caches the answer, keyed by the model, its input, the batch, the CPU and the library
versions. float16 is never chosen on a CPU: it runs about 8x slower there than float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np

from keras_livseg.data.atomic import atomic_write_json

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
#: How :func:`choose_cpu_policy` measures; part of its cache key, so answers measured another
#: way are measured again. 2: the two policies take turns (1 timed them one after the other,
#: which on a shared CPU could move float32's step by a fifth and flip the answer).
PROBE_VERSION = 2


def cpu_supports_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU advertises native bf16 arithmetic (Linux ``/proc/cpuinfo`` flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def gpu_count() -> int:
    """Visible GPUs for the active backend (0 when the backend cannot tell)."""
    try:
        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            return len(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return sum(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return torch.cuda.device_count()
    except Exception:  # a broken driver means no usable GPU, not a crash
        return 0
    return 0


def _alternating_best(steps: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """The best time of each step, the steps taking turns ``rounds`` times (first place alternating).

    Timed one after the other, the first policy would run while the machine is still settling
    (threads starting, memory first touched) and the second after: on a shared CPU that order
    alone moved float32's step by a fifth. Taking turns gives both the same conditions.

    Example:
        >>> order = []
        >>> best = _alternating_best({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
        >>> order, sorted(best)
        (['a', 'b', 'b', 'a', 'a', 'b'], ['a', 'b'])
    """
    best = {name: math.inf for name in steps}
    names = list(steps)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            steps[name]()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def _train_step_seconds(build: Callable[[], keras.Model], policies: Sequence[str], batch: int,
                        rounds: int) -> dict[str, float]:
    """The best train step of the model built under each of ``policies``, on random inputs,
    the policies taking turns (:func:`_alternating_best`) after each model's first (traced) step."""
    from keras_livseg.training.optimizers import FusedAdam, build_optimizer_variables

    previous = keras.mixed_precision.global_policy().name
    steps = {}
    try:
        for policy in policies:
            keras.mixed_precision.set_global_policy(policy)  # a layer keeps the policy it was built under
            model = build()
            rng = np.random.default_rng(0)
            x = rng.normal(size=(batch, *model.input_shape[1:])).astype("float32")
            y = np.zeros((batch, *model.output_shape[1:]), "float32")
            # The loss does not matter for the timing: forward, backward and the update (fit's) do.
            model.compile(optimizer=FusedAdam(1e-4), loss="mse")
            build_optimizer_variables(model)
            model.train_on_batch(x, y)  # trace and build
            steps[policy] = functools.partial(model.train_on_batch, x, y)
        return _alternating_best(steps, rounds)
    finally:
        keras.mixed_precision.set_global_policy(previous)
        keras.backend.clear_session()


def choose_cpu_policy(
    build: Callable[[], keras.Model],
    key: Mapping[str, Any],
    batch: int,
    cache_file: str | Path,
    steps: int = 5,
    margin: float = 0.95,
) -> str:
    """``"mixed_bfloat16"`` when it trains this model faster than float32 on this CPU, else ``"float32"``.

    Measured once (the best of ``steps`` train steps under each policy, after one to trace, the
    two models taking turns) and cached in ``cache_file`` under a digest of ``key`` plus the CPU
    model, the backend, the Keras/TensorFlow versions and :data:`PROBE_VERSION`; later runs read
    the answer.

    Args:
        build: builds the model (called under each policy).
        key: what makes the answer differ: model name and options, input shape.
        batch: the training batch size (timed at this size).
        cache_file: JSON file of earlier answers (created).
        steps: timed steps per policy (default 5).
        margin: bfloat16 must take at most ``margin`` times float32's step time to be chosen
            (a tie keeps float32's exact arithmetic).

    Returns:
        The policy name.
    """
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown")
    except OSError:
        cpu = "unknown"
    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except ImportError:
        tf_version = None
    full_key = {**dict(key), "batch": batch, "cpu": cpu, "backend": keras.backend.backend(),
                "keras": keras.__version__, "tensorflow": tf_version, "probe": PROBE_VERSION}
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache_file = Path(cache_file)
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # a damaged cache is measured again, not an error
    if digest in cache:
        return cache[digest]["policy"]
    logger.info("precision auto: timing %d train steps in float32 and in bfloat16 once (cached in %s)", steps, cache_file)
    timed = _train_step_seconds(build, ("float32", "mixed_bfloat16"), batch, steps)
    float32_s, bfloat16_s = timed["float32"], timed["mixed_bfloat16"]
    policy = "mixed_bfloat16" if bfloat16_s <= margin * float32_s else "float32"
    cache[digest] = {"key": full_key, "float32_s": float32_s, "mixed_bfloat16_s": bfloat16_s, "policy": policy,
                     "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(cache_file, cache, sort_keys=True, unique=True)  # workers may measure at once
    logger.info("precision auto: a train step takes %.3f s in float32 and %.3f s in bfloat16 on this CPU: %s",
                float32_s, bfloat16_s, policy)
    return policy


def resolve_precision(precision: str = "auto", gpus: int | None = None, cpuinfo: str | None = None,
                      probe: Callable[[], str] | None = None) -> str:
    """Turn ``precision`` into a Keras dtype policy name.

    ``probe`` decides between bfloat16 and float32 on a bf16-capable CPU (e.g. a
    :func:`choose_cpu_policy` call for the model about to train); without it such a CPU gets
    bfloat16.

    Example:
        >>> resolve_precision("auto", gpus=0, cpuinfo="flags : fpu sse avx2")
        'float32'
        >>> resolve_precision("auto", gpus=1)
        'mixed_float16'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    gpus = gpu_count() if gpus is None else gpus
    if precision == "auto":
        if gpus > 0:
            return "mixed_float16"
        if not cpu_supports_bfloat16(cpuinfo):
            return "float32"
        return probe() if probe is not None else "mixed_bfloat16"
    if precision == "mixed_float16" and gpus == 0:
        logger.warning("mixed_float16 on a CPU is about 8x slower than float32; consider --precision auto")
    return precision


def apply_precision(precision: str = "auto", probe: Callable[[], str] | None = None) -> str:
    """Resolve and set the global dtype policy; returns the policy name (``probe``: as
    :func:`resolve_precision`)."""
    policy = resolve_precision(precision, probe=probe)
    keras.mixed_precision.set_global_policy(policy)
    logger.info("dtype policy: %s", policy)
    return policy
