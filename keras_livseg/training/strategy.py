"""Distribution strategy: MultiWorkerMirrored with ``TF_CONFIG``, Mirrored on several GPUs,
the default strategy otherwise.

The recipe's ``batch_size`` is per replica; the global batch fed to ``fit`` is
``batch_size * strategy.num_replicas_in_sync``.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def choose_strategy(devices: list[str] | None = None):
    """Pick the ``tf.distribute`` strategy for this machine.

    Args:
        devices: explicit devices for a MirroredStrategy (tests use two logical CPUs).

    Returns:
        A ``tf.distribute.Strategy``.
    """
    import tensorflow as tf  # distribution is TensorFlow's: only this function needs it

    if devices:
        strategy = tf.distribute.MirroredStrategy(devices)
    elif os.environ.get("TF_CONFIG"):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif len(tf.config.list_logical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    logger.info("strategy: %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy
