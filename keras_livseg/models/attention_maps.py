"""What a model looks at: its own attention gates as maps, and Grad-CAM for any model.

- :func:`gate_maps`: every attention layer of a model that exposes ``compute_attention`` (the
  TAMs of TAM-U-Net, the attention gates of Attention U-Net, CBAM's spatial gate) evaluated on
  the given slices, averaged over the gate's channels and resized to the input: one map in
  [0, 1] per layer. The TAM-U-Net paper names interpretability as its future work; these are
  the gates it multiplies the features by.
- :func:`grad_cam`: Grad-CAM for segmentation (Selvaraju et al. 2017; the segmentation form of
  Vinogradova et al. 2020): the gradient of the class's summed logit over the pixels the model
  assigns to that class, with respect to a feature map, averaged over space as channel weights;
  ``relu(sum_k w_k A_k)``, resized to the input and scaled to [0, 1] per slice.

>>> import numpy as np
>>> from keras_livseg.models import build_model
>>> model = build_model("tam_unet", input_shape=(32, 32, 1), filters=4, depth=2)
>>> maps = gate_maps(model, np.zeros((1, 32, 32, 1), "float32"))
>>> list(maps)[:2], maps["encoder1_tam"].shape
(['encoder1_tam', 'encoder2_tam'], (1, 32, 32))
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_livseg.models._utils import channel_axis, spatial_axes


def attention_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's top-level layers with a ``compute_attention`` method, in network order."""
    return [layer for layer in model.layers if callable(getattr(layer, "compute_attention", None))]


def _to_input_size(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[n, h, w]`` maps resized (bilinear) to ``size``."""
    if maps.shape[1:] == tuple(size):
        return maps
    resized = ops.image.resize(maps[..., None], size, interpolation="bilinear", data_format="channels_last")
    return np.asarray(ops.convert_to_numpy(resized))[..., 0]


def _input_size(model: keras.Model) -> tuple[int, int]:
    h_axis, w_axis = spatial_axes()
    shape = model.input_shape
    return int(shape[h_axis]), int(shape[w_axis])


def gate_maps(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Each attention layer's gate on ``images``, channel-averaged, at the input's size.

    Args:
        model: A functional model (TAM-U-Net, Attention U-Net, U-Net+CBAM...).
        images: ``[n, H, W, C]`` standardized slices, as the model takes them.

    Returns:
        ``{layer name: [n, H, W] float32 in [0, 1]}``, in network order; empty for a model
        without spatial attention gates (attention over position pairs, as MA-Net's PAB, is
        not a map of the slice and is left out).
    """
    chosen = attention_layers(model)
    if not chosen:
        return {}
    probe = keras.Model(model.input, [layer.input for layer in chosen])
    outputs = probe(np.asarray(images, np.float32), training=False)
    if len(chosen) == 1:
        outputs = [outputs]
    size = _input_size(model)
    maps = {}
    for layer, inputs in zip(chosen, outputs):
        gate = ops.convert_to_numpy(ops.cast(layer.compute_attention(inputs), "float32"))
        if gate.ndim != 4:
            continue  # not a spatial gate (MA-Net's position attention is a positions x positions map)
        gate = np.mean(gate, axis=channel_axis())
        maps[layer.name] = _to_input_size(gate.astype(np.float32), size)
    return maps


def default_cam_layer(model: keras.Model) -> str:
    """The deepest feature map: the top-level layer with the smallest spatial 4D output (the last one on ties)."""
    h_axis, w_axis = spatial_axes()
    best, best_area = None, None
    for layer in model.layers[1:]:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue  # a nested model with several outputs
        if len(shape) != 4 or shape[h_axis] is None:
            continue
        area = shape[h_axis] * shape[w_axis]
        if best_area is None or area <= best_area:
            best, best_area = layer.name, area
    if best is None:
        raise ValueError(f"{model.name} has no 4D feature map for Grad-CAM; pass layer_name")
    return best


def grad_cam(model: keras.Model, images: np.ndarray, class_index: int, layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM maps of one class for a batch of slices (TensorFlow backend).

    Args:
        model: Any model of the registry (output ``[n, H, W, classes]`` probabilities).
        images: ``[n, H, W, C]`` standardized slices.
        class_index: 1 liver, 2 tumour (0 background).
        layer_name: The feature map to explain; default :func:`default_cam_layer`.

    Returns:
        ``[n, H, W]`` float32 in [0, 1] (all zeros where the model predicts none of the class
        and the gradient vanishes).

    Raises:
        ValueError: an unknown layer, or a backend other than TensorFlow.
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(f"grad_cam needs the TensorFlow backend (this is {keras.backend.backend()})")
    import tensorflow as tf

    layer_name = layer_name or default_cam_layer(model)
    try:
        feature_layer = model.get_layer(layer_name)
    except ValueError:
        raise ValueError(f"{model.name} has no layer {layer_name!r}; pick one of its layers (model.summary())") from None
    probe = keras.Model(model.input, [feature_layer.output, model.output])
    x = tf.convert_to_tensor(np.asarray(images, np.float32))
    with tf.GradientTape() as tape:
        features, probabilities = probe(x, training=False)
        score = _class_score(probabilities, class_index)
    cam = _cam(features, tape.gradient(score, features)).numpy()
    return _to_input_size(_per_slice_unit(cam), _input_size(model))


def _class_score(probabilities, class_index: int):
    """The class's log-probability summed over the pixels assigned to it (the whole slice when
    there are none, so that the map still says what pushes towards the class). TensorFlow."""
    import tensorflow as tf

    probabilities = tf.cast(probabilities, tf.float32)
    assigned = tf.cast(tf.argmax(probabilities, axis=-1) == class_index, tf.float32)
    has_any = tf.reduce_any(assigned > 0, axis=(1, 2), keepdims=True)
    region = tf.where(has_any, assigned, tf.ones_like(assigned))
    return tf.reduce_sum(tf.math.log(probabilities[..., class_index] + 1e-7) * region)


def _cam(features, gradients):
    """``relu(sum_k w_k A_k)``, ``w_k`` the spatial mean of the gradient: ``[n, h, w]``. TensorFlow."""
    import tensorflow as tf

    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    return tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))


def _per_slice_unit(cam: np.ndarray) -> np.ndarray:
    """Each slice's map divided by its peak (all zeros stay zeros)."""
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0).astype(np.float32)


def attention_maps(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """The maps TensorBoard and ``compare`` show, each ``[n, H, W]`` in [0, 1].

    The mean of the model's attention gates (when it has any, :func:`gate_maps`), then Grad-CAM
    of the tumour and of the liver (:func:`grad_cam`, TensorFlow backend only).
    """
    maps: dict[str, np.ndarray] = {}
    gates = gate_maps(model, images)
    if gates:
        maps["attention gates (mean over layers)"] = np.mean(np.stack(list(gates.values())), axis=0)
    if keras.backend.backend() == "tensorflow":
        maps["Grad-CAM tumour"] = grad_cam(model, images, 2)
        maps["Grad-CAM liver"] = grad_cam(model, images, 1)
    return maps


class AttentionMaps:
    """:func:`attention_maps` of one model, prepared once for many calls.

    The probe model is built once and, on TensorFlow, the gates and both Grad-CAMs come from one
    compiled pass (one forward, two gradients) instead of three eager ones: ``fit``'s TensorBoard
    callback draws the maps every few epochs, and eagerly they cost ~0.7 s a call on 2 cores (a
    128 px TAM-U-Net, 4 slices), seconds of a 5-minute run. The maps are :func:`attention_maps`'s.

    Example:
        >>> from keras_livseg.models import build_model
        >>> model = build_model("tam_unet", input_shape=(32, 32, 1), filters=4, depth=2)
        >>> maps = AttentionMaps(model)(np.zeros((2, 32, 32, 1), "float32"))
        >>> list(maps), maps["Grad-CAM liver"].shape
        (['attention gates (mean over layers)', 'Grad-CAM tumour', 'Grad-CAM liver'], (2, 32, 32))
    """

    def __init__(self, model: keras.Model) -> None:
        self.model = model
        self._compiled = None
        if keras.backend.backend() != "tensorflow":
            return  # attention_maps() has the gates only there, eagerly
        import tensorflow as tf

        gates = attention_layers(model)
        features = model.get_layer(default_cam_layer(model)).output
        probe = keras.Model(model.input, {"gates": [layer.input for layer in gates], "features": features,
                                          "probabilities": model.output})
        axis = channel_axis()

        def maps(x):
            with tf.GradientTape(persistent=True) as tape:
                out = probe(x, training=False)
                scores = [_class_score(out["probabilities"], class_index) for class_index in (2, 1)]
            cams = [_cam(out["features"], tape.gradient(score, out["features"])) for score in scores]
            spatial = []
            for layer, inputs in zip(gates, out["gates"]):
                gate = layer.compute_attention(inputs)
                if len(gate.shape) == 4:  # gate_maps() leaves out MA-Net's positions x positions map
                    spatial.append(tf.reduce_mean(tf.cast(gate, tf.float32), axis=axis))
            return spatial, cams

        self._compiled = tf.function(maps, reduce_retracing=True)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: [n, H, W] float32 in [0, 1]}`` for ``[n, H, W, C]`` standardized slices."""
        if self._compiled is None:
            return attention_maps(self.model, images)
        gates, cams = self._compiled(np.asarray(images, np.float32))
        size = _input_size(self.model)
        maps: dict[str, np.ndarray] = {}
        if gates:
            maps["attention gates (mean over layers)"] = np.mean(
                np.stack([_to_input_size(np.asarray(gate), size) for gate in gates]), axis=0)
        maps["Grad-CAM tumour"] = _to_input_size(_per_slice_unit(np.asarray(cams[0])), size)
        maps["Grad-CAM liver"] = _to_input_size(_per_slice_unit(np.asarray(cams[1])), size)
        return maps
