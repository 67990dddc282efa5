"""Every model of the registry keeps the same contract (the per-model files test the rest)."""

from __future__ import annotations

import importlib.util
import sys

import keras
import numpy as np
import pytest
from models_testing import SMALL_OPTIONS, dtype_policy, random_inputs

from keras_livseg.models import EXTRAS, MissingExtraError, available_models, build_model

MODELS = available_models()


def _needs(name):
    package = EXTRAS.get(name, (None,))[0]
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{name} needs {package} (the [{EXTRAS[name][1]}] extra)")


def test_every_model_has_small_options_for_the_shared_tests():
    assert set(MODELS) == set(SMALL_OPTIONS)
    assert {"unet", "tam_unet", "effb0_pan", "attention_unet", "unet_cbam", "linknet", "pspnet", "manet",
            "deeplabv3plus", "segformer"} == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels", [1, 3])
def test_contract_input_output_and_mixed_precision(name, channels):
    _needs(name)
    with dtype_policy("mixed_bfloat16"):
        model = build_model(name, input_shape=(64, 64, channels), **SMALL_OPTIONS[name])
        assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
        probabilities = model(random_inputs([(2, 64, 64, channels)]), training=False)
        assert keras.backend.standardize_dtype(probabilities.dtype) == "float32"
    probabilities = keras.ops.convert_to_numpy(probabilities)
    assert probabilities.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-3)  # bfloat16 inside


@pytest.mark.parametrize("name", MODELS)
def test_a_wrong_input_size_names_the_nearest_valid_one(name):
    _needs(name)
    with pytest.raises(ValueError, match=r"nearest valid (height|width|size)"):
        build_model(name, input_shape=(67, 64, 1), **SMALL_OPTIONS[name])


def test_unknown_names_and_options_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="'vnet'.*'unet', 'tam_unet', 'effb0_pan'"):
        build_model("vnet")
    with pytest.raises(ValueError, match=r"\['filter'\]"):
        build_model("unet", input_shape=(32, 32, 1), filter=4)


@pytest.mark.parametrize("name", [n for n in MODELS if n in EXTRAS])
def test_a_model_without_its_extra_names_the_extra(name, monkeypatch):
    package, extra = EXTRAS[name]
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(MissingExtraError, match=rf'pip install "keras_livseg\[{extra}\]"'):
        build_model(name, input_shape=(64, 64, 1))
    with pytest.raises(ValueError):  # the commands print ValueErrors as one line
        build_model(name, input_shape=(64, 64, 1))


PATCH_TRAINABLE = {"unet", "tam_unet", "attention_unet", "unet_cbam"}


@pytest.mark.parametrize("name", MODELS)
def test_any_size_twin_shares_the_weights_or_says_the_model_cannot_take_patches(name):
    from keras_livseg.models import any_size

    _needs(name)
    model = build_model(name, input_shape=(64, 64, 1), **SMALL_OPTIONS[name])
    if name not in PATCH_TRAINABLE:
        with pytest.raises(ValueError, match=r"cannot run on 32x32 patches .*training.crop_size = 0"):
            any_size(model, 32)
        return
    twin = any_size(model, 32)
    assert tuple(twin.input.shape) == (None, None, None, 1) and twin.inputs[0].name == "ct_slices"
    assert len(twin.weights) == len(model.weights) and all(a is b for a, b in zip(twin.weights, model.weights))
    whole = random_inputs([(2, 64, 64, 1)])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(twin(whole, training=False)),
                                  keras.ops.convert_to_numpy(model(whole, training=False)))
    patch = keras.ops.convert_to_numpy(twin(random_inputs([(2, 32, 32, 1)]), training=False))
    assert patch.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(patch.sum(-1), 1.0, atol=1e-5)
