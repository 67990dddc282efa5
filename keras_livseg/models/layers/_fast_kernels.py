"""Drop-in BatchNormalization and swish layers with faster TensorFlow CPU kernels.

Used by EfficientNet-B0-PAN (its keras.applications encoder and the decoder's
ConvBNReLU). Both classes are subclasses of the Keras layers with the same
arguments, weights and config; on the TensorFlow backend they replace chains of
element-wise ops, each a full pass over memory, by one kernel. On other backends
they run the parent's code. Profile and figures: docs/perf-effb0_pan.md.
"""

from __future__ import annotations

import functools

import keras
from keras import activations, layers, ops


#: PyTorch's BatchNorm epsilon (1e-5) raised to the smallest that TensorFlow's fused kernel takes
#: (1.001e-5): with 1e-5 FusedBatchNormalization would fall back to ~10 unfused ops. A 0.1 %
#: change of a term added to the variances, for the networks that mirror PyTorch ones.
TORCH_BN_EPSILON = 1.001e-5


@keras.saving.register_keras_serializable(package="keras_livseg")
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by TensorFlow's ``FusedBatchNormV3``.

    Same arguments, weights, config, outputs and moving-statistics updates as
    ``keras.layers.BatchNormalization``; only the TensorFlow kernels differ. Keras 3
    computes batch norm on TensorFlow as ``tf.nn.moments`` followed by
    ``tf.nn.batch_normalization``: about ten element-wise and reduction ops over the
    whole activation forward, more backward, each a full pass over memory and each
    keeping its own intermediate for the gradient. ``FusedBatchNormV3`` (oneDNN on
    x86) does the forward in one op and the backward in one ``FusedBatchNormGradV3``.
    In EfficientNet-B0-PAN's train step (57 BN layers, the largest on 8x128x128x96)
    that took the encoder's BN from ~187 to ~66 ms of op time per step on 2 cores
    (see docs/perf-effb0_pan.md).

    The fused path is taken on the TensorFlow backend for 4D channels-last inputs
    without mask, ``synchronized`` or ``renorm``; anything else (JAX, PyTorch,
    channels_first, float16...) runs the parent's code unchanged. Under
    ``mixed_bfloat16`` the bfloat16 activation goes into the kernel as is; it computes
    in float32 inside, like the parent (which casts around it), with equal results.

    ``FusedBatchNormV3`` returns the Bessel-corrected (unbiased) batch variance for the
    moving average; Keras 3 averages the biased one, so it is scaled back by
    ``(n - 1) / n`` here and checkpoints stay interchangeable with the plain layer.
    """

    def _use_fused(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            and self.epsilon >= 1.001e-5  # fused_batch_norm silently raises smaller epsilons
            and keras.backend.standardize_dtype(inputs.dtype) in ("float32", "bfloat16")
        )

    def call(self, inputs, training=None, mask=None):
        if not self._use_fused(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        # bfloat16 goes in as is: the kernel computes in float32 internally (statistics,
        # scale, offset are float32) with the same results as casting around it, and
        # the two casts over the whole activation are saved.
        x = inputs
        channels = x.shape[-1]
        gamma = ops.cast(self.gamma, "float32") if self.scale else tf.ones((channels,), "float32")
        beta = ops.cast(self.beta, "float32") if self.center else tf.zeros((channels,), "float32")
        if training and self.trainable:
            y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )[:3]
            count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), "float32")  # N * H * W
            variance = unbiased_variance * ((count - 1.0) / tf.maximum(count, 1.0))
            moving_mean = ops.cast(self.moving_mean, "float32")
            moving_variance = ops.cast(self.moving_variance, "float32")
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            y = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta,
                mean=ops.cast(self.moving_mean, "float32"),
                variance=ops.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon, data_format="NHWC", is_training=False,
            )[0]
        return ops.cast(y, self.compute_dtype)


@functools.cache
def _tf_swish():
    """``swish`` for TensorFlow: oneDNN's fused forward, an XLA-fused gradient.

    ``tf.nn.silu``'s gradient is written as six element-wise TensorFlow ops
    (sigmoid, 1 - s, x * (1 - s), 1 + ..., s * ..., dy * ...), each a pass over the
    activation; compiled with XLA (``jit_compile=True``, one small function per
    activation shape) it is a single loop: on 8x128x128x96 the backward drops from
    ~21 ms to ~5 ms on 2 cores (bfloat16: ~41 ms to ~12 ms). The forward stays
    ``tf.nn.silu`` (one ``_MklSwish``). The first train step pays the compilation of
    one small function per activation shape (a second or two in all).
    """
    import tensorflow as tf

    @tf.function(jit_compile=True, autograph=False)
    def swish_grad(x, dy):
        # float32 inside the fused loop: XLA's CPU code for bfloat16 arithmetic is
        # slow (2x here), the conversions are free once fused.
        x32 = tf.cast(x, "float32")
        s = tf.sigmoid(x32)
        return tf.cast(tf.cast(dy, "float32") * (s * (1.0 + x32 * (1.0 - s))), dy.dtype)

    @tf.custom_gradient
    def swish(x):
        return tf.nn.silu(x), lambda dy: swish_grad(x, dy)

    return swish


@keras.saving.register_keras_serializable(package="keras_livseg")
class SwishActivation(layers.Activation):
    """``keras.layers.Activation`` whose ``"swish"``/``"silu"`` has a fused gradient on TensorFlow.

    Identical outputs and config to ``Activation("swish")``; on the TensorFlow
    backend the gradient is one XLA-compiled kernel instead of six ops (see
    :func:`_tf_swish`). Any other activation or backend runs the parent's code.
    """

    def call(self, inputs):
        if self.activation is activations.silu and keras.backend.backend() == "tensorflow":
            return _tf_swish()(inputs)
        return super().call(inputs)
