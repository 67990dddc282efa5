"""Training on several workers: agreement between workers, the chief's role, Keras fixes.

``fit`` under ``TF_CONFIG`` runs one process per worker, all executing the same program in
lock step (``tf.distribute.MultiWorkerMirroredStrategy``: every step all-reduces the
gradients, so every worker holds the same weights). This module holds what that needs
beyond the strategy itself:

- :func:`exchange`: every worker's bytes, gathered over the strategy's own collectives (no
  shared filesystem, no extra server). Workers use it to check that they run the same recipe
  (:func:`check_same_recipe`) and to receive what only the chief decides (the prepared data,
  the precision, or the chief's error).
- :func:`patch_keras_for_multi_worker`: two fixes for Keras 3.15's ``fit`` under
  ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585): its first-batch build reduces the
  input batch across workers (a ``PerReplica`` that cannot be converted), and its metric
  reduction asks for axis 0 of scalars. Both are patched narrowly and only take effect when
  the strategy is multi-worker.
- :func:`weights_digest`: a SHA-256 of the weights, logged by every worker at the end, so
  that one can see that all workers trained the same model.
- :func:`free_loopback_port`: a port for a worker (or any server) started on this machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: Keys a worker may differ on: the chief resolves them and shares the result.
WORKER_LOCAL_KEYS = ("data.shards", "training.resolved_precision")


def free_loopback_port() -> int:
    """A loopback port that was free a moment ago, for workers started on one machine.

    Another process may take it before the worker binds it: a caller that starts servers on a
    busy machine retries on a new port when one exits early (the tests' ``start_server`` does).

    Example:
        >>> 0 < free_loopback_port() < 65536
        True
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def exchange(strategy: Any, payload: bytes) -> list[bytes]:
    """Every replica's ``payload``, in replica order (replica 0 is on the chief).

    A collective: every worker must call it at the same point of the program.

    Example:
        >>> import tensorflow as tf
        >>> exchange(tf.distribute.get_strategy(), b"hello")
        [b'hello']
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return [payload]

    def gather(values: np.ndarray) -> np.ndarray:
        # A few eager collectives per run: TensorFlow's warnings about eager overhead and
        # retracing do not apply.
        tf_logger = logging.getLogger("tensorflow")
        level = tf_logger.level
        tf_logger.setLevel(logging.ERROR)
        try:
            local = strategy.run(lambda: tf.constant(values[None]))
            return np.asarray(strategy.gather(local, axis=0))
        finally:
            tf_logger.setLevel(level)

    lengths = gather(np.array([len(payload)], dtype=np.int64))[:, 0]
    # Collectives take int32 and wider, not uint8: one byte per int32 (payloads are a few kB).
    padded = np.zeros(int(lengths.max()) or 1, dtype=np.int32)
    padded[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    rows = gather(padded)
    return [row[: int(n)].astype(np.uint8).tobytes() for row, n in zip(rows, lengths)]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def recipe_differences(mine: Mapping[str, Any], chiefs: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two resolved configs, as ``key mine (chief: theirs)``.

    Example:
        >>> recipe_differences({"training": {"epochs": 3}}, {"training": {"epochs": 5}})
        ['training.epochs 3 (chief: 5)']
    """
    a, b = _flatten(json.loads(json.dumps(mine, default=str))), _flatten(json.loads(json.dumps(chiefs, default=str)))
    return [
        f"{key} {a.get(key)!r} (chief: {b.get(key)!r})"
        for key in sorted(set(a) | set(b))
        if key not in WORKER_LOCAL_KEYS and a.get(key) != b.get(key)
    ]


def check_same_recipe(strategy: Any, config: Mapping[str, Any], task_name: str) -> None:
    """Stop every worker when any runs another recipe than the chief's (a collective).

    Raises:
        ValueError: on every worker, naming the first worker and setting that differ.
    """
    payloads = exchange(strategy, json.dumps({"task": task_name, "config": config}, sort_keys=True, default=str).encode())
    decoded = [json.loads(p) for p in payloads]
    chief = decoded[0]["config"]
    for other in decoded[1:]:
        differences = recipe_differences(other["config"], chief)
        if differences:
            raise ValueError(
                f"workers disagree on the recipe: {other['task']} has {'; '.join(differences[:3])}; "
                "start every worker with the same command, recipe and --set values"
            )


def share_from_chief(strategy: Any, is_chief: bool, decided: Mapping[str, Any] | None) -> dict[str, Any]:
    """The chief's ``decided`` values on every worker (a collective).

    The chief passes what it resolved (``{"error": message}`` when it failed, so that the
    other workers stop with the reason instead of waiting for a peer that has gone).

    Raises:
        ValueError: the chief reported an error.
    """
    payload = json.dumps(dict(decided or {}) if is_chief else {}, default=str).encode()
    shared = json.loads(exchange(strategy, payload)[0])
    if "error" in shared:
        raise ValueError(shared["error"] if is_chief else f"the chief stopped: {shared['error']}")
    return shared


def agree(strategy: Any, error: str | None) -> None:
    """Stop every worker when any worker failed its set-up (a collective; ``error``: this worker's).

    Raises:
        ValueError: on every worker, with the first failing worker's message.
    """
    errors = [p.decode() for p in exchange(strategy, (error or "").encode()) if p]
    if errors:
        raise ValueError(errors[0])


class WorkerLost(RuntimeError):
    """A peer worker died or became unreachable mid-training (the job must be restarted)."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is TensorFlow's report of a lost or unreachable peer in a collective."""
    import tensorflow as tf

    return isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                              tf.errors.DeadlineExceededError, tf.errors.CancelledError))


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 of the weights' bytes, in order (equal digests: bit-identical models).

    Example:
        >>> weights_digest([np.zeros(2, np.float32)])[:12]
        'a1e4ee9d4a59'
    """
    digest = hashlib.sha256()
    for weight in weights:
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


_PATCHED = False


def patch_keras_for_multi_worker() -> None:
    """Make Keras 3.15's TensorFlow ``fit``/``evaluate`` work under ``MultiWorkerMirroredStrategy``.

    keras-team/keras#20585: ``fit`` fails before its first step with "Attempt to convert a
    value (PerReplica...)" (the first-batch build reduces the input batch across workers),
    then each step with "Invalid reduction dimension 0 for input with 0 dimensions" (the
    metric results are scalars but are reduced along axis 0). The fixes: build from this
    worker's own first batch (and only when something is unbuilt: a finite validation set
    loses no batch), and reduce scalar results with ``axis=None``. Other strategies
    take Keras's own paths unchanged. Idempotent.
    """
    global _PATCHED
    if _PATCHED:
        return
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original_reduce = tf_trainer.reduce_per_replica
    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    multi_worker = tf_trainer._collective_all_reduce_multi_worker

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def reduce_one(value):
            local = value.values[0] if tf_trainer._is_per_replica_instance(value) else value
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original_reduce(value, strategy, reduction)

        return tree.map_structure(reduce_one, values)

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or iterator is None or not multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        built = (
            all(layer.built for layer in self._flatten_layers())
            and (self._compile_metrics is None or self._compile_metrics.built)
            and (self._compile_loss is None or self._compile_loss.built)
            and (self.optimizer is None or self.optimizer.built)
        )
        if built:  # nothing to build: leave the (finite, evaluation) data untouched
            return
        for _, _, batches in iterator:
            first = next(batches)
            data_batch = tree.map_structure(
                lambda x: strategy.experimental_local_results(x)[0] if isinstance(x, tf.distribute.DistributedValues) else x,
                first,
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    _PATCHED = True
