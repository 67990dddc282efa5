"""What a model costs: parameters, FLOPs and measured training / inference slices per second.

The figures ``compare`` puts beside each model's Dice. FLOPs are counted by TensorFlow's graph
profiler on the inference graph of one slice (2 FLOPs per multiply-add, the convention of the
papers' tables and of ``fvcore``/``thop`` doubled); throughput is timed on in-memory random
batches, so that it measures the network and not the input pipeline.

>>> from keras_livseg.models import build_model
>>> model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
>>> count_parameters(model)["trainable"]
7407
"""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np

logger = logging.getLogger(__name__)


def count_parameters(model: keras.Model) -> dict[str, int]:
    """``{"trainable", "non_trainable", "total"}`` weight counts (BN moving statistics are non-trainable)."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return {"trainable": trainable, "non_trainable": non_trainable, "total": trainable + non_trainable}


def count_flops(model: keras.Model) -> int | None:
    """Floating-point operations of one forward pass on one slice (batch 1, inference mode).

    Counted by TensorFlow's profiler on the frozen inference graph: convolutions, transposed
    convolutions, matrix products and the element-wise ops it has statistics for. Returns None
    (and logs why) under a backend other than TensorFlow.

    Example:

    >>> model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, padding="same", use_bias=False)])
    >>> count_flops(model) == 2 * 16 * 16 * 3 * 3 * 3 * 8
    True
    """
    if keras.backend.backend() != "tensorflow":
        logger.info("FLOPs are counted on the TensorFlow backend only (this is %s)", keras.backend.backend())
        return None
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((1, *model.input_shape[1:]), tf.float32)
    forward = tf.function(lambda x: model(x, training=False), autograph=False)
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function(spec))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    info = tf.compat.v1.profiler.profile(graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                         options=options)
    return int(info.total_float_ops)


def measure_throughput(
    model: keras.Model, batch_size: int = 8, train_steps: int = 6, warmup_steps: int = 2, seed: int = 0
) -> dict[str, Any]:
    """Training and inference slices per second on in-memory random batches.

    The model is compiled (Adam, categorical cross-entropy; its own compile state is replaced:
    pass a fresh model), warmed up ``warmup_steps`` times (tracing, allocation), then
    ``train_steps`` training steps and as many inference batches are timed.

    Returns:
        ``{"train_slices_per_s", "inference_slices_per_s", "batch_size", "steps"}``.
    """
    rng = np.random.default_rng(seed)
    shape = (batch_size, *model.input_shape[1:])
    x = rng.normal(size=shape).astype("float32")
    classes = int(model.output_shape[-1])
    y = keras.utils.to_categorical(rng.integers(0, classes, shape[:3]), classes).astype("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
    for _ in range(warmup_steps):
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(train_steps):
        model.train_on_batch(x, y)
    train_seconds = time.perf_counter() - started
    for _ in range(warmup_steps):
        model.predict_on_batch(x)
    started = time.perf_counter()
    for _ in range(train_steps):
        model.predict_on_batch(x)
    infer_seconds = time.perf_counter() - started
    return {
        "train_slices_per_s": batch_size * train_steps / train_seconds,
        "inference_slices_per_s": batch_size * train_steps / infer_seconds,
        "batch_size": batch_size,
        "steps": train_steps,
    }
