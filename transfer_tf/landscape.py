"""The loss landscape between two nets and around a trained one.

Two probes of Neyshabur, Sedghi and Zhang (2020), *What is being transferred in
transfer learning?*:

- **Linear interpolation** (:func:`interpolation_curve`, :func:`barrier_height`):
  loss and accuracy along the straight line ``(1 - t) * w_a + t * w_b`` between two
  nets' weights. Nets fine-tuned from the same pre-trained weights stay in one
  basin (no barrier); nets trained from random initialisations do not.
- **Module criticality** (:func:`rewind`, :func:`module_criticality`): move one
  layer group back towards its initial weights, ``(1 - alpha) * w_0 + alpha *
  w_final`` with every other layer kept trained, and find the smallest ``alpha``
  whose error stays within a tolerance of the trained net's (the no-noise version
  of Chatterji, Neyshabur and Sedghi's module criticality). ``alpha = 0`` is fully
  rewound, ``alpha = 1`` trained.

Batch normalisation
-------------------
Moving means and variances do not interpolate: the statistics of a layer's input
at an interpolated point are not the interpolated statistics. With images to
compute them on, :func:`recompute_batch_norm` replaces them by the population
statistics of those images. Keras 3 updates moving statistics only when a
trainable BatchNormalization layer is called in training mode, as an exponential
average (``momentum``) of each batch's moments, and in that mode it normalises
every batch with the batch's own moments. Running the data through the net in
training mode with some momentum therefore gives an average dominated by the last
batches, of inputs that later layers saw normalised by batch statistics rather than
by the statistics used at inference; doing it through ``fit`` with a zero learning
rate would also apply weight decay and dropout. Instead, the statistics are
computed exactly: layer by layer in graph order, each BatchNormalization layer's
input is computed in inference mode (earlier layers already using their new
statistics, dropout off) over all the images, and its mean and biased variance
(what Keras' batch moments use) are accumulated in float64 and assigned. No other
weight changes.
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers as keras_layers

from transfer_tf import data, models, similarity, training

log = logging.getLogger(__name__)

DEFAULT_TS = tuple(np.linspace(0.0, 1.0, 11))
DEFAULT_ALPHAS = tuple(np.linspace(0.0, 1.0, 11))


# -------------------------------------------------------------------- interpolation


def _weights_list(weights, name: str) -> list:
    if isinstance(weights, keras.Model):
        return weights.get_weights()
    if isinstance(weights, np.ndarray) or not hasattr(weights, "__len__"):
        raise ValueError(f"{name} must be a list of arrays (model.get_weights())")
    return [np.asarray(w) for w in weights]


def _mix(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """``(1 - t) a + t b`` in ``a``'s dtype; exactly ``a`` at 0 and ``b`` at 1."""
    if t == 0:
        return np.array(a, copy=True)
    if t == 1:
        return np.array(b, dtype=a.dtype, copy=True)
    if not np.issubdtype(a.dtype, np.floating):
        if not np.array_equal(a, b):
            raise ValueError(
                f"cannot interpolate {a.dtype} weights that differ between the nets"
            )
        return np.array(a, copy=True)
    mixed = (1.0 - t) * a.astype(np.float64) + t * b.astype(np.float64)
    return mixed.astype(a.dtype)


def interpolate(weights_a, weights_b, t: float) -> list:
    """The weights at ``t`` on the straight line from ``weights_a`` to ``weights_b``.

    Args:
      weights_a, weights_b: lists of arrays in the same order with the same shapes
        (``model.get_weights()`` of two nets of the same architecture), or the
        models themselves.
      t: position on the line; 0 gives ``weights_a`` and 1 ``weights_b`` exactly,
        values outside [0, 1] extrapolate.

    Returns:
      A new list of arrays ``(1 - t) * a + t * b`` (computed in float64, stored in
      the dtype of ``weights_a``).

    Raises:
      ValueError: lists of different lengths or arrays of different shapes
        (naming the position and both shapes), or a non-finite ``t``.
    """
    a = _weights_list(weights_a, "weights_a")
    b = _weights_list(weights_b, "weights_b")
    if not math.isfinite(t):
        raise ValueError(f"t={t!r} must be a finite number")
    if len(a) != len(b):
        raise ValueError(
            f"weights_a has {len(a)} arrays but weights_b has {len(b)}: the nets' "
            "architectures differ"
        )
    for i, (wa, wb) in enumerate(zip(a, b, strict=True)):
        if wa.shape != wb.shape:
            raise ValueError(
                f"weight {i} has shape {wa.shape} in weights_a but {wb.shape} in "
                "weights_b: the nets' architectures differ"
            )
    return [_mix(wa, wb, float(t)) for wa, wb in zip(a, b, strict=True)]


def set_interpolated(model: keras.Model, weights_a, weights_b, t: float):
    """Sets ``model``'s weights to :func:`interpolate` ``(weights_a, weights_b, t)``.

    Returns:
      ``model``, for chaining.
    """
    model.set_weights(interpolate(weights_a, weights_b, t))
    return model


def barrier_height(ts, losses) -> float:
    """The highest loss above the straight line between the curve's end points.

    ``max over t in [0, 1] of loss(t) - ((1 - t) loss(0) + t loss(1))``: 0 when the
    loss along the path never rises above the chord (e.g. a linear or convex
    curve), the bump's height otherwise. Points outside [0, 1] are ignored.

    Args:
      ts: positions on the path; must include 0 and 1 (in any order).
      losses: the loss at each position.

    Returns:
      The barrier height, >= 0.

    Raises:
      ValueError: lengths that differ, ``ts`` without 0 or 1, or non-finite values.
    """
    ts = np.asarray(ts, dtype=np.float64).ravel()
    losses = np.asarray(losses, dtype=np.float64).ravel()
    if ts.shape != losses.shape:
        raise ValueError(f"{len(ts)} positions but {len(losses)} losses")
    if not (np.all(np.isfinite(ts)) and np.all(np.isfinite(losses))):
        raise ValueError("ts and losses must be finite")
    missing = [end for end in (0.0, 1.0) if not np.any(ts == end)]
    if missing:
        raise ValueError(f"ts must include the end points 0 and 1; missing {missing}")
    start = float(losses[ts == 0.0][0])
    end = float(losses[ts == 1.0][0])
    inside = (ts >= 0.0) & (ts <= 1.0)
    chord = (1.0 - ts[inside]) * start + ts[inside] * end
    return float(max(0.0, np.max(losses[inside] - chord)))


# ------------------------------------------------------------ batch normalisation


def _batch_norm_layers(model: keras.Model) -> list:
    bns = [
        layer
        for layer in model.layers
        if isinstance(layer, keras_layers.BatchNormalization)
    ]
    for layer in model.layers:
        if isinstance(layer, keras.Model) and any(
            isinstance(sub, keras_layers.BatchNormalization) for sub in layer.layers
        ):
            raise ValueError(
                f"model {model.name!r} holds BatchNormalization inside the nested "
                f"model {layer.name!r}; only top-level layers are recomputed"
            )
    for layer in bns:
        if layer.renorm:
            raise ValueError(
                f"BatchNormalization layer {layer.name!r} uses batch "
                "renormalisation, whose statistics are not recomputed"
            )
    return bns


class _BatchNormStatistics:
    """Recomputes a model's moving statistics.

    One probe per BatchNormalization layer returns the float64 mean and biased
    variance of the layer's input over a batch, so only per-channel vectors leave
    the graph. Probes are built once and reused: they share the model's layers and
    follow its current weights (a curve recomputes at every point).
    """

    def __init__(self, model: keras.Model):
        self.layers = _batch_norm_layers(model)
        self.probes = [_moments_probe(model, layer) for layer in self.layers]

    def __call__(self, images, batch_size: int):
        if not self.layers:
            return
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be positive")
        images = np.asarray(images)
        if len(images) == 0:
            raise ValueError("cannot recompute batch statistics from zero images")
        # In graph order: each probe runs through the layers before it, whose
        # statistics have just been replaced.
        for layer, (probe, per_image) in zip(self.layers, self.probes, strict=True):
            mean, variance = _population_moments(probe, per_image, images, batch_size)
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))


def _moments_probe(model: keras.Model, layer):
    """A model from images to the batch's float64 moments of ``layer``'s input,
    and the number of values per channel that one image contributes."""
    x = keras.ops.cast(layer.input, "float64")
    axis = layer.axis % len(x.shape)
    axes = [i for i in range(len(x.shape)) if i != axis]
    per_image = math.prod(int(x.shape[i]) for i in axes[1:])
    outputs = [keras.ops.mean(x, axis=axes), keras.ops.var(x, axis=axes)]
    return keras.Model(model.input, outputs, name=f"{layer.name}_moments"), per_image


def _population_moments(probe, per_image: int, images, batch_size: int):
    """Mean and biased variance over all ``images``, merging the batches' moments
    in float64 (Chan et al.'s pairwise update)."""
    count, mean, m2 = 0.0, 0.0, 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        batch_mean, batch_var = (
            np.asarray(v, np.float64) for v in probe.predict_on_batch(batch)
        )
        n = float(len(batch) * per_image)
        total = count + n
        delta = batch_mean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + batch_var * n + np.square(delta) * (count * n / total)
        count = total
    return mean, m2 / count


def recompute_batch_norm(model: keras.Model, images, batch_size: int = 256):
    """Sets every BatchNormalization layer's moving statistics to those of ``images``.

    Layer by layer in graph order, each layer's moving mean and variance become the
    exact mean and biased variance of its input over all ``images``, computed in
    inference mode with the layers before it already using their recomputed
    statistics (see the module docstring for why this and not a momentum update).
    No other weight changes; dropout is inactive. A no-op for a net without batch
    normalisation.

    Args:
      model: a Functional model, changed in place.
      images: the (training) images ``(N, H, W, C)`` whose statistics to use.
      batch_size: images per forward pass (the result does not depend on it, up
        to float32 rounding inside the net).

    Returns:
      ``model``, for chaining.

    Raises:
      ValueError: no images, a nested model holding batch normalisation, or batch
        renormalisation.
    """
    _BatchNormStatistics(model)(images, batch_size)
    return model


def has_batch_norm(model: keras.Model) -> bool:
    """Whether ``model`` has BatchNormalization layers."""
    return any(
        isinstance(layer, keras_layers.BatchNormalization) for layer in model.layers
    )


# ------------------------------------------------------------------- evaluation


def _clone(model: keras.Model) -> keras.Model:
    """A copy with the same architecture (and dtype policy), to change freely."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _as_dataset(name: str, value, batch_size: int) -> tf.data.Dataset:
    if isinstance(value, tf.data.Dataset):
        return value
    try:
        x, y = value
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"dataset {name!r} must be an (images, labels) pair of arrays or a "
            "batched tf.data.Dataset"
        ) from e
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(
            f"dataset {name!r} has {len(x)} images and {len(y)} labels; expected the "
            "same, non-zero number"
        )
    return data.pipeline(x, y, batch_size, training=False)


# ---------------------------------------------------------------------- the curve


def interpolation_curve(
    model_a: keras.Model,
    model_b: keras.Model,
    datasets: dict,
    ts=DEFAULT_TS,
    bn_images=None,
    batch_size: int = 256,
    recompute_ends: bool = True,
) -> dict:
    """Loss and accuracy along the straight line between two nets' weights.

    Evaluates a clone of ``model_a`` at each ``t``, so neither input net changes.
    Loss is the mean cross-entropy of the logits and accuracy top-1, as in
    :func:`training.evaluate`.

    Args:
      model_a, model_b: nets of the same architecture (layers matched by name);
        ``t = 0`` is ``model_a``, ``t = 1`` is ``model_b``.
      datasets: ``{name: (images, labels)}`` (arrays) or ``{name: batched
        tf.data.Dataset}``, e.g. ``{"train": ..., "test": ...}``.
      ts: positions on the line (values outside [0, 1] extrapolate).
      bn_images: training images for the batch-normalisation statistics. Given,
        and the nets have BatchNormalization, the statistics are recomputed at
        every ``t`` (:func:`recompute_batch_norm`). ``None``: the moving
        statistics are interpolated like every other weight (exact at the end
        points, a poor stand-in in between; logged as a warning for BN nets).
      batch_size: batch size of evaluation and of the statistics' passes.
      recompute_ends: with ``bn_images``, whether ``t = 0`` and ``t = 1`` are also
        recomputed (the default: one method along the whole curve, so a barrier
        is not an artefact of switching methods). ``False`` keeps the end nets'
        own statistics there, so the end points are exactly the trained nets.

    Returns:
      ``{"t": [...], "<name>/loss": [...], "<name>/accuracy": [...], ...}`` with one
      entry per ``t``, plus ``"<name>/barrier"`` (:func:`barrier_height` of the
      loss) when ``ts`` includes 0 and 1. Without recomputation (or with
      ``recompute_ends=False``) the values at ``t = 0`` and ``t = 1`` are exactly
      what ``training.evaluate`` gives for ``model_a`` and ``model_b`` (unless
      they were compiled differently, e.g. with XLA).

    Raises:
      ValueError: architectures that differ (naming the layer), no datasets, or a
        malformed dataset.
    """
    similarity.check_same_architecture(model_a, model_b)
    if not datasets:
        raise ValueError("interpolation_curve needs at least one dataset")
    ts = [float(t) for t in np.ravel(ts)]
    if not ts:
        raise ValueError("ts must hold at least one position")
    pipelines = {
        name: _as_dataset(name, value, batch_size) for name, value in datasets.items()
    }
    weights_a, weights_b = model_a.get_weights(), model_b.get_weights()
    clone = _clone(model_a)
    statistics = _BatchNormStatistics(clone)
    recompute = bn_images is not None and bool(statistics.layers)
    if statistics.layers and bn_images is None:
        log.warning(
            "%s has batch normalisation but no bn_images: its moving statistics are "
            "interpolated, not recomputed",
            model_a.name,
        )
    out = {"t": ts}
    for name in pipelines:
        out[f"{name}/loss"], out[f"{name}/accuracy"] = [], []
    for t in ts:
        set_interpolated(clone, weights_a, weights_b, t)
        if recompute and (recompute_ends or t not in (0.0, 1.0)):
            statistics(bn_images, batch_size)
        for name, dataset in pipelines.items():
            result = training.evaluate(clone, dataset)
            out[f"{name}/loss"].append(result["loss"])
            out[f"{name}/accuracy"].append(result["accuracy"])
    if 0.0 in ts and 1.0 in ts:
        for name in pipelines:
            out[f"{name}/barrier"] = barrier_height(ts, out[f"{name}/loss"])
    return out


# ---------------------------------------------------------------- module criticality


def weights_by_layer(model: keras.Model) -> dict:
    """``{keras layer name: layer.get_weights()}`` of every layer with weights.

    The form :func:`rewind` and :func:`module_criticality` take initial weights in:
    take it before training (or pass the untrained model itself).
    """
    return {layer.name: layer.get_weights() for layer in model.layers if layer.weights}


def _layer_names(layer) -> tuple:
    names = (layer,) if isinstance(layer, str) else tuple(layer)
    unknown = [n for n in names if n not in models.LAYER_NAMES]
    if unknown:
        raise ValueError(
            f"unknown layers {unknown}; choose from {list(models.LAYER_NAMES)}"
        )
    return names


def _initial_state(initial_weights) -> dict:
    if isinstance(initial_weights, keras.Model):
        return weights_by_layer(initial_weights)
    if not isinstance(initial_weights, dict):
        raise ValueError(
            "initial_weights must be a model or a dict {keras layer name: "
            "layer.get_weights()} (see weights_by_layer)"
        )
    return initial_weights


def _rewound(model: keras.Model, initial: dict, names: tuple, alpha: float, final):
    """``final`` (model.get_weights() order) with the groups ``names`` rewound."""
    indices = {models.LAYER_NAMES.index(n) + 1 for n in names}
    owner = {}
    for layer in model.layers:
        for i, variable in enumerate(layer.weights):
            owner[id(variable)] = (layer.name, i)
    out = []
    for variable, value in zip(model.weights, final, strict=True):
        layer_name, i = owner[id(variable)]
        if models.layer_index(layer_name) not in indices:
            out.append(value)
            continue
        if layer_name not in initial:
            raise ValueError(
                f"initial_weights has no entry for layer {layer_name!r} (has "
                f"{sorted(initial)})"
            )
        start = initial[layer_name]
        if i >= len(start) or np.shape(start[i]) != value.shape:
            have = [np.shape(w) for w in start]
            want = [tuple(v.shape) for v in model.get_layer(layer_name).weights]
            raise ValueError(
                f"layer {layer_name!r}: initial weights of shapes {have} do not "
                f"match the model's {want}"
            )
        out.append(_mix(np.asarray(start[i], dtype=value.dtype), value, alpha))
    return out


def rewind(model: keras.Model, initial_weights, layer, alpha: float) -> list:
    """Weights of ``model`` with one layer group moved back towards its start.

    The group's weights (the weight layer and its batch normalisation, moving
    statistics included) become ``(1 - alpha) * initial + alpha * trained``; every
    other layer keeps ``model``'s weights. ``model`` itself is not changed.

    Args:
      model: the trained net.
      initial_weights: its weights before training, as a model or a dict
        ``{keras layer name: layer.get_weights()}`` (:func:`weights_by_layer`).
      layer: a layer name (``conv1``..``fc8``) or several, all rewound together.
      alpha: 0 = fully rewound, 1 = trained. Rewinding every layer with
        ``alpha = 0`` gives the initial net exactly.

    Returns:
      A list of arrays in ``model.get_weights()`` order (``model.set_weights``
      takes it).

    Raises:
      ValueError: an unknown layer, or initial weights missing a Keras layer or
        of other shapes (naming it).
    """
    names = _layer_names(layer)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} must be a finite number")
    return _rewound(
        model, _initial_state(initial_weights), names, float(alpha), model.get_weights()
    )


def critical_alpha(alphas, errors, trained_error: float, tolerance: float):
    """The smallest ``alpha`` from which on the error stays within ``tolerance``.

    Args:
      alphas: rewinding coefficients, in any order.
      errors: the error at each.
      trained_error: the trained net's error.
      tolerance: allowed increase of the error (absolute, e.g. 0.01 = one point).

    Returns:
      The smallest ``alpha`` such that every ``alpha' >= alpha`` of the grid has
      ``error <= trained_error + tolerance``, or ``None`` if even the largest does
      not (possible only when the grid lacks ``alpha = 1``).
    """
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if len(alphas) != len(errors):
        raise ValueError(f"{len(alphas)} alphas but {len(errors)} errors")
    order = np.argsort(alphas, kind="stable")
    alphas, errors = alphas[order], errors[order]
    best = None
    for alpha, error in zip(alphas[::-1], errors[::-1], strict=True):
        if error > trained_error + tolerance:
            break
        best = float(alpha)
    return best


def module_criticality(
    model: keras.Model,
    initial_weights,
    data,
    layers=models.LAYER_NAMES,
    alphas=DEFAULT_ALPHAS,
    tolerance: float = 0.01,
    batch_size: int = 256,
    bn_images=None,
) -> dict:
    """How far each layer group can be rewound before the error rises.

    For each layer, only its group is set to ``(1 - alpha) * initial + alpha *
    trained`` (:func:`rewind`), the others stay trained, and the error is measured
    at every ``alpha``. Works on a clone; ``model`` does not change.

    Args:
      model: the trained net.
      initial_weights: its weights before training (a model or
        :func:`weights_by_layer`).
      data: ``(images, labels)`` arrays or a batched ``tf.data.Dataset`` to
        measure the error on.
      layers: layer names among ``conv1``..``fc8``.
      alphas: rewinding coefficients in [0, 1].
      tolerance: allowed increase of the error over the trained net's.
      batch_size: batch size of evaluation and of the statistics' passes.
      bn_images: training images; given, batch-normalisation statistics are
        recomputed after every rewinding and for the trained reference (see
        :func:`recompute_batch_norm`). ``None`` rewinds them with the weights.

    Returns:
      ``{"alphas": [...], "tolerance": t, "trained": {"error", "loss"},
      "layers": {layer: {"error": [...], "loss": [...], "critical_alpha": a}}}``
      with :func:`critical_alpha` of each layer's errors.

    Raises:
      ValueError: an unknown layer, an ``alpha`` outside [0, 1], a negative
        tolerance, or initial weights that do not match the model.
    """
    names = _layer_names(layers)
    alphas = [float(a) for a in np.ravel(alphas)]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas={alphas!r} must be a non-empty list in [0, 1]")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be >= 0")
    initial = _initial_state(initial_weights)
    dataset = _as_dataset("data", data, batch_size)
    final = model.get_weights()
    clone = _clone(model)
    statistics = _BatchNormStatistics(clone)
    recompute = bn_images is not None and bool(statistics.layers)

    def measure(weights):
        clone.set_weights(weights)
        if recompute:
            statistics(bn_images, batch_size)
        result = training.evaluate(clone, dataset)
        return 1.0 - result["accuracy"], result["loss"]

    trained_error, trained_loss = measure(final)
    out = {
        "alphas": alphas,
        "tolerance": float(tolerance),
        "trained": {"error": trained_error, "loss": trained_loss},
        "layers": {},
    }
    for name in names:
        errors, losses = [], []
        for alpha in alphas:
            error, loss = measure(_rewound(model, initial, (name,), alpha, final))
            errors.append(error)
            losses.append(loss)
        out["layers"][name] = {
            "error": errors,
            "loss": losses,
            "critical_alpha": critical_alpha(alphas, errors, trained_error, tolerance),
        }
    return out
