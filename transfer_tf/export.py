"""Export and reload of trained nets: the ``.keras`` file and a SavedModel.

``model.save`` writes only ``.keras``/``.h5`` in Keras 3; a TensorFlow SavedModel
(for TF Serving, TFLite, other languages) is ``model.export(path)``. Both are
written; the SavedModel's ``serve`` signature takes raw uint8 images, because the
rescaling is part of the model.
"""

from __future__ import annotations

import pathlib
import shutil

import keras
import tensorflow as tf

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"


def export_model(model: keras.Model, directory) -> dict:
    """Writes ``<directory>/model.keras`` and ``<directory>/saved_model/``.

    Both are written under temporary names and renamed into place, so a killed
    export never leaves a half-written model that a rerun would trust.

    Returns:
      ``{"keras": path, "saved_model": path}``.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keras_path = directory / KERAS_FILE
    saved_path = directory / SAVED_MODEL_DIR
    tmp_keras = directory / ".tmp.model.keras"
    model.save(tmp_keras)
    tmp_keras.replace(keras_path)
    tmp_saved = directory / ".tmp.saved_model"
    shutil.rmtree(tmp_saved, ignore_errors=True)
    model.export(str(tmp_saved), format="tf_saved_model", verbose=False)
    shutil.rmtree(saved_path, ignore_errors=True)
    tmp_saved.replace(saved_path)
    return {"keras": str(keras_path), "saved_model": str(saved_path)}


def load_keras_model(path) -> keras.Model:
    """Loads a ``.keras`` file (or a work directory holding ``model.keras``).

    Raises:
      ValueError: the path holds no model or the file cannot be read.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / KERAS_FILE
    if not path.is_file():
        raise ValueError(f"no Keras model at {str(path)!r}")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises several types for a damaged archive
        raise ValueError(f"cannot load Keras model {str(path)!r}: {e}") from e


def load_saved_model(path):
    """Loads a SavedModel (or a work directory holding ``saved_model/``)."""
    path = pathlib.Path(path)
    if (path / SAVED_MODEL_DIR).is_dir():
        path = path / SAVED_MODEL_DIR
    if not (path / "saved_model.pb").is_file():
        raise ValueError(f"no SavedModel at {str(path)!r}")
    return tf.saved_model.load(str(path))
