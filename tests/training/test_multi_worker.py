"""Training on several workers: TF_CONFIG, per-worker data, and two real worker processes on loopback."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keras_livseg.training import multi_worker
from keras_livseg.training.strategy import parse_tf_config




TINY_RECIPE = """
[run]
seed = 0
[data]
slices = "all"
[preprocessing]
window = [-200.0, 250.0]
image_size = 32
context = 1
normalization = "foreground"
[model]
name = "unet"
[training]
optimizer = "adam"
schedule = "none"
loss = "ce_dice"
[export]
enabled = false
"""

FIT_ARGS = [
    "--no-export", "--precision", "float32", "--image-size", "32", "--batch-size", "4", "--steps-per-epoch", "4",
    "--set", "data.phantom_cases=6", "--set", "data.phantom_size=64", "--set", "data.phantom_slices=[12, 16]",
    # One validation and one test case: a single file each, split among the workers by batch.
    "--set", "data.split=[0.6, 0.2, 0.2]", "--set", "data.workers=1", "--set", "data.shard_mb=0.01",
    "--set", "model.filters=8", "--set", "model.depth=2", "--name", "mw",
]


# --- TF_CONFIG -------------------------------------------------------------------------------------


def _config(cluster, task) -> str:
    return json.dumps({"cluster": cluster, "task": task})


def test_tf_config_roles_and_worker_indices():
    assert parse_tf_config(None) is None and parse_tf_config("  ") is None
    two = {"worker": ["a:1", "b:1"]}
    first, second = (parse_tf_config(_config(two, {"type": "worker", "index": i})) for i in (0, 1))
    assert (first.is_chief, first.worker_index, first.num_workers) == (True, 0, 2)
    assert (second.is_chief, second.worker_index, second.name) == (False, 1, "worker-1")
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    chief = parse_tf_config(_config(with_chief, {"type": "chief", "index": 0}))
    worker0 = parse_tf_config(_config(with_chief, {"type": "worker", "index": 0}))
    assert (chief.is_chief, chief.worker_index, chief.num_workers) == (True, 0, 3)
    assert (worker0.is_chief, worker0.worker_index) == (False, 1)  # the chief reads part 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG has no 'cluster' object"),
        (_config({"worker": "a:1"}, {"type": "worker", "index": 0}), "cluster.worker must be a non-empty list"),
        (_config({"worker": ["a"]}, {"type": "worker", "index": 0}), 'list of "host:port" strings'),
        (_config({"worker": ["a:1"]}, None), "TF_CONFIG has no 'task' object"),
        (_config({"worker": ["a:1"]}, {"type": "ps", "index": 0}), "task.type 'ps' is not a training task"),
        (_config({"worker": ["a:1"]}, {"type": "chief", "index": 0}), "task.type 'chief' has no list in cluster"),
        (_config({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 2}), "task.index 2 is not an index into cluster.worker, which lists 2 address"),
        (_config({"worker": ["a:1"]}, {"type": "worker", "index": "0"}), "task.index '0'"),
        (_config({"chief": ["a:1", "b:1"], "worker": ["c:1"]}, {"type": "worker", "index": 0}), "cluster.chief must list exactly one"),
    ],
)
def test_malformed_tf_config_names_the_field(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_tf_config(text)


def test_cli_malformed_tf_config_is_one_line(tmp_path):
    env = {**os.environ, "TF_CONFIG": _config({"worker": ["localhost:1"]}, {"type": "worker", "index": 3})}
    result = subprocess.run([sys.executable, "-m", "keras_livseg.fit", "--no-export"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fit: error: TF_CONFIG task.index 3 is not an index")


# --- the pieces ------------------------------------------------------------------------------------


def test_recipe_differences_ignore_what_the_chief_resolves():
    mine = {"training": {"epochs": 3, "resolved_precision": "float32"}, "data": {"shards": "/a"}}
    chiefs = {"training": {"epochs": 5, "resolved_precision": "mixed_bfloat16"}, "data": {"shards": "/b"}}
    assert multi_worker.recipe_differences(mine, chiefs) == ["training.epochs 3 (chief: 5)"]
    assert multi_worker.recipe_differences(chiefs, chiefs) == []


def test_exchange_and_digest_on_one_process():
    import tensorflow as tf

    assert multi_worker.exchange(tf.distribute.get_strategy(), b"\x00\xffabc") == [b"\x00\xffabc"]
    weights = [np.arange(4, dtype=np.float32), np.ones((2, 2), np.float32)]
    assert multi_worker.weights_digest(weights) == multi_worker.weights_digest([w.copy() for w in weights])
    changed = [weights[0], weights[1] + np.float32(1e-7)]
    assert multi_worker.weights_digest(changed) != multi_worker.weights_digest(weights)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Six labelled phantom cases in small shards (one or two cases each), all in train."""
    from keras_livseg.data.phantom import write_phantom_dataset
    from keras_livseg.data.prepare import PrepareOptions, prepare_dataset

    root = tmp_path_factory.mktemp("mwdata")
    write_phantom_dataset(root / "src", cases=6, seed=0, size=64, slices=(12, 16))
    return prepare_dataset(PrepareOptions(src=root / "src", out=root / "shards", image_size=32, workers=1,
                                          progress=False, split=(1.0, 0.0, 0.0), shard_mb=0.01))


def _case_of_image(manifest) -> dict[bytes, str]:
    """Standardized image bytes -> case, for the slices found in one case only (slices outside
    the body can be identical across cases)."""
    import tensorflow as tf

    from keras_livseg.data import shards as shard_io
    from keras_livseg.data.dataset import _case_id, parse_batch
    from keras_livseg.data.preprocessing import Preprocessing

    prep = Preprocessing.from_dict(manifest["preprocessing"])
    images, cases = [], []
    for name in manifest["splits"]["train"]["shards"]:
        records = list(shard_io.read_records(Path(manifest["_dir"]) / name))
        images.extend(np.asarray(prep.tf_standardize(parse_batch(tf.constant(records), 1, (32, 32))["image"])))
        cases.extend(_case_id(record).numpy().decode() for record in records)
    owners: dict[bytes, set[str]] = {}
    for image, case in zip(images, cases):
        owners.setdefault(image.tobytes(), set()).add(case)
    return {image: next(iter(found)) for image, found in owners.items() if len(found) == 1}


def _cases_read(manifest, index: int, batches: int = 6) -> set[str]:
    from keras_livseg.data.augment import Augmentation
    from keras_livseg.data.dataset import make_dataset

    lookup = _case_of_image(manifest)
    ds = make_dataset(manifest, "train", 4, input_shard=(2, index), seed=0, augmentation=Augmentation.none(),
                      foreground_fraction=0.5, replicas=2)
    read = set()
    for images, masks in ds.take(batches):
        assert images.shape == (4, 32, 32, 1) and masks.shape == (4, 32, 32)
        read |= {lookup[image.tobytes()] for image in np.asarray(images) if image.tobytes() in lookup}
    return read


def test_each_worker_reads_its_own_shards(shards):
    train = shards["splits"]["train"]
    assert len(train["shards"]) >= 2
    assert sorted(c for cases in train["shard_cases"].values() for c in cases) == sorted(train["cases"])
    for index in (0, 1):
        own = {c for name in train["shards"][index::2] for c in train["shard_cases"][name]}
        read = _cases_read(shards, index)
        assert read and read <= own, (index, read, own)


def test_fewer_files_than_workers_splits_by_case(shards):
    from keras_livseg.data.dataset import make_dataset
    from keras_livseg.data.volumes import DataError

    old = json.loads(json.dumps(shards))
    del old["splits"]["train"]["shard_cases"]  # a manifest from before the shard-to-case map
    cases = old["splits"]["train"]["cases"]
    for index in (0, 1):
        read = _cases_read(old, index)
        assert read and read <= set(cases[index::2]), (index, read)
    one_case = json.loads(json.dumps(old))
    one_case["splits"]["train"]["cases"] = cases[:1]
    with pytest.raises(DataError, match=re.escape("holds 1 case(s) for 2 workers")):
        make_dataset(one_case, "train", 4, input_shard=(2, 0))
    with pytest.raises(ValueError, match="batch_size 5 must be a multiple of replicas 2"):
        make_dataset(shards, "train", 5, replicas=2)


# --- two worker processes --------------------------------------------------------------------------


def _launch(tmp_path: Path, ports: list[int], extra: list[list[str]] | None = None) -> list[subprocess.Popen]:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    processes = []
    for index in range(len(ports)):
        env = {
            **os.environ,
            "TF_CONFIG": _config({"worker": [f"localhost:{p}" for p in ports]}, {"type": "worker", "index": index}),
            "KERAS_LIVSEG_CACHE": str(tmp_path / "cache"),
            "TMPDIR": str(tmp_path / f"tmp{index}"),
        }
        (tmp_path / f"tmp{index}").mkdir(exist_ok=True)
        args = [sys.executable, "-m", "keras_livseg.fit", "--pipeline", str(recipe), *FIT_ARGS,
                "--runs-dir", str(tmp_path / "runs"), *((extra or [[]] * len(ports))[index])]
        log = (tmp_path / f"worker{index}.log").open("ab")
        processes.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path))
    return processes


_PORT_TAKEN = ("address already in use", "failed to add port", "could not start grpc server")


def _port_lost(tmp_path: Path, start_offsets: list[int]) -> bool:
    """Whether a worker failed because another process took its port between probe and bind."""
    for index, offset in enumerate(start_offsets):
        text = (tmp_path / f"worker{index}.log").read_bytes()[offset:].decode(errors="replace").lower()
        if any(marker in text for marker in _PORT_TAKEN):
            return True
    return False


def _start(tmp_path: Path, extra: list[list[str]]) -> list[subprocess.Popen]:
    """Launch two workers on free ports; relaunch on new ports when a port was taken meanwhile."""
    for _ in range(3):
        offsets = [(tmp_path / f"worker{i}.log").stat().st_size if (tmp_path / f"worker{i}.log").exists() else 0
                   for i in range(2)]
        processes = _launch(tmp_path, [multi_worker.free_loopback_port(), multi_worker.free_loopback_port()], extra)
        # Wait until both have formed the cluster (their servers bound: the strategy line) or one ended.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and all(p.poll() is None for p in processes) and not all(
                "strategy:" in (tmp_path / f"worker{i}.log").read_bytes()[offsets[i]:].decode(errors="replace")
                for i in range(2)):
            time.sleep(0.2)
        if not (any(p.poll() is not None for p in processes) and _port_lost(tmp_path, offsets)):
            return processes
        for process in processes:
            process.kill()
            process.wait()
    return processes


def _run(tmp_path: Path, extra: list[list[str]], timeout: float = 400) -> list[int]:
    return _wait(_start(tmp_path, extra), timeout)


def _wait(processes: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
    return codes


def _digests(tmp_path: Path) -> list[str]:
    found = []
    for index in (0, 1):
        text = (tmp_path / f"worker{index}.log").read_text(errors="replace")
        found.append(re.findall(r"weights sha256 ([0-9a-f]{64})", text)[-1])
    return found


def _log_tail(tmp_path: Path) -> str:
    return "\n".join((tmp_path / f"worker{i}.log").read_text(errors="replace")[-1500:] for i in (0, 1))


@pytest.mark.slow
def test_two_workers_train_one_model_resume_after_a_worker_is_killed_and_only_the_chief_writes(tmp_path):
    # One scenario for both properties: two worker processes cost a minute under load, and the
    # resumed launch is a complete two-worker run.
    processes = _start(tmp_path, [["--epochs", "5"]] * 2)
    chief_pids = [processes[0].pid]
    history = tmp_path / "runs" / "mw" / "history.csv"
    deadline = time.monotonic() + 300
    two_epochs = lambda: history.is_file() and len(history.read_text().splitlines()) >= 3  # noqa: E731
    while time.monotonic() < deadline and not two_epochs():
        assert all(p.poll() is None for p in processes), _log_tail(tmp_path)
        time.sleep(0.2)
    assert two_epochs(), "two epochs did not finish within 300 s:\n" + _log_tail(tmp_path)
    processes[1].kill()  # SIGKILL: the worker dies mid-epoch 3
    processes[1].wait()
    # The chief finds its peer gone at its next collective and stops with one line.
    assert processes[0].wait(timeout=120) == 4, _log_tail(tmp_path)
    chief_log = (tmp_path / "worker0.log").read_text(errors="replace")
    assert "Traceback" not in chief_log
    assert "fit: error: worker-0 lost a peer worker during training" in chief_log
    assert "start every worker again with --resume --name mw" in chief_log
    done_before = len(history.read_text().splitlines()) - 1
    assert 2 <= done_before < 5

    processes = _start(tmp_path, [["--epochs", "5", "--resume"]] * 2)
    chief_pids.append(processes[0].pid)
    assert _wait(processes) == [0, 0], _log_tail(tmp_path)
    run = tmp_path / "runs" / "mw"
    with history.open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [0, 1, 2, 3, 4]  # no epoch twice
    first, second = _digests(tmp_path)
    assert first == second  # all-reduced gradients: bit-identical weights on both workers
    complete = json.loads((run / "complete.json").read_text())
    assert complete["epochs_done"] == 5 and complete["workers"] == 2 and complete["weights_sha256"] == first
    assert "worker finished 5 epochs with the chief" in (tmp_path / "worker1.log").read_text(errors="replace")
    # Only the chief wrote into the run: every TensorBoard file carries a chief's process id
    # (TensorFlow names them events.out.tfevents.TIME.HOST.PID.N.v2), one per folder and launch.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mw"]
    for folder in ("train", "validation"):
        events = sorted((run / "tensorboard" / folder).glob("events.out.tfevents.*"))
        assert sorted(int(e.name.split(".")[-3]) for e in events) == sorted(chief_pids), events
    # The other worker wrote under its own temporary folder and removed it when it finished; the
    # SIGKILLed launch could not remove its own.
    assert len(list((tmp_path / "tmp1").glob("keras_livseg-worker-1-*"))) == 1


@pytest.mark.slow
def test_workers_that_disagree_on_the_recipe_both_stop_with_one_line(tmp_path):
    extra = [["--epochs", "2"], ["--epochs", "2", "--learning-rate", "0.5"]]
    codes = _run(tmp_path, extra, timeout=200)
    assert codes == [2, 2], _log_tail(tmp_path)
    for index in (0, 1):
        text = (tmp_path / f"worker{index}.log").read_text(errors="replace")
        assert "Traceback" not in text
        assert "fit: error: workers disagree on the recipe: worker-1 has training.learning_rate 0.5 (chief: " in text
    assert not (tmp_path / "runs").exists()
