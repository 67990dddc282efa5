"""Tests of the synthetic CT phantom (library and command), on tiny volumes."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from keras_livseg import phantom as phantom_cli
from keras_livseg.data.phantom import (
    DOMINANT_MASS_SHARE,
    LARGE_LEFT_LOBE_SHARE,
    LARGE_TUMOR_MIN_MM,
    LIVER_HU_BY_PHASE,
    PAD_VALUES_HU,
    PHASES,
    SMALL_TUMOR_MAX_MM,
    HYPER_LESION_CASES,
    LITS_GROUPS,
    iter_phantom_cases,
    lits_slice_counts,
    make_phantom_case,
    tumor_free_cases,
    write_phantom_dataset,
)

TINY = dict(size=64, slices=(16, 16))


@pytest.fixture(scope="module")
def case_set():
    """A 12-case set at 96 x 96 x 16: big enough for a few-mm lesion to show."""
    return [case for _, case in iter_phantom_cases(12, seed=0, size=96, slices=(16, 20))]


def best_threshold_dice(volume: np.ndarray, liver: np.ndarray) -> float:
    """Best Dice of ``lo <= HU <= hi`` against the liver, over all 2-HU intervals in [-200, 300]."""
    edges = np.arange(-200, 302, 2)
    inside = np.histogram(volume[liver], edges)[0]
    outside = np.histogram(volume[~liver], edges)[0]
    cin = np.concatenate([[0], np.cumsum(inside)])
    cout = np.concatenate([[0], np.cumsum(outside)])
    lo, hi = np.triu_indices(len(edges), k=1)
    tp = cin[hi] - cin[lo]
    predicted = tp + cout[hi] - cout[lo]
    return float((2 * tp / (liver.sum() + predicted)).max())


def test_same_seed_same_bytes_and_different_seed_differs():
    a, b, c = make_phantom_case(5, **TINY), make_phantom_case(5, **TINY), make_phantom_case(6, **TINY)
    assert a.volume_hu.tobytes() == b.volume_hu.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.volume_hu.shape != c.volume_hu.shape or a.volume_hu.tobytes() != c.volume_hu.tobytes()


def test_dtypes_shape_and_label_values():
    case = make_phantom_case(1, **TINY)
    assert case.volume_hu.dtype == np.int16 and case.labels.dtype == np.uint8
    assert case.volume_hu.shape == case.labels.shape == (64, 64, 16)
    assert set(np.unique(case.labels).tolist()) <= {0, 1, 2}
    assert case.affine.shape == (4, 4)


def test_affine_is_lps_with_the_case_spacing():
    case = make_phantom_case(2, **TINY)
    assert nib.aff2axcodes(case.affine) == ("L", "P", "S")
    dx, dy, dz = case.spacing
    np.testing.assert_allclose(np.diag(case.affine)[:3], [-dx, -dy, dz])


def test_tumor_lies_inside_the_liver(case_set):
    checked, shells = 0, []
    for case in case_set:
        tumor = case.labels == 2
        if not tumor.any():
            continue
        components, count = ndimage.label(tumor)
        for index in range(1, count + 1):
            lesion = components == index
            shell = ndimage.binary_dilation(lesion) & ~lesion
            # Surrounded by liver: a lesion at the liver's edge (or at the hilum, whose portal
            # trunk is background) may touch background on one side.
            inside = (case.labels[shell] == 1).mean()
            assert inside >= 0.35
            shells.append((inside, lesion.sum()))
            checked += 1
    assert checked > 0
    fractions, sizes = np.array(shells).T
    assert np.average(fractions, weights=sizes) >= 0.75  # lesions lie within the liver as a rule


def test_liver_on_the_patients_right_by_the_affine(case_set):
    for case in case_set:
        ijk_liver = np.argwhere(case.labels >= 1).mean(axis=0)
        ijk_body = np.argwhere(case.volume_hu > -500).mean(axis=0)
        x_liver = nib.affines.apply_affine(case.affine, ijk_liver)[0]
        x_body = nib.affines.apply_affine(case.affine, ijk_body)[0]
        assert x_liver > x_body + 10.0  # RAS+: larger x is the patient's right


def test_liver_hu_and_that_no_threshold_segments_it(case_set):
    for case in case_set[:4]:
        liver = case.labels == 1
        lo, hi = LIVER_HU_BY_PHASE[case.phase]
        assert lo <= case.liver_hu <= hi
        assert lo - 10.0 <= case.volume_hu[liver].mean() <= hi + 15.0  # vessels brighten it a little
        assert best_threshold_dice(case.volume_hu, case.labels >= 1) < 0.8


def test_some_slices_have_no_liver(case_set):
    for case in case_set:
        per_slice = (case.labels >= 1).any(axis=(0, 1))
        assert per_slice.any() and not per_slice.all()


def test_set_has_hypo_hyper_small_large_and_tumor_free_cases(case_set):
    lesions = [t for case in case_set for t in case.tumors if t.voxels > 0]
    kinds = {t.kind for t in lesions}
    assert kinds == {"hypo", "hyper"}
    assert any(t.diameter_mm < SMALL_TUMOR_MAX_MM for t in lesions)
    assert any(t.diameter_mm >= LARGE_TUMOR_MIN_MM for t in lesions)
    free = [not (case.labels == 2).any() for case in case_set]
    assert free == tumor_free_cases(12, seed=0) and 1 <= sum(free) <= 3
    with_tumor = [case for case in case_set if case.tumors]
    with_large = [c for c in with_tumor if max(t.diameter_mm for t in c.tumors) >= LARGE_TUMOR_MIN_MM]
    assert len(with_large) >= len(with_tumor) / 2


def test_large_left_lobes_reach_the_left_flank_and_dominant_masses_occur():
    """Some livers reach far toward the left flank; some cases carry a mass of over 55 mm."""
    cases = [case for _, case in iter_phantom_cases(24, seed=5, size=64, slices=(40, 40))]
    large = np.array([case.anatomy["large_left_lobe"] for case in cases])
    assert 0.15 <= large.mean() <= 0.5 and 0 < LARGE_LEFT_LOBE_SHARE < 0.5

    def reach(case) -> float:
        # How far left the liver gets (i runs toward the patient's left), in body half-widths
        # from each slice's body midline; the most over the liver's slices.
        liver, most = case.labels >= 1, -1.0
        for k in np.flatnonzero(liver.any(axis=(0, 1))):
            ii = np.flatnonzero((case.volume_hu[:, :, k] > -400).any(axis=1))
            leftmost = np.flatnonzero(liver[:, :, k].any(axis=1))[-1]
            most = max(most, (leftmost - (ii[0] + ii[-1]) / 2) / ((ii[-1] - ii[0]) / 2))
        return most

    reaches = np.array([reach(case) for case in cases])
    assert reaches[large].mean() > reaches[~large].mean() + 0.1
    biggest = [max(t.diameter_mm for t in case.tumors) for case in cases if case.tumors]
    assert any(d > 55.0 for d in biggest) and max(biggest) <= 100.0 and DOMINANT_MASS_SHARE <= 0.2


def test_lesion_kind_follows_the_contrast_phase():
    """Bright lesions mostly in the arterial phase; darker than the liver in the portal phase."""
    kinds: dict[str, list[str]] = {}
    for _, case in iter_phantom_cases(48, seed=3, size=48, slices=(8, 8)):
        kinds.setdefault(case.phase, []).extend(t.kind for t in case.tumors)
    portal = kinds["portal"]
    assert len(portal) >= 20 and portal.count("hyper") / len(portal) < 0.35
    assert HYPER_LESION_CASES["arterial"] > 0.5 > HYPER_LESION_CASES["portal"]
    arterial = [k for phase in ("arterial",) for k in kinds.get(phase, [])]
    if len(arterial) >= 8:
        assert arterial.count("hyper") / len(arterial) > portal.count("hyper") / len(portal)


def test_lesion_contrast_against_liver(case_set):
    for case in case_set:
        for lesion in case.tumors:
            if lesion.kind == "hypo":
                assert -60.0 <= lesion.contrast_hu <= -20.0
            else:
                assert 30.0 <= lesion.contrast_hu <= 60.0


def test_air_padding_and_bone(case_set):
    for case in case_set[:4]:
        volume = case.volume_hu
        assert case.pad_hu in PAD_VALUES_HU
        assert volume[0, 0, 0] == case.pad_hu and (volume == case.pad_hu).mean() > 0.1
        in_field_air = volume[volume.shape[0] // 2, 2:6, :]  # in the field, in front of the body
        assert abs(float(np.median(in_field_air)) + 1000.0) < 20.0
        assert volume.max() >= 300
    assert {case.pad_hu for case in case_set} == set(PAD_VALUES_HU)


def test_spacing_varies_across_cases():
    cases = [case for _, case in iter_phantom_cases(4, seed=3, size=32, slices=(40, 64))]
    in_plane = {round(c.spacing[0], 3) for c in cases}
    thickness = {round(c.spacing[2], 3) for c in cases}
    counts = {c.volume_hu.shape[2] for c in cases}
    assert len(in_plane) == len(thickness) == 4 and len(counts) > 1
    assert all(0.55 * 16 <= c.spacing[0] <= 1.0 * 16 + 1e-6 for c in cases)  # 512 / 32 = 16
    assert all(1.0 <= c.spacing[2] <= 5.0 for c in cases)


def test_case_depends_only_on_seed_and_index():
    first = [c for _, c in iter_phantom_cases(3, seed=9, **TINY)]
    again = [c for _, c in iter_phantom_cases(1, seed=9, **TINY)]
    assert first[0].volume_hu.tobytes() == again[0].volume_hu.tobytes()


@pytest.mark.parametrize("bad", [dict(size=16), dict(slices=(5, 2)), dict(spacing_mm=(1.0,))])
def test_bad_arguments_raise_value_error(bad):
    with pytest.raises(ValueError):
        make_phantom_case(0, **{**TINY, **bad})


def test_written_files_round_trip(tmp_path):
    paths = write_phantom_dataset(tmp_path, cases=2, seed=4, **TINY)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["phantom.json", "segmentation-0.nii.gz", "segmentation-1.nii.gz", "volume-0.nii.gz", "volume-1.nii.gz"]
    assert [p.name for p in paths][:2] == ["volume-0.nii.gz", "segmentation-0.nii.gz"]
    expected = make_phantom_case(np.random.SeedSequence(4).spawn(2)[1], tumor_free=tumor_free_cases(2, 4)[1], **TINY)
    volume, labels = nib.load(tmp_path / "volume-1.nii.gz"), nib.load(tmp_path / "segmentation-1.nii.gz")
    assert volume.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(volume.dataobj), expected.volume_hu)
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj), expected.labels)
    np.testing.assert_allclose(volume.affine, expected.affine, atol=1e-5)
    np.testing.assert_allclose(volume.header.get_zooms(), expected.spacing, rtol=1e-5)
    assert volume.header["sform_code"] == 1 and volume.header["qform_code"] == 1
    meta = json.loads((tmp_path / "phantom.json").read_text())
    assert [c["volume"] for c in meta["cases"]] == ["volume-0.nii.gz", "volume-1.nii.gz"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_lits_slice_counts_have_lits_total_range_and_index_groups():
    counts = lits_slice_counts(0)
    assert len(counts) == 131 and sum(counts) == 58_638
    assert min(counts) == 74 and max(counts) == 987
    start = 0
    for n, total in LITS_GROUPS:
        assert sum(counts[start:start + n]) == total
        start += n
    assert counts == lits_slice_counts(0) and counts != lits_slice_counts(1)
    assert sum(lits_slice_counts(1)) == 58_638
    assert len(set(counts)) > 100  # drawn, not a handful of repeated values


def test_slice_counts_and_workers_give_the_same_files(tmp_path):
    counts = [9, 12, 10]
    one = write_phantom_dataset(tmp_path / "one", cases=3, seed=2, size=32, slice_counts=counts)
    two = write_phantom_dataset(tmp_path / "two", cases=3, seed=2, size=32, slice_counts=counts, workers=2)
    assert [p.name for p in one] == [p.name for p in two]
    for a, b in zip(one[:-1], two[:-1]):
        # The NIfTI inside first (header and voxels), then byte for byte: the gzip header names neither
        # the writing process's temporary file nor the time, so only the deflate stream could differ.
        inside_a, inside_b = gzip.decompress(a.read_bytes()), gzip.decompress(b.read_bytes())
        assert inside_a[:352] == inside_b[:352], f"{a.name}: NIfTI headers differ"
        assert inside_a == inside_b, f"{a.name}: voxels differ"
        assert a.read_bytes() == b.read_bytes(), f"{a.name}: same NIfTI, deflated differently"
    assert [nib.load(tmp_path / "one" / f"volume-{i}.nii.gz").shape[2] for i in range(3)] == counts
    assert json.loads(one[-1].read_text()) == json.loads(two[-1].read_text())
    assert json.loads(one[-1].read_text())["slice_counts"] == counts
    with pytest.raises(ValueError, match="one per case"):
        write_phantom_dataset(tmp_path / "bad", cases=3, size=32, slice_counts=[9, 9])
    with pytest.raises(ValueError, match="workers"):
        write_phantom_dataset(tmp_path / "bad", cases=1, size=32, slices=(8, 8), workers=0)


def test_phantom_files_are_deflated_by_zlib_not_isal(tmp_path, monkeypatch):
    """Written with ``reproducible=True``: ISA-L's stream once differed in a spawned worker."""
    from keras_livseg.data import volumes

    class NoIsal:
        def __getattr__(self, name):
            raise AssertionError("the phantom's files must not go through ISA-L")

    monkeypatch.setattr(volumes, "igzip", NoIsal())
    paths = write_phantom_dataset(tmp_path, cases=1, seed=0, size=32, slices=(8, 8))
    assert nib.load(paths[0]).shape == (32, 32, 8)


def _thread_variables() -> dict:
    import os

    return {name: os.environ.get(name) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def test_worker_processes_get_one_blas_thread_each_and_the_environment_is_restored(monkeypatch):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from keras_livseg.data import phantom

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own setting is kept
    with phantom._one_blas_thread_each(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        child = pool.submit(_thread_variables).result()
    assert child == {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3"}
    assert _thread_variables() == {"OPENBLAS_NUM_THREADS": None, "OMP_NUM_THREADS": None, "MKL_NUM_THREADS": "3"}


def test_existing_files_need_overwrite(tmp_path):
    write_phantom_dataset(tmp_path, cases=1, seed=0, **TINY)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_phantom_dataset(tmp_path, cases=1, seed=0, **TINY)
    write_phantom_dataset(tmp_path, cases=1, seed=0, overwrite=True, gzip=False, **TINY)
    assert (tmp_path / "volume-0.nii").is_file()


def test_cli_writes_files_and_returns_zero(tmp_path, capsys):
    out = tmp_path / "ph"
    status = phantom_cli.main(["--out", str(out), "--cases", "2", "--seed", "1", "--size", "48", "--slices", "12:14"])
    assert status == 0
    assert {p.name for p in out.glob("*.nii.gz")} == {
        "volume-0.nii.gz", "volume-1.nii.gz", "segmentation-0.nii.gz", "segmentation-1.nii.gz",
    }
    assert "wrote 2 phantom case(s)" in capsys.readouterr().out
    assert phantom_cli.main(["--out", str(out), "--cases", "1", "--size", "48", "--slices", "12", "--no-gzip"]) == 0
    assert nib.load(out / "volume-0.nii").shape == (48, 48, 12)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", "0"], "cases must be a positive integer"),
        (["--size", "8"], "size must be an integer >= 32"),
        (["--out", "/proc/phantom-here"], "phantom-here"),
        (["--lits-sized"], "--slices cannot be combined with --lits-sized"),
        (["--workers", "0"], "workers must be a positive integer"),
    ],
)
def test_cli_bad_arguments_give_one_line(tmp_path, capsys, argv, message):
    args = ["--out", str(tmp_path / "x"), "--size", "32", "--slices", "8"] + argv
    status = phantom_cli.main(args)
    err = capsys.readouterr().err
    assert status != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0]
    assert "Traceback" not in err


def test_cli_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert phantom_cli.main(["--out", str(target), "--size", "32", "--slices", "8"]) != 0
    assert "not a folder" in capsys.readouterr().err


def test_cli_rejects_a_bad_slice_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        phantom_cli.main(["--out", "x", "--slices", "9:3"])
    assert exit_info.value.code == 2
    assert "MIN:MAX" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Realism: phases, gallbladder, lungs and heart, table, vessels
# ----------------------------------------------------------------------------------------

MID = dict(size=96, slices=(40, 40))


def _cases_by_phase(**kwargs) -> dict:
    found = {}
    for seed in range(200):
        case = make_phantom_case(seed, **kwargs)
        found.setdefault(case.phase, case)
        if len(found) == len(PHASES):
            return found
    raise AssertionError(f"not every phase drawn in 200 seeds: {sorted(found)}")


def test_phase_changes_liver_and_vessel_hu_in_the_documented_direction():
    cases = _cases_by_phase(**TINY)
    # The median inside the eroded liver: at 64 px a one-voxel rim is mostly partial volume with fat.
    liver = {phase: float(np.median(case.volume_hu[ndimage.binary_erosion(case.labels == 1)]))
             for phase, case in cases.items()}
    for phase, case in cases.items():
        lo, hi = LIVER_HU_BY_PHASE[phase]
        assert lo <= case.liver_hu <= hi
        assert case.anatomy["phase"] == phase
    # Contrast raises the liver: portal venous brightest, then delayed; unenhanced darkest.
    drawn = {phase: case.liver_hu for phase, case in cases.items()}
    assert drawn["portal"] > drawn["delayed"] > drawn["non_contrast"]
    assert drawn["arterial"] > drawn["non_contrast"]
    assert liver["portal"] > liver["delayed"] > liver["non_contrast"]  # as measured, with noise
    hu = {phase: case.anatomy["hu"] for phase, case in cases.items()}
    assert hu["portal"]["portal"] > hu["portal"]["liver"] + 30  # bright portal veins
    assert hu["portal"]["hepatic"] > hu["portal"]["liver"]
    assert hu["non_contrast"]["portal"] < hu["non_contrast"]["liver"]  # darker unenhanced blood
    assert hu["non_contrast"]["hepatic"] < hu["non_contrast"]["liver"]
    assert hu["arterial"]["aorta"] == max(h["aorta"] for h in hu.values())
    assert hu["arterial"]["hepatic"] < hu["arterial"]["liver"]  # hepatic veins not yet filled
    assert max(h["aorta"] for h in hu.values()) >= 250 and hu["non_contrast"]["aorta"] <= 50


def test_portal_phase_is_the_commonest():
    phases = [case.phase for _, case in iter_phantom_cases(40, seed=11, size=32, slices=(8, 8))]
    counts = {phase: phases.count(phase) for phase in PHASES}
    assert max(counts, key=counts.get) == "portal" and counts["portal"] >= 15
    assert len([p for p in PHASES if counts[p]]) >= 3


def test_portal_phase_liver_has_bright_vessels_inside():
    case = next(c for c in _cases_by_phase(**MID).values() if c.phase == "portal")
    values = case.volume_hu[ndimage.binary_erosion(case.labels == 1, iterations=2)]
    # A tail of voxels well above the parenchyma: the portal and hepatic veins (labelled liver).
    assert (values > case.liver_hu + 40).mean() > 0.01


def test_gallbladder_is_fluid_background_at_the_livers_surface():
    checked = 0
    for seed in range(30):
        case = make_phantom_case(seed, **MID)
        gb = case.anatomy["gallbladder"]
        if gb is None:
            continue
        neck, fundus = np.array(gb["neck_ijk"]), np.array(gb["fundus_ijk"])
        middle = np.rint((neck + fundus) / 2).astype(int)
        if not ((middle >= 2).all() and (middle < np.array(case.labels.shape) - 2).all()):
            continue
        i, j, k = middle
        patch = case.volume_hu[i - 1 : i + 2, j - 1 : j + 2, k]
        hu = case.anatomy["hu"]["gallbladder"]
        assert 0.0 <= hu <= 25.0
        assert -15.0 <= float(np.median(patch)) <= 40.0  # fluid, with noise
        assert (case.labels[i - 1 : i + 2, j - 1 : j + 2, k] == 0).all()
        # It lies in the fossa: liver within a few millimetres of its wall.
        reach = int(np.ceil((gb["radius_mm"] + 8.0) / case.spacing[0]))
        around = case.labels[max(i - reach, 0) : i + reach + 1, max(j - reach, 0) : j + reach + 1, k]
        assert (around >= 1).any()
        checked += 1
        if checked == 3:
            break
    assert checked >= 1


def test_top_slices_show_lung_bases_above_the_liver(case_set):
    for case in case_set:
        liver_slices = np.flatnonzero((case.labels >= 1).any(axis=(0, 1)))
        top = case.volume_hu[:, :, liver_slices[-1] + 1 :]
        assert top.shape[2] >= 1
        lung = (top > -920) & (top < -760)
        assert lung.mean() > 0.01  # lung parenchyma, not air (-1000) nor padding
        assert (top[:, :, -1] > 100).any()  # heart, aorta or bone in the top slice


def test_scanner_table_lies_below_the_body():
    seen = 0
    for _, case in iter_phantom_cases(6, seed=2, **MID):
        j_top, i = case.anatomy["table_top_j"], case.anatomy["table_i"]
        if j_top is None:
            continue
        column = case.volume_hu[i, :, :]  # (rows, slices)
        body_rows = np.flatnonzero((column[:j_top] > -300).any(axis=1))
        assert body_rows.size and body_rows.max() < j_top
        gap = column[body_rows.max() + 1 : j_top - 1]
        shell = column[j_top - 1 : j_top + int(np.ceil(30.0 / case.spacing[1]))]  # shells and core
        # Denser than the air between back and table in every slice (blurred at coarse pixels).
        assert (shell.max(axis=0) > -500).all()
        assert gap.size == 0 or (gap.min(axis=0) < -800).all()
        seen += 1
    assert seen >= 3


def test_new_fields_are_deterministic_and_json_friendly(tmp_path):
    a, b = make_phantom_case(3, **TINY), make_phantom_case(3, **TINY)
    assert a.phase == b.phase and a.anatomy == b.anatomy
    json.dumps(a.anatomy)
    write_phantom_dataset(tmp_path, cases=1, seed=0, **TINY)
    meta = json.loads((tmp_path / "phantom.json").read_text())
    assert meta["cases"][0]["phase"] in PHASES


def test_top_slice_shows_the_heart_as_a_large_blood_pool_in_front():
    """Above the liver, contrast-filled heart chambers: a blob at the phase's blood HU larger
    than the aorta (a 30 mm disc at least, the aorta's ~25 mm), in front of the body's centre."""
    checked = 0
    for _, case in iter_phantom_cases(10, seed=0, **MID):
        if case.phase not in ("portal", "delayed"):  # unenhanced blood is soft tissue's HU; arterial-phase
            continue                                  # chambers fill unevenly (a smaller pool at one HU)
        top = ndimage.median_filter(case.volume_hu[:, :, -1].astype(np.float32), 3)
        band = np.abs(top - case.anatomy["hu"]["heart_blood"]) < 30
        blobs, count = ndimage.label(band)
        assert count, case.phase
        sizes = ndimage.sum_labels(band, blobs, range(1, count + 1))
        heart = blobs == 1 + int(np.argmax(sizes))
        assert heart.sum() * case.spacing[0] * case.spacing[1] > np.pi * 15.0**2
        body_rows = np.nonzero(top > -500)[1]
        assert np.nonzero(heart)[1].mean() < body_rows.mean()  # anterior: smaller row index
        checked += 1
    assert checked >= 5


def test_gas_lies_in_the_bowel_and_stomach_at_the_front():
    """Air-dense voxels inside the body below the diaphragm (the lower half of the liver's slices,
    below the lung bases) in most cases, more of them in front of the body's centre than behind."""
    with_gas = 0
    for _, case in iter_phantom_cases(8, seed=4, **MID):
        liver_slices = np.flatnonzero((case.labels >= 1).any(axis=(0, 1)))
        low = case.volume_hu[:, :, liver_slices[0] : liver_slices[len(liver_slices) // 2]]
        body = ndimage.binary_fill_holes(low > -500, structure=np.ones((3, 3, 1), bool))
        gas = body & (low < -950)  # air, not lung parenchyma (-920 .. -760) nor fat
        if gas.sum() < 5:
            continue
        rows = np.nonzero(gas)[1]
        centre = np.nonzero(body)[1].mean()
        assert (rows < centre).mean() > 0.5, case.phase
        with_gas += 1
    assert with_gas >= 6


def test_streaks_fan_out_as_stripes_that_change_from_slice_to_slice(monkeypatch):
    """The same case rendered with and without its streaks differs inside the body only, by
    stripes (the sign flips many times across a row) that move from slice to slice."""
    from keras_livseg.data import phantom as phantom_module

    seed = next(s for s in range(40) if make_phantom_case(s, **MID).anatomy["streaks"])
    streaked = make_phantom_case(seed, **MID).volume_hu.astype(np.float32)
    monkeypatch.setattr(phantom_module._Builder, "_streak_plane", lambda self, k: np.zeros_like(self.streak_theta))
    plain = make_phantom_case(seed, **MID).volume_hu.astype(np.float32)  # the same noise: only the streaks differ
    difference = streaked - plain
    body = ndimage.binary_erosion(plain > -500, iterations=2)
    assert difference[body].std() > 2.0
    assert (difference[plain <= -1000] == 0).all()  # padding and outside air untouched
    k = plain.shape[2] // 2
    centre_row = int(round(np.nonzero(body[:, :, k])[1].mean()))
    across = difference[:, centre_row, k][body[:, centre_row, k]]
    assert (np.diff(np.sign(across - across.mean())) != 0).sum() >= 6
    assert np.abs(difference[:, :, k] - difference[:, :, k - 8])[body[:, :, k] & body[:, :, k - 8]].mean() > 1.0
