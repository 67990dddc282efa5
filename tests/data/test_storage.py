"""Object storage (keras_livseg.data.storage) and the commands on s3:// and gs://, against local emulators.

moto's S3 server and gcp-storage-emulator are started by the tests on loopback ports and
stopped after them; nothing of our own is mocked.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_helpers import write_case

pytest.importorskip("s3fs")
pytest.importorskip("gcsfs")
pytest.importorskip("moto")

from keras_livseg.data import storage  # noqa: E402
from keras_livseg.data.errors import DataError  # noqa: E402

BIN = Path(sys.executable).parent


def _answers(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
        return True


def _bucket_maker(scheme: str):
    """A function making a bucket on the emulator and returning its URL."""
    def bucket(name: str) -> str:
        fs, _ = storage.filesystem(f"{scheme}://{name}/x")
        fs.mkdir(name)
        return f"{scheme}://{name}"

    return bucket


@pytest.fixture
def s3(start_server, monkeypatch, tmp_path):
    """A moto S3 server; the AWS variables point at it. Yields a function making buckets."""
    _, port = start_server(lambda p: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)], _answers)
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))

    return _bucket_maker("s3")


@pytest.fixture
def gcs(start_server, monkeypatch, tmp_path):
    """gcp-storage-emulator in memory; STORAGE_EMULATOR_HOST points at it."""
    def command(port):
        return [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"]

    _, port = start_server(command, _answers)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("KERAS_LIVSEG_CACHE", str(tmp_path / "cache"))

    return _bucket_maker("gs")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


# --- the storage layer -----------------------------------------------------------------------------


def test_upload_and_download_mirror_a_folder_with_markers_last(s3, tmp_path, monkeypatch):
    url = s3("shards") + "/run"
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.tfrecord").write_bytes(b"a" * 100)
    (folder / "sub" / "b.tfrecord").write_bytes(b"b" * 10)
    (folder / "manifest.json").write_text("{}")
    (folder / ".work").mkdir()
    (folder / ".work" / "case.json").write_text("local only")
    fs, _ = storage.filesystem(url)
    order: list[str] = []
    real_put = fs.put_file  # fsspec caches instances: storage's calls reach this one
    monkeypatch.setattr(fs, "put_file", lambda lpath, rpath, **kw: (order.append(rpath), real_put(lpath, rpath, **kw))[1])
    assert storage.upload(folder, url) == 3
    assert order[-1].endswith("manifest.json") and len(order) == 3  # the completion marker last; no dot-files
    assert storage.upload(folder, url) == 0  # nothing changed: nothing sent
    time.sleep(0.01)
    (folder / "a.tfrecord").write_bytes(b"A" * 100)  # same size, new content
    (folder / "sub" / "b.tfrecord").unlink()
    order.clear()
    assert storage.upload(folder, url) == 2 and order[-1].endswith("manifest.json")
    assert sorted(fs.find(url.replace("s3://", ""))) == ["shards/run/a.tfrecord", "shards/run/manifest.json"]
    local = storage.download(url)
    assert local == storage.mirror_path(url) and _tree(local) == _tree(folder)


def test_a_transfer_that_fails_leaves_no_file_and_a_local_error_says_what_it_is(s3, tmp_path, monkeypatch):
    url = s3("bkt") + "/run"
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.tfrecord").write_bytes(b"a" * 10)
    storage.upload(folder, url)
    fs, _ = storage.filesystem(url)

    def cut(rpath, lpath, **kwargs):
        Path(lpath).write_bytes(b"a" * 3)  # part of the object, then the connection drops
        raise ConnectionResetError("connection reset by peer")

    with monkeypatch.context() as patch:
        patch.setattr(fs, "get_file", cut)
        with pytest.raises(storage.DataError, match="cannot reach .*ConnectionResetError"):
            storage.download(url)
    mirror = storage.mirror_path(url)
    assert not [p for p in mirror.rglob("*") if p.is_file() and p.name != ".synced.json"]  # no half object
    # A local disk problem is not blamed on the storage: here a file stands where the mirror's folder goes.
    shutil.rmtree(mirror)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    mirror.write_text("in the way")
    with pytest.raises(OSError):
        storage.download(url)


def test_a_finished_result_in_the_bucket_is_pulled_into_the_mirror(s3, tmp_path):
    url = s3("bkt") + "/out"
    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"done": 1}')
    storage.upload(folder, url)
    mirror = storage.mirror_path(url)
    mirror.mkdir(parents=True)
    (mirror / "stale.tfrecord").write_text("from an older run")
    with storage.local_output(url, pull=True) as local:
        assert sorted(p.name for p in local.iterdir() if not p.name.startswith(".")) == ["manifest.json"]


def test_bad_urls_and_unreachable_storage_are_one_line(s3, monkeypatch):
    with pytest.raises(DataError, match=r"the scheme ftp:// is not supported; use a local path, s3:// or gs://"):
        storage.filesystem("ftp://host/data")
    with pytest.raises(DataError, match=r"s3://nothing-here/lits does not exist"):
        storage.download(s3("emptybucket").replace("emptybucket", "nothing-here") + "/lits")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(DataError, match=r's3://b/x needs s3fs for s3:// URLs: pip install "keras_livseg\[s3\]"'):
        storage.filesystem("s3://b/x")
    monkeypatch.delitem(sys.modules, "s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot reach s3://bkt/lits .*check the URL, the credentials"):
        storage.download("s3://bkt/lits")
    assert time.monotonic() - started < 30  # two attempts, not a retry storm


def test_a_csv_in_a_bucket_brings_its_volumes(s3, tmp_path):
    from keras_livseg.data.cases import discover_cases

    data = s3("pairs")
    src = tmp_path / "lits"
    write_case(src, "1", seed=1)
    write_case(src, "2", seed=2)
    # One row relative to the CSV, one a full URL: both are fetched, the CSV rewritten with local paths.
    (src / "pairs.csv").write_text("image,label\nvolume-1.nii.gz,segmentation-1.nii.gz\n"
                                   f"{data}/set/volume-2.nii.gz,{data}/set/segmentation-2.nii.gz\n")
    storage.upload(src, f"{data}/set")
    local = storage.local_input(f"{data}/set/pairs.csv")
    cases = discover_cases(local)
    assert [c.case_id for c in cases] == ["volume-1", "volume-2"]
    assert all(c.image.read_bytes() == (src / c.image.name).read_bytes() for c in cases)


# --- the commands, end to end ----------------------------------------------------------------------


def _upload_phantom(url: str, tmp_path: Path, cases: int = 6) -> Path:
    src = tmp_path / "lits"
    for i in range(cases):
        write_case(src, str(i), seed=i, tumor=i % 3 != 2)
    storage.upload(src, url)
    return src


@pytest.mark.slow
def test_prepare_fit_export_predict_evaluate_through_s3(s3, tmp_path, capsys):
    from keras_livseg import export as export_cli
    from keras_livseg import fit as fit_cli
    from keras_livseg import predict as predict_cli
    from keras_livseg import prepare as prepare_cli
    from keras_livseg.data.prepare import PrepareOptions, prepare_dataset

    data = s3("data")
    src = _upload_phantom(f"{data}/lits", tmp_path)
    args = ["--image-size", "32", "--split", "0.5,0.25,0.25", "--no-progress", "--workers", "1"]
    assert prepare_cli.main(["--src", f"{data}/lits", "--out", f"{data}/shards", *args]) == 0
    local = prepare_dataset(PrepareOptions(src=src, out=tmp_path / "local", image_size=32, split=(0.5, 0.25, 0.25),
                                           workers=1, progress=False))
    fs, _ = storage.filesystem(data)
    for name in local["splits"]["train"]["shards"]:
        assert fs.cat(f"data/shards/{name}") == (tmp_path / "local" / name).read_bytes()
    assert json.loads(fs.cat("data/shards/manifest.json"))["splits"] == local["splits"]
    # Rerunning on a finished output in the bucket is refused as on a local folder; --resume is a no-op.
    assert prepare_cli.main(["--src", f"{data}/lits", "--out", f"{data}/shards", *args]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert prepare_cli.main(["--src", f"{data}/lits", "--out", f"{data}/shards", "--resume", *args]) == 0

    recipe = tmp_path / "tiny.toml"
    recipe.write_text('[preprocessing]\nimage_size = 32\n[model]\nname = "unet"\nfilters = 4\ndepth = 2\n'
                      '[training]\nprecision = "float32"\nschedule = "none"\n')
    s3("runs"), s3("models")
    code = fit_cli.main(["--pipeline", str(recipe), "--data", f"{data}/lits", "--shards", f"{data}/shards",
                         "--runs-dir", "s3://runs", "--name", "tiny", "--export-dir", "s3://models/livseg",
                         "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
                         "--set", "training.score_volumes=false"])
    assert code == 0, capsys.readouterr().err[-2000:]
    runs, _ = storage.filesystem("s3://runs")
    kept = set(runs.find("runs/tiny/"))
    assert {"runs/tiny/complete.json", "runs/tiny/config.json", "runs/tiny/history.csv",
            "runs/tiny/checkpoints/best.keras", "runs/tiny/preprocessing.json"} <= kept
    assert runs.exists("models/livseg/1/saved_model.pb") and runs.exists("models/livseg/1/assets.extra/preprocessing.json")
    assert export_cli.main(["--model", "s3://runs/tiny/checkpoints/best.keras", "--out", "s3://models/livseg"]) == 0
    assert runs.exists("models/livseg/2/saved_model.pb")  # the next version, chosen from the bucket's

    assert predict_cli.main(["--model", "s3://runs/tiny/checkpoints/best.keras", f"{data}/lits/volume-0.nii.gz",
                             "--out", "s3://data/predictions", "--no-progress"]) == 0
    written = [k for k in runs.find("data/predictions/") if k.endswith(".nii.gz")]
    assert len(written) == 1
    runs.get_file(written[0], str(tmp_path / "pred.nii.gz"))
    predicted = nib.load(str(tmp_path / "pred.nii.gz"))
    assert predicted.shape == nib.load(str(src / "volume-0.nii.gz")).shape
    assert set(np.unique(np.asarray(predicted.dataobj))) <= {0, 1, 2}

    from keras_livseg import evaluate as evaluate_cli

    assert evaluate_cli.main(["--model", "s3://runs/tiny/checkpoints/best.keras", "--data", f"{data}/lits",
                              "--out", "s3://data/eval", "--no-progress", "--no-figures"]) == 0
    report = set(runs.find("data/eval/"))
    assert {"data/eval/report.md", "data/eval/per_case.csv", "data/eval/metrics.json"} <= report
    assert len(runs.cat("data/eval/per_case.csv").decode().strip().splitlines()) == 1 + 6  # header + every case


@pytest.mark.slow
def test_prepare_and_predict_through_gcs(gcs, tmp_path):
    from keras_livseg import predict as predict_cli
    from keras_livseg import prepare as prepare_cli

    data = gcs("gdata")
    src = _upload_phantom(f"{data}/lits", tmp_path, cases=4)
    assert prepare_cli.main(["--src", f"{data}/lits", "--out", f"{data}/shards", "--image-size", "32",
                             "--split", "0.5,0.25,0.25", "--no-progress", "--workers", "1"]) == 0
    fs, _ = storage.filesystem(data)
    manifest = json.loads(fs.cat("gdata/shards/manifest.json"))
    assert sum(s["slices"] for s in manifest["splits"].values()) == 4 * 12
    from keras_livseg.data.preprocessing import Preprocessing, write_preprocessing_json
    from keras_livseg.models import build_model

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(run / "checkpoints" / "best.keras")
    write_preprocessing_json(run / "preprocessing.json", Preprocessing(image_size=(32, 32), mean=60.0, std=40.0))
    storage.upload(run, f"{data}/run")  # the model read from the bucket too
    assert predict_cli.main(["--model", f"{data}/run/checkpoints/best.keras", f"{data}/lits", "--out",
                             f"{data}/predictions", "--no-progress"]) == 0
    written = sorted(k.rsplit("/", 1)[-1] for k in fs.find("gdata/predictions/"))
    assert written == [f"segmentation-{i}.nii.gz" for i in range(4)], written  # LiTS names, as predict writes them
    del src
