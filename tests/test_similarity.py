"""Feature similarity (CKA), parameter distance and common mistakes of two nets."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from conftest import TINY
from transfer_tf import features, models, similarity

METHODS = ("features", "gram")


@pytest.fixture(scope="module")
def nets():
    """Two tiny base nets with batch normalisation, from different seeds."""
    return tuple(
        models.build_base_net((28, 28, 1), 5, seed=seed, batch_norm=True, **TINY)
        for seed in (0, 1)
    )


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (24, 28, 28, 1), dtype=np.uint8)


# --------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("method", METHODS)
def test_cka_is_one_for_the_same_rotated_or_scaled_features(method):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert similarity.linear_cka(x, x, method) == pytest.approx(1.0, abs=1e-12)
    assert similarity.linear_cka(x, x @ q, method) == pytest.approx(1.0, abs=1e-12)
    assert similarity.linear_cka(x, 3.0 * x, method) == pytest.approx(1.0, abs=1e-12)
    # Centring: a shift of every example by the same vector changes nothing.
    shifted = x.astype(np.float32) + 1000.0
    assert similarity.linear_cka(x, shifted, method) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_cka_of_a_hand_computed_three_by_two_case(method):
    # Centred: X -> rows (2,-1)/3, (-1,2)/3, (-1,-1)/3; Y the same with rows 2
    # and 3 swapped. X^T X = Y^T Y = [[2,-1],[-1,2]]/3 (squared norm 10/9) and
    # Y^T X = [[2,-1],[-1,-1]]/3 (squared norm 7/9): CKA = (7/9) / (10/9) = 0.7.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    y = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert similarity.linear_cka(x, y, method) == pytest.approx(0.7, abs=1e-12)


def test_cka_of_independent_features_is_small():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(500, 10)), rng.normal(size=(500, 10))
    assert similarity.linear_cka(x, y) < 0.1
    # Agrees with a correlated pair being clearly higher.
    assert similarity.linear_cka(x, x + 0.5 * y) > 0.7


def test_cka_forms_agree_and_higher_rank_arrays_are_flattened():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(12, 4, 4, 3)).astype(np.float32)  # D = 48 > N
    y = np.maximum(rng.normal(size=(12, 20)), 0)
    gram = similarity.linear_cka(x, y, "gram")
    assert similarity.linear_cka(x, y, "features") == pytest.approx(gram, abs=1e-12)
    assert similarity.linear_cka(x.reshape(12, -1), y) == pytest.approx(gram, abs=1e-12)


def test_cka_gram_blocks_cover_every_column(monkeypatch):
    """The Gram form's column blocks add up to the unblocked value."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 37)), rng.normal(size=(10, 23))
    whole = similarity.linear_cka(x, y, "gram")
    monkeypatch.setattr(similarity, "_BLOCK_BYTES", 8 * 10 * 4)  # 4 columns a block
    assert similarity.linear_cka(x, y, "gram") == pytest.approx(whole, abs=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_cka_refuses_constant_features(method):
    x = np.random.default_rng(0).normal(size=(6, 3))
    with pytest.raises(ValueError, match="constant"):
        similarity.linear_cka(x, np.full((6, 4), 0.3, np.float32), method)
    with pytest.raises(ValueError, match="constant"):
        similarity.linear_cka(np.zeros((6, 2)), x, method)


def test_cka_refuses_bad_inputs():
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="5 rows, y has 4"):
        similarity.linear_cka(x, np.ones((4, 3)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        similarity.linear_cka(x[:1], x[:1])
    with pytest.raises(ValueError, match="NaN"):
        similarity.linear_cka(np.full((5, 3), np.nan), x)
    with pytest.raises(ValueError, match="method"):
        similarity.linear_cka(x, x, "rbf")


# --------------------------------------------------------------------- layer CKA


def test_layer_cka_is_exact_cka_of_the_flattened_block_outputs(nets, images):
    a, b = nets
    out = similarity.layer_cka(a, b, images)
    assert list(out) == list(models.LAYER_NAMES)
    # The flattened block outputs (a vector layer ignores the pooling).
    requests = [(layer, "flatten") for layer in models.LAYER_NAMES]
    flat_a, flat_b = (
        {
            key.split("/")[0]: v
            for key, v in features.extract_features(net, images, requests).items()
        }
        for net in (a, b)
    )
    assert list(flat_a) == list(flat_b) == list(models.LAYER_NAMES)
    for layer in models.LAYER_NAMES:
        expected = similarity.linear_cka(flat_a[layer], flat_b[layer])
        assert out[layer] == pytest.approx(expected, abs=1e-9), layer
        assert 0.0 < out[layer] < 1.0
    # Smaller batches change only float32 rounding inside the nets.
    batched = similarity.layer_cka(a, b, images, batch_size=10)
    assert batched == pytest.approx(out, abs=1e-6)
    same = similarity.layer_cka(a, a, images, ("conv1", "fc7"))
    assert same == pytest.approx({"conv1": 1.0, "fc7": 1.0}, abs=1e-9)


def test_layer_cka_in_several_passes_equals_one_pass(nets, images):
    a, b = nets
    layers = ("conv1", "conv5", "fc8")
    one = similarity.layer_cka(a, b, images, layers)
    # conv1: 14x14x5 = 980 values per image and net; 24 images need ~184 KiB.
    budget = 24 * 2 * 980 * 4 / 2**30
    several = similarity.layer_cka(a, b, images, layers, memory_gb=budget)
    assert several == pytest.approx(one, abs=1e-12)
    with pytest.raises(ValueError, match=r"layer 'conv1'.*at most 12 images"):
        similarity.layer_cka(a, b, images, layers, memory_gb=budget / 2)


def test_layer_cka_names_unknown_layers_and_bad_images(nets, images):
    a, b = nets
    with pytest.raises(ValueError, match="unknown layer 'conv9'"):
        similarity.layer_cka(a, b, images, ("conv1", "conv9"))
    with pytest.raises(ValueError, match=r"shape \(32, 32, 1\)"):
        similarity.layer_cka(a, b, np.zeros((4, 32, 32, 1), np.uint8))


# -------------------------------------------------------------- parameter distance


def test_parameter_distance_per_group_excludes_moving_statistics(nets):
    a, b = nets
    zero = similarity.parameter_distance(a, a)
    assert set(zero) == {*models.LAYER_NAMES, "total"}
    assert all(v == 0.0 for v in zero.values())

    out = similarity.parameter_distance(a, b)
    for layer in models.LAYER_NAMES:
        squared = 0.0
        for name in (layer, f"{layer}_bn"):
            if name not in [lay.name for lay in a.layers]:
                continue  # fc8 has no batch normalisation
            wa, wb = a.get_layer(name).get_weights(), b.get_layer(name).get_weights()
            keep = 2 if name.endswith("_bn") else len(wa)  # gamma, beta only
            for x, y in zip(wa[:keep], wb[:keep], strict=True):
                squared += np.sum((x.astype(np.float64) - y) ** 2)
        assert out[layer] == pytest.approx(math.sqrt(squared), rel=1e-6), layer
    assert out["total"] == pytest.approx(
        math.sqrt(sum(out[n] ** 2 for n in models.LAYER_NAMES)), rel=1e-12
    )

    # Moving statistics are data statistics, not parameters.
    c = keras.models.clone_model(a)
    c.set_weights(a.get_weights())
    c.get_layer("conv2_bn").moving_mean.assign(np.full((13,), 5.0, np.float32))
    assert similarity.parameter_distance(a, c)["total"] == 0.0


def test_parameter_distance_names_the_layer_that_differs(nets):
    a, _ = nets
    ten_classes = models.build_base_net(
        (28, 28, 1), 10, seed=0, batch_norm=True, **TINY
    )
    below = similarity.parameter_distance(a, ten_classes, models.LAYER_NAMES[:7])
    assert below["total"] == 0.0  # same seed: identical below fc8
    with pytest.raises(
        ValueError, match=r"layer 'fc8' differs.*\(205, 5\).*\(205, 10\)"
    ):
        similarity.parameter_distance(a, ten_classes)
    no_bn = models.build_base_net((28, 28, 1), 5, seed=0, **TINY)
    with pytest.raises(ValueError, match=r"layer 'conv1' differs.*conv1_bn"):
        similarity.parameter_distance(a, no_bn, ("conv1",))
    with pytest.raises(ValueError, match="unknown layers.*conv0"):
        similarity.parameter_distance(a, a, ("conv0",))


def test_check_same_architecture_names_the_layer(nets):
    a, b = nets
    similarity.check_same_architecture(a, b)
    wider = models.build_base_net((28, 28, 1), 5, seed=0, batch_norm=True, width=0.1)
    with pytest.raises(ValueError, match="layer 'conv1' differs"):
        similarity.check_same_architecture(a, wider)


# ------------------------------------------------------------------------ mistakes


def test_mistake_agreement_counts_common_and_uncommon_mistakes():
    labels = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    pred_a = np.array([0, 1, 2, 0, 0, 1, 1, 2])  # wrong on 3, 4, 5
    pred_b = np.array([0, 1, 0, 0, 1, 0, 1, 2])  # wrong on 2, 3, 4
    out = similarity.mistake_agreement(pred_a, pred_b, labels)
    assert out["both_wrong"] == 2 and out["only_one_wrong"] == 2
    assert out["mistake_agreement"] == pytest.approx(2 / 4)
    assert out["prediction_agreement"] == pytest.approx(5 / 8)  # 4 differs too
    assert out["error_a"] == out["error_b"] == pytest.approx(3 / 8)
    # Logits are turned into predictions by their arg-max.
    logits = np.eye(5)[pred_a] * 2.0 - 1.0
    assert similarity.mistake_agreement(logits, pred_b, labels) == out


def test_mistake_agreement_without_mistakes_is_nan():
    labels = np.array([0, 1, 2])
    out = similarity.mistake_agreement(labels, labels, labels)
    assert math.isnan(out["mistake_agreement"])
    assert out["prediction_agreement"] == 1.0 and out["error_a"] == 0.0
    with pytest.raises(ValueError, match="same examples"):
        similarity.mistake_agreement(labels, labels[:2], labels)
