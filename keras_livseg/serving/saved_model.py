"""Writing the SavedModel in TF Serving's ``<base>/<version>/`` layout, never half-written."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

import keras_livseg
from keras_livseg.data.preprocessing import PREPROCESSING_FILE, Preprocessing, write_preprocessing_json
from keras_livseg.models.saving import load_keras_model
from keras_livseg.serving.signature import (
    CLASSES,
    INPUT_NAME,
    MASK,
    PROBABILITIES,
    SIGNATURES,
    SPACING_INPUT,
    make_serving_function,
)

logger = logging.getLogger(__name__)


def next_version(out_base) -> int:
    """1 + the largest integer version folder under ``out_base``, or 1 when there is none.

    Example:
        >>> import tempfile
        >>> base = Path(tempfile.mkdtemp())
        >>> (base / "3").mkdir(); (base / ".partial-7").mkdir()
        >>> next_version(base)
        4
    """
    base = Path(out_base)
    if not base.is_dir():
        return 1
    versions = [int(child.name) for child in base.iterdir() if child.is_dir() and child.name.isdigit()]
    return max(versions, default=0) + 1


def export_saved_model(
    model: keras.Model | str | os.PathLike,
    out_base: str | os.PathLike,
    prep: Preprocessing,
    version: int | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a raw-HU SavedModel in TF Serving's ``<out_base>/<version>/`` layout.

    Args:
        model: a ``keras.Model`` or the path of a ``.keras`` checkpoint.
        out_base: the model's base folder, e.g. ``saved_models/livseg``
            (``tensorflow_model_server --model_base_path`` points here).
        prep: the preprocessing the model was trained with (``<run>/preprocessing.json``).
        version: positive integer version. Defaults to 1 + the largest existing version, or 1.
        overwrite: replace an existing ``<out_base>/<version>/``. Defaults to False.
        metadata: extra entries for ``assets.extra/preprocessing.json`` (e.g. the run folder).

    Returns:
        The path of the written version folder.

    Raises:
        ValueError: ``version`` exists and ``overwrite`` is False, a bad ``version``, a model
            path that is not ``.keras``, or a model that disagrees with ``prep``.
        FileNotFoundError: the model file does not exist.

    Example:
        >>> import tempfile
        >>> from keras_livseg.models import build_model
        >>> model = build_model("unet", input_shape=(32, 32, 1), filters=4, depth=2)
        >>> prep = Preprocessing(image_size=(32, 32), mean=60.0, std=40.0)
        >>> base = Path(tempfile.mkdtemp()) / "livseg"
        >>> export_saved_model(model, base, prep).name
        '1'
        >>> served = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
        >>> out = served(ct_slices=tf.fill([1, 300, 280], 60.0))
        >>> tuple(out["mask"].shape), out["probabilities"].dtype.name
        ((1, 300, 280), 'float32')
    """
    if not isinstance(prep, Preprocessing):
        raise ValueError(f"prep must be a Preprocessing, got {type(prep).__name__}; read it with read_preprocessing_json")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ValueError(f"version must be a positive integer (TF Serving's version folders), got {version!r}")
    model_path = None
    if not isinstance(model, keras.Model):
        model_path = Path(model)
        model = load_keras_model(model_path)

    base = Path(out_base)
    chosen = version is None  # the next free version: another export may take it first (see _publish)
    version = next_version(base) if chosen else version
    target = base / str(version)
    if target.exists() and not overwrite:
        raise ValueError(f"export version {target} already exists; pass --overwrite to replace it, or another --version")

    serve = make_serving_function(model, prep)  # checks the model before anything is written
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name in SIGNATURES:
        archive.add_endpoint(name, serve)

    base.mkdir(parents=True, exist_ok=True)
    # Hidden, non-integer names: TF Serving only loads all-digit folder names.
    token = uuid.uuid4().hex[:8]
    partial = base / f".partial-{version}-{token}"
    tf_logger = logging.getLogger("tensorflow")
    tf_level = tf_logger.level
    try:
        # TensorFlow logs "Assets written to <temporary folder>" at INFO: misleading, so quiet it.
        tf_logger.setLevel(max(tf_level, logging.WARNING))
        try:
            archive.write_out(str(partial), verbose=False)
        finally:
            tf_logger.setLevel(tf_level)
        write_preprocessing_json(
            partial / "assets.extra" / PREPROCESSING_FILE,
            prep,
            **{
                **(metadata or {}),
                "model_name": model.name,
                "model_file": str(model_path.resolve()) if model_path else None,
                "classes": list(CLASSES),
                "input_name": INPUT_NAME,
                "input_shape": ["batch", "height", "width"] + (["context"] if prep.context > 1 else []),
                # 2.5D models also take plain consecutive slices and stack the context themselves.
                "accepts_consecutive_slices": True,
                "spacing_input": SPACING_INPUT if prep.spacing_mm is not None else None,
                "output_names": [PROBABILITIES, MASK],
                "signatures": list(SIGNATURES),
                "keras_livseg_version": keras_livseg.__version__,
                "keras_version": keras.__version__,
                "tensorflow_version": tf.__version__,
            },
        )
        if overwrite and target.exists():
            # Move the old version aside first so the swap is two renames, then delete it.
            retired = base / f".retired-{version}-{token}"
            target.rename(retired)
            partial.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            target = _publish(partial, base, version, chosen)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("exported %s (%s, context %d) -> %s", model.name, "x".join(map(str, prep.image_size)), prep.context, target)
    return target


def _publish(partial: Path, base: Path, version: int, chosen: bool) -> Path:
    """Rename the finished ``partial`` export to ``base/<version>`` without replacing a version.

    Another export (a second run of the same recipe, finishing at the same moment) may have
    taken the version since it was chosen: a rename onto its non-empty folder fails, and a
    version this export chose itself then moves on to the next free one, so neither export
    replaces the other. An explicitly asked version that is now taken is refused.
    """
    while True:
        target = base / str(version)
        try:
            os.rename(partial, target)
            return target
        except OSError:
            if not target.exists():
                raise
            if not chosen:
                raise ValueError(f"export version {target} already exists (another export just wrote it); pass "
                                 "--overwrite to replace it, or another --version") from None
            logger.info("version %d was just taken by another export: trying %d", version, version + 1)
            version += 1


def export_to(
    model: keras.Model | str | os.PathLike,
    out_base: str | os.PathLike,
    prep: Preprocessing,
    version: int | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path | str:
    """:func:`export_saved_model` to a local base folder or to object storage (``gs://``, ``s3://``).

    For a URL the version is chosen from the versions in the bucket, the SavedModel is written
    into a local mirror and uploaded with ``saved_model.pb`` last: TF Serving, polling the
    bucket, loads a version only once that file is there, so it never loads a partial upload.

    Returns:
        The version folder written: a path, or the URL.
    """
    from keras_livseg.data import storage

    if keras.backend.backend() != "tensorflow":
        return _export_with_tensorflow(model, out_base, version, overwrite, metadata)
    if not storage.is_url(out_base):
        return export_saved_model(model, out_base, prep, version=version, overwrite=overwrite, metadata=metadata)
    url = str(out_base).rstrip("/")
    versions = [int(name) for name in storage.child_names(url) if name.isdigit()]
    version = int(version) if version else max(versions, default=0) + 1
    if version in versions and not overwrite:
        raise ValueError(f"{url}/{version} already exists; pass --overwrite to replace it or another --version")
    mirror = storage.mirror_path(url)
    local = export_saved_model(model, mirror, prep, version=version, overwrite=True, metadata=metadata)
    storage.upload(local, f"{url}/{version}", last=("saved_model.pb",))
    return f"{url}/{version}"


def _export_with_tensorflow(model, out_base, version, overwrite, metadata) -> Path | str:
    """Export from another backend (JAX): the serving graph is TensorFlow's, so a fresh process
    with ``KERAS_BACKEND=tensorflow`` runs ``keras_livseg.export`` on the saved ``.keras`` file
    (checkpoints are backend-neutral)."""
    import json
    import subprocess
    import sys

    from keras_livseg.data import storage

    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"on the {keras.backend.backend()} backend, export takes the saved .keras file, not a model object")
    command = [sys.executable, "-m", "keras_livseg.export", "--model", str(model), "--out", str(out_base),
               "--metadata", json.dumps(metadata or {})]
    if version:
        command += ["--version", str(int(version))]
    if overwrite:
        command.append("--overwrite")
    logger.info("exporting with the TensorFlow backend in a fresh process (this process runs %s)", keras.backend.backend())
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise ValueError(lines[-1] if lines else f"export failed with exit status {done.returncode}")
    target = next(line.split(" -> ", 1)[1] for line in done.stdout.splitlines() if line.startswith("exported "))
    return target if storage.is_url(target) else Path(target)
