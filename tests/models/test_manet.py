"""MA-Net: PAB and MFAB against numpy, shapes, parameter counts, save/load, training, options."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("KERAS_LIVSEG_TORCH_FIRST"):
    # torchvision (through torch._dynamo and triton) crashes the process when it is loaded after
    # TensorFlow: the smp comparison runs in a process that loads it first (see below).
    import segmentation_models_pytorch  # noqa: F401

import keras
import numpy as np
import pytest
from models_testing import compile_as_fit, dtype_policy, random_inputs, run_layer_test, save_and_reload

from keras_livseg.models.layers._fast_kernels import TORCH_BN_EPSILON
from keras_livseg.models.layers.multiscale_fusion_attention import MultiscaleFusionAttention
from keras_livseg.models.layers.position_attention import PositionAttention
from keras_livseg.models.manet import build_manet

PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: A small MA-Net: full-width ResNet-18 encoder, thin decoder.
SMALL = {"encoder": "resnet18", "decoder_channels": (16, 8, 8, 8, 4), "pab_channels": 4}
#: smp.MAnet(encoder, encoder_weights=None, in_channels=1, classes=3): sum of parameters
#: (segmentation_models_pytorch 0.6.0).
SMP_PARAMETERS = {"resnet34": 31_777_651, "resnet18": 21_669_491}


# Numpy references ----------------------------------------------------------------------


def conv_same(x, kernel, bias=None):
    """Stride-1 "same" convolution of NHWC ``x`` with an odd ``(k, k, cin, cout)`` kernel."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for dy in range(k):
        for dx in range(k):
            out += padded[:, dy : dy + height, dx : dx + width] @ kernel[dy, dx]
    return out if bias is None else out + bias


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0.0)


def pab_reference(x, weights, variant, gamma=None):
    """The PAB on NHWC ``x``, written the way smp's PyTorch code reads (NCHW, flatten(2))."""
    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = weights
    batch, height, width, channels = x.shape
    n = height * width
    nchw = lambda t: t.transpose(0, 3, 1, 2)  # noqa: E731
    center = nchw(conv_same(x, wq, bq)).reshape(batch, -1, n).transpose(0, 2, 1)  # (B, N, P)
    top = nchw(conv_same(x, wk, bk)).reshape(batch, -1, n)  # (B, P, N)
    bottom = nchw(conv_same(x, wv, bv)).reshape(batch, channels, n).transpose(0, 2, 1)  # (B, N, C)
    energy = center @ top  # (B, N, N)
    if variant == "smp":
        attention = softmax(energy.reshape(batch, n * n), axis=-1).reshape(batch, n, n)
        context = (attention @ bottom).reshape(batch, channels, height, width)  # smp's reshape
        y = nchw(x) + context
        return conv_same(y.transpose(0, 2, 3, 1), wo, bo)
    attention = softmax(energy, axis=-1)
    context = (attention @ bottom).reshape(batch, height, width, channels)  # position i at pixel i
    return conv_same(x + gamma * context, wo, bo)


def batchnorm(x, gamma, beta, mean, var, eps=TORCH_BN_EPSILON):
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def upsample2x(x, interpolation):
    if interpolation == "nearest":
        return x.repeat(2, axis=1).repeat(2, axis=2)

    def matrix(n):  # half-pixel bilinear: output o reads input (o + 0.5) / 2 - 0.5
        m = np.zeros((2 * n, n))
        for o in range(2 * n):
            src = min(max((o + 0.5) / 2 - 0.5, 0.0), n - 1)
            lo = int(np.floor(src))
            hi = min(lo + 1, n - 1)
            m[o, lo] += 1 - (src - lo)
            m[o, hi] += src - lo
        return m

    return np.einsum("ih,jw,bhwc->bijc", matrix(x.shape[1]), matrix(x.shape[2]), x)


def mfab_reference(high, low, layer):
    """The MFAB in numpy from the (known) weights of ``layer``, inference-mode batch norm."""
    def conv_bn_relu(x, conv, bn):
        w = conv.get_weights()
        y = conv_same(x, *w)
        if bn is not None:
            y = batchnorm(y, *bn.get_weights())
        return relu(y)

    def gate(x, squeeze, excite):
        pooled = x.mean(axis=(1, 2))  # (B, C)
        (k1, b1), (k2, b2) = squeeze.get_weights(), excite.get_weights()
        return sigmoid(relu(pooled @ k1[0, 0] + b1) @ k2[0, 0] + b2)[:, None, None, :]

    h = conv_bn_relu(high, layer.high_conv1, layer.high_bn1)
    h = conv_bn_relu(h, layer.high_conv2, layer.high_bn2)
    h = upsample2x(h, layer.interpolation)
    s = gate(h, layer.high_squeeze, layer.high_excite) + gate(low, layer.low_squeeze, layer.low_excite)
    x = np.concatenate([h * s, low], axis=-1)
    x = conv_bn_relu(x, layer.conv1, layer.bn1)
    return conv_bn_relu(x, layer.conv2, layer.bn2)


def set_known_weights(layer, seed):
    """Seeded values for every weight; batch norm variances positive, gammas near 1."""
    rng = np.random.default_rng(seed)
    sublayers = (
        layer.high_conv1, layer.high_bn1, layer.high_conv2, layer.high_bn2, layer.high_squeeze,
        layer.high_excite, layer.low_squeeze, layer.low_excite, layer.conv1, layer.bn1,
        layer.conv2, layer.bn2,
    )
    for sub in filter(None, sublayers):
        if isinstance(sub, keras.layers.BatchNormalization):
            c = sub.gamma.shape[0]
            sub.set_weights([rng.uniform(0.5, 1.5, c), rng.uniform(-0.3, 0.3, c),
                             rng.uniform(-0.3, 0.3, c), rng.uniform(0.5, 2.0, c)])
        else:
            sub.set_weights([rng.normal(scale=0.5, size=w.shape) for w in sub.weights])


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


# PAB ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["smp", "danet"])
def test_position_attention_layer(variant):
    layer = run_layer_test(
        PositionAttention, {"key_channels": 2, "variant": variant}, [(2, 4, 4, 8)], (2, 4, 4, 8)
    )
    # query, key: 8*2+2 each; value, out: 9*8*8+8 each; danet adds gamma.
    assert layer.count_params() == 2 * 18 + 2 * 584 + (variant == "danet")


@pytest.mark.parametrize("variant, gamma", [("smp", None), ("danet", 0.7)])
def test_position_attention_matches_numpy(variant, gamma):
    # A non-square map (2x3) catches any height/width or channel/position mix-up.
    pab = PositionAttention(key_channels=2, variant=variant)
    x = random_inputs([(2, 2, 3, 4)], seed=1)
    pab(x)
    rng = np.random.default_rng(2)
    weights = [
        (rng.normal(size=(1, 1, 4, 2)), rng.normal(size=2)),  # query   (smp center_conv)
        (rng.normal(size=(1, 1, 4, 2)), rng.normal(size=2)),  # key     (smp top_conv)
        (rng.normal(scale=0.3, size=(3, 3, 4, 4)), rng.normal(size=4)),  # value (bottom_conv)
        (rng.normal(scale=0.3, size=(3, 3, 4, 4)), rng.normal(size=4)),  # out   (out_conv)
    ]
    for conv, values in zip((pab.query_conv, pab.key_conv, pab.value_conv, pab.out_conv), weights):
        conv.set_weights(list(values))
    if variant == "danet":
        pab.gamma.assign(gamma)
    expected = pab_reference(x.astype("float64"), weights, variant, gamma)
    np.testing.assert_allclose(to_numpy(pab(x)), expected, rtol=1e-4, atol=1e-4)
    attention = to_numpy(pab.compute_attention(x))
    assert attention.shape == (2, 6, 6)
    if variant == "smp":  # one distribution over the whole 6x6 map
        np.testing.assert_allclose(attention.sum(axis=(1, 2)), 1.0, atol=1e-6)
    else:  # one distribution per query position
        np.testing.assert_allclose(attention.sum(axis=-1), 1.0, atol=1e-6)


def test_position_attention_danet_starts_as_plain_convolution():
    pab = PositionAttention(key_channels=2, variant="danet")
    x = random_inputs([(1, 3, 3, 4)])
    out = to_numpy(pab(x))
    assert float(pab.gamma.numpy()) == 0.0
    kernel, bias = pab.out_conv.get_weights()
    np.testing.assert_allclose(out, conv_same(x.astype("float64"), kernel, bias), atol=1e-5)


def channels_first_output(layer_cls, kwargs, inputs, weights):
    """``layer_cls(**kwargs)`` built under channels_first with ``weights``, on NHWC ``inputs``."""
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        nchw = [x.transpose(0, 3, 1, 2) for x in inputs]
        nchw = nchw if len(nchw) > 1 else nchw[0]
        layer = layer_cls(**kwargs)
        layer(nchw)
        layer.set_weights(weights)
        return to_numpy(layer(nchw, training=False)).transpose(0, 2, 3, 1)
    finally:
        keras.config.set_image_data_format(previous)


@pytest.mark.parametrize("variant", ["smp", "danet"])
def test_position_attention_channels_first_agrees(variant):
    x = random_inputs([(2, 2, 3, 4)], seed=3)
    last = PositionAttention(key_channels=2, variant=variant)
    last(x)
    if variant == "danet":
        last.gamma.assign(0.6)  # a live attention branch
    expected = to_numpy(last(x))
    got = channels_first_output(
        PositionAttention, {"key_channels": 2, "variant": variant}, [x], last.get_weights()
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_position_attention_bad_arguments():
    with pytest.raises(ValueError, match="key_channels=0"):
        PositionAttention(key_channels=0)
    with pytest.raises(ValueError, match="variant='paper'"):
        PositionAttention(variant="paper")


# MFAB -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_batchnorm", [True, False])
def test_multiscale_fusion_attention_layer(use_batchnorm):
    layer = run_layer_test(
        MultiscaleFusionAttention, {"filters": 6, "use_batchnorm": use_batchnorm},
        [(2, 4, 4, 8), (2, 8, 8, 4)], (2, 8, 8, 6),
    )
    conv = lambda k, cin, cout: k * k * cin * cout + (0 if use_batchnorm else cout)  # noqa: E731
    bn = lambda c: 4 * c if use_batchnorm else 0  # noqa: E731  gamma, beta, mean, variance
    se = 2 * (4 * 1 + 1 + 1 * 4 + 4)  # two SE gates through max(1, 4 // 16) = 1 unit
    expected = (conv(3, 8, 8) + bn(8) + conv(1, 8, 4) + bn(4) + se
                + conv(3, 8, 6) + bn(6) + conv(3, 6, 6) + bn(6))
    assert layer.count_params() == expected


@pytest.mark.parametrize(
    "options", [{}, {"use_batchnorm": False}, {"interpolation": "bilinear", "reduction": 2}]
)
def test_multiscale_fusion_attention_matches_numpy(options):
    mfab = MultiscaleFusionAttention(filters=3, **options)
    high, low = random_inputs([(2, 2, 3, 3), (2, 4, 6, 4)], seed=4)
    mfab([high, low])
    set_known_weights(mfab, seed=5)
    expected = mfab_reference(high.astype("float64"), low.astype("float64"), mfab)
    got = to_numpy(mfab([high, low], training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The summed gate lies in (0, 2) and is one value per channel.
    _, gate = mfab.compute_gates(high, low, training=False)
    gate = to_numpy(gate)
    assert gate.shape == (2, 1, 1, 4) and 0.0 < gate.min() and gate.max() < 2.0


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_multiscale_fusion_attention_channels_first_agrees(interpolation):
    high, low = random_inputs([(2, 2, 3, 3), (2, 4, 6, 4)], seed=6)
    last = MultiscaleFusionAttention(filters=3, interpolation=interpolation)
    last([high, low])
    set_known_weights(last, seed=7)
    expected = to_numpy(last([high, low], training=False))
    got = channels_first_output(
        MultiscaleFusionAttention, {"filters": 3, "interpolation": interpolation}, [high, low],
        last.get_weights(),
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_multiscale_fusion_attention_bad_arguments():
    with pytest.raises(ValueError, match="filters=0"):
        MultiscaleFusionAttention(filters=0)
    with pytest.raises(ValueError, match="reduction=-1"):
        MultiscaleFusionAttention(filters=4, reduction=-1)
    with pytest.raises(ValueError, match="interpolation='bicubic'"):
        MultiscaleFusionAttention(filters=4, interpolation="bicubic")
    with pytest.raises(ValueError, match="twice the height and width"):
        MultiscaleFusionAttention(filters=4)([np.ones((1, 4, 4, 2)), np.ones((1, 4, 4, 2))])


# The model ------------------------------------------------------------------------------


def manet_decoder_param_count(decoder_channels, pab_channels, num_classes, trainable_only,
                              encoder_channels=(64, 64, 128, 256, 512), reduction=16):
    """Parameters of everything after the encoder (PAB, 4 MFABs, last block, head), by hand."""
    def conv(k, cin, cout, bias):
        return k * k * cin * cout + (cout if bias else 0)

    def bn(c):
        return 2 * c if trainable_only else 4 * c  # moving mean/variance are not trainable

    c5 = encoder_channels[-1]
    total = 2 * conv(1, c5, pab_channels, True) + 2 * conv(3, c5, c5, True)  # PAB
    cin = c5
    for skip, out in zip(encoder_channels[-2::-1], decoder_channels[:4]):
        reduced = max(1, skip // reduction)
        total += conv(3, cin, cin, False) + bn(cin) + conv(1, cin, skip, False) + bn(skip)
        total += 2 * (conv(1, skip, reduced, True) + conv(1, reduced, skip, True))
        total += conv(3, 2 * skip, out, False) + bn(out) + conv(3, out, out, False) + bn(out)
        cin = out
    out = decoder_channels[4]
    total += conv(3, cin, out, False) + bn(out) + conv(3, out, out, False) + bn(out)
    return total + conv(3, out, num_classes, True)


def trainable_count(model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(
    "input_shape, options",
    [
        ((64, 64, 1), SMALL),
        ((64, 96, 3), {**SMALL, "pab_variant": "danet", "decoder_interpolation": "bilinear"}),
        ((64, 32, 2), {**SMALL, "decoder_batchnorm": False, "reduction": 4}),
    ],
)
def test_output_shapes_and_probabilities(input_shape, options):
    model = build_manet(input_shape=input_shape, **options)
    assert model.inputs[0].name == "ct_slices" and model.output_names == ["probabilities"]
    assert tuple(model.output.shape) == (None,) + input_shape[:2] + (3,)
    probs = to_numpy(model(random_inputs([(2,) + input_shape])))
    assert probs.shape == (2,) + input_shape[:2] + (3,)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert probs.min() >= 0.0
    names = [layer.name for layer in model.layers]
    assert names[1:7] == ["resnet18_encoder", "center_pab", "decoder4_mfab", "decoder3_mfab",
                          "decoder2_mfab", "decoder1_mfab"]
    assert names[-2:] == ["logits", "probabilities"]


def test_sigmoid_head_is_per_class():
    model = build_manet(input_shape=(64, 64, 1), num_classes=1, head="sigmoid", **SMALL)
    probs = to_numpy(model(random_inputs([(2, 64, 64, 1)])))
    assert probs.shape == (2, 64, 64, 1) and 0.0 <= probs.min() and probs.max() <= 1.0


@pytest.mark.parametrize("encoder", ["resnet34", "resnet18"])
def test_parameter_count_is_pinned(encoder):
    # The default configuration on one 256x256 slice; trainable weights equal smp's parameters.
    model = build_manet(input_shape=(256, 256, 1), encoder=encoder)
    encoder_model = model.get_layer(f"{encoder}_encoder")
    decoder_trainable = manet_decoder_param_count((256, 128, 64, 32, 16), 64, 3, trainable_only=True)
    decoder_total = manet_decoder_param_count((256, 128, 64, 32, 16), 64, 3, trainable_only=False)
    assert decoder_trainable == 10_498_816 + 435  # smp: decoder + segmentation head
    assert trainable_count(model) == trainable_count(encoder_model) + decoder_trainable
    assert trainable_count(model) == SMP_PARAMETERS[encoder]
    assert model.count_params() == encoder_model.count_params() + decoder_total
    assert model.count_params() == {"resnet34": 31_799_603, "resnet18": 21_684_019}[encoder]
    small = build_manet(input_shape=(64, 64, 3), **SMALL)
    assert small.count_params() == (
        small.get_layer("resnet18_encoder").count_params()
        + manet_decoder_param_count((16, 8, 8, 8, 4), 4, 3, trainable_only=False)
    )


@pytest.mark.parametrize(
    "options",
    [
        {"pab_variant": "smp", "decoder_interpolation": "bilinear"},
        {"pab_variant": "danet", "decoder_batchnorm": False},
    ],
)
def test_keras_save_and_load_gives_identical_outputs(tmp_path, options):
    model = build_manet(input_shape=(64, 64, 2), **SMALL, **options)
    if options["pab_variant"] == "danet":
        model.get_layer("center_pab").gamma.assign(0.5)  # the saved value must come back
    x = random_inputs([(2, 64, 64, 2)])
    original, reloaded, clone = save_and_reload(model, tmp_path / "manet.keras", x)
    np.testing.assert_array_equal(original, reloaded)
    assert clone.count_params() == model.count_params()
    assert clone.inputs[0].name == "ct_slices" and clone.output_names == ["probabilities"]
    assert clone.get_layer("center_pab").variant == options["pab_variant"]


@pytest.mark.slow
def test_one_fit_step_trains():
    keras.utils.set_random_seed(0)
    model = build_manet(input_shape=(64, 64, 1), **SMALL)
    compile_as_fit(model, 1e-3)
    x = random_inputs([(2, 64, 64, 1)])
    y = keras.utils.to_categorical(np.random.default_rng(0).integers(0, 3, (2, 64, 64)), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    loss = model.fit(x, y, batch_size=2, epochs=1, verbose=0).history["loss"][0]
    assert np.isfinite(loss) and 0.5 < loss < 5.0
    unchanged = [w.path for b, w in zip(before, model.trainable_weights) if np.allclose(b, w.numpy())]
    assert unchanged == []


def test_danet_pab_first_step_moves_gamma_not_the_attention_branch():
    # γ = 0 multiplies the whole attention branch: the first step's gradient reaches γ
    # (and the out convolution) but none of query, key or value.
    keras.utils.set_random_seed(1)
    pab = PositionAttention(key_channels=2, variant="danet")
    inputs = keras.Input((4, 4, 8))
    model = keras.Model(inputs, pab(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    branch = (pab.query_conv, pab.key_conv, pab.value_conv)
    before = [w for conv in branch for w in conv.get_weights()]
    out_before = pab.out_conv.get_weights()[0]
    x, y = random_inputs([(2, 4, 4, 8), (2, 4, 4, 8)], seed=2)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert float(pab.gamma.numpy()) != 0.0
    after = [w for conv in branch for w in conv.get_weights()]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)
    assert not np.allclose(out_before, pab.out_conv.get_weights()[0])


@pytest.mark.parametrize("variant", ["smp", "danet"])
def test_mixed_float16_keeps_a_float32_output(variant):
    with dtype_policy("mixed_float16"):
        model = build_manet(input_shape=(64, 64, 1), **SMALL, pab_variant=variant)
        pab = model.get_layer("center_pab")
        assert pab.compute_dtype == "float16" and pab.out_conv.kernel.dtype == "float32"
        assert model.get_layer("decoder1_mfab").compute_dtype == "float16"
        assert model.output.dtype == "float32"
        probs = model(random_inputs([(1, 64, 64, 1)]))
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        probs = to_numpy(probs)
        assert np.isfinite(probs).all()
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"input_shape": (100, 64, 1)}, "height 100 .* nearest valid height is 96"),
        ({"input_shape": (64, 80, 1)}, "width 80 .* nearest valid width is 96"),
        ({"input_shape": (16, 16, 1)}, "height 16 .* nearest valid height is 32"),
        ({"encoder": "resnet50"}, "encoder='resnet50'"),
        ({"decoder_channels": (16, 8, 8, 8)}, r"decoder_channels=\(16, 8, 8, 8\)"),
        ({"decoder_channels": (16, 8, 0, 8, 4)}, r"decoder_channels=\(16, 8, 0, 8, 4\)"),
        ({"pab_channels": 0}, "pab_channels=0"),
        ({"pab_variant": "paper"}, "pab_variant='paper'"),
        ({"reduction": 0}, "reduction=0"),
        ({"decoder_interpolation": "bicubic"}, "decoder_interpolation='bicubic'"),
        ({"head": "relu"}, "head='relu'"),
        ({"num_classes": 1}, "num_classes=1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(options, match):
    options = {"input_shape": (64, 64, 1), **options}
    with pytest.raises(ValueError, match=match):
        build_manet(**options)


# Other implementations ------------------------------------------------------------------


def port_smp_decoder(keras_model, smp_model):
    """Copy smp.MAnet's decoder and head weights into ``keras_model``, layer for layer."""
    def conv(layer, torch_conv):
        weights = [torch_conv.weight.detach().numpy().transpose(2, 3, 1, 0)]
        if torch_conv.bias is not None:
            weights.append(torch_conv.bias.detach().numpy())
        layer.set_weights(weights)

    def bn(layer, torch_bn):
        layer.set_weights([t.detach().numpy() for t in (
            torch_bn.weight, torch_bn.bias, torch_bn.running_mean, torch_bn.running_var)])

    decoder = smp_model.decoder
    pab = keras_model.get_layer("center_pab")
    for ours, theirs in ((pab.query_conv, "center_conv"), (pab.key_conv, "top_conv"),
                         (pab.value_conv, "bottom_conv"), (pab.out_conv, "out_conv")):
        conv(ours, getattr(decoder.center, theirs))
    for block, level in zip(decoder.blocks, (4, 3, 2, 1)):
        mfab = keras_model.get_layer(f"decoder{level}_mfab")
        conv(mfab.high_conv1, block.hl_conv[0][0])
        bn(mfab.high_bn1, block.hl_conv[0][1])
        conv(mfab.high_conv2, block.hl_conv[1][0])
        bn(mfab.high_bn2, block.hl_conv[1][1])
        conv(mfab.high_squeeze, block.SE_hl[1])
        conv(mfab.high_excite, block.SE_hl[3])
        conv(mfab.low_squeeze, block.SE_ll[1])
        conv(mfab.low_excite, block.SE_ll[3])
        conv(mfab.conv1, block.conv1[0])
        bn(mfab.bn1, block.conv1[1])
        conv(mfab.conv2, block.conv2[0])
        bn(mfab.bn2, block.conv2[1])
    last = decoder.blocks[4]
    for index, unit in ((1, last.conv1), (2, last.conv2)):
        conv(keras_model.get_layer(f"decoder0_{index}_conv"), unit[0])
        bn(keras_model.get_layer(f"decoder0_{index}_bn"), unit[1])
    conv(keras_model.get_layer("logits"), smp_model.segmentation_head[0])


@pytest.mark.slow
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_decoder_matches_segmentation_models_pytorch(interpolation):
    # Runs where smp (and torch) are installed (pip install -e ".[bench]"); the project does not
    # depend on them. Loaded after TensorFlow, torchvision kills the process: run it as
    # KERAS_LIVSEG_TORCH_FIRST=1 python -m pytest tests/models/test_manet.py -k segmentation_models
    if "segmentation_models_pytorch" not in sys.modules and "tensorflow" in sys.modules:
        pytest.skip("needs torch loaded before TensorFlow: KERAS_LIVSEG_TORCH_FIRST=1 python -m pytest "
                    "tests/models/test_manet.py -k segmentation_models")
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = smp.MAnet("resnet18", encoder_weights=None, in_channels=1, classes=3,
                          decoder_interpolation=interpolation).eval()
    with torch.no_grad():  # batch norm that is not the identity
        for module in reference.decoder.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    model = build_manet(input_shape=(64, 64, 1), encoder="resnet18",
                        decoder_interpolation=interpolation)
    assert trainable_count(model) == sum(p.numel() for p in reference.parameters())
    port_smp_decoder(model, reference)
    # Same encoder features into both decoders (the encoders' "same" paddings differ).
    with torch.no_grad():
        features = reference.encoder(torch.randn(2, 1, 64, 64))
        expected = reference.segmentation_head(reference.decoder(features)).numpy()
    inputs = [keras.Input(shape=tuple(f.shape[2:]) + (f.shape[1],)) for f in features[1:]]
    x = model.get_layer("center_pab")(inputs[4])
    for level, skip in zip((4, 3, 2, 1), inputs[3::-1]):
        x = model.get_layer(f"decoder{level}_mfab")([x, skip])
    for name in ("decoder0_upsample", "decoder0_1_conv", "decoder0_1_bn", "decoder0_1_relu",
                 "decoder0_2_conv", "decoder0_2_bn", "decoder0_2_relu", "logits"):
        x = model.get_layer(name)(x)
    decoder = keras.Model(inputs, x)
    got = to_numpy(decoder([f.numpy().transpose(0, 2, 3, 1) for f in features[1:]]))
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)
