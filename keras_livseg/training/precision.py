"""Mixed-precision policy: ``auto`` | ``float32`` | ``mixed_float16`` | ``mixed_bfloat16``.

``auto`` follows DESIGN.md: float16 on a GPU (with Keras's loss scaling), bfloat16 on a CPU
whose instruction set has native bf16 (AVX512_BF16 or AMX), float32 otherwise. float16 is
never chosen on a CPU: it runs about 8x slower there than float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


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


def resolve_precision(precision: str = "auto", gpus: int | None = None, cpuinfo: str | None = None) -> str:
    """Turn ``precision`` into a Keras dtype policy name.

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
        return "mixed_bfloat16" if cpu_supports_bfloat16(cpuinfo) else "float32"
    if precision == "mixed_float16" and gpus == 0:
        logger.warning("mixed_float16 on a CPU is about 8x slower than float32; consider --precision auto")
    return precision


def apply_precision(precision: str = "auto") -> str:
    """Resolve and set the global dtype policy; returns the policy name."""
    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    logger.info("dtype policy: %s", policy)
    return policy
