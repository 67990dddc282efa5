import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_livseg import prepare as prepare_cli
from keras_livseg.data import prepare as prepare_module
from keras_livseg.data import shards
from keras_livseg.data.prepare import PrepareOptions, prepare_dataset, split_cases
from keras_livseg.data.preprocessing import Preprocessing, resize_nearest
from keras_livseg.data.volumes import DataError, discover_cases, load_case



def _options(src, out, **kw):
    base = dict(src=src, out=out, image_size=32, workers=1, progress=False, split=(0.5, 0.25, 0.25))
    base.update(kw)
    return PrepareOptions(**base)


def _parse_all(path):
    import tensorflow as tf
    from keras_livseg.data.dataset import FEATURE_SPEC

    out = []
    for record in shards.read_records(path):
        p = tf.io.parse_single_example(record, FEATURE_SPEC)
        ctx = int(p["context"])
        out.append(
            (
                p["case_id"].numpy().decode(),
                int(p["slice_index"]),
                np.frombuffer(p["image"].numpy(), np.float16).reshape(32, 32, ctx),
                np.frombuffer(p["mask"].numpy(), np.uint8).reshape(32, 32),
            )
        )
    return out


def test_manifest_splits_and_training_statistics(lits_dir, tmp_path):
    manifest = prepare_dataset(_options(lits_dir, tmp_path / "out"))
    splits = manifest["splits"]
    members = [set(splits[s]["cases"]) for s in ("train", "val", "test")]
    assert sum(map(len, members)) == 6 and set().union(*members) == {str(i) for i in range(6)}
    assert not (members[0] & members[1] or members[0] & members[2] or members[1] & members[2])
    # Standardization statistics: windowed foreground voxels of the training cases only.
    values = []
    for files in discover_cases(lits_dir):
        if files.case_id in members[0]:
            case = load_case(files)
            values.append(np.clip(case.image[case.labels > 0].astype(np.float64), -200, 250))
    values = np.concatenate(values)
    assert manifest["preprocessing"]["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert manifest["preprocessing"]["std"] == pytest.approx(values.std(), rel=1e-6)
    everything = prepare_dataset(_options(lits_dir, tmp_path / "all", split=(1, 0, 0)))
    assert everything["preprocessing"]["mean"] != pytest.approx(manifest["preprocessing"]["mean"], rel=1e-6)
    assert (tmp_path / "out" / "manifest.json").is_file() and not (tmp_path / "out" / ".work").exists()
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["slices"] == 12 * len(members[("train", "val", "test").index(split)])
    assert sum(manifest["splits"][s]["tumor_slices"] for s in splits) == 4 * 4  # 4 tumor cases, 4 slices each


def test_shards_parse_back_to_the_arrays_written(lits_dir, tmp_path):
    manifest = prepare_dataset(_options(lits_dir, tmp_path / "out", context=3))
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    (shard,) = manifest["splits"]["train"]["shards"]
    examples = _parse_all(tmp_path / "out" / shard)
    case_id, index, image, mask = examples[5]
    case = load_case(next(c for c in discover_cases(lits_dir) if c.case_id == case_id))
    expected = prep.slices_to_model_grid(case.image[:, :, [index - 1, index, index + 1]]).astype(np.float16)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(mask, resize_nearest(case.labels[:, :, index], (32, 32)))
    assert manifest["cases"][case_id]["tumor_pixels"][5] == int((mask == 2).sum())


def test_context_mm_picks_the_context_slices_that_far_apart(lits_dir, tmp_path):
    # The fixture's slices are 2.5 mm apart: context slices 5 mm apart are two slices away.
    manifest = prepare_dataset(_options(lits_dir, tmp_path / "out", context=3, context_mm=5.0))
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    assert prep.context_mm == 5.0 and prep.context_stride(2.5) == 2
    assert manifest["cases"]["0"]["spacing"][2] == 2.5
    (shard,) = manifest["splits"]["train"]["shards"]
    for case_id, index, image, _ in _parse_all(tmp_path / "out" / shard)[:12]:
        case = load_case(next(c for c in discover_cases(lits_dir) if c.case_id == case_id))
        picks = np.clip([index - 2, index, index + 2], 0, case.image.shape[2] - 1)
        np.testing.assert_array_equal(image, prep.slices_to_model_grid(case.image[:, :, picks]).astype(np.float16))
    # Asked again with adjacent slices, the finished folder is not silently reused.
    with pytest.raises(DataError, match=r"preprocessing.context_mm 5.0 \(asked None\)"):
        prepare_dataset(_options(lits_dir, tmp_path / "out", context=3, resume=True))


def test_spacing_resampling_is_what_the_shards_hold(lits_dir, tmp_path):
    # 0.8 mm pixels at 1.5 mm: a 40x48 slice becomes 21x26, then padded with air to 32x32.
    manifest = prepare_dataset(_options(lits_dir, tmp_path / "out", spacing_mm=1.5))
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    assert prep.spacing_mm == 1.5 and manifest["cases"]["0"]["spacing"][:2] == [0.8, 0.8]
    (shard,) = manifest["splits"]["train"]["shards"]
    case_id, index, image, mask = _parse_all(tmp_path / "out" / shard)[5]
    case = load_case(next(c for c in discover_cases(lits_dir) if c.case_id == case_id))
    expected = prep.slices_to_model_grid(case.image[:, :, [index]], case.spacing).astype(np.float16)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(mask, prep.labels_to_model_grid(case.labels[:, :, index], case.spacing))
    assert image[0, 0, 0] == -200.0  # padding is air (the window's low end)
    # The liver keeps its size in millimetres: 0.8 mm -> 1.5 mm scales its pixel count by (0.8/1.5)^2.
    native = int((case.labels[:, :, index] > 0).sum())
    assert abs(int((mask > 0).sum()) - native * (0.8 / 1.5) ** 2) <= 0.15 * native * (0.8 / 1.5) ** 2


def test_zero_spacing_in_a_header_is_one_clear_error(tmp_path):
    import nibabel as nib
    from data_helpers import write_case

    image_path, _ = write_case(tmp_path / "src", "0")
    image = nib.load(str(image_path))
    header = image.header.copy()
    header.set_qform(None, code=0)
    header.set_sform(np.diag([0.0, -0.8, 2.5, 1.0]), code=1)  # an export that lost its pixel spacing
    header["pixdim"][1] = 0.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), None, header=header), str(image_path))
    with pytest.raises(DataError, match=r"volume-0\.nii\.gz has voxel spacing .* header"):
        prepare_dataset(_options(tmp_path / "src", tmp_path / "out", split=(1, 0, 0)))


def test_cli_refuses_a_header_without_spacing_in_one_line(lits_dir, tmp_path, capsys, strip_spacing):
    strip_spacing(lits_dir / "volume-3.nii.gz")  # nibabel alone would read it as 1 mm voxels
    code = prepare_cli.main(["--src", str(lits_dir), "--out", str(tmp_path / "out"), "--image-size", "32",
                             "--workers", "1", "--no-progress"])  # no worker processes forked from pytest's
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("prepare: error: ") and "volume-3.nii.gz has voxel spacing (0.0, 0.0, 0.0) mm" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    # In a process of its own, where nibabel's own handler writes to the real stderr: still one line.
    done = subprocess.run([sys.executable, "-m", "keras_livseg.prepare", "--src", str(lits_dir), "--out",
                           str(tmp_path / "out2"), "--image-size", "32", "--no-progress"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "nibabel.global" not in done.stderr and "setting 0 dims" not in done.stderr, done.stderr
    assert [line for line in lines if not line.startswith("I ")] == [lines[-1]]  # progress lines, then the error
    assert lines[-1].startswith("prepare: error: ") and "volume-3.nii.gz has voxel spacing" in lines[-1]


def test_byte_identical_whatever_the_workers(lits_dir, tmp_path):
    prepare_dataset(_options(lits_dir, tmp_path / "a", workers=1, compression="GZIP"))
    prepare_dataset(_options(lits_dir, tmp_path / "b", workers=2, compression="GZIP"))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert any(n.endswith(".tfrecord.gz") for n in names)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_split_asked_for_that_rounds_to_no_case_is_warned_about(lits_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="keras_livseg.data.prepare"):
        manifest = prepare_dataset(_options(lits_dir, tmp_path / "out", split=(0.85, 0.05, 0.1)))
    assert manifest["splits"]["val"]["cases"] == [] and len(manifest["splits"]["test"]["cases"]) == 1
    warned = [r.getMessage() for r in caplog.records if "gets no case" in r.getMessage()]
    assert warned == ["the val split gets no case: 0.05 of 6 patient(s) rounds to none; give it a larger fraction, "
                      "or more cases, or measure with fit --folds"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="keras_livseg.data.prepare"):
        prepare_dataset(_options(lits_dir, tmp_path / "none", split=(1.0, 0.0, 0.0)))  # asked for none: no warning
    assert not [r for r in caplog.records if "gets no case" in r.getMessage()]


def test_split_is_by_patient_and_seeded():
    ids = [str(i) for i in range(20)]
    a, b = split_cases(ids, (0.7, 0.15, 0.15), 1), split_cases(ids, (0.7, 0.15, 0.15), 2)
    assert [len(a[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert a == split_cases(ids, (0.7, 0.15, 0.15), 1) and a != b
    assert split_cases(["x"], (0.7, 0.15, 0.15), 0) == {"train": ["x"], "val": [], "test": []}


def test_liver_slices_with_margin(lits_dir, tmp_path):
    manifest = prepare_dataset(_options(lits_dir, tmp_path / "out", slices="liver", margin=1))
    # Liver on slices 2..9 of 12: with a margin of 1, slices 1..10.
    assert manifest["cases"]["0"]["slice_indices"] == list(range(1, 11))


def test_refuses_finished_output_without_overwrite(lits_dir, tmp_path):
    prepare_dataset(_options(lits_dir, tmp_path / "out"))
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        prepare_dataset(_options(lits_dir, tmp_path / "out"))
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    prepare_dataset(_options(lits_dir, tmp_path / "out", overwrite=True, image_size=16))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["preprocessing"]["image_size"] == [16, 16]


def test_overwrite_stopped_by_a_bad_case_leaves_the_finished_run_as_it_was(lits_dir, tmp_path, monkeypatch):
    """--overwrite removes the old run only once every new case has been read: a bad scan in the
    new source stops the run and the old manifest and shards are still there, byte for byte."""
    out = tmp_path / "out"
    prepare_dataset(_options(lits_dir, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "manifest.json" in before and any(".tfrecord" in name for name in before)
    (lits_dir / "segmentation-5.nii.gz").write_bytes(b"garbage")  # the last case: 0-4 are done
    with pytest.raises(DataError, match="segmentation-5.nii.gz"):
        prepare_dataset(_options(lits_dir, out, overwrite=True, image_size=16))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert prepare_module.load_manifest(out)["preprocessing"]["image_size"] == [32, 32]
    # The scan fixed, --resume continues the replacement: only that case is read again.
    from data_helpers import write_case

    write_case(lits_dir, "5", seed=5, tumor=False)
    calls, real = [], prepare_module.process_case
    monkeypatch.setattr(prepare_module, "process_case", lambda f, o, w: (calls.append(f.case_id), real(f, o, w))[1])
    replaced = prepare_dataset(_options(lits_dir, out, resume=True, image_size=16))
    assert calls == ["5"] and replaced["preprocessing"]["image_size"] == [16, 16]
    names = {p.name for p in out.iterdir()}
    listed = {name for split in replaced["splits"].values() for name in split["shards"]}
    assert names == listed | {"manifest.json"}  # the old shards are gone, nothing else is left


def test_a_fresh_run_leaves_files_it_did_not_write_alone(lits_dir, tmp_path):
    """Only the shards a replaced run's manifest lists are removed: a foreign shard-like file stays."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000-of-00009.tfrecord").write_bytes(b"someone else's")
    prepare_dataset(_options(lits_dir, out))
    assert (out / "train-00000-of-00009.tfrecord").read_bytes() == b"someone else's"
    prepare_dataset(_options(lits_dir, out, overwrite=True, image_size=16))
    assert (out / "train-00000-of-00009.tfrecord").read_bytes() == b"someone else's"


def test_resume_of_a_finished_identical_run_is_success(lits_dir, tmp_path, capsys):
    """A scheduler reruns a job with --resume: a complete output is reported and left as it is."""
    out = tmp_path / "out"
    first = prepare_dataset(_options(lits_dir, out))
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()}
    again = prepare_dataset(_options(lits_dir, out, resume=True))
    assert again["cases"] == first["cases"] and again["preprocessing"] == first["preprocessing"]
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir() if p.is_file()} == files
    # Asked for something else: one line naming what differs, nothing touched.
    with pytest.raises(DataError, match=r"differs from this one \(preprocessing.image_size \[32, 32\] \(asked \[16, 16\]\)\).*--overwrite"):
        prepare_dataset(_options(lits_dir, out, resume=True, image_size=16))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {k: v[0] for k, v in files.items()}
    # The command says so and exits 0.
    from keras_livseg import prepare as prepare_cli

    code = prepare_cli.main(["--src", str(lits_dir), "--out", str(out), "--image-size", "32", "--split", "0.5,0.25,0.25",
                             "--workers", "1", "--resume"])
    assert code == 0, capsys.readouterr().err


def test_shard_checksums_are_recorded_and_a_changed_shard_is_named(lits_dir, tmp_path):
    from keras_livseg.data.prepare import load_manifest, sha256_file, verify_shards

    out = tmp_path / "out"
    prepare_dataset(_options(lits_dir, out))
    manifest = load_manifest(out)
    names = [name for split in manifest["splits"].values() for name in split["shards"]]
    assert names and all(manifest["splits"][s]["shard_sha256"][n] == sha256_file(out / n)
                         for s in manifest["splits"] for n in manifest["splits"][s]["shards"])
    assert verify_shards(manifest) == len(names)
    shard = out / names[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {re.escape(str(shard))} does not match its SHA-256.*--overwrite"):
        verify_shards(manifest)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(DataError, match="bytes, the manifest says"):
        verify_shards(manifest)
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        verify_shards(manifest)


def test_interrupted_run_resumes_only_missing_cases(lits_dir, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    prepare_dataset(_options(lits_dir, reference))
    out = tmp_path / "out"
    real = prepare_module.process_case
    calls = []

    def dying(files, options, work_dir):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(files.case_id)
        return real(files, options, work_dir)

    monkeypatch.setattr(prepare_module, "process_case", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(_options(lits_dir, out))
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tfrecord"))
    with pytest.raises(DataError, match="unfinished prepare run; pass --resume"):
        prepare_dataset(_options(lits_dir, out))
    calls.clear()
    monkeypatch.setattr(prepare_module, "process_case", lambda f, o, w: (calls.append(f.case_id), real(f, o, w))[1])
    prepare_dataset(_options(lits_dir, out, resume=True))
    assert calls == ["3", "4", "5"]
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes()


def test_skip_bad_case_is_recorded(lits_dir, tmp_path):
    (lits_dir / "segmentation-2.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="segmentation-2.nii.gz"):
        prepare_dataset(_options(lits_dir, tmp_path / "stop"))
    assert not (tmp_path / "stop" / "manifest.json").exists()
    manifest = prepare_dataset(_options(lits_dir, tmp_path / "skip", on_error="skip"))
    assert [s["case_id"] for s in manifest["skipped"]] == ["2"] and "2" not in manifest["cases"]


def test_real_scan_padding_is_clipped_by_the_window(real_data_dir, tmp_path):
    manifest = prepare_dataset(_options(real_data_dir / "dcmqi-ct-3slice", tmp_path / "out", split=(1, 0, 0)))
    (shard,) = manifest["splits"]["train"]["shards"]
    images = np.stack([e[2] for e in _parse_all(tmp_path / "out" / shard)]).astype(np.float32)
    assert images.min() == -200.0 and images.max() <= 250.0
    assert manifest["cases"]["3slice"]["image_sha256"] == prepare_module.sha256_file(
        real_data_dir / "dcmqi-ct-3slice" / "volume-3slice.nii.gz"
    )


def test_cli_label_map_on_totalsegmentator_csv(real_data_dir, tmp_path, capsys):
    folder = real_data_dir / "totalseg-example-ct"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"image,label\n{folder / 'example_ct_sm.nii.gz'},{folder / 'example_seg.nii.gz'}\n")
    assert prepare_cli.main(["--src", str(pairs), "--out", str(tmp_path / "bad"), "--image-size", "32", "--no-progress"]) == 2
    assert "--label-map" in capsys.readouterr().err
    code = prepare_cli.main(
        ["--src", str(pairs), "--out", str(tmp_path / "ok"), "--image-size", "32", "--label-map", "5:1", "--no-progress"]
    )
    assert code == 0
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["class_pixels"][1] > 0 and manifest["label_map"] == {"5": 1}


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "keras_livseg.prepare", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"prepare: error: no cases found in {tmp_path / 'empty'}; expected volume-N.nii[.gz] with segmentation-N.nii[.gz] (LiTS), imagesTr/ with labelsTr/ (MSD), or a .csv of image,label pairs"]
    assert "Traceback" not in result.stderr


def test_recipe_values_and_unknown_keys(lits_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data]\nsrc = "{lits_dir}"\nout = "{tmp_path / "o"}"\nworkers = 1\n[preprocessing]\nimage_size = 16\n')
    assert prepare_cli.main(["--pipeline", str(recipe), "--no-progress"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["preprocessing"]["image_size"] == [16, 16]
    parse = prepare_cli.build_parser().parse_args
    recipe.write_text(recipe.read_text() + "context = 3\ncontext_mm = 4.5\n")
    assert prepare_cli.options_from_args(parse(["--pipeline", str(recipe)])).preprocessing().context_mm == 4.5
    assert prepare_cli.options_from_args(parse(["--pipeline", str(recipe), "--context-mm", "2"])).context_mm == 2.0
    recipe.write_text('[data]\nsorce = "x"\n')
    with pytest.raises(ValueError, match="unknown key sorce in \\[data\\]; valid keys: .*src"):
        prepare_cli.options_from_args(prepare_cli.build_parser().parse_args(["--pipeline", str(recipe)]))


def test_per_volume_statistics_match_what_predict_computes(lits_dir, tmp_path):
    from keras_livseg.data.preprocessing import volume_statistics
    from keras_livseg.inference.volume import _streaming_volume_statistics

    manifest = prepare_dataset(_options(lits_dir, tmp_path / "out", normalization="volume"))
    for files in discover_cases(lits_dir):
        case = load_case(files)
        stored = manifest["cases"][files.case_id]["volume_statistics"]
        whole = volume_statistics(Preprocessing().window_hu(case.image))
        streamed = _streaming_volume_statistics(case.image, (-200.0, 250.0), chunk=5)
        assert (stored["mean"], stored["std"]) == pytest.approx(whole, rel=1e-9)
        assert streamed == pytest.approx(whole, rel=1e-9)


# -- patients, folds and explicit assignments ------------------------------------------------


def test_split_keeps_a_patients_scans_together():
    ids = [f"{p}{s}" for p in "abcdefghij" for s in ("1", "2")]  # 10 patients, 2 scans each
    patients = {cid: cid[0] for cid in ids}
    for seed in range(5):
        parts = split_cases(ids, (0.6, 0.2, 0.2), seed, patients)
        owners = {split: {patients[c] for c in parts[split]} for split in parts}
        assert not (owners["train"] & owners["val"] or owners["train"] & owners["test"] or owners["val"] & owners["test"])
        assert [len(owners[s]) for s in ("train", "val", "test")] == [6, 2, 2]


def test_folds_by_patient_cover_every_case_once():
    ids = [str(i) for i in range(7)]
    patients = {"0": "A", "1": "A", "2": "B", "3": "C", "4": "C", "5": "D", "6": "E"}
    folds = prepare_module.assign_folds(ids, 3, seed=1, patients=patients)
    assert sorted(c for fold in folds for c in fold) == sorted(ids)
    fold_of_patient = {}
    for index, fold in enumerate(folds):
        for cid in fold:
            assert fold_of_patient.setdefault(patients[cid], index) == index  # no patient in two folds
    assert sorted(len({patients[c] for c in fold}) for fold in folds) == [1, 2, 2]  # 5 patients dealt round-robin
    assert prepare_module.assign_folds(ids, 5, seed=0, patients=patients) != [[]] * 5
    with pytest.raises(DataError, match=r"--folds 6 needs at least 6 patients but the data holds 5 .* pass --folds 5"):
        prepare_module.assign_folds(ids, 6, patients=patients)
    with pytest.raises(DataError, match="at least 2"):
        prepare_module.assign_folds(ids, 1)


def test_csv_patient_column_and_explicit_assignment(lits_dir, tmp_path):
    rows = ["image,label,case_id,patient"]
    for i in range(6):
        rows.append(f"{lits_dir}/volume-{i}.nii.gz,{lits_dir}/segmentation-{i}.nii.gz,{i},P{i // 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    cases = discover_cases(tmp_path / "pairs.csv")
    assert [c.patient for c in cases] == ["P0", "P0", "P1", "P1", "P2", "P2"]
    manifest = prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "split", split=(0.34, 0.33, 0.33)))
    by_patient = {}
    for cid, record in manifest["cases"].items():
        by_patient.setdefault(record["patient"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in by_patient.values()), by_patient
    assignment = {str(i): ("test" if i in (2, 3) else "train") for i in range(6)}
    fixed = prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "fold", assignment=assignment))
    assert fixed["splits"]["test"]["cases"] == ["2", "3"] and fixed["splits"]["val"]["cases"] == []
    assert fixed["split"]["assignment"] == assignment
    with pytest.raises(DataError, match="no entry for cases 5"):
        prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "bad", assignment={str(i): "train" for i in range(5)}))


# -- stratified splits and folds -------------------------------------------------------------


def _strata_layout(sizes):
    """Case ids and their strata: ``sizes[k]`` cases in stratum ``s<k>``."""
    strata = {}
    for k, size in enumerate(sizes):
        strata.update({f"s{k}-{i}": f"s{k}" for i in range(size)})
    return strata


@pytest.mark.parametrize("sizes", [(5, 13, 1, 2, 40, 35), (1, 1, 1, 1, 1, 1, 1, 1, 1, 1), (60, 3), (7,)])
@pytest.mark.parametrize("fractions", [(0.67, 0.16, 0.17), (0.6, 0.2, 0.2), (0.5, 0.0, 0.5)])
def test_stratified_split_shares_every_stratum_in_proportion(sizes, fractions):
    strata = _strata_layout(sizes)
    ids = list(strata)
    for seed in range(6):
        plain = split_cases(ids, fractions, seed)
        parts = split_cases(ids, fractions, seed, strata=strata)
        assert parts == split_cases(ids, fractions, seed, strata=strata)  # seeded
        # The same split sizes as unstratified, every case exactly once.
        assert {s: len(v) for s, v in parts.items()} == {s: len(v) for s, v in plain.items()}
        assert sorted(c for v in parts.values() for c in v) == sorted(ids)
        for split, members in parts.items():
            for stratum, size in enumerate(sizes):
                count = sum(strata[c] == f"s{stratum}" for c in members)
                share = size * len(members) / len(ids)
                # The stratum's share, rounded down or up (controlled rounding), never further.
                assert math.floor(share + 1e-9) <= count <= math.ceil(share - 1e-9), (split, stratum, count, share)


def test_stratified_split_keeps_patients_together_and_differs_by_seed():
    ids = [f"{p}{s}" for p in "abcdefghijklmnopqrst" for s in ("1", "2")]  # 20 patients, 2 scans each
    patients = {cid: cid[0] for cid in ids}
    strata = {cid: "rare" if cid[0] in "abcde" else "common" for cid in ids}
    seen = set()
    for seed in range(8):
        parts = split_cases(ids, (0.6, 0.2, 0.2), seed, patients, strata)
        owners = {split: {patients[c] for c in parts[split]} for split in parts}
        assert not (owners["train"] & owners["val"] or owners["train"] & owners["test"] or owners["val"] & owners["test"])
        assert [len(owners[s]) for s in ("train", "val", "test")] == [12, 4, 4]
        assert sorted(sum(p in "abcde" for p in owners[s]) for s in ("val", "test")) in ([1, 1], [1, 2], [0, 1])
        seen.add(tuple(parts["test"]))
    assert len(seen) > 4  # the seed still chooses which patients


def test_stratified_folds_deal_each_stratum_evenly():
    strata = _strata_layout((5, 13, 2, 9))
    ids = list(strata)
    for seed in range(4):
        folds = prepare_module.assign_folds(ids, 3, seed=seed, strata=strata)
        assert sorted(c for fold in folds for c in fold) == sorted(ids)
        for stratum in range(4):
            counts = [sum(strata[c] == f"s{stratum}" for c in fold) for fold in folds]
            assert max(counts) - min(counts) <= 1, (stratum, counts)
    # Unstratified, 5 rare cases of 29 in 3 folds land unevenly for some seed; stratified never.
    rare = {c for c in ids if strata[c] == "s0"}
    spreads = [max(sum(c in rare for c in f) for f in prepare_module.assign_folds(ids, 3, seed=s)) for s in range(20)]
    assert max(spreads) >= 3


def test_csv_stratum_column_stratifies_prepare_and_is_recorded(lits_dir, tmp_path):
    rows = ["image,label,case_id,stratum"]
    for i in range(6):
        rows.append(f"{lits_dir}/volume-{i}.nii.gz,{lits_dir}/segmentation-{i}.nii.gz,{i},{'A' if i < 2 else 'B'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    assert [c.stratum for c in discover_cases(tmp_path / "pairs.csv")] == ["A", "A", "B", "B", "B", "B"]
    manifest = prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "out", split=(0.5, 0.0, 0.5), stratify=True))
    assert manifest["split"]["stratify"] is True
    # Half of each stratum in test: one A and two B.
    assert manifest["split"]["strata"]["test"] == {"A": 1, "B": 2}
    assert manifest["split"]["strata"]["train"] == {"A": 1, "B": 2}
    assert {cid: record["stratum"] for cid, record in manifest["cases"].items()} == {
        str(i): "A" if i < 2 else "B" for i in range(6)}
    # An unstratified finished run is not the same run: resume says what differs.
    with pytest.raises(DataError, match=r"stratify True \(asked False\)"):
        prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "out", split=(0.5, 0.0, 0.5), resume=True))
    plain = prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "plain", split=(0.5, 0.0, 0.5)))
    assert plain["split"]["stratify"] is False and plain["split"]["strata"] is None
    assert "stratum" not in plain["cases"]["0"]


def test_stratify_needs_every_case_or_no_case_to_name_a_stratum(lits_dir, tmp_path, capsys, caplog):
    rows = ["image,label,case_id,stratum"]
    for i in range(6):
        rows.append(f"{lits_dir}/volume-{i}.nii.gz,{lits_dir}/segmentation-{i}.nii.gz,{i},{'A' if i % 2 else ''}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    code = prepare_cli.main(["--src", str(tmp_path / "pairs.csv"), "--out", str(out), "--image-size", "32",
                             "--stratify", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "a stratified split needs every case's stratum, and 3 case(s) have none (0, 2, 4)" in err
    assert "'stratum' column" in err and "--set data.stratify=false" in err and "Traceback" not in err
    assert not out.exists()  # refused before any case was read
    # A source that names no stratum at all (real scans in the LiTS layout): split as usual, and said.
    with caplog.at_level("WARNING"):
        manifest = prepare_dataset(_options(lits_dir, tmp_path / "plain", stratify=True))
    assert "no stratum to stratify by" in caplog.text
    assert manifest["split"]["stratify"] is True and manifest["split"]["strata"] is None
    unstratified = prepare_dataset(_options(lits_dir, tmp_path / "same"))
    assert [manifest["splits"][s]["cases"] for s in ("train", "val", "test")] == [
        unstratified["splits"][s]["cases"] for s in ("train", "val", "test")]
    with pytest.raises(DataError, match="stratify must be true or false"):
        prepare_dataset(_options(lits_dir, tmp_path / "x", stratify="yes"))


def test_unstratified_splits_and_folds_are_those_of_before_strata():
    """The seed gives the same split as it always did (pinned from the code before stratification)."""
    ids = [str(i) for i in range(12)]
    assert split_cases(ids, (0.5, 0.25, 0.25), 0)["test"] == ["2", "3", "9"]
    assert split_cases(ids, (0.5, 0.25, 0.25), 3)["val"] == ["10", "5", "9"]  # sorted as strings
    assert prepare_module.assign_folds(ids, 3, seed=1)[0] == ["1", "5", "6", "8"]
    # One stratum for everyone is no stratification: the same split.
    one = {cid: "all" for cid in ids}
    assert split_cases(ids, (0.5, 0.25, 0.25), 0, strata=one) == split_cases(ids, (0.5, 0.25, 0.25), 0)
    assert prepare_module.assign_folds(ids, 3, seed=1, strata=one) == prepare_module.assign_folds(ids, 3, seed=1)


def test_a_small_stratum_keeps_its_training_share_and_a_case_without_stratum_is_named():
    strata = {"a": "s0", "b1": "s1", "b2": "s1", "c": "s2"}
    for seed in range(20):
        parts = split_cases(list(strata), (0.7, 0.15, 0.15), seed, strata=strata)
        assert sum(strata[c] == "s1" for c in parts["train"]) == 1  # its share is exactly 1.0
    with pytest.raises(DataError, match="case.s. b2 have no stratum"):
        split_cases(list(strata), (0.7, 0.15, 0.15), 0, strata={k: v for k, v in strata.items() if k != "b2"})
    with pytest.raises(DataError, match="case.s. b2 have no stratum"):
        prepare_module.assign_folds(list(strata), 2, strata={k: v for k, v in strata.items() if k != "b2"})


def test_resume_refuses_a_finished_run_whose_strata_changed(lits_dir, tmp_path):
    def pairs(second):
        rows = ["image,label,case_id,stratum"] + [
            f"{lits_dir}/volume-{i}.nii.gz,{lits_dir}/segmentation-{i}.nii.gz,{i},{'A' if i < 2 else second}"
            for i in range(6)]
        (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")

    pairs("B")
    settings = dict(split=(0.5, 0.0, 0.5), stratify=True, resume=True)
    prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "out", **settings))
    assert prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "out", **settings))["split"]["stratify"]
    pairs("C")
    with pytest.raises(DataError, match=r"differs from this one \(strata of 4 case\(s\) \(2, 3, 4 ...\)\)"):
        prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "out", **settings))
