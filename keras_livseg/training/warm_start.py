"""Warm start: copy weights from a ``.keras`` checkpoint into a model, layer by layer.

A new run often starts from an old one whose architecture differs a little: a
2.5D input (3 channels) trained from a single-slice (1 channel) U-Net, a head with
a different number of classes, a TAM-U-Net from a plain U-Net. ``load_model``
cannot do that and ``load_weights`` refuses any shape difference, so this module
matches layers one at a time::

    for each weighted layer of the target (nested models walked recursively):
        same key in the source, every weight shape equal  -> loaded
        same key, some shape differs                      -> skipped (shapes listed)
        key absent from the source                        -> new (keeps its fresh init)

How layers are keyed: by name, prefixed by the names of the models they are
nested in (``"efficientnetb0_encoder/stem_conv"``). Every layer the
``keras_livseg`` builders create carries an explicit name, and so does every
layer of ``keras.applications.EfficientNetB0``, so two builds give the same keys
in any process; the image size plays no part (convolution kernels do not depend
on it). Keras gives unnamed layers counter-based names (``conv2d``,
``conv2d_3``...) that depend on how many layers the process has built before, so
a layer whose name is its class's auto-name is keyed instead by its order among
the auto-named layers of the same class in the same (sub)model:
``"conv2d#0"``, ``"conv2d#1"``... A custom layer with sublayers (ASPP, FPA,
GAU, SE, TAM) is one unit: all its weights load, or none.

Example:

>>> import logging, tempfile
>>> from pathlib import Path
>>> from keras_livseg.models import build_model
>>> folder = Path(tempfile.mkdtemp())
>>> build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(folder / "best.keras")
>>> model = build_model("tam_unet", input_shape=(32, 32, 3), filters=4, depth=2)
>>> report = load_matching_weights(model, folder / "best.keras")
>>> [skipped.name for skipped in report.skipped], len(report.loaded), len(report.new)
(['encoder1_1_conv'], 12, 5)
>>> logging.getLogger(__name__).info(report.summary())
"""

from __future__ import annotations

import logging
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

logger = logging.getLogger(__name__)

#: Where checkpoints live; named in every "not a checkpoint" error.
CHECKPOINT_HINT = "runs/<name>/checkpoints/ (e.g. runs/<name>/checkpoints/best.keras)"
_LISTED_NAMES = 5  # how many layer names an error message quotes


@dataclass(frozen=True)
class SkippedLayer:
    """A target layer the source has under the same key, but with other weights.

    Attributes:
        name: the layer's key (see the module docstring).
        target_shapes: the target layer's weight shapes, in ``layer.weights`` order.
        source_shapes: the source layer's weight shapes.
        reason: one phrase: ``"shapes differ"`` or ``"layer types differ (A vs B)"``.
    """

    name: str
    target_shapes: tuple[tuple[int, ...], ...]
    source_shapes: tuple[tuple[int, ...], ...]
    reason: str = "shapes differ"

    def describe(self) -> str:
        """``"name: reason, target [...] vs source [...]"``."""
        return (
            f"{self.name}: {self.reason}, target {_format_shapes(self.target_shapes)} "
            f"vs source {_format_shapes(self.source_shapes)}"
        )


@dataclass
class WarmStartReport:
    """What :func:`load_matching_weights` did.

    Attributes:
        source: the checkpoint path (or a description of the source model).
        source_model: the source model's name.
        loaded: keys of the target layers that took the source's weights.
        skipped: target layers present in the source with other shapes.
        new: keys of target layers absent from the source (fresh init kept).
        unused: keys of source layers absent from the target.
        params_loaded: parameters (all weights, trainable or not) copied.
        params_total: parameters of the target model.
    """

    source: str
    source_model: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    params_loaded: int = 0
    params_total: int = 0

    @property
    def fraction_loaded(self) -> float:
        """``params_loaded / params_total`` (0 for a model without weights)."""
        return self.params_loaded / self.params_total if self.params_total else 0.0

    def summary(self) -> str:
        """A multi-line summary for logging: counts first, then every skipped and new layer.

        Example:

        >>> report = WarmStartReport("best.keras", "unet", loaded=["logits"], new=["gate"],
        ...                          params_loaded=15, params_total=20)
        >>> print(report.summary())
        warm start from best.keras (model 'unet'): loaded 1 layers, 15 of 20 parameters (75.0%); skipped 0, new 1
          new: gate
        """
        lines = [
            f"warm start from {self.source} (model {self.source_model!r}): loaded "
            f"{len(self.loaded)} layers, {self.params_loaded:,} of {self.params_total:,} parameters "
            f"({100 * self.fraction_loaded:.1f}%); skipped {len(self.skipped)}, new {len(self.new)}"
        ]
        lines += [f"  skipped {skipped.describe()}" for skipped in self.skipped]
        if self.new:
            lines.append(f"  new: {', '.join(self.new)}")
        if self.unused:
            lines.append(f"  unused from source: {', '.join(self.unused)}")
        return "\n".join(lines)


def load_matching_weights(model: keras.Model, source: str | Path) -> WarmStartReport:
    """Load the weights of a ``.keras`` checkpoint into ``model`` wherever layers match.

    The checkpoint is loaded with ``keras.saving.load_model(..., compile=False)``
    (``keras_livseg``'s models, losses, metrics and schedules are imported first so
    their custom objects resolve), then handed to :func:`copy_matching_weights`: a
    target layer takes the source's weights when the source has a layer with the
    same key and every weight shape is equal; layers with other shapes are skipped,
    layers the source lacks are new. The target's optimizer state is untouched.

    Args:
        model: the model to warm-start (built: functional models always are).
        source: path of a ``.keras`` checkpoint, e.g.
            ``runs/<name>/checkpoints/best.keras``.

    Returns:
        A :class:`WarmStartReport`; log ``report.summary()``.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is not a ``.keras`` checkpoint (a ``.h5`` or
            ``.weights.h5`` file, a SavedModel folder, another file), cannot be
            loaded, or no layer of it matched a layer of ``model``.

    Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from keras_livseg.models import build_model
    >>> path = Path(tempfile.mkdtemp()) / "best.keras"
    >>> build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(path)
    >>> model = build_model("unet", input_shape=(64, 64, 1), filters=4, depth=2, num_classes=2)
    >>> report = load_matching_weights(model, path)
    >>> [skipped.name for skipped in report.skipped], report.new
    (['logits'], [])
    """
    path = Path(source).expanduser()
    source_model = _load_checkpoint(path)
    return copy_matching_weights(model, source_model, source_label=str(path))


def copy_matching_weights(
    model: keras.Model, source_model: keras.Model, source_label: str | None = None
) -> WarmStartReport:
    """Copy weights from an in-memory ``source_model`` into ``model`` by layer key and shape.

    The matching rules of :func:`load_matching_weights`, without the file.

    Args:
        model: the target model.
        source_model: the model whose weights are copied.
        source_label: how the report and errors name the source. Defaults to
            ``"model '<source_model.name>'"``.

    Returns:
        A :class:`WarmStartReport`.

    Raises:
        ValueError: no layer of ``source_model`` matched a layer of ``model``.

    Example:

    >>> from keras_livseg.models import build_model
    >>> source = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
    >>> target = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
    >>> copy_matching_weights(target, source).fraction_loaded
    1.0
    """
    label = source_label or f"model {source_model.name!r}"
    targets = weighted_layers(model)
    sources = weighted_layers(source_model)
    report = WarmStartReport(source=label, source_model=source_model.name)
    counted: set[int] = set()

    for key, layer in targets.items():
        size = _count_new(layer.weights, counted)
        report.params_total += size
        source_layer = sources.get(key)
        if source_layer is None:
            report.new.append(key)
            continue
        target_shapes = _shapes(layer)
        source_shapes = _shapes(source_layer)
        if type(layer).__name__ != type(source_layer).__name__:
            reason = f"layer types differ ({type(layer).__name__} vs {type(source_layer).__name__})"
            report.skipped.append(SkippedLayer(key, target_shapes, source_shapes, reason))
            continue
        if target_shapes != source_shapes:
            report.skipped.append(SkippedLayer(key, target_shapes, source_shapes))
            continue
        for variable, value in zip(layer.weights, source_layer.weights):
            variable.assign(keras.ops.convert_to_numpy(value))
        report.loaded.append(key)
        report.params_loaded += size
    report.unused = [key for key in sources if key not in targets]

    if not report.loaded:
        raise ValueError(_nothing_matched(model, source_model, label, sources, report))
    logger.debug("warm start: %d layers loaded, %d skipped, %d new",
                 len(report.loaded), len(report.skipped), len(report.new))
    return report


def weighted_layers(model: keras.Model, prefix: str = "") -> dict[str, keras.Layer]:
    """Every layer of ``model`` that holds weights, keyed as the module docstring says.

    Nested models are walked recursively (their own layers are keyed under
    ``"<model name>/"``); other layers with sublayers count as one unit.

    Args:
        model: a built model.
        prefix: prepended to every key (used for the recursion). Defaults to ``""``.

    Returns:
        An insertion-ordered ``{key: layer}``, in ``model.layers`` order.

    Example:

    >>> from keras_livseg.models import build_model
    >>> keys = list(weighted_layers(build_model("unet", input_shape=(32, 32, 1), filters=4, depth=1)))
    >>> keys[:3], keys[-1]
    (['encoder1_1_conv', 'encoder1_2_conv', 'bottleneck_1_conv'], 'logits')
    """
    keyed: dict[str, keras.Layer] = {}
    auto_counts: dict[str, int] = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        if _is_auto_named(layer):
            # Counter-based names shift with everything built before; order does not.
            base = _snake_case(type(layer).__name__)
            local = f"{base}#{auto_counts.get(base, 0)}"
            auto_counts[base] = auto_counts.get(base, 0) + 1
        else:
            local = layer.name
        if isinstance(layer, keras.Model):
            keyed.update(weighted_layers(layer, prefix=f"{prefix}{local}/"))
        else:
            keyed[f"{prefix}{local}"] = layer
    return keyed


def check_source_exists(path: Path) -> None:
    """Raise the warm start's one-line error when ``path`` (``~`` expanded by the caller) is missing."""
    if not path.exists():
        raise FileNotFoundError(
            f"warm start source {str(path)!r} does not exist; pass a .keras checkpoint from "
            f"{CHECKPOINT_HINT}."
        )


def _load_checkpoint(path: Path) -> keras.Model:
    check_source_exists(path)
    if path.is_dir():
        kind = "a SavedModel/export folder" if (path / "saved_model.pb").exists() else "a folder"
        raise ValueError(
            f"warm start source {str(path)!r} is {kind}, not a Keras checkpoint; pass a .keras "
            f"file from {CHECKPOINT_HINT}."
        )
    if path.name.endswith((".h5", ".hdf5")):
        raise ValueError(
            f"warm start source {str(path)!r} is an HDF5 (.h5/.weights.h5) file, not a Keras "
            f"checkpoint; pass a .keras file from {CHECKPOINT_HINT}."
        )
    if path.suffix != ".keras" or not _is_keras_archive(path):
        raise ValueError(
            f"warm start source {str(path)!r} is not a Keras checkpoint (a .keras zip archive "
            f"with config.json); pass a .keras file from {CHECKPOINT_HINT}."
        )
    # Registers the custom layers, losses, metrics and schedules the config names.
    import keras_livseg.models  # noqa: F401
    import keras_livseg.training.losses  # noqa: F401
    import keras_livseg.training.metrics  # noqa: F401
    import keras_livseg.training.schedules  # noqa: F401

    try:
        loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # deserialization errors have many types; give one line
        from keras_livseg.models.saving import refusal, refused_code

        if refused_code(error):
            raise ValueError(f"warm start source: {refusal(Path(path), error)}") from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"warm start source {str(path)!r} could not be loaded as a Keras model "
            f"({type(error).__name__}: {first_line}); pass a .keras file saved by keras_livseg "
            f"from {CHECKPOINT_HINT}."
        ) from error
    if not isinstance(loaded, keras.Model):
        raise ValueError(
            f"warm start source {str(path)!r} holds a {type(loaded).__name__}, not a model; pass "
            f"a .keras model checkpoint from {CHECKPOINT_HINT}."
        )
    return loaded


def _is_keras_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "config.json" in archive.namelist()


def _nothing_matched(model, source_model, label, sources, report: WarmStartReport) -> str:
    examples = ", ".join(list(sources)[:_LISTED_NAMES]) or "none with weights"
    if report.skipped:
        first = report.skipped[0].describe()
        detail = (
            f"{len(report.skipped)} layer(s) share names but none has the same weight shapes "
            f"(e.g. {first}); check filters/depth/decoder_filters match the source run"
        )
    else:
        detail = "no layer name is shared"
    return (
        f"warm start from {label}: nothing matched between model {model.name!r} and the source "
        f"model {source_model.name!r} (source layers: {examples}); {detail}. Pass a checkpoint "
        f"of a related architecture (e.g. unet -> tam_unet) or train from scratch."
    )


def _is_auto_named(layer: keras.Layer) -> bool:
    base = _snake_case(type(layer).__name__)
    return re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name) is not None


def _snake_case(name: str) -> str:
    # The rule keras.src.utils.naming.to_snake_case applies to build auto-names.
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _shapes(layer: keras.Layer) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(d) for d in variable.shape) for variable in layer.weights)


def _count_new(variables, counted: set[int]) -> int:
    # A layer shared between two paths owns the same variables; count them once.
    size = 0
    for variable in variables:
        if id(variable) not in counted:
            counted.add(id(variable))
            size += int(np.prod(variable.shape))
    return size


def _format_shapes(shapes) -> str:
    return "[" + ", ".join(str(tuple(shape)) for shape in shapes) + "]"


__all__ = [
    "SkippedLayer",
    "WarmStartReport",
    "copy_matching_weights",
    "load_matching_weights",
    "weighted_layers",
]
