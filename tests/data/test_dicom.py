"""DICOM series in (keras_livseg.data.dicom), on the shared 3-slice CT series and altered copies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from keras_livseg.data.cases import resolve_inputs  # noqa: E402
from keras_livseg.data.dicom import check_series, list_series, read_series  # noqa: E402
from keras_livseg.data.errors import DataError  # noqa: E402
from keras_livseg.data.volumes import load_case, load_nifti, read_array, to_canonical  # noqa: E402


@pytest.fixture
def series(real_data_dir) -> Path:
    return real_data_dir / "dcmqi-ct-3slice" / "dicom"


def _copy(series: Path, target: Path, edit=None) -> Path:
    """The series' three CT files copied to ``target``, each passed through ``edit(dataset, index)``."""
    target.mkdir(parents=True)
    for index, name in enumerate(["01.dcm", "02.dcm", "03.dcm"]):
        dataset = pydicom.dcmread(str(series / name))
        if edit is not None:
            edit(dataset, index)
        dataset.save_as(str(target / name))
    return target


def test_series_equals_its_nifti_conversion_in_hu_grid_and_orientation(series):
    image = read_series(series)
    nifti = load_nifti(series.parent / "volume-3slice.nii.gz")
    assert image.shape == nifti.shape == (512, 512, 3)
    hu = to_canonical(read_array(image, series), image.affine)
    reference = to_canonical(read_array(nifti, series.parent / "volume-3slice.nii.gz"), nifti.affine)
    np.testing.assert_array_equal(hu, reference)
    assert hu.min() == -3024  # the scanner's padding, rescaled (slope 1, intercept -1024)
    np.testing.assert_allclose(image.header.get_zooms(), (0.810547, 0.810547, 1.0), atol=1e-5)


def test_the_seg_object_beside_the_series_is_not_a_slice(series):
    (only,) = list_series(series).values()
    assert sorted(p.name for p in only.files) == ["01.dcm", "02.dcm", "03.dcm"]


def test_file_order_does_not_matter_positions_do(series, tmp_path):
    """Files named against their positions still give slices ordered along the normal."""
    def reverse_names(dataset, index):
        dataset.InstanceNumber = 3 - index

    copied = _copy(series, tmp_path / "s", reverse_names)
    (copied / "01.dcm").rename(copied / "tmp.dcm")
    (copied / "03.dcm").rename(copied / "01.dcm")
    (copied / "tmp.dcm").rename(copied / "03.dcm")
    np.testing.assert_array_equal(np.asarray(read_series(copied).dataobj), np.asarray(read_series(series).dataobj))


def test_a_predict_input_folder_of_dicom_is_one_case_loaded_canonically(series):
    (case_files,) = resolve_inputs([series])
    assert case_files.case_id == "dicom" and case_files.image == series
    case = load_case(case_files, with_labels=False)
    assert case.image.shape == (512, 512, 3) and case.original_shape == (512, 512, 3)
    np.testing.assert_allclose(case.spacing, (0.810547, 0.810547, 1.0), atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda d, i: setattr(d, "SeriesInstanceUID", d.SeriesInstanceUID + (".9" if i == 2 else "")), "holds 2 image series"),
    (lambda d, i: setattr(d, "ImagePositionPatient", [d.ImagePositionPatient[0], d.ImagePositionPatient[1] + 0.5 * i,
                                                      d.ImagePositionPatient[2]]), "gantry tilt"),
    (lambda d, i: setattr(d, "ImagePositionPatient", [*d.ImagePositionPatient[:2], d.ImagePositionPatient[2] - (1.0 if i == 2 else 0.0)]),
     "slice spacing varies"),
    (lambda d, i: delattr(d, "ImagePositionPatient") if i == 1 else None, "has no ImagePositionPatient"),
])
def test_series_that_cannot_be_read_safely_are_refused_in_one_line(series, tmp_path, edit, message):
    copied = _copy(series, tmp_path / "bad", edit)
    with pytest.raises(DataError, match=message):
        check_series(copied)  # from the headers, as predict checks its inputs before loading the model
    with pytest.raises(DataError, match=message):
        read_series(copied)


def test_the_headers_alone_give_the_series_geometry(series):
    geometry = check_series(series)
    image = read_series(series)
    assert geometry.shape == image.shape == (512, 512, 3)
    np.testing.assert_array_equal(geometry.affine, image.affine)
    np.testing.assert_allclose(geometry.spacing, image.header.get_zooms(), atol=1e-6)
    positions = [float(pydicom.dcmread(str(path)).ImagePositionPatient[2]) for path in geometry.files]
    assert len(geometry.files) == 3 and np.all(np.diff(positions) * np.sign(image.affine[2, 2]) > 0)  # slice order


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-5000], r"02.dcm: its pixel data is cut short \(5000 bytes missing\)"),
    # cut inside the header, where pydicom reads what is there without complaint
    (lambda data: data[:2000], r"02.dcm has no pixel data: the file is damaged or cut short"),
    (lambda data: data[:1000], r"02.dcm has no SeriesInstanceUID: the file is damaged or cut short"),
    (lambda data: data[:140], r"02.dcm has no SOPClassUID: the file is damaged or cut short"),  # in the file meta
])
def test_a_file_cut_short_is_refused_from_its_header(series, tmp_path, damage, message):
    copied = _copy(series, tmp_path / "cut")
    damaged = copied / "02.dcm"
    damaged.write_bytes(damage(damaged.read_bytes()))
    with pytest.raises(DataError, match=message):
        check_series(copied)
    with pytest.raises(DataError, match=message):
        read_series(copied)


def test_small_slices_cut_short_are_refused_and_large_ones_are_not_read(series, tmp_path, monkeypatch):
    def tiny(dataset, index):  # 8x8 pixels: read with the header, not deferred
        dataset.Rows = dataset.Columns = 8
        dataset.PixelData = np.zeros((8, 8), np.int16).tobytes()

    small = _copy(series, tmp_path / "small", tiny)
    assert check_series(small).shape == (8, 8, 3)
    (small / "03.dcm").write_bytes((small / "03.dcm").read_bytes()[:-10])
    with pytest.raises(DataError, match=r"03.dcm: its pixel data is cut short \(10 bytes missing\)"):
        check_series(small)
    import pydicom.filereader

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element",
                        lambda *args, **kwargs: pytest.fail("a slice's pixel data was read"))
    assert check_series(series).shape == (512, 512, 3)


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")  # pydicom guesses the private syntax's VR
def test_a_private_transfer_syntax_passes_the_header_check_and_is_refused_when_decoded(series, tmp_path):
    """GE's private implicit little endian: nothing to measure the pixel data by, no decoder."""
    def private(dataset, index):
        if index == 1:
            dataset.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"

    folder = _copy(series, tmp_path / "private", private)
    assert check_series(folder).shape == (512, 512, 3)
    with pytest.raises(DataError, match="02.dcm: its pixel data cannot be decoded"):
        read_series(folder)


def test_a_slice_without_bits_allocated_is_refused_from_its_header(series, tmp_path):
    folder = _copy(series, tmp_path / "bits", lambda d, i: delattr(d, "BitsAllocated") if i == 2 else None)
    with pytest.raises(DataError, match="03.dcm has no BitsAllocated: its pixel data cannot be read"):
        check_series(folder)


def test_a_slice_without_pixel_data_is_refused(series, tmp_path):
    copied = _copy(series, tmp_path / "empty", lambda d, i: delattr(d, "PixelData") if i == 0 else None)
    with pytest.raises(DataError, match="01.dcm has no pixel data: the file is damaged or cut short, or not an image"):
        check_series(copied)


def test_rescale_slope_gives_float_hu(series, tmp_path):
    def halve(dataset, index):
        dataset.RescaleSlope = 0.5

    image = read_series(_copy(series, tmp_path / "slope", halve))
    plain = read_series(series)
    stored = np.asarray(plain.dataobj).astype(np.float32) + 1024.0
    np.testing.assert_allclose(np.asarray(image.dataobj), stored * 0.5 - 1024.0)


@pytest.mark.parametrize("syntax", ["JPEG2000Lossless", "RLELossless"])
def test_compressed_series_read_as_the_uncompressed_one(series, tmp_path, syntax):
    from pydicom import uid

    def compress(dataset, index):
        dataset.compress(getattr(uid, syntax))  # pylibjpeg-openjpeg encodes JPEG 2000; pydicom RLE

    folder = _copy(series, tmp_path / syntax, compress)
    assert pydicom.dcmread(str(folder / "01.dcm")).file_meta.TransferSyntaxUID == getattr(uid, syntax)
    assert check_series(folder).shape == (512, 512, 3)  # compressed data has no length to check
    image, plain = read_series(folder), read_series(series)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(plain.dataobj))
    np.testing.assert_array_equal(image.affine, plain.affine)


def test_no_series_in_a_folder_is_one_line(tmp_path, series):
    shutil.copy(series / "liver-seg.dcm", tmp_path / "seg.dcm")
    with pytest.raises(DataError, match="holds no DICOM image series"):
        read_series(tmp_path)


def test_a_folder_of_two_series_is_refused_with_both_or_read_by_uid(series, tmp_path, keras_checkpoint_for_dicom):
    folder = _copy(series, tmp_path / "two")
    other_uid = pydicom.dcmread(str(folder / "01.dcm")).SeriesInstanceUID + ".2"

    def second_series(dataset, index):
        dataset.SeriesInstanceUID = other_uid
        dataset.SOPInstanceUID = dataset.SOPInstanceUID + ".2"
        dataset.RescaleIntercept = -1000  # tells the two apart: 24 HU more

    for path in _copy(series, tmp_path / "b", second_series).iterdir():
        path.rename(folder / f"b-{path.name}")
    first_uid = pydicom.dcmread(str(series / "01.dcm")).SeriesInstanceUID
    with pytest.raises(DataError, match=f"holds 2 image series.*{first_uid}.*--series UID"):
        read_series(folder)
    chosen = np.asarray(read_series(folder, other_uid).dataobj)
    np.testing.assert_array_equal(chosen, np.asarray(read_series(series).dataobj) + 24)
    # predict --series picks it, down to the DICOM-SEG's references.
    from keras_livseg import predict as predict_cli

    code = predict_cli.main(["--model", str(keras_checkpoint_for_dicom), str(folder), "--out", str(tmp_path / "out"),
                             "--series", other_uid, "--format", "dicom-seg", "--no-progress"])
    assert code == 0
    seg = pydicom.dcmread(str(tmp_path / "out" / "two_seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == other_uid


@pytest.fixture(scope="module")
def keras_checkpoint_for_dicom(tmp_path_factory):
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(run / "checkpoints" / "best.keras")
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=60.0, std=40.0))
    return run / "checkpoints" / "best.keras"


def test_evaluate_a_model_on_dicom_series_with_their_segs(series, tmp_path, keras_checkpoint_for_dicom):
    import csv

    from keras_livseg import evaluate as evaluate_cli

    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,label,case_id\n{series},{series / 'liver-seg.dcm'},3slice\n")
    code = evaluate_cli.main(["--model", str(keras_checkpoint_for_dicom), "--data", str(pairs), "--out", str(tmp_path / "eval")])
    assert code == 0
    with (tmp_path / "eval" / "per_case.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["case_id"] == "3slice" and row["reference"].endswith("liver-seg.dcm")
    # The reference liver is dcmqi's segment, all of its voxels, at the series' 0.81 x 0.81 x 1 mm.
    assert int(row["liver_ref_voxels"]) == 107098
    assert float(row["liver_ref_volume_ml"]) == pytest.approx(107098 * 0.810547**2 / 1000, rel=1e-4)


def test_evaluate_predictions_against_a_csv_of_series_and_segs(series, tmp_path, keras_checkpoint_for_dicom):
    import csv

    from keras_livseg import evaluate as evaluate_cli
    from keras_livseg import predict as predict_cli

    assert predict_cli.main(["--model", str(keras_checkpoint_for_dicom), str(series), "--out", str(tmp_path / "pred"),
                             "--no-progress"]) == 0
    (prediction,) = sorted((tmp_path / "pred").glob("*.nii.gz"))
    case_id = prediction.name.removesuffix(".nii.gz")
    refs = tmp_path / "refs.csv"
    refs.write_text(f"image,label,case_id\n{series},{series / 'liver-seg.dcm'},{case_id}\n")
    assert evaluate_cli.main(["--pred", str(tmp_path / "pred"), "--ref", str(refs), "--out", str(tmp_path / "eval"),
                              "--no-figures"]) == 0
    with (tmp_path / "eval" / "per_case.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["case_id"] == case_id and int(row["liver_ref_voxels"]) == 107098
