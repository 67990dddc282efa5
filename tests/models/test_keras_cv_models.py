"""keras-cv DeepLabV3+ and SegFormer (extra [cv]): the contract, logits, save/load, the missing extra."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, save_and_reload

from keras_livseg.models import MissingExtraError, keras_cv_models
from keras_livseg.models.keras_cv_models import (
    KerasCVDeepLabV3Plus,
    KerasCVSegFormer,
    build_deeplabv3plus,
    build_segformer,
)
from keras_livseg.models.saving import load_keras_model

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SKIP_REASON = 'keras-cv is the optional [cv] extra (pip install "keras_livseg[cv]")'

# ResNetV2 basic blocks need a 64-wide first stack (the stem is added as identity).
SMALL_DEEPLAB = {"backbone_filters": (64, 8, 8, 8), "aspp_filters": 8, "low_level_filters": 4, "decoder_filters": 8}
SMALL_SEGFORMER = {"embedding_dims": (8, 16, 40, 64), "depths": (1, 1, 1, 1), "decoder_filters": 16}
# name: (builder, small options, smallest valid side)
MODELS = {
    "deeplabv3plus": (build_deeplabv3plus, SMALL_DEEPLAB, 32),
    "segformer": (build_segformer, SMALL_SEGFORMER, 64),
}


@pytest.fixture(autouse=True)
def _needs_keras_cv(request):
    """Every test but the missing-extra ones needs keras-cv: skip them all without it."""
    if not request.node.name.startswith("test_without_keras_cv"):
        pytest.importorskip("keras_cv", reason=SKIP_REASON)


def build_small(name, channels=1, **options):
    builder, small, side = MODELS[name]
    return builder(input_shape=(side, side, channels), **{**small, **options})


def logits_layer(model):
    return model.get_layer(f"{model.name}_logits")


def first_conv(model):
    network = logits_layer(model).network
    return next(layer for layer in network._flatten_layers() if isinstance(layer, keras.layers.Conv2D))


# ---------------------------------------------------------------- hand-computed parameter counts


def resnetv2_param_count(channels, filters, blocks, block_type):
    """keras-cv ResNetV2 up to P5, plus its unused post_bn; returns (count, P2 channels, P5 channels)."""
    count = 7 * 7 * channels * 64 + 64  # conv1_conv, with bias
    width_in = 64
    p2 = None
    for stack, (width, depth) in enumerate(zip(filters, blocks)):
        width_out = width if block_type == "basic_block" else 4 * width
        for block in range(depth):
            count += 4 * width_in  # pre-activation BN (gamma, beta, mean, variance)
            if block == 0 and (block_type == "block" or stack > 0):
                count += width_in * width_out + width_out  # 1x1 shortcut conv, with bias
            if block_type == "basic_block":
                count += 9 * width_in * width + 4 * width + 9 * width * width
            else:
                count += width_in * width + 4 * width + 9 * width * width + 4 * width + width * 4 * width + 4 * width
            width_in = width_out
        p2 = width_out if stack == 0 else p2
    count += 4 * width_in  # post_bn: not in DeepLabV3+'s graph, but keras-cv keeps the backbone
    return count, p2, width_in


def deeplab_param_count(channels, num_classes, backbone_filters, backbone_blocks, backbone_block_type,
                        aspp_filters, aspp_rates, low_level_filters, decoder_filters):
    count, p2, p5 = resnetv2_param_count(channels, backbone_filters, backbone_blocks, backbone_block_type)
    a = aspp_filters
    count += (p5 * a + 4 * a) * 2  # 1x1 branch and image-pooling branch (conv without bias + BN)
    count += len(aspp_rates) * (9 * p5 * a + 4 * a)  # dilated 3x3 branches
    count += (2 + len(aspp_rates)) * a * a + 4 * a  # projection
    count += p2 * low_level_filters + 4 * low_level_filters  # low-level projection
    count += (a + low_level_filters) * decoder_filters + 4 * decoder_filters  # head conv + BN
    return count + decoder_filters * num_classes  # classifier, no bias


def segformer_param_count(channels, num_classes, embedding_dims, depths, decoder_filters):
    count, width_in = 0, channels
    for stage, (d, depth) in enumerate(zip(embedding_dims, depths)):
        kernel = 7 if stage == 0 else 3
        count += kernel * kernel * width_in * d + d + 2 * d  # overlapping patch embedding: conv + LayerNorm
        sr = (8, 4, 2, 1)[stage]
        attention = 4 * (d * d + d) + ((sr * sr * d * d + d) + 2 * d if sr > 1 else 0)  # q, k, v, proj (+ SR)
        mix_ffn = (d * 4 * d + 4 * d) + (9 * 4 * d + 4 * d) + (4 * d * d + d)  # fc1, 3x3 depthwise, fc2
        count += depth * (2 * d + attention + 2 * d + mix_ffn) + 2 * d  # blocks (2 LayerNorms each), stage LN
        width_in = d
    e = decoder_filters
    count += sum(d * e + e for d in embedding_dims)  # per-stage linear projections
    count += 4 * e * e + 4 * e  # fuse 1x1 conv (no bias) + BN
    return count + e * num_classes + num_classes  # classifier, with bias


@pytest.mark.slow
def test_parameter_counts_match_the_hand_computation():
    deeplab = build_small("deeplabv3plus")
    assert deeplab.count_params() == deeplab_param_count(
        1, 3, (64, 8, 8, 8), (2, 2, 2, 2), "basic_block", 8, (6, 12, 18), 4, 8
    ) == 166_720
    bottleneck = build_deeplabv3plus(
        input_shape=(32, 32, 3), num_classes=2, backbone_filters=(4, 4, 8, 8), backbone_blocks=(2, 3, 2, 2),
        backbone_block_type="block", aspp_filters=8, aspp_rates=(2, 4), low_level_filters=4, decoder_filters=8,
    )
    assert bottleneck.count_params() == deeplab_param_count(
        3, 2, (4, 4, 8, 8), (2, 3, 2, 2), "block", 8, (2, 4), 4, 8
    )
    segformer = build_small("segformer", channels=3)
    assert segformer.count_params() == segformer_param_count(3, 3, (8, 16, 40, 64), (1, 1, 1, 1), 16) == 128_779


@pytest.mark.slow
def test_default_parameter_counts():
    # Parameters do not depend on the image size: build the defaults at 64x64.
    deeplab = build_deeplabv3plus(input_shape=(64, 64, 1))
    assert deeplab.count_params() == deeplab_param_count(
        1, 3, (64, 128, 256, 512), (2, 2, 2, 2), "basic_block", 256, (6, 12, 18), 48, 256
    ) == 15_395_008
    segformer = build_segformer(input_shape=(64, 64, 1))
    assert segformer.count_params() == segformer_param_count(
        1, 3, (32, 64, 160, 256), (2, 2, 2, 2), 256
    ) == 3_712_291


# ---------------------------------------------------------------- the model contract


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels", [1, 3])
def test_named_input_and_float32_probabilities(name, channels):
    model = build_small(name, channels=channels)
    side = MODELS[name][2]
    assert model.name == name
    assert [layer.name for layer in model.layers] == ["ct_slices", f"{name}_logits", "probabilities"]
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.input.shape) == (None, side, side, channels)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2, side, side, channels)])))
    assert probs.shape == (2, side, side, 3) and probs.dtype == np.float32
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_keras_cv_gives_logits_and_the_project_head_the_probabilities(name):
    model = build_small(name)
    side = MODELS[name][2]
    x = random_inputs([(1, side, side, 1)])
    logits = keras.ops.convert_to_numpy(logits_layer(model)(x))
    assert np.abs(logits.sum(axis=-1) - 1.0).max() > 1e-2  # not probabilities: keras-cv's softmax is gone
    probs = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(probs, keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1)), rtol=1e-5,
                               atol=1e-6)
    sigmoid = build_small(name, head="sigmoid", num_classes=2)
    logits = keras.ops.convert_to_numpy(logits_layer(sigmoid)(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sigmoid(x)), 1.0 / (1.0 + np.exp(-logits)), rtol=1e-5,
                               atol=1e-6)


def test_segformer_classifier_is_linear_and_resized_to_the_input():
    model = build_small("segformer")
    network = logits_layer(model).network
    classifier, resize = network.layers[-2], network.layers[-1]
    assert classifier.activation is keras.activations.linear
    assert type(resize).__name__ == "Resizing" and (resize.height, resize.width) == (64, 64)
    assert resize.interpolation == "bilinear"


def test_deeplab_backbone_is_built_from_arguments_and_its_unused_bn_is_frozen():
    model = build_small("deeplabv3plus")
    network = logits_layer(model).network
    backbone = network.backbone
    assert type(backbone).__name__ == "ResNetV2Backbone" and not backbone.include_rescaling
    assert backbone.stackwise_filters == [64, 8, 8, 8] and backbone.stackwise_strides == [1, 2, 2, 2]
    assert not backbone.get_layer("post_bn").trainable
    trainable_paths = [w.path for w in model.trainable_weights]
    assert not any("post_bn" in path for path in trainable_paths)
    assert network.get_layer("segmentation_head").layers[-1].dtype_policy.name == "float32"


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_changes_every_trainable_weight(name):
    keras.utils.set_random_seed(3)
    model = build_small(name)
    side = MODELS[name][2]
    x = random_inputs([(2, side, side, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, side, side)), 3)
    # Eager: tracing keras-cv's graphs costs ~20-35 s on 2 cores, one eager step ~3 s.
    compile_as_fit(model, 1e-3, run_eagerly=True)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.5 < loss < 3.0  # cross entropy near ln 3 at initialization
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert len(changed) > 50 and all(changed)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_keras_save_and_both_loaders_give_identical_outputs(name, tmp_path):
    model = build_small(name, channels=3)
    side = MODELS[name][2]
    x = random_inputs([(2, side, side, 3)])
    original, reloaded, clone = save_and_reload(model, tmp_path / f"{name}.keras", x)
    np.testing.assert_array_equal(original, reloaded)
    assert clone.count_params() == model.count_params()
    assert type(logits_layer(clone)) is type(logits_layer(model))
    loaded = load_keras_model(tmp_path / f"{name}.keras")  # the project's safe-mode loader
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=False)), original)


@pytest.mark.parametrize("name", MODELS)
def test_mixed_float16_computes_in_float16_and_outputs_float32(name):
    side = MODELS[name][2]
    with dtype_policy("mixed_float16"):
        model = build_small(name)
        assert first_conv(model).compute_dtype == "float16"
        assert model.output.dtype == "float32"
        probs = model(random_inputs([(1, side, side, 1)]))
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-3)
    assert keras.config.dtype_policy().name == "float32"  # building restores the global policy


@pytest.mark.slow
def test_a_mixed_precision_file_reloads_as_mixed_under_a_float32_policy(tmp_path):
    with dtype_policy("mixed_float16"):
        model = build_small("segformer")
    x = random_inputs([(1, 64, 64, 1)])
    expected = keras.ops.convert_to_numpy(model(x))
    model.save(tmp_path / "mixed.keras")
    reloaded = keras.models.load_model(tmp_path / "mixed.keras")  # global policy is float32 here
    assert first_conv(reloaded).compute_dtype == "float16"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded(x)), expected)


def test_logits_layers_config_round_trip():
    deeplab = KerasCVDeepLabV3Plus(3, (64, 8, 8, 8), (2, 2, 2, 2), "basic_block", 8, (6, 12), 0.1, 4, 8, name="d")
    segformer = KerasCVSegFormer(2, (8, 16, 40, 64), (1, 1, 1, 1), 16, name="s")
    for layer in (deeplab, segformer):
        config = layer.get_config()
        clone = type(layer).from_config(config)
        assert clone.get_config() == config
        for key, value in config.items():
            if key not in ("name", "trainable", "dtype"):
                assert getattr(layer, key) == value, key
        assert keras.saving.get_registered_name(type(layer)) == f"keras_livseg>{type(layer).__name__}"
    assert deeplab.compute_output_shape((None, 32, 32, 1)) == (None, 32, 32, 3)
    assert tuple(deeplab(random_inputs([(1, 32, 32, 1)])).shape) == (1, 32, 32, 3)
    assert segformer.compute_output_shape((2, 64, 64, 3)) == (2, 64, 64, 2)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name, input_shape, match",
    [
        ("deeplabv3plus", (100, 96, 1), r"height 100 is not a multiple of 32.* nearest valid height is 96"),
        ("deeplabv3plus", (64, 80, 1), r"width 80 .* nearest valid width is 96"),
        ("deeplabv3plus", (16, 16, 1), r"height 16 .* nearest valid height is 32"),
        ("segformer", (70, 64, 1), r"height 70 is not a multiple of 32.* nearest valid height is 64"),
        ("segformer", (32, 32, 1), r"height 32 is below 64 .* nearest valid height is 64"),
        ("segformer", (64, 96, 1), r"must be square .* height 64 and width 96; the nearest valid size is 96x96"),
    ],
)
def test_wrong_input_size_names_the_nearest_valid_size(name, input_shape, match):
    builder, small, _ = MODELS[name]
    with pytest.raises(ValueError, match=match):
        builder(input_shape=input_shape, **small)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("deeplabv3plus", {"backbone_blocks": (2, 1, 2, 2)}, r"backbone_blocks=\(2, 1, 2, 2\)"),
        ("deeplabv3plus", {"backbone_filters": (64, 8, 8)}, r"backbone_filters=\(64, 8, 8\)"),
        ("deeplabv3plus", {"backbone_filters": (32, 8, 8, 8)}, r"backbone_filters\[0\] must be 64.*\(32, 8, 8, 8\)"),
        ("deeplabv3plus", {"backbone_block_type": "bottleneck"}, r"backbone_block_type='bottleneck'"),
        ("deeplabv3plus", {"aspp_rates": (6, 0)}, r"aspp_rates=\(6, 0\)"),
        ("deeplabv3plus", {"aspp_rates": ()}, r"aspp_rates=\(\)"),
        ("deeplabv3plus", {"aspp_dropout": 1.0}, r"aspp_dropout=1.0"),
        ("deeplabv3plus", {"aspp_filters": 0}, r"aspp_filters=0"),
        ("deeplabv3plus", {"low_level_filters": 2.5}, r"low_level_filters=2.5"),
        ("deeplabv3plus", {"decoder_filters": -1}, r"decoder_filters=-1"),
        ("deeplabv3plus", {"head": "relu"}, r"head='relu'"),
        ("segformer", {"embedding_dims": (8, 16, 42, 64)}, r"embedding_dims\[2\] must be divisible by the 5 .*try 40"),
        ("segformer", {"depths": (1, 0, 1, 1)}, r"depths=\(1, 0, 1, 1\)"),
        ("segformer", {"decoder_filters": 0}, r"decoder_filters=0"),
        ("segformer", {"num_classes": 1}, r"num_classes=1"),
    ],
)
def test_bad_option_is_quoted(name, options, match):
    builder, small, side = MODELS[name]
    with pytest.raises(ValueError, match=match):
        builder(input_shape=(side, side, 1), **{**small, **options})


@pytest.mark.parametrize("name", MODELS)
def test_channels_first_is_refused_with_the_fix(name):
    builder, small, side = MODELS[name]
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        with pytest.raises(ValueError, match=r"channels_last only.*set_image_data_format\('channels_last'\)"):
            builder(input_shape=(1, side, side), **small)
    finally:
        keras.config.set_image_data_format(previous)


# ---------------------------------------------------------------- keras-cv is optional


@pytest.mark.parametrize("builder", [build_deeplabv3plus, build_segformer])
def test_without_keras_cv_building_says_how_to_install_it(builder, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_cv", None)  # what an absent package looks like to import
    with pytest.raises(MissingExtraError) as missing:
        builder(input_shape=(64, 64, 1))
    assert 'pip install "keras_livseg[cv]"' in str(missing.value)
    assert isinstance(missing.value, ImportError) and isinstance(missing.value, ValueError)


def test_without_keras_cv_a_saved_model_is_refused_with_the_install_hint(tmp_path, monkeypatch):
    pytest.importorskip("keras_cv", reason=SKIP_REASON)  # to save one first
    build_small("deeplabv3plus").save(tmp_path / "deeplab.keras")
    monkeypatch.setitem(sys.modules, "keras_cv", None)
    with pytest.raises(ValueError, match=r'pip install "keras_livseg\[cv\]"'):
        load_keras_model(tmp_path / "deeplab.keras")


@pytest.mark.slow
def test_without_keras_cv_importing_the_models_does_not_import_it():
    code = (
        "import sys\n"
        "import keras_livseg.models, keras_livseg.models.keras_cv_models\n"
        "print('keras_cv' in sys.modules)\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1:] == ["False"], (result.stdout, result.stderr[-2000:])


@pytest.mark.slow
def test_docstring_examples_run():
    result = doctest.testmod(keras_cv_models, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0
