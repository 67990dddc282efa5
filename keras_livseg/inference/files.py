"""Cases on disk through the model: find the inputs, predict each, write NIfTI on the input's grid."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


from keras_livseg.data.cases import CaseFiles, output_names, plan_outputs, resolve_inputs
from keras_livseg.data.volumes import (
    Case,
    DataError,
    apply_label_map,
    check_headers,
    from_canonical,
    load_case,
    load_nifti,
    save_like,
)
from keras_livseg.inference.postprocess import PostProcessing
from keras_livseg.inference.predictor import SegmentationModel
from keras_livseg.inference.volume import VolumePrediction, check_hounsfield, predict_volume

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PredictedCase:
    """What :func:`predict_paths` wrote for one input.

    Attributes:
        case_id: The case id.
        input: The CT file.
        output: The label map written (uint8, the input's grid).
        probabilities: The 4D uint8 probability map written, or ``None``.
        label: The case's reference label file when the dataset has one, else ``None``.
        shape: The input's shape.
        seconds: Prediction time (without reading and writing).
        hounsfield_ok: False when the input's intensities did not look like HU.
    """

    case_id: str
    input: Path
    output: Path
    probabilities: Path | None
    label: Path | None
    shape: tuple[int, int, int]
    seconds: float
    hounsfield_ok: bool


def predict_paths(
    model: SegmentationModel,
    inputs: Sequence[str | Path] | Sequence[CaseFiles],
    out_dir: str | Path,
    batch_size: int = 8,
    tta_flip: bool = False,
    postprocess: PostProcessing | None | str = "model",
    save_probabilities: bool = False,
    label_map: Mapping[int, int] | None = None,
    progress: bool = True,
    sample_voxels: int = 0,
    on_case: Callable[[Case, VolumePrediction, PredictedCase], Any] | None = None,
    output_format: str = "nifti",
    series_uid: str | None = None,
    check_inputs: bool = True,
) -> list[PredictedCase]:
    """Predict every case behind ``inputs`` and write label maps on each input's own grid.

    The request and every input's header are checked before the first case is predicted
    (:func:`~keras_livseg.data.cases.plan_outputs`, :func:`~keras_livseg.data.volumes.check_headers`):
    a wrong output or a damaged header stops the run before any work.

    Args:
        model: The loaded :class:`SegmentationModel`.
        inputs: NIfTI files, folders of them, LiTS/MSD datasets (see :func:`resolve_inputs`),
            or the cases :func:`resolve_inputs` returned for them (each carries its own
            ``series_uid``), not a mix of both.
        out_dir: Output folder (created); see :func:`output_names` for the file names.
        batch_size: Slices per forward pass (default 8).
        tta_flip: Mirrored test-time augmentation, as the model was trained (default False; see
            :func:`~keras_livseg.inference.volume.tta_mirrorings`).
        postprocess: Clean-up steps: ``"model"`` (default) for the model's own, a
            :class:`PostProcessing`, or ``None`` for none (see :func:`predict_volume`).
        save_probabilities: Also write uint8 ``[..., 3]`` probability maps (0–255 per class).
        label_map: Values written for the model's classes, ``{class: value}`` (unlisted classes
            become 0); default: 0 background, 1 liver, 2 tumor.
        progress: Progress bar on a terminal (default True).
        sample_voxels: Per case, keep probabilities of this many random voxels (for ``on_case``).
        on_case: Called with ``(case, prediction, record)`` after each case is written, while its
            arrays are still in memory (``evaluate`` samples probabilities there).
        output_format: ``"nifti"`` (default), or ``"dicom-seg"`` for inputs that are DICOM series:
            a DICOM Segmentation object ``<case>_seg.dcm`` that references the series
            (:func:`~keras_livseg.data.dicom.write_segmentation`).
        series_uid: The series to read from DICOM folders that hold several.
        check_inputs: Check every input's header first (default). ``False`` when the caller ran
            :func:`~keras_livseg.data.volumes.check_headers` on these cases already: the command
            does, before it loads TensorFlow, and a DICOM series' headers take ~2.5 ms a file.

    Returns:
        One :class:`PredictedCase` per input, in order.

    Raises:
        DataError: no case found, an unreadable input, or an output that would overwrite its input.

    Example:
        >>> predict_paths(model, ["../shared/data/real/dcmqi-ct-3slice"], "out")[0].output.name  # doctest: +SKIP
        'segmentation-3slice.nii.gz'
    """
    given = [isinstance(item, CaseFiles) for item in inputs]
    if any(given) and not all(given):
        raise DataError("predict_paths takes paths or the CaseFiles resolve_inputs returned, not a mix; "
                        "resolve the paths first")
    cases = list(inputs) if any(given) else resolve_inputs(inputs, series_uid=series_uid)
    outputs = plan_outputs(cases, out_dir, output_format, label_map)
    if check_inputs:
        check_headers(cases)
    out_dir = Path(out_dir)
    written = []
    for files, output in zip(cases, outputs):
        probability_name = output_names(files)[1]
        case = load_case(files, with_labels=False)  # references are the evaluation's business
        hounsfield_ok = check_hounsfield(case.image, files.image)
        prediction = predict_volume(
            model, case, batch_size=batch_size, tta_flip=tta_flip, postprocess=postprocess,
            return_probabilities=save_probabilities, sample_voxels=sample_voxels, progress=progress,
        )
        # A DICOM series' in-memory image has a default header: no need to read the series again.
        header = None if files.image.is_dir() else load_nifti(files.image).header
        if output_format == "dicom-seg":
            from keras_livseg.data.dicom import write_segmentation

            native = from_canonical(prediction.labels, case.original_affine)
            write_segmentation(native, files.image, output, model_name=model.name, series_uid=files.series_uid)
        else:
            values = prediction.labels if label_map is None else apply_label_map(prediction.labels, label_map, str(output))
            save_like(values, case.original_affine, output, reference_header=header)
        probability_path = None
        if prediction.probabilities is not None:
            probability_path = save_like(
                prediction.probabilities, case.original_affine, out_dir / probability_name,
                reference_header=header,
            )
        record = PredictedCase(
            case_id=case.case_id, input=files.image, output=output, probabilities=probability_path,
            label=files.label, shape=case.original_shape, seconds=prediction.seconds,
            hounsfield_ok=hounsfield_ok,
        )
        logger.info("%s: %d slices in %.1f s -> %s", files.image.name, case.image.shape[2], prediction.seconds, output)
        if on_case is not None:
            on_case(case, prediction, record)
        written.append(record)
        del case, prediction
    return written
