"""DICOM-SEG out (keras_livseg.data.dicom.write_segmentation), against dcmqi's SEG of the same series."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from keras_livseg.data.dicom import _sorted_series_datasets, write_segmentation  # noqa: E402
from keras_livseg.data.errors import DataError  # noqa: E402


@pytest.fixture
def series(real_data_dir):
    return real_data_dir / "dcmqi-ct-3slice" / "dicom"


def dcmqi_liver(series) -> np.ndarray:
    """dcmqi's liver segment as uint8 labels [rows, columns, slices] in our slice order."""
    reference = hd.seg.segread(str(series / "liver-seg.dcm"))
    uids = [d.SOPInstanceUID for d in _sorted_series_datasets(series)]
    frames = reference.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                                     ignore_spatial_locations=True)  # dcmqi does not flag it
    return frames[..., 0].transpose(1, 2, 0).astype(np.uint8)


def test_our_seg_of_dcmqis_liver_has_the_same_frames_and_references(series, tmp_path):
    liver = dcmqi_liver(series)
    assert liver.shape == (512, 512, 3) and 1000 < liver.sum()
    labels = liver.copy()
    labels[250:260, 250:260, 1] = 2 * liver[250:260, 250:260, 1]  # a small "tumour" inside the liver
    path = write_segmentation(labels, series, tmp_path / "out" / "seg.dcm", model_name="test")
    ours = hd.seg.segread(str(path))
    assert ours.SegmentationType == "BINARY" and ours.Modality == "SEG"
    described = [(s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                  s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator, s.SegmentAlgorithmType)
                 for s in ours.SegmentSequence]
    assert described == [("Liver", "10200004", "SCT", "AUTOMATIC"), ("Liver tumour", "108369006", "SCT", "AUTOMATIC")]
    sources = _sorted_series_datasets(series)
    assert ours.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert ours.PatientID == sources[0].PatientID and ours.StudyInstanceUID == sources[0].StudyInstanceUID
    uids = [d.SOPInstanceUID for d in sources]
    frames = ours.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(frames[..., 0].transpose(1, 2, 0), labels >= 1)  # the whole liver, as LiTS
    np.testing.assert_array_equal(frames[..., 1].transpose(1, 2, 0), labels == 2)
    np.testing.assert_array_equal(frames[..., 0].transpose(1, 2, 0), liver)  # and dcmqi's liver, frame by frame
    assert not list(path.parent.glob(".*partial*"))


def test_a_seg_for_a_folder_of_two_series_needs_the_series_uid(series, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for index, name in enumerate(["01.dcm", "02.dcm", "03.dcm"]):
        for suffix in ("", ".2"):
            dataset = pydicom.dcmread(str(series / name))
            dataset.SeriesInstanceUID += suffix
            dataset.SOPInstanceUID += suffix
            dataset.save_as(str(folder / f"{'b' if suffix else 'a'}-{name}"))
    with pytest.raises(DataError, match="holds 2 image series .*choose one with --series UID"):
        write_segmentation(np.zeros((512, 512, 3), np.uint8), folder, tmp_path / "seg.dcm")
    other = pydicom.dcmread(str(series / "01.dcm")).SeriesInstanceUID + ".2"
    path = write_segmentation(np.ones((512, 512, 3), np.uint8), folder, tmp_path / "seg.dcm", series_uid=other)
    assert hd.seg.segread(str(path)).ReferencedSeriesSequence[0].SeriesInstanceUID == other


def test_labels_that_do_not_fit_the_series_are_refused(series, tmp_path):
    with pytest.raises(DataError, match="do not fit the series"):
        write_segmentation(np.zeros((512, 512, 2), np.uint8), series, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


# --- DICOM-SEG in: labelled DICOM series for prepare and evaluate --------------------------------


def _pairs(tmp_path, image, label, case_id="3slice"):
    path = tmp_path / f"pairs-{len(list(tmp_path.glob('pairs-*')))}.csv"
    path.write_text(f"image,label,case_id\n{image},{label},{case_id}\n")
    return path


def test_series_with_its_seg_loads_as_its_nifti_conversion(series, real_data_dir, tmp_path):
    from keras_livseg.data.cases import discover_cases
    from keras_livseg.data.volumes import load_case

    folder = real_data_dir / "dcmqi-ct-3slice"
    dicom = load_case(discover_cases(_pairs(tmp_path, series, series / "liver-seg.dcm"))[0])
    nifti = load_case(discover_cases(_pairs(tmp_path, folder / "volume-3slice.nii.gz", folder / "segmentation-3slice.nii.gz"))[0])
    np.testing.assert_array_equal(dicom.image, nifti.image)
    np.testing.assert_array_equal(dicom.labels, nifti.labels)  # dcmqi's liver, placed frame by frame
    assert dicom.labels.max() == 1 and dicom.labels.sum() > 1000


def test_prepare_on_dicom_series_with_segs_writes_the_nifti_shards(series, real_data_dir, tmp_path):
    from keras_livseg.data.prepare import PrepareOptions, prepare_dataset

    folder = real_data_dir / "dcmqi-ct-3slice"
    runs = {}
    for name, (image, label) in {"dicom": (series, series / "liver-seg.dcm"),
                                 "nifti": (folder / "volume-3slice.nii.gz", folder / "segmentation-3slice.nii.gz")}.items():
        runs[name] = prepare_dataset(PrepareOptions(src=_pairs(tmp_path, image, label), out=tmp_path / name, image_size=32,
                                                    workers=1, progress=False, split=(1.0, 0.0, 0.0)))
    (shard,) = runs["dicom"]["splits"]["train"]["shards"]
    assert (tmp_path / "dicom" / shard).read_bytes() == (tmp_path / "nifti" / shard).read_bytes()
    assert runs["dicom"]["preprocessing"] == runs["nifti"]["preprocessing"]
    # The series folder is fingerprinted as a whole: a changed slice gives a new hash.
    assert len(runs["dicom"]["cases"]["3slice"]["image_sha256"]) == 64


def test_our_seg_reads_back_as_the_labels_written(series, tmp_path):
    from keras_livseg.data.dicom import read_segmentation

    labels = dcmqi_liver(series)
    labels[250:260, 250:260, 1] = 2 * labels[250:260, 250:260, 1]
    path = write_segmentation(labels, series, tmp_path / "seg.dcm", model_name="test")
    np.testing.assert_array_equal(read_segmentation(path, series), labels)


def test_seg_refusals_are_one_clear_line(series, real_data_dir, tmp_path, monkeypatch):
    from keras_livseg.data import dicom
    from keras_livseg.data.cases import discover_cases
    from keras_livseg.data.volumes import load_case

    nifti_image = real_data_dir / "dcmqi-ct-3slice" / "volume-3slice.nii.gz"
    with pytest.raises(DataError, match="is a DICOM Segmentation, which references a DICOM series, but the image"):
        load_case(discover_cases(_pairs(tmp_path, nifti_image, series / "liver-seg.dcm"))[0])
    with pytest.raises(DataError, match="is not a readable DICOM Segmentation"):
        dicom.read_segmentation(series / "01.dcm", series)  # a CT slice, not a SEG
    monkeypatch.setattr(dicom, "LIVER_CODES", frozenset())
    with pytest.raises(DataError, match=r"has no liver or liver-tumour segment \(it holds 1 'Liver' \(T-62000\)\)"):
        dicom.read_segmentation(series / "liver-seg.dcm", series)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is a folder without DICOM files"):
        discover_cases(_pairs(tmp_path, empty, series / "liver-seg.dcm"))


def test_evaluate_scores_a_folder_of_dicom_seg_predictions(series, tmp_path):
    """What predict --format dicom-seg writes (<case>_seg.dcm) is scored against a CSV reference
    whose image is the series and whose label is a SEG of it."""
    from keras_livseg.evaluation.report import evaluate_folders

    labels = dcmqi_liver(series)
    labels[250:260, 250:260, 1] = 2 * labels[250:260, 250:260, 1]  # a little tumour, inside the liver
    (tmp_path / "pred").mkdir()
    write_segmentation(labels, series, tmp_path / "pred" / "dicom_seg.dcm", model_name="test")
    (tmp_path / "pairs.csv").write_text(f"image,label\n{series},{series / 'liver-seg.dcm'}\n")
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "pairs.csv", tmp_path / "eval", figures=False)
    assert summary["cases"] == ["dicom"]
    # The liver (labels 1 and 2 together) is dcmqi's own; the SEG reference has no tumour.
    assert summary["volume"]["liver"]["dice"] == pytest.approx(1.0)
