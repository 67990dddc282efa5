"""LinkNet: shapes, smp's parameter count, a decoder block by hand, save/load, training, JAX."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, save_and_reload

from keras_livseg.models.linknet import build_linknet, decoder_block

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def resnet_param_counts(in_channels, blocks, stages=4):
    """(trainable, batch-norm channels) of the BasicBlock ResNet up to ``stages``, by hand."""
    trainable, bn_channels = 7 * 7 * in_channels * 64 + 2 * 64, 64  # stem conv + BN
    cin = 64
    for stage, (count, filters) in enumerate(zip(blocks[:stages], (64, 128, 256, 512))):
        for index in range(count):
            trainable += 9 * cin * filters + 9 * filters * filters + 4 * filters  # 2 convs + 2 BN
            bn_channels += 2 * filters
            if (stage > 0 and index == 0) or cin != filters:  # 1x1 downsample + BN
                trainable += cin * filters + 2 * filters
                bn_channels += filters
            cin = filters
    return trainable, bn_channels


def linknet_param_counts(in_channels, blocks, num_classes):
    """(trainable, all) parameters of build_linknet: encoder, 5 decoder blocks, 1x1 head."""
    trainable, bn_channels = resnet_param_counts(in_channels, blocks)
    for cin, cout in ((512, 256), (256, 128), (128, 64), (64, 64), (64, 32)):
        q = cin // 4
        # 1x1 (no bias) + BN, 4x4 transposed (bias) + BN, 1x1 (no bias) + BN
        trainable += cin * q + 2 * q + 16 * q * q + q + 2 * q + q * cout + 2 * cout
        bn_channels += 2 * q + cout
    trainable += 32 * num_classes + num_classes
    return trainable, trainable + 2 * bn_channels  # BN moving mean and variance


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(0)
    return build_linknet(input_shape=(64, 64, 1), encoder="resnet18")


@pytest.mark.parametrize(
    "input_shape, encoder",
    [((64, 64, 1), "resnet18"), ((32, 64, 3), "resnet18"), ((32, 32, 1), "resnet34")],
)
def test_output_shape_and_probabilities(input_shape, encoder):
    model = build_linknet(input_shape=input_shape, encoder=encoder)
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.output.shape) == (None,) + input_shape[:2] + (3,)
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2,) + input_shape]), training=False))
    assert probs.shape == (2,) + input_shape[:2] + (3,)
    assert probs.dtype == np.float32 and probs.min() >= 0.0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_sigmoid_head_is_per_class():
    model = build_linknet(input_shape=(32, 32, 1), num_classes=1, encoder="resnet18", head="sigmoid")
    probs = keras.ops.convert_to_numpy(model(random_inputs([(2, 32, 32, 1)]), training=False))
    assert probs.shape == (2, 32, 32, 1) and 0.0 <= probs.min() and probs.max() <= 1.0


def test_decoder_reads_like_the_figure(small_model):
    names = [layer.name for layer in small_model.layers]
    assert names[:2] == ["ct_slices", "resnet18_encoder"]
    assert names[-2:] == ["logits", "probabilities"]
    # Four skips (P4, P3, P2 and the stem's P1) are added, the final block has none.
    assert [n for n in names if n.endswith("_skip_add")] == [
        "decoder4_skip_add", "decoder3_skip_add", "decoder2_skip_add", "decoder1_skip_add"
    ]
    assert "final_block_fullconv" in names and "final_block_skip_add" not in names
    # Each block: x2 up, out channels of the next skip; the final block: 32 channels at 1/1.
    for block, size, channels in [
        ("decoder4", 4, 256), ("decoder3", 8, 128), ("decoder2", 16, 64), ("decoder1", 32, 64),
        ("final_block", 64, 32),
    ]:
        output = small_model.get_layer(f"{block}_expand_relu").output
        assert tuple(output.shape) == (None, size, size, channels)
        assert small_model.get_layer(f"{block}_fullconv").kernel.shape[:2] == (4, 4)


def test_parameter_count_matches_smp_resnet18(small_model):
    trainable, total = linknet_param_counts(1, RESNET_BLOCKS["resnet18"], 3)
    # smp 0.6: sum(p.numel() for p in Linknet("resnet18", in_channels=1, classes=3).parameters())
    assert trainable_count(small_model) == trainable == 11_657_571
    assert small_model.count_params() == total
    three = build_linknet(input_shape=(32, 32, 3), num_classes=2, encoder="resnet18")
    assert trainable_count(three) == linknet_param_counts(3, RESNET_BLOCKS["resnet18"], 2)[0]


@pytest.mark.slow
def test_parameter_count_at_the_default_configuration():
    model = build_linknet()  # resnet34, (256, 256, 1), 3 classes
    trainable, total = linknet_param_counts(1, RESNET_BLOCKS["resnet34"], 3)
    assert trainable_count(model) == trainable == 21_765_731  # smp 0.6 Linknet(in_channels=1, classes=3)
    assert model.count_params() == total == 21_784_867


def _transposed_conv_4x4_stride2(x, kernel, bias):
    """Numpy ConvTranspose2d(k=4, s=2, padding=1): scatter, then crop one pixel per side."""
    h, w, _ = x.shape
    full = np.zeros((2 * h + 2, 2 * w + 2, kernel.shape[2]))
    for i in range(h):
        for j in range(w):
            for a in range(4):
                for b in range(4):
                    full[2 * i + a, 2 * j + b] += kernel[a, b] @ x[i, j]  # kernel: (kh, kw, out, in)
    return full[1:-1, 1:-1] + bias


def test_decoder_block_against_a_hand_computation():
    rng = np.random.default_rng(0)
    x_in, skip_in = keras.Input((3, 3, 8)), keras.Input((6, 6, 5))
    block = keras.Model([x_in, skip_in], decoder_block(x_in, 5, "blk", skip=skip_in))
    weights = {}
    for layer in block.layers:
        values = [rng.normal(size=w.shape).astype("float32") for w in layer.weights]
        if isinstance(layer, keras.layers.BatchNormalization):
            values[3] = rng.uniform(0.5, 2.0, size=values[3].shape).astype("float32")  # variance > 0
        layer.set_weights(values)
        weights[layer.name] = values
    x = rng.normal(size=(1, 3, 3, 8)).astype("float32")
    skip = rng.normal(size=(1, 6, 6, 5)).astype("float32")

    def bn_relu(v, name):
        gamma, beta, mean, var = weights[name]
        return np.maximum((v - mean) / np.sqrt(var + 1.001e-5) * gamma + beta, 0.0)

    y = bn_relu(x[0] @ weights["blk_reduce_conv"][0][0, 0], "blk_reduce_bn")  # 8 → 2
    y = bn_relu(_transposed_conv_4x4_stride2(y, *weights["blk_fullconv"]), "blk_fullconv_bn")  # 3x3 → 6x6
    y = bn_relu(y @ weights["blk_expand_conv"][0][0, 0], "blk_expand_bn") + skip[0]  # 2 → 5, + skip
    got = keras.ops.convert_to_numpy(block([x, skip], training=False))[0]
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_keras_save_and_load_gives_identical_outputs(small_model, tmp_path):
    data = random_inputs([(2, 64, 64, 1)])
    original, reloaded, model = save_and_reload(small_model, tmp_path / "linknet.keras", data)
    np.testing.assert_array_equal(original, reloaded)
    assert [layer.name for layer in model.layers] == [layer.name for layer in small_model.layers]


@pytest.mark.parametrize("run_eagerly", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_one_fit_step_trains(run_eagerly):
    # Both: the compiled step is what fit runs; eager checks the layers outside a trace.
    keras.utils.set_random_seed(1)
    model = build_linknet(input_shape=(32, 32, 1), encoder="resnet18")
    compile_as_fit(model, 1e-3, run_eagerly=run_eagerly)
    x = random_inputs([(2, 32, 32, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 32, 32)), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.1 < loss < 20.0
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert np.mean(changed) > 0.95, f"{sum(changed)} of {len(changed)} weights changed"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_keeps_a_float32_output(policy):
    with dtype_policy(policy):
        model = build_linknet(input_shape=(32, 32, 1), encoder="resnet18")
    compute = policy.split("_")[1]
    assert model.get_layer("decoder4_fullconv").compute_dtype == compute
    assert model.get_layer("resnet18_encoder").get_layer("layer4_1_conv2").compute_dtype == compute
    assert all(w.dtype == "float32" for w in model.weights)
    probs = model(random_inputs([(1, 32, 32, 1)]), training=False)
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(probs).sum(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize(
    "input_shape, match",
    [
        ((40, 64, 1), "height 40 is not a multiple of 32.*nearest valid height is 32"),
        ((64, 48, 1), "width 48 is not a multiple of 32.*nearest valid width is 64"),
        ((64, 100, 1), "nearest valid width is 96"),
    ],
)
def test_wrong_input_size_names_the_nearest_valid_size(input_shape, match):
    with pytest.raises(ValueError, match=match):
        build_linknet(input_shape=input_shape, encoder="resnet18")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"encoder": "resnet50"}, "encoder='resnet50'"),
        ({"head": "relu"}, "head='relu'"),
        ({"num_classes": 1}, "num_classes=1"),
        ({"num_classes": 0, "head": "sigmoid"}, "num_classes=0"),
    ],
)
def test_bad_options_raise_value_error_quoting_them(options, match):
    with pytest.raises(ValueError, match=match):
        build_linknet(input_shape=(32, 32, 1), **options)


def test_channels_first_builds_with_the_same_parameters():
    keras.config.set_image_data_format("channels_first")
    try:
        model = build_linknet(input_shape=(3, 32, 64), encoder="resnet18")
        assert tuple(model.output.shape) == (None, 3, 32, 64)
        assert tuple(model.get_layer("decoder1_skip_add").output.shape) == (None, 64, 16, 32)
        assert trainable_count(model) == linknet_param_counts(3, RESNET_BLOCKS["resnet18"], 3)[0]
        with pytest.raises(ValueError, match="nearest valid height is 32"):
            build_linknet(input_shape=(1, 40, 64), encoder="resnet18")
    finally:
        keras.config.set_image_data_format("channels_last")
