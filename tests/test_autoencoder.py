"""The autoencoder: shapes, pretraining from images only, transfer of its layers
(transfer_tf.autoencoder)."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from transfer_tf import autoencoder as ae
from transfer_tf import models, results, training

FLOAT32 = dict(precision="float32", xla="off", verbose=0)


# -------------------------------------------------------------------------- model


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_reconstruction_has_the_input_shape_and_encoder_mirrors_base_net(shape):
    model = ae.build_autoencoder(shape, code_size=8, seed=0, **TINY)
    images = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
    recon = model(images, training=False).numpy()
    assert recon.shape == (2, *shape) and recon.dtype == np.float32
    # Each image is reconstructed from itself: alone or in a batch, the same.
    alone = model(images[1:], training=False).numpy()
    np.testing.assert_allclose(alone[0], recon[1], atol=1e-6)
    assert not np.allclose(recon[0], recon[1])
    encoder = ae.encoder_model(model)
    assert encoder(images).shape == (2, 8) and encoder.output.dtype == "float32"
    # The encoder's layers are the base net's: same names, order and weight shapes.
    base = models.build_base_net(shape, 3, **TINY)
    base_names = [lay.name for lay in base.layers]
    conv_part = base_names[: base_names.index("conv5_pool") + 1]
    assert [lay.name for lay in encoder.layers][: len(conv_part)] == conv_part
    for name in ae.ENCODER_LAYERS:
        assert [w.shape for w in model.get_layer(name).weights] == [
            w.shape for w in base.get_layer(name).weights
        ]
    # No decoder layer can be mistaken for one of the base net's layers 1..8.
    decoder = [lay.name for lay in model.layers if lay not in encoder.layers]
    assert decoder and not any(models.layer_index(n) for n in decoder)


def test_odd_sizes_are_cropped_back_and_errors_are_clear():
    model = ae.build_autoencoder((30, 45, 3), code_size=4, **TINY)
    assert model.output_shape == (None, 30, 45, 3)
    with pytest.raises(ValueError, match="below the 28x28 minimum"):
        ae.build_autoencoder((16, 16, 1), **TINY)
    with pytest.raises(ValueError, match="code_size=0 must be a positive integer"):
        ae.build_autoencoder((28, 28, 1), code_size=0, **TINY)
    with pytest.raises(ValueError, match=r"loss='l1' is not one of \['mse', 'bce'\]"):
        ae.AutoencoderConfig(loss="l1")
    with pytest.raises(ValueError, match="mask_rate=1.0 must be in"):
        ae.AutoencoderConfig(mask_rate=1.0)


# -------------------------------------------------------------------- pretraining


def test_denoising_corrupts_training_inputs_only(digits_source):
    images = digits_source.x_train[:64]
    kw = dict(noise_stddev=0.2, mask_rate=0.3)
    train = ae.image_dataset(images, 64, True, seed=3, **kw)
    assert train.element_spec[0].dtype == tf.uint8
    assert train.element_spec[1].dtype == tf.float32
    [(x1, t1)], [(x2, t2)] = list(train), list(train)  # two epochs of one batch
    for x, t in ((x1, t1), (x2, t2)):
        # Targets are the clean (shuffled) images; inputs are corrupted copies.
        assert np.allclose(np.sort(t.numpy().ravel()), np.sort(images.ravel() / 255.0))
        assert np.mean(x.numpy() != np.round(t.numpy() * 255)) > 0.3
    assert not np.array_equal(x1.numpy(), x2.numpy())  # new noise every epoch
    again = [x.numpy() for x, _ in ae.image_dataset(images, 64, True, seed=3, **kw)]
    np.testing.assert_array_equal(again[0], x1.numpy())  # but seeded
    for x, t in ae.image_dataset(images, 64, False, **kw):
        np.testing.assert_array_equal(x.numpy(), images)  # evaluation is clean
        np.testing.assert_allclose(t.numpy(), images / 255.0, rtol=1e-6)


# Several epochs of real training: the full suite's.
@pytest.mark.slow
def test_reconstruction_loss_falls_during_short_training(tmp_path, digits_source):
    train, val = ae.split_images(
        digits_source.x_train, ae.AutoencoderConfig(max_images=256)
    )
    model = ae.build_autoencoder((28, 28, 1), code_size=16, seed=0, width=0.1)
    before = ae.reconstruction_error(model, val)["mse"]
    config = training.TrainConfig(
        epochs=3,
        optimizer="adam",
        learning_rate=3e-3,
        weight_decay=0.0,
        patience=0,
        tensorboard=False,
        backup=False,
        **FLOAT32,
    )
    outcome = ae.pretrain(
        model, train, val, ae.AutoencoderConfig(loss="bce"), config, tmp_path, 16
    )
    losses = [r["train/loss"] for r in results.read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 == outcome.epochs_run
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.7 * losses[0]
    after = ae.reconstruction_error(model, val, mean_image=train.mean(0))
    assert after["mse"] < 0.5 * before
    assert after["psnr"] == pytest.approx(10 * np.log10(1 / after["mse"]))


# ----------------------------------------------------------------------- transfer


def test_encoder_weights_land_in_the_classifier(digits_source):
    model = ae.build_autoencoder((28, 28, 1), code_size=8, seed=1, **TINY)
    net = ae.init_classifier(model, 4, models.ModelConfig(**TINY), n=5, seed=2)
    assert net.output_shape == (None, 4)
    for name in ae.ENCODER_LAYERS:
        for got, want in zip(
            net.get_layer(name).get_weights(),
            model.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    assert all(layer.trainable for layer in net.layers)
    # The copied layers compute exactly what the encoder computes.
    images = digits_source.x_test[:8]
    conv5 = [
        keras.Model(m.input, m.get_layer("conv5_pool").output)(images).numpy()
        for m in (model, net)
    ]
    np.testing.assert_allclose(conv5[0], conv5[1], rtol=1e-6)

    # Cut at n = 2 and frozen: conv1, conv2 copied and frozen; conv3 fresh.
    cut = ae.init_classifier(
        model, 4, models.ModelConfig(**TINY), n=2, fine_tune=False, seed=2
    )
    np.testing.assert_array_equal(
        cut.get_layer("conv2").get_weights()[0], model.get_layer("conv2").kernel
    )
    assert not np.allclose(
        cut.get_layer("conv3").get_weights()[0], model.get_layer("conv3").kernel
    )
    assert not cut.get_layer("conv2").trainable and cut.get_layer("conv3").trainable
    with pytest.raises(ValueError, match=r"layer 'conv1': the autoencoder's weights"):
        ae.init_classifier(model, 4, models.ModelConfig(width=0.1), n=1)
    with pytest.raises(ValueError, match="n=6 is out of range"):
        ae.init_classifier(model, 4, models.ModelConfig(**TINY), n=6)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_match_block_scale_changes_the_scale_not_the_features(
    digits_source, batch_norm
):
    config = models.ModelConfig(batch_norm=batch_norm, **TINY)
    model = ae.build_autoencoder((28, 28, 1), 8, seed=1, batch_norm=batch_norm, **TINY)
    images = digits_source.x_test[:32]
    net = ae.init_classifier(model, 4, config, n=3, seed=2)
    conv3 = keras.Model(net.input, net.get_layer("conv3_relu").output)
    before = conv3(images).numpy()
    factor = ae.match_block_scale(net, 3, images, 0.5)
    assert ae.block_rms(net, 3, images) == pytest.approx(0.5, rel=1e-4)
    np.testing.assert_allclose(conv3(images).numpy(), factor * before, atol=1e-5)
    # init_classifier does it against its own fresh initialisation.
    fresh = models.build_base_net((28, 28, 1), 4, seed=2, **dataclasses.asdict(config))
    scaled = ae.init_classifier(model, 4, config, n=3, seed=2, scale_images=images)
    assert ae.block_rms(scaled, 3, images) == pytest.approx(
        ae.block_rms(fresh, 3, images), rel=1e-4
    )
