"""Per-lesion LiTS metrics, the empty-mask penalty and the LiTS surface definition, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_livseg.evaluation import metrics as m
from keras_livseg.evaluation.report import EvaluationOptions, score_case, summarize

# In-plane 1 mm × 0.5 mm, slices 2 mm: a one-voxel error along axis 1 is 0.5 mm.
SPACING = (1.0, 0.5, 2.0)


def two_lesions() -> tuple[np.ndarray, np.ndarray]:
    """10×10×3, liver everywhere; lesion A (2×2×3 = 12 voxels) found 50 % too large, lesion B
    (2×2×1 = 4 voxels) missed."""
    ref = np.ones((10, 10, 3), np.uint8)
    ref[1:3, 1:3, :] = 2  # A
    ref[6:8, 6:8, 0:1] = 2  # B
    pred = np.ones_like(ref)
    pred[1:3, 1:4, :] = 2  # A plus one more column along axis 1: 18 voxels
    return pred, ref


@pytest.mark.parametrize("connectivity", [1, 2])
def test_per_lesion_metrics_hand_computed(connectivity):
    pred, ref = two_lesions()
    result = m.lesion_detection(pred, ref, SPACING, connectivity=connectivity)
    # A: I = 12, |P| = 18, |G| = 12, IoU = 12/18 = 2/3 > 0.5: detected. B: missed.
    assert (result.tp, result.fp, result.fn) == (1, 0, 1)
    [lesion] = m.lesion_segmentation_metrics(pred, ref, SPACING, connectivity=connectivity)
    assert lesion["ref_lesions"] == [1] and lesion["pred_lesions"] == [1]
    assert lesion["dice"] == pytest.approx(0.8)  # 2·12 / (18 + 12)
    assert lesion["jaccard"] == pytest.approx(2 / 3)
    assert lesion["voe"] == pytest.approx(1 / 3)
    assert lesion["rvd"] == pytest.approx(0.5)  # (18 − 12)/12
    assert lesion["rvd_lits"] == pytest.approx(-1 / 3)  # (12 − 18)/18, medpy.ravd(ref, pred)
    # Both masks are 2 voxels thick along axis 0, so every voxel is surface (either
    # neighbourhood). The 6 extra predicted voxels are 0.5 mm from the reference, all others 0:
    # ASSD = 6·0.5 / (18 + 12) = 0.1, MSD = 0.5, RMSD = sqrt(6·0.25 / 30).
    assert lesion["assd"] == pytest.approx(0.1)
    assert lesion["msd"] == pytest.approx(0.5)
    assert lesion["rmsd"] == pytest.approx(math.sqrt(0.05))
    # Per reference lesion: A carries them, B (missed) has NaN (LiTS scores detected lesions only).
    a, b = result.lesions
    assert a["detected"] and a["assd"] == pytest.approx(0.1) and a["voe"] == pytest.approx(1 / 3)
    assert not b["detected"] and math.isnan(b["assd"]) and math.isnan(b["msd"])
    means = m.mean_lesion_metrics([result])
    assert means["n_detected"] == 1 and means["dice"] == pytest.approx(0.8)
    assert means["msd"] == pytest.approx(0.5)


def test_merged_reference_lesions_are_one_lesion_record():
    ref = np.ones((12, 20, 4), np.uint8)
    ref[2:6, 2:6, :] = 2  # C1, 64 voxels
    ref[2:6, 8:12, :] = 2  # C2, 64 voxels
    ref[8:10, 14:16, :] = 2  # D, found exactly: 16 voxels
    pred = np.ones_like(ref)
    pred[2:6, 2:12, :] = 2  # one prediction over C1, the gap and C2: 160 voxels
    pred[8:10, 14:16, :] = 2
    records = m.lesion_segmentation_metrics(pred, ref, 1.0)
    # Group C1+C2: I = 128, Dice = 256 / (128 + 160); group D: Dice 1, distances 0.
    assert [r["ref_lesions"] for r in records] == [[1, 2], [3]]
    assert records[0]["dice"] == pytest.approx(256 / 288)
    assert records[1]["dice"] == 1.0 and records[1]["assd"] == 0.0
    result = m.lesion_detection(pred, ref, 1.0)
    means = m.mean_lesion_metrics([result, result])
    # LiTS averages over detected lesion objects (merged groups count once): 4 records.
    assert means["n_detected"] == 4 and means["n_detected_ref_lesions"] == 6
    assert means["dice"] == pytest.approx((256 / 288 + 1) / 2)
    assert math.isnan(m.mean_lesion_metrics([])["dice"])


# ---------------------------------------------------------------------------------------------
# Empty masks
# ---------------------------------------------------------------------------------------------

# 3×4×3 voxels of 1×1×4 mm: the extent is 3 × 4 × 12 mm, its diagonal sqrt(9 + 16 + 144) = 13.
SMALL_SPACING = (1.0, 1.0, 4.0)


def small_liver() -> np.ndarray:
    ref = np.zeros((3, 4, 3), np.uint8)
    ref[1:3, 1:3, :] = 1
    return ref


def test_volume_diagonal_and_policies():
    assert m.volume_diagonal_mm((3, 4, 3), SMALL_SPACING) == pytest.approx(13.0)
    assert m.resolve_empty_value("diagonal", (3, 4, 3), SMALL_SPACING) == pytest.approx(13.0)
    assert m.resolve_empty_value("lits", (3, 4, 3), SMALL_SPACING) == m.LITS_PENALTY
    assert math.isnan(m.resolve_empty_value("nan", (3, 4, 3), SMALL_SPACING))
    assert m.resolve_empty_value(7.5, (3, 4, 3), SMALL_SPACING) == 7.5
    with pytest.raises(ValueError, match="empty_value=-1.0"):
        m.resolve_empty_value(-1.0, (3, 4, 3), SMALL_SPACING)
    with pytest.raises(ValueError, match="empty_surface|empty_value='far'"):
        EvaluationOptions(empty_surface="far")


def test_empty_prediction_gets_the_diagonal_penalty():
    ref = small_liver()
    scores = m.case_metrics(np.zeros_like(ref), ref, SMALL_SPACING)
    assert scores["liver_empty"] == "pred"
    assert scores["liver_dice"] == 0.0 and scores["liver_voe"] == 1.0
    for key in ("assd", "msd", "hd95", "rmsd", "asd"):
        assert scores[f"liver_{key}"] == pytest.approx(13.0), key
    assert scores["liver_surface_penalty_mm"] == pytest.approx(13.0)
    assert scores["liver_rvd"] == -1.0  # (0 − 12)/12: defined
    assert math.isnan(scores["liver_rvd_lits"])  # (12 − 0)/0: undefined
    # Both tumor masks empty: LiTS's Dice 1, distances 0, no penalty.
    assert scores["tumor_empty"] == "both" and scores["tumor_dice"] == 1.0
    assert scores["tumor_assd"] == 0.0 and scores["tumor_surface_penalty_mm"] == 0.0
    lits = m.case_metrics(np.zeros_like(ref), ref, SMALL_SPACING, empty_value="lits",
                          empty_rvd=m.LITS_PENALTY)
    assert lits["liver_msd"] == m.LITS_PENALTY and lits["liver_rvd_lits"] == m.LITS_PENALTY


def test_empty_reference_gets_the_penalty_and_an_undefined_rvd():
    ref = small_liver()
    pred = ref.copy()
    pred[1, 1, 1] = 2  # a tumor false alarm; the reference has no tumor
    scores = m.case_metrics(pred, ref, SMALL_SPACING)
    assert scores["tumor_empty"] == "ref" and scores["tumor_dice"] == 0.0
    assert scores["tumor_hd95"] == pytest.approx(13.0)
    assert math.isnan(scores["tumor_rvd"])  # (1 − 0)/0: undefined, left out and counted
    assert scores["tumor_rvd_lits"] == -1.0  # (0 − 1)/1


def test_penalised_cases_stay_in_the_mean():
    ref = small_liver()
    perfect = score_case(ref, ref, SMALL_SPACING)
    missed = score_case(np.zeros_like(ref), ref, SMALL_SPACING)
    summary = summarize([perfect, missed])["volume"]["liver"]
    # Mean of 0 mm (perfect) and the 13 mm penalty (missed liver).
    assert summary["assd"] == pytest.approx(6.5) and summary["assd_undefined"] == 0
    assert summary["msd"] == pytest.approx(6.5)
    assert summary["surface_penalized"] == 1 and summary["surface_penalty_mm"] == [pytest.approx(13.0)]
    assert summary["dice"] == pytest.approx(0.5)
    # The old behaviour, on request: the missed case drops out of the distance means.
    options = EvaluationOptions(empty_surface="nan")
    old = summarize([score_case(ref, ref, SMALL_SPACING, options),
                     score_case(np.zeros_like(ref), ref, SMALL_SPACING, options)], options)
    assert old["volume"]["liver"]["assd"] == 0.0 and old["volume"]["liver"]["assd_undefined"] == 1


# ---------------------------------------------------------------------------------------------
# Surface definition: medpy's 6-neighbourhood versus LiTS's 18-neighbourhood
# ---------------------------------------------------------------------------------------------


def test_lits_and_medpy_surfaces_differ_on_a_cross():
    # pred: a 3D cross (centre + its 6 face neighbours); ref: the centre voxel alone.
    pred = np.zeros((5, 5, 5), bool)
    pred[2, 2, 1:4] = pred[2, 1:4, 2] = pred[1:4, 2, 2] = True
    ref = np.zeros_like(pred)
    ref[2, 2, 2] = True
    spacing = (1.0, 1.0, 2.0)
    # medpy (connectivity 1): the centre has all 6 face neighbours, so it is interior; surface =
    # the 6 arms, at 1, 1, 1, 1, 2, 2 mm from the reference; the reference voxel is 1 mm from the
    # nearest arm. ASSD = (8 + 1) / (6 + 1) = 9/7.
    pred_to_ref, ref_to_pred = m.surface_distances(pred, ref, spacing, connectivity=1)
    assert sorted(pred_to_ref.tolist()) == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert ref_to_pred.tolist() == [1.0]
    assert m.assd(pred, ref, spacing, connectivity=1) == pytest.approx(9 / 7)
    # LiTS (connectivity 2, 18-neighbourhood): the centre lacks its 12 edge neighbours, so it is
    # surface too: 7 surface voxels, one at 0 mm, and the reference voxel is 0 mm from it.
    # ASSD = (8 + 0) / (7 + 1) = 1.
    pred_to_ref, ref_to_pred = m.surface_distances(pred, ref, spacing, connectivity=m.LITS_CONNECTIVITY)
    assert sorted(pred_to_ref.tolist()) == [0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert ref_to_pred.tolist() == [0.0]
    assert m.assd(pred, ref, spacing, connectivity=2) == pytest.approx(1.0)
    # The evaluation scores with the LiTS surface by default.
    assert EvaluationOptions().connectivity == m.LITS_CONNECTIVITY == 2
    labels_pred, labels_ref = pred.astype(np.uint8), ref.astype(np.uint8)
    row = score_case(labels_pred, labels_ref, spacing).row
    assert row["liver_assd"] == pytest.approx(1.0)
    row = score_case(labels_pred, labels_ref, spacing, EvaluationOptions(connectivity=1)).row
    assert row["liver_assd"] == pytest.approx(9 / 7)
