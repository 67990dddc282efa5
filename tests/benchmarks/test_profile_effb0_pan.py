"""benchmarks/profile_effb0_pan.py: the op profile of an EfficientNetB0-PAN step, kept as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import profile_effb0_pan  # noqa: E402


@pytest.mark.parametrize(
    ("name", "op_type", "part"),
    [
        ("effb0_pan_1/efficientnetb0_encoder_1/block2a_dwconv_1/depthwise", "DepthwiseConv2dNative",
         "encoder depthwise conv"),
        ("gradient_tape/effb0_pan_1/efficientnetb0_encoder_1/block3b_bn_1/FusedBatchNormGradV3",
         "FusedBatchNormGradV3", "encoder BatchNorm"),
        ("effb0_pan_1/aspp_1/branch_rate6_1/conv_1/Conv2D", "Conv2D", "ASPP dilated 3x3 branches"),
        ("effb0_pan_1/gau_p3_1/ResizeBilinear", "ResizeBilinear", "bilinear resize (GAU, FPA, head)"),
        ("adam/Mul_3", "Mul", "Adam update"),
        ("adam_1/Mul_3", "Mul", "Adam update"),  # another optimizer was made before in the process
        ("AddN_12", "AddN", "gradient accumulation (AddN)"),
    ],
)
def test_ops_are_charged_to_the_model_part_their_scope_names(name, op_type, part):
    assert profile_effb0_pan._part(name, op_type) == part


@pytest.mark.slow
def test_ops_part_writes_shares_that_sum_to_one_and_keeps_other_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LIVSEG_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(profile_effb0_pan, "SIZE", 64)  # tiny: the shares' bookkeeping, not the timing
    monkeypatch.setattr(profile_effb0_pan, "BATCH", 2)
    earlier = {"whole": {"variants": [{"variant": "PyTorch eager", "step_s": 0.5}]}}
    (tmp_path / "profile_effb0_pan.json").write_text(json.dumps({"parts": earlier}))

    import keras

    keras.optimizers.Adam()  # as in a test process where another test made one: the profiled one is "adam_1"
    assert profile_effb0_pan.main(["ops", "--warmup", "1", "--trace-steps", "1", "--top", "5"]) == 0

    written = json.loads((tmp_path / "profile_effb0_pan.json").read_text())
    assert written["config"]["input"] == [64, 64, 1] and written["config"]["batch"] == 2
    assert written["parts"]["whole"] == earlier["whole"]  # a part measured before is kept
    ops = written["parts"]["ops"]
    assert ops["step_s_untraced"] > 0 and ops["op_self_time_s_per_step"] > 0
    assert sum(row["share"] for row in ops["per_op_type"]) == pytest.approx(1.0)
    assert sum(row["share"] for row in ops["per_part"]) == pytest.approx(1.0)
    parts = {row["part"] for row in ops["per_part"]}
    assert {"encoder depthwise conv", "encoder BatchNorm", "Adam update"} <= parts
    assert len(ops["top_ops"]) == 5
    assert "cpu" in ops["machine"]
