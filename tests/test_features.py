"""Off-the-shelf features: extraction, backbones, linear heads, export, the study."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from transfer_tf import data, export, features, models, results

# A tiny base net's block outputs on 28x28 digits (width 0.05: 5, 13, 19, 19, 13
# filters; 205-unit fc6/fc7): conv1, conv2 and conv5 are max-pooled (stride 2).
BLOCK_SHAPES = {
    "conv1": (14, 14, 5),
    "conv2": (7, 7, 13),
    "conv3": (7, 7, 19),
    "conv4": (7, 7, 19),
    "conv5": (4, 4, 13),
}


@pytest.fixture(scope="module")
def tiny_net():
    return models.build_base_net((28, 28, 1), 5, seed=0, batch_norm=True, **TINY)


@pytest.fixture(scope="module")
def images(digits_source):
    return digits_source.x_test[:12]


# ------------------------------------------------------------------------ extraction


def test_feature_shapes_per_layer_and_pooling(tiny_net, images):
    requests = [
        (layer, p) for layer in features.PROBE_LAYERS for p in features.POOLINGS
    ]
    out = features.extract_features(tiny_net, images, requests)
    for layer, (h, w, c) in BLOCK_SHAPES.items():
        flat = out[f"{layer}/flatten"]
        assert flat.shape == (12, h * w * c) and flat.dtype == np.float32
        grid = flat.reshape(12, h * w, c)
        np.testing.assert_allclose(out[f"{layer}/avg"], grid.mean(1), rtol=1e-5)
        np.testing.assert_allclose(out[f"{layer}/max"], grid.max(1), rtol=1e-6)
    # Dense layers are vectors: every pooling request gives the same "none" output.
    assert out["fc6/none"].shape == out["fc7/none"].shape == (12, 205)
    assert not any(k.startswith("fc") and not k.endswith("none") for k in out)


def test_layer_n_is_what_layer_n_plus_1_receives(tiny_net, images):
    """ "conv1" is the pooled block output; "conv3" is after BN and ReLU."""
    out = features.extract_features(
        tiny_net, images, [("conv1", "flatten"), ("conv3", "flatten"), ("fc6", "avg")]
    )
    probe = keras.Model(
        tiny_net.input,
        [
            tiny_net.get_layer(n).output
            for n in ("conv1_pool", "conv3_relu", "fc6_relu")
        ],
    )
    pool1, relu3, relu6 = (np.asarray(a) for a in probe.predict(images, verbose=0))
    np.testing.assert_allclose(out["conv1/flatten"], pool1.reshape(12, -1), rtol=1e-6)
    np.testing.assert_allclose(out["conv3/flatten"], relu3.reshape(12, -1), rtol=1e-6)
    np.testing.assert_allclose(out["fc6/none"], relu6, rtol=1e-6)
    assert (out["conv3/flatten"] >= 0).all()


def test_unknown_layer_lists_the_valid_ones(tiny_net, images):
    with pytest.raises(ValueError, match=r"unknown layer 'conv9'.*'conv1'.*'fc8'"):
        features.extract_features(tiny_net, images, [("conv9", "avg")])
    with pytest.raises(ValueError, match=r"pooling='mean' is not one of"):
        features.extract_features(tiny_net, images, [("conv2", "mean")])
    with pytest.raises(ValueError, match=r"probe_layers=\['conv6'\] not in"):
        features.StudyConfig(probe_layers=("conv1", "conv6"))


def test_incompatible_input_shape_is_a_clear_error(tiny_net):
    rgb = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"takes images of shape \(28, 28, 1\).*"
                       r"\(32, 32, 3\).*--image_size"):  # fmt: skip
        features.extract_features(tiny_net, rgb, [("conv1", "avg")])


def test_load_net_from_workdir_keras_file_and_saved_model(tmp_path, tiny_net, images):
    export.export_model(tiny_net, tmp_path / "run")
    expected = features.extract_features(tiny_net, images, [("conv4", "avg")])
    for where in ("run", "run/model.keras", "run/saved_model"):
        net = features.load_net(tmp_path / where)
        got = features.extract_features(net, images, [("conv4", "avg")])
        np.testing.assert_allclose(got["conv4/avg"], expected["conv4/avg"], rtol=1e-6)
    lone = tmp_path / "lone"
    (tmp_path / "run" / "saved_model").rename(lone)
    with pytest.raises(ValueError, match="exposes only its serving signature"):
        features.load_net(lone)
    inputs = keras.Input((28, 28, 1))
    other = keras.Model(inputs, keras.layers.Flatten()(inputs))
    with pytest.raises(ValueError, match="not a transfer_tf base net"):
        features.load_net(other)


# ------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("module", ["mobilenet_v2", "resnet50", "densenet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbone_preprocessing_is_the_applications_own(module, channels):
    preprocess = getattr(keras.applications, module).preprocess_input
    matrix, bias = features.preprocessing_affine(preprocess, channels)
    x = np.random.default_rng(0).uniform(0, 255, (4, 5, 5, channels))
    rgb = np.repeat(x, 3, axis=-1) if channels == 1 else x
    expected = preprocess(rgb.astype(np.float32).copy())
    np.testing.assert_allclose(x @ matrix + bias, expected, rtol=1e-5, atol=1e-3)


def test_backbone_takes_raw_grayscale_images_and_resizes(images):
    model = features.backbone("MobileNetV2", (28, 28, 1), weights=None, image_size=32)
    out = features.extract_features(model, images[:4], [("output", "avg")])
    assert out["output/avg"].shape == (4, 1280)
    inner = features.backbone(
        "MobileNetV2", (28, 28, 1), weights=None, image_size=32, layer="block_2_add"
    )
    assert inner.output.shape[1:] == (8, 8, 24)
    with pytest.raises(ValueError, match=r"unknown layer 'block_99'.*'output'"):
        features.backbone("MobileNetV2", (28, 28, 1), None, 32, layer="block_99")
    with pytest.raises(ValueError, match=r"at least 32x32 px.*--backbone_image_size"):
        features.backbone("MobileNetV2", (28, 28, 1), weights=None)
    with pytest.raises(ValueError, match=r"unknown backbone 'AlexNet'.*MobileNetV2"):
        features.backbone("AlexNet", (28, 28, 1), weights=None)


def test_backbone_without_weights_says_so_and_how_to_provide_them(
    monkeypatch, tmp_path
):
    from keras.src.utils import file_utils

    url = (
        "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    )

    def offline(fname, origin, **kwargs):  # what Keras raises without a network
        raise Exception(f"URL fetch failure on {origin}: None -- name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(features.BackboneWeightsError) as error:
        features.backbone("MobileNetV2", (32, 32, 3), "imagenet", image_size=96)
    message = str(error.value)
    assert "could not download" in message and url in message
    assert "models/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96" in message
    assert "--backbone_weights=PATH" in message and "weights=None" in message
    with pytest.raises(features.BackboneWeightsError, match="does not exist"):
        features.backbone("MobileNetV2", (32, 32, 3), str(tmp_path / "w.h5"))


# ---------------------------------------------------------------------- linear heads

FAST = features.ProbeConfig(learning_rate=0.05, epochs=15, patience=3)


def blobs(rng, per_class, centers, noise=1.0):
    x = np.concatenate([c + noise * rng.normal(size=(n, len(c)))
                        for c, n in zip(centers, per_class, strict=True)])  # fmt: skip
    y = np.concatenate([np.full(n, i) for i, n in enumerate(per_class)])
    return x.astype(np.float32), y


def test_probe_on_separable_features_is_near_perfect():
    rng = np.random.default_rng(0)
    centers = 6.0 * np.eye(3, 20)
    x_train, y_train = blobs(rng, [60] * 3, centers)
    x_val, y_val = blobs(rng, [20] * 3, centers)
    x_test, y_test = blobs(rng, [100] * 3, centers)
    probe = features.train_linear_probe(x_train, y_train, x_val, y_val, 3, FAST)
    assert probe.evaluate(x_test, y_test)["accuracy"] >= 0.99
    assert probe.kernel.shape == (20, 3) and probe.l2 in FAST.l2_grid
    assert len(probe.search) == len(FAST.l2_grid)


def test_standardisation_uses_training_statistics_only():
    rng = np.random.default_rng(1)
    centers = [np.full(8, 3.0), np.full(8, 5.0)]
    x_train, y_train = blobs(rng, [40, 40], centers)
    x_val, y_val = blobs(rng, [20, 20], centers)
    quick = dataclasses.replace(FAST, epochs=1)
    probe = features.train_linear_probe(x_train, y_train, x_val, y_val, 2, quick)
    np.testing.assert_allclose(probe.mean, x_train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(probe.scale, x_train.std(0), rtol=1e-4)
    # Validation features a thousand units away change the heads' selection data,
    # never the standardisation.
    shifted = features.train_linear_probe(
        x_train, y_train, x_val + 1000.0, y_val, 2, quick
    )
    np.testing.assert_array_equal(shifted.mean, probe.mean)
    np.testing.assert_array_equal(shifted.scale, probe.scale)
    constant = np.concatenate([x_train, np.ones((80, 1), np.float32)], axis=1)
    mean, scale = features.standardization(constant)
    assert scale[-1] == 1.0 and mean[-1] == 1.0  # centred, never divided by 0


def test_l2_strength_is_chosen_on_validation_even_when_test_disagrees():
    """Validation holds only class-0 examples, so the head whose L2 is strong
    enough to always predict the majority class wins there; on the balanced test
    split it is the worst. The probe must follow validation."""
    rng = np.random.default_rng(2)
    centers = [np.zeros(4), np.array([1.5, 0, 0, 0])]
    x_train, y_train = blobs(rng, [280, 120], centers)
    x_val, y_val = blobs(rng, [200, 0], centers)
    x_test, y_test = blobs(rng, [300, 300], centers)
    config = dataclasses.replace(
        FAST, l2_grid=(0.0, 10.0), learning_rate=0.01, patience=0, epochs=30
    )
    probe = features.train_linear_probe(x_train, y_train, x_val, y_val, 2, config)
    val = {e["l2"]: e["val_accuracy"] for e in probe.search}
    test = {l2: probe.evaluate(x_test, y_test, head=l2)["accuracy"] for l2 in val}
    assert val[10.0] == 1.0 > val[0.0]
    assert test[0.0] > test[10.0] + 0.15
    assert probe.l2 == 10.0 == max(val, key=val.get) != max(test, key=test.get)


def test_probe_config_errors():
    with pytest.raises(ValueError, match="l2_grid"):
        features.ProbeConfig(l2_grid=(0.1, -1.0))
    with pytest.raises(ValueError, match="learning_rate=0"):
        features.ProbeConfig(learning_rate=0)
    with pytest.raises(ValueError, match=r"labels must be integers in 0..1"):
        features.train_linear_probe(
            np.zeros((4, 2)), np.array([0, 1, 2, 0]), np.zeros((2, 2)),
            np.array([0, 1]), 2,
        )  # fmt: skip


# ---------------------------------------------------------------------------- export


def test_exported_backbone_and_head_take_raw_images(tmp_path, digits_source):
    net = models.build_base_net((28, 28, 1), 10, seed=0, **TINY)
    x, y = digits_source.x_train[:300], digits_source.y_train[:300]
    feats = features.extract_features(net, x, [("conv2", "avg")])["conv2/avg"]
    probe = features.train_linear_probe(
        feats[:200], y[:200], feats[200:], y[200:], 10,
        dataclasses.replace(FAST, epochs=3),
    )  # fmt: skip
    model = features.probe_model(net, "conv2", "avg", probe)
    assert [w.path for w in model.trainable_weights] == ["head/kernel", "head/bias"]
    images = digits_source.x_test[:32]  # raw uint8
    expected = model.predict(images, verbose=0)
    test_feats = features.extract_features(net, images, [("conv2", "avg")])
    np.testing.assert_allclose(
        expected, probe.logits(test_feats["conv2/avg"]), atol=1e-3
    )
    paths = export.export_model(model, tmp_path)
    loaded = tf.saved_model.load(paths["saved_model"])  # keep: owns the variables
    served = loaded.serve(tf.constant(images)).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)
    again = export.load_keras_model(tmp_path)
    np.testing.assert_allclose(again.predict(images, verbose=0), expected, atol=1e-5)
    normalize = again.get_layer("standardize")
    np.testing.assert_allclose(np.ravel(normalize.mean), probe.mean, rtol=1e-6)


# ------------------------------------------------------------------------- the study


def test_budget_subsets_are_the_ones_make_task_keeps(digits_source):
    halves = data.split_classes(digits_source.class_names, "random", 0)
    config = data.DataConfig()
    task = data.make_task(digits_source, halves.b, config)
    for k, seed in ((1, 0), (5, 1), (50, 0)):
        reduced = data.make_task(
            digits_source, halves.b,
            dataclasses.replace(config, train_per_class=k, subset_seed=seed),
        )  # fmt: skip
        idx = task.subset_indices(k, seed)
        np.testing.assert_array_equal(task.x_train[idx], reduced.x_train)
        np.testing.assert_array_equal(task.y_train[idx], reduced.y_train)
        subset = task.subset(k, seed)
        np.testing.assert_array_equal(subset.x_train, reduced.x_train)
        np.testing.assert_array_equal(subset.x_test, task.x_test)
        assert np.bincount(subset.y_train).max() <= k


def test_expand_orders_sources_first_and_keeps_selffer_at_all_labels():
    config = features.StudyConfig(
        targets=("A", "B"),
        seeds=(0, 1),
        probe_layers=("conv2", "fc6"),
        budgets=(5, None),
    )
    runs = features.expand(config)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    position = {r.key: i for i, r in enumerate(runs)}
    for r in runs:
        if r.source_run():
            assert position[r.source_run().key] < position[r.key], r.key
    probes = [r for r in runs if r.treatment == "probe"]
    assert {r.pooling for r in probes if r.layer == "fc6"} == {"none"}
    assert {r.pooling for r in probes if r.layer == "conv2"} == {"flatten", "avg"}
    assert all(r.k is None for r in probes if r.role == "selffer")
    # per seed and target: 3 sources; (2 conv poolings + 1 dense) x 2 budgets,
    # selffer all labels only; plus scratch k5, fine-tune x 2, and 2 base nets.
    assert len(probes) == 2 * 2 * (3 * 2 + 3 * 2 + 3)
    assert len(runs) == len(probes) + 2 * (2 + 2 * (1 + 2))
    assert {r.name for r in runs if r.treatment == "fine_tune"} == {"AnB+", "BnA+"}


def test_study_config_errors():
    with pytest.raises(ValueError, match=r"budgets=\[.1., .5.\] must include .all."):
        features.StudyConfig(budgets=(1, 5))
    with pytest.raises(ValueError, match=r"probe_sources=\['imagenet'\]"):
        features.StudyConfig(probe_sources=("imagenet",))
    with pytest.raises(ValueError, match="give one target"):
        features.StudyConfig(targets=("A", "B"), source_path="/tmp/x")


def _record(layer, val, test, seed=0, source="A", budget="all"):
    return {
        "key": f"{seed}/{source}/{layer}/{budget}", "treatment": "probe",
        "target": "B", "seed": seed, "budget": budget, "source": source,
        "layer": layer, "pooling": "avg", "l2": 0.0, "num_train": 10,
        "num_classes": 5, "val_accuracy": val, "val_loss": 1.0, "test_accuracy": test,
    }  # fmt: skip


def test_summary_picks_the_probe_layer_on_validation():
    records = [
        _record("conv3", val=0.90, test=0.70),
        _record("fc6", val=0.80, test=0.95),  # best on test, not on validation
        _record("conv3", val=0.60, test=0.65, seed=1),
        _record("fc6", val=0.70, test=0.75, seed=1),
    ]
    summary = features.summarize(records)["B"]
    line = summary["budgets"]["probe:A"]["all"]
    assert line["mean"] == pytest.approx((0.70 + 0.75) / 2) and line["count"] == 2
    assert summary["chosen"][("A", "all")] == [("conv3", "avg", 0.0),
                                               ("fc6", "avg", 0.0)]  # fmt: skip
    assert summary["layers"][("A", "avg")]["fc6"]["mean"] == pytest.approx(0.85)


def test_external_source_must_not_have_seen_the_target_classes(tmp_path, tiny_net):
    source = tmp_path / "base"
    export.export_model(tiny_net, source)
    results.write_json(source / "config.json", {"data": {"dataset": "digits"}})
    config = features.StudyConfig(source_path=str(source), arms=("probe",))
    with pytest.raises(ValueError, match=r"trained on classes \['0', '1', '5', '8'"):
        features.run_study(config, tmp_path / "study")
    results.write_json(
        source / "config.json", {"data": {"dataset": "digits", "split": "A"}}
    )
    features._check_source_classes(config, features._Resources(config, tmp_path))
    rgb = models.build_base_net((32, 32, 3), 5, **TINY)
    export.export_model(rgb, tmp_path / "rgb")
    config = dataclasses.replace(config, source_path=str(tmp_path / "rgb"))
    with pytest.raises(ValueError, match=r"takes images of shape \(32, 32, 3\)"):
        features.run_study(config, tmp_path / "study2")


def test_grid_lines_are_drawn_only_for_a_like_for_like_grid(tmp_path):
    results.write_json(
        tmp_path / "config.json",
        {"data": {"dataset": "digits"}, "model": {"width": 0.125}},
    )
    for key, treatment, seed in (
        ("random/seed0/AnB/n3", "AnB", 0),
        ("random/seed1/AnB/n3", "AnB", 1),
        ("random/seed0/BnB/n3", "BnB", 0),
    ):
        results.append_jsonl(
            tmp_path / "results.jsonl",
            {"key": key, "treatment": treatment, "split": "random", "seed": seed,
             "n": 3, "target": "B", "test_accuracy": 0.9},
        )  # fmt: skip
    same = models.ModelConfig(width=0.125)
    drawn = features.grid_records(tmp_path, "random", 0, "digits", same)
    assert [r["key"] for r in drawn] == ["random/seed0/AnB/n3"]  # split seed 0 only
    wider = models.ModelConfig(width=0.25)
    assert features.grid_records(tmp_path, "random", 0, "digits", wider) == []
    assert features.grid_records(tmp_path, "random", 0, "uci_digits", same) == []
