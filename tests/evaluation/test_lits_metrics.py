"""Tests for keras_livseg.evaluation.metrics: hand-computed values, empty masks, medpy agreement."""

from __future__ import annotations

import doctest
import math

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from keras_livseg.evaluation import metrics as m

# Anisotropic spacing typical of LiTS: fine in-plane, thick slices on the last axis.
SPACING = (0.8, 0.8, 2.5)


def line_masks() -> tuple[np.ndarray, np.ndarray]:
    """A 1×1×8 volume: ref holds voxels 0..3 (4), pred voxels 2..6 (5); TP=2, FP=3, FN=2."""
    ref = np.zeros((1, 1, 8), bool)
    pred = np.zeros((1, 1, 8), bool)
    ref[0, 0, 0:4] = True
    pred[0, 0, 2:7] = True
    return pred, ref


# ---------------------------------------------------------------------------------------------
# Overlap metrics
# ---------------------------------------------------------------------------------------------


def test_overlap_metrics_hand_computed():
    pred, ref = line_masks()
    # |P|=5, |G|=4, |P∩G|=2, |P∪G|=7
    assert m.dice(pred, ref) == pytest.approx(4 / 9)  # 2·2 / (5+4)
    assert m.iou(pred, ref) == pytest.approx(2 / 7)  # 2 / 7
    assert m.jaccard(pred, ref) == pytest.approx(2 / 7)
    assert m.voe(pred, ref) == pytest.approx(5 / 7)  # 1 − 2/7
    assert m.rvd(pred, ref) == pytest.approx(0.25)  # (5−4)/4
    assert m.rvd_lits(pred, ref) == pytest.approx(-0.2)  # (4−5)/5
    assert m.rvd(pred, ref, lits_convention=True) == pytest.approx(-0.2)
    assert m.precision(pred, ref) == pytest.approx(0.4)  # 2/5
    assert m.recall(pred, ref) == pytest.approx(0.5)  # 2/4
    assert m.f1(pred, ref) == pytest.approx(4 / 9)  # 2·0.4·0.5/0.9 = Dice
    assert m.overlap_counts(pred, ref) == (2, 5, 4)


def test_overlap_metrics_both_empty_follow_lits():
    empty = np.zeros((3, 3, 3), bool)
    assert m.dice(empty, empty) == 1.0
    assert m.iou(empty, empty) == 1.0
    assert m.voe(empty, empty) == 0.0
    assert m.rvd(empty, empty) == 0.0
    assert m.rvd_lits(empty, empty) == 0.0
    assert m.precision(empty, empty) == 1.0
    assert m.recall(empty, empty) == 1.0
    assert m.f1(empty, empty) == 1.0
    assert m.dice(empty, empty, empty_score=0.0) == 0.0


def test_overlap_metrics_one_empty():
    empty = np.zeros((3, 3, 3), bool)
    full = empty.copy()
    full[1, 1, :] = True  # 3 voxels
    # Prediction empty: a miss.
    assert m.dice(empty, full) == 0.0
    assert m.iou(empty, full) == 0.0
    assert m.voe(empty, full) == 1.0
    assert m.rvd(empty, full) == -1.0  # (0−3)/3
    assert math.isnan(m.rvd_lits(empty, full))  # (3−0)/0
    assert m.rvd_lits(empty, full, empty_value=m.LITS_PENALTY) == m.LITS_PENALTY
    assert m.precision(empty, full) == 0.0
    assert m.recall(empty, full) == 0.0
    assert m.f1(empty, full) == 0.0
    # Reference empty: a false alarm.
    assert m.dice(full, empty) == 0.0
    assert m.iou(full, empty) == 0.0
    assert m.voe(full, empty) == 1.0
    assert math.isnan(m.rvd(full, empty))
    assert m.rvd_lits(full, empty) == -1.0  # (0−3)/3
    assert m.precision(full, empty) == 0.0
    assert m.recall(full, empty) == 0.0
    assert m.f1(full, empty) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*\(2, 2, 3\).*resample"):
        m.dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"\(4, 4, 2\).*\(4, 4, 3\)"):
        m.case_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 3)), SPACING)


@pytest.mark.parametrize(
    "spacing, pattern",
    [
        ((1.0, 1.0), "2 values but the masks have 3 axes"),
        ((1.0, -1.0, 2.0), "finite positive"),
        ("a", "not a sequence"),
    ],
)
def test_bad_spacing_is_explained(spacing, pattern):
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(ValueError, match=pattern):
        m.hd95(mask, mask, spacing)


def test_bad_labels_and_arguments_are_explained():
    ref = np.zeros((4, 4, 2), np.uint8)
    with pytest.raises(ValueError, match=r"\[0, 5\].*label-map"):
        m.case_metrics(np.full_like(ref, 5) * (np.arange(2) > 0), ref, SPACING)
    with pytest.raises(ValueError, match="iou_threshold=1.5"):
        m.lesion_detection(ref, ref, SPACING, iou_threshold=1.5)
    with pytest.raises(ValueError, match="connectivity=4"):
        m.surface_distances(ref, ref, SPACING, connectivity=4)
    with pytest.raises(ValueError, match="region='kidney'"):
        m.region_mask(ref, "kidney")


# ---------------------------------------------------------------------------------------------
# Surface distances
# ---------------------------------------------------------------------------------------------


def test_surface_distances_hand_computed_anisotropic():
    # ref: one voxel at z=0; pred: voxels at z=0 and z=3; z spacing 2.5 mm.
    pred = np.zeros((1, 1, 5), bool)
    ref = np.zeros((1, 1, 5), bool)
    pred[0, 0, [0, 3]] = True
    ref[0, 0, 0] = True
    pred_to_ref, ref_to_pred = m.surface_distances(pred, ref, SPACING)
    assert pred_to_ref.tolist() == [0.0, 7.5]  # 3 voxels × 2.5 mm
    assert ref_to_pred.tolist() == [0.0]
    scores = m.surface_metrics(pred, ref, SPACING)
    assert scores["asd"] == pytest.approx(3.75)  # (0 + 7.5)/2
    assert scores["assd"] == pytest.approx(2.5)  # (0 + 7.5 + 0)/3   (medpy >= 0.5, LiTS)
    assert scores["assd_mean_of_means"] == pytest.approx(1.875)  # mean(3.75, 0)   (medpy 0.4)
    assert scores["msd"] == pytest.approx(7.5)
    # np.percentile([0, 0, 7.5], 95): rank 0.95·2 = 1.9 → 0 + 0.9·(7.5 − 0) = 6.75
    assert scores["hd95"] == pytest.approx(6.75)
    assert scores["rmsd"] == pytest.approx(math.sqrt(7.5**2 / 3))  # sqrt(56.25/3)
    assert m.max_surface_distance(pred, ref, SPACING) == pytest.approx(7.5)
    assert m.hausdorff_distance(pred, ref, SPACING) == pytest.approx(7.5)
    assert m.hd95(pred, ref, SPACING) == pytest.approx(6.75)
    assert m.assd(pred, ref, SPACING) == pytest.approx(2.5)
    assert m.assd(pred, ref, SPACING, pooled=False) == pytest.approx(1.875)
    assert m.average_surface_distance(pred, ref, SPACING) == pytest.approx(3.75)
    assert m.rmsd(pred, ref, SPACING) == pytest.approx(math.sqrt(18.75))


def test_surface_of_a_block_shifted_in_plane_and_through_plane():
    # A 3×3×3 cube and the same cube shifted by one voxel along x (0.8 mm) and along z (2.5 mm).
    ref = np.zeros((7, 7, 7), bool)
    ref[2:5, 2:5, 2:5] = True
    # Connectivity 1 erodes only the centre voxel: 26 surface voxels.
    assert m.surface_distances(ref, ref, SPACING)[0].size == 26
    shifted_x = np.roll(ref, 1, axis=0)
    shifted_z = np.roll(ref, 1, axis=2)
    # Every surface voxel of the shifted cube is at most one step from the other surface.
    assert m.max_surface_distance(shifted_x, ref, SPACING) == pytest.approx(0.8)
    assert m.max_surface_distance(shifted_z, ref, SPACING) == pytest.approx(2.5)


def test_surface_metrics_empty_policy():
    empty = np.zeros((3, 4, 5), bool)
    full = empty.copy()
    full[1, 1:3, 2] = True
    # Default penalty: the volume's extent diagonal, sqrt((3·0.8)² + (4·0.8)² + (5·2.5)²)
    # = sqrt(5.76 + 10.24 + 156.25) = sqrt(172.25).
    diagonal = math.sqrt(172.25)
    for func in (m.assd, m.max_surface_distance, m.hd95, m.rmsd, m.average_surface_distance):
        assert func(empty, empty, SPACING) == 0.0
        assert func(empty, full, SPACING) == pytest.approx(diagonal)
        assert func(full, empty, SPACING) == pytest.approx(diagonal)
        assert math.isnan(func(full, empty, SPACING, empty_value="nan"))
        assert func(full, empty, SPACING, empty_value="lits") == m.LITS_PENALTY
        assert func(full, empty, SPACING, empty_value=m.LITS_PENALTY) == m.LITS_PENALTY
        assert func(full, empty, SPACING, empty_value=50.0) == 50.0
    with pytest.raises(ValueError, match="empty_value='largest'.*diagonal"):
        m.assd(full, empty, SPACING, empty_value="largest")
    pred_to_ref, ref_to_pred = m.surface_distances(full, empty, SPACING)
    assert pred_to_ref.size == 0 and ref_to_pred.size == 0


def random_mask(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float, level: float
) -> np.ndarray:
    """Smooth random blobs, several components, some touching the array edge."""
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("connectivity", [1, 2])
def test_surface_metrics_agree_with_medpy(seed, connectivity):
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(seed)
    shape = (26, 22, 12)
    spacing = (0.7 + 0.1 * seed, 0.74, 2.5 + 0.5 * seed)
    ref = random_mask(rng, shape, 2.0, 0.52)
    # The prediction: the reference, dilated, with a spurious blob and some voxels flipped.
    pred = ndimage.binary_dilation(ref) if seed % 2 else ndimage.binary_erosion(ref)
    pred |= random_mask(rng, shape, 1.5, 0.56)
    assert ref.any() and pred.any()
    kw = {"voxelspacing": spacing, "connectivity": connectivity}
    ours = m.surface_metrics(pred, ref, spacing, connectivity=connectivity)
    assert ours["msd"] == pytest.approx(binary.hd(pred, ref, **kw), abs=1e-6)
    assert ours["hd95"] == pytest.approx(binary.hd95(pred, ref, **kw), abs=1e-6)
    assert ours["assd"] == pytest.approx(binary.assd(pred, ref, **kw), abs=1e-6)
    assert ours["asd"] == pytest.approx(binary.asd(pred, ref, **kw), abs=1e-6)
    # RVD: ours is medpy.ravd(pred, ref); the LiTS script's is medpy.ravd(ref, pred).
    assert m.rvd(pred, ref) == pytest.approx(binary.ravd(pred, ref), abs=1e-12)
    assert m.rvd_lits(pred, ref) == pytest.approx(binary.ravd(ref, pred), abs=1e-12)
    assert m.voe(pred, ref) == pytest.approx(1.0 - binary.jc(pred, ref), abs=1e-12)
    assert m.dice(pred, ref) == pytest.approx(binary.dc(pred, ref), abs=1e-12)


def test_cropping_keeps_medpy_numbers_on_a_small_object_in_a_large_volume():
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(7)
    ref = np.zeros((96, 96, 40), bool)
    pred = np.zeros_like(ref)
    ref[40:52, 30:46, 10:18] = random_mask(rng, (12, 16, 8), 1.0, 0.5)
    pred[41:53, 30:46, 10:18] = random_mask(rng, (12, 16, 8), 1.0, 0.5)
    # An object on the array's edge: its surface includes the edge (outside is background).
    ref[0:3, 90:96, 0:2] = True
    pred[0:2, 92:96, 0:3] = True
    ours = m.surface_metrics(pred, ref, SPACING)
    assert ours["msd"] == pytest.approx(binary.hd(pred, ref, SPACING), abs=1e-6)
    assert ours["hd95"] == pytest.approx(binary.hd95(pred, ref, SPACING), abs=1e-6)
    assert ours["assd"] == pytest.approx(binary.assd(pred, ref, SPACING), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Per case and global
# ---------------------------------------------------------------------------------------------


def test_case_metrics_liver_includes_tumor_and_reports_empties():
    ref = np.zeros((6, 6, 4), np.uint8)
    ref[1:5, 1:5, :] = 1  # 64 liver voxels, no tumor
    pred = ref.copy()
    pred[1, 1, 0] = 2  # a tumor false alarm inside the liver
    scores = m.case_metrics(pred, ref, SPACING)
    # Liver is label >= 1, so the false tumor voxel is still liver: liver is perfect.
    assert scores["liver_dice"] == 1.0 and scores["liver_hd95"] == 0.0
    # 64 voxels of 0.8·0.8·2.5 = 1.6 mm³
    assert scores["liver_ref_volume_ml"] == pytest.approx(64 * 1.6 / 1000)
    assert scores["tumor_dice"] == 0.0
    assert scores["tumor_empty"] == "ref"
    # Surface distances of the false alarm: the penalty, the extent diagonal
    # sqrt((6·0.8)² + (6·0.8)² + (4·2.5)²) = sqrt(23.04 + 23.04 + 100); RVD: undefined (NaN).
    assert scores["tumor_assd"] == pytest.approx(math.sqrt(146.08))
    assert scores["tumor_surface_penalty_mm"] == pytest.approx(math.sqrt(146.08))
    assert scores["liver_surface_penalty_mm"] == 0.0
    assert math.isnan(scores["tumor_rvd"])
    counts = [scores[f"tumor_{key}"] for key in ("intersection", "pred_voxels", "ref_voxels")]
    assert counts == [0, 1, 0]
    no_tumor = m.case_metrics(ref, ref, SPACING)
    assert no_tumor["tumor_dice"] == 1.0 and no_tumor["tumor_hd95"] == 0.0
    assert no_tumor["tumor_empty"] == "both" and no_tumor["liver_empty"] == "none"
    no_liver = m.case_metrics(np.zeros_like(ref), ref, SPACING, empty_value=m.LITS_PENALTY)
    assert no_liver["liver_dice"] == 0.0 and no_liver["liver_msd"] == m.LITS_PENALTY


def test_global_dice_differs_from_mean_of_case_dice():
    # Case 1: a 1000-voxel tumor found exactly (Dice 1). Case 2: a 10-voxel tumor missed (Dice 0).
    big = np.zeros((20, 10, 10), np.uint8)
    big[...] = 1
    big[0:10, :, :] = 2
    small_ref = np.ones((20, 10, 10), np.uint8)
    small_ref[5, 5, 0:10] = 2
    small_pred = np.ones_like(small_ref)
    cases = [m.case_metrics(big, big, SPACING), m.case_metrics(small_pred, small_ref, SPACING)]
    assert np.mean([c["tumor_dice"] for c in cases]) == pytest.approx(0.5)  # (1 + 0)/2
    # Global: 2·(1000 + 0) / ((1000 + 1000) + (0 + 10)) = 2000/2010
    assert m.global_dice(cases) == pytest.approx(2000 / 2010)
    assert m.global_dice(cases, region="liver") == 1.0
    with pytest.raises(ValueError, match="case_metrics"):
        m.global_dice([{"tumor_dice": 1.0}])


# ---------------------------------------------------------------------------------------------
# Lesion detection
# ---------------------------------------------------------------------------------------------


def detection_case() -> tuple[np.ndarray, np.ndarray]:
    """Five reference lesions of 6×6×4 = 144 voxels in a liver filling a 40×40×8 volume.

    A is found exactly; B is missed; C1 and C2 are merged by one prediction; D is overlapped by
    half (IoU 1/3); one prediction lies where no lesion is.
    """
    ref = np.ones((40, 40, 8), np.uint8)
    pred = ref.copy()
    z = slice(2, 6)
    ref[2:8, 2:8, z] = 2  # A
    pred[2:8, 2:8, z] = 2  # A found
    ref[12:18, 2:8, z] = 2  # B, missed
    ref[2:8, 20:26, z] = 2  # C1
    ref[2:8, 28:34, z] = 2  # C2
    pred[2:8, 20:34, z] = 2  # one prediction over C1, the gap and C2: 6·14·4 = 336 voxels
    ref[20:26, 12:18, z] = 2  # D
    pred[23:29, 12:18, z] = 2  # half of D plus as much outside: I=72, U=216
    pred[30:34, 30:34, z] = 2  # false positive, 64 voxels
    return pred, ref


def test_lesion_detection_counts_on_known_lesions():
    pred, ref = detection_case()
    result = m.lesion_detection(pred, ref, SPACING)
    assert (result.num_ref_lesions, result.num_pred_lesions) == (5, 4)
    # IoU rule: A, C1, C2 detected; B, D missed; the FP block and D's poor match are FPs.
    assert (result.tp, result.fp, result.fn) == (3, 2, 2)
    # Any overlap: D counts as detected and its prediction is no longer a false positive.
    assert (result.tp_any_overlap, result.fp_any_overlap, result.fn_any_overlap) == (4, 1, 1)
    # scipy.ndimage.label numbers in C order: A (2,2,2), C1 (2,20,2), C2 (2,28,2), B, D.
    by_label = {record["lesion"]: record for record in result.lesions}
    a, c1, c2, b, d = (by_label[i] for i in range(1, 6))
    assert a["detected"] and a["iou"] == 1.0 and a["dice"] == 1.0 and a["group_ref_lesions"] == 1
    assert c1["detected"] and c2["detected"] and c1["group"] == c2["group"]
    assert c1["group_ref_lesions"] == 2
    assert c1["iou"] == pytest.approx(288 / 336)  # I = 144+144, U = the 336-voxel prediction
    assert c1["dice"] == pytest.approx(576 / 624)  # 2·288 / (288 + 336)
    assert not b["detected"] and not b["detected_any_overlap"] and b["dice"] == 0.0
    assert not d["detected"] and d["detected_any_overlap"]
    assert d["iou"] == pytest.approx(1 / 3)  # 72 / (144 + 144 − 72)
    # Volume: 144 voxels × 0.8·0.8·2.5 mm³ = 230.4 mm³ = 0.2304 mL; d = (6·230.4/π)^(1/3)
    assert a["volume_ml"] == pytest.approx(0.2304)
    assert a["equivalent_diameter_mm"] == pytest.approx((6 * 230.4 / math.pi) ** (1 / 3))
    # Burden: ref 5·144 = 720 tumor voxels, pred 144+336+144+64 = 688, liver 40·40·8 = 12800.
    assert result.tumor_burden_ref == pytest.approx(720 / 12800)
    assert result.tumor_burden_pred == pytest.approx(688 / 12800)
    assert result.tumor_burden_error == pytest.approx(-32 / 12800)
    assert result.to_dict()["tp"] == 3
    summed = m.detection_precision_recall([result, result])
    assert (summed["tp"], summed["fp"], summed["fn"]) == (6, 4, 4)
    assert summed["precision"] == pytest.approx(0.6) and summed["recall"] == pytest.approx(0.6)
    any_overlap = m.detection_precision_recall([result], any_overlap=True)
    assert any_overlap["recall"] == pytest.approx(0.8)  # 4 / 5


def test_two_predictions_covering_one_lesion_are_merged():
    ref = np.ones((12, 6, 6), np.uint8)
    ref[0:10, 0:4, 0:4] = 2  # 160 voxels
    pred = np.ones_like(ref)
    pred[0:4, 0:4, 0:4] = 2  # 64
    pred[6:10, 0:4, 0:4] = 2  # 64
    result = m.lesion_detection(pred, ref, SPACING)
    # Group: I = 128, U = 160 → IoU 0.8 > 0.5: one TP, and neither half is a false positive.
    assert (result.tp, result.fp, result.fn) == (1, 0, 0)
    assert result.lesions[0]["iou"] == pytest.approx(0.8)


def test_lesion_detection_without_lesions():
    liver = np.ones((5, 5, 3), np.uint8)
    result = m.lesion_detection(liver, liver, SPACING)
    assert (result.tp, result.fp, result.fn, result.lesions) == (0, 0, 0, [])
    assert result.tumor_burden_ref == 0.0
    assert m.detection_precision_recall([result])["precision"] == 1.0
    no_liver = m.lesion_detection(np.zeros_like(liver), liver, SPACING)
    assert no_liver.tumor_burden_pred == 0.0


# ---------------------------------------------------------------------------------------------
# Strata
# ---------------------------------------------------------------------------------------------


def test_lesion_size_stratum():
    assert m.lesion_size_stratum(9.999) == "small"
    assert m.lesion_size_stratum(10.0) == "large"  # the cut itself is large
    assert m.lesion_size_stratum(12.0, threshold_mm=15.0) == "small"
    with pytest.raises(ValueError, match="threshold_mm=0"):
        m.lesion_size_stratum(5.0, threshold_mm=0)
    # A sphere of radius 5 mm has an equivalent diameter of exactly 10 mm.
    assert m.equivalent_diameter_mm(4 / 3 * math.pi * 125) == pytest.approx(10.0)


def test_tumor_dice_by_stratum_scores_each_lesion_in_its_neighbourhood():
    ref = np.ones((40, 40, 10), np.uint8)
    ref[2:5, 2:5, 4:6] = 2  # small: 18 voxels × 1.6 mm³ = 28.8 mm³ → d ≈ 3.8 mm
    ref[15:30, 15:30, 2:8] = 2  # large: 1350 × 1.6 = 2160 mm³ → d ≈ 16.0 mm
    pred = ref.copy()
    pred[2:5, 2:5, 4:6] = 1  # small lesion missed...
    pred[5, 2:5, 4] = 2  # ...but 3 voxels predicted right next to it (0.8 mm away)
    pred[38, 38, 0] = 2  # a far false positive: no stratum
    strata = m.tumor_dice_by_stratum(pred, ref, SPACING)
    assert strata["small"]["n_lesions"] == 1 and strata["large"]["n_lesions"] == 1
    # small: I = 0, |P| = 3, |G| = 18 → Dice 0
    small = strata["small"]
    assert (small["intersection"], small["pred_voxels"], small["ref_voxels"]) == (0, 3, 18)
    assert strata["small"]["dice"] == 0.0
    assert strata["large"]["dice"] == 1.0 and strata["large"]["ref_voxels"] == 1350
    # With a 30 mm cut both lesions are small; their counts add up.
    both_small = m.tumor_dice_by_stratum(pred, ref, SPACING, threshold_mm=30.0)
    assert both_small["small"]["n_lesions"] == 2 and math.isnan(both_small["large"]["dice"])
    assert both_small["small"]["dice"] == pytest.approx(2 * 1350 / (1353 + 1368))
    empty = m.tumor_dice_by_stratum(np.ones_like(ref), np.ones_like(ref), SPACING)
    assert empty["small"]["n_lesions"] == 0 and math.isnan(empty["small"]["dice"])


# ---------------------------------------------------------------------------------------------
# Slice level
# ---------------------------------------------------------------------------------------------


def test_slice_level_metrics_hand_computed():
    ref = np.ones((8, 8, 4), np.uint8)
    pred = ref.copy()
    ref[2:6, 2:6, 0:2] = 2  # 16 tumor pixels on slices 0 and 1
    pred[2:6, 2:6, 0] = 2  # slice 0: perfect
    pred[2:4, 2:6, 1] = 2  # slice 1: half found (8 of 16)
    pred[0, 0, 3] = 2  # slice 3: a false alarm, not averaged but counted
    out = m.slice_level_metrics(pred, ref, SPACING, "tumor")
    assert out["n_slices"] == 2 and out["n_false_positive_slices"] == 1
    assert out["dice"] == pytest.approx((1 + 16 / 24) / 2)  # slice 1: 2·8/(8+16)
    assert out["iou"] == pytest.approx((1 + 0.5) / 2)  # slice 1: 8/16
    assert out["voe"] == pytest.approx(0.25)
    assert out["precision"] == pytest.approx(1.0)
    assert out["recall"] == pytest.approx(0.75)
    assert out["f1"] == pytest.approx(out["dice"])
    assert out["f1_of_means"] == pytest.approx(2 * 0.75 / 1.75)
    # HD95 in-plane: slice 0 is 0. Slice 1, the reference's 12 border pixels to the prediction: row 5's
    # four 2 rows away (1.6 mm), row 4's two 1 row (0.8 mm), the others 0; the prediction's 8 to the
    # reference: row 3's two inner ones 0.8 mm, the others 0. Of 12 zeros, 4 x 0.8 and 4 x 1.6 mm the
    # 95th percentile lies between two 1.6s.
    slice1 = out["slices"][1]
    assert slice1["index"] == 1 and slice1["hd95"] == pytest.approx(1.6)
    assert slice1["ref_area_mm2"] == pytest.approx(16 * 0.64)
    assert slice1["stratum"] == "small"  # sqrt(4·10.24/π) ≈ 3.6 mm
    liver = m.slice_level_metrics(pred, ref, SPACING, "liver")
    assert liver["n_slices"] == 4 and liver["dice"] == 1.0 and liver["hd95"] == 0.0


def test_slice_level_metrics_empty_prediction_slices():
    ref = np.ones((8, 8, 2), np.uint8)
    ref[2:6, 2:6, 1] = 2
    out = m.slice_level_metrics(np.ones_like(ref), ref, SPACING, "tumor")
    assert out["n_slices"] == 1 and out["dice"] == 0.0
    assert math.isnan(out["hd95"]) and out["hd95_undefined_slices"] == 1
    none = m.slice_level_metrics(ref, np.ones_like(ref), SPACING, "tumor")
    assert none["n_slices"] == 0 and math.isnan(none["dice"])
    assert none["n_false_positive_slices"] == 1


# ---------------------------------------------------------------------------------------------
# Stability and docs
# ---------------------------------------------------------------------------------------------


def test_coefficient_of_variation():
    # mean 0.9, sample std sqrt(((−0.1)² + 0 + 0.1²)/2) = 0.1 → CV 0.1/0.9
    assert m.coefficient_of_variation([0.8, 0.9, 1.0]) == pytest.approx(0.1 / 0.9)
    population = m.coefficient_of_variation([0.8, 0.9, 1.0], ddof=0)
    assert population == pytest.approx(math.sqrt(0.02 / 3) / 0.9)
    assert m.coefficient_of_variation([0.1, 0.5, 0.5], last=2) == 0.0
    assert math.isnan(m.coefficient_of_variation([0.0, 0.0]))
    with pytest.raises(ValueError, match="more than ddof=1"):
        m.coefficient_of_variation([0.5])
    with pytest.raises(ValueError, match="non-finite"):
        m.coefficient_of_variation([0.5, float("nan")])


def test_docstring_examples_run():
    result = doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20 and result.failed == 0


def test_no_tensorflow_or_medpy_imports():
    files = sorted(Path(m.__file__).parent.glob("*.py"))
    assert len(files) >= 5  # the package and its submodules
    for path in files:
        source = path.read_text(encoding="utf-8")
        for forbidden in ("import tensorflow", "import keras", "medpy import", "import medpy"):
            assert forbidden not in source, f"{path.name} has {forbidden!r}"
