"""SavedModel and .keras export round trips."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from transfer_tf import export, models


# bfloat16 (emulated on most CPUs) in the full suite only.
@pytest.mark.parametrize(
    "dtype,tolerance",
    [("float32", 1e-5), pytest.param("mixed_bfloat16", 0.05, marks=pytest.mark.slow)],
)
def test_saved_model_outputs_equal_the_original(
    tmp_path, digits_source, dtype, tolerance
):
    model = models.build_base_net(
        (28, 28, 1), 10, seed=0, dtype=dtype, batch_norm=True, **TINY
    )
    paths = export.export_model(model, tmp_path)
    images = digits_source.x_test[:16]  # raw uint8: rescaling is inside the model
    expected = model(images, training=False).numpy()
    reloaded = tf.saved_model.load(paths["saved_model"])
    served = reloaded.serve(tf.constant(images)).numpy()
    np.testing.assert_allclose(served, expected, atol=tolerance)
    assert np.array_equal(served.argmax(1), expected.argmax(1)) or dtype != "float32"
    again = export.load_keras_model(tmp_path)
    np.testing.assert_allclose(
        again(images, training=False).numpy(), expected, atol=tolerance
    )
    names = [layer.name for layer in again.layers if layer.weights]
    assert [n for n in names if not n.endswith("_bn")] == list(models.LAYER_NAMES)
    assert not list(tmp_path.glob(".tmp*"))


def test_frozen_flags_survive_the_keras_file(tmp_path):
    source = models.build_base_net((28, 28, 1), 3, **TINY)
    net = models.transfer_net(source, 2, 3, fine_tune=False)
    export.export_model(net, tmp_path)
    again = export.load_keras_model(tmp_path / "model.keras")
    assert not again.get_layer("conv2").trainable and again.get_layer("conv3").trainable


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no Keras model"):
        export.load_keras_model(tmp_path)
    with pytest.raises(ValueError, match="no SavedModel"):
        export.load_saved_model(tmp_path)
    # A file of another kind says so (Keras itself says "File not found").
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"broken.keras' is not a .keras file \(a"):
        export.load_keras_model(broken)
    # A zip that is no Keras archive: Keras' own reason.
    import zipfile

    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("notes.txt", "x")
    with pytest.raises(ValueError, match="cannot load Keras model"):
        export.load_keras_model(broken)


def test_saved_model_refuses_images_of_another_shape(tmp_path):
    model = models.build_base_net((28, 28, 1), 5, seed=0, **TINY)
    export.export_model(model, tmp_path)
    loaded = export.load_saved_model(tmp_path)  # keep: owns the variables
    serving = loaded.signatures["serving_default"]  # what TF Serving calls
    good = np.zeros((2, 28, 28, 1), np.uint8)
    assert serving(image=tf.constant(good))["output_0"].shape == (2, 5)
    for shape in ((2, 32, 32, 1), (2, 28, 28, 3)):
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            serving(image=tf.zeros(shape, tf.uint8))
        assert "takes uint8 images of shape (batch, 28, 28, 1)" in str(error.value)
        with pytest.raises((TypeError, ValueError), match=r"\(None, 28, 28, 1\)"):
            loaded.serve(tf.zeros(shape, tf.uint8))


def test_the_keras_file_refuses_images_of_another_size_after_a_right_one(tmp_path):
    """README hands users model.keras too: loaded by export.load_keras_model, after
    a predict on the right image shape a batch of another size is an error, not
    an answer (Keras' own predict answers 29x29 and 32x32 batches of a 28x28
    net), in predict and in a direct call."""
    model = models.build_base_net((28, 28, 1), 5, seed=0, **TINY)
    export.export_model(model, tmp_path, saved_model=False)
    loaded = export.load_keras_model(tmp_path)
    right = np.zeros((2, 28, 28, 1), np.uint8)
    assert loaded.predict(right, verbose=0).shape == (2, 5)
    for size in (29, 32, 56):
        wrong = np.zeros((2, size, size, 1), np.uint8)
        with pytest.raises(ValueError, match=r"expected shape=\(None, 28, 28, 1\)"):
            loaded(wrong)
        with pytest.raises(ValueError, match=r"takes images of shape \(28, 28, 1\)"):
            loaded.predict(wrong, verbose=0)
