"""The Beam engine of ``prepare`` writes exactly what the local engine writes."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from keras_livseg import prepare as prepare_cli
from keras_livseg.data import prepare as prepare_module
from keras_livseg.data.prepare import PrepareOptions, load_manifest, prepare_dataset
from keras_livseg.data.prepare_beam import pipeline_options, prepare_with_beam
from keras_livseg.data.preprocessing import ForegroundStatistics
from keras_livseg.data.volumes import DataError, discover_cases, load_case


def _options(src, out, **kw):
    base = dict(src=src, out=out, image_size=32, workers=1, progress=False, split=(0.5, 0.25, 0.25))
    base.update(kw)
    return PrepareOptions(**base)


def _same_folder(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_beam_output_is_byte_identical_to_the_local_engine(lits_dir, tmp_path):
    # Several shards per split (tiny shard_mb), 3-slice context, GZIP and liver slices: every step of the plan.
    settings = dict(shard_mb=0.05, context=3, compression="GZIP", slices="liver", margin=1)
    local = prepare_dataset(_options(lits_dir, tmp_path / "local", **settings))
    assert len(local["splits"]["train"]["shards"]) > 1
    for workers in (1, 2):  # in-process, then two worker processes
        beam = prepare_with_beam(_options(lits_dir, tmp_path / f"beam{workers}", workers=workers, **settings))
        assert beam["splits"] == local["splits"] and beam["preprocessing"] == local["preprocessing"]
        _same_folder(tmp_path / "local", tmp_path / f"beam{workers}")


def test_statistics_are_the_training_split_foreground_only(lits_dir, tmp_path):
    manifest = prepare_with_beam(_options(lits_dir, tmp_path / "out"))
    train = set(manifest["splits"]["train"]["cases"])
    stats = ForegroundStatistics((-200.0, 250.0))
    for files in discover_cases(lits_dir):
        if files.case_id in train:
            case = load_case(files)
            stats.update(np.clip(case.image[case.labels > 0], -200, 250))
    assert manifest["preprocessing"]["mean"] == pytest.approx(stats.mean, rel=1e-9)
    assert manifest["preprocessing"]["std"] == pytest.approx(stats.std, rel=1e-6)
    assert manifest["statistics"]["foreground"]["voxels"] == stats.count
    assert not (tmp_path / "out" / ".work").exists()


def test_a_bad_case_stops_without_a_manifest_then_resume_redoes_only_it(lits_dir, tmp_path, monkeypatch):
    good = (lits_dir / "segmentation-2.nii.gz").read_bytes()
    (lits_dir / "segmentation-2.nii.gz").write_bytes(b"garbage")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="segmentation-2.nii.gz"):
        prepare_with_beam(_options(lits_dir, out))
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tfrecord"))
    finished = sorted(p.stem for p in (out / ".work").glob("*.tfrecord"))
    assert finished == ["0", "1", "3", "4", "5"]  # the other cases' work is kept for --resume
    skipped = prepare_with_beam(_options(lits_dir, tmp_path / "skip", on_error="skip"))
    assert [s["case_id"] for s in skipped["skipped"]] == ["2"] and "2" not in skipped["cases"]

    (lits_dir / "segmentation-2.nii.gz").write_bytes(good)
    calls, real = [], prepare_module.process_case
    # One worker runs in this process, so the patched function is the one Beam calls.
    monkeypatch.setattr(prepare_module, "process_case", lambda f, o, w: (calls.append(f.case_id), real(f, o, w))[1])
    manifest = prepare_with_beam(_options(lits_dir, out, resume=True))
    assert calls == ["2"] and sorted(manifest["cases"]) == [str(i) for i in range(6)]
    reference = prepare_dataset(_options(lits_dir, tmp_path / "local"))
    _same_folder(tmp_path / "local", out)
    # A finished identical run: --resume says so and does nothing.
    again = prepare_with_beam(_options(lits_dir, out, resume=True))
    assert again["splits"] == reference["splits"]


def test_overwrite_stopped_by_a_bad_case_leaves_the_finished_run_as_it_was(lits_dir, tmp_path):
    out = tmp_path / "out"
    prepare_with_beam(_options(lits_dir, out))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (lits_dir / "segmentation-4.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="segmentation-4.nii.gz"):
        prepare_with_beam(_options(lits_dir, out, overwrite=True, image_size=16))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert load_manifest(out)["preprocessing"]["image_size"] == [32, 32]


def test_bad_runner_options_are_one_clear_line(lits_dir, tmp_path):
    with pytest.raises(DataError, match="unknown Beam runner 'Sparkk'; use one of DirectRunner"):
        prepare_with_beam(_options(lits_dir, tmp_path / "o"), runner="Sparkk")
    with pytest.raises(DataError, match="DataflowRunner runs on other machines, which cannot read the local paths"):
        prepare_with_beam(_options(lits_dir, tmp_path / "o"), runner="DataflowRunner")
    with pytest.raises(DataError, match="unknown option --flink_mastr"):
        pipeline_options("FlinkRunner", 1, ["--flink_mastr=localhost:8081"])
    options = pipeline_options("FlinkRunner", 1, ["--flink_master=localhost:8081", "--parallelism=4"]).get_all_options()
    assert options["flink_master"] == "localhost:8081" and options["parallelism"] == 4
    direct = pipeline_options("DirectRunner", 3).get_all_options()
    assert direct["direct_num_workers"] == 3 and direct["direct_running_mode"] == "multi_processing"
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_missing_beam_names_the_extra(lits_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    with pytest.raises(DataError, match=r'pip install "keras_livseg\[beam\]"'):
        prepare_with_beam(_options(lits_dir, tmp_path / "o"))


def test_cli_engine_beam_and_its_refusals(lits_dir, tmp_path, capsys):
    args = ["--src", str(lits_dir), "--image-size", "32", "--split", "0.5,0.25,0.25", "--no-progress", "--workers", "1"]
    assert prepare_cli.main([*args, "--engine", "beam", "--out", str(tmp_path / "beam")]) == 0
    assert "prepared" in capsys.readouterr().out
    assert load_manifest(tmp_path / "beam")["splits"]["train"]["slices"] == 24
    with pytest.raises(SystemExit) as stop:
        prepare_cli.main([*args, "--out", str(tmp_path / "x"), "--flink_master=x"])
    assert stop.value.code == 2 and "need --engine beam" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "keras_livseg.prepare", *args, "--engine", "beam", "--runner", "Nope", "--out", str(tmp_path / "y")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "prepare: error: unknown Beam runner 'Nope'; use one of DirectRunner, PrismRunner, DataflowRunner, "
        "FlinkRunner, SparkRunner, PortableRunner"
    )


def test_a_stratified_split_is_the_local_engines(lits_dir, tmp_path):
    rows = ["image,label,case_id,stratum"] + [
        f"{lits_dir}/volume-{i}.nii.gz,{lits_dir}/segmentation-{i}.nii.gz,{i},{'A' if i < 2 else 'B'}" for i in range(6)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    settings = dict(split=(0.5, 0.0, 0.5), stratify=True)
    beam = prepare_with_beam(_options(tmp_path / "pairs.csv", tmp_path / "beam", **settings))
    local = prepare_dataset(_options(tmp_path / "pairs.csv", tmp_path / "local", **settings))
    assert beam["split"] == local["split"] and beam["split"]["strata"]["test"] == {"A": 1, "B": 2}
    assert {c: r["stratum"] for c, r in beam["cases"].items()} == {c: r["stratum"] for c, r in local["cases"].items()}
    assert beam["splits"] == local["splits"]


def test_the_progress_counts_finished_cases_only(tmp_path):
    from keras_livseg.data.prepare_beam import _FAILED, _Progress

    for name in ("case-1.json", "case-2.json", ".partial-case-3.json", _FAILED):  # a write in progress, a failure
        (tmp_path / name).write_text("{}")
    assert _Progress(tmp_path, done_before=0, total=4, enabled=False)._count() == 2
