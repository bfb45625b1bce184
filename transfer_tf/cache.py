"""Exact activation caching for frozen prefixes.

When layers 1..n of a net are frozen and deterministic at training time (no
augmentation; frozen batch normalisation runs in inference mode; dropout sits after
the cut), their output for an image never changes during training. Computing it
once per dataset and training only layers n+1..8 on the cached activations gives
the same model as pushing every image through the frozen layers every epoch, at a
fraction of the cost.

- :func:`frozen_cut` finds n for a model (0 when nothing can be cached) and says why.
- :func:`split_at` cuts a net into a ``prefix`` (input -> layer n's last
  deterministic output) and a ``head`` (the rest) that share the net's layers, so
  training the head trains the full net in place: the model that comes out is the
  whole net, exportable like any other.
- :class:`ActivationCache` computes and keeps prefix activations, keyed by the
  prefix's weights and the images, in memory within a budget and on disk (``.npy``
  memory maps) beyond it. One cache serves every run that freezes the same source
  layers on the same data.

Activations are stored in the prefix's compute dtype: bfloat16 under
``mixed_bfloat16`` (what the uncached path feeds layer n+1 anyway, so storage is
lossless) and float32 otherwise.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from transfer_tf import models

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def frozen_cut(model: keras.Model, augment: str = "none") -> tuple[int, str]:
    """The number n of leading weight layers whose output can be cached exactly.

    That is the frozen prefix, stopped before the first dropout layer (dropout is
    random at training time, so fc7 of a net frozen up to fc7 still sees new inputs
    every epoch: the cache then holds fc6's output and fc7 runs, frozen, in the
    head).

    Returns:
      ``(n, reason)``: n = 0 with the reason when caching does not apply
      (augmentation on, conv1 trainable).
    """
    if augment != "none":
        return 0, f"augmentation {augment!r} changes the inputs every epoch"
    frozen = 0
    for index in range(1, models.NUM_LAYERS):
        group = [
            layer for layer in model.layers if models.layer_index(layer.name) == index
        ]
        if not group or any(layer.trainable and layer.weights for layer in group):
            break
        frozen = index
    if frozen == 0:
        return 0, "no frozen leading layers (conv1 is trainable)"
    n = models.layer_index(boundary(model, frozen))
    if n < frozen:
        name = models.LAYER_NAMES[n - 1]
        return n, f"layers 1..{frozen} are frozen; {name}'s dropout ends the cache"
    return n, f"layers 1..{n} are frozen"


def boundary(model: keras.Model, n: int) -> str:
    """Name of the last deterministic layer of groups 1..n: layer n's last layer
    (e.g. ``conv2_pool``, ``fc6_relu``), or the last one before a dropout layer."""
    models.check_cut(n, allow_top=True)
    last = None
    for layer in model.layers:
        index = models.layer_index(layer.name)
        if index == 0:  # input, rescale, flatten
            continue
        if index > n or isinstance(layer, layers.Dropout):
            break
        last = layer.name
    if last is None:
        raise ValueError(f"model {model.name!r} has no layer group 1..{n} to cut after")
    return last


def split_at(model: keras.Model, n: int) -> tuple[keras.Model, keras.Model]:
    """``(prefix, head)`` of a chain-structured base net cut after layer n.

    Both reuse the net's layer objects: training ``head`` trains ``model``.
    """
    cut = boundary(model, n)
    names = [layer.name for layer in model.layers]
    prefix = keras.Model(model.input, model.get_layer(cut).output, name=f"prefix_{n}")
    tensor = model.get_layer(cut).output
    inputs = keras.Input(
        tensor.shape[1:], dtype=tensor.dtype, name=f"{cut}_activations"
    )
    x = inputs
    for layer in model.layers[names.index(cut) + 1 :]:
        x = layer(x)
    return prefix, keras.Model(inputs, x, name=f"head_{n}")


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()


def prefix_key(prefix: keras.Model) -> str:
    """Identity of a prefix: its layers' configurations and every weight's bytes
    (names of Keras tensors and models differ between identical nets)."""
    configs = []
    for layer in prefix.layers:
        config = layer.get_config()
        config.pop("name", None)
        configs.append(f"{layer.name}:{type(layer).__name__}:{sorted(config.items())}")
    weights = [np.asarray(w) for w in prefix.get_weights()]
    text = np.frombuffer("|".join(configs).encode(), dtype=np.uint8)
    return f"{prefix.layers[-1].name}-{_digest(text, *weights)}"


@dataclasses.dataclass
class Activations:
    """Cached prefix outputs of a task's three splits."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    storage: str  # "memory" or "disk"
    seconds: float  # time it took to compute them
    hit: bool = False

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, s).nbytes for s in SPLITS)


class ActivationCache:
    """Prefix activations per (prefix weights, images), within a memory budget.

    Args:
      memory_budget_bytes: total bytes kept in memory; the least recently used
        entries are evicted first. An entry larger than the budget goes to disk.
      directory: where disk entries go (``.npy`` memory maps); ``None`` means an
        entry over the budget is an error naming the budget.
      batch_size: images per prefix evaluation step.
    """

    def __init__(self, memory_budget_bytes=2 * 2**30, directory=None, batch_size=256):
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.directory = pathlib.Path(directory) if directory else None
        self.batch_size = batch_size
        self._memory = collections.OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "disk_entries": 0, "evictions": 0}

    def _used(self):
        return sum(a.nbytes for a in self._memory.values())

    def get(self, prefix: keras.Model, task) -> Activations:
        """The activations of ``task``'s train/validation/test images."""
        images = _digest(task.x_train, task.x_validation, task.x_test)
        key = f"{prefix_key(prefix)}-{images}"
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats["hits"] += 1
            return dataclasses.replace(self._memory[key], hit=True)
        on_disk = self._load_disk(key)
        if on_disk is not None:
            self.stats["hits"] += 1
            return on_disk
        self.stats["misses"] += 1
        shape = tuple(prefix.output.shape[1:])
        dtype = _numpy_dtype(prefix.output.dtype)
        count = sum(len(task.arrays(s)[1]) for s in SPLITS)
        need = count * int(np.prod(shape)) * dtype.itemsize
        if need <= self.memory_budget_bytes:
            while self._memory and self._used() + need > self.memory_budget_bytes:
                self._memory.popitem(last=False)
                self.stats["evictions"] += 1
            entry = self._compute(prefix, task, shape, dtype, None)
            self._memory[key] = entry
            return entry
        if self.directory is None:
            raise ValueError(
                f"activations need {need / 2**20:.0f} MiB, above the memory budget of "
                f"{self.memory_budget_bytes / 2**20:.0f} MiB, and no cache directory "
                "was given"
            )
        self.stats["disk_entries"] += 1
        return self._compute(prefix, task, shape, dtype, self.directory / key)

    def _compute(self, prefix, task, shape, dtype, disk_dir):
        started = time.time()
        call = tf.function(lambda x: prefix(x, training=False), reduce_retracing=True)
        out = {}
        if disk_dir is not None:
            disk_dir.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            x, _ = task.arrays(split)
            if disk_dir is None:
                array = np.empty((len(x), *shape), dtype)
            else:
                # .npy cannot describe bfloat16: store the raw 16-bit words.
                array = np.lib.format.open_memmap(
                    disk_dir / f".{split}.npy.tmp",
                    mode="w+",
                    dtype=_storage_dtype(dtype),
                    shape=(len(x), *shape),
                )
            for start in range(0, len(x), self.batch_size):
                batch = np.asarray(call(x[start : start + self.batch_size]))
                array[start : start + len(batch)] = batch.view(array.dtype)
            if disk_dir is not None:
                array.flush()
                del array
                (disk_dir / f".{split}.npy.tmp").replace(disk_dir / f"{split}.npy")
                array = self._open(disk_dir / f"{split}.npy", dtype)
            out[split] = array
        if disk_dir is not None:
            (disk_dir / "dtype").write_text(tf.as_dtype(dtype).name)
        storage = "memory" if disk_dir is None else "disk"
        seconds = time.time() - started
        log.debug(
            "cached %s activations %s in %.1f s (%s)", storage, shape, seconds, dtype
        )
        return Activations(**out, storage=storage, seconds=seconds)

    @staticmethod
    def _open(path, dtype):
        return np.load(path, mmap_mode="r").view(dtype)

    def _load_disk(self, key):
        if self.directory is None:
            return None
        entry = self.directory / key
        if not (entry / "dtype").is_file():  # written last: an entry is complete
            return None
        dtype = _numpy_dtype((entry / "dtype").read_text().strip())
        arrays = {s: self._open(entry / f"{s}.npy", dtype) for s in SPLITS}
        return Activations(**arrays, storage="disk", seconds=0.0, hit=True)


def _numpy_dtype(name) -> np.dtype:
    """NumPy dtype of a TF/Keras dtype name (bfloat16 comes from ml_dtypes)."""
    return np.dtype(tf.as_dtype(name).as_numpy_dtype)


def _storage_dtype(dtype):
    return np.dtype(f"uint{dtype.itemsize * 8}") if dtype.kind == "V" else dtype


def dataset(activations: np.ndarray, labels, batch_size, training, seed=0, min_steps=1):
    """Batches of ``(activation, label)`` in the same order as ``data.pipeline``.

    Shuffling indices with the same seed and buffer as the image pipeline shuffles
    the examples gives the same batches, so the cached and uncached paths see the
    same examples in the same order; a set smaller than ``min_steps`` batches is
    repeated as ``data.Task.train_dataset`` repeats it. Disk entries are gathered
    from their memory map batch by batch.
    """
    labels = np.asarray(labels)
    index = np.arange(len(labels))
    need = batch_size * min_steps
    if 0 < len(labels) < need:
        index = np.tile(index, -(-need // len(labels)))
    if isinstance(activations, np.memmap) or not isinstance(activations, np.ndarray):
        source = activations
        ds = tf.data.Dataset.from_tensor_slices((index, labels[index]))
    else:
        source = None
        ds = tf.data.Dataset.from_tensor_slices((activations[index], labels[index]))
    if training:
        ds = ds.shuffle(len(index), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if source is not None:
        storage = _storage_dtype(source.dtype)
        words = source.view(storage) if storage != source.dtype else source
        shape = source.shape[1:]
        tf_dtype = tf.as_dtype(source.dtype)

        def gather(index, label):
            rows = tf.numpy_function(
                lambda i: np.ascontiguousarray(words[i]), [index], tf.as_dtype(storage)
            )
            if tf.as_dtype(storage) != tf_dtype:
                rows = tf.bitcast(rows, tf_dtype)
            return tf.ensure_shape(rows, (None, *shape)), label

        ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
