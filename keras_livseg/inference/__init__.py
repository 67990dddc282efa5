"""Whole-volume inference: a trained model on CT volumes → uint8 label maps on the input's grid.

Three pieces, usable alone:

- :class:`SegmentationModel` loads a ``.keras`` checkpoint (with the ``preprocessing.json`` of its
  run), an exported SavedModel folder, or a TF Serving base folder (highest version), and
  exposes one call, :meth:`SegmentationModel.predict_slices`: raw HU slices of any size in,
  class probabilities at the same size out. Preprocessing (window, resize, standardization)
  is the one defined in :mod:`keras_livseg.data.preprocessing`, or the one built into the
  exported graph, so training and inference cannot drift apart.
- :func:`predict_volume` streams a canonical volume through the model ``batch_size`` slices at a
  time. Memory stays bounded: only one batch of float32 probabilities exists at a time; the
  volume keeps uint8 labels and, on request, uint8 probabilities (0–255 per class), so a
  512×512×800 scan needs 200 MB of labels (+600 MB with probabilities) beyond the CT itself.
  Optional flip test-time augmentation averages the prediction with that of the
  left-right-flipped slices, and :func:`postprocess_labels` cleans the result. For a
  ``.keras`` model asked for labels only, each slice is windowed and resampled once (not once
  per context channel) and the model-grid probabilities are brought back to the scan's size
  around the foreground only (:attr:`SegmentationModel.labels_on_grid`): the same labels,
  voxel for voxel, in less time.
- :func:`predict_paths` finds the cases (a NIfTI file, a folder of them, a LiTS or MSD dataset),
  predicts each and writes the label map **on the input's own grid, shape and affine**
  (``volume-N.nii.gz`` → ``segmentation-N.nii.gz``, any other name unchanged), plus optional 4D
  uint8 probability maps.

Post-processing (:class:`PostProcessing`), in this order, each step optional:

1. **Largest liver component**: only the largest 3D connected component (face connectivity) of
   the liver (label >= 1, tumor included, as LiTS) is kept; every other island becomes 0.
2. **Tumor inside the liver**: tumor components (lesions) whose nearest voxel is farther than
   ``liver_margin_mm`` from the liver parenchyma (label 1) become background: a lesion is by
   definition in the liver, and a "tumor" blob outside it is a false positive (bowel, kidney
   cyst). Judged per lesion, so a large lesion keeps its centre and an exophytic one its bulge.
3. **Minimum lesion size**: tumor components smaller than ``min_lesion_mm3`` (in mm³ from the
   voxel spacing) or ``min_lesion_voxels`` become liver (label 1): they sit inside the liver, so
   the likeliest truth is parenchyma. The default, 10 mm³, is below the volume of a 3 mm sphere
   (14 mm³): it removes speckle but no lesion a radiologist could report.

Example:
    >>> model = SegmentationModel.load("runs/demo/checkpoints/best.keras")  # doctest: +SKIP
    >>> written = predict_paths(model, ["data/LiTS/volume-3.nii"], "predictions")  # doctest: +SKIP
    >>> written[0].output.name  # doctest: +SKIP
    'segmentation-3.nii'
"""

from keras_livseg.inference.files import PredictedCase, predict_paths
from keras_livseg.inference.postprocess import (
    DEFAULT_LIVER_MARGIN_MM,
    DEFAULT_MIN_LESION_MM3,
    PostProcessing,
    postprocess_labels,
)
from keras_livseg.inference.predictor import SegmentationModel
from keras_livseg.inference.volume import VolumePrediction, check_hounsfield, predict_volume

__all__ = [
    "DEFAULT_LIVER_MARGIN_MM",
    "DEFAULT_MIN_LESION_MM3",
    "PostProcessing",
    "PredictedCase",
    "SegmentationModel",
    "VolumePrediction",
    "check_hounsfield",
    "postprocess_labels",
    "predict_paths",
    "predict_volume",
]
