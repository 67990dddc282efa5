"""Learning-rate schedules: OneCycle (warm-up, then cosine annealing).

The Enhanced-PAN paper trains with AdamW and a OneCycle schedule (Smith &
Topin, "Super-Convergence", arXiv 1708.07120), as PyTorch's ``OneCycleLR``
implements it. ``keras.ops`` only, so it runs under every backend.
"""

from __future__ import annotations

import logging
import math

import keras
from keras import ops

logger = logging.getLogger(__name__)

__all__ = ["OneCycle"]

_WARMUP_MODES = ("linear", "cosine")


@keras.saving.register_keras_serializable(package="keras_livseg")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """OneCycle: warm up from ``max_lr / div_factor`` to ``max_lr``, then cosine-anneal.

    With ``W = warmup_fraction · total_steps``:

    - steps ``0 … W``: from ``initial_lr = max_lr / div_factor`` up to ``max_lr``,
      linearly or along a half cosine (``warmup_mode``);
    - steps ``W … total_steps``: cosine annealing from ``max_lr`` down to
      ``min_lr = initial_lr / final_div_factor``;
    - steps past ``total_steps``: ``min_lr`` (clamped, so a resumed or extended
      run never sees the rate climb back up).

    The step is the optimizer's iteration count (``optimizer.iterations``), so
    set ``total_steps = epochs · steps_per_epoch``. The last of those steps
    (``total_steps − 1``) is within one step's worth of cosine of ``min_lr``.

    Args:
        max_lr: peak learning rate (> 0).
        total_steps: number of optimizer steps of the whole run (int > 0).
        warmup_fraction: share of ``total_steps`` spent warming up, in
            ``[0, 1)``. Defaults to 0.3 (PyTorch's ``pct_start``).
        div_factor: ``initial_lr = max_lr / div_factor`` (>= 1). Defaults to 25.
        final_div_factor: ``min_lr = initial_lr / final_div_factor`` (>= 1).
            Defaults to 1e4.
        warmup_mode: ``"cosine"`` (as PyTorch's default ``anneal_strategy``)
            or ``"linear"``. Defaults to ``"cosine"``.
        name: schedule name. Defaults to ``"one_cycle"``.

    Raises:
        ValueError: for an argument out of range, naming it and its value.

    Example:

    >>> schedule = OneCycle(max_lr=1e-3, total_steps=100)
    >>> [f"{float(schedule(s)):.3g}" for s in (0, 30, 100, 500)]
    ['4e-05', '0.001', '4e-09', '4e-09']
    >>> optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    """

    def __init__(
        self,
        max_lr: float,
        total_steps: int,
        warmup_fraction: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        warmup_mode: str = "cosine",
        name: str = "one_cycle",
    ):
        super().__init__()
        if not _is_number(max_lr) or not max_lr > 0:
            raise ValueError(f"max_lr must be a finite number > 0, got max_lr={max_lr!r}.")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"total_steps must be an int >= 1, got total_steps={total_steps!r}; "
                "use epochs * steps_per_epoch."
            )
        if not _is_number(warmup_fraction) or not 0 <= warmup_fraction < 1:
            raise ValueError(
                f"warmup_fraction must be in [0, 1), got warmup_fraction={warmup_fraction!r}; "
                "0.3 is the usual choice."
            )
        if not _is_number(div_factor) or div_factor < 1:
            raise ValueError(
                f"div_factor must be a finite number >= 1, got div_factor={div_factor!r}; "
                "the warm-up starts at max_lr / div_factor (default 25)."
            )
        if not _is_number(final_div_factor) or final_div_factor < 1:
            raise ValueError(
                "final_div_factor must be a finite number >= 1, got "
                f"final_div_factor={final_div_factor!r}; the run ends at "
                "max_lr / (div_factor * final_div_factor) (default 1e4)."
            )
        if warmup_mode not in _WARMUP_MODES:
            raise ValueError(
                f"warmup_mode must be one of {_WARMUP_MODES}, got warmup_mode={warmup_mode!r}."
            )
        self.max_lr = float(max_lr)
        self.total_steps = int(total_steps)
        self.warmup_fraction = float(warmup_fraction)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.warmup_mode = warmup_mode
        self.name = name

    @property
    def initial_lr(self) -> float:
        """The rate at step 0: ``max_lr / div_factor``."""
        return self.max_lr / self.div_factor

    @property
    def min_lr(self) -> float:
        """The final rate: ``initial_lr / final_div_factor``."""
        return self.initial_lr / self.final_div_factor

    @property
    def warmup_steps(self) -> float:
        """Where the peak is: ``warmup_fraction · total_steps`` (may be fractional)."""
        return self.warmup_fraction * self.total_steps

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup_steps = self.warmup_steps
        anneal_steps = self.total_steps - warmup_steps  # > 0 since warmup_fraction < 1

        # Warm-up progress; max(…, 1e-12) only guards warmup_fraction == 0, where
        # this branch is never selected.
        up = ops.clip(step / max(warmup_steps, 1e-12), 0.0, 1.0)
        if self.warmup_mode == "linear":
            up_shape = up
        else:
            up_shape = 0.5 * (1.0 - ops.cos(math.pi * up))
        warmup_lr = self.initial_lr + (self.max_lr - self.initial_lr) * up_shape

        down = ops.clip((step - warmup_steps) / anneal_steps, 0.0, 1.0)
        anneal_lr = self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + ops.cos(math.pi * down))

        return ops.where(ops.less(step, warmup_steps), warmup_lr, anneal_lr)

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "total_steps": self.total_steps,
            "warmup_fraction": self.warmup_fraction,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
            "warmup_mode": self.warmup_mode,
            "name": self.name,
        }


def _is_number(value) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
