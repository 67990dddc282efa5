"""Helpers shared by the model tests: one function that exercises a layer completely."""

from __future__ import annotations

import contextlib

import keras
import numpy as np


@contextlib.contextmanager
def dtype_policy(name: str):
    """Set the global dtype policy for the block, restoring the previous one after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def compile_as_fit(model: keras.Model, learning_rate: float = 1e-3, **kwargs) -> keras.Model:
    """Compile with Adam as ``fit`` makes it: ``FusedAdam``, its variables built before the first step.

    Keras' own Adam builds its variables inside the first traced step and writes ~15 ops per
    weight there: tracing MA-Net's first step took 29.5 s with it against 4.0 s with this, for the
    same loss. ``kwargs`` go to ``compile`` (default loss: categorical cross entropy).
    """
    from keras_livseg.training.optimizers import FusedAdam, build_optimizer_variables

    model.compile(optimizer=FusedAdam(learning_rate), **{"loss": "categorical_crossentropy", **kwargs})
    build_optimizer_variables(model)
    return model


def random_inputs(shapes, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape).astype("float32") for shape in shapes]
    return arrays if len(arrays) > 1 else arrays[0]


def run_layer_test(layer_cls, init_kwargs, input_shapes, expected_output_shape, fit=True):
    """Config round trip, symbolic and eager call, one fit step, mixed_bfloat16.

    ``input_shapes`` is a list of full shapes (batch included); several mean a list input.
    """
    # Config round trip.
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    for key, value in init_kwargs.items():
        stored = getattr(layer, key)
        assert (tuple(stored) if isinstance(stored, (list, tuple)) else stored) == (
            tuple(value) if isinstance(value, (list, tuple)) else value
        ), key

    # Symbolic call.
    symbolic = [keras.Input(batch_shape=shape) for shape in input_shapes]
    out = layer(symbolic if len(symbolic) > 1 else symbolic[0])
    assert tuple(out.shape) == tuple(expected_output_shape)

    # Eager call on the built layer (same weights) and on a fresh one.
    data = random_inputs(input_shapes)
    eager = keras.ops.convert_to_numpy(layer(data))
    assert eager.shape == tuple(expected_output_shape)
    assert np.isfinite(eager).all()
    fresh = layer_cls(**init_kwargs)
    assert tuple(fresh(data).shape) == tuple(expected_output_shape)

    # One fit step changes the trainable weights and gives a finite loss.
    if fit:
        inputs = [keras.Input(batch_shape=(None,) + tuple(s[1:])) for s in input_shapes]
        trained = layer_cls(**init_kwargs)
        inputs = inputs if len(inputs) > 1 else inputs[0]
        model = keras.Model(inputs, trained(inputs))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [w.numpy().copy() for w in trained.trainable_weights]
        target = np.ones(expected_output_shape, "float32")
        history = model.fit(data, target, batch_size=expected_output_shape[0], epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [w.numpy() for w in trained.trainable_weights]
        assert before, "the layer has no trainable weights"
        assert any(not np.allclose(b, a) for b, a in zip(before, after))

    # Mixed precision: bfloat16 compute, float32 variables, float32 model output.
    with dtype_policy("mixed_bfloat16"):
        mixed = layer_cls(**init_kwargs)
        assert mixed.compute_dtype == "bfloat16"
        inputs = [keras.Input(batch_shape=s) for s in input_shapes]
        inputs = inputs if len(inputs) > 1 else inputs[0]
        hidden = mixed(inputs)
        assert hidden.dtype == "bfloat16"
        out = keras.layers.Activation("linear", dtype="float32")(hidden)
        model = keras.Model(inputs, out)
        result = model(data)
        assert keras.backend.standardize_dtype(result.dtype) == "float32"
        assert all(w.dtype == "float32" for w in mixed.weights)
        eager_mixed = keras.ops.convert_to_numpy(mixed(data))
        assert keras.backend.standardize_dtype(mixed(data).dtype) == "bfloat16"
        assert np.isfinite(eager_mixed.astype("float32")).all()
    return layer


def save_and_reload(model, path, data):
    """Save to ``.keras``, reload, and return (original outputs, reloaded outputs)."""
    model.save(path)
    reloaded = keras.models.load_model(path)
    return (
        keras.ops.convert_to_numpy(model(data, training=False)),
        keras.ops.convert_to_numpy(reloaded(data, training=False)),
        reloaded,
    )


#: Every registry model at a tiny size (64x64 works for all): the options the cross-model tests use.
SMALL_OPTIONS = {
    "unet": {"filters": 4, "depth": 2},
    "tam_unet": {"filters": 4, "depth": 2},
    "attention_unet": {"filters": 4, "depth": 2},
    "unet_cbam": {"filters": 4, "depth": 2, "cbam_ratio": 2},  # hidden MLP width >= 2: no lone dead ReLU
    "effb0_pan": {"decoder_filters": 8},
    "linknet": {"encoder": "resnet18"},
    "pspnet": {"encoder": "resnet18", "psp_filters": 16},
    "manet": {"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8), "pab_channels": 8},
    "deeplabv3plus": {"backbone_filters": (64, 8, 8, 8), "aspp_filters": 8, "low_level_filters": 4,
                      "decoder_filters": 8},
    "segformer": {"embedding_dims": (8, 16, 40, 64), "depths": (1, 1, 1, 1), "decoder_filters": 16},
}
