"""benchmarks/bench_memory.py: a train step's memory split into graph, live tensors and the rest."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_memory  # noqa: E402
import readme_tables  # noqa: E402


def test_a_row_splits_the_step_into_graph_live_tensors_and_the_rest():
    keras_side = {"base_rss_mb": 700.0, "peak_rss_mb": 2500.0, "live_peak_mb": 1000.0, "malloc_mapped_between_steps_mb": 2100.0}
    graph_side = {"base_rss_mb": 690.0, "peak_rss_mb": 1390.0}
    torch_side = {"base_rss_mb": 600.0, "peak_rss_mb": 1850.0}
    row = bench_memory.row("effb0_pan", keras_side, torch_side, graph_side, {"peak_rss_mb": 2900.0})
    assert row["keras_step_rss_mb"] == 1800.0 and row["keras_graph_mb"] == 700.0
    assert row["keras_rest_mb"] == 100.0  # 1800 - 700 - 1000
    assert row["torch_step_rss_mb"] == 1250.0 and row["live_over_torch_step"] == pytest.approx(0.8)
    table = readme_tables.render_memory({"config": {"size": 256, "channels": 1, "batch": 8, "policy": "float32",
                                                    "optimizer": "Adam(1e-4)", "loss": "categorical cross entropy"},
                                         "rows": [row, {**row, "model": "segformer", "keras_live_peak_mb": 1300.0}]})
    lines = [line for line in table.splitlines() if line.startswith("| effb0_pan") or line.startswith("| segformer")]
    assert lines[0].split(" | ")[1:] == ["2,900", "2,500", "1,850", "1,800", "700", "1,000", "100", "1,250", "✓ |"]
    assert lines[1].endswith("| ✗ |")  # 1,300 MB of live tensors against PyTorch's 1,250


@pytest.mark.parametrize("optimizer", ["fit", "keras"])
def test_keras_step_memory_measures_the_allocators_peak_in_process(optimizer):
    try:
        measured = bench_memory.keras_step_memory("unet", size=64, batch=4, steps=2, options={"filters": 8, "depth": 2},
                                                  optimizer=optimizer)
    except SystemExit as stop:
        # TensorFlow turns oneDNN (and its allocator's statistics) on by default only on CPUs with
        # AVX-512 VNNI/BF16 or AMX; this process imported TensorFlow before the benchmark could ask for it.
        pytest.skip(str(stop))
    # Two full-size 4 x 64 x 64 x 8 float32 activations (512 KB each, above the oneDNN allocator's small-block
    # threshold) at least: the allocator's statistics saw the step's tensors
    assert measured["live_peak_mb"] > 2 * 4 * 64 * 64 * 8 * 4 / 2**20
    assert measured["live_between_steps_mb"] <= measured["live_peak_mb"]
    assert measured["peak_rss_mb"] >= measured["base_rss_mb"] > 0
    mapped = bench_memory.malloc_mapped_mb()
    assert mapped is None or mapped >= 0
