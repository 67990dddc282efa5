"""benchmarks/bench_gpu.py runs where TensorFlow is not installed (the accelerator machines)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Any import of TensorFlow fails, as on a machine without it.
_WITHOUT_TENSORFLOW = """
import importlib.abc, runpy, sys
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
"""


@pytest.mark.slow
def test_quick_run_without_tensorflow_reports_rates_and_share_of_peak(tmp_path, jax_env):
    pytest.importorskip("jax")
    # A test of the script, not of the rates: compile fast (LLVM's level; XLA's HLO passes, which
    # the FLOP count comes from, are unchanged). JAX_PLATFORMS unset: the script finds the platform.
    env = {**jax_env, "KERAS_LIVSEG_BENCH_RESULTS": str(tmp_path)}
    env.pop("JAX_PLATFORMS")
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick", "--name", "gpu_quick",
         # Two models to check the rows; tam_unet rather than effb0_pan, which takes a minute to build
         # and compile under JAX on a CPU (bench_gpu has no model-specific code).
         "--models", "unet", "tam_unet"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_quick.json").read_text())
    assert data["platform"] == "cpu" and data["precision"] == "float32" and data["quick"] is True
    assert data["peak_bf16_tflops"] > 0 and data["machine"]["keras_backend"] == "jax"
    assert [r["model"] for r in data["results"]] == ["unet", "tam_unet"]
    for row in data["results"]:
        assert row["slices_per_s"] > 0 and row["step_ms"] > 0 and row["parameters"] > 0
        # XLA's count of a 32x32 forward pass: more than one multiply-add per parameter, far below a GFLOP.
        assert 2 * row["parameters"] < row["train_flops_per_step"] / 3 < 1e9 * row["batch"]
        assert 0 < row["share_of_peak"] == pytest.approx(row["achieved_tflops"] / data["peak_bf16_tflops"])
    assert "share of peak" in result.stdout and "goal: U-Net (base 64, 256x256) >= 40%" in result.stdout
