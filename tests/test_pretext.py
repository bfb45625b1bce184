"""Pretext tasks: their losses against references, their data made from images
alone, their models built from the base net's layers (so they transfer as the
autoencoder's encoder does), and each one learning its own task on planted
images where the answer is known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from transfer_tf import autoencoder as ae
from transfer_tf import models, pretext, training

TINY = models.ModelConfig(width=0.05)


def planted_images(n=240, size=28, seed=0):
    """Digit-like planted images: a bright bar along the top edge (so a
    rotation shows) and a random blob per image (so images differ)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (n, size, size, 1)).astype(np.uint8)
    images[:, :4, 4:-4] = 250
    for i in range(n):
        r, c = rng.integers(8, size - 8, 2)
        images[i, r - 3 : r + 3, c - 3 : c + 3] = rng.integers(120, 255)
    return images


def test_nt_xent_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 5)).astype(np.float32)  # B = 4: views 0-3, 4-7
    got = pretext.nt_xent(0.5)(None, tf.constant(z)).numpy()
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    sim = unit @ unit.T / 0.5
    expected = []
    for i in range(8):
        others = [j for j in range(8) if j != i]
        positive = (i + 4) % 8
        expected.append(-sim[i, positive] + np.log(np.exp(sim[i, others]).sum()))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Two identical views and orthogonal others: the accuracy is 1.
    views = np.concatenate([np.eye(4), np.eye(4)]).astype(np.float32)
    accuracy = pretext.contrastive_accuracy(None, tf.constant(views)).numpy()
    assert accuracy.tolist() == [1.0] * 8


def test_rotations_are_labelled_by_quarter_turns():
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    turned, labels = pretext.rotate(image)
    assert labels.numpy().tolist() == [0, 1, 2, 3]
    for k in range(4):
        np.testing.assert_array_equal(turned[k].numpy(), np.rot90(image[0], k))


def test_bad_settings_name_the_field():
    for changes, message in (
        ({"method": "jigsaw"}, "method='jigsaw'"),
        ({"exemplars": 0}, "exemplars=0 must be an integer >= 1"),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"crop": 1.0}, r"crop=1.0 must be in \[0, 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            pretext.PretextConfig(**changes)


@pytest.mark.parametrize("method", pretext.METHODS)
def test_a_pretext_model_transfers_like_the_autoencoders_encoder(method):
    config = pretext.PretextConfig(method=method, exemplars=7, code_size=16)
    model = pretext.build_pretext_model((28, 28, 1), config, TINY, seed=0)
    base = models.build_base_net((28, 28, 1), 3, width=TINY.width, seed=1)
    for name in ae.ENCODER_LAYERS:
        assert [w.shape for w in model.get_layer(name).weights] == [
            w.shape for w in base.get_layer(name).weights
        ]
    assert model.output_shape[-1] == {"rotation": 4, "exemplar": 7}.get(
        method, config.projection_size
    )
    encoder = ae.encoder_model(model)
    assert encoder.output_shape == (None, 16)
    net = ae.init_classifier(model, 3, TINY, n=3, fine_tune=False, seed=2)
    np.testing.assert_array_equal(
        net.get_layer("conv3").get_weights()[0],
        model.get_layer("conv3").get_weights()[0],
    )
    assert not net.get_layer("conv3").trainable and net.get_layer("conv4").trainable


def test_the_data_of_every_pretext_is_made_from_images_alone():
    images = planted_images(64)
    config = pretext.PretextConfig(method="rotation")
    train, val = pretext.pretext_datasets(images[:48], images[48:], config, 8, 0)
    x, y = next(iter(train))
    assert x.shape == (32, 28, 28, 1) and x.dtype == tf.uint8
    assert sorted(np.bincount(y.numpy()).tolist()) == [8, 8, 8, 8]
    exemplar = dataclasses.replace(config, method="exemplar", exemplars=12)
    train, val = pretext.pretext_datasets(images[:48], images[48:], exemplar, 8, 0)
    labels = np.concatenate([y.numpy() for _, y in train])
    assert set(labels.tolist()) == set(range(12))  # every seed image, each a class
    # Fixed validation: the same augmented images every time it is read.
    first = np.concatenate([x.numpy() for x, _ in val])
    again = np.concatenate([x.numpy() for x, _ in val])
    np.testing.assert_array_equal(first, again)
    contrastive = dataclasses.replace(config, method="contrastive")
    train, val = pretext.pretext_datasets(images[:48], images[48:], contrastive, 8, 0)
    x, _ = next(iter(train))
    assert x.shape == (16, 28, 28, 1)  # two views of 8 images
    # The two views of an image differ (augmented independently).
    assert not np.array_equal(x[:8].numpy(), x[8:].numpy())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "method, exemplars, margin",
    [("rotation", 1000, 2.4), ("exemplar", 16, 3.0), ("contrastive", 1000, 3.0)],
)
def test_each_pretext_learns_its_own_task(method, exemplars, margin, tmp_path):
    config = pretext.PretextConfig(
        method=method,
        exemplars=exemplars,
        code_size=32,
        validation_images=48,
        crop=0.1,
        translate=0.05,
        brightness=0.1,
        contrast=0.1,
    )
    train_config = training.TrainConfig(
        epochs=8,
        steps_per_epoch=20,
        optimizer="adam",
        learning_rate=2e-3,
        weight_decay=0.0,
        patience=8,
        seed=0,
        tensorboard=False,
        backup=False,
        precision="float32",
        xla="off",
    )
    model, record = pretext.pretrain_on_images(
        planted_images(240), config, TINY, train_config, tmp_path, batch_size=16
    )
    assert record["pretext_val_accuracy"] > margin * record["pretext_chance"]
    assert (tmp_path / pretext.PRETEXT_FILE).is_file()
    assert record["train_images"] + record["validation_images"] == 240
