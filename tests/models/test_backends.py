"""Every model loads a TensorFlow-saved checkpoint, runs and trains one step under JAX (one subprocess)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from models_testing import SMALL_OPTIONS

from keras_livseg.models import EXTRAS, available_models, build_model

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # MA-Net's position attention needs a 2x2 map at stride 32

JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import keras
    import keras_livseg.models  # registers the custom layers that load_model rebuilds

    assert keras.backend.backend() == "jax", keras.backend.backend()
    # load_model builds each model before it reads the weights, and the build runs every random
    # initializer: under JAX each weight shape compiles its own random kernel (20 s for effb0_pan
    # against 3.6 s with this). The checkpoint overwrites every one of those weights, so zeros do.
    from keras.src.initializers import random_initializers

    class ZerosForRandom:
        make_default_seed = staticmethod(random_initializers.random.make_default_seed)
        SeedGenerator = random_initializers.random.SeedGenerator  # initializers given an integer seed

        @staticmethod
        def uniform(shape, *args, dtype=None, **kwargs):
            return np.zeros(shape, dtype or "float32")

        normal = truncated_normal = uniform

    random_initializers.random = ZerosForRandom
    # Seeded weights: how many weights a dead ReLU leaves without gradient in one step depends
    # on the initial weights; unseeded, the count varied across runs (a flaky 89.7 % once).
    keras.utils.set_random_seed(0)
    folder, plan = sys.argv[1], json.loads(sys.argv[2])
    rng = np.random.default_rng(0)
    x = np.load(folder + "/input.npy")
    report = {}
    for name in plan:
        # The TensorFlow-saved model is rebuilt here from its config, layer by layer under JAX, and
        # then trained: building it a second time with build_model doubled the test's time (a JAX
        # build runs every initializer op by op). predict, not model(x): one compiled forward pass
        # instead of an XLA compilation per op (17.9 against 3.9 s for effb0_pan).
        model = keras.models.load_model(f"{folder}/{name}.keras")
        probs = model.predict(x, batch_size=len(x), verbose=0)
        y = keras.utils.to_categorical(rng.integers(0, 3, x.shape[:3]), 3)
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        before = [np.array(w) for w in model.trainable_weights]
        loss = model.fit(x, y, batch_size=len(x), epochs=1, verbose=0).history["loss"][0]
        changed = sum(not np.allclose(b, np.array(w)) for b, w in zip(before, model.trainable_weights))
        report[name] = {
            "shape": list(probs.shape),
            "sum_error": float(np.abs(probs.sum(-1) - 1).max()),
            "loss": float(loss),
            "changed": changed,
            "trainable": len(before),
            "max_difference_to_tensorflow": float(np.abs(probs - np.load(f"{folder}/{name}.npy")).max()),
        }
        print(name, "done", file=sys.stderr, flush=True)
    print("REPORT" + json.dumps(report))
    """
)


def _installed(name: str) -> bool:
    package = EXTRAS.get(name, (None,))[0]
    return package is None or importlib.util.find_spec(package) is not None


@pytest.mark.slow
def test_every_model_runs_and_trains_under_jax_and_reads_tensorflow_checkpoints(tmp_path, jax_env):
    plan = {name: SMALL_OPTIONS[name] for name in available_models() if _installed(name)}
    x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 1)).astype("float32")
    np.save(tmp_path / "input.npy", x)
    keras.utils.set_random_seed(3)
    for name, options in plan.items():  # saved under TensorFlow, loaded under JAX
        model = build_model(name, input_shape=(SIZE, SIZE, 1), **options)
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}.npy", keras.ops.convert_to_numpy(model(x, training=False)))

    # Fast compiles (jax_env): XLA compiles every new shape, and EfficientNet has many.
    env = {**jax_env, "TF_CPP_MIN_LOG_LEVEL": "3"}
    # Two processes, each with every other model: compiling is most of this test's time and XLA
    # compiles on one thread, so two cores take half as long; effb0_pan and segformer, the two
    # slowest to compile, fall into different halves. Each half is seeded and always the same.
    names = list(plan)
    halves = [json.dumps({name: plan[name] for name in names[i::2]}) for i in range(2)]
    runs = [subprocess.Popen([sys.executable, "-c", JAX_SCRIPT, str(tmp_path), half], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for half in halves]
    report = {}
    try:
        for run in runs:
            stdout, stderr = run.communicate(timeout=1200)
            assert run.returncode == 0, stderr[-4000:]
            line = [l for l in stdout.splitlines() if l.startswith("REPORT")][-1]
            report.update(json.loads(line[len("REPORT"):]))
    finally:
        for run in runs:  # a failed or timed-out half does not leave the other running
            if run.poll() is None:
                run.kill()
                run.wait()
    assert set(report) == set(plan)
    for name, case in report.items():
        assert case["shape"] == [2, SIZE, SIZE, 3], name
        assert case["sum_error"] < 1e-5, name
        assert np.isfinite(case["loss"]) and 0.3 < case["loss"] < 20.0, name
        # A few weights may get no gradient in one step (a dead ReLU on a 1x1 map at this size);
        # the rest must move.
        assert case["trainable"] > 0 and case["changed"] >= 0.9 * case["trainable"], (name, case)
        assert case["max_difference_to_tensorflow"] < 1e-4, (name, case)
