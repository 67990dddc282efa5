"""Loading a ``.keras`` checkpoint for inference or export: one loader, one set of messages."""

from __future__ import annotations

from pathlib import Path

import keras


def load_keras_model(path: str | Path) -> keras.Model:
    """Load a ``.keras`` checkpoint for inference (weights and architecture, no optimizer state).

    Args:
        path: a ``.keras`` file, e.g. ``runs/demo/checkpoints/best.keras``.

    Returns:
        The ``keras.Model``, with this package's custom layers resolved.

    Loading is always in Keras safe mode: a file that would run Python code when loaded (a
    ``Lambda`` layer holding a function) is refused, never executed. Models from
    :func:`~keras_livseg.models.build_model` hold no such code.

    Raises:
        ValueError: the path is not a ``.keras`` file (SavedModels and ``.h5`` are refused),
            the file is damaged or not a Keras model, or it holds code (safe mode).
        FileNotFoundError: the file does not exist.

    Example:
        >>> import tempfile
        >>> from keras_livseg.models import build_model
        >>> path = Path(tempfile.mkdtemp()) / "tiny.keras"
        >>> build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2).save(path)
        >>> load_keras_model(path).input.name
        'ct_slices'
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(
            f"{path} is not a .keras model file; pass a Keras 3 checkpoint such as "
            f"RUN/checkpoints/best.keras (SavedModels and .h5 files cannot be loaded here)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist; pass a checkpoint such as RUN/checkpoints/best.keras")
    # Importing the models registers the custom layers. compile=False skips the optimizer, loss
    # and metrics (and their custom classes): inference and export need the weights only.
    import keras_livseg.models  # noqa: F401

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for damaged or foreign files
        raise ValueError(refusal(path, error)) from None


def refused_code(error: Exception) -> bool:
    """Whether Keras refused to load because the file holds code (safe mode)."""
    return "safe_mode" in str(error) or "arbitrary code" in str(error)


def refusal(path: Path, error: Exception) -> str:
    """One line for a ``.keras`` file Keras would not load: code refused by safe mode, or damage."""
    text = str(error)
    if refused_code(error):
        return (f"{path} holds Python code that would run on loading (a Lambda layer) and keras_livseg loads "
                "models in Keras safe mode only; rebuild it without Lambda layers (build_model's models have none)")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if "pip install" in text:  # a model that needs an extra (keras-cv): the install line is the fix
        return f"{path} could not be loaded: {first}"
    return f"{path} could not be loaded as a Keras model ({first}); re-save it"
