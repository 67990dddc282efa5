"""The evaluation report: matching, numbers in metrics.json / per_case.csv / report.md, CLI."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from keras_livseg import evaluate as evaluate_cli
from keras_livseg.data.volumes import DataError
from keras_livseg.evaluation import metrics as core
from keras_livseg.evaluation import plots
from keras_livseg.evaluation.report import (
    evaluate_folders,
    evaluate_model,
    history_stability,
    match_cases,
    one_vs_rest_curves,
    read_history,
)

AFFINE = np.diag([-0.8, -0.8, 2.5, 1.0])
SPACING = (0.8, 0.8, 2.5)
SHAPE = (40, 40, 10)


def reference(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(hu, labels): a liver block with a large (14×14×4) and a small (2×2×2) lesion."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[4:36, 4:36, 1:9] = 1
    labels[8:22, 8:22, 2:6] = 2  # 1254 mm³: large
    labels[28 + seed % 3:30 + seed % 3, 28:30, 5:7] = 2  # 12.8 mm³: small
    hu = np.where(labels == 0, -100, np.where(labels == 1, 60, 20)).astype(np.int16)
    return hu, labels


def prediction(labels: np.ndarray, seed: int) -> np.ndarray:
    pred = labels.copy()
    if seed == 0:
        pred[pred == 2] = 1
        pred[8:21, 9:22, 2:6] = 2  # large lesion shifted a little; small one missed
    elif seed == 1:
        pred[30:34, 10:14, 3:5] = 2  # a false-positive lesion
        pred[4:8, 4:36, 1:9] = 0  # liver under-segmented
    return pred


def save(path: Path, array: np.ndarray, affine=AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture
def folders(tmp_path):
    ref_dir, pred_dir = tmp_path / "lits", tmp_path / "pred"
    pairs = {}
    for seed in range(3):
        hu, labels = reference(seed)
        save(ref_dir / f"volume-{seed}.nii.gz", hu)
        save(ref_dir / f"segmentation-{seed}.nii.gz", labels)
        pred = prediction(labels, seed)
        save(pred_dir / f"segmentation-{seed}.nii.gz", pred)
        pairs[str(seed)] = (pred, labels)
    save(pred_dir / "segmentation-99.nii.gz", np.zeros(SHAPE, np.uint8))  # no reference
    return pred_dir, ref_dir, pairs


def write_history(path: Path) -> Path:
    rows = ["epoch,loss,val_loss,tumor_dice,val_tumor_dice,liver_dice,liver_iou,pixel_accuracy"]
    for epoch, dice in enumerate([0.5, 0.6, 0.7, 0.72]):
        rows.append(f"{epoch},{1 - dice},{1.1 - dice},{dice},{dice - 0.05},{dice + 0.2},{dice + 0.1},0.9")
    path.write_text("\n".join(rows) + "\n")
    return path


def table_row(report: str, title_start: str, first_cells: list[str]) -> list[str]:
    """The cells after ``first_cells`` of a row in the table under the heading ``title_start``."""
    section = report.split(f"### {title_start}", 1)[1].split("###", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first_cells)] == first_cells:
            return cells[len(first_cells):]
    raise AssertionError(f"no row {first_cells} under {title_start!r}")


def test_report_holds_the_metric_core_numbers(folders, tmp_path):
    pred_dir, ref_dir, pairs = folders
    out = tmp_path / "eval"
    rng = np.random.default_rng(0)
    samples_y = rng.integers(0, 3, 3000)
    samples_p = np.eye(3)[samples_y] * 0.6 + rng.random((3000, 3)) * 0.4
    summary = evaluate_folders(
        pred_dir, ref_dir, out, model_name="TAM-U-Net", history=write_history(tmp_path / "history.csv"),
        probability_samples=(samples_p, samples_y),
    )
    for name in ("metrics.json", "per_case.csv", "report.md", "figures/roc_curves.png",
                 "figures/pr_curves.png", "figures/overlays.png", "figures/training_curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(summary))
    assert metrics["cases"] == ["0", "1", "2"]
    assert metrics["unmatched_predictions"] == [str(pred_dir / "segmentation-99.nii.gz")]

    # Volume metrics: the metric core's numbers, averaged and pooled.
    # The evaluation scores with the LiTS surface (18-neighbourhood) by default.
    cases = [core.case_metrics(p, r, SPACING, connectivity=2) for p, r in pairs.values()]
    for region in ("liver", "tumor"):
        assert metrics["volume"][region]["dice"] == pytest.approx(np.mean([c[f"{region}_dice"] for c in cases]))
        assert metrics["volume"][region]["hd95"] == pytest.approx(np.mean([c[f"{region}_hd95"] for c in cases]))
        assert metrics["volume"][region]["dice_global"] == pytest.approx(core.global_dice(cases, region))
    detections = [core.lesion_detection(p, r, SPACING, connectivity=2) for p, r in pairs.values()]
    assert metrics["detection"]["iou"] == pytest.approx(core.detection_precision_recall(detections))
    # By hand: case 0 finds its large lesion (IoU 676/784) and misses the small one, case 1 finds both
    # and adds one false block, case 2 is exact.
    assert {k: metrics["detection"]["iou"][k] for k in ("tp", "fp", "fn")} == {"tp": 5, "fp": 1, "fn": 1}
    assert metrics["detection"]["iou"]["precision"] == pytest.approx(5 / 6)
    assert metrics["detection"]["iou"]["recall"] == pytest.approx(5 / 6)
    # Tumour: 676 of 792 voxels found with none extra; 792 found with 32 extra. Liver: 1,024 of 8,192 missed.
    assert [c["tumor_dice"] for c in cases] == pytest.approx([1352 / 1468, 1584 / 1616, 1.0])
    assert [c["liver_dice"] for c in cases] == pytest.approx([1.0, 14336 / 15360, 1.0])
    records = [rec for p, r in pairs.values() for rec in core.slice_level_metrics(p, r, SPACING, "tumor")["slices"]]
    small = [rec["dice"] for rec in records if rec["stratum"] == "small"]
    large = [rec["dice"] for rec in records if rec["stratum"] == "large"]
    assert small and large
    assert metrics["slice_level"]["overall"]["tumor"]["dice"] == pytest.approx(np.mean([r["dice"] for r in records]))
    assert metrics["slice_level"]["small"]["tumor"]["dice"] == pytest.approx(np.mean(small))
    assert metrics["slice_level"]["large"]["tumor"]["dice"] == pytest.approx(np.mean(large))
    assert metrics["stability"]["val_tumor_dice"]["cv"] == pytest.approx(
        core.coefficient_of_variation([0.45, 0.55, 0.65, 0.67])
    )
    assert metrics["curves"]["tumor"]["auc_roc"] > 0.9

    # report.md: the tables show those numbers (4 decimals), rows class × model.
    report = (out / "report.md").read_text()
    row = table_row(report, "Table I.", ["tumor", "TAM-U-Net"])
    assert float(row[0]) == pytest.approx(metrics["volume"]["tumor"]["dice"], abs=5e-5)
    assert float(row[6]) == pytest.approx(metrics["volume"]["tumor"]["hd95"], abs=5e-5)
    row = table_row(report, "Table II.", ["liver", "TAM-U-Net"])
    assert float(row[1]) == pytest.approx(metrics["slice_level"]["overall"]["liver"]["iou"], abs=5e-5)
    assert float(table_row(report, "Table III.", ["tumor", "TAM-U-Net"])[0]) == pytest.approx(np.mean(small), abs=5e-5)
    assert float(table_row(report, "Table IV.", ["tumor", "TAM-U-Net"])[0]) == pytest.approx(np.mean(large), abs=5e-5)
    row = table_row(report, "LiTS measures", ["tumor", "TAM-U-Net"])
    assert float(row[1]) == pytest.approx(core.global_dice(cases, "tumor"), abs=5e-5)
    row = table_row(report, "Lesion detection", ["TAM-U-Net", "IoU > 0.5"])
    assert [int(v) for v in row[:3]] == [metrics["detection"]["iou"][k] for k in ("tp", "fp", "fn")]
    assert "segmentation-99.nii.gz" in report

    # per_case.csv: one row per scored case, the core's values.
    with (out / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case_id"] for r in rows] == ["0", "1", "2"]
    for row, case in zip(rows, cases):
        assert float(row["tumor_dice"]) == pytest.approx(case["tumor_dice"])
        assert float(row["liver_assd"]) == pytest.approx(case["liver_assd"])


def test_compare_sets_models_side_by_side(folders, tmp_path):
    pred_dir, ref_dir, _ = folders
    evaluate_folders(pred_dir, ref_dir, tmp_path / "runs" / "unet" / "eval", model_name="U-Net", figures=False)
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "tam", model_name="TAM-U-Net",
                               compare=[tmp_path / "runs" / "unet"], figures=False)
    report = (tmp_path / "tam" / "report.md").read_text()
    for model in ("TAM-U-Net", "U-Net"):
        cells = table_row(report, "Table I.", ["liver", model])
        assert float(cells[0]) == pytest.approx(summary["volume"]["liver"]["dice"], abs=5e-5)


def test_same_file_names_in_both_folders_and_missing_predictions(tmp_path):
    _, labels = reference(0)
    for name in ("a.nii.gz", "b.nii.gz"):
        save(tmp_path / "ref" / name, labels)
    save(tmp_path / "pred" / "a.nii.gz", labels)
    save(tmp_path / "pred" / "a_probabilities.nii.gz", np.zeros(SHAPE + (3,), np.uint8))
    matched, unmatched, missing = match_cases(tmp_path / "pred", tmp_path / "ref")
    assert [m.case_id for m in matched] == ["a"] and unmatched == [] and missing == ["b"]


def test_grid_mismatch_names_both_shapes_and_spacings(tmp_path):
    _, labels = reference(0)
    save(tmp_path / "ref" / "segmentation-1.nii.gz", labels)
    save(tmp_path / "pred" / "segmentation-1.nii.gz", labels[:, :, :8], np.diag([-0.7, -0.8, 2.5, 1.0]))
    with pytest.raises(DataError, match=r"\(40, 40, 8\).*0\.7.*\(40, 40, 10\).*0\.8"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out")


def test_curves_hand_computed():
    p = np.array([[0.1, 0.0, 0.9], [0.2, 0.0, 0.8], [0.3, 0.0, 0.7], [0.4, 0.0, 0.6]])
    curves = one_vs_rest_curves(p, np.array([2, 0, 2, 0]))
    # Tumor scores 0.9, 0.8, 0.7, 0.6 for positive, negative, positive, negative: 3 of 4 pairs ordered.
    assert curves["tumor"]["auc_roc"] == pytest.approx(0.75)
    assert curves["tumor"]["average_precision"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    assert math.isnan(curves["liver"]["auc_roc"])  # no liver voxel in the sample


def run_cli(argv, capsys):
    code = evaluate_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_scores_folders_and_lists_predictions_without_reference(folders, tmp_path, capsys):
    pred_dir, ref_dir, _ = folders
    code, out, err = run_cli(["--pred", pred_dir, "--ref", ref_dir, "--out", tmp_path / "e", "--no-figures"], capsys)
    assert code == 0, err
    assert "3 case(s)" in out and "segmentation-99.nii.gz" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    _, labels = reference(0)
    save(tmp_path / "ref" / "segmentation-1.nii.gz", labels)
    save(tmp_path / "pred" / "segmentation-1.nii.gz", labels[:, :, :8])
    (tmp_path / "empty").mkdir()
    hu, _ = reference(0)
    save(tmp_path / "lits" / "volume-1.nii.gz", hu)
    save(tmp_path / "lits" / "segmentation-1.nii.gz", labels)
    (tmp_path / "model.h5").write_text("not a model")
    for argv, expected in (
        (["--pred", tmp_path / "pred", "--ref", tmp_path / "ref"], "not on the same grid"),
        (["--pred", tmp_path / "empty", "--ref", tmp_path / "ref"], "no cases found"),
        (["--model", tmp_path / "model.h5", "--data", tmp_path / "lits"], "neither a .keras"),
        (["--pred", tmp_path / "pred"], "--pred needs --ref"),
    ):
        code, _, err = run_cli(argv + ["--out", tmp_path / "out"], capsys)
        assert code == 2 and expected in err and err.count("\n") == 1, err
        assert err.startswith("evaluate: error:") and "Traceback" not in err


def test_a_prediction_with_other_labels_is_told_to_drop_predicts_label_map(tmp_path, capsys):
    """--label-map remaps references only: for a prediction the advice is predict's own option."""
    _, labels = reference(0)
    save(tmp_path / "ref" / "segmentation-1.nii.gz", labels)
    save(tmp_path / "pred" / "segmentation-1.nii.gz", (labels * 3).astype(np.uint8))  # predict --label-map 1:3,2:6
    code, _, err = run_cli(["--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--out", tmp_path / "out",
                            "--no-figures"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "pred/segmentation-1.nii.gz holds labels 3, 6 outside 0" in err and "without predict's --label-map" in err
    save(tmp_path / "pred" / "segmentation-1.nii.gz", labels)
    save(tmp_path / "ref" / "segmentation-1.nii.gz", (labels * 3).astype(np.uint8))
    code, _, err = run_cli(["--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--out", tmp_path / "out",
                            "--no-figures"], capsys)
    assert code == 2 and "ref/segmentation-1.nii.gz holds labels 3, 6" in err and "remap them with --label-map" in err


def test_cli_refuses_a_reference_without_spacing_in_one_line(tmp_path, capsys, strip_spacing):
    """Surface distances in mm need the reference's spacing: a header without it is not 1 mm."""
    _, labels = reference(0)
    for folder in ("ref", "pred"):  # both stripped alike, so they are on one grid
        save(tmp_path / folder / "segmentation-1.nii.gz", labels)
        strip_spacing(tmp_path / folder / "segmentation-1.nii.gz")
    code, _, err = run_cli(["--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--out", tmp_path / "out",
                            "--no-figures"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("evaluate: error:") and "ref/segmentation-1.nii.gz has voxel spacing (0.0, 0.0, 0.0)" in err
    # Only the prediction's header lost it: that file is named, not a grid mismatch of 1 mm voxels.
    save(tmp_path / "ref" / "segmentation-1.nii.gz", labels)
    code, _, err = run_cli(["--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--out", tmp_path / "out",
                            "--no-figures"], capsys)
    assert code == 2 and "pred/segmentation-1.nii.gz has voxel spacing (0.0, 0.0, 0.0)" in err, err


def test_evaluate_model_predicts_then_scores_with_curves(folders, tmp_path):
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    _, ref_dir, _ = folders
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(str(run / "checkpoints" / "last.keras"))
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=40.0, std=50.0))
    summary = evaluate_model(run / "checkpoints" / "last.keras", ref_dir, tmp_path / "eval",
                             sample_voxels=3000, progress=False)
    assert summary["model"] == "run" and summary["n_cases"] == 3
    assert sorted(p.name for p in (tmp_path / "eval" / "predictions").iterdir()) == [
        f"segmentation-{i}.nii.gz" for i in range(3)
    ]
    assert summary["curves_sampled_voxels"] == pytest.approx(3000, abs=10)
    import matplotlib.image

    roc = matplotlib.image.imread(str(tmp_path / "eval" / "figures" / "roc_curves.png"))[..., :3]
    # A drawn figure: several hundred pixels a side, and curves in colour, not a blank canvas.
    assert min(roc.shape[:2]) > 200 and (np.ptp(roc, axis=-1) > 0.2).mean() > 0.001
    assert re.search(r"\| background \| [0-9.]+ \|", (tmp_path / "eval" / "report.md").read_text())


def test_cli_model_on_a_mask_off_its_volumes_grid_is_one_line_before_predicting(tmp_path, capsys):
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(str(run / "checkpoints" / "last.keras"))
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=40.0, std=50.0))
    hu, labels = reference(0)
    save(tmp_path / "lits" / "volume-1.nii.gz", hu)
    save(tmp_path / "lits" / "segmentation-1.nii.gz", labels)
    save(tmp_path / "lits" / "volume-2.nii.gz", hu)
    save(tmp_path / "lits" / "segmentation-2.nii.gz", labels[:, :, :-1])  # one slice short
    code, _, err = run_cli(["--model", run / "checkpoints" / "last.keras", "--data", tmp_path / "lits",
                            "--out", tmp_path / "eval", "--no-figures"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "segmentation-2.nii.gz has shape" in err and "same grid" in err
    assert not (tmp_path / "eval" / "predictions").exists()


# ---------------------------------------------------------------------------------------------
# Per-lesion metrics, empty-mask penalty and LiTS surfaces in the report
# ---------------------------------------------------------------------------------------------


def test_report_holds_per_lesion_metrics_and_the_policies(folders, tmp_path):
    pred_dir, ref_dir, pairs = folders
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "e", figures=False)
    assert summary["settings"]["connectivity"] == 2 and summary["settings"]["empty_surface"] == "diagonal"
    detections = [core.lesion_detection(p, r, SPACING, connectivity=2) for p, r in pairs.values()]
    expected = core.mean_lesion_metrics(detections)
    assert expected["n_detected"] == 5  # of 6 reference lesions: case 0's small one is missed
    for key in ("n_detected", "dice", "voe", "rvd", "assd", "msd", "rmsd"):
        assert summary["lesion_segmentation"][key] == pytest.approx(expected[key]), key
    with (tmp_path / "e" / "per_lesion.csv").open() as handle:
        lesions = list(csv.DictReader(handle))
    assert len(lesions) == sum(d.num_ref_lesions for d in detections) == 6
    detected = [row for row in lesions if row["detected"] == "True"]
    assert len(detected) == expected["n_detected"] and all(row["assd"] for row in detected)
    assert all(row["assd"] == "" for row in lesions if row["detected"] == "False")
    with (tmp_path / "e" / "per_case.csv").open() as handle:
        case_rows = list(csv.DictReader(handle))
    assert float(case_rows[0]["lesion_dice"]) == pytest.approx(core.mean_lesion_metrics(detections[:1])["dice"])
    report = (tmp_path / "e" / "report.md").read_text()
    row = table_row(report, "LiTS per-lesion segmentation", [summary["model"]])
    assert int(row[0]) == expected["n_detected"]
    assert float(row[1]) == pytest.approx(expected["dice"], abs=5e-5)
    assert float(row[5]) == pytest.approx(expected["assd"], abs=5e-5)
    assert "18-neighbourhood" in report and "diagonal of the volume" in report


def test_empty_prediction_is_penalised_in_the_report(tmp_path):
    _, labels = reference(0)
    save(tmp_path / "ref" / "segmentation-0.nii.gz", labels)
    save(tmp_path / "ref" / "segmentation-1.nii.gz", labels)
    save(tmp_path / "pred" / "segmentation-0.nii.gz", labels)
    save(tmp_path / "pred" / "segmentation-1.nii.gz", np.zeros(SHAPE, np.uint8))  # nothing found
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", figures=False)
    diagonal = math.sqrt((40 * 0.8) ** 2 + (40 * 0.8) ** 2 + (10 * 2.5) ** 2)
    liver = summary["volume"]["liver"]
    assert liver["surface_penalized"] == 1 and liver["assd_undefined"] == 0
    assert liver["assd"] == pytest.approx(diagonal / 2)  # (0 + diagonal) / 2
    assert liver["msd"] == pytest.approx(diagonal / 2)
    assert summary["volume"]["tumor"]["hd95"] == pytest.approx(diagonal / 2)


# ---------------------------------------------------------------------------------------------
# Prepared shard folders, training cases
# ---------------------------------------------------------------------------------------------


def write_manifest(folder: Path, lits_dir: Path, splits: dict[str, list[str]]) -> Path:
    """A minimal manifest.json (the keys evaluate reads) over the cases of a LiTS folder."""
    from keras_livseg.data.prepare import FORMAT_VERSION, sha256_file

    cases = {}
    for split, ids in splits.items():
        for case_id in ids:
            image, label = lits_dir / f"volume-{case_id}.nii.gz", lits_dir / f"segmentation-{case_id}.nii.gz"
            cases[case_id] = {"image": str(image), "image_sha256": sha256_file(image), "label": str(label),
                              "label_sha256": sha256_file(label), "split": split}
    manifest = {"format_version": FORMAT_VERSION, "source": str(lits_dir), "cases": cases,
                "splits": {split: {"cases": ids, "slices": 0, "shards": []} for split, ids in splits.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_shard_folder_scores_only_the_split(folders, tmp_path):
    pred_dir, ref_dir, pairs = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0"], "val": ["1"], "test": ["2"]})
    summary = evaluate_folders(pred_dir, shards, tmp_path / "e", split="test", figures=False)
    assert summary["cases"] == ["2"] and summary["n_cases"] == 1 and summary["split"] == "test"
    pred, ref = pairs["2"]
    assert summary["volume"]["tumor"]["dice"] == pytest.approx(core.case_metrics(pred, ref, SPACING)["tumor_dice"])
    assert "(split `test`)" in (tmp_path / "e" / "report.md").read_text()


def test_missing_or_empty_split_is_one_line_naming_the_splits(folders, tmp_path, capsys):
    pred_dir, ref_dir, _ = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0", "1"], "val": ["2"], "test": []})
    with pytest.raises(DataError, match=r"split 'holdout' is not in it; available splits: train \(2 cases\), "
                                        r"val \(1 cases\), test \(0 cases\)"):
        evaluate_folders(pred_dir, shards, tmp_path / "e", split="holdout")
    for split, expected in (("holdout", "split 'holdout' is not in it"), ("test", "split 'test' has no cases")):
        code, _, err = run_cli(["--pred", pred_dir, "--ref", shards, "--split", split, "--out", tmp_path / "o"], capsys)
        assert code == 2 and expected in err and "available splits: train (2 cases)" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run_cli(["--pred", pred_dir, "--ref", ref_dir, "--split", "test", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "needs a prepared shard folder" in err and err.count("\n") == 1


def test_scored_training_cases_are_flagged(folders, tmp_path):
    from keras_livseg.evaluation.report import find_training_cases, training_manifest_for_model

    pred_dir, ref_dir, _ = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0"], "val": ["1"], "test": ["2"]})
    run = tmp_path / "runs" / "tam"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"shards": str(shards)}}))
    assert training_manifest_for_model(run / "checkpoints" / "best.keras") == shards / "manifest.json"
    assert training_manifest_for_model(tmp_path / "elsewhere" / "model.keras") is None

    # A copy of case 1's CT elsewhere is found by its SHA-256; case 0 by its path.
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for name in ("volume-1.nii.gz", "segmentation-1.nii.gz", "volume-2.nii.gz", "segmentation-2.nii.gz"):
        (copy_dir / name).write_bytes((ref_dir / name).read_bytes())
    matched, _, _ = match_cases(pred_dir, copy_dir)
    found = find_training_cases(matched, shards)
    assert found == [{"case_id": "1", "training_case": "1", "training_split": "val", "matched_by": "sha256"}]

    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "e", figures=False,
                               training_manifest=shards / "manifest.json")
    assert summary["scored_training_cases"] == ["0", "1"]
    assert [item["matched_by"] for item in summary["training_overlap"]] == ["path", "path"]
    report = (tmp_path / "e" / "report.md").read_text()
    assert "WARNING: 2 of the 3 scored case(s) were used to train this model** (train: 0; val: 1" in report
    clean = evaluate_folders(pred_dir, shards, tmp_path / "t", split="test", figures=False,
                             training_manifest=shards)
    assert clean["scored_training_cases"] == [] and "WARNING" not in (tmp_path / "t" / "report.md").read_text()


def test_evaluate_model_on_a_shard_split_flags_its_own_training_cases(folders, tmp_path):
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    _, ref_dir, _ = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0"], "val": ["1"], "test": ["2"]})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(str(run / "checkpoints" / "last.keras"))
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=40.0, std=50.0))
    (run / "config.json").write_text(json.dumps({"data": {"shards": str(shards)}}))
    summary = evaluate_model(run / "checkpoints" / "last.keras", shards, tmp_path / "eval", split="train",
                             sample_voxels=500, progress=False, figures=False)
    assert summary["cases"] == ["0"] and summary["split"] == "train"
    assert sorted(p.name for p in (tmp_path / "eval" / "predictions").iterdir()) == ["segmentation-0.nii.gz"]
    assert summary["scored_training_cases"] == ["0"]
    assert summary["training_manifest"] == str(shards / "manifest.json")
    assert summary["curves_sampled_voxels"] == pytest.approx(500, abs=5)
    assert "WARNING: 1 of the 1 scored case(s) were used to train" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(DataError, match="available splits: train"):
        evaluate_model(run / "checkpoints" / "last.keras", shards, tmp_path / "eval2", progress=False)
    # The run folder stands for the shards it trained on (they live in the cache, under a digest).
    by_run = evaluate_model(run / "checkpoints" / "last.keras", run, tmp_path / "eval3", split="test",
                            sample_voxels=0, progress=False, figures=False)
    assert by_run["cases"] == ["2"] and by_run["split"] == "test" and not by_run["scored_training_cases"]
    (run / "config.json").write_text(json.dumps({"data": {"shards": str(tmp_path / "cleared-cache" / "shards-1")}}))
    with pytest.raises(DataError, match=r"run is a fit run whose shards .*cleared-cache/shards-1 are not there"):
        evaluate_model(run / "checkpoints" / "last.keras", run, tmp_path / "eval4", split="test", progress=False)


def test_an_exported_saved_model_leads_back_to_its_runs_training_manifest(folders, tmp_path):
    """fit's export records its run: scoring the SavedModel flags training cases as the checkpoint does."""
    from keras_livseg.evaluation.pairs import training_manifest_for_model

    _, ref_dir, _ = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0"], "val": ["1"], "test": ["2"]})
    run = tmp_path / "runs" / "tam"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"shards": str(shards)}}))
    for version in ("1", "2"):
        extra = tmp_path / "saved_models" / "livseg" / version / "assets.extra"
        extra.mkdir(parents=True)
        (extra.parent / "saved_model.pb").write_bytes(b"")
        (extra / "preprocessing.json").write_text(json.dumps({"run": str(run) if version == "2" else None}))
    base = tmp_path / "saved_models" / "livseg"
    assert training_manifest_for_model(base) == shards / "manifest.json"  # the highest version's run
    assert training_manifest_for_model(base / "2") == shards / "manifest.json"
    assert training_manifest_for_model(base / "1") is None  # exported without a run: nothing to check
    (base / "3").mkdir()
    (base / "3" / "saved_model.pb").write_bytes(b"")  # the newest export records nothing: not version 2's run
    assert training_manifest_for_model(base) is None


def test_evaluate_model_scores_an_ensemble_and_flags_its_members_training_cases(folders, tmp_path):
    """Two checkpoints: one prediction from their averaged probabilities, named after both;
    a member's run still flags the cases it trained on."""
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    _, ref_dir, _ = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0"], "val": ["1"], "test": ["2"]})
    checkpoints = []
    for name, seed in (("plain", 1), ("trained_here", 2)):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        import keras

        keras.utils.set_random_seed(seed)
        build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(str(run / "checkpoints" / "last.keras"))
        write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=40.0, std=50.0))
        checkpoints.append(run / "checkpoints" / "last.keras")
    (tmp_path / "trained_here" / "config.json").write_text(json.dumps({"data": {"shards": str(shards)}}))
    summary = evaluate_model(checkpoints, shards, tmp_path / "eval", split="train", sample_voxels=0, progress=False,
                             figures=False)
    assert summary["model"] == "plain+trained_here" and summary["cases"] == ["0"]
    assert summary["scored_training_cases"] == ["0"]
    assert sorted(p.name for p in (tmp_path / "eval" / "predictions").iterdir()) == ["segmentation-0.nii.gz"]


# ---------------------------------------------------------------------------------------------
# Overlays with the CT
# ---------------------------------------------------------------------------------------------


def mid_gray_fraction(path: Path) -> float:
    """Fraction of pixels that are grey (r = g = b) and neither black nor white: the CT."""
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))[..., :3]
    grey = (np.ptp(pixels, axis=-1) < 1e-3) & (pixels[..., 0] > 0.1) & (pixels[..., 0] < 0.9)
    return float(grey.mean())


def test_overlays_show_the_ct_with_contours_and_say_why(folders, tmp_path):
    pred_dir, ref_dir, _ = folders
    labels_only, ct_dir = tmp_path / "labels", tmp_path / "ct"
    labels_only.mkdir()
    ct_dir.mkdir()
    for seed in range(3):
        (labels_only / f"segmentation-{seed}.nii.gz").write_bytes((ref_dir / f"segmentation-{seed}.nii.gz").read_bytes())
        (ct_dir / f"volume-{seed}.nii.gz").write_bytes((ref_dir / f"volume-{seed}.nii.gz").read_bytes())
    with_ct = evaluate_folders(pred_dir, labels_only, tmp_path / "a", images=ct_dir)
    without_ct = evaluate_folders(pred_dir, labels_only, tmp_path / "b")
    auto = evaluate_folders(pred_dir, ref_dir, tmp_path / "c")  # LiTS folder: volume-N found itself

    case_titles = [t for t in with_ct["figures"] if t.startswith("case ")]
    assert len(case_titles) == 3  # 2 best + 1 worst of 3 cases
    # Case 0 misses its small lesion: tumour Dice 1352/1468, the lowest. Slices 2..5 hold the large
    # lesion (196 pixels each), slice 5 also 4 pixels of the small one: the largest tumour area.
    worst = "case 0, slice 5: largest tumour area in the reference (worst tumour Dice case, Dice 0.921)"
    assert sorted(case_titles) == [
        worst,
        "case 1, slice 5: largest tumour area in the reference (best tumour Dice case, Dice 0.980)",
        "case 2, slice 5: largest tumour area in the reference (best tumour Dice case, Dice 1.000)",
    ]
    assert all("[no CT]" in t for t in without_ct["figures"] if t.startswith("case "))
    assert not any("[no CT]" in t for t in auto["figures"])
    for title in case_titles:
        path_a = tmp_path / "a" / with_ct["figures"][title]
        path_b = tmp_path / "b" / without_ct["figures"][f"{title} [no CT]"]
        assert path_a.is_file() and path_b.is_file()
        # The CT shows as grey pixels; without it the background is black.
        assert mid_gray_fraction(path_a) > 0.2 > 0.03 > mid_gray_fraction(path_b)  # the title's anti-aliased text is grey too
    assert (tmp_path / "a" / "figures" / "overlays.png").is_file()
    assert f"![{worst}](figures/overlay_worst_0.png)" in (tmp_path / "a" / "report.md").read_text()


def test_best_and_worst_share_few_cases():
    from keras_livseg.evaluation.plots import _pick_cases

    rows = [{"tumor_ref_voxels": 5, "tumor_dice": d} for d in (0.2, 0.9, 0.5, 0.7)]
    assert _pick_cases(rows[:2], 2) == [("best", 1), ("worst", 0)]  # not both "best"
    assert _pick_cases(rows[:3], 2) == [("best", 1), ("best", 2), ("worst", 0)]
    assert _pick_cases(rows, 2) == [("best", 1), ("best", 3), ("worst", 0), ("worst", 2)]
    assert _pick_cases(rows[:1], 2) == [("best", 0)]


def test_overlays_show_the_ct_of_a_scan_stored_in_another_axis_order(tmp_path):
    """A RAS-stored scan (the TotalSegmentator crop's order) has another array shape than its
    canonical reference; the CT still shows behind the contours."""
    hu, labels = reference(0)
    # RAS: the array's axes run to the patient's right, front and head; the canonical order
    # (posterior, left, superior) swaps the first two, so a non-square slice changes shape.
    ras = np.diag([1.5, 1.5, 2.0, 1.0])
    lab, ct = np.ascontiguousarray(labels[:, :36]), np.ascontiguousarray(hu[:, :36])
    assert lab.shape[0] != lab.shape[1]
    save(tmp_path / "ref" / "segmentation-1.nii.gz", lab, ras)
    save(tmp_path / "pred" / "segmentation-1.nii.gz", lab, ras)
    save(tmp_path / "ct" / "volume-1.nii.gz", ct, ras)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", tmp_path / "out", images=tmp_path / "ct")
    titles = [t for t in summary["figures"] if t.startswith("case ")]
    assert titles and not any("[no CT]" in t for t in titles)
    assert mid_gray_fraction(tmp_path / "out" / summary["figures"][titles[0]]) > 0.2


def test_cli_images_and_training_manifest(folders, tmp_path, capsys):
    pred_dir, ref_dir, _ = folders
    labels_only = tmp_path / "labels"
    labels_only.mkdir()
    for seed in range(3):
        (labels_only / f"segmentation-{seed}.nii.gz").write_bytes((ref_dir / f"segmentation-{seed}.nii.gz").read_bytes())
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": ["0"], "val": [], "test": ["1", "2"]})
    code, out, err = run_cli(["--pred", pred_dir, "--ref", labels_only, "--images", ref_dir, "--train-manifest", shards,
                              "--connectivity", "1", "--empty-surface", "lits", "--out", tmp_path / "e"], capsys)
    assert code == 0, err
    assert "scored case(s) used in training: 0" in out
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["settings"]["connectivity"] == 1 and metrics["settings"]["empty_surface"] == "lits"
    assert metrics["scored_training_cases"] == ["0"]
    assert not any("[no CT]" in title for title in metrics["figures"])
    code, _, err = run_cli(["--pred", pred_dir, "--ref", labels_only, "--empty-surface", "far",
                            "--out", tmp_path / "f"], capsys)
    assert code == 2 and "empty_value='far'" in err and err.count("\n") == 1


def test_overlay_shows_the_canonical_slice_untransposed():
    """Canonical arrays run (posterior, patient-left): drawn as they are, anterior is up and
    the patient's right on the image's left (the radiological view), never transposed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from keras_livseg.evaluation.plots import _draw_overlay

    ct = np.full((40, 30), -200.0, np.float32)
    ct[:10, :] = 100.0  # the anterior rows are bright
    labels = np.zeros((40, 30), np.uint8)
    labels[15:25, 2:8] = 1  # a 'liver' on the patient's right: small column indices
    figure, axis = plt.subplots()
    _draw_overlay(axis, ct, labels, labels, "orientation")
    shown = np.asarray(axis.images[0].get_array())
    plt.close(figure)
    assert shown.shape == (40, 30) and axis.images[0].origin == "upper"
    np.testing.assert_array_equal(shown, ct)  # row 0 (anterior) at the top, columns as stored


def test_scores_by_stratum_from_the_manifest(folders, tmp_path):
    pred_dir, ref_dir, pairs = folders
    shards = write_manifest(tmp_path / "shards", ref_dir, {"train": [], "val": [], "test": ["0", "1", "2"]})
    manifest = json.loads((shards / "manifest.json").read_text())
    for case_id, stratum in {"0": "arterial/hypo", "1": "portal/hypo", "2": "portal/hypo"}.items():
        manifest["cases"][case_id]["stratum"] = stratum
    (shards / "manifest.json").write_text(json.dumps(manifest))
    summary = evaluate_folders(pred_dir, shards, tmp_path / "e", split="test", figures=False)
    metrics = {cid: core.case_metrics(pred, ref, SPACING) for cid, (pred, ref) in pairs.items()}
    portal = summary["by_stratum"]["portal/hypo"]
    assert list(summary["by_stratum"]) == ["arterial/hypo", "portal/hypo"]
    assert portal["n_cases"] == 2 and portal["tumor_free_cases"] == 0
    assert portal["tumor_dice"] == pytest.approx((metrics["1"]["tumor_dice"] + metrics["2"]["tumor_dice"]) / 2)
    assert portal["liver_dice"] == pytest.approx((metrics["1"]["liver_dice"] + metrics["2"]["liver_dice"]) / 2)
    assert portal["tumor_dice_global"] == pytest.approx(core.global_dice([metrics["1"], metrics["2"]], "tumor"))
    assert summary["by_stratum"]["arterial/hypo"]["tumor_dice"] == pytest.approx(metrics["0"]["tumor_dice"])
    with (tmp_path / "e" / "per_case.csv").open() as handle:
        assert {row["case_id"]: row["stratum"] for row in csv.DictReader(handle)} == {
            "0": "arterial/hypo", "1": "portal/hypo", "2": "portal/hypo"}
    report = (tmp_path / "e" / "report.md").read_text()
    cells = table_row(report, "Dice by stratum", ["portal/hypo"])
    assert cells[:2] == ["2", "0"] and float(cells[3]) == pytest.approx(portal["tumor_dice"], abs=1e-4)
    # Without strata: no column, no table.
    plain = evaluate_folders(pred_dir, ref_dir, tmp_path / "p", figures=False)
    assert "by_stratum" not in plain and "Dice by stratum" not in (tmp_path / "p" / "report.md").read_text()
    with (tmp_path / "p" / "per_case.csv").open() as handle:
        assert "stratum" not in next(csv.DictReader(handle))


def test_a_history_validated_only_in_its_last_epochs_reads_nan_for_the_others(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss,val_tumor_dice\n0,0.9,NA,NA\n1,0.7,NA,NA\n2,0.5,0.6,0.7\n3,0.4,0.55,0.8\n")
    history = read_history(path)
    np.testing.assert_array_equal(history["loss"], [0.9, 0.7, 0.5, 0.4])
    np.testing.assert_array_equal(np.isnan(history["val_tumor_dice"]), [True, True, False, False])
    stability = history_stability(history)
    # Over the two validated epochs only: mean 0.75, sample std 0.0707.
    assert stability["val_tumor_dice"]["epochs"] == 2 and stability["val_tumor_dice"]["best"] == 0.8
    assert stability["val_tumor_dice"]["cv"] == pytest.approx(np.std([0.7, 0.8], ddof=1) / 0.75)
    written = plots.plot_history(history, tmp_path / "curves.png", stability)
    assert written["Training curves"].stat().st_size > 0
