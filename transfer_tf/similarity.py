"""How similar two trained nets are: in feature space, in parameter space, in mistakes.

The measures of Neyshabur, Sedghi and Zhang (2020), *What is being transferred in
transfer learning?*, for two nets of the same architecture (two fine-tuned
instances, a pre-trained net and its fine-tuned version, or two nets trained from
random initialisations):

- **Feature similarity** (:func:`linear_cka`, :func:`layer_cka`): linear centred
  kernel alignment (Kornblith et al. 2019) of the two nets' representations of the
  same images, layer by layer. "Layer ``conv3``" means the output of the whole
  ``conv3`` block, as in :func:`features.feature_tensor` (what ``conv4`` receives).
- **Parameter distance** (:func:`parameter_distance`): the L2 distance of the
  weights of each layer group (a weight layer together with its batch
  normalisation, grouped by :func:`models.layer_index`) and of all of them.
- **Common mistakes** (:func:`mistake_agreement`): of the test examples at least
  one net gets wrong, the fraction both get wrong.

CKA is computed exactly, never through a random projection: projecting wide
feature maps to fewer dimensions (a count sketch, say) inflates the norms of the
Gram matrices and so biases CKA downwards, by an amount that depends on the
features' effective rank, i.e. differently for different layers and nets. Instead,
:func:`layer_cka` bounds its memory by running the nets in as many passes as the
layers' features need (``memory_gb``) and refuses, naming the layer and how many
images would fit, when one layer alone is too large. The Gram matrices of wide
features are accumulated over column blocks in float64, so wide features are never
copied whole to float64.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers as keras_layers

from transfer_tf import features, models

CKA_METHODS = ("auto", "features", "gram")
# A representation whose centred norm is below this fraction of its norm has no
# variation float32 activations could resolve: it is treated as constant.
CONSTANT_TOLERANCE = 1e-10
# Column block of the Gram accumulation: keeps a float64 block near 64 MiB.
_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------- CKA


def _as_matrix(x, name: str) -> np.ndarray:
    """``x`` as a 2-D array (N, D), keeping its dtype (features stay float32)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{name} has shape {x.shape}; expected (examples, features) or a "
            "higher-rank array of examples"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} has dtype {x.dtype}; expected numbers")
    x = x.reshape(len(x), -1)
    if x.shape[1] == 0:
        raise ValueError(f"{name} has shape {x.shape}: no features")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _column_blocks(x: np.ndarray):
    """Column slices of ``x`` whose float64 copies stay near ``_BLOCK_BYTES``."""
    step = max(1, _BLOCK_BYTES // (8 * max(1, len(x))))
    for start in range(0, x.shape[1], step):
        yield slice(start, min(start + step, x.shape[1]))


def _centred_gram(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``Xc Xc^T`` in float64, accumulated over column blocks of ``x``."""
    gram = np.zeros((len(x), len(x)))
    for block in _column_blocks(x):
        xc = x[:, block].astype(np.float64) - mean[block]
        gram += xc @ xc.T
    return gram


def _check_varies(x: np.ndarray, centred_sq: float, name: str):
    """Fails for a representation that is the same for every example."""
    total_sq = sum(
        float(np.sum(np.square(x[:, b].astype(np.float64)))) for b in _column_blocks(x)
    )
    if centred_sq <= (CONSTANT_TOLERANCE**2) * total_sq or total_sq == 0.0:
        raise ValueError(
            f"{name} is the same for every example (constant features): CKA is "
            "undefined (0/0)"
        )


def linear_cka(x, y, method: str = "auto") -> float:
    """Linear centred kernel alignment of two representations of the same examples.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc``
    the features centred over the examples (Kornblith et al. 2019), equivalently
    ``<K, L>_F / (||K||_F ||L||_F)`` with the centred Gram matrices ``K = Xc Xc^T``
    and ``L = Yc Yc^T``. It is 1 for a representation with itself and invariant to
    orthogonal transforms and isotropic scaling of either representation. Computed
    in float64 whatever the inputs' dtype.

    Args:
      x: features ``(N, D1)``; a higher-rank array ``(N, ...)`` is flattened per
        example.
      y: features ``(N, D2)`` of the same N examples, in the same order.
      method: ``features`` (the feature-space formula, cost ``N (D1 + D2)^2``),
        ``gram`` (the Gram form, cost ``N^2 (D1 + D2)``; for ``D >> N``) or
        ``auto``, the cheaper of the two for these shapes. Both give the same
        value up to rounding.

    Returns:
      CKA in [0, 1].

    Raises:
      ValueError: different numbers of examples, fewer than 2 examples, NaN or
        infinite values, an unknown ``method``, or a constant representation (the
        same features for every example: CKA is 0/0 there, and returning a number
        would hide a dead layer).
    """
    if method not in CKA_METHODS:
        raise ValueError(f"method={method!r} is not one of {list(CKA_METHODS)}")
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    n = len(x)
    if len(y) != n:
        raise ValueError(
            f"x and y must describe the same examples: x has {n} rows, y has {len(y)}"
        )
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, got {n}")
    d1, d2 = x.shape[1], y.shape[1]
    if method == "auto":
        feature_cost = n * (d1 * d1 + d2 * d2 + d1 * d2)
        gram_cost = n * n * (d1 + d2 + 3)
        method = "features" if feature_cost <= gram_cost else "gram"
    mean_x = x.mean(axis=0, dtype=np.float64)
    mean_y = y.mean(axis=0, dtype=np.float64)
    if method == "features":
        xc = x.astype(np.float64) - mean_x
        yc = y.astype(np.float64) - mean_y
        _check_varies(x, float(np.sum(xc * xc)), "x")
        _check_varies(y, float(np.sum(yc * yc)), "y")
        cross = np.linalg.norm(yc.T @ xc) ** 2
        norm_x = np.linalg.norm(xc.T @ xc)
        norm_y = np.linalg.norm(yc.T @ yc)
    else:
        k = _centred_gram(x, mean_x)
        _check_varies(x, float(np.trace(k)), "x")
        l_ = _centred_gram(y, mean_y)
        _check_varies(y, float(np.trace(l_)), "y")
        cross = float(np.sum(k * l_))
        norm_x = np.linalg.norm(k)
        norm_y = np.linalg.norm(l_)
    # Rounding can push a perfect alignment a hair above 1.
    return float(min(1.0, max(0.0, cross / (norm_x * norm_y))))


def _check_images(model: keras.Model, images, what: str) -> np.ndarray:
    images = np.asarray(images)
    expected = tuple(model.input_shape[1:])
    got = tuple(images.shape[1:])
    if len(expected) != len(got) or any(
        e is not None and e != g for e, g in zip(expected, got, strict=True)
    ):
        raise ValueError(
            f"{what} {model.name!r} takes images of shape {expected} but the images "
            f"have shape {got}"
        )
    return images


def _feature_dims(model: keras.Model, layers) -> dict:
    return {
        layer: math.prod(
            int(d) for d in features.feature_tensor(model, layer).shape[1:]
        )
        for layer in layers
    }


def _passes(dims: dict, num_images: int, memory_gb: float):
    """Groups layers into forward passes whose float32 features fit ``memory_gb``.

    ``dims`` maps each layer to the summed feature dimension of both nets.
    """
    budget = memory_gb * 2**30
    passes, current, used = [], [], 0.0
    for layer, dim in dims.items():
        need = 4.0 * num_images * dim
        if need > budget:
            fits = int(budget // (4 * dim))
            raise ValueError(
                f"layer {layer!r}: the features of {num_images} images ({dim} values "
                f"per image for both nets) need {need / 2**20:.1f} MiB, above "
                f"memory_gb={memory_gb}; pass at most {fits} images or raise memory_gb"
            )
        if current and used + need > budget:
            passes.append(current)
            current, used = [], 0.0
        current.append(layer)
        used += need
    if current:
        passes.append(current)
    return passes


def _block_outputs(model: keras.Model, layers, images, batch_size: int) -> dict:
    """``{layer: float32 (N, D)}``: flattened block outputs, in inference mode."""
    extractor = keras.Model(
        model.input,
        {layer: features.feature_tensor(model, layer) for layer in layers},
        name=f"{model.name}_blocks",
    )
    n = len(images)
    out = {
        layer: np.empty((n, math.prod(int(d) for d in t.shape[1:])), np.float32)
        for layer, t in extractor.output.items()
    }
    for start in range(0, n, batch_size):
        batch = extractor.predict_on_batch(images[start : start + batch_size])
        for layer, value in batch.items():
            out[layer][start : start + len(value)] = np.asarray(value).reshape(
                len(value), -1
            )
    return out


def layer_cka(
    model_a: keras.Model,
    model_b: keras.Model,
    images,
    layers=models.LAYER_NAMES,
    batch_size: int = 256,
    memory_gb: float = 2.0,
) -> dict:
    """Linear CKA of two nets' representations of the same images, layer by layer.

    A layer's representation is the flattened output of its whole block (as in
    :func:`features.feature_tensor`: for ``conv1`` after batch normalisation, ReLU
    and pooling), computed in inference mode (batch normalisation with its moving
    statistics, no dropout). Convolutional maps are flattened, not pooled, and CKA
    is exact (no projection, no subset of the images).

    Args:
      model_a, model_b: base nets (or any models whose layers ``layers`` name)
        taking the same images; their architectures may differ.
      images: uint8 images ``(N, H, W, C)``, N >= 2.
      layers: layer names, ``conv1``..``fc8`` for a base net.
      batch_size: images per forward pass.
      memory_gb: memory for the float32 features held at once (N x D per layer
        and net; a layer wider than N adds two N x N float64 Gram matrices). The
        nets run once if every layer's features of both nets fit, else once per
        group of layers that fits.

    Returns:
      ``{layer: CKA}`` in the order of ``layers``.

    Raises:
      ValueError: an unknown layer (naming the valid ones), images that do not fit
        a net, one layer whose features alone exceed ``memory_gb`` (naming it and
        how many images fit), or a constant layer (naming it).
    """
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    if not layers:
        raise ValueError("layer_cka needs at least one layer")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(layers)} contain duplicates")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be positive")
    images = _check_images(model_a, images, "model_a")
    _check_images(model_b, images, "model_b")
    if len(images) < 2:
        raise ValueError(f"CKA needs at least 2 images, got {len(images)}")
    dims_a, dims_b = _feature_dims(model_a, layers), _feature_dims(model_b, layers)
    dims = {layer: dims_a[layer] + dims_b[layer] for layer in layers}
    out = {}
    for group in _passes(dims, len(images), memory_gb):
        feats_a = _block_outputs(model_a, group, images, batch_size)
        feats_b = _block_outputs(model_b, group, images, batch_size)
        for layer in group:
            try:
                out[layer] = linear_cka(feats_a.pop(layer), feats_b.pop(layer))
            except ValueError as e:
                raise ValueError(f"layer {layer!r}: {e}") from e
    return {layer: out[layer] for layer in layers}


# ------------------------------------------------------------- parameter distance


def _is_statistic(layer, variable) -> bool:
    """Batch normalisation's moving mean and variance: statistics, not parameters."""
    return isinstance(layer, keras_layers.BatchNormalization) and any(
        variable is s for s in (layer.moving_mean, layer.moving_variance)
    )


def _group_parameters(model: keras.Model, layer: str) -> dict:
    """``{keras layer name: [(variable name, array)]}`` of one layer group."""
    index = models.LAYER_NAMES.index(layer) + 1
    group = {}
    for keras_layer in model.layers:
        if models.layer_index(keras_layer.name) == index and keras_layer.weights:
            group[keras_layer.name] = [
                (v.name, np.asarray(keras.ops.convert_to_numpy(v)))
                for v in keras_layer.weights
                if not _is_statistic(keras_layer, v)
            ]
    if not group:
        raise ValueError(
            f"model {model.name!r} has no weights in layer {layer!r}; expected a base "
            f"net with layers {list(models.LAYER_NAMES)}"
        )
    return group


def _describe(weights) -> list:
    return [(name, tuple(array.shape)) for name, array in weights]


def _check_group(layer: str, group_a: dict, group_b: dict, names: tuple):
    if list(group_a) != list(group_b):
        raise ValueError(
            f"layer {layer!r} differs between the models: {names[0]!r} has Keras "
            f"layers {list(group_a)}, {names[1]!r} has {list(group_b)}"
        )
    for keras_name in group_a:
        shapes_a = _describe(group_a[keras_name])
        shapes_b = _describe(group_b[keras_name])
        if shapes_a != shapes_b:
            raise ValueError(
                f"layer {keras_name!r} differs between the models: {names[0]!r} has "
                f"weights {shapes_a}, {names[1]!r} has {shapes_b}"
            )


def check_same_architecture(model_a: keras.Model, model_b: keras.Model):
    """Fails unless both models have the same layers with weights of the same shapes.

    Layers are matched by name (layer names are the project's contract) and in
    order, so that weight lists of the two models line up entry by entry.

    Raises:
      ValueError: naming the first layer that is missing or whose weights differ.
    """
    names = (model_a.name, model_b.name)

    def layout(model):
        return [
            (layer.name, [(v.name, tuple(v.shape)) for v in layer.weights])
            for layer in model.layers
            if layer.weights
        ]

    layout_a, layout_b = layout(model_a), layout(model_b)
    for (name_a, shapes_a), (name_b, shapes_b) in zip(layout_a, layout_b, strict=False):
        if name_a != name_b:
            raise ValueError(
                f"models differ at layer {name_a!r}: {names[0]!r} has layer "
                f"{name_a!r} where {names[1]!r} has {name_b!r}"
            )
        if shapes_a != shapes_b:
            raise ValueError(
                f"layer {name_a!r} differs between the models: {names[0]!r} has "
                f"weights {shapes_a}, {names[1]!r} has {shapes_b}"
            )
    if len(layout_a) != len(layout_b):
        longer, model = (
            (layout_a, names[0])
            if len(layout_a) > len(layout_b)
            else (layout_b, names[1])
        )
        extra = [name for name, _ in longer[min(len(layout_a), len(layout_b)) :]]
        raise ValueError(f"layers {extra} exist only in model {model!r}")


def parameter_distance(
    model_a: keras.Model, model_b: keras.Model, layers=models.LAYER_NAMES
) -> dict:
    """L2 distance between two nets' weights, per layer group and in total.

    A layer group is a weight layer with its batch normalisation (``conv1`` and
    ``conv1_bn``, grouped by :func:`models.layer_index`): kernel, bias, and the
    batch normalisation's scale and offset. Moving means and variances are
    statistics of the data, not parameters, and are left out.

    Args:
      model_a, model_b: base nets. Only the groups in ``layers`` must agree, so a
        source net and a net fine-tuned on a task with another number of classes
        can be compared on ``conv1``..``fc7``.
      layers: layer names among ``conv1``..``fc8``.

    Returns:
      ``{layer: distance, ..., "total": distance}``, where ``total`` is the L2
      distance of all the listed groups' weights together
      (``sqrt(sum of squared per-layer distances)``).

    Raises:
      ValueError: an unknown layer (naming the valid ones), or a group whose Keras
        layers or weight shapes differ between the models (naming the layer).
    """
    if isinstance(layers, str):
        layers = (layers,)
    unknown = [layer for layer in layers if layer not in models.LAYER_NAMES]
    if unknown:
        raise ValueError(
            f"unknown layers {unknown}; choose from {list(models.LAYER_NAMES)}"
        )
    if not layers:
        raise ValueError("parameter_distance needs at least one layer")
    names = (model_a.name, model_b.name)
    out, total = {}, 0.0
    for layer in layers:
        group_a = _group_parameters(model_a, layer)
        group_b = _group_parameters(model_b, layer)
        _check_group(layer, group_a, group_b, names)
        squared = 0.0
        for keras_name, weights in group_a.items():
            for (_, a), (_, b) in zip(weights, group_b[keras_name], strict=True):
                diff = a.astype(np.float64) - b.astype(np.float64)
                squared += float(np.sum(diff * diff))
        out[layer] = math.sqrt(squared)
        total += squared
    out["total"] = math.sqrt(total)
    return out


# ------------------------------------------------------------------------ mistakes


def _labels_of(predictions, name: str) -> np.ndarray:
    predictions = np.asarray(predictions)
    if predictions.ndim == 2:
        return predictions.argmax(axis=1)
    if predictions.ndim != 1 or not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(
            f"{name} has shape {predictions.shape} and dtype {predictions.dtype}; "
            "expected class indices (N,) or logits/probabilities (N, classes)"
        )
    return predictions


def mistake_agreement(pred_a, pred_b, labels) -> dict:
    """How far two nets make the same mistakes on the same examples.

    Args:
      pred_a, pred_b: each net's predicted classes ``(N,)``, or its logits or
        probabilities ``(N, classes)`` (the arg-max is the prediction).
      labels: true classes ``(N,)``.

    Returns:
      A dict:

      - ``mistake_agreement``: examples both nets get wrong / examples at least
        one gets wrong (the Jaccard index of their mistake sets), whether or not
        they predict the same wrong class. NaN when neither net makes a mistake:
        there are no mistakes to agree on, and NaN keeps a perfect pair from
        counting as agreeing (or disagreeing) when averaged with others.
      - ``prediction_agreement``: fraction of examples where the predictions
        are equal.
      - ``error_a``, ``error_b``: each net's error (1 - top-1 accuracy).
      - ``both_wrong``, ``only_one_wrong``: counts of examples (the paper's
        common and uncommon mistakes); ``examples``: N.

    Raises:
      ValueError: inputs of different lengths, no examples, or predictions that
        are neither class indices nor scores.
    """
    a, b = _labels_of(pred_a, "pred_a"), _labels_of(pred_b, "pred_b")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels has shape {labels.shape}; expected (N,)")
    if not len(a) == len(b) == len(labels):
        raise ValueError(
            f"pred_a ({len(a)}), pred_b ({len(b)}) and labels ({len(labels)}) must "
            "cover the same examples"
        )
    if len(labels) == 0:
        raise ValueError("mistake_agreement needs at least one example")
    wrong_a, wrong_b = a != labels, b != labels
    both = int(np.sum(wrong_a & wrong_b))
    either = int(np.sum(wrong_a | wrong_b))
    return {
        "mistake_agreement": both / either if either else math.nan,
        "prediction_agreement": float(np.mean(a == b)),
        "error_a": float(np.mean(wrong_a)),
        "error_b": float(np.mean(wrong_b)),
        "both_wrong": both,
        "only_one_wrong": either - both,
        "examples": len(labels),
    }
