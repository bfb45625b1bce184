"""Interpolation between nets, batch-norm recomputation and module criticality."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import TINY
from transfer_tf import data, landscape, models, training

SHAPE = (28, 28, 1)


def tiny(seed, batch_norm=False):
    return models.build_base_net(SHAPE, 5, seed=seed, batch_norm=batch_norm, **TINY)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, *SHAPE), dtype=np.uint8), rng.integers(0, 5, 48)


def assert_same_weights(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


# -------------------------------------------------------------------- interpolation


def test_interpolate_hits_the_end_points_exactly_and_mixes_between():
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4)]
    b = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4)]
    assert_same_weights(landscape.interpolate(a, b, 0.0), a)
    assert_same_weights(landscape.interpolate(a, b, 1), b)
    middle = landscape.interpolate(a, b, 0.25)
    np.testing.assert_allclose(middle[0], 0.75 * a[0] + 0.25 * b[0], rtol=1e-6)
    assert middle[0].dtype == np.float32
    with pytest.raises(ValueError, match=r"weight 1 has shape \(4,\).*\(5,\)"):
        landscape.interpolate(a, [b[0], np.zeros(5)], 0.5)
    with pytest.raises(ValueError, match="2 arrays but weights_b has 1"):
        landscape.interpolate(a, b[:1], 0.5)


def test_barrier_of_a_straight_line_is_zero_and_of_a_bump_its_height():
    ts = np.linspace(0.0, 1.0, 11)
    line = 2.0 + 3.0 * ts
    assert landscape.barrier_height(ts, line) == pytest.approx(0.0, abs=1e-12)
    bump = line + 0.7 * np.sin(np.pi * ts)
    assert landscape.barrier_height(ts, bump) == pytest.approx(0.7)
    # A dip below the chord is no barrier; order of the points does not matter.
    assert landscape.barrier_height(ts[::-1], (line - bump + line)[::-1]) == 0.0
    with pytest.raises(ValueError, match=r"missing \[1.0\]"):
        landscape.barrier_height(ts[:-1], line[:-1])


def test_interpolation_curve_ends_are_the_nets_own_evaluation(arrays):
    x, y = arrays
    a, b = tiny(0), tiny(1)
    weights_a, weights_b = a.get_weights(), b.get_weights()
    curve = landscape.interpolation_curve(
        a, b, {"train": (x, y), "test": (x[:20], y[:20])}, ts=[0.0, 0.5, 1.0]
    )
    assert curve["t"] == [0.0, 0.5, 1.0]
    for name, (xs, ys) in {"train": (x, y), "test": (x[:20], y[:20])}.items():
        own = [training.evaluate(m, data.pipeline(xs, ys, 256, False)) for m in (a, b)]
        assert curve[f"{name}/loss"][0] == own[0]["loss"]
        assert curve[f"{name}/loss"][2] == own[1]["loss"]
        assert curve[f"{name}/accuracy"][2] == own[1]["accuracy"]
        assert curve[f"{name}/barrier"] == landscape.barrier_height(
            curve["t"], curve[f"{name}/loss"]
        )
    # The inputs are evaluated through a clone and keep their weights.
    assert_same_weights(a.get_weights(), weights_a)
    assert_same_weights(b.get_weights(), weights_b)
    with pytest.raises(ValueError, match="layer 'conv1' differs"):
        landscape.interpolation_curve(a, tiny(0, batch_norm=True), {"train": (x, y)})


def test_interpolation_curve_recomputes_batch_norm_at_every_t(arrays):
    x, y = arrays
    a, b = tiny(0, batch_norm=True), tiny(1, batch_norm=True)
    ds = {"train": (x, y)}
    curve = landscape.interpolation_curve(a, b, ds, ts=[0.0, 1.0], bn_images=x)
    for i, model in enumerate((a, b)):
        reference = keras.models.clone_model(model)
        reference.set_weights(model.get_weights())
        landscape.recompute_batch_norm(reference, x)
        own = training.evaluate(reference, data.pipeline(x, y, 256, False))
        assert curve["train/loss"][i] == pytest.approx(own["loss"], rel=1e-6)
    # recompute_ends=False: the ends are exactly the nets with their own statistics.
    kept = landscape.interpolation_curve(
        a, b, ds, ts=[0.0, 1.0], bn_images=x, recompute_ends=False
    )
    own = training.evaluate(a, data.pipeline(x, y, 256, False))
    assert kept["train/loss"][0] == own["loss"]


# -------------------------------------------------------------- batch normalisation


def test_recompute_batch_norm_gives_the_statistics_of_the_data(arrays):
    x, _ = arrays
    model = tiny(0, batch_norm=True)
    # Moving statistics far from the data's, as after training on something else.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0, "float32"))
    before = {v.path: v.numpy() for v in model.weights}
    landscape.recompute_batch_norm(model, x, batch_size=10)

    for name in ("conv1", "conv3", "fc7"):
        bn = model.get_layer(f"{name}_bn")
        # The input of each BN layer in inference mode, earlier BNs already updated.
        inputs = keras.Model(model.input, model.get_layer(name).output)
        h = np.asarray(inputs.predict_on_batch(x), np.float64)
        h = h.reshape(-1, h.shape[-1])
        np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean(0), atol=1e-6)
        np.testing.assert_allclose(bn.moving_variance.numpy(), h.var(0), rtol=1e-5)
    # Nothing else changed.
    for v in model.weights:
        if "moving_" not in v.path:
            np.testing.assert_array_equal(v.numpy(), before[v.path])


def test_recompute_batch_norm_is_a_no_op_without_batch_norm(arrays):
    model = tiny(0)
    before = model.get_weights()
    assert landscape.recompute_batch_norm(model, arrays[0]) is model
    assert_same_weights(model.get_weights(), before)
    assert not landscape.has_batch_norm(model)


# --------------------------------------------------------------- module criticality


def test_rewinding_every_layer_gives_the_initial_net_and_none_the_trained(arrays):
    initial, trained = tiny(0, batch_norm=True), tiny(1, batch_norm=True)
    start = landscape.weights_by_layer(initial)
    rewound = landscape.rewind(trained, start, models.LAYER_NAMES, 0.0)
    assert_same_weights(rewound, initial.get_weights())  # moving statistics too
    assert_same_weights(
        landscape.rewind(trained, initial, models.LAYER_NAMES, 1.0),
        trained.get_weights(),
    )
    assert_same_weights(
        landscape.rewind(trained, start, (), 0.0), trained.get_weights()
    )

    half = landscape.rewind(trained, start, "conv2", 0.5)
    for variable, value, w0, w1 in zip(
        trained.weights, half, initial.get_weights(), trained.get_weights(), strict=True
    ):
        if models.layer_index(variable.path.split("/")[0]) == 2:  # conv2, conv2_bn
            np.testing.assert_allclose(value, 0.5 * w0 + 0.5 * w1, rtol=1e-6)
        else:
            np.testing.assert_array_equal(value, w1)


def test_rewind_names_what_does_not_match():
    trained = tiny(1)
    with pytest.raises(ValueError, match="unknown layers.*conv6"):
        landscape.rewind(trained, trained, "conv6", 0.5)
    with pytest.raises(ValueError, match="no entry for layer 'conv1'"):
        landscape.rewind(trained, {}, "conv1", 0.5)
    with pytest.raises(ValueError, match="layer 'fc8': initial weights"):
        landscape.rewind(trained, models.build_base_net(SHAPE, 7, **TINY), "fc8", 0.5)


def test_critical_alpha_is_where_the_error_stays_within_tolerance():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    errors = [0.9, 0.05, 0.3, 0.11, 0.1]
    # 0.25 is within tolerance but 0.5 is not: the error must *stay* within it.
    assert landscape.critical_alpha(alphas, errors, 0.1, 0.02) == 0.75
    assert landscape.critical_alpha(alphas, errors, 0.1, 1.0) == 0.0
    assert landscape.critical_alpha(alphas[:-1], errors[:-1], 0.0, 0.0) is None


def test_module_criticality_measures_each_layer_on_a_clone(arrays):
    x, y = arrays
    initial, trained = tiny(0), tiny(1)
    before = trained.get_weights()
    out = landscape.module_criticality(
        trained, initial, (x, y), ("conv1", "fc8"), alphas=[0.0, 1.0], tolerance=1.0
    )
    own = training.evaluate(trained, data.pipeline(x, y, 256, False))
    assert out["trained"]["error"] == pytest.approx(1.0 - own["accuracy"])
    assert out["alphas"] == [0.0, 1.0] and list(out["layers"]) == ["conv1", "fc8"]
    for layer in ("conv1", "fc8"):
        assert out["layers"][layer]["loss"][1] == own["loss"]  # alpha 1: trained
        assert out["layers"][layer]["critical_alpha"] == 0.0  # any error is fine
    assert_same_weights(trained.get_weights(), before)
    with pytest.raises(ValueError, match="alphas"):
        landscape.module_criticality(trained, initial, (x, y), alphas=[1.5])
