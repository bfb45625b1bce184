"""adaptation: gradient reversal, CORAL/MMD, DANN schedule, paired data, one
training per method, importance weights, DEV/IWV."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_tf import adaptation, data, models, training


def test_gradient_reversal_is_identity_forward_and_flips_gradient():
    layer = adaptation.GradientReversal(0.3)
    x = tf.constant([1.0, 2.0, 3.0])
    w = tf.constant([0.5, -1.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(w * y)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    # d loss / dx = -0.3 * w
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [-0.15, 0.3, -0.6])

    layer.factor.assign(2.0)  # settable during training, no new layer
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(w * layer(x))
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), [-1.0, 2.0, -4.0])
    assert not layer.trainable_weights and len(layer.non_trainable_weights) == 1


def test_dann_trains_its_domain_classifier_unscaled_and_scales_only_the_reversal():
    # Ganin & Lempitsky (2015): the domain classifier learns from its full loss;
    # the features get -factor x weight times the domain loss's plain gradient.
    x_source, x_target = _images(8, 0), _images(8, 1)
    y = np.arange(8) % 10
    grads = {}
    for weight in (0.3, 1.0):
        net = models.build_base_net((28, 28, 1), 10, width=0.05, seed=0)
        model = adaptation.AdaptationModel(
            net, adaptation.AdaptationConfig("dann", weight=weight)
        )
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        assert float(model.reversal.factor.numpy()) == pytest.approx(weight)
        fc7 = net.get_layer("fc7").kernel
        classifier = model.domain_classifier.trainable_variables
        with tf.GradientTape(persistent=True) as tape:
            total, classification, domain_loss, _, _ = model.losses_of(
                x_source, x_target, y, training=False
            )
        grads[weight] = {
            "total": tape.gradient(total, [fc7, *classifier]),
            "task": tape.gradient(classification, fc7),
            "domain": tape.gradient(domain_loss, [fc7, *classifier]),
            "loss": float(total - classification - domain_loss),
        }
        del tape
    for g in grads.values():
        assert g["loss"] == pytest.approx(0.0, abs=1e-6)  # the domain loss unscaled
        # the classifier's gradient is its loss's own, whatever the weight ...
        for got, plain in zip(g["total"][1:], g["domain"][1:], strict=True):
            np.testing.assert_allclose(got.numpy(), plain.numpy(), rtol=1e-5)
        # ... the features' is the task's plus the reversed domain gradient; the
        # domain loss's gradient into fc7 through the reversal is -weight x plain
        np.testing.assert_allclose(
            g["total"][0].numpy(),
            (g["task"] + g["domain"][0]).numpy(),
            rtol=1e-4,
            atol=1e-7,
        )
    plain = grads[1.0]["domain"][0].numpy()  # -1 x the plain gradient
    np.testing.assert_allclose(
        grads[0.3]["domain"][0].numpy(), 0.3 * plain, rtol=1e-4, atol=1e-8
    )
    assert np.abs(plain).max() > 0
    np.testing.assert_allclose(  # the classifier sees the same loss at both weights
        grads[0.3]["domain"][1].numpy(), grads[1.0]["domain"][1].numpy(), rtol=1e-5
    )


def test_dann_lambda_schedule():
    assert adaptation.dann_lambda(0.0) == 0.0
    assert adaptation.dann_lambda(1.0) > 0.9999
    values = adaptation.dann_lambda(np.linspace(0, 1, 11))
    assert np.all(np.diff(values) > 0) and np.all(values < 1)
    # Ganin et al.: 2 / (1 + exp(-10 p)) - 1
    assert adaptation.dann_lambda(0.1) == pytest.approx(2 / (1 + np.exp(-1)) - 1)


def _gaussian(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_coral_is_zero_for_identical_batches_and_grows_with_covariance_shift():
    source = _gaussian(64, 8, 0)
    assert float(adaptation.coral_loss(source, source)) == 0.0
    target = _gaussian(64, 8, 1)
    losses = [float(adaptation.coral_loss(source, target * s)) for s in (1, 1.5, 2, 3)]
    assert np.all(np.diff(losses) > 0)
    # Hand-computed on a 1-d case: variances 1 and 4 -> (4 - 1)^2 / 4.
    a = np.array([[-1.0], [1.0], [0.0]])  # variance 1 (n - 1 normalisation)
    assert float(adaptation.coral_loss(a, 2 * a)) == pytest.approx(9 / 4)
    # Second moments only: a mean shift costs nothing.
    assert float(adaptation.coral_loss(source, source + 5)) == pytest.approx(
        0, abs=1e-4
    )


@pytest.mark.parametrize("bandwidths", [None, (1.0, 4.0)])
def test_mmd_is_zero_for_identical_batches_and_grows_with_mean_shift(bandwidths):
    source, target = _gaussian(64, 8, 0), _gaussian(64, 8, 1)
    assert float(adaptation.mmd_loss(source, source, bandwidths)) == pytest.approx(
        0, abs=1e-6
    )
    losses = [
        float(adaptation.mmd_loss(source, target + shift, bandwidths))
        for shift in (0.0, 0.5, 1.0, 2.0)
    ]
    assert np.all(np.diff(losses) > 0)
    assert losses[0] < 0.05 < losses[-1]
    spread = [
        float(adaptation.mmd_loss(source, target * s, bandwidths)) for s in (1, 2, 3)
    ]
    assert np.all(np.diff(spread) > 0)


def test_mmd_unbiased_estimate_drops_the_diagonal():
    source = _gaussian(32, 4, 0)
    biased = float(adaptation.mmd_loss(source, source, (1.0,)))
    unbiased = float(adaptation.mmd_loss(source, source, (1.0,), unbiased=True))
    assert biased == pytest.approx(0, abs=1e-6)
    assert unbiased < 0  # the U-statistic is zero only in expectation
    shifted = source + 3
    assert float(adaptation.mmd_loss(source, shifted, (1.0,), unbiased=True)) > 0.1


def test_config_validates():
    with pytest.raises(ValueError, match="method='bogus'"):
        adaptation.AdaptationConfig("bogus")
    with pytest.raises(ValueError, match="weight"):
        adaptation.AdaptationConfig("coral", weight=-1)


def _images(n, seed, channels=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28, channels), dtype=np.uint8)


def test_paired_dataset_is_seeded_and_has_the_source_cardinality():
    x, y = _images(20, 0), np.arange(20) % 10
    target = np.arange(7, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 28, 28, 1), np.uint8
    )

    def target_ids(ds):
        return [xt[:, 0, 0, 0].tolist() for (xs, xt), ys in ds.as_numpy_iterator()]

    source = data.pipeline(x, y, 8, training=False)
    paired = adaptation.paired_dataset(source, target, 8, seed=3)
    assert int(paired.cardinality()) == 3
    first = target_ids(paired)
    assert [len(b) for b in first] == [8, 8, 4]  # as many as the source batch
    assert first == target_ids(adaptation.paired_dataset(source, target, 8, seed=3))
    assert first != target_ids(adaptation.paired_dataset(source, target, 8, seed=4))
    assert target_ids(paired) != first  # the next epoch reshuffles
    labels = [len(ys) for _, ys in paired.as_numpy_iterator()]
    assert labels == [8, 8, 4]  # Keras's targets: the source labels
    # A repeated stream: every target image comes round again within 2 passes.
    assert set(sum(first, [])) == set(range(7))
    for (xs, _), _ in paired.take(1):
        np.testing.assert_array_equal(xs.numpy(), x[:8])


def test_paired_dataset_errors():
    source = data.pipeline(_images(8, 0), np.zeros(8, int), 4, training=False)
    with pytest.raises(ValueError, match="replicate grey images"):
        adaptation.paired_dataset(source, _images(4, 1, channels=3), 4)
    with pytest.raises(ValueError, match="no images"):
        adaptation.paired_dataset(source, _images(0, 1), 4)
    with pytest.raises(ValueError, match="cardinality"):
        adaptation.paired_dataset(source.repeat(), _images(4, 1), 4)


TRAIN = training.TrainConfig(
    epochs=1,
    verbose=0,
    tensorboard=False,
    backup=False,
    precision="float32",
    xla="off",
)


def _train(method, workdir, target, weight=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x, y = _images(48, seed), rng.integers(0, 10, 48)
    base = models.build_base_net((28, 28, 1), 10, seed=0, width=0.05)
    model = adaptation.AdaptationModel(
        base, adaptation.AdaptationConfig(method, weight=weight, domain_units=(16,))
    )
    keras.utils.set_random_seed(0)
    outcome = training.train(
        model,
        adaptation.paired_dataset(data.pipeline(x, y, 16, True, seed=0), target, 16),
        data.pipeline(x[:16], y[:16], 16, False),
        TRAIN,
        workdir,
        callbacks=model.adaptation_callbacks(),
    )
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return model, outcome, [json.loads(line) for line in lines]


# DANN (the gradient reversal, the most machinery) in the inner loop, every
# method in the full suite.
@pytest.mark.parametrize(
    "method",
    [
        m if m == "dann" else pytest.param(m, marks=pytest.mark.slow)
        for m in adaptation.METHODS
    ],
)
def test_one_training_per_method_logs_its_losses(method, tmp_path):
    model, outcome, records = _train(method, tmp_path, _images(40, 7))
    assert outcome.epochs_run == 1 and outcome.examples_seen == 48
    (record,) = records
    for key in ("train/loss", "train/classification_loss", "train/adaptation_loss"):
        assert np.isfinite(record[key])
    assert np.isfinite(record["val/loss"]) and "val/accuracy" in record
    assert not any(k.startswith("val/") and "adaptation" in k for k in record)
    total = record["train/classification_loss"] + record["train/adaptation_loss"]
    assert record["train/loss"] == pytest.approx(total, rel=1e-5)
    if method == "source_only":
        assert record["train/adaptation_loss"] == 0
    else:
        assert record["train/adaptation_loss"] > 0
    if method == "dann":
        assert 0 <= record["train/domain_accuracy"] <= 1
        # 3 steps: the last starts at p = 2/3 of the schedule.
        assert record["train/dann_lambda"] == pytest.approx(
            adaptation.dann_lambda(2 / 3), rel=1e-5
        )
    else:
        assert "train/domain_accuracy" not in record
    # Called on images it is the classifier.
    logits = model.predict(_images(3, 9), verbose=0)
    np.testing.assert_allclose(logits, model.base_net.predict(_images(3, 9), verbose=0))
    assert model.predict_features(_images(3, 9)).shape == (3, model.feature_size)


@pytest.mark.slow
def test_target_images_matter_only_when_adapting(tmp_path):
    def fc7_after(method, target_seed):
        model, _, _ = _train(
            method, tmp_path / f"{method}{target_seed}", _images(40, target_seed), 10
        )
        return model.base_net.get_layer("fc7").get_weights()[0]

    np.testing.assert_array_equal(
        fc7_after("source_only", 1), fc7_after("source_only", 2)
    )
    assert not np.allclose(fc7_after("coral", 1), fc7_after("coral", 2))


def test_importance_weights_near_one_for_one_distribution():
    source, target = _gaussian(400, 5, 0), _gaussian(300, 5, 1)
    weights = adaptation.importance_weights(source, target)
    assert weights.shape == (400,)
    assert np.mean(weights) == pytest.approx(1, abs=0.15)
    assert np.quantile(weights, 0.05) > 0.5 and np.quantile(weights, 0.95) < 2


def test_importance_weights_favour_source_points_that_look_like_the_target():
    from scipy.stats import spearmanr

    source, target = _gaussian(400, 5, 0), _gaussian(300, 5, 1)
    target[:, 0] += 1.5
    weights = adaptation.importance_weights(source, target, max_weight=5.0)
    assert spearmanr(weights, source[:, 0]).statistic > 0.9
    assert weights.max() <= 5.0
    like_target = source[:, 0] > 1
    assert weights[like_target].mean() > 3 * weights[source[:, 0] < -1].mean()
    query = _gaussian(50, 5, 2)
    held_out = adaptation.importance_weights(source, target, query_features=query)
    assert held_out.shape == (50,) and spearmanr(held_out, query[:, 0]).statistic > 0.9


def test_dev_and_iwv_risks():
    losses = np.array([0.5, 1.0, 2.0, 0.1])
    assert adaptation.dev_risk(np.ones(4), losses) == pytest.approx(losses.mean())
    assert adaptation.iwv_risk(np.ones(4), losses) == pytest.approx(losses.mean())
    weights = np.array([0.5, 2.0, 1.5, 0.2])
    weighted = weights * losses
    assert adaptation.iwv_risk(weights, losses) == pytest.approx(weighted.mean())
    eta = -np.cov(weighted, weights)[0, 1] / np.var(weights, ddof=1)
    expected = weighted.mean() + eta * weights.mean() - eta
    assert adaptation.dev_risk(weights, losses) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one weight per loss"):
        adaptation.dev_risk(np.ones(3), losses)


def test_dev_control_variate_reduces_variance():
    # Known target risk, noisy weights with mean 1: DEV's spread across draws
    # is smaller than IWV's.
    rng = np.random.default_rng(0)
    dev, iwv = [], []
    for _ in range(200):
        weights = rng.exponential(1.0, 100)
        losses = 1.0 + 0.1 * rng.normal(size=100)
        dev.append(adaptation.dev_risk(weights, losses))
        iwv.append(adaptation.iwv_risk(weights, losses))
    assert np.std(dev) < 0.5 * np.std(iwv)
    assert np.mean(dev) == pytest.approx(1.0, abs=0.05)


def test_example_losses_match_keras_cross_entropy():
    model = models.build_base_net((28, 28, 1), 10, seed=0, width=0.05)
    x, y = _images(5, 0), np.arange(5)
    losses = adaptation.example_losses(model, x, y)
    logits = model.predict(x, verbose=0)
    expected = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    np.testing.assert_allclose(losses, np.asarray(expected), rtol=1e-5)
