"""MNIST-M: MNIST digits blended over colour photo patches (Ganin & Lempitsky 2015).

The target domain of the classic MNIST -> MNIST-M adaptation benchmark, built the
way its authors built it: every digit is combined with a patch cut at a random
position from a random colour photograph, ``output = |patch - digit|`` per channel
(the grey digit replicated to three channels), so the strokes invert the photo's
colours and the background keeps them.

Here the digits are the project's ``digits`` source (``data.load_source`` of
``DataConfig(dataset="digits")``, train and test splits) and the photos come from
an image folder ``FOLDER/{train,test}/<class>/*.{jpg,jpeg,png}`` (any images below
``FOLDER/train`` and ``FOLDER/test``; classes are ignored): train digits get
patches from ``FOLDER/train``, test digits from ``FOLDER/test``, so no photo is
shared between the splits. Ganin & Lempitsky cut from BSDS500 photos;
``/work/shared/data/cifar10`` (32x32) is a convenient stand-in.

Patches have the digit's size (28x28). A photo at least that large is cropped at a
uniformly random position (a 32x32 CIFAR image has 5x5 possible positions); a
smaller one is first enlarged (bilinear, keeping its aspect ratio) until it
covers the patch. Grey photos are converted to RGB.

The result depends only on the digits, the folder's images and the seed, and is
cached in ``<cache dir>/mnist_m_<key>.npz`` (cache dir:
``$TRANSFER_TF_MNIST_M_CACHE``, else ``~/.cache/transfer_tf/mnist_m``), keyed by a
hash of the digits, the folder's file list and sizes, the seed and the recipe's
version; it is written to a temporary file and renamed, so a killed build never
leaves a truncated archive, and a corrupt one is rebuilt.

The spec ``mnist_m:FOLDER`` names it (:func:`load`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import numpy as np

log = logging.getLogger(__name__)

SPEC_PREFIX = "mnist_m"
CACHE_ENV = "TRANSFER_TF_MNIST_M_CACHE"
# Fixed like data.HOLDOUT_SEED: every run sees the same MNIST-M.
SEED = 20150527
EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test")
# Part of the cache key: bump it when the recipe changes.
RECIPE_VERSION = 1


def default_cache_dir() -> pathlib.Path:
    """``$TRANSFER_TF_MNIST_M_CACHE``, else ``~/.cache/transfer_tf/mnist_m``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path("~/.cache/transfer_tf/mnist_m").expanduser()


def list_images(folder, split: str) -> list[tuple[str, int]]:
    """Sorted ``(path, size in bytes)`` of the images below ``folder/split``.

    Raises:
      ValueError: the folder or the split directory is missing, or it holds no
        images, naming the path.
    """
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"MNIST-M photo folder {str(folder)!r} does not exist")
    split_dir = folder / split
    if not split_dir.is_dir():
        raise ValueError(
            f"MNIST-M photo folder {str(folder)!r} has no {split!r} directory "
            f"(expected {str(split_dir)!r}/<class>/*.jpg)"
        )
    images = []
    for root, _, files in os.walk(split_dir):
        for file in files:
            if os.path.splitext(file)[1].lower() in EXTENSIONS:
                path = os.path.join(root, file)
                images.append((path, os.stat(path).st_size))
    if not images:
        raise ValueError(
            f"MNIST-M photo folder {str(split_dir)!r} holds no "
            f"{'/'.join(EXTENSIONS)} images"
        )
    return sorted(images)


def _scan_folder(folder) -> dict:
    return {split: list_images(folder, split) for split in SPLITS}


def folder_fingerprint(folder, images=None) -> str:
    """A hash of the relative paths and sizes of both splits' images (``images``:
    ``{split: list_images(folder, split)}`` if already listed)."""
    folder = pathlib.Path(folder).expanduser()
    images = images or _scan_folder(folder)
    digest = hashlib.sha256()
    for split in SPLITS:
        for path, size in images[split]:
            relative = pathlib.Path(os.path.relpath(path, folder)).as_posix()
            digest.update(f"{relative}\0{size}\n".encode())
    return digest.hexdigest()


def _open_rgb(path, height, width):
    """A photo as uint8 RGB, enlarged (aspect kept) if smaller than the patch."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = max(height / image.height, width / image.width)
            if scale > 1:
                size = (
                    max(width, int(np.ceil(image.width * scale))),
                    max(height, int(np.ceil(image.height * scale))),
                )
                image = image.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"MNIST-M: unreadable image file {str(path)!r}: {e}") from e


def cut_patches(paths, count: int, size, rng: np.random.Generator) -> np.ndarray:
    """``count`` RGB patches of ``size = (height, width)`` from random photos.

    Each patch comes from a photo drawn uniformly from ``paths`` at a uniformly
    random position. Each photo is decoded once, however many patches it gives.

    Returns:
      uint8 ``(count, height, width, 3)``.
    """
    height, width = (int(s) for s in size)
    choice = rng.integers(len(paths), size=count)
    position = rng.random((count, 2))
    patches = np.empty((count, height, width, 3), dtype=np.uint8)
    order = np.argsort(choice, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(choice[order]) != 0])
    for group in np.split(order, starts[1:]):
        photo = _open_rgb(paths[choice[group[0]]], height, width)
        free_y, free_x = photo.shape[0] - height + 1, photo.shape[1] - width + 1
        for i in group:
            top = min(int(position[i, 0] * free_y), free_y - 1)
            left = min(int(position[i, 1] * free_x), free_x - 1)
            patches[i] = photo[top : top + height, left : left + width]
    return patches


def blend(digits: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """``|patch - digit|`` per channel, uint8; grey digits are used in every
    channel."""
    digits = np.asarray(digits, dtype=np.int16)
    if digits.ndim == 3:
        digits = digits[..., None]
    return np.abs(np.asarray(patches, dtype=np.int16) - digits).astype(np.uint8)


def _digits_key(digits) -> str:
    digest = hashlib.sha256()
    for array in (digits.x_train, digits.y_train, digits.x_test, digits.y_test):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    digest.update(json.dumps(list(digits.class_names)).encode())
    return digest.hexdigest()


def cache_path(digits, fingerprint: str, seed: int, cache_dir=None):
    """Where :func:`build` keeps the MNIST-M of these digits, photos
    (:func:`folder_fingerprint`) and seed."""
    key = json.dumps(
        {
            "recipe": RECIPE_VERSION,
            "digits": _digits_key(digits),
            "folder": fingerprint,
            "seed": int(seed),
        },
        sort_keys=True,
    )
    name = f"mnist_m_{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    return pathlib.Path(cache_dir or default_cache_dir()).expanduser() / name


def _read_cache(path):
    keys = ("x_train", "y_train", "x_test", "y_test", "class_names")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in keys}
    except FileNotFoundError:
        return None
    except Exception as e:  # a corrupt archive fails as BadZipFile, OSError, ...
        log.warning("rebuilding MNIST-M: unreadable cache file %s (%s)", path, e)
        return None


def _write_cache(path, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def build(digits, folder, seed: int = SEED, cache_dir=None, name=None):
    """MNIST-M from ``digits`` and the photos in ``folder`` (cached on disk).

    Args:
      digits: a ``data.Source`` of grey digits, uint8 ``(N, H, W, 1)``, both
        splits.
      folder: ``FOLDER/{train,test}/...`` photos.
      seed: seeds the choice of photos and positions (train and test draw from
        separate streams).
      cache_dir: where the ``.npz`` goes (default :func:`default_cache_dir`).
      name: the Source's name (default ``mnist_m:FOLDER``).

    Returns:
      A Source with uint8 RGB images ``(N, H, W, 3)`` and the digits' labels and
      class names.

    Raises:
      ValueError: a missing folder or split directory, a split without images, an
        unreadable image, naming the path.
    """
    return _build(digits, folder, _scan_folder(folder), seed, cache_dir, name)


def _build(digits, folder, images, seed, cache_dir, name):
    folder = pathlib.Path(folder).expanduser()
    name = name or f"{SPEC_PREFIX}:{folder}"
    path = cache_path(digits, folder_fingerprint(folder, images), seed, cache_dir)
    arrays = _read_cache(path)
    if arrays is None:
        log.info("building MNIST-M from %s into %s", folder, path)
        arrays = {"class_names": np.array(digits.class_names)}
        for index, split in enumerate(SPLITS):
            x = np.asarray(getattr(digits, f"x_{split}"))
            paths = [p for p, _ in images[split]]
            rng = np.random.default_rng([int(seed), index])
            arrays[f"x_{split}"] = blend(
                x, cut_patches(paths, len(x), x.shape[1:3], rng)
            )
            arrays[f"y_{split}"] = np.asarray(getattr(digits, f"y_{split}"))
        _write_cache(path, arrays)
    return dataclasses.replace(
        digits,
        name=name,
        class_names=tuple(str(c) for c in arrays["class_names"].tolist()),
        x_train=arrays["x_train"],
        y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"],
        y_test=arrays["y_test"].astype(np.int64),
    )


def load(spec: str, digits):
    """The dataset spec ``mnist_m:FOLDER`` (see the module docstring), built on
    the grey digits that ``digits()`` returns (``data`` passes its ``digits``
    source; called only once the folder has been checked). ``data.load_source``
    applies ``image_size`` afterwards like for every source.

    Raises:
      ValueError: a malformed spec, a missing folder or split directory, or a
        split without images, naming the path.
    """
    kind, _, folder = spec.partition(":")
    if kind != SPEC_PREFIX or not folder:
        raise ValueError(
            f"{spec!r} is not an MNIST-M spec; expected '{SPEC_PREFIX}:FOLDER' with "
            "FOLDER/{train,test}/<class>/*.jpg photos"
        )
    images = _scan_folder(folder)  # a bad folder fails before the digits load
    return _build(digits(), folder, images, SEED, None, spec)


def as_rgb(source):
    """A grey Source with its channel replicated three times (MNIST as a source
    domain for MNIST-M, whose images are RGB); RGB sources are returned as is."""
    if source.image_shape[-1] == 3:
        return source
    return dataclasses.replace(
        source,
        x_train=np.repeat(source.x_train, 3, axis=-1),
        x_test=np.repeat(source.x_test, 3, axis=-1),
    )
