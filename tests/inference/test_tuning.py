"""Post-processing chosen on validation volumes (inference/tuning.py) and applied by predict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from keras_livseg import predict as predict_cli
from keras_livseg.data.cases import CaseFiles
from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
from keras_livseg.inference import PostProcessing, SegmentationModel, predict_volume
from keras_livseg.inference.predictor import stored_postprocessing
from keras_livseg.inference.tuning import choose_min_lesion_size, sphere_mm3
from keras_livseg.data.volumes import load_case

# 1 mm voxels: a voxel is 1 mm³.
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def threshold_model() -> SegmentationModel:
    """Probabilities one-hot from the HU: liver above 50, tumour above 150."""

    def forward(raw, statistics, spacing=None):
        centre = raw[..., raw.shape[-1] // 2]
        return np.eye(3, dtype=np.float32)[(centre > 50).astype(np.uint8) + (centre > 150).astype(np.uint8)]

    return SegmentationModel(Path("fake.keras"), "keras", Preprocessing(image_size=(32, 32), normalization="none"),
                             forward, 1, "fake")


def write_case(folder: Path, case_id: str, lesion_hu: tuple[slice, ...] | None, lesion_label: tuple[slice, ...] | None) -> CaseFiles:
    """A 30 mm cube of liver (100 HU) in air; a bright block that the model calls tumour, and a
    reference tumour block, each optional."""
    hu = np.full((30, 30, 30), -1000, np.int16)
    labels = np.zeros(hu.shape, np.uint8)
    hu[3:27, 3:27, 3:27] = 100
    labels[3:27, 3:27, 3:27] = 1
    if lesion_hu is not None:
        hu[lesion_hu] = 200
    if lesion_label is not None:
        labels[lesion_label] = 2
    folder.mkdir(parents=True, exist_ok=True)
    image, label = folder / f"volume-{case_id}.nii.gz", folder / f"segmentation-{case_id}.nii.gz"
    nib.save(nib.Nifti1Image(hu, AFFINE), str(image))
    nib.save(nib.Nifti1Image(labels, AFFINE), str(label))
    return CaseFiles(case_id, image, label)


FALSE = (slice(10, 13), slice(10, 13), slice(10, 13))  # 27 mm³ that the reference calls liver
TRUE = (slice(12, 22), slice(12, 22), slice(12, 22))  # 1000 mm³, tumour in both


def test_the_size_that_clears_a_false_lesion_and_keeps_the_true_one_is_chosen(tmp_path):
    cases = [write_case(tmp_path, "clean", FALSE, None), write_case(tmp_path, "lesion", TRUE, TRUE)]
    choice = choose_min_lesion_size(threshold_model(), cases)
    sizes = [row["min_lesion_mm3"] for row in choice.scores]
    assert sizes == [10.0, 113.1, 268.1, 523.6, 904.8, 1767.1]  # the default, then spheres of 6-15 mm
    # Hand-computed: the default keeps the 27 mm³ false lesion (the clean case scores 0), 6-12 mm
    # remove it, 15 mm (1767 mm³) removes the 1000 mm³ lesion too.
    assert [row["tumor_dice"] for row in choice.scores] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert choice.scores[0]["tumor_dice_global"] == pytest.approx(2 * 1000 / (1027 + 1000))
    assert choice.postprocessing.min_lesion_mm3 == pytest.approx(sphere_mm3(6.0), abs=0.05)  # a tie keeps the smaller
    assert choice.cases == ["clean", "lesion"]
    assert "lesions under 113 mm³ (a 6 mm sphere) become liver; validation tumour Dice 0.500 -> 1.000" in choice.summary()
    entry = choice.to_dict()
    assert entry["min_lesion_mm3"] == choice.postprocessing.min_lesion_mm3 and entry["chosen_on"]["scores"] == choice.scores
    assert PostProcessing.from_dict(entry) == choice.postprocessing


def test_the_default_is_kept_unless_a_larger_size_scores_higher(tmp_path):
    choice = choose_min_lesion_size(threshold_model(), [write_case(tmp_path, "lesion", TRUE, TRUE)])
    assert [row["tumor_dice"] for row in choice.scores] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert choice.postprocessing == PostProcessing()
    assert "scored best" in choice.summary() and "kept" in choice.summary()


def test_unlabelled_or_no_cases_are_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one labelled validation case"):
        choose_min_lesion_size(threshold_model(), [])
    case = write_case(tmp_path, "x", TRUE, TRUE)
    with pytest.raises(ValueError, match="x have no label map"):
        choose_min_lesion_size(threshold_model(), [dataclasses.replace(case, label=None)])


def test_a_model_applies_the_size_recorded_with_it_and_an_explicit_one_wins(tmp_path):
    case = load_case(write_case(tmp_path / "data", "1", FALSE, None), with_labels=False)
    model = threshold_model()
    assert (predict_volume(model, case, progress=False).labels == 2).sum() == 27  # the default: 10 mm³
    model.postprocessing = PostProcessing(min_lesion_mm3=sphere_mm3(6.0))
    assert (predict_volume(model, case, progress=False).labels == 2).sum() == 0
    assert (predict_volume(model, case, postprocess=PostProcessing(), progress=False).labels == 2).sum() == 27
    with pytest.raises(ValueError, match="pass 'model'"):
        predict_volume(model, case, postprocess="default", progress=False)


def test_the_recorded_size_is_read_beside_a_checkpoint_and_a_broken_entry_named(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "best.keras"
    prep = Preprocessing(image_size=(32, 32))
    assert stored_postprocessing(checkpoint) == PostProcessing()  # no preprocessing.json yet
    write_preprocessing_json(run / "preprocessing.json", prep)
    assert stored_postprocessing(checkpoint) == PostProcessing()  # no entry
    write_preprocessing_json(run / "preprocessing.json", prep, postprocessing={"min_lesion_mm3": 523.6, "chosen_on": {}})
    assert stored_postprocessing(checkpoint) == PostProcessing(min_lesion_mm3=523.6)
    write_preprocessing_json(run / "preprocessing.json", prep, postprocessing={"min_lesion_mm3": -1})
    with pytest.raises(ValueError, match=r"preprocessing.json: its postprocessing entry is not valid .*delete the entry"):
        stored_postprocessing(checkpoint)


def test_an_ensemble_uses_its_members_median_size():
    members = []
    for size in (10.0, 904.8, 113.1):
        member = threshold_model()
        member.postprocessing = PostProcessing(min_lesion_mm3=size)
        members.append(member)
    assert SegmentationModel.ensemble(members).postprocessing.min_lesion_mm3 == 113.1
    assert SegmentationModel.ensemble(members[:2]).postprocessing.min_lesion_mm3 == pytest.approx((10.0 + 904.8) / 2)


def test_predict_cli_applies_the_models_size_unless_given_one(tmp_path, monkeypatch, capsys):
    write_case(tmp_path / "data", "5", FALSE, None)
    model = threshold_model()
    model.postprocessing = PostProcessing(min_lesion_mm3=sphere_mm3(8.0))
    monkeypatch.setattr(SegmentationModel, "load", classmethod(lambda cls, path, preprocessing=None: model))
    fake = tmp_path / "fake.keras"
    fake.touch()  # predict checks that the model exists before it loads anything
    for extra, tumour in (([], 0), (["--min-lesion-mm3", "10"], 27)):
        out = tmp_path / f"out{len(extra)}"
        code = predict_cli.main(["--model", str(fake), str(tmp_path / "data" / "volume-5.nii.gz"), "--out", str(out),
                                 "--no-progress", *extra])
        assert code == 0, capsys.readouterr().err
        written = np.asarray(nib.load(str(out / "segmentation-5.nii.gz")).dataobj)
        assert int((written == 2).sum()) == tumour, extra
    code = predict_cli.main(["--model", str(fake), str(tmp_path / "data"), "--out", str(tmp_path / "bad"),
                             "--min-lesion-mm3", "-5"])
    err = capsys.readouterr().err
    assert code != 0 and "min_lesion_mm3=-5" in err and "Traceback" not in err
