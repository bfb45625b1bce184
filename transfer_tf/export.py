"""Export and reload of trained nets: the ``.keras`` file and a SavedModel.

``model.save`` writes only ``.keras``/``.h5`` in Keras 3; a TensorFlow SavedModel
(for TF Serving, TFLite, other languages) is ``model.export(path)``. Both are
written; the SavedModel's ``serve`` endpoint (also its ``serving_default``
signature, which TF Serving calls) takes raw uint8 images, because the rescaling
is part of the model, and refuses a batch of another image shape with a message
saying the shape it expects (a signature alone lets any shape through to the
kernels, which then fail obscurely or even answer).
"""

from __future__ import annotations

import pathlib
import zipfile

import keras
import tensorflow as tf

from transfer_tf import results

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"


def export_model(model: keras.Model, directory, saved_model: bool = True) -> dict:
    """Writes ``<directory>/model.keras`` and ``<directory>/saved_model/``.

    Both are written under temporary names and renamed into place, so a killed
    export never leaves a half-written model that a rerun would trust.

    Args:
      model: the net to write.
      directory: where to write it.
      saved_model: also the SavedModel (for a net a user takes away: TF Serving,
        TFLite, other languages); without it only ``model.keras``, which is what
        the studies read back (a SavedModel costs seconds per net).

    Returns:
      ``{"keras": path, "saved_model": path or None}``.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keras_path = directory / KERAS_FILE
    saved_path = directory / SAVED_MODEL_DIR
    with results.atomic_path(keras_path) as tmp:
        model.save(tmp)
    if not saved_model:
        return {"keras": str(keras_path), "saved_model": None}
    with results.atomic_path(saved_path) as tmp:
        serving_archive(model).write_out(str(tmp), verbose=False)
    return {"keras": str(keras_path), "saved_model": str(saved_path)}


def serving_archive(model: keras.Model) -> keras.export.ExportArchive:
    """The model's SavedModel archive with a ``serve`` endpoint that checks the
    image shape before running the model."""
    shape = tuple(int(d) for d in model.input_shape[1:])
    dtype = tf.as_dtype(model.inputs[0].dtype)
    described = "x".join(str(d) for d in shape)
    message = (
        f"model {model.name!r} takes {dtype.name} images of shape (batch, "
        f"{', '.join(map(str, shape))}) ({described}); resize or convert the "
        "images to that shape"
    )

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), dtype, name="image")])
    def serve(images):
        checks = [
            tf.debugging.assert_equal(
                tf.shape(images)[1:], tf.constant(shape), message=message
            )
        ]
        with tf.control_dependencies(checks):
            return model(tf.identity(images), training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve)
    return archive


def load_keras_model(path) -> keras.Model:
    """Loads a ``.keras`` file (or a work directory holding ``model.keras``).

    The model's ``predict`` refuses arrays of another image shape: Keras' own
    ``predict`` relaxes the input shape after its first call and answers a batch
    of, say, 29x29 images of a 28x28 net (calling the model directly is checked
    by Keras). A ``.keras`` file loaded with ``keras.models.load_model`` has no
    such check; the SavedModel's ``serve`` has it.

    Raises:
      ValueError: the path holds no model or the file cannot be read.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / KERAS_FILE
    if not path.is_file():
        raise ValueError(f"no Keras model at {str(path)!r}")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is not a .keras file (a .keras file is the zip archive "
            "that model.save writes); pass a model saved with "
            "model.save('net.keras'), or its SavedModel directory"
        )
    try:
        model = keras.models.load_model(path)
    except Exception as e:  # Keras raises several types for a damaged archive
        raise ValueError(f"cannot load Keras model {str(path)!r}: {e}") from e
    return _shape_checked(model)


def _shape_checked(model: keras.Model) -> keras.Model:
    """``model`` whose ``predict`` checks the image shape of array input."""
    if len(model.inputs) != 1:
        return model
    expected = tuple(model.input_shape[1:])
    unchecked = model.predict

    def predict(x, *args, **kwargs):
        shape = getattr(x, "shape", None)
        if shape is not None and tuple(shape[1:]) != expected:
            raise ValueError(
                f"model {model.name!r} takes images of shape {expected}, not "
                f"{tuple(shape[1:])}: resize or convert the images to that shape"
            )
        return unchecked(x, *args, **kwargs)

    model.predict = predict
    return model


def load_saved_model(path):
    """Loads a SavedModel (or a work directory holding ``saved_model/``)."""
    path = pathlib.Path(path)
    if (path / SAVED_MODEL_DIR).is_dir():
        path = path / SAVED_MODEL_DIR
    if not (path / "saved_model.pb").is_file():
        raise ValueError(f"no SavedModel at {str(path)!r}")
    return tf.saved_model.load(str(path))
