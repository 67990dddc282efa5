"""Export a trained model as a SavedModel for TF Serving that takes raw Hounsfield units.

The exported ``serving_default`` signature (also under the name ``serve``) is::

    ct_slices:      float32 [batch, height, width]          consecutive axial slices (any model), or
                    float32 [batch, height, width, context] stacks (2.5D models)
                    raw HU, any height and width
    ->
    probabilities:  float32 [batch, height, width, 3]       at the input's size
    mask:           uint8   [batch, height, width]          0 background, 1 liver, 2 tumor

A 2.5D model given plain consecutive slices builds each slice's context from its neighbours in
the request, the first and last repeating themselves (:func:`signature.context_from_request`):
a client need not know the model's context, but one slice alone gets no real neighbours.

Inside the graph, the request goes through the same preprocessing as training
(:meth:`Preprocessing.tf_model_input`: HU window, bilinear resize to the model's size,
standardization), the model, and a bilinear resize of the probabilities back to the
input's height × width; the mask is the argmax of the resized probabilities. Keeping the
preprocessing inside the graph is what makes train/serve skew impossible: a client sends
the CT as it comes from the scanner and never needs to know the window or statistics.

Models that resample to a fixed pixel spacing (``preprocessing.spacing_mm``) need the spacing
of the slices sent: their signature has a second input, ``pixel_spacing_mm: float32 [2]``
(row and column spacing in mm, from the DICOM PixelSpacing or the NIfTI header), and the
graph resamples, crops/pads, and maps the probabilities back exactly as ``prepare`` and
``predict`` do.

Models whose context slices lie a fixed distance apart (``preprocessing.context_mm``, recorded
in ``assets.extra/preprocessing.json``) take, as channels, the slices that far apart: a client
sends ``[B, H, W, context]`` stacks picked with the stride for its scan's slice thickness
(:meth:`~keras_livseg.data.preprocessing.Preprocessing.context_stride`), or plain slices already
that far apart (every third slice of a 1.6 mm scan for ``context_mm = 4.5``), which the graph
stacks as neighbours.

Models trained with ``normalization="volume"`` (each volume standardized with its own
statistics) are refused: a request holds slices, not the volume, and statistics of the slices
sent would differ from those of training. Retrain with ``normalization="foreground"`` (the
default) to serve, or predict whole volumes with the ``.keras`` checkpoint
(``python -m keras_livseg.predict``), which computes them per volume.

The SavedModel is written in TF Serving's layout ``<out_base>/<version>/``, into a hidden
temporary folder beside it first and renamed when complete, so the server (which polls the
base folder) never sees a half-written version. ``<version>/assets.extra/preprocessing.json``
records the preprocessing, model name, classes and signature names.
"""

from keras_livseg.models.saving import load_keras_model
from keras_livseg.serving.saved_model import export_saved_model, export_to, next_version
from keras_livseg.serving.signature import (
    CLASSES,
    INPUT_NAME,
    MASK,
    PROBABILITIES,
    SIGMOID_CHANNELS,
    SIGNATURES,
    SPACING_INPUT,
    make_serving_function,
)

__all__ = [
    "CLASSES",
    "INPUT_NAME",
    "MASK",
    "PROBABILITIES",
    "SIGMOID_CHANNELS",
    "SIGNATURES",
    "SPACING_INPUT",
    "export_saved_model",
    "export_to",
    "load_keras_model",
    "make_serving_function",
    "next_version",
]
