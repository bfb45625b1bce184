"""Base nets to transfer from (transfer_tf/studies/sources.py): a net of another
input size made to take the target's images, a study's work directory, a grid's
base nets and keys, and bad sources as clear errors."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from conftest import TINY, fake_grid
from transfer_tf import backbones, data, export, models, results
from transfer_tf.studies import sources
from transfer_tf.studies.transferability import plan as grid_plan

OPTIONS = sources.Options(layers=("conv2", "fc6"))


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A tiny base net saved at 28x28x1."""
    path = tmp_path_factory.mktemp("net") / "digits_net.keras"
    models.build_base_net((28, 28, 1), 5, seed=0, **TINY).save(path)
    return path


def test_a_net_of_another_input_size_takes_the_targets_images(small_net):
    net = export.load_keras_model(small_net)
    gray = np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1)).astype(np.uint8)
    # Channels: an RGB image of three equal channels is the gray image.
    adapted, note = sources.adapt_input(net, (28, 28, 3))
    assert "3 channel(s) mapped to 1" in note and "resized" not in note
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_allclose(
        adapted.predict(rgb, verbose=0), net.predict(gray, verbose=0), atol=1e-4
    )
    # Size: a 56x56 image is resized to the net's 28x28 in front of it.
    adapted, note = sources.adapt_input(net, (56, 56, 1))
    assert note == "resized 56x56 to 28x28"
    big = np.repeat(np.repeat(gray, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(
        adapted.predict(big, verbose=0), net.predict(gray, verbose=0), atol=0.05
    )
    # Its layers keep their names and weights; the original net is untouched.
    copied, original = (models.layer_weights(m, 8) for m in (adapted, net))
    assert copied.keys() == original.keys()
    for key, weights in original.items():
        np.testing.assert_array_equal(copied[key], weights)
    assert tuple(net.input_shape[1:]) == (28, 28, 1)
    # A transfer net built from it gets the adapter's weights back.
    adapted, _ = sources.adapt_input(net, (32, 32, 3))
    built = models.transfer_net(adapted, 3, 4, input_shape=(32, 32, 3))
    sources.copy_adapter(adapted, built)
    np.testing.assert_array_equal(
        built.get_layer("adapt_channels").get_weights()[0],
        adapted.get_layer("adapt_channels").get_weights()[0],
    )
    assert not built.get_layer("adapt_channels").trainable


def test_a_study_work_directory_gives_its_base_nets(tmp_path):
    grid = fake_grid(tmp_path / "grid")
    found = sources.load(str(grid), (32, 32, 3), OPTIONS)
    assert [s.name for s in found] == ["grid/random/seed0/baseA"]
    assert found[0].base_net and found[0].layers == ("conv2", "fc6")
    assert "resized 32x32 to 28x28" in found[0].note
    empty = tmp_path / "empty"
    empty.mkdir()
    results.append_jsonl(empty / "results.jsonl", {"key": "x", "kind": "probe"})
    with pytest.raises(ValueError, match="holds no finished base net"):
        sources.load(str(empty), (32, 32, 3), OPTIONS)
    # A file of its base net changes the fingerprint the advisor depends on.
    before = sources.fingerprint(str(grid))
    models.build_base_net((28, 28, 1), 5, seed=1, **TINY).save(
        grid / "runs" / "random" / "seed0" / "baseA" / "model.keras"
    )
    assert sources.fingerprint(str(grid)) != before


def test_the_grid_reader_finds_base_nets_by_the_grids_own_keys(tmp_path):
    grid = fake_grid(tmp_path / "grid")
    assert (
        sources.base_key("random", 0, "A")
        == grid_plan.Run("base", "random", 0, "A").key
    )
    config = data.DataConfig("digits", split_seed=0)
    model = models.ModelConfig(**TINY)
    path = sources.grid_base_net(grid, config, model, half="A", seed=0)
    assert path == grid / "runs" / "random" / "seed0" / "baseA"
    with pytest.raises(ValueError, match="no finished base net random/seed0/baseB"):
        sources.grid_base_net(grid, config, model, half="B", seed=0)
    with pytest.raises(ValueError, match=r"data.dataset: 'digits' -> 'uci_digits'"):
        sources.grid_records(grid, data.DataConfig("uci_digits"), model)
    assert sources.grid_seed("random", 3, 0, [0, 3]) == 3
    assert sources.grid_seed("man_made", 0, 2, [0, 1]) == 0


def test_bad_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown source 'ResNet9'.*MobileNetV2"):
        sources.load("ResNet9", (32, 32, 3), OPTIONS)
    with pytest.raises(ValueError, match="no such file or directory"):
        sources.load(str(tmp_path / "missing.keras"), (32, 32, 3), OPTIONS)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a .keras file"):
        sources.load(str(tmp_path / "notes.txt"), (32, 32, 3), OPTIONS)
    with pytest.raises(ValueError, match="sources=\\(\\) names no candidate"):
        sources.load_all((), (32, 32, 3), OPTIONS)
    # A file that exists but is no .keras archive says so (not "File not found").
    (tmp_path / "text.keras").write_text("not a model")
    with pytest.raises(ValueError, match="text.keras' is not a .keras file"):
        sources.load(str(tmp_path / "text.keras"), (32, 32, 3), OPTIONS)
    # A model of vectors is not an image model.
    inputs = keras.Input((10,))
    keras.Model(inputs, keras.layers.Dense(3)(inputs)).save(tmp_path / "vec.keras")
    with pytest.raises(ValueError, match=r"takes input of shape \(10,\), not images"):
        sources.load(str(tmp_path / "vec.keras"), (32, 32, 3), OPTIONS)

    # Offline ImageNet weights: the download is not attempted here (no network
    # in tests); Keras' failure is what it raises offline.
    def offline(**kwargs):
        raise Exception(
            "URL fetch failure on https://example.org/mobilenet_v2_no_top.h5: None "
            "-- [Errno -2] Name or service not known"
        )

    spec = backbones.BACKBONES["MobileNetV2"]
    monkeypatch.setitem(
        backbones.BACKBONES,
        "MobileNetV2",
        dataclasses.replace(spec, constructor=offline),
    )
    with pytest.raises(backbones.BackboneWeightsError, match="cannot load ImageNet"):
        sources.load("MobileNetV2", (32, 32, 3), OPTIONS)
