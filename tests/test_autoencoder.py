"""The autoencoder: shapes, pretraining from images only, transfer of its layers,
export of its encoder, and the study's expansion and summaries."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from transfer_tf import autoencoder as ae
from transfer_tf import data, export, models, results, study, training

FLOAT32 = dict(precision="float32", xla="off", verbose=0)


def fake_grid(root, seed=0):
    """A transfer-grid work directory with a finished (untrained) base net on A."""
    run = root / "runs" / "random" / "seed0" / "baseA"
    run.mkdir(parents=True, exist_ok=True)
    models.build_base_net((28, 28, 1), 5, seed=seed, **TINY).save(run / "model.keras")
    results.write_json(root / "config.json", {"data": {"dataset": "digits"}})
    results.append_jsonl(
        root / "results.jsonl", {"key": "random/seed0/baseA", "kind": "base"}
    )
    return root


def tiny_study(**kw):
    values = dict(
        data=data.DataConfig(train_per_class=20, batch_size=32),
        model=models.ModelConfig(**TINY),
        autoencoder=ae.AutoencoderConfig(code_size=8, max_images=96),
        pretraining=training.TrainConfig(
            epochs=1,
            optimizer="adam",
            learning_rate=1e-3,
            weight_decay=0.0,
            tensorboard=False,
            **FLOAT32,
        ),  # fmt: skip
        training=training.TrainConfig(epochs=1, **FLOAT32),
    )
    values.update(kw)
    return ae.StudyConfig(**values)


# -------------------------------------------------------------------------- model


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_reconstruction_has_the_input_shape_and_encoder_mirrors_base_net(shape):
    model = ae.build_autoencoder(shape, code_size=8, seed=0, **TINY)
    images = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
    recon = model(images, training=False).numpy()
    assert recon.shape == (2, *shape) and recon.dtype == np.float32
    assert 0.0 <= recon.min() and recon.max() <= 1.0
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


def test_reconstruction_loss_falls_during_short_training(tmp_path, digits_source):
    train, val = ae.split_images(
        digits_source.x_train, ae.AutoencoderConfig(max_images=256)
    )
    model = ae.build_autoencoder((28, 28, 1), code_size=16, seed=0, width=0.1)
    before = ae.reconstruction_error(model, val)["mse"]
    config = training.TrainConfig(
        epochs=3, optimizer="adam", learning_rate=3e-3, weight_decay=0.0, patience=0,
        tensorboard=False, backup=False, **FLOAT32,
    )  # fmt: skip
    outcome = ae.pretrain(
        model, train, val, ae.AutoencoderConfig(loss="bce"), config, tmp_path, 16
    )
    losses = [r["train/loss"] for r in results.read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 == outcome.epochs_run
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.7 * losses[0]
    after = ae.reconstruction_error(model, val, mean_image=train.mean(0))
    assert after["mse"] < 0.5 * before
    assert after["psnr"] == pytest.approx(10 * np.log10(1 / after["mse"]))


class _PoisonedLabels:
    """Labels that fail the test on any use."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("pretraining read a label")

    __getitem__ = __len__ = __iter__ = __array__ = __getattr__ = _fail


def test_pretraining_never_reads_labels_and_exports_the_encoder(
    tmp_path, digits_source
):
    poisoned = dataclasses.replace(
        digits_source,
        x_test=digits_source.x_test[:64],
        y_train=_PoisonedLabels(),
        y_test=_PoisonedLabels(),
    )
    with pytest.raises(AssertionError, match="read a label"):
        np.asarray(poisoned.y_train)  # the poison works
    record = ae.run_pretraining(tiny_study(), poisoned, tmp_path)
    assert record["train_images"] + record["validation_images"] == 96
    assert 0 < record["test_mse"] < 1 and record["test_examples"] == 64
    assert (tmp_path / "reconstructions.png").stat().st_size > 1000

    # The exported encoder: raw uint8 images in, the Keras encoder's codes out.
    images = digits_source.x_test[:16]
    autoencoder = export.load_keras_model(tmp_path / "pretrain" / ae.AUTOENCODER_FILE)
    expected = ae.encoder_model(autoencoder)(images, training=False).numpy()
    saved = export.load_saved_model(tmp_path / ae.ENCODER_DIR)
    codes = saved.serve(tf.constant(images)).numpy()
    assert codes.shape == (16, 8) and codes.dtype == np.float32
    np.testing.assert_allclose(codes, expected, atol=1e-5)
    keras_encoder = export.load_keras_model(tmp_path / ae.ENCODER_DIR)
    np.testing.assert_allclose(keras_encoder(images).numpy(), expected, atol=1e-5)


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


# -------------------------------------------------------------------------- study


def test_expand_orders_pretraining_first_and_needs_a_grid_for_supervised():
    config = tiny_study(seeds=(0, 1), budgets=(1, 10, None))
    runs = ae.expand(config)
    assert runs[0].key == "pretrain"
    assert len({r.key for r in runs}) == len(runs)
    # 2 sources x 6 layers x 2 seeds x 3 budgets, then 2 arms x 2 seeds x 3 budgets
    assert sum(r.kind == "probe" for r in runs) == 2 * 6 * 2 * 3
    assert {r.arm for r in runs if r.kind == "train"} == {"encoder_init", "scratch"}
    with_grid = ae.expand(dataclasses.replace(config, grid_workdir="/nowhere"))
    supervised = [r for r in with_grid if "supervised" in (r.arm, r.source)]
    # The supervised net has no code: 5 conv layers probed, plus its classifiers.
    assert len(supervised) == 5 * 2 * 3 + 2 * 3
    keys = {r.key for r in with_grid}
    assert {"seed1/probe_autoencoder/code/none/k10", "seed0/encoder_init/kall"} <= keys


def test_study_config_errors_name_field_and_choices():
    with pytest.raises(ValueError, match=r"budgets=\['1', '5'\] must include 'all'"):
        tiny_study(budgets=(1, 5))
    with pytest.raises(ValueError, match=r"budgets=\['all', '5', 'all'\] has dup"):
        tiny_study(budgets=(0, 5, "all"))
    with pytest.raises(ValueError, match=r"seeds=\[0, 0\] has duplicates"):
        tiny_study(seeds=(0, 0))
    with pytest.raises(ValueError, match=r"probe_layers=\['conv6'\] not in"):
        tiny_study(probe_layers=("conv1", "conv6"))
    with pytest.raises(ValueError, match=r"arms=\['finetune'\] not in"):
        tiny_study(arms=("probe", "finetune"))
    with pytest.raises(ValueError, match="init_layers=6 is out of range"):
        tiny_study(init_layers=6)
    with pytest.raises(ValueError, match=r"target='C' is not one of \['A', 'B'\]"):
        tiny_study(target="C")


def test_grid_source_explains_what_is_missing(tmp_path):
    config = tiny_study(grid_workdir=str(tmp_path))
    with pytest.raises(ValueError, match="not a transfer-grid work directory"):
        ae.grid_source(config)
    results.write_json(tmp_path / "config.json", {"data": {"dataset": "uci_digits"}})
    with pytest.raises(ValueError, match="ran on 'uci_digits', not 'digits'"):
        ae.grid_source(config)
    wider = {"data": {"dataset": "digits"}, "model": {"width": 0.25}}
    results.write_json(tmp_path / "config.json", wider)
    with pytest.raises(ValueError, match=r"built its nets differently \(width: 0.25"):
        ae.grid_source(config)
    results.write_json(tmp_path / "config.json", {"data": {"dataset": "digits"}})
    with pytest.raises(ValueError, match=r"no finished base net random/seed0/baseA"):
        ae.grid_source(config)
    # A study that does not use the grid's net does not read it at all.
    no_grid_arms = tiny_study(
        grid_workdir=str(tmp_path), arms=("scratch",), probe_sources=()
    )
    assert set(ae.run_hashes(no_grid_arms, ae.expand(no_grid_arms)))


def _record(kind, arm, seed, budget, accuracy, **kw):
    return dict(kind=kind, arm=arm, seed=seed, budget=budget, test_accuracy=accuracy,
                val_accuracy=accuracy, val_loss=1.0, num_train=10, num_classes=5,
                wall_time=1.0, **kw)  # fmt: skip


def test_summary_pairs_seeds_and_marks_no_gain():
    records = [
        _record("train", "scratch", 0, "1", 0.40),
        _record("train", "scratch", 1, "1", 0.50),
        _record("train", "scratch", 0, "all", 0.95),
        _record("train", "encoder_init", 0, "1", 0.50),
        _record("train", "encoder_init", 1, "1", 0.60),
        _record("train", "encoder_init", 0, "all", 0.94),
        # Two probe layers: the one with the better validation accuracy counts.
        _record(
            "probe",
            "probe",
            0,
            "1",
            0.70,
            source="autoencoder",
            layer="code",
            pooling="none",
        ),  # fmt: skip
        {
            **_record(
                "probe",
                "probe",
                0,
                "1",
                0.30,
                source="autoencoder",
                layer="conv1",
                pooling="flatten",
            ),
            "val_accuracy": 0.9,
        },  # fmt: skip
    ]
    summary = ae.summarize(records)
    gains = summary["gains"]["encoder_init"]
    assert gains["1"]["mean"] == pytest.approx(0.10) and gains["1"]["count"] == 2
    assert gains["all"]["mean"] == pytest.approx(-0.01)
    assert summary["lines"]["probe:autoencoder"]["1"]["mean"] == pytest.approx(0.30)
    assert summary["lines"]["probe:autoencoder/code"]["1"]["mean"] == pytest.approx(0.7)
    assert summary["chosen"][("autoencoder", "1")] == [("conv1", "flatten")]
    text = ae.summary_markdown(summary, tiny_study())
    row = next(
        line for line in text.splitlines() if line.startswith("| fine-tuned, conv")
        and "+0.1000" in line
    )  # fmt: skip
    assert "-0.0100 **no gain**" in row and "+0.1000 ± 0.0000 |" in row


def test_finished_runs_are_recognised_by_their_configuration(tmp_path):
    grid = fake_grid(tmp_path / "grid")
    config = tiny_study(
        grid_workdir=str(grid), budgets=(2, None), probe_layers=("conv1", "code")
    )
    runs = ae.expand(config)
    hashes = ae.run_hashes(config, runs)
    for key, value in hashes.items():
        results.append_jsonl(tmp_path / "results.jsonl", {"key": key,
                             "config_hash": value})  # fmt: skip
    assert set(study.finished_records(tmp_path, hashes)) == set(hashes)
    # More seeds or budgets only add runs; the finished ones still count.
    grown = dataclasses.replace(config, seeds=(0, 1), budgets=(2, 5, None))
    found = study.finished_records(tmp_path, ae.run_hashes(grown, ae.expand(grown)))
    assert set(found) == set(hashes)
    # A downstream setting redoes exactly the runs it affects.
    kept = {r.key for r in runs if r.kind != "train"}
    other = dataclasses.replace(
        config, training=dataclasses.replace(config.training, learning_rate=0.5)
    )
    assert set(study.finished_records(tmp_path, ae.run_hashes(other, runs))) == kept
    other = dataclasses.replace(config, fine_tune_learning_rate=1e-3)
    found = study.finished_records(tmp_path, ae.run_hashes(other, runs))
    assert set(found) == kept | {r.key for r in runs if r.arm == "scratch"}
    # Another pretraining changes every run, and the work directory refuses it.
    other = dataclasses.replace(
        config, autoencoder=dataclasses.replace(config.autoencoder, code_size=9)
    )
    assert not study.finished_records(tmp_path, ae.run_hashes(other, runs))
    assert other.config_hash() != config.config_hash()
    # A retrained grid net invalidates exactly the runs that use it.
    fake_grid(grid, seed=5)
    found = study.finished_records(tmp_path, ae.run_hashes(config, runs))
    uses_grid = {r.key for r in runs if "supervised" in (r.arm, r.source)}
    assert uses_grid and set(found) == set(hashes) - uses_grid
