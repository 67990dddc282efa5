"""Whole-volume inference: grid and orientation, post-processing, batching, loading, CLI."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from keras_livseg import predict as predict_cli
from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
from keras_livseg.data.cases import CaseFiles, output_names
from keras_livseg.data.volumes import DataError, load_case
from keras_livseg.inference import (
    PostProcessing,
    SegmentationModel,
    check_hounsfield,
    postprocess_labels,
    predict_paths,
    predict_volume,
)

# A permuted and flipped grid: array axis 0 runs head-ward, axis 1 to the patient's right,
# axis 2 anterior-ward; nothing like the canonical P, L, S.
ODD_AFFINE = np.array(
    [[0.0, -0.8, 0.0, 10.0], [0.0, 0.0, -0.9, 20.0], [2.5, 0.0, 0.0, -30.0], [0.0, 0.0, 0.0, 1.0]]
)


def threshold_labels(hu: np.ndarray) -> np.ndarray:
    """The fake model's rule: liver above 50 HU, tumor above 150 HU."""
    return (hu > 50).astype(np.uint8) + (hu > 150).astype(np.uint8)


class Calls:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []


def fake_model(calls: Calls | None = None, context: int = 1) -> SegmentationModel:
    """A SegmentationModel whose probabilities are a one-hot threshold of the centre slice."""

    def forward(raw: np.ndarray, statistics, spacing=None) -> np.ndarray:
        if calls is not None:
            calls.batch_sizes.append(raw.shape[0])
        labels = threshold_labels(raw[..., raw.shape[-1] // 2])
        return np.eye(3, dtype=np.float32)[labels]

    prep = Preprocessing(image_size=(32, 32), context=context, normalization="none")
    return SegmentationModel(Path("fake.keras"), "keras", prep, forward, context, "fake")


def write_volume(path: Path, hu: np.ndarray, affine: np.ndarray = ODD_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(path))
    return path


def planted_volume(shape=(10, 24, 20)) -> np.ndarray:
    hu = np.full(shape, -1000, np.int16)
    hu[2:8, 4:16, 3:15] = 100  # liver
    hu[4:6, 8:11, 6:9] = 200  # tumor
    return hu


def test_tta_mirrors_only_as_the_model_was_trained(tmp_path):
    from keras_livseg.inference.volume import tta_mirrorings

    case = load_case(CaseFiles("t", write_volume(tmp_path / "v.nii.gz", planted_volume()), None))
    plain = predict_volume(fake_model(), case, batch_size=4, postprocess=None, progress=False)
    both = fake_model()
    both.tta_flips = ("horizontal", "vertical")
    assert tta_mirrorings(both) == ((2,), (1,), (1, 2))  # columns, rows, and both at once
    tta = predict_volume(both, case, batch_size=4, tta_flip=True, postprocess=None, progress=False)
    np.testing.assert_array_equal(plain.labels, tta.labels)  # mirrored back onto the same voxels
    assert tta.forward_calls == 4 * plain.forward_calls
    rows_only = fake_model()
    rows_only.tta_flips = ("vertical",)
    assert tta_mirrorings(rows_only) == ((1,),)
    # Trained without flips (the recipes' default): mirrored, the liver is on the wrong side; refused.
    unflipped = fake_model()
    unflipped.tta_flips = ()
    with pytest.raises(ValueError, match=r"trained without flips.*leave out --tta"):
        predict_volume(unflipped, case, tta_flip=True, progress=False)
    assert predict_volume(unflipped, case, batch_size=4, postprocess=None, progress=False).forward_calls == plain.forward_calls


def test_a_model_without_a_flip_record_is_warned_about_once(caplog):
    from keras_livseg.inference import volume

    unknown = fake_model()
    unknown.tta_flips, unknown.name = None, "no-record-model"
    volume._WARNED_NO_FLIPS.discard(unknown.name)
    with caplog.at_level("WARNING", logger=volume.logger.name):
        for _ in range(3):  # three volumes of one predict run
            assert volume.tta_mirrorings(unknown) == ((2,),)  # left-right, as before the record existed
    warnings = [r for r in caplog.records if "does not record the flips" in r.getMessage()]
    assert len(warnings) == 1 and "no-record-model" in warnings[0].getMessage()


def test_an_ensemble_mirrors_only_where_every_member_was_trained_to(tmp_path):
    members = [fake_model(), fake_model(), fake_model()]
    members[0].tta_flips, members[1].tta_flips, members[2].tta_flips = ("horizontal", "vertical"), ("horizontal",), None
    assert SegmentationModel.ensemble(members).tta_flips == ("horizontal",)
    members[1].tta_flips = ()
    assert SegmentationModel.ensemble(members).tta_flips == ()
    assert SegmentationModel.ensemble([fake_model(), fake_model()]).tta_flips is None  # no record: unknown


def test_stored_tta_flips_reads_the_run_record(tmp_path):
    from keras_livseg.inference.predictor import stored_tta_flips

    checkpoint = tmp_path / "checkpoints" / "best.keras"
    assert stored_tta_flips(checkpoint) is None
    prep = Preprocessing(image_size=(32, 32))
    write_preprocessing_json(tmp_path / "preprocessing.json", prep)
    assert stored_tta_flips(checkpoint) is None
    write_preprocessing_json(tmp_path / "preprocessing.json", prep, tta_flips=["vertical", "horizontal"])
    assert stored_tta_flips(checkpoint) == ("horizontal", "vertical")
    write_preprocessing_json(tmp_path / "preprocessing.json", prep, tta_flips=["sideways"])
    with pytest.raises(ValueError, match=r"preprocessing.json: tta_flips must be a list of horizontal, vertical"):
        stored_tta_flips(checkpoint)


def test_prediction_lands_on_the_input_grid_with_a_permuted_flipped_affine(tmp_path):
    hu = planted_volume()
    source = write_volume(tmp_path / "in" / "volume-7.nii.gz", hu)
    written = predict_paths(fake_model(), [source], tmp_path / "out", postprocess=None, progress=False)
    assert [w.output.name for w in written] == ["segmentation-7.nii.gz"]
    image = nib.load(str(written[0].output))
    assert image.shape == hu.shape
    np.testing.assert_allclose(image.affine, ODD_AFFINE)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), threshold_labels(hu))


def test_flip_tta_keeps_voxel_positions_and_doubles_forward_calls(tmp_path):
    hu = planted_volume()
    case = load_case(CaseFiles("7", write_volume(tmp_path / "v.nii.gz", hu), None))
    calls = Calls()
    plain = predict_volume(fake_model(calls), case, batch_size=4, postprocess=None, progress=False)
    tta = predict_volume(fake_model(calls), case, batch_size=4, tta_flip=True, postprocess=None, progress=False)
    np.testing.assert_array_equal(plain.labels, tta.labels)
    slices = case.image.shape[2]
    assert plain.forward_calls == -(-slices // 4) and tta.forward_calls == 2 * plain.forward_calls


def test_volume_is_streamed_in_bounded_batches(tmp_path):
    hu = np.full((12, 16, 11), -1000, np.int16)
    hu[3:9, 4:12, 2:9] = 100
    # Identity affine: canonical slices are the last axis, so 11 slices in batches of 4.
    case = load_case(CaseFiles("a", write_volume(tmp_path / "a.nii.gz", hu, np.eye(4)), None))
    calls = Calls()
    result = predict_volume(fake_model(calls), case, batch_size=4, postprocess=None, progress=False)
    assert calls.batch_sizes == [4, 4, 3]
    assert result.probabilities is None and result.labels.dtype == np.uint8


def test_context_model_gets_neighbouring_slices(tmp_path):
    hu = planted_volume()
    case = load_case(CaseFiles("c", write_volume(tmp_path / "c.nii.gz", hu), None))
    seen = []
    model = fake_model(context=3)
    inner = model._forward

    def spy(raw, statistics, spacing):
        seen.append(raw.shape)
        return inner(raw, statistics, spacing)

    model._forward = spy
    result = predict_volume(model, case, batch_size=5, postprocess=None, progress=False)
    assert all(shape[-1] == 3 for shape in seen)
    np.testing.assert_array_equal(result.labels, threshold_labels(case.image))


def test_probability_maps_are_uint8_4d_on_the_input_grid(tmp_path):
    hu = planted_volume()
    source = write_volume(tmp_path / "scan.nii.gz", hu)
    written = predict_paths(
        fake_model(), [source], tmp_path / "out", postprocess=None, save_probabilities=True, progress=False
    )
    assert written[0].output.name == "scan.nii.gz"
    image = nib.load(str(written[0].probabilities))
    assert image.shape == hu.shape + (3,)
    np.testing.assert_allclose(image.affine, ODD_AFFINE)
    data = np.asarray(image.dataobj)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(np.argmax(data, axis=-1), threshold_labels(hu))
    assert set(np.unique(data.sum(axis=-1)).tolist()) == {255}


def test_postprocessing_removes_an_island_and_tumor_outside_the_liver():
    labels = np.zeros((30, 30, 10), np.uint8)
    labels[5:20, 5:20, 2:8] = 1  # liver
    labels[10:13, 10:13, 4:6] = 2  # lesion inside: 18 voxels = 18 mm³
    labels[25:28, 25:28, 3:6] = 1  # false-positive island
    labels[19:25, 8:11, 4] = 2  # lesion bulging out of the liver: touches it, kept whole
    labels[22:24, 15:17, 4] = 2  # detached, 3 mm from the liver (row 19): within the margin
    labels[27:29, 15:17, 8] = 2  # detached, 8 mm away: removed
    options = PostProcessing(largest_liver_component=False, liver_margin_mm=3.0, min_lesion_mm3=0.0)
    cleaned = postprocess_labels(labels.copy(), (1.0, 1.0, 1.0), options)
    assert (cleaned[10:13, 10:13, 4:6] == 2).all()  # lesion kept
    assert (cleaned[19:25, 8:11, 4] == 2).all()
    assert (cleaned[22:24, 15:17, 4] == 2).all()
    assert not cleaned[27:29, 15:17, 8].any()
    assert (cleaned[5:20, 5:20, 2:8] >= 1).all()
    cleaned = postprocess_labels(labels.copy(), (1.0, 1.0, 1.0), PostProcessing(liver_margin_mm=3.0, min_lesion_mm3=0.0))
    assert not cleaned[25:28, 25:28, 3:6].any()  # island gone with the largest component


@pytest.mark.parametrize("kept_bytes", [256 * 2**20, 0])  # slab labels kept between passes, or labelled again
@pytest.mark.parametrize("slab_voxels", [8 * 2**20, 400])  # one slab; a plane or two a slab, as over a long scan
def test_largest_liver_component_matches_one_labelling_of_the_whole_scan(monkeypatch, slab_voxels, kept_bytes):
    """Runs of occupied planes labelled apart (islands at a long scan's ends cost their own boxes), a
    slab at a time: the same voxels kept as labelling the whole volume at once, ties included, in either
    memory layout (the stored order: predict keeps labels slice-major)."""
    from scipy import ndimage

    from keras_livseg.inference import postprocess

    monkeypatch.setattr(postprocess, "_SLAB_VOXELS", slab_voxels)
    monkeypatch.setattr(postprocess, "_KEPT_LABEL_BYTES", kept_bytes)

    def reference(labels):
        components, count = ndimage.label(labels >= 1)
        out = labels.copy()
        if count:
            sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
            out[(components != 1 + int(np.argmax(sizes))) & (labels >= 1)] = 0
        return out

    options = PostProcessing(tumor_in_liver=False, min_lesion_mm3=0.0)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        labels = np.zeros((14, 12, 30), np.uint8)
        for _ in range(int(rng.integers(0, 7))):  # blocks, some touching across planes, some of equal size
            r, c, k = rng.integers(0, 12), rng.integers(0, 10), rng.integers(0, 28)
            labels[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4), k:k + rng.integers(1, 4)] = rng.integers(1, 3)
        expected = reference(labels)
        got = labels.copy()
        postprocess_labels(got, (1.0, 1.0, 1.0), options)
        np.testing.assert_array_equal(got, expected, err_msg=f"seed {seed}")
        slice_major = np.ascontiguousarray(labels.transpose(2, 0, 1)).transpose(1, 2, 0)
        postprocess_labels(slice_major, (1.0, 1.0, 1.0), options)
        # ties go to the first component in memory order, as labelling the layout as stored decides
        expected = reference(labels.transpose(2, 0, 1)).transpose(1, 2, 0)
        np.testing.assert_array_equal(slice_major, expected, err_msg=f"seed {seed}, slice-major")
    # islands at both ends of a long scan, the liver in the middle: only the liver is left
    labels = np.zeros((16, 16, 200), np.uint8)
    labels[3:12, 3:12, 90:110] = 1
    labels[5:7, 5:7, 95:98] = 2
    labels[0, 0, 0], labels[15, 15, 199], labels[14, 2, 100] = 1, 2, 1
    postprocess_labels(labels, (1.0, 1.0, 1.0), PostProcessing(min_lesion_mm3=0.0))
    assert int((labels >= 1).sum()) == 9 * 9 * 20 and int((labels == 2).sum()) == 12


def test_postprocessing_minimum_lesion_size_in_mm3():
    labels = np.zeros((20, 20, 6), np.uint8)
    labels[2:18, 2:18, 1:5] = 1
    labels[5, 5, 2] = 2  # 1 voxel = 2 mm³
    labels[10:12, 10:12, 2:4] = 2  # 8 voxels = 16 mm³
    cleaned = postprocess_labels(labels.copy(), (1.0, 1.0, 2.0), PostProcessing(min_lesion_mm3=10.0))
    assert cleaned[5, 5, 2] == 1 and (cleaned[10:12, 10:12, 2:4] == 2).all()
    untouched = postprocess_labels(labels.copy(), (1.0, 1.0, 2.0), PostProcessing.disabled())
    np.testing.assert_array_equal(untouched, labels)


def test_postprocessing_is_applied_by_predict_volume(tmp_path):
    hu = planted_volume()
    hu[0, 20:23, 16:19] = 100  # a liver-like island far from the liver
    case = load_case(CaseFiles("p", write_volume(tmp_path / "p.nii.gz", hu), None))
    raw = predict_volume(fake_model(), case, postprocess=None, progress=False)
    clean = predict_volume(fake_model(), case, progress=False)
    from scipy import ndimage

    assert ndimage.label(raw.labels >= 1)[1] == 2
    assert ndimage.label(clean.labels >= 1)[1] == 1


def test_output_names_follow_the_input():
    assert output_names(CaseFiles("12", Path("volume-12.nii"), None))[0] == "segmentation-12.nii"
    assert output_names(CaseFiles("liver_3", Path("liver_3.nii.gz"), None))[0] == "liver_3.nii.gz"


def test_non_hu_intensities_warn_with_the_file_name(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert not check_hounsfield(np.array([0, 17, 255]), "photo.nii.gz")
        assert check_hounsfield(np.array([-1024, 40, 1200]), "ct.nii.gz")
    assert len(caplog.records) == 1 and "photo.nii.gz" in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------------------------
# Real models on disk
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_checkpoint(tmp_path_factory) -> Path:
    from keras_livseg.models import build_model

    run = tmp_path_factory.mktemp("run")
    model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
    (run / "checkpoints").mkdir()
    path = run / "checkpoints" / "best.keras"
    model.save(str(path))
    write_preprocessing_json(
        run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=50.0, std=80.0)
    )
    return path


def test_keras_checkpoint_predicts_on_the_real_scan(keras_checkpoint, real_data_dir, tmp_path):
    model = SegmentationModel.load(keras_checkpoint)
    assert model.kind == "keras" and model.name.startswith("run")
    source = real_data_dir / "dcmqi-ct-3slice" / "volume-3slice.nii.gz"
    written = predict_paths(model, [real_data_dir / "dcmqi-ct-3slice"], tmp_path, batch_size=2, progress=False)
    assert [w.output.name for w in written] == ["segmentation-3slice.nii.gz"]
    reference = nib.load(str(source))
    output = nib.load(str(written[0].output))
    assert output.shape == reference.shape == (512, 512, 3)
    np.testing.assert_allclose(output.affine, reference.affine)
    assert set(np.unique(np.asarray(output.dataobj)).tolist()) <= {0, 1, 2}
    probabilities = model.predict_slices(np.full((2, 40, 48), -1000.0))
    assert probabilities.shape == (2, 40, 48, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)


def test_keras_checkpoint_on_the_totalsegmentator_crop(keras_checkpoint, real_data_dir, tmp_path):
    source = real_data_dir / "totalseg-example-ct" / "example_ct_sm.nii.gz"
    written = predict_paths(SegmentationModel.load(keras_checkpoint), [source], tmp_path, progress=False)
    reference, output = nib.load(str(source)), nib.load(str(written[0].output))
    assert written[0].output.name == "example_ct_sm.nii.gz"
    assert output.shape == reference.shape
    np.testing.assert_allclose(output.affine, reference.affine)


def test_checkpoint_without_preprocessing_json_is_refused(tmp_path, keras_checkpoint):
    lonely = tmp_path / "alone" / "model.keras"
    lonely.parent.mkdir()
    lonely.write_bytes(keras_checkpoint.read_bytes())
    with pytest.raises(ValueError, match="preprocessing.json"):
        SegmentationModel.load(lonely)


@pytest.mark.slow
def test_saved_model_base_folder_uses_the_highest_version(tmp_path):
    import tensorflow as tf

    class Threshold(tf.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = tf.Variable(offset)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="ct_slices")])
        def serve(self, ct_slices):
            labels = tf.cast(ct_slices > 50.0 + self.offset, tf.int32) + tf.cast(ct_slices > 150.0, tf.int32)
            return {"probabilities": tf.one_hot(labels, 3), "mask": tf.cast(labels, tf.uint8)}

    base = tmp_path / "saved_models" / "fake"
    for version, offset in ((1, 1000.0), (2, 0.0)):
        module = Threshold(offset)
        tf.saved_model.save(module, str(base / str(version)), signatures={"serving_default": module.serve})
    model = SegmentationModel.load(base)
    assert model.kind == "saved_model" and model.path.name == "2" and model.name == "fake"
    hu = planted_volume()
    written = predict_paths(model, [write_volume(tmp_path / "volume-1.nii", hu)], tmp_path / "out",
                            postprocess=None, progress=False)
    np.testing.assert_array_equal(np.asarray(nib.load(str(written[0].output)).dataobj), threshold_labels(hu))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    code = predict_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_model_neither_keras_nor_saved_model(tmp_path, capsys):
    bogus = tmp_path / "model.h5"
    bogus.write_text("not a model")
    volume = write_volume(tmp_path / "v.nii.gz", planted_volume())
    code, _, err = run_cli(["--model", bogus, volume, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "predict: error:" in err and "model.h5" in err
    assert "Traceback" not in err


def test_cli_refuses_a_volume_without_spacing_before_loading_the_model(tmp_path, capsys, strip_spacing):
    model = tmp_path / "model.keras"
    model.write_text("never read: the headers are checked first")
    volume = strip_spacing(write_volume(tmp_path / "data" / "volume-1.nii.gz", planted_volume()))
    code, _, err = run_cli(["--model", model, tmp_path / "data", "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("predict: error:") and f"{volume} has voxel spacing (0.0, 0.0, 0.0) mm" in err
    assert not (tmp_path / "out").exists()


def test_cli_folder_without_cases(tmp_path, capsys, keras_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["--model", keras_checkpoint, empty, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "no cases found" in err and err.count("\n") == 1


def _damaged_second_case(folder: Path) -> Path:
    """A dataset whose volume-1 is fine and whose volume-2.nii header claims twice its bytes."""
    write_volume(folder / "volume-1.nii.gz", planted_volume())
    damaged = write_volume(folder / "volume-2.nii", planted_volume())
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    return damaged


def test_a_damaged_header_stops_predict_before_the_first_case(tmp_path):
    damaged = _damaged_second_case(tmp_path / "data")
    calls = Calls()
    with pytest.raises(DataError, match="volume-2.nii holds .* bytes but its header needs"):
        predict_paths(fake_model(calls), [tmp_path / "data"], tmp_path / "out", progress=False)
    assert calls.batch_sizes == [] and not (tmp_path / "out").exists()  # volume-1 was not predicted either
    assert damaged.is_file()


@pytest.mark.slow
def test_cli_refuses_a_damaged_header_before_loading_tensorflow(tmp_path, keras_checkpoint):
    """One line naming the file, in about a second: TensorFlow and the model are never loaded."""
    import subprocess
    import sys

    _damaged_second_case(tmp_path / "data")
    code = ("import sys; from keras_livseg import predict; code = predict.main(sys.argv[1:]); "
            "print(code, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, "--model", str(keras_checkpoint), str(tmp_path / "data"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("predict: error: ") and "volume-2.nii" in lines[-1] and "re-export" in lines[-1]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_refuses_a_damaged_dicom_series_before_loading_tensorflow(tmp_path, keras_checkpoint, real_data_dir):
    import shutil
    import subprocess
    import sys

    series = tmp_path / "series"
    shutil.copytree(real_data_dir / "dcmqi-ct-3slice" / "dicom", series)
    damaged = series / "03.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    code = ("import sys; from keras_livseg import predict; code = predict.main(sys.argv[1:]); "
            "print(code, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, "--model", str(keras_checkpoint), str(series),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("predict: error: ") and "03.dcm: its pixel data is cut short (100 bytes missing)" in last
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mistake, message", [
    (lambda folder, model: ["--model", folder / "missing.keras", folder, "--out", folder / "out"],
     "model .*missing.keras does not exist"),  # the model first, before any input is read
    (lambda folder, model: ["--model", model, folder, "--out", folder / "out", "--format", "dicom-seg"],
     "--format dicom-seg needs DICOM series inputs"),
    (lambda folder, model: ["--model", model, folder, "--out", folder], "would overwrite the input"),
])
def test_cli_refuses_a_wrong_request_before_loading_tensorflow(tmp_path, keras_checkpoint, mistake, message):
    import subprocess
    import sys

    _damaged_second_case(tmp_path)
    (tmp_path / "volume-2.nii").unlink()
    write_volume(tmp_path / "segmentation-1.nii.gz", planted_volume())  # what --out at the input folder would overwrite
    argv = [str(a) for a in mistake(tmp_path, keras_checkpoint)]
    code = "import sys; from keras_livseg import predict; code = predict.main(sys.argv[1:]); print(code, 'tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert re.search(message, done.stderr.strip().splitlines()[-1]), done.stderr


def test_cli_predicts_with_a_checkpoint(tmp_path, capsys, keras_checkpoint):
    write_volume(tmp_path / "data" / "volume-4.nii.gz", planted_volume())
    code, out, err = run_cli(
        ["--model", keras_checkpoint, tmp_path / "data", "--out", tmp_path / "out", "--tta",
         "--batch-size", "3", "--no-progress", "--label-map", "1:6,2:7"],
        capsys,
    )
    assert code == 0, err
    written = tmp_path / "out" / "segmentation-4.nii.gz"
    assert written.is_file() and str(written) in out
    values = set(np.unique(np.asarray(nib.load(str(written)).dataobj)).tolist())
    assert values <= {0, 6, 7}


def test_cli_refuses_tta_for_a_model_trained_without_flips(tmp_path, capsys, keras_checkpoint):
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(keras_checkpoint, run / "checkpoints" / "best.keras")
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=50.0, std=80.0),
                             tta_flips=[])
    write_volume(tmp_path / "data" / "volume-4.nii.gz", planted_volume())
    code, out, err = run_cli(["--model", run / "checkpoints" / "best.keras", tmp_path / "data", "--out",
                              tmp_path / "out", "--tta", "--no-progress"], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert "trained without flips" in last and "leave out --tta" in last and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.nii*"))


def test_postprocessing_keeps_the_centre_of_a_large_lesion_inside_the_liver():
    from keras_livseg.inference import PostProcessing, postprocess_labels

    labels = np.zeros((60, 60, 30), np.uint8)
    labels[5:55, 5:55, 2:28] = 1
    labels[10:50, 10:50, 5:25] = 2  # 40 mm lesion: its centre lies 20 mm from any parenchyma
    labels[58, 58, 29] = 2  # a detached speck far from the liver
    expected = labels.copy()
    expected[58, 58, 29] = 0
    out = postprocess_labels(labels, (1.0, 1.0, 1.0), PostProcessing(largest_liver_component=False, min_lesion_mm3=0))
    np.testing.assert_array_equal(out, expected)


def test_short_last_batch_is_padded_so_the_network_sees_one_shape(keras_checkpoint, monkeypatch):
    import keras

    shapes = []
    original = keras.Model.predict_on_batch

    def recording(self, x):
        shapes.append(tuple(np.shape(x)))
        return original(self, x)

    monkeypatch.setattr(keras.Model, "predict_on_batch", recording)
    model = SegmentationModel.load(keras_checkpoint)
    hu = np.random.default_rng(0).normal(40, 300, (3, 40, 48)).astype("float32")
    full = model.predict_slices(np.concatenate([hu, hu, hu[:2]]))  # a batch of 8
    short = model.predict_slices(hu)  # then 3: padded to 8, cut back to 3
    assert shapes == [(8, 32, 32, 1), (8, 32, 32, 1)]
    assert short.shape == (3, 40, 48, 3)
    np.testing.assert_allclose(short, full[:3], atol=1e-5)


def threshold_checkpoint(folder: Path, prep: Preprocessing) -> Path:
    """A real ``.keras`` model with fixed weights: liver where the standardized CT is above 0."""
    import keras

    inputs = keras.Input((*prep.image_size, prep.context), name="ct_slices")
    head = keras.layers.Conv2D(3, 1, activation="softmax", name="probabilities")
    outputs = head(inputs)
    head.set_weights([np.array([[[[0.0, 20.0, -20.0]]]], np.float32), np.array([0.0, 0.0, -100.0], np.float32)])
    (folder / "checkpoints").mkdir(parents=True)
    keras.Model(inputs, outputs).save(folder / "checkpoints" / "best.keras")
    write_preprocessing_json(folder / "preprocessing.json", prep)
    return folder / "checkpoints" / "best.keras"


def test_spacing_model_writes_labels_on_the_input_voxels(tmp_path):
    """A model on a 2 mm grid predicts a 0.7 mm scan on an odd affine: same shape, affine, voxels."""
    prep = Preprocessing(image_size=(64, 64), mean=0.0, std=50.0, spacing_mm=2.0)  # 128 mm field
    model = SegmentationModel.load(threshold_checkpoint(tmp_path / "run", prep))
    shape = (4, 200, 220)  # ODD_AFFINE's axes: slices, then in-plane 0.8 x 0.9 mm (160 x 198 mm)
    hu = np.full(shape, -1000, np.int16)
    hu[:, 60:140, 70:150] = 100  # a 'liver' inside the 128 mm field around the centre
    hu[:, :6, :6] = 100  # a corner 16+ mm outside the field: the model never sees it
    path = write_volume(tmp_path / "in" / "volume-5.nii.gz", hu)
    written = predict_paths(model, [path], tmp_path / "out", postprocess=None, progress=False)
    output = nib.load(str(written[0].output))
    assert output.shape == shape
    np.testing.assert_allclose(output.affine, ODD_AFFINE)
    labels = np.asarray(output.dataobj)
    truth = (hu > 0).astype(np.uint8)
    truth[:, :6, :6] = 0
    inside = labels[:, 60:140, 70:150] == 1
    assert inside.mean() > 0.95  # bilinear 2 mm → 0.8 mm smooths only the rim
    assert np.mean(labels == truth) > 0.99
    assert labels[:, :6, :6].max() == 0


def test_spacing_model_on_the_real_ircad_scan_keeps_its_grid(real_data_dir, tmp_path):
    """A 3 mm model on IRCAD patient 7 (0.78 mm, 512x512x151): the input's shape and affine, and
    the bright contrast-enhanced voxels the threshold model marks lie where the CT is bright."""
    source = real_data_dir / "ircadb" / "volume-7.nii.gz"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    prep = Preprocessing(image_size=(128, 128), mean=100.0, std=50.0, spacing_mm=3.0)
    model = SegmentationModel.load(threshold_checkpoint(tmp_path / "run", prep))
    written = predict_paths(model, [source], tmp_path / "out", postprocess=None, progress=False)
    reference, output = nib.load(str(source)), nib.load(str(written[0].output))
    assert output.shape == reference.shape
    np.testing.assert_allclose(output.affine, reference.affine)
    labels = np.asarray(output.dataobj)
    hu = np.asarray(reference.dataobj)[:, :, 75]
    marked = labels[:, :, 75] == 1
    assert marked.any()
    # Marked pixels are contrast-enhanced tissue (> 100 HU = the model's threshold); a 3 mm grid
    # blurs edges, so compare medians rather than every pixel.
    assert np.median(hu[marked]) > 100 and np.median(hu[~marked]) < 100


def test_a_dicom_series_predicts_like_its_nifti_conversion(keras_checkpoint, real_data_dir, tmp_path):
    """The same slices as DICOM and as NIfTI: the same labels, voxel for voxel in canonical space."""
    pytest.importorskip("pydicom")
    from keras_livseg.data.volumes import to_canonical

    model = SegmentationModel.load(keras_checkpoint)
    folder = real_data_dir / "dcmqi-ct-3slice"
    (from_dicom,) = predict_paths(model, [folder / "dicom"], tmp_path / "dicom", batch_size=2, progress=False)
    (from_nifti,) = predict_paths(model, [folder / "volume-3slice.nii.gz"], tmp_path / "nifti", batch_size=2, progress=False)
    assert from_dicom.output.name == "dicom.nii.gz"
    dicom_nii, nifti_nii = nib.load(str(from_dicom.output)), nib.load(str(from_nifti.output))
    assert dicom_nii.shape == (512, 512, 3)
    np.testing.assert_allclose(nib.affines.voxel_sizes(dicom_nii.affine), (0.810547, 0.810547, 1.0), atol=1e-5)
    np.testing.assert_array_equal(to_canonical(np.asarray(dicom_nii.dataobj), dicom_nii.affine),
                                  to_canonical(np.asarray(nifti_nii.dataobj), nifti_nii.affine))


def test_the_cli_checks_a_dicom_series_once_before_reading_it(keras_checkpoint, real_data_dir, tmp_path, capsys,
                                                             monkeypatch):
    """Up front, then by read_series itself: predict_paths does not check the series a third time."""
    from keras_livseg.data import dicom

    checked = []
    real_check = dicom.check_series
    monkeypatch.setattr(dicom, "check_series", lambda *args, **kwargs: checked.append(args[0]) or real_check(*args, **kwargs))
    series = real_data_dir / "dcmqi-ct-3slice" / "dicom"
    code, _, err = run_cli(["--model", keras_checkpoint, series, "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 0, err
    assert checked == [series, series]


def test_predict_paths_without_its_check_finds_a_damaged_header_when_it_reaches_that_case(tmp_path):
    _damaged_second_case(tmp_path / "data")
    calls = Calls()
    with pytest.raises(DataError, match="volume-2.nii holds .* bytes but its header needs"):
        predict_paths(fake_model(calls), [tmp_path / "data"], tmp_path / "out", progress=False, check_inputs=False)
    assert (tmp_path / "out" / "segmentation-1.nii.gz").is_file()  # volume-1 was predicted first


def test_cli_writes_a_dicom_seg_for_a_dicom_series(keras_checkpoint, real_data_dir, tmp_path, capsys):
    hd = pytest.importorskip("highdicom")
    from keras_livseg.data.dicom import _sorted_series_datasets

    series = real_data_dir / "dcmqi-ct-3slice" / "dicom"
    code, out, err = run_cli(["--model", keras_checkpoint, series, "--out", tmp_path / "seg", "--format", "dicom-seg",
                              "--no-progress"], capsys)
    assert code == 0, err
    written = tmp_path / "seg" / "dicom_seg.dcm"
    assert str(written) in out
    seg = hd.seg.segread(str(written))
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Liver", "Liver tumour"]
    # Its frames are the labels predict writes as NIfTI for the same series.
    (nifti,) = predict_paths(SegmentationModel.load(keras_checkpoint), [series], tmp_path / "nifti", progress=False)
    labels = np.asarray(nib.load(str(nifti.output)).dataobj)
    uids = [d.SOPInstanceUID for d in _sorted_series_datasets(series)]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(frames[..., 0].transpose(1, 2, 0), labels >= 1)
    np.testing.assert_array_equal(frames[..., 1].transpose(1, 2, 0), labels == 2)
    # A NIfTI input cannot become a DICOM-SEG: one line, nothing written.
    code, _, err = run_cli(["--model", keras_checkpoint, real_data_dir / "dcmqi-ct-3slice" / "volume-3slice.nii.gz",
                            "--out", tmp_path / "bad", "--format", "dicom-seg"], capsys)
    assert code == 2 and "needs DICOM series inputs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_lesions_away_from_the_liver_match_a_whole_volume_distance_transform(monkeypatch):
    """The per-lesion boxed distance gives the decisions of one distance transform over the scan,
    and the minimum size then applies to the lesions left (labelled once for both rules)."""
    from scipy import ndimage

    from keras_livseg.inference import postprocess
    from keras_livseg.inference.postprocess import PostProcessing, postprocess_labels

    monkeypatch.setattr(postprocess, "_SLAB_VOXELS", 300)  # many slabs, as over a whole scan

    def reference(view, spacing, margin, min_voxels):
        parenchyma = view == 1
        lesions, count = ndimage.label(view == 2)
        distance = ndimage.distance_transform_edt(~parenchyma, sampling=spacing)
        touching = ndimage.binary_dilation(parenchyma)  # a lesion touching parenchyma is kept, as before
        out = view.copy()
        for index in range(1, count + 1):
            if not touching[lesions == index].any() and distance[lesions == index].min() > margin:
                out[lesions == index] = 0
            elif (lesions == index).sum() < min_voxels:
                out[lesions == index] = 1
        return out

    for seed in range(6):
        rng = np.random.default_rng(seed)
        view = np.zeros((40, 36, 12), np.uint8)
        view[8:26, 6:24, 2:9] = 1
        for _ in range(12):  # lesions in, beside and away from the liver
            r, c, k = rng.integers(0, 38), rng.integers(0, 34), rng.integers(0, 11)
            view[r:r + rng.integers(1, 3), c:c + rng.integers(1, 3), k:k + 1] = 2
        spacing, margin = (0.8, 0.7, 2.5), float(rng.uniform(1.0, 6.0))
        min_voxels = 0 if seed < 3 else 3
        expected = reference(view, spacing, margin, min_voxels)
        got = view.copy()
        options = PostProcessing(largest_liver_component=False, liver_margin_mm=margin, min_lesion_mm3=0.0,
                                 min_lesion_voxels=min_voxels)
        postprocess_labels(got, spacing, options)
        np.testing.assert_array_equal(got, expected)
        # predict's slice-major layout (the axes permuted in memory): the same decisions
        slice_major = np.ascontiguousarray(view.transpose(2, 0, 1)).transpose(1, 2, 0)
        postprocess_labels(slice_major, spacing, options)
        np.testing.assert_array_equal(slice_major, expected)
        removed = (reference(view, spacing, margin, 0) == 0) & (view == 2)
        assert removed.any() or seed > 3  # the cases remove something by distance
        assert min_voxels == 0 or ((expected == 1) & (view == 2)).any()  # and the size rule turns some to liver


def test_whole_volume_labels_on_the_model_grid_match_the_slice_by_slice_path(tmp_path):
    """Resampling each slice once and resizing only around the foreground: the same labels."""
    import keras

    # A 1x1 convolution that thresholds the centre slice (standardized HU / 100): liver
    # above 50 HU, tumour above 150 HU, so the labels follow the planted anatomy.
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(inputs))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, 1] = [0.0, 4.0, 8.0]
    model.layers[-1].set_weights([kernel, np.array([0.0, -2.0, -8.0], np.float32)])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    model.save(str(run / "checkpoints" / "best.keras"))
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(
        image_size=(32, 32), context=3, mean=0.0, std=100.0, spacing_mm=2.0))
    grid_model = SegmentationModel.load(run / "checkpoints" / "best.keras")
    assert grid_model.labels_on_grid is not None
    by_slice = SegmentationModel(grid_model.path, "keras", grid_model.preprocessing, grid_model._forward, 3, "by-slice")
    hu = np.full((70, 56, 11), -1000, np.int16)
    hu[10:40, 12:44, 2:9] = 100  # liver
    hu[18:26, 20:28, 4:7] = 200  # tumour
    source = write_volume(tmp_path / "volume-1.nii.gz", hu, np.diag([0.9, 0.8, 2.0, 1.0]))
    case = load_case(CaseFiles("1", source, None), with_labels=False)
    fast = predict_volume(grid_model, case, batch_size=4, postprocess=None, progress=False)
    slow = predict_volume(by_slice, case, batch_size=4, postprocess=None, progress=False)
    np.testing.assert_array_equal(fast.labels, slow.labels)
    assert set(np.unique(fast.labels)) == {0, 1, 2} and fast.forward_calls == slow.forward_calls == 3
    assert (fast.labels[:, :, 4:7] == 2).sum() > 0 and (fast.labels[:, :, :2] == 0).all()


def constant_model(probabilities, context: int, name: str, normalization: str = "none",
                   window=(-200.0, 250.0), seen: list | None = None) -> SegmentationModel:
    """A model answering fixed class probabilities everywhere; it records the channels it was given."""

    def forward(raw, statistics, spacing=None):
        if seen is not None:
            seen.append((name, raw.shape[-1], raw[0, 0, 0].tolist(), statistics))
        return np.broadcast_to(np.asarray(probabilities, np.float32), raw.shape[:3] + (3,)).copy()

    prep = Preprocessing(image_size=(32, 32), context=context, normalization=normalization, window=window)
    return SegmentationModel(Path(f"{name}.keras"), "keras", prep, forward, context, name)


def test_an_ensemble_averages_its_members_each_on_its_own_centre_channels():
    seen: list = []
    members = [constant_model([0.7, 0.2, 0.1], 1, "a", seen=seen), constant_model([0.1, 0.3, 0.6], 3, "b", seen=seen),
               constant_model([0.4, 0.4, 0.2], 5, "c", seen=seen)]
    ensemble = SegmentationModel.ensemble(members)
    assert ensemble.kind == "ensemble" and ensemble.context == 5 and ensemble.members == members
    assert ensemble.name == "a+b+c" and ensemble.labels_on_grid is None
    raw = np.broadcast_to(np.arange(5, dtype=np.float32), (2, 4, 6, 5))  # channel k holds the value k
    probabilities = ensemble.predict_slices(raw)
    np.testing.assert_allclose(probabilities, np.broadcast_to([0.4, 0.3, 0.3], (2, 4, 6, 3)), atol=1e-6)
    assert [(name, k, centre) for name, k, centre, _ in seen] == [("a", 1, [2.0]), ("b", 3, [1.0, 2.0, 3.0]),
                                                                 ("c", 5, [0.0, 1.0, 2.0, 3.0, 4.0])]
    assert SegmentationModel.ensemble(members[:1]) is members[0]
    with pytest.raises(ValueError, match="at least one"):
        SegmentationModel.ensemble([])


def test_an_ensemble_labels_a_volume_by_its_averaged_probabilities(tmp_path):
    """Two members that each call a different class most likely: the average decides, voxel by voxel."""
    liver_leaning = constant_model([0.3, 0.45, 0.25], 1, "liver")
    tumour_leaning = constant_model([0.35, 0.1, 0.55], 3, "tumour")
    case = load_case(CaseFiles("1", write_volume(tmp_path / "volume-1.nii.gz", planted_volume()), None), with_labels=False)
    ensemble = SegmentationModel.ensemble([liver_leaning, tumour_leaning])
    labels = predict_volume(ensemble, case, postprocess=None, progress=False).labels
    assert labels.shape == case.image.shape and (labels == 2).all()  # (0.325, 0.275, 0.4): tumour
    alone = predict_volume(liver_leaning, case, postprocess=None, progress=False).labels
    assert (alone == 1).all()


def test_an_ensemble_of_volume_normalized_models_gets_the_volume_statistics_once(tmp_path):
    seen: list = []
    members = [constant_model([1, 0, 0], 1, name, normalization="volume", seen=seen) for name in ("a", "b")]
    case = load_case(CaseFiles("1", write_volume(tmp_path / "volume-1.nii.gz", planted_volume()), None), with_labels=False)
    predict_volume(SegmentationModel.ensemble(members), case, postprocess=None, progress=False)
    statistics = {entry[3] for entry in seen}
    assert len(statistics) == 1 and None not in statistics  # both members, the same (mean, std)
    other_window = constant_model([1, 0, 0], 1, "c", normalization="volume", window=(-100.0, 200.0))
    with pytest.raises(ValueError, match="different HU windows"):
        SegmentationModel.ensemble([*members, other_window])


def test_cli_averages_models_given_twice(tmp_path, capsys, keras_checkpoint):
    """--model twice: one label map, the average of the two (here one checkpoint twice: its own labels)."""
    write_volume(tmp_path / "data" / "volume-4.nii.gz", planted_volume())
    single = run_cli(["--model", keras_checkpoint, tmp_path / "data", "--out", tmp_path / "one", "--no-progress"], capsys)
    double = run_cli(["--model", keras_checkpoint, "--model", keras_checkpoint, tmp_path / "data",
                      "--out", tmp_path / "two", "--no-progress"], capsys)
    assert single[0] == 0 and double[0] == 0, double[2]
    one = np.asarray(nib.load(str(tmp_path / "one" / "segmentation-4.nii.gz")).dataobj)
    two = np.asarray(nib.load(str(tmp_path / "two" / "segmentation-4.nii.gz")).dataobj)
    np.testing.assert_array_equal(one, two)


def test_labelling_numbers_components_as_scipy_does_in_any_memory_layout():
    """cc3d in place of ndimage.label: the same labels, numbered by first voxel in C order, for
    C-ordered, Fortran-ordered and strided (cropped) masks."""
    from scipy import ndimage

    from keras_livseg.inference.postprocess import _label

    for seed in range(6):
        mask = np.random.default_rng(seed).random((7, 9, 11)) < 0.45
        for layout in (mask, np.asfortranarray(mask), mask[1:6, ::2, 2:]):
            labels, count = _label(layout)
            expected, expected_count = ndimage.label(layout)
            assert count == expected_count and labels.dtype == np.int32
            np.testing.assert_array_equal(labels, expected)


def test_face_dilation_in_a_window_is_the_window_of_the_whole_dilation():
    """The lesion-touches-liver test dilates only around the lesions: the same voxels as
    ``ndimage.binary_dilation`` of the whole mask, at every window, borders included."""
    from scipy import ndimage

    from keras_livseg.inference.postprocess import _face_dilated

    rng = np.random.default_rng(0)
    for _ in range(200):
        shape = tuple(int(n) for n in rng.integers(1, 7, 3))
        mask = rng.random(shape) < rng.uniform(0.0, 0.5)
        window = []
        for n in shape:
            first = int(rng.integers(0, n))
            window.append(slice(first, int(rng.integers(first + 1, n + 1))))
        np.testing.assert_array_equal(_face_dilated(mask, tuple(window)), ndimage.binary_dilation(mask)[tuple(window)])


def test_components_found_a_slab_at_a_time_are_those_of_one_labelling(monkeypatch):
    """Slabs labelled apart and merged across their boundaries: ndimage.label's components of the
    whole mask, numbered in the same order (first voxel in memory), with the same sizes."""
    from scipy import ndimage

    from keras_livseg.inference import postprocess

    for seed, slab_voxels in enumerate([1, 100, 200, 10**6] * 4):  # slabs of 1, 2, 4 and 9 planes
        monkeypatch.setattr(postprocess, "_SLAB_VOXELS", slab_voxels)
        # labels kept from the first labelling, or every slab labelled again
        monkeypatch.setattr(postprocess, "_KEPT_LABEL_BYTES", 0 if seed % 2 else 10**6)
        rng = np.random.default_rng(seed)
        # many components winding across slabs; sparse masks with empty planes and slabs; one empty mask
        mask = rng.random((9, 6, 7)) < (0.0 if seed == 5 else rng.uniform(0.2, 0.7) if seed < 8 else 0.02)
        found = postprocess._find_components(lambda a, b: mask[a:b], mask.shape)
        expected, count = ndimage.label(mask)
        assert found.count == count and len(found.starts) == -(-9 // max(1, slab_voxels // 42))
        assert len(found.kept) == (0 if seed % 2 else len(found.starts))
        rebuilt = np.concatenate([found.slab_table(k, np.arange(1, count + 1), 0)[found.slab_labels(k)]
                                  for k in range(len(found.starts))])
        np.testing.assert_array_equal(rebuilt, expected, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(found.sizes, np.bincount(expected.ravel(), minlength=count + 1)[1:])


def test_postprocessing_memory_scales_with_a_slab_not_the_scan(monkeypatch):
    """No whole-scan temporary: with slabs of two planes, post-processing a scan four times as long
    allocates about as much (and the labels kept between passes no more than their budget), and every voxel gets what one slab would decide. The scan: a liver with
    lesions (some too small to keep), an island, and lesions beside the liver, near it and far from
    it; the rule on lesions away from parenchyma is traced without the largest-component step,
    which would remove them first."""
    import tracemalloc

    from keras_livseg.inference import postprocess

    def scan(planes):
        labels = np.zeros((planes, 96, 96), np.uint8)
        labels[8:planes - 8, 10:80, 10:80] = 1
        rng = np.random.default_rng(planes)
        for r, c, k in rng.integers(12, 76, (planes // 2, 3)):  # lesions in the liver
            r = 8 + r * (planes - 20) // 80
            labels[r:r + rng.integers(1, 5), c:c + rng.integers(1, 4), k:k + 3] = 2
        labels[planes - 4:planes - 1, 2:5, 2:5] = 1  # an island
        for r in range(10, planes - 10, 16):  # beside the liver (axis 1: 0.8 mm): 2.4 mm and 10.4 mm away
            labels[r:r + 2, 82:85, 30:33] = 2
            labels[r:r + 2, 92:95, 50:53] = 2
        labels[0:2, 0:2, 0:2] = 2  # far from everything
        return labels

    peaks = {}
    slab_label_bytes = 2 * 96 * 96 * 4  # int32
    for options in (PostProcessing(), PostProcessing(largest_liver_component=False)):
        for planes, kept in ((64, 0), (256, 0), (256, 5 * slab_label_bytes)):
            labels = scan(planes)
            monkeypatch.setattr(postprocess, "_SLAB_VOXELS", 8 * 2**20)
            expected = postprocess_labels(labels.copy(), (0.8, 0.8, 2.0), options)  # one slab: the whole volume
            monkeypatch.setattr(postprocess, "_SLAB_VOXELS", 2 * 96 * 96)
            monkeypatch.setattr(postprocess, "_KEPT_LABEL_BYTES", kept)  # none, or five slabs' labels kept
            got = labels.copy()
            tracemalloc.start()
            try:
                postprocess_labels(got, (0.8, 0.8, 2.0), options)
                peaks[options.largest_liver_component, planes, kept] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            np.testing.assert_array_equal(got, expected)
            assert got[1, 1, 1] == 0 and got[planes - 3, 3, 3] == (0 if options.largest_liver_component else 1)
            assert ((got == 1) & (labels == 2)).any()  # small lesions became liver
            near, away = got[10:12, 82:85, 30:33], got[10:12, 92:95, 50:53]
            assert (near == 2).all() == (not options.largest_liver_component) and (away == 0).all()
    for largest in (True, False):  # a byte a voxel would be one whole-scan mask
        assert peaks[largest, 256, 0] < 1.5 * peaks[largest, 64, 0] and peaks[largest, 256, 0] < 0.25 * labels.size, peaks
        # labels kept between passes: at most their budget more (for the liver, then the lesions)
        kept = peaks[largest, 256, 5 * slab_label_bytes] - peaks[largest, 256, 0]
        assert 0 < kept <= 5 * slab_label_bytes, peaks


def test_context_slices_lie_context_mm_apart_on_both_prediction_paths(tmp_path):
    """A 1.5 mm scan, a model trained with context_mm 4.5: neighbours 3 slices away, edges repeated."""
    hu = (np.arange(12, dtype=np.int16) * 10)[None, None, :] * np.ones((16, 16, 1), np.int16)  # slice k holds 10 k HU
    case = load_case(CaseFiles("z", write_volume(tmp_path / "z.nii.gz", hu, np.diag([-0.8, -0.8, 1.5, 1.0])), None))
    assert case.spacing[2] == pytest.approx(1.5)
    prep = Preprocessing(image_size=(16, 16), context=3, normalization="none", window=(-1000.0, 1000.0), context_mm=4.5)
    expected = [[case.image[0, 0, min(max(k + d, 0), 11)] for d in (-3, 0, 3)] for k in range(12)]

    stacks = []  # the slice-by-slice path: raw HU stacks

    def forward(raw, statistics, spacing=None):
        stacks.extend(raw[:, 0, 0, :].tolist())
        return np.eye(3, dtype=np.float32)[np.zeros(raw.shape[:3], np.uint8)]

    predict_volume(SegmentationModel(Path("f.keras"), "keras", prep, forward, 3, "f"), case, batch_size=5,
                   postprocess=None, progress=False)
    assert stacks == expected

    gridded = []  # the resample-once path: windowed slices on the model's grid

    def labels_on_grid(windowed, statistics, size, pixel):
        gridded.extend(windowed[:, 0, 0, :].tolist())
        return np.zeros((windowed.shape[0], *size), np.uint8)

    model = SegmentationModel(Path("g.keras"), "keras", prep, forward, 3, "g")
    model.labels_on_grid = labels_on_grid
    predict_volume(model, case, batch_size=5, postprocess=None, progress=False)
    np.testing.assert_allclose(gridded, expected, atol=1e-3)

    adjacent = dataclasses.replace(prep, context_mm=None)  # a model from before context_mm: neighbours 1 slice away
    stacks.clear()
    predict_volume(SegmentationModel(Path("f.keras"), "keras", adjacent, forward, 3, "f"), case, batch_size=5,
                   postprocess=None, progress=False)
    assert stacks == [[10.0 * max(k - 1, 0), 10.0 * k, 10.0 * min(k + 1, 11)] for k in range(12)]  # edges repeated


def test_an_ensemble_refuses_members_with_context_slices_at_different_distances():
    near, far = fake_model(context=3), fake_model(context=3)
    far.preprocessing = dataclasses.replace(far.preprocessing, context_mm=4.5)
    with pytest.raises(ValueError, match="different distances.*context_mm"):
        SegmentationModel.ensemble([near, far])
    both = fake_model(context=3)
    both.preprocessing = far.preprocessing
    assert SegmentationModel.ensemble([far, both]).preprocessing.context_stride(1.5) == 3
