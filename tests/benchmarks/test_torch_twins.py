"""The PyTorch side of benchmarks/bench_models.py: every registry model covered, the twins layer for layer."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_livseg.models import available_models, build_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_models  # noqa: E402


def test_the_benchmark_covers_every_registry_model_and_says_how_pytorch_builds_it():
    assert bench_models.MODELS == available_models()
    sides = {name: bench_models.torch_side(name) for name in bench_models.MODELS}
    assert {name for name, side in sides.items() if not side["same_architecture"]} == {"deeplabv3plus"}
    assert {name for name, side in sides.items() if side["built_by"] == "hand-written twin"} == {
        "unet", "tam_unet", "attention_unet", "unet_cbam", "effb0_pan"
    }
    assert sides["linknet"]["built_by"] == "smp.Linknet"
    assert sides["pspnet"]["smp_options"]["encoder_depth"] == 3


def _settings(**overrides) -> argparse.Namespace:
    settings = {"size": 32, "channels": 1, "filters": 4, "depth": 2, "decoder_filters": 8}
    return argparse.Namespace(**{**settings, **overrides})


def _copy_conv(keras_conv, torch_conv):
    import torch

    kernel, *bias = keras_conv.get_weights()
    with torch.no_grad():
        torch_conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        if bias:
            torch_conv.bias.copy_(torch.from_numpy(bias[0]))


def _port_unet(keras_model, twin, depth):
    """Copy the Keras U-Net's weights into its twin, layer by layer, by the Keras layer names."""
    layer = keras_model.get_layer
    blocks = {f"encoder{level}": twin.enc_attention[level - 1] for level in range(1, depth + 1)}
    blocks |= {f"decoder{level}": twin.dec_attention[depth - level] for level in range(1, depth + 1)}
    blocks["bottleneck"] = twin.bottleneck_attention
    for level in range(1, depth + 1):
        for j in (1, 2):
            _copy_conv(layer(f"encoder{level}_{j}_conv"), twin.encoders[level - 1][j - 1][0])
            _copy_conv(layer(f"decoder{level}_{j}_conv"), twin.decoders[depth - level][j - 1][0])
        _copy_conv(layer(f"decoder{level}_up_conv"), twin.ups[depth - level][0])
    for j in (1, 2):
        _copy_conv(layer(f"bottleneck_{j}_conv"), twin.bottleneck[j - 1][0])
    _copy_conv(layer("logits"), twin.logits)
    names = {sub.name for sub in keras_model.layers}
    for block, module in blocks.items():
        if f"{block}_tam" in names:
            _copy_conv(layer(f"{block}_tam").gate, module.gate)
        if f"{block}_cbam" in names:
            cbam = layer(f"{block}_cbam")
            _copy_conv(cbam.channel_mlp_hidden, module.channel_mlp[0])
            _copy_conv(cbam.channel_mlp_output, module.channel_mlp[2])
            _copy_conv(cbam.spatial_conv, module.spatial_conv)
    for level in range(1, depth + 1):
        if f"decoder{level}_gate" in names:
            gate, module = layer(f"decoder{level}_gate"), twin.gates[depth - level]
            for part in ("skip_projection", "gating_projection", "psi"):
                _copy_conv(getattr(gate, part), getattr(module, part))


@pytest.mark.parametrize("name", ["unet", "tam_unet", "attention_unet", "unet_cbam"])
def test_unet_twins_compute_what_the_keras_models_compute(name):
    torch = pytest.importorskip("torch")
    settings = _settings()
    keras_model = bench_models.build_keras(settings, name)
    twin = bench_models.build_torch(settings, name)
    from torch_twins import count_params_like_keras

    assert count_params_like_keras(twin) == keras_model.count_params()
    _port_unet(keras_model, twin, settings.depth)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype("float32")
    expected = keras_model.predict(x, verbose=0)
    with torch.no_grad():
        got = torch.softmax(twin.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))), dim=1).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


# Its own process: smp imports torchvision, which imports triton, whose LLVM segfaults when loaded
# after TensorFlow's (torchvision 0.29.1, triton of torch 2.14.1, TensorFlow 2.21).
COUNT_SMP = """
import argparse, json, sys, torch
sys.path.insert(0, "benchmarks")
import bench_models
from torch_twins import count_used_params
settings = argparse.Namespace(size=64, channels=1, filters=4, depth=2, decoder_filters=8)
print(json.dumps(count_used_params(bench_models.build_torch(settings, sys.argv[1]), torch.zeros(1, 1, 64, 64))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linknet", "pspnet", "manet", "segformer"])
def test_smp_configurations_have_the_keras_parameter_counts(name):
    if importlib.util.find_spec("segmentation_models_pytorch") is None:  # not imported here: see COUNT_SMP
        pytest.skip("segmentation_models_pytorch is not installed (the [bench] extra)")
    done = subprocess.run([sys.executable, "-c", COUNT_SMP, name], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    keras_model = build_model(name, input_shape=(64, 64, 1))
    keras_counts = {
        "params": keras_model.count_params(),
        "trainable_params": int(sum(np.prod(w.shape) for w in keras_model.trainable_weights)),
    }
    assert bench_models.params_match(keras_counts, {"params": counts["params"], "trainable_params": counts["trainable"]})
    assert (counts["params_all_modules"] > counts["params"]) == (name == "pspnet")  # smp builds stages 3-4, unused


def test_the_readme_table_names_the_pytorch_side_and_judges_only_the_same_architecture():
    import readme_tables

    def row(name, keras_s, torch_s, torch_trainable, all_modules=None):
        keras = {"params": 110, "trainable_params": 100, "step_s": keras_s, "peak_rss_mb": 900.0}
        torch = {"params": torch_trainable + 10, "trainable_params": torch_trainable, "step_s": torch_s,
                 "params_all_modules": all_modules or torch_trainable + 10, "peak_rss_mb": 800.0}
        return {"model": name, "torch_side": bench_models.torch_side(name), "keras_float32": keras,
                "torch_float32": torch, "params_match": bench_models.params_match(keras, torch)}

    settings = {"size": 64, "channels": 1, "batch": 8, "filters": 16, "depth": 4, "decoder_filters": 64,
                "steps": 3, "warmup": 1}
    rows = [row("attention_unet", 0.5, 1.0, 100), row("pspnet", 1.0, 1.0, 100, all_modules=150),
            row("deeplabv3plus", 0.5, 1.0, 120)]
    rows[0]["keras_mixed_bfloat16"], rows[0]["torch_mixed_bfloat16"] = {"step_s": 0.25}, {"step_s": 0.75}
    rows[0]["keras_share_of_peak"], rows[0]["torch_share_of_peak"] = 0.6, 0.3
    data = {"settings": settings, "rows": rows, "float32_matmul_peak_gflops": {"peak": 400.0}}
    lines = {line.split(" | ")[0]: line for line in readme_tables.render_models(data).splitlines()}
    assert "| PyTorch side | params = PyTorch's |" in lines["| model"]
    assert "| **2.00** ✓ | 0.250 | 0.750 | 3.00 | 60 % / 30 % | hand-written twin | ✓ equal |" in lines["| attention_unet"]
    assert "**1.00** ✗ | – | – | – | – / – | smp.PSPNet | ✓ equal (PyTorch: 40 more in modules never run) |" in lines["| pspnet"]
    assert "| 2.00 (not comparable) | – | – | – | – / – | closest smp (DeepLabV3Plus, resnet18), not the same architecture | " \
           "differs (PyTorch 120 trainable) |" in lines["| deeplabv3plus"]
    assert "400 GFLOP/s" in readme_tables.render_models(data)
