"""The benchmark runner and the README's generated tables (benchmarks/run_all.py, readme_tables.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme_tables  # noqa: E402


def test_marked_tables_are_rewritten_from_the_json_and_nothing_else(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "fit_loop.json").write_text(json.dumps({
        "machine": {"cpu": "Test CPU", "cores_usable": 2, "libraries": {"keras": "3.15.1"}},
        "in_memory_steps_per_s": 4.0, "shards_steps_per_s": 3.0, "ratio": 0.75, "policy": "float32", "batch": 8,
        "model": "tam_unet", "input": [128, 128, 3],
    }))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:fit_loop -->\nstale 9.99\n<!-- /bench:fit_loop -->\n<!-- bench:models -->\nkept\n<!-- /bench:models -->\n")
    assert readme_tables.main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert readme_tables.update_readme(readme, results) == ["fit_loop"]
    text = readme.read_text()
    assert "stale" not in text and "| 4.00 | 32.0 | 1.00 |" in text and "**0.75** ✗" in text
    assert "Test CPU, 2 cores" in text and "kept" in text  # models.json is absent: its table stays
    assert readme_tables.main(["--check", "--readme", str(readme), "--results", str(results)]) == 0


def test_the_machine_line_says_which_wide_vector_units_the_cpu_had():
    """Figures differ several-fold between AVX2-only and AVX-512 BF16 CPUs of one model name."""
    base = {"cpu": "AMD EPYC", "cores_usable": 2, "libraries": {"keras": "3.15.1"}}
    assert "AMD EPYC (AVX2, no AVX-512)" in readme_tables._machine_line({"machine": {**base, "cpu_flags": ["avx2", "fma"]}})
    line = readme_tables._machine_line({"machine": {**base, "cpu_flags": ["avx2", "avx512f", "avx512_bf16"]}})
    assert "AMD EPYC (avx512f, avx512_bf16), 2 cores" in line
    assert "AMD EPYC, 2 cores" in readme_tables._machine_line({"machine": base})  # JSON from before the flags
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import SPEED_FLAGS, machine

    assert set(machine()["cpu_flags"]) <= set(SPEED_FLAGS)


def test_parts_measured_on_different_machines_say_so():
    old = {"cpu": "AMD EPYC", "cores_usable": 2, "cpu_flags": ["avx2", "avx512f", "avx512_bf16"]}
    new = {"cpu": "AMD EPYC", "cores_usable": 2, "cpu_flags": ["avx2", "fma"]}
    data = {"machine": new, "fresh": {"machine": new}, "demo": {"machine": old}, "lopo": {}}
    line = readme_tables._parts_machine_line(data, ("fresh", "demo", "sim2real", "lopo"))
    assert line.splitlines()[0].startswith("fresh, lopo: _Measured on AMD EPYC (AVX2, no AVX-512)")
    assert line.splitlines()[1].startswith("demo: _Measured on AMD EPYC (avx512f, avx512_bf16)")
    data["demo"]["machine"] = new
    assert readme_tables._parts_machine_line(data, ("fresh", "demo")).startswith("_Measured on AMD EPYC (AVX2")


def test_the_real_ct_table_shows_what_the_chosen_post_processing_changed():
    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())
    runs = data["demo"]["runs"]
    for run, size, plain in zip(runs, (268.1, 523.6, 10.0), (0.2, 0.25, 0.3)):
        run.update(min_lesion_mm3=size, tumor_dice_default_postprocessing=plain)
    data["demo"]["summary"]["tumor_dice_default_postprocessing"] = {"mean": 0.25, "min": 0.2, "max": 0.3}
    table = readme_tables.render_real_ct(data)
    assert ("| the same with the default minimum lesion size (10 mm³) instead of the one each run chose on its "
            "validation volumes (268, 524, 10 mm³) | 0.250 (0.200 – 0.300) | | |") in table


def test_the_fuzz_table_says_how_fast_each_command_refuses():
    rows = [{"command": "predict", "outcome": outcome, "seconds": seconds}
            for outcome, seconds in (("refusal", 0.6), ("refusal", 7.0), ("refusal", 0.8), ("result", 9.0))]
    data = {"machine": {"cpu": "AMD EPYC", "cores_usable": 2}, "commands": ["prepare", "predict"], "mutations": 4,
            "inputs_tried": 4, "outcomes": {"result": 1, "refusal": 3, "crash": 0, "hang": 0, "memory": 0}, "rows": rows}
    table = readme_tables.render_fuzz(data)
    assert "Time to a refusal, median: `predict` 0.8 s (slowest 7.0 s), the process's start included." in table


def test_every_readme_table_matches_the_committed_json():
    """A figure in the README is the one the committed JSON holds."""
    text = readme_tables.README.read_text()
    for name in readme_tables.RENDERERS:
        if f"<!-- bench:{name} -->" in text:
            assert (ROOT / "benchmarks" / "results" / f"{name}.json").is_file(), f"README table {name} has no JSON"
    _, stale = readme_tables.render_all(text, ROOT / "benchmarks" / "results")
    assert stale == [], f"run python -m benchmarks.readme_tables: {stale} differ from their JSON"


@pytest.mark.slow
def test_run_all_quick_runs_every_script_and_writes_the_machine(tmp_path):
    # memory's quick form takes a minute of subprocesses; tests/benchmarks/test_bench_memory.py covers it in-process
    env = {**os.environ, "KERAS_LIVSEG_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--quick", "--results", str(tmp_path / "results"),
                           "--skip", "real_ct", "phantom_realism", "memory"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "run_all_quick.json").read_text())
    assert [run["name"] for run in summary["runs"]] == ["prepare", "scale", "lits_scale", "pipeline", "models", "predict", "fit_loop",
                                                          "phantom_speed", "fuzz"]
    timed = {row["name"] for row in summary["benchmarks"] if row["last_run"]}
    assert timed == {run["name"] for run in summary["runs"]}  # the record names this run's benchmarks, no others
    for run in summary["runs"]:
        data = json.loads((tmp_path / "results" / f"{run['name']}.json").read_text())
        machine = data["machine"]
        assert machine["cpu"] and machine["cores_usable"] >= 1 and machine["libraries"]["keras"].startswith("3.")
        if run["name"] in readme_tables.RENDERERS:
            table = readme_tables.RENDERERS[run["name"]](data)
            assert table.count("\n| ") >= 3 and "_Measured on" in table  # header, rule, rows; the machine
    scale = json.loads((tmp_path / "results" / "scale.json").read_text())
    assert scale["byte_identical"] is True  # the Beam engine wrote exactly the local engine's folder
    assert scale["beam_2"]["x_local"] == pytest.approx(scale["beam_2"]["wall_s"] / scale["local_2"]["wall_s"])
    assert scale["fit"]["two_over_one"] == pytest.approx(scale["fit"]["two_workers_slices_per_s"] / scale["fit"]["one_worker_slices_per_s"])
    lits = json.loads((tmp_path / "results" / "lits_scale.json").read_text())
    assert lits["byte_identical"] is True and lits["set"]["volumes"] == 3  # the quick set: LiTS's first 3 counts / 40
    assert all(run["slices"] == lits["set"]["slices"] for run in lits["runs"].values())
    assert lits["runs"]["beam_1"]["x_local"] == pytest.approx(lits["runs"]["beam_1"]["wall_s"] / lits["runs"]["local_1"]["wall_s"])
    models = json.loads((tmp_path / "results" / "models.json").read_text())
    assert [row["model"] for row in models["rows"]] == ["unet", "tam_unet"]
    assert all(row["keras_float32"]["step_s"] > 0 for row in models["rows"])
    phantom_speed = json.loads((tmp_path / "results" / "phantom_speed.json").read_text())
    assert [row["time_vs_default"] for row in phantom_speed["rows"]][0] == 1.0  # the default is the baseline
    assert all(row["median_s"] > 0 and len(row["runs_s"]) == 1 for row in phantom_speed["rows"])
    assert [row["deflate"].split()[0] for row in phantom_speed["deflate"]] == ["zlib", "ISA-L"]
    assert all(row["seconds"] > 0 and 0 < row["share_of_default_total"] < 1 for row in phantom_speed["deflate"])
    fit_loop = json.loads((tmp_path / "results" / "fit_loop.json").read_text())
    assert fit_loop["ratio"] == pytest.approx(fit_loop["shards_steps_per_s"] / fit_loop["in_memory_steps_per_s"])
    assert f"**{fit_loop['ratio']:.2f}**" in readme_tables.render_fit_loop(fit_loop)
    patches = fit_loop["patches"]  # the demo's own training: patches of the quick recipe's crop size
    assert patches["crop"] == 16 and len(patches["shards_runs"]) == len(patches["in_memory_runs"]) == patches["rounds"]
    assert patches["ratio"] == pytest.approx(max(patches["shards_runs"]) / max(patches["in_memory_runs"]))
    assert "| 16×16 patches from the shards" in readme_tables.render_fit_loop(fit_loop)
    assert f"**{patches['ratio']:.2f}**" in readme_tables.render_fit_loop(fit_loop)
    pipeline = json.loads((tmp_path / "results" / "pipeline.json").read_text())
    assert pipeline["ratio_typical"] == pytest.approx(pipeline["pipeline_slices_per_s"] / pipeline["naive_typical_slices_per_s"])
    augment_ms = pipeline["augment_cpu_ms_per_batch"]
    assert set(augment_ms) == {"opencv", "tensorflow"}
    for costs in augment_ms.values():
        assert costs["all"] > 0 and costs["warp"] == pytest.approx(costs["all"] - costs["without warp"])
    assert "| OpenCV + NumPy, one pass (the default) |" in readme_tables.render_pipeline(pipeline)


def test_the_run_record_keeps_every_benchmarks_last_run_across_invocations():
    """``--only`` replaces its benchmarks' entries and keeps the others', dates and CPUs included."""
    import run_all

    avx2 = {"date": "2026-12-01", "cpu": "AMD EPYC", "cpu_flags": ["avx2", "fma"]}
    first = run_all.benchmark_index(None, [{"name": "fuzz", "args": [], "seconds": 90.0, "returncode": 0},
                                           {"name": "models", "args": [], "seconds": 600.0, "returncode": 1}], avx2)
    assert [row["name"] for row in first] == list(run_all.NAMES)  # every benchmark, in the runner's order
    by_name = {row["name"]: row for row in first}
    assert by_name["fuzz"]["last_run"] == {"minutes": 1.5, "returncode": 0, "args": [], "date": "2026-12-01",
                                           "cpu": "AMD EPYC", "cpu_flags": ["avx2", "fma"]}
    assert by_name["prepare"]["last_run"] is None

    avx512 = {"date": "2026-12-03", "cpu": "AMD EPYC", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"]}
    second = run_all.benchmark_index({"benchmarks": first, "runs": []},
                                     [{"name": "models", "args": [], "seconds": 300.0, "returncode": 0}], avx512)
    by_name = {row["name"]: row for row in second}
    assert by_name["fuzz"]["last_run"]["date"] == "2026-12-01"  # kept from the invocation before
    assert by_name["models"]["last_run"]["minutes"] == 5.0 and by_name["models"]["last_run"]["returncode"] == 0
    assert by_name["models"]["last_run"]["cpu_flags"] == ["avx2", "avx512f", "avx512_bf16"]

    legacy = run_all.benchmark_index({"runs": [{"name": "predict", "args": [], "seconds": 243.2, "returncode": 0}]}, [], avx2)
    assert {row["name"]: row for row in legacy}["predict"]["last_run"]["date"] is None  # written before dates

    table = readme_tables.render_run_all({"benchmarks": second})
    assert "| fuzz | `python benchmarks/fuzz_inputs.py` |" in table
    assert "2026-12-01, 1.5 min, ok, AMD EPYC (AVX2, no AVX-512) |" in table
    assert "2026-12-03, 5.0 min, ok, AMD EPYC (avx512f, avx512_bf16) |" in table
    assert "| real_ct | `python benchmarks/bench_real.py demo fresh sim2real lopo lopo-starts sizes --rerun --fresh-runs 3` (needs `../shared/data/real`) |" in table
    assert table.count("not yet through the runner") == len(run_all.NAMES) - 2
    assert f"2 of {len(run_all.NAMES)} benchmarks timed through the runner: 0.1 h together" in table


def test_the_machine_line_says_when_a_figure_was_measured():
    machine = {"cpu": "AMD EPYC", "cores_usable": 2, "date": "2026-12-03"}
    assert readme_tables._machine_line({"machine": machine}).startswith("_Measured on AMD EPYC, 2 cores, 2026-12-03")
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import machine as describe

    assert re.fullmatch(r"\d{4}-\d\d-\d\d", describe()["date"])
