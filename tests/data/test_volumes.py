import dataclasses
import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from keras_livseg.data.volumes import (
    DataError,
    apply_label_map,
    check_headers,
    discover_cases,
    from_canonical,
    image_zooms,
    load_case,
    load_nifti,
    parse_label_map,
    save_like,
    to_canonical,
)

from data_helpers import write_case


def test_discover_lits_layout_natural_order(tmp_path):
    for case_id in ["10", "2", "1"]:
        write_case(tmp_path, case_id)
    write_case(tmp_path, "3", gz=False)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["1", "2", "3", "10"]
    assert cases[2].image.name == "volume-3.nii" and cases[2].label.name == "segmentation-3.nii"


def test_discover_msd_layout(tmp_path):
    image, label = write_case(tmp_path / "tmp", "0")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    image.rename(tmp_path / "imagesTr" / "liver_7.nii.gz")
    label.rename(tmp_path / "labelsTr" / "liver_7.nii.gz")
    (cases,) = discover_cases(tmp_path)
    assert cases.case_id == "liver_7" and cases.label == tmp_path / "labelsTr" / "liver_7.nii.gz"


def test_discover_csv_relative_paths(tmp_path):
    image, label = write_case(tmp_path / "d", "5")
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,label,case_id\nd/volume-5.nii.gz,d/segmentation-5.nii.gz,patient5\n")
    (case,) = discover_cases(csv)
    assert case.case_id == "patient5" and case.image == image and case.label == label


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda d: None, "no cases found"),
        (lambda d: write_case(d, "1")[1].unlink(), "has no segmentation-1"),
        (lambda d: (write_case(d, "1"), write_case(d, "1", gz=False)), "two cases share the id '1'"),
    ],
)
def test_discover_errors(tmp_path, setup, fragment):
    setup(tmp_path)
    with pytest.raises(DataError, match=fragment):
        discover_cases(tmp_path)


def test_discover_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nope")


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([-0.8, -0.8, 2.5, 1.0]),  # L, P, S (DICOM-derived, LiTS)
        np.diag([0.8, 0.8, 2.5, 1.0]),  # R, A, S
        np.array([[0, 0.7, 0, 0], [-0.9, 0, 0, 0], [0, 0, -2.0, 0], [0, 0, 0, 1.0]]),  # permuted and flipped
    ],
)
def test_canonical_round_trip_voxel_for_voxel(tmp_path, affine):
    image_path, _ = write_case(tmp_path, "1", shape=(10, 14, 6), affine=affine)
    case = load_case(discover_cases(tmp_path)[0])
    assert nib.aff2axcodes(case.original_affine) == nib.aff2axcodes(affine)
    native = np.asarray(nib.load(str(image_path)).dataobj)
    assert np.array_equal(from_canonical(case.image, case.original_affine), native)
    out = save_like(case.labels, case.original_affine, tmp_path / "out" / "segmentation-1.nii.gz")
    written = nib.load(str(out))
    assert written.shape == native.shape and np.allclose(written.affine, affine)


def test_canonical_orientation_is_PLS():
    # Identity affine = RAS: indices grow toward the patient's Right, Anterior, Superior.
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    data = np.zeros((3, 4, 2))
    data[0, 3, 0] = 1  # x=0: the patient's leftmost voxel; y=3: the most anterior
    canonical = to_canonical(data, affine)
    assert canonical.shape == (4, 3, 2)
    # Canonical rows run anterior→posterior (most anterior = row 0) and columns run the
    # patient's right→left (leftmost = last column).
    assert canonical[0, 2, 0] == 1


def test_spacing_follows_canonical_axes(tmp_path):
    affine = np.array([[0, 0.7, 0, 0], [-0.9, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])
    write_case(tmp_path, "1", shape=(10, 14, 6), affine=affine)
    case = load_case(discover_cases(tmp_path)[0])
    # File axis 0 runs posterior (0.9 mm), axis 1 runs right→... 0.7 mm; canonical rows are A→P.
    assert case.spacing == pytest.approx((0.9, 0.7, 2.0))
    assert case.image.shape == (10, 14, 6)


def test_label_map_on_real_totalsegmentator(real_data_dir):
    folder = real_data_dir / "totalseg-example-ct"
    from keras_livseg.data.volumes import CaseFiles

    files = CaseFiles("ts", folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz")
    with pytest.raises(DataError, match="--label-map 5:1"):
        load_case(files)
    case = load_case(files, parse_label_map("5:1"))
    raw = np.asarray(nib.load(str(folder / "example_seg.nii.gz")).dataobj)
    assert set(np.unique(case.labels)) == {0, 1}
    assert int(case.labels.sum()) == int((raw == 5).sum()) > 1000


def test_apply_and_parse_label_map():
    assert parse_label_map("5:1, 13:2") == {5: 1, 13: 2}
    assert parse_label_map(None) is None
    assert apply_label_map(np.array([0, 5, 7, 13]), {5: 1, 13: 2}).tolist() == [0, 1, 0, 2]
    with pytest.raises(DataError, match="bad --label-map entry 'x'"):
        parse_label_map("x")
    with pytest.raises(DataError, match="not a class"):
        parse_label_map("5:4")


def _save(path: Path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda d: _save(d / "segmentation-1.nii.gz", np.zeros((5, 5, 5), np.uint8)), "same grid"),
        (lambda d: _save(d / "segmentation-1.nii.gz", np.zeros((40, 48, 12), np.uint8), np.diag([2, 2, 2, 1.0])), "different affines"),
        (lambda d: _save(d / "segmentation-1.nii.gz", np.full((40, 48, 12), 7, np.uint8), np.diag([-0.8, -0.8, 2.5, 1])), "outside 0"),
        (lambda d: _save(d / "volume-1.nii.gz", np.full((40, 48, 12), np.nan, np.float32), np.diag([-0.8, -0.8, 2.5, 1])), "NaN"),
        (lambda d: _save(d / "volume-1.nii.gz", np.zeros((40, 48), np.int16)), "must be 3D"),
        (lambda d: _save(d / "volume-1.nii.gz", np.zeros((40, 48, 12, 2), np.int16)), "must be 3D"),
        (lambda d: (d / "volume-1.nii.gz").write_bytes((d / "volume-1.nii.gz").read_bytes()[:3000]), "truncated or corrupt|not a readable"),
        (lambda d: (d / "volume-1.nii.gz").write_bytes(b"not a nifti at all"), "not a readable NIfTI"),
    ],
)
def test_bad_cases_name_the_file(tmp_path, damage, fragment):
    write_case(tmp_path, "1")
    damage(tmp_path)
    with pytest.raises(DataError, match=fragment) as error:
        load_case(discover_cases(tmp_path)[0])
    assert "-1.nii.gz" in str(error.value)


@pytest.mark.parametrize("cut", [1, 2, 351])
def test_a_nii_short_of_its_data_is_refused_from_the_header(tmp_path, cut):
    """nibabel resets a loaded header's vox_offset to 0: the 352 header bytes must still count."""
    path = tmp_path / "volume-1.nii"
    _save(path, np.zeros((8, 8, 4), np.int16))
    assert path.stat().st_size == 352 + 8 * 8 * 4 * 2
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(DataError, match=f"holds {path.stat().st_size:,} bytes but its header needs 864"):
        load_nifti(path)


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])])
def test_a_data_type_that_is_not_real_numbers_is_refused_from_the_header(tmp_path, dtype):
    path = tmp_path / "volume-1.nii.gz"
    _save(path, np.zeros((8, 8, 4), dtype))
    with pytest.raises(DataError, match="must hold real numbers"):
        check_headers(discover_cases(tmp_path, require_labels=False))


def test_check_headers_reads_no_voxels_and_checks_dicom_series_from_their_headers(tmp_path, monkeypatch, real_data_dir):
    pydicom = pytest.importorskip("pydicom")
    write_case(tmp_path, "1")
    shutil.copytree(real_data_dir / "dcmqi-ct-3slice" / "dicom", tmp_path / "series")
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", lambda *a, **k: pytest.fail("voxels were read"))
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("pixels were decoded")))
    cases = discover_cases(tmp_path)
    series_case = dataclasses.replace(cases[0], image=tmp_path / "series")
    check_headers([*cases, series_case])
    damaged = tmp_path / "series" / "02.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    with pytest.raises(DataError, match="02.dcm: its pixel data is cut short"):
        check_headers([*cases, series_case])


def test_singleton_fourth_axis_is_accepted(tmp_path):
    write_case(tmp_path, "1")
    hu = np.asarray(nib.load(str(tmp_path / "volume-1.nii.gz")).dataobj)
    _save(tmp_path / "volume-1.nii.gz", hu[..., None], np.diag([-0.8, -0.8, 2.5, 1]))
    case = load_case(discover_cases(tmp_path)[0])
    assert case.image.shape == (48, 40, 12)


def test_real_dcmqi_scan_loads(real_data_dir):
    case = load_case(discover_cases(real_data_dir / "dcmqi-ct-3slice")[0])
    assert case.image.shape == (512, 512, 3) and case.image.dtype == np.int16
    assert case.image.min() == -3024 and set(np.unique(case.labels)) == {0, 1}
    assert case.spacing == pytest.approx((0.8105, 0.8105, 1.0), abs=1e-3)


@pytest.mark.parametrize("shape, dtype, slope", [((40, 48, 12), np.int16, None), ((9, 7, 5, 1), np.uint8, None),
                                                   ((9, 7, 5), np.int16, (0.5, -1024.0)), ((9, 7, 5), np.float32, None)])
def test_gzip_volumes_read_exactly_as_nibabel_reads_them(tmp_path, shape, dtype, slope, monkeypatch):
    from keras_livseg.data import volumes

    monkeypatch.setattr(volumes, "_GZIP_CHUNK", 999)  # many chunks, none aligned to a voxel

    data = np.random.default_rng(0).integers(-1000, 1000, shape).astype(dtype)
    image = nib.Nifti1Image(data, np.diag([-0.8, -0.8, 2.5, 1]))
    image.header.set_data_dtype(dtype)
    if slope:
        image.header.set_slope_inter(*slope)
    path = tmp_path / "volume-1.nii.gz"
    nib.save(image, str(path))
    loaded = nib.load(str(path))
    assert volumes.igzip is not None  # installed with the package: predict's reading speed rests on it
    fast = volumes._read_gzip_proxy(loaded.dataobj)
    assert fast is not None and fast.dtype == loaded.dataobj.get_unscaled().dtype
    np.testing.assert_array_equal(fast, loaded.dataobj.get_unscaled())
    expected = np.asarray(loaded.dataobj, np.float32)
    np.testing.assert_array_equal(volumes.read_array(loaded, path), expected.reshape(expected.shape[:3]))
    uncompressed = tmp_path / "volume-2.nii"
    nib.save(image, str(uncompressed))
    assert volumes._read_gzip_proxy(nib.load(str(uncompressed)).dataobj) is None  # nibabel's memory map instead


def test_damaged_gzip_data_is_refused_by_its_checksum(tmp_path):
    """A byte changed inside the compressed data: the gzip CRC fails, where nibabel returned wrong voxels."""
    write_case(tmp_path, "1")
    path = tmp_path / "volume-1.nii.gz"
    raw = bytearray(path.read_bytes())
    for offset in range(len(raw) // 2, len(raw) - 16):
        damaged = raw.copy()
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        try:  # some flips break the deflate stream itself; find one that only changes voxels
            np.asarray(nib.load(str(path)).dataobj)
        except Exception:
            continue
        break
    with pytest.raises(DataError, match="volume-1.nii.gz is truncated or corrupt .*CRC"):
        load_case(discover_cases(tmp_path)[0])


def test_gzip_trailer_cut_or_followed_by_bytes_is_read_as_nibabel_reads_it(tmp_path, monkeypatch):
    """Complete data with its trailer cut off, or other bytes after it: read as nibabel reads it."""
    from keras_livseg.data import volumes

    monkeypatch.setattr(volumes, "_GZIP_CHUNK", 1000)
    write_case(tmp_path, "1")
    path = tmp_path / "volume-1.nii.gz"
    expected = np.asarray(nib.load(str(path)).dataobj)
    raw = path.read_bytes()
    for name, data in (("cut", raw[:-4]), ("followed", raw + b"not gzip")):
        damaged = tmp_path / f"{name}.nii.gz"
        damaged.write_bytes(data)
        got = volumes.read_array(nib.load(str(damaged)), damaged)  # ISA-L hands such a file to nibabel
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["segmentation-1.nii.gz", "segmentation-1.nii"])
def test_written_nifti_holds_the_bytes_nibabel_writes(tmp_path, name):
    """ISA-L's deflate: another compressed stream, the same file inside it (header, offset, voxels)."""
    import gzip

    from keras_livseg.data import volumes

    data = (np.random.default_rng(0).random((40, 30, 7)) * 3).astype(np.uint8)
    image = nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1]))
    image.set_data_dtype(np.uint8)
    (tmp_path / "ours").mkdir()
    ours = volumes.write_nifti(image, tmp_path / "ours" / name)
    theirs = tmp_path / name
    nib.save(image, str(theirs))
    if name.endswith(".gz"):
        assert volumes.igzip is not None  # installed with the package
        assert gzip.open(ours).read() == gzip.open(theirs).read()  # zlib's reader opens it, as any reader does
    else:
        assert ours.read_bytes() == theirs.read_bytes()
    assert [p.name for p in ours.parent.iterdir()] == [name]  # no temporary left beside it


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_one_image_written_twice_is_the_same_bytes(tmp_path, monkeypatch, deflate):
    """The gzip header holds no name (the temporary's carries the process id) and no time."""
    import gzip

    from keras_livseg.data import atomic, volumes

    if deflate == "zlib":
        monkeypatch.setattr(volumes, "igzip", None)
    image = nib.Nifti1Image((np.arange(8 * 6 * 3) % 3).astype(np.uint8).reshape(8, 6, 3), np.eye(4))
    (tmp_path / "first").mkdir()
    first = volumes.write_nifti(image, tmp_path / "first" / "segmentation-1.nii.gz")
    monkeypatch.setattr(atomic.os, "getpid", lambda: 4242)  # another process: another temporary name
    monkeypatch.setattr(gzip.time, "time", lambda: 2_000_000_000.0)  # another second
    second = volumes.write_nifti(image, tmp_path / "segmentation-1.nii.gz")
    assert first.read_bytes() == second.read_bytes()
    header = second.read_bytes()[:10]
    assert header[3] & 0x08 == 0 and header[4:8] == bytes(4)  # no FNAME flag, MTIME 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(second).dataobj), np.asanyarray(image.dataobj))


def test_reproducible_writes_deflate_with_zlib_where_isal_is_installed(tmp_path, monkeypatch):
    """``reproducible=True`` gives zlib's stream (what a machine without ISA-L writes), not ISA-L's."""
    from keras_livseg.data import volumes

    assert volumes.igzip is not None  # installed with the package: otherwise both sides below are zlib's
    labels = (np.random.default_rng(1).random((24, 20, 6)) * 3).astype(np.uint8)
    image = nib.Nifti1Image(labels, np.diag([0.8, 0.8, 2.0, 1]))
    image.set_data_dtype(np.uint8)
    for name in ("fast", "reproducible", "zlib"):
        (tmp_path / name).mkdir()
    fast = volumes.write_nifti(image, tmp_path / "fast" / "s.nii.gz")
    reproducible = volumes.write_nifti(image, tmp_path / "reproducible" / "s.nii.gz", reproducible=True)
    monkeypatch.setattr(volumes, "igzip", None)
    zlib_only = volumes.write_nifti(image, tmp_path / "zlib" / "s.nii.gz")
    assert reproducible.read_bytes() == zlib_only.read_bytes()
    assert reproducible.read_bytes() != fast.read_bytes()  # the two libraries' streams differ
    assert gzip.decompress(reproducible.read_bytes()) == gzip.decompress(fast.read_bytes())


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from keras_livseg.data import volumes

    path = tmp_path / "segmentation-1.nii.gz"
    path.write_bytes(b"the previous prediction")
    image = nib.Nifti1Image(np.zeros((4, 4, 2), np.uint8), np.eye(4))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", fail)
    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        volumes.write_nifti(image, path)
    assert path.read_bytes() == b"the previous prediction"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_header_without_spacing_is_refused_not_read_as_1_mm(tmp_path, strip_spacing):
    image_path, _ = write_case(tmp_path, "0")
    strip_spacing(image_path)
    assert nib.load(str(image_path)).header.get_zooms()[:3] == (1.0, 1.0, 1.0)  # what nibabel alone reads
    with pytest.raises(DataError, match=r"volume-0\.nii\.gz has voxel spacing \(0\.0, 0\.0, 0\.0\) mm .*pixdim"):
        image_zooms(nib.load(str(image_path)), image_path)
    with pytest.raises(DataError, match=r"volume-0\.nii\.gz has voxel spacing"):
        load_case(discover_cases(tmp_path)[0])
    with pytest.raises(DataError, match=r"volume-0\.nii\.gz has voxel spacing"):
        check_headers(discover_cases(tmp_path))


def _rewrite_header(path: Path, edit) -> None:
    image = nib.Nifti1Image(np.asanyarray(nib.load(str(path)).dataobj), None)
    edit(image.header)  # after the constructor, which would fill pixdim in
    nib.save(image, str(path))


def test_a_qform_only_header_with_zero_pixdim_is_refused(tmp_path):
    image_path, _ = write_case(tmp_path, "0")

    def qform_only(header):
        header.set_qform(np.diag([-0.8, -0.8, 2.5, 1.0]), code=1)
        header.set_sform(None, code=0)
        header["pixdim"][3] = 0.0  # the qform takes its scales from pixdim

    _rewrite_header(image_path, qform_only)
    with pytest.raises(DataError, match=r"\(0\.8, 0\.8, 0\.0\) mm"):
        image_zooms(nib.load(str(image_path)), image_path)


def test_pixdim_alone_gives_the_spacing_when_it_is_set(tmp_path):
    def pixdim_only(header):
        header.set_sform(None, code=0)
        header.set_qform(None, code=0)
        header.set_zooms((0.7, 0.75, 3.0))

    for path in write_case(tmp_path, "0"):
        _rewrite_header(path, pixdim_only)
    image_path = tmp_path / "volume-0.nii.gz"
    assert image_zooms(nib.load(str(image_path)), image_path) == pytest.approx((0.7, 0.75, 3.0))
    assert sorted(load_case(discover_cases(tmp_path)[0]).spacing) == pytest.approx([0.7, 0.75, 3.0])


def test_a_negative_pixdim_is_read_as_its_size_as_nibabel_reads_it(tmp_path):
    def negative(header):
        header.set_sform(None, code=0)
        header.set_qform(None, code=0)
        header["pixdim"][1:4] = [-0.7, 0.75, 3.0]

    for path in write_case(tmp_path, "0"):
        _rewrite_header(path, negative)
    image_path = tmp_path / "volume-0.nii.gz"
    assert image_zooms(nib.load(str(image_path)), image_path) == pytest.approx((0.7, 0.75, 3.0))
