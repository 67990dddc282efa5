"""Distribution strategy: MultiWorkerMirrored from ``TF_CONFIG``, Mirrored on several GPUs,
the default strategy otherwise; and which worker is the chief.

The recipe's ``batch_size`` is per replica; the global batch fed to ``fit`` is
``batch_size * strategy.num_replicas_in_sync``. The learning rate is not scaled with the
number of replicas: with Adam the per-replica recipe's rate is the usual starting point, and
the one-cycle warm-up absorbs the larger batch (Goyal et al. 2017 scale SGD linearly; scale
``training.learning_rate`` yourself by the ratio of global batches when you want that rule).

Several workers (Kubernetes pods, SLURM tasks, VMs) each get a ``TF_CONFIG`` such as::

    {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}

Worker 0 (or the task of type ``chief``, where the cluster names one) is the chief: it alone
writes the run folder (checkpoints, TensorBoard, history, export). See ``docs/scale-out.md``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

logger = logging.getLogger(__name__)

#: Task types that train (TF_CONFIG may also list an evaluator or parameter servers, which fit does not run).
_TRAINING_TASKS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterTask:
    """This process's place in a multi-worker cluster.

    Attributes:
        task_type: ``"chief"`` or ``"worker"``.
        index: the task's index within its type.
        num_workers: training tasks in the cluster (chief included).
        is_chief: whether this task writes the run folder.
        worker_index: this task's place among the training tasks (the chief is 0): which
            part of the data it reads.
    """

    task_type: str
    index: int
    num_workers: int
    is_chief: bool
    worker_index: int

    @property
    def name(self) -> str:
        return f"{self.task_type}-{self.index}"


def parse_tf_config(text: str | None) -> ClusterTask | None:
    """Read ``TF_CONFIG``: ``None`` when unset or empty; the task otherwise.

    Raises:
        ValueError: malformed ``TF_CONFIG``, naming the field and what it should hold.

    Example:
        >>> task = parse_tf_config('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}')
        >>> task.num_workers, task.is_chief
        (2, False)
    """
    if text is None or not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error.msg} at character {error.pos}); see docs/scale-out.md") from None
    if not isinstance(config, Mapping):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'; see docs/scale-out.md")
    cluster = config.get("cluster")
    if not isinstance(cluster, Mapping) or not cluster:
        raise ValueError("TF_CONFIG has no 'cluster' object; give {\"cluster\": {\"worker\": [\"host:port\", ...]}, ...}")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise ValueError(f"TF_CONFIG cluster.{kind} must be a non-empty list of \"host:port\" strings, got {addresses!r}")
    workers = sum(len(cluster.get(kind, [])) for kind in _TRAINING_TASKS)
    if "chief" in cluster and len(cluster["chief"]) != 1:
        raise ValueError(f"TF_CONFIG cluster.chief must list exactly one address, got {len(cluster['chief'])}")
    if workers == 0:
        raise ValueError("TF_CONFIG cluster lists no 'worker' (or 'chief') addresses; fit trains on workers")
    task = config.get("task")
    if not isinstance(task, Mapping):
        raise ValueError("TF_CONFIG has no 'task' object; give {\"task\": {\"type\": \"worker\", \"index\": N}}")
    task_type = task.get("type")
    if task_type not in _TRAINING_TASKS:
        raise ValueError(f"TF_CONFIG task.type {task_type!r} is not a training task; use 'worker' (or 'chief')")
    if task_type not in cluster:
        raise ValueError(f"TF_CONFIG task.type {task_type!r} has no list in cluster (it has {', '.join(sorted(cluster))})")
    index = task.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[task_type]):
        raise ValueError(
            f"TF_CONFIG task.index {index!r} is not an index into cluster.{task_type}, which lists "
            f"{len(cluster[task_type])} address(es): use 0 to {len(cluster[task_type]) - 1}"
        )
    is_chief = task_type == "chief" or ("chief" not in cluster and index == 0)
    worker_index = index + (1 if task_type == "worker" and "chief" in cluster else 0)
    return ClusterTask(task_type, index, workers, is_chief, worker_index)


def cluster_task() -> ClusterTask | None:
    """This process's task from the ``TF_CONFIG`` environment variable (``None``: one machine)."""
    return parse_tf_config(os.environ.get("TF_CONFIG"))


def choose_strategy(devices: list[str] | None = None) -> Any:
    """Pick the ``tf.distribute`` strategy for this machine.

    Under ``TF_CONFIG`` this must run before any TensorFlow operation of the process
    (TensorFlow configures collectives at start-up): :func:`keras_livseg.training.fit.train`
    calls it first.

    Args:
        devices: explicit devices for a MirroredStrategy (tests use two logical CPUs).

    Returns:
        A ``tf.distribute.Strategy``.
    """
    import tensorflow as tf  # distribution is TensorFlow's: only this function needs it

    task = cluster_task()
    if devices:
        strategy = tf.distribute.MirroredStrategy(devices)
    elif task is not None:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif len(tf.config.list_logical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    where = f" as {task.name} of {task.num_workers} workers{' (chief)' if task.is_chief else ''}" if task else ""
    logger.info("strategy: %s with %d replica(s)%s", type(strategy).__name__, strategy.num_replicas_in_sync, where)
    return strategy
