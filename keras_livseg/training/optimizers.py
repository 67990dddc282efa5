"""Adam and AdamW with one fused update kernel per variable on TensorFlow.

Keras 3's Adam writes its update as ~15 element-wise ops per variable, and recomputes the
step's scalars (``beta ** t``, casts) for each one. In a traced TensorFlow train step every op
is a graph node with its kernel, which costs memory whatever the tensor sizes.
``benchmarks/bench_memory.py`` measures Keras' Adam (built inside the first traced step) beside
these built before it (:func:`build_optimizer_variables`), both changes together: README,
"Peak memory".

:class:`FusedAdam` and :class:`FusedAdamW` compute the step's scalars once per step and update
each dense variable with TensorFlow's ``ResourceApplyAdam``, the same formula as Keras'::

    m <- m + (g - m) (1 - beta_1)
    v <- v + (g^2 - v) (1 - beta_2)
    w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

AdamW's decoupled weight decay is Keras' ``w <- w - w * weight_decay * lr`` with the learning
rate read once per step. Everything else is Keras' own: gradient clipping, loss
scaling, EMA, gradient accumulation, distribution strategies, ``get_config`` and saving.
Other backends (JAX), ``amsgrad=True``, sparse gradients and float16/bfloat16 variables run
Keras' code unchanged (``ResourceApplyAdam`` would compute ``1 - beta`` in the variable's
dtype: in bfloat16, ``1 - 0.999`` is 0).

A ``.keras`` file saved by ``fit`` names its optimizer ``keras_livseg>FusedAdamW``: load it
compiled after ``import keras_livseg.training.optimizers`` (keras_livseg's own loaders use
``compile=False`` and need nothing).

Example::

    >>> import keras
    >>> from keras_livseg.training.optimizers import FusedAdamW, build_optimizer_variables
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=FusedAdamW(1e-3, weight_decay=1e-4), loss="mse")
    >>> build_optimizer_variables(model)   # before the first step: see its docstring
"""

from __future__ import annotations

import keras

_FUSED_DTYPES = ("float32", "float64")  # half precision: Keras' code (see the module docstring)


class _FusedAdamUpdate:
    """The TensorFlow update path shared by :class:`FusedAdam` and :class:`FusedAdamW`."""

    def _apply_weight_decay(self, variables):
        # Keras' TensorFlow version reads ``self.learning_rate`` once per variable, which
        # evaluates a learning-rate schedule (OneCycle: a dozen ops) once per variable. Here it
        # is read once per step; the decay itself is Keras' ``w -= w * wd * lr``.
        if self.weight_decay is None or keras.config.backend() != "tensorflow":
            return super()._apply_weight_decay(variables)
        import tensorflow as tf

        def distributed_weight_decay(distribution, variables):
            factors = {}

            def decay(variable):
                if self._use_weight_decay(variable):
                    if variable.dtype not in factors:
                        factors[variable.dtype] = (tf.cast(self.weight_decay, variable.dtype),
                                                   tf.cast(self.learning_rate, variable.dtype))
                    weight_decay, learning_rate = factors[variable.dtype]
                    variable.assign_sub(variable * weight_decay * learning_rate)

            for variable in variables:
                variable = variable.value if isinstance(variable, keras.Variable) else variable
                distribution.extended.update(variable, decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(distributed_weight_decay, self._distribution_strategy,
                                                             variables)

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # Keras' TensorFlow optimizer calls this once per step, in cross-replica context, with
        # every (gradient, variable) pair; the parent calls update_step per variable.
        import tensorflow as tf

        if self.amsgrad:
            return super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        scalars = {}

        def step_scalars(dtype):
            # One set of scalars per variable dtype, shared by every variable of that dtype.
            if dtype not in scalars:
                step = tf.cast(self.iterations + 1, dtype)
                beta_1, beta_2 = tf.constant(self.beta_1, dtype), tf.constant(self.beta_2, dtype)
                scalars[dtype] = {
                    "beta1_power": tf.pow(beta_1, step), "beta2_power": tf.pow(beta_2, step),
                    "lr": tf.cast(learning_rate, dtype), "beta1": beta_1, "beta2": beta_2,
                    "epsilon": tf.constant(self.epsilon, dtype),
                }
            return scalars[dtype]

        def fused_update(variable, gradient):
            index = self._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
                grad=tf.cast(gradient, variable.dtype), **step_scalars(variable.dtype),
            )

        def keras_update(variable, gradient):
            return self.update_step(gradient, variable, learning_rate)

        for gradient, variable in grads_and_vars:
            fusable = not isinstance(gradient, tf.IndexedSlices) and variable.dtype.name in _FUSED_DTYPES
            distribution.extended.update(variable, fused_update if fusable else keras_update, args=(gradient,),
                                         group=False)


@keras.saving.register_keras_serializable(package="keras_livseg")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with one ``ResourceApplyAdam`` per variable on TensorFlow.

    Same arguments, results (to float rounding) and config as Keras' Adam; see the module.
    """


@keras.saving.register_keras_serializable(package="keras_livseg")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with one ``ResourceApplyAdam`` per variable on TensorFlow.

    The decoupled weight decay is Keras' own (applied before the Adam update, as in Keras).
    """


def build_optimizer_variables(model: keras.Model) -> None:
    """Create ``model``'s optimizer variables now, outside any traced function.

    Keras on TensorFlow without a distribution strategy defers this to the first traced train
    step, and creating the slot variables (two per trainable variable for Adam) inside that
    trace leaves the step's graph much larger (``benchmarks/bench_memory.py``). Building them
    eagerly after ``compile`` is what Keras itself does under a distribution strategy. Call it
    inside the strategy's scope when there is one.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
