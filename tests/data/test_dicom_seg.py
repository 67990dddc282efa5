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


def test_labels_that_do_not_fit_the_series_are_refused(series, tmp_path):
    with pytest.raises(DataError, match="do not fit the series"):
        write_segmentation(np.zeros((512, 512, 2), np.uint8), series, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
