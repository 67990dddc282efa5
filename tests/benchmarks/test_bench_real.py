"""benchmarks/bench_real.py: the ablation part (a recipe change over the demo's seeds) and its README rows."""

from __future__ import annotations

import doctest
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_real  # noqa: E402
import readme_tables  # noqa: E402


def test_docstring_examples_run():
    result = doctest.testmod(bench_real)
    assert result.attempted >= 2 and result.failed == 0


def lits_report(precision: float, recall: float) -> dict:
    """The parts of a LiTS report (``eval/volumes/metrics.json``) that demo() reads."""
    return {"by_stratum": {}, "detection": {"iou": {"precision": precision, "recall": recall},
                                            "any_overlap": {"precision": 1.0, "recall": 1.0}},
            "strata_3d": {"small": {"n_lesions": 4, "detection_recall": 0.0},
                          "large": {"n_lesions": 6, "detection_recall": recall + 0.1}}}


def fake_fit(calls: list[list[str]], runs: Path):
    """Stands in for ``python -m keras_livseg.fit``: records its arguments, writes what demo() reads."""

    def fit(args: list[str], *_, **__) -> float:
        calls.append(args)
        run = runs / args[args.index("--name") + 1]
        assert not run.exists(), f"fit would name its run {run.name}-1"  # as fit does with a taken name
        (run / "eval" / "volumes").mkdir(parents=True)
        seed = int(next(a for a in args if a.startswith("run.seed="))[len("run.seed="):])
        scores = {"cases": {"3": {}, "5": {}}, "liver_dice": 0.9 + seed / 100, "tumor_dice": 0.4 + seed / 10,
                  "liver_dice_global": 0.93, "tumor_dice_global": 0.6 + seed / 10}
        (run / "eval" / "held_out_volumes.json").write_text(json.dumps(scores))
        (run / "eval" / "volumes" / "metrics.json").write_text(json.dumps(lits_report(0.5 + seed / 10, 0.4)))
        # What default_postprocessing_scores writes in a real run: the test volumes without the chosen size.
        (run / "eval_default_postprocessing" / "volumes").mkdir(parents=True)
        (run / "eval_default_postprocessing" / "volumes" / "metrics.json").write_text(json.dumps(lits_report(0.2, 0.45)))
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "best.keras").write_bytes(f"weights of training {len(calls)}".encode())  # new at every training
        return 60.0 * (seed + 1)

    return fit


def test_an_ablation_trains_each_seed_with_its_changes_under_its_own_run_names(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(bench_real, "RUNS", tmp_path)
    monkeypatch.setattr(bench_real, "fit", fake_fit(calls, tmp_path))
    monkeypatch.setattr(bench_real, "default_postprocessing_scores", lambda run: (10.0, {"tumor_dice": 0.3, "tumor_dice_global": 0.5}))
    monkeypatch.setattr(bench_real, "unseen_phantom_scores",
                        lambda run: {"liver_dice": 0.8, "tumor_dice": 0.2 if "seed0" in run.name else 0.4, "tumor_dice_global": 0.5})
    (tmp_path / "demo-seed2-soft-dice" / "checkpoints").mkdir(parents=True)  # a run cut short: trained again, same name
    result = bench_real.demo([0, 2], ["training.fn_weights=[]", "training.epochs=12"], label="soft Dice")
    assert [args[args.index("--name") + 1] for args in calls] == ["demo-seed0-soft-dice", "demo-seed2-soft-dice"]
    assert calls[0][-4:] == ["--set", "training.fn_weights=[]", "--set", "training.epochs=12"]
    assert [run["minutes"] for run in result["runs"]] == [1.0, 3.0]
    assert result["summary"]["tumor_dice"] == pytest.approx({"mean": 0.5, "min": 0.4, "max": 0.6})
    # Each model also on the unseen phantom, the same cases whatever the recipe's own split.
    assert result["summary"]["unseen_tumor_dice"] == pytest.approx({"mean": 0.3, "min": 0.2, "max": 0.4})
    assert result["unseen_phantom"] == bench_real.UNSEEN_PHANTOM
    # Lesion detection as LiTS counts it (IoU > 0.5), with the chosen post-processing and without.
    assert result["summary"]["lesion_precision"] == pytest.approx({"mean": 0.6, "min": 0.5, "max": 0.7})
    assert result["summary"]["lesion_recall_large"]["mean"] == pytest.approx(0.5)
    assert result["summary"]["lesion_precision_default_postprocessing"]["mean"] == pytest.approx(0.2)
    assert result["runs"][0]["lesions_small"] == 4 and result["runs"][0]["lesion_recall_small"] == 0.0
    # Finished runs are reused, not trained again.
    assert bench_real.demo([0], ["training.fn_weights=[]"], label="soft Dice")["runs"][0]["minutes"] == 1.0
    assert len(calls) == 2


@pytest.mark.parametrize("argv", [["ablation", "--set", "training.epochs=3"], ["lopo-ablation", "--label", "x"]])
def test_an_ablation_needs_a_label_and_a_change(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, "argv", ["bench_real.py", *argv])
    with pytest.raises(SystemExit) as stop:
        bench_real.main()
    assert stop.value.code == 2
    assert f"{argv[0]} needs --label NAME and at least one --set KEY=VALUE" in capsys.readouterr().err


def test_the_real_ct_table_shows_each_ablation_beside_the_demo():
    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())
    # A CPU name no part of the committed JSON has: the ablation gets a machine line of its own.
    other = {**data["demo"]["machine"], "cpu": "Test CPU", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"]}
    data["demo"]["machine"] = {**data["demo"]["machine"], "cpu_flags": ["avx2", "fma"]}
    stats = {key: {"mean": 0.5, "min": 0.4, "max": 0.6} for key in ("liver_dice", "tumor_dice", "tumor_dice_global")}
    cases = [{"model": model, "case": case, "liver_dice": 0.8, "tumor_dice": tumour}
             for model, tumours in (("a", (0.2, 0.4, None)), ("b", (0.4, 0.0, None)), ("ensemble of the demo models", (0.9, 0.9, None)))
             for case, tumour in zip(("1", "7", "totalseg"), tumours)]
    per_case = {case: {"liver_dice_mean": mean, "liver_dice_min": 0.0, "liver_dice_max": 1.0}
                for case, mean in (("1", 0.91), ("7", 0.82), ("totalseg", 0.885))}
    data["ablations"] = {"soft Dice": {"set": ["training.fn_weights=[]"], "runs": [{}, {}, {}], "summary": stats,
                                       "machine": other, "sim2real": {"cases": cases, "per_case": per_case}}}
    table = readme_tables.render_real_ct(data)
    assert ("| the demo with soft Dice (`--set training.fn_weights=[]`), seeds 0–2: held-out liver Dice / tumour Dice per "
            "case / tumour Dice global | 0.500 (0.400 – 0.600) / 0.500 (0.400 – 0.600) / 0.500 (0.400 – 0.600) | | |") in table
    # Tumour Dice: the single models' mean (0.3 and 0.2), the ensemble and the unlabelled crop left out.
    assert ("| the demo with soft Dice: sim-to-real liver Dice, IRCAD patient 1 / IRCAD patient 7 / TotalSegmentator crop (3 mm, "
            "model-made labels) (mean over models); tumour Dice, IRCAD patient 1 / IRCAD patient 7 | "
            "0.910 / 0.820 / 0.885; 0.300 / 0.200 | | |") in table
    assert "ablation 'soft Dice': _Measured on Test CPU (avx512f, avx512_bf16)" in table
    # With unseen-phantom scores, a row for the demo and one for each ablation that has them.
    data["demo"]["unseen_phantom"] = {"cases": 48, "seed": 1000}
    data["demo"]["summary"].update({f"unseen_{key}": {"mean": 0.7, "min": 0.6, "max": 0.8} for key in stats})
    stats.update({f"unseen_{key}": {"mean": 0.3, "min": 0.2, "max": 0.4} for key in list(stats)})
    table = readme_tables.render_real_ct(data)
    assert ("| demo models on 48 unseen phantom cases (seed 1000, the same for every recipe and ablation): liver Dice / tumour "
            "Dice per case / tumour Dice global (seeds: mean, range) | 0.700 (0.600 – 0.800) / 0.700 (0.600 – 0.800) / "
            "0.700 (0.600 – 0.800) | — | |") in table
    assert ("| the demo with soft Dice: on the same unseen phantom cases, liver Dice / tumour Dice per case / tumour Dice "
            "global | 0.300 (0.200 – 0.400) / 0.300 (0.200 – 0.400) / 0.300 (0.200 – 0.400) | | |") in table
    # Lesion detection, with the chosen post-processing and with the default one.
    detection = {"lesion_precision": 0.49, "lesion_recall": 0.37, "lesion_recall_small": 0.0, "lesion_recall_large": 0.54,
                 "lesions_small": 20, "lesions_large": 43}
    data["demo"]["summary"].update({key: {"mean": value, "min": value, "max": value} for key, value in detection.items()})
    data["demo"]["summary"].update({f"{key}_default_postprocessing": {"mean": 0.1, "min": 0.05, "max": 0.15}
                                    for key in detection if key.startswith("lesion_")})
    table = readme_tables.render_real_ct(data)
    assert ("precision / recall / recall of the 20 lesions under 10 mm / of the 43 of 10 mm or more (seeds: mean, range) | "
            "0.49 / 0.37 / 0.00 / 0.54 | — | |") in table
    assert ("| the same with the default minimum lesion size (10 mm³) | 0.10 (0.05 – 0.15) / 0.10 (0.05 – 0.15) / "
            "0.10 (0.05 – 0.15) / 0.10 (0.05 – 0.15) | | |") in table
    # One seed: its seed named, no range, and "one model" on the real scans.
    single = {key: {"mean": 0.5, "min": 0.5, "max": 0.5} for key in ("liver_dice", "tumor_dice", "tumor_dice_global")}
    single["minutes"] = {"mean": 6.14, "min": 6.14, "max": 6.14}
    data["ablations"] = {"pilot": {"set": ["training.epochs=3"], "runs": [{"seed": 2}], "summary": single,
                                   "machine": other, "sim2real": {"models": ["m"], "cases": cases[:3],
                                                                  "per_case": per_case}}}
    table = readme_tables.render_real_ct(data)
    # Its wall time a seed beside the figures, when the JSON has it.
    assert ("| the demo with pilot (`--set training.epochs=3`), seed 2: held-out liver Dice / tumour Dice per case / "
            "tumour Dice global / wall time a seed (data cached) | 0.500 / 0.500 / 0.500 / 6.1 min | | |") in table
    assert "(3 mm, model-made labels) (one model); tumour Dice" in table
    assert "the demo with pilot: held-out lesion detection" not in table  # measured before detection was recorded
    single.update({key: {"mean": value, "min": value, "max": value} for key, value in detection.items()})
    assert ("| the demo with pilot: held-out lesion detection, precision / recall / recall under 10 mm / of 10 mm or more | "
            "0.49 / 0.37 / 0.00 / 0.54 | | |") in readme_tables.render_real_ct(data)


def test_the_real_ct_table_shows_the_demo_tumour_dice_by_phase_and_by_lesion_kind():
    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())
    kinds = [{"hypo": {"cases": 20, "tumor_dice": 0.7}, "hyper": {"cases": 6, "tumor_dice": 0.2 + i / 10},
              "none": {"cases": 4, "tumor_dice": 0.75}} for i in range(3)]
    phases = [{"portal": {"cases": 19, "tumor_dice": 0.7}, "arterial": {"cases": 5, "tumor_dice": 0.1}}] * 3
    data["demo"]["runs"] = [{**run, "tumor_dice_by_kind": kind, "tumor_dice_by_phase": phase}
                            for run, kind, phase in zip(data["demo"]["runs"], kinds, phases)]
    table = readme_tables.render_real_ct(data)
    assert ("| demo held-out phantom tumour Dice per case, by the case's lesion kind (none: tumour-free) (mean over "
            "seeds; test cases) | hypo 0.700 (20) · hyper 0.300 (6) · none 0.750 (4) | — | |") in table
    assert ("| demo held-out phantom tumour Dice per case, by contrast phase (mean over seeds; test cases) | "
            "portal 0.700 (19) · arterial 0.100 (5) | — | |") in table
    del data["demo"]["runs"][1]["tumor_dice_by_kind"]  # a run scored before the breakdown: no row, not a wrong one
    assert "by the case's lesion kind" not in readme_tables.render_real_ct(data)


@pytest.mark.slow
def test_unseen_phantom_scores_a_model_on_cases_made_once(tmp_path, monkeypatch):
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    monkeypatch.setattr(bench_real, "RUNS", tmp_path)
    monkeypatch.setattr(bench_real, "UNSEEN_PHANTOM", {"cases": 2, "seed": 1000})
    run = tmp_path / "demo-seed0"
    (run / "checkpoints").mkdir(parents=True)
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(run / "checkpoints" / "best.keras")
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=60.0, std=40.0))
    scores = bench_real.unseen_phantom_scores(run)
    assert set(scores) == {"liver_dice", "tumor_dice", "tumor_dice_global"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    phantom = json.loads((tmp_path / "unseen-phantom-1000" / "phantom.json").read_text())
    assert phantom["seed"] == 1000 and len(phantom["cases"]) == 2 and phantom["cases"][0]["shape"][:2] == [128, 128]  # the demo recipe's phantom size
    metrics = run / "eval_unseen_phantom" / "metrics.json"
    written = metrics.stat().st_mtime_ns
    assert bench_real.unseen_phantom_scores(run) == scores and metrics.stat().st_mtime_ns == written  # reused


def test_a_lopo_ablation_fine_tunes_under_its_own_run_name_with_its_changes(tmp_path, monkeypatch):
    calls: list[list[str]] = []
    real = tmp_path / "real"
    (real / "ircadb").mkdir(parents=True)
    monkeypatch.setattr(bench_real, "REAL", real)
    monkeypatch.setattr(bench_real, "RUNS", tmp_path / "runs")

    def fit(args, runs=None, env=None):
        calls.append(args)
        run = tmp_path / "runs" / args[args.index("--name") + 1]
        for fold, patient, liver, tumour in (("fold-0", "1", 0.93, 0.55), ("fold-1", "7", 0.87, 0.43)):
            (run / fold / "eval").mkdir(parents=True)
            (run / fold / "eval" / "held_out_volumes.json").write_text(
                json.dumps({"per_case": {patient: {"liver_dice": liver, "tumor_dice": tumour}}}))
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps(
            {"volume": {"liver": {"dice": 0.9}, "tumor": {"dice": 0.49, "dice_global": 0.6}}}))
        return 1.0

    monkeypatch.setattr(bench_real, "fit", fit)
    checkpoint = tmp_path / "runs" / "demo-seed0" / "checkpoints" / "best.keras"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"the seed-0 demo model")
    result = bench_real.lopo(checkpoint, ["training.fn_weights=[0.5, 0.7]"], label="Tversky loss")
    assert calls[0][calls[0].index("--name") + 1] == "ircadb-lopo-tversky-loss"
    assert calls[0][-2:] == ["--set", "training.fn_weights=[0.5, 0.7]"]
    assert calls[0][calls[0].index("--init-from") + 1] == str(checkpoint)
    assert result["set"] == ["training.fn_weights=[0.5, 0.7]"]
    assert result["models_digest"] == bench_real.models_digest([checkpoint])  # what it started from
    assert [(p["held_out_patient"], p["tumor_dice"]) for p in result["per_patient"]] == [("1", 0.55), ("7", 0.43)]
    # Finished: reused, not fine-tuned again.
    bench_real.lopo(checkpoint, ["training.fn_weights=[0.5, 0.7]"], label="Tversky loss")
    assert len(calls) == 1

    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())
    data["lopo_ablations"] = {"Tversky loss": {**result, "machine": data["lopo"]["machine"]}}
    assert ("| leave one patient out with Tversky loss (`--set training.fn_weights=[0.5, 0.7]`): liver Dice / tumour Dice, "
            "patient 1 / 7 | 0.930 / 0.870; 0.550 / 0.430 (") in readme_tables.render_real_ct(data)


def test_a_second_lopo_ablation_keeps_the_first_and_adds_no_machine_entry_beside_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LIVSEG_BENCH_RESULTS", str(tmp_path))
    first = {"minutes": 1.0, "set": ["training.epochs=20"], "per_patient": [], "machine": {"cpu": "A"}}
    (tmp_path / "real_ct.json").write_text(json.dumps({"machine": {"cpu": "A"}, "lopo_ablations": {"20 epochs": first}}))
    monkeypatch.setattr(bench_real, "lopo", lambda checkpoint, overrides, label: {"minutes": 2.0, "set": list(overrides),
                                                                                  "per_patient": []})
    monkeypatch.setattr(sys, "argv", ["bench_real.py", "lopo-ablation", "--label", "Tversky loss", "--set", "training.fn_weights=[]"])
    bench_real.main()
    ablations = json.loads((tmp_path / "real_ct.json").read_text())["lopo_ablations"]
    assert sorted(ablations) == ["20 epochs", "Tversky loss"]
    assert ablations["Tversky loss"]["set"] == ["training.fn_weights=[]"] and "cpu" in ablations["Tversky loss"]["machine"]


@pytest.fixture
def demo_calls(tmp_path, monkeypatch) -> list[list[str]]:
    """``bench_real.main`` writing to ``tmp_path``, its demo runs trained by :func:`fake_fit`
    (the arguments of each training in the list returned) and scored by stand-ins."""
    monkeypatch.setenv("KERAS_LIVSEG_BENCH_RESULTS", str(tmp_path / "results"))
    (tmp_path / "results").mkdir()
    calls: list[list[str]] = []
    monkeypatch.setattr(bench_real, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(bench_real, "fit", fake_fit(calls, tmp_path / "runs"))
    monkeypatch.setattr(bench_real, "default_postprocessing_scores", lambda run: (10.0, {"tumor_dice": 0.3, "tumor_dice_global": 0.5}))
    monkeypatch.setattr(bench_real, "unseen_phantom_scores",
                        lambda run: {"liver_dice": 0.8, "tumor_dice": 0.2, "tumor_dice_global": 0.5})
    return calls


def test_scoring_finished_demo_runs_again_keeps_the_machine_they_were_timed_on(tmp_path, monkeypatch, demo_calls):
    calls = demo_calls
    monkeypatch.setattr(bench_real, "drop_stale_ablations", lambda results: [])

    def run(cpu: str, *extra: str) -> dict:
        monkeypatch.setattr(bench_real, "machine", lambda: {"cpu": cpu})
        monkeypatch.setattr(sys, "argv", ["bench_real.py", "demo", "--seeds", "0", *extra])
        bench_real.main()
        return json.loads((tmp_path / "results" / "real_ct.json").read_text())["demo"]["machine"]

    assert run("trained here") == {"cpu": "trained here"} and len(calls) == 1
    assert run("scored again elsewhere") == {"cpu": "trained here"} and len(calls) == 1  # reused, not trained
    assert run("trained again", "--rerun") == {"cpu": "trained again"} and len(calls) == 2


def test_training_the_demo_again_drops_the_parts_that_scored_the_models_it_replaced(tmp_path, monkeypatch, demo_calls):
    calls = demo_calls
    monkeypatch.setattr(bench_real, "machine", lambda: {"cpu": "here"})
    path = tmp_path / "results" / "real_ct.json"

    def run(*argv: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["bench_real.py", *argv])
        bench_real.main()
        return json.loads(path.read_text())

    run("demo", "--seeds", "0", "1")
    checkpoints = [tmp_path / "runs" / f"demo-seed{seed}" / "checkpoints" / "best.keras" for seed in (0, 1)]
    results = run("demo", "--seeds", "0", "1")
    results["sizes"] = {"models_digest": bench_real.models_digest(checkpoints)}
    results["sim2real"] = {"models_digest": bench_real.models_digest(checkpoints)}
    start = {"init_from": str(checkpoints[0]), "models_digest": bench_real.models_digest(checkpoints[:1]), "recipe": "r"}
    results["lopo"] = start
    results["lopo_ablations"] = {"seed 1": start}
    results["lopo_starts"] = {"1": {"init_from": str(checkpoints[1]), "models_digest": bench_real.models_digest(checkpoints[1:])}}
    path.write_text(json.dumps(results))
    kept = run("demo", "--seeds", "0", "1")  # the finished runs scored again: the same models
    assert {"sizes", "sim2real", "lopo"} <= set(kept) and len(calls) == 2
    assert list(kept["lopo_ablations"]) == ["seed 1"] and list(kept["lopo_starts"]) == ["1"]
    retrained = run("demo", "--seeds", "0", "1", "--rerun")
    assert len(calls) == 4 and not {"sizes", "sim2real", "lopo"} & set(retrained)
    assert retrained["lopo_ablations"] == {} and retrained["lopo_starts"] == {}


def test_the_adjacent_slices_twin_is_the_same_checkpoint_without_context_mm(tmp_path):
    run = tmp_path / "runs" / "demo-seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.keras").write_bytes(b"weights")
    payload = {"preprocessing": {"context": 3, "context_mm": 4.5, "window": [-200.0, 250.0]},
               "postprocessing": {"min_lesion_mm3": 268.0}}
    (run / "preprocessing.json").write_text(json.dumps(payload))
    twin = bench_real.with_adjacent_context(run / "checkpoints" / "best.keras", tmp_path / "scratch")
    assert twin.read_bytes() == b"weights" and twin.parent.parent.name == "demo-seed0"
    written = json.loads((twin.parent.parent / "preprocessing.json").read_text())
    assert written == {**payload, "preprocessing": {**payload["preprocessing"], "context_mm": None}}
    payload["preprocessing"]["context_mm"] = None  # a model that already takes adjacent slices: no twin
    (run / "preprocessing.json").write_text(json.dumps(payload))
    assert bench_real.with_adjacent_context(run / "checkpoints" / "best.keras", tmp_path / "scratch2") is None


def test_the_real_ct_table_shows_the_models_with_adjacent_context_slices_beside_them():
    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())
    data["sim2real"]["cases"] = [*data["sim2real"]["cases"],
                                 {"model": "demo-seed0 (adjacent slices)", "case": "1", "liver_dice": 0.5, "tumor_dice": 0.0}]
    before = readme_tables._mean_tumour_by_case(data["sim2real"])
    data["sim2real"]["adjacent_context"] = {"1": {"liver_dice_mean": 0.9, "tumor_dice_mean": 0.55},
                                            "7": {"liver_dice_mean": 0.85, "tumor_dice_mean": 0.6},
                                            "totalseg": {"liver_dice_mean": 0.88, "tumor_dice_mean": None}}
    table = readme_tables.render_real_ct(data)
    assert ("| sim-to-real, the same models taking adjacent context slices (as before `preprocessing.context_mm`): liver "
            "Dice, IRCAD patient 1 / IRCAD patient 7 / TotalSegmentator crop (3 mm, model-made labels) (mean over models); "
            "tumour Dice, IRCAD patient 1 / IRCAD patient 7 | 0.900 / 0.850 / 0.880; 0.550 / 0.600 | | |") in table
    # The twins' rows stay out of the models' own tumour mean.
    del data["sim2real"]["cases"][-1]
    assert readme_tables._mean_tumour_by_case(data["sim2real"]) == before


def test_leave_one_patient_out_again_drops_its_ablations_measured_beside_another_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_LIVSEG_BENCH_RESULTS", str(tmp_path))
    current = bench_real.lopo_recipe_digest()
    ablations = {"same recipe": {"recipe": current, "per_patient": []}, "old recipe": {"recipe": "0+0", "per_patient": []},
                 "before digests": {"per_patient": []}}
    (tmp_path / "real_ct.json").write_text(json.dumps({"lopo_ablations": ablations}))
    monkeypatch.setattr(bench_real, "lopo", lambda checkpoint: {"minutes": 2.0, "per_patient": [], "recipe": current})
    monkeypatch.setattr(sys, "argv", ["bench_real.py", "lopo"])
    bench_real.main()
    assert sorted(json.loads((tmp_path / "real_ct.json").read_text())["lopo_ablations"]) == ["same recipe"]
    assert current.count("+") == 1 and current.split("+")[1] == bench_real.recipe_digest()  # the starting model's recipe too


def test_the_size_sweep_counts_what_each_minimum_lesion_size_removes_by_lesion_size():
    import numpy as np

    spacing = (1.0, 1.0, 1.0)
    reference = np.ones((48, 48, 48), np.uint8)  # liver everywhere
    reference[2:26, 2:26, 2:26] = 2  # 24 mm cube: a 29.8 mm sphere's volume, "20_up"
    reference[30:42, 30:42, 30:42] = 2  # 12 mm cube: 14.9 mm, "10_20"
    reference[30:34, 2:6, 2:6] = 2  # 4 mm cube: 5.0 mm, "under_10", missed below
    prediction = reference.copy()
    prediction[30:34, 2:6, 2:6] = 1
    prediction[40:46, 2:8, 2:8] = 2  # a false lesion of 216 mm³ (7.4 mm)
    rows = bench_real.size_sweep(prediction, reference, spacing, (0.0, 10.0, 20.0))
    by = {row["diameter_mm"]: row for row in rows}
    assert [row["diameter_mm"] for row in rows] == [0.0, 10.0, 20.0]
    # Every size sees the same reference lesions, one in each band.
    assert all((row["lesions_under_10"], row["lesions_10_20"], row["lesions_20_up"]) == (1, 1, 1) for row in rows)
    # The default rule (10 mm³) keeps the false lesion; 10 mm (524 mm³) removes it and keeps the two found ones.
    assert (by[0.0]["tp"], by[0.0]["fp"], by[0.0]["fn"]) == (2, 1, 1)
    assert (by[10.0]["tp"], by[10.0]["fp"], by[10.0]["fn"]) == (2, 0, 1)
    assert by[10.0]["found_10_20"] == by[10.0]["found_any_10_20"] == 1
    # 20 mm (4189 mm³) removes the 1728 mm³ lesion the model had found as well.
    assert (by[20.0]["tp"], by[20.0]["found_any_10_20"], by[20.0]["found_any_20_up"]) == (1, 0, 1)
    truth = int((reference == 2).sum())
    assert by[0.0]["tumor_dice"] == pytest.approx(2 * (24**3 + 12**3) / (24**3 + 12**3 + 216 + truth))
    assert by[10.0]["tumor_dice"] == pytest.approx(2 * (24**3 + 12**3) / (24**3 + 12**3 + truth))
    assert by[20.0]["tumor_dice"] == pytest.approx(2 * 24**3 / (24**3 + truth))


def test_the_real_ct_table_shows_the_size_sweep_size_by_size():
    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())

    def row(diameter, dice, recall):
        return {"diameter_mm": diameter, "tumor_dice": dice, "precision": 0.5, "recall": recall,
                "found_any_10_20": 4.0, "found_any_20_up": 9.0, "lesions_10_20": 7.0, "lesions_20_up": 11.0}

    data["sizes"] = {"seeds": [0, 1, 2], "unseen_phantom": {"cases": 48, "seed": 1000},
                     "test": {"mean": [row(0.0, 0.5, 0.4), row(20.0, 0.6, 0.3)]},
                     "unseen": {"mean": [row(0.0, 0.45, 0.4), row(20.0, 0.55, 0.3)]}}
    table = readme_tables.render_real_ct(data)
    assert ("(seeds 0–2, `bench_real.py sizes`; 10 mm³ is the default rule, the demo chooses among 6 – 15 mm): tumour Dice "
            "per case, held-out / 48 unseen phantom cases (mean over models) | 10 mm³ 0.500 / 0.450 · 20 mm 0.600 / 0.550 | | |") in table
    assert "| the same, held-out: LiTS lesion precision / recall (IoU > 0.5) | 10 mm³ 0.50 / 0.40 · 20 mm 0.50 / 0.30 | | |" in table
    assert ("the 7 of 10 – 20 mm / the 11 of 20 mm or more (mean over models) | 10 mm³ 4.0 / 9.0 · 20 mm 4.0 / 9.0 | | |") in table


def test_the_real_ct_table_shows_leave_one_patient_out_from_each_demo_model():
    data = json.loads((ROOT / "benchmarks" / "results" / "real_ct.json").read_text())
    goal = {"liver_dice": 0.93, "tumor_dice": 0.60}
    data["lopo"] = {**data["lopo"], "goal": goal, "per_patient": [
        {"held_out_patient": "1", "liver_dice": 0.92, "tumor_dice": 0.64}, {"held_out_patient": "7", "liver_dice": 0.86, "tumor_dice": 0.52}]}
    data["lopo_starts"] = {seed: {"minutes": 10.0, "machine": data["lopo"]["machine"], "per_patient": [
        {"held_out_patient": "1", "liver_dice": liver, "tumor_dice": tumour}, {"held_out_patient": "7", "liver_dice": 0.88, "tumor_dice": 0.70}]}
        for seed, liver, tumour in (("1", 0.94, 0.56), ("2", 0.93, 0.60))}
    table = readme_tables.render_real_ct(data)
    assert ("| leave one patient out from each demo model (seeds 0, 1, 2; `bench_real.py lopo lopo-starts`): liver Dice, "
            "patient 1 / 7 (mean, range) | 0.930 (0.920 – 0.940; 2 of 3 ≥ 0.93) / 0.873 (0.860 – 0.880; 0 of 3 ≥ 0.93) | — | |") in table
    assert "tumour Dice, patient 1 / 7 (mean, range) | 0.600 (0.560 – 0.640; 2 of 3 ≥ 0.60) / 0.640 (0.520 – 0.700; 2 of 3 ≥ 0.60)" in table
    assert "lopo from demo seed 1" in table  # the machine each was measured on
    data["lopo"]["init_from"] = "runs/bench_real/demo-seed3/checkpoints/best.keras"  # lopo --seeds 3 1 2
    assert "from each demo model (seeds 3, 1, 2;" in readme_tables.render_real_ct(data)
    del data["lopo_starts"]
    assert "from each demo model" not in readme_tables.render_real_ct(data)
