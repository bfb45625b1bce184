"""Image domains derived from a dataset.

A derived domain keeps a dataset's classes and labels and changes its images in a
controlled way, so that a transfer experiment can ask which property of the images
a pre-trained net relies on. Every derivation here is

- a pure, seeded function of uint8 images ``(N, H, W, C)`` (or ``(N, H, W)``)
  returning new images of the same shape and dtype, and
- a ``*_source`` wrapper that applies it to a :class:`data.Source`'s train and test
  splits and names the result, so a study can carve tasks out of it as out of any
  other source.

Block shuffling
---------------
Neyshabur, Sedghi and Zhang (2020), *What is being transferred in transfer
learning?*, separate feature reuse from low-level statistics by cutting every image
into ``b x b`` blocks and permuting the blocks: small blocks destroy the visual
features a pre-trained net could reuse but keep the pixels' statistics. As in the
authors' code (``RandomBlockShuffle``: one permutation drawn from the seed when the
transform is built and applied to every image, training and test alike), one
permutation of block positions is drawn per seed and applied to every image, so the
shuffled domain is a fixed rearrangement that a net can learn. ``per_image=True``
draws a permutation per image instead. A pixel keeps its channels: ``b = 1``
permutes pixel positions, not individual channel values. Block sizes must divide
both the height and the width (:func:`valid_block_sizes`); others are rejected
rather than padded or cropped, which would change the image size or drop pixels.

Domain pairs
------------
:func:`load_pair` makes two datasets one adaptation problem (Ganin & Lempitsky
2015's MNIST -> MNIST-M, say): one image size (the target resized to the
source's), one channel count (grey replicated to RGB), one class order (the
target's labels re-indexed to the source's), a labelled target task and an
unlabelled sample of the target's training images. :func:`domain_name` and
:func:`pair_name` name them in keys, tables and files.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import numpy as np

from transfer_tf import data, mnist_m

log = logging.getLogger(__name__)

# Fixed: every run of a pair sees the same unlabelled target images.
UNLABELLED_SEED = 20150526

# ------------------------------------------------------------------ block shuffling


def valid_block_sizes(height: int, width: int) -> tuple[int, ...]:
    """Block sizes that tile a ``height x width`` image: common divisors, ascending.

    The largest, ``gcd(height, width)`` (the image size for a square image), is a
    single block for a square image: no shuffling. 1 shuffles pixels.
    """
    height, width = int(height), int(width)
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} must be positive")
    return tuple(
        b for b in range(1, min(height, width) + 1) if not height % b and not width % b
    )


def _check_block_size(block_size, height: int, width: int) -> int:
    valid = valid_block_sizes(height, width)
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer):
        raise ValueError(
            f"block_size={block_size!r} must be an integer; choose one of {list(valid)}"
        )
    if int(block_size) not in valid:
        raise ValueError(
            f"block_size={block_size!r} does not tile {height}x{width} images; choose "
            f"one of {list(valid)}"
        )
    return int(block_size)


def block_shuffle(
    images, block_size: int, seed=0, per_image: bool = False
) -> np.ndarray:
    """Cuts every image into ``block_size`` squares and permutes them.

    Args:
      images: ``(N, H, W, C)`` or ``(N, H, W)`` images (uint8 in this project;
        any dtype works).
      block_size: side of the square blocks; must divide H and W (see
        :func:`valid_block_sizes`). 1 permutes pixels (each keeps its channels);
        a block the size of a square image leaves it unchanged.
      seed: anything ``numpy.random.default_rng`` takes (an int or a sequence of
        ints). The same seed gives the same result on every machine.
      per_image: ``False`` (the paper's choice): one permutation of block
        positions, drawn from ``seed``, for every image, so applying the same
        seed to the training and the test split gives one consistent domain.
        ``True``: each image gets its own permutation, the i-th drawn i-th from
        ``seed`` (so image i's does not depend on how many images follow it).

    Returns:
      A new array of the same shape and dtype; output block j is input block
      ``permutation[j]`` (blocks numbered row by row).

    Raises:
      ValueError: images that are not ``(N, H, W[, C])``, or a block size that
        does not divide the image size (naming the valid ones).
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(
            f"images have shape {images.shape}; expected (N, H, W, C) or (N, H, W)"
        )
    squeeze = images.ndim == 3
    x = images[..., None] if squeeze else images
    n, height, width, channels = x.shape
    b = _check_block_size(block_size, height, width)
    rows, cols = height // b, width // b
    num_blocks = rows * cols
    blocks = (
        x.reshape(n, rows, b, cols, b, channels)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, num_blocks, b, b, channels)
    )
    rng = np.random.default_rng(seed)
    if per_image:
        order = np.zeros((n, num_blocks), dtype=np.int64)
        for i in range(n):
            order[i] = rng.permutation(num_blocks)
        blocks = np.take_along_axis(blocks, order[:, :, None, None, None], axis=1)
    else:
        blocks = blocks[:, rng.permutation(num_blocks)]
    out = (
        blocks.reshape(n, rows, cols, b, b, channels)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, height, width, channels)
    )
    return out[..., 0] if squeeze else out


def block_shuffle_source(
    source: data.Source, block_size: int, seed: int = 0, per_image: bool = False
) -> data.Source:
    """A source whose train and test images are block-shuffled (labels unchanged).

    Args:
      source: the decoded dataset.
      block_size, per_image: see :func:`block_shuffle`.
      seed: with ``per_image=False``, training and test images share the one
        permutation drawn from it; with ``per_image=True`` they draw their
        per-image permutations from independent streams of it.

    Returns:
      A ``data.Source`` named ``<name>/block_shuffle_b<b>_seed<seed>`` (plus
      ``_per_image``).
    """
    if per_image:
        train_seed, test_seed = (seed, 0), (seed, 1)
    else:
        train_seed = test_seed = seed
    suffix = "_per_image" if per_image else ""
    return dataclasses.replace(
        source,
        name=f"{source.name}/block_shuffle_b{block_size}_seed{seed}{suffix}",
        x_train=block_shuffle(source.x_train, block_size, train_seed, per_image),
        x_test=block_shuffle(source.x_test, block_size, test_seed, per_image),
    )


def block_shuffle_task(task: data.Task, block: int | None, seed: int) -> data.Task:
    """A ``data.Task`` with every image block-shuffled by the one permutation
    that ``seed`` draws (the same for training, validation and test images);
    ``block=None``: the task itself."""
    if block is None:
        return task
    return dataclasses.replace(
        task,
        name=f"{task.name}/b{block}",
        x_train=block_shuffle(task.x_train, block, seed),
        x_validation=block_shuffle(task.x_validation, block, seed),
        x_test=block_shuffle(task.x_test, block, seed),
    )


# --------------------------------------------------------------------- domain pairs


def domain_name(spec: str) -> str:
    """A short name of a data spec for keys, tables and file names: ``digits``,
    ``mnist_m``, ``folder_<last path part>``, ``npz_<file stem>``, the TFDS
    name."""
    kind, _, argument = spec.partition(":")
    if not argument:
        return kind
    if kind == mnist_m.SPEC_PREFIX:
        return kind
    if kind == "tfds":
        return argument.replace("/", "_")
    path = pathlib.PurePath(argument.rstrip("/"))
    return f"{kind}_{path.stem if kind == 'npz' else path.name}"


def pair_name(source: str, target: str) -> str:
    """``digits_to_uci_digits``: how a pair appears in keys, tables and files."""
    return f"{domain_name(source)}_to_{domain_name(target)}"


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two domains of one shape and class list.

    Attributes:
      name: :func:`pair_name`.
      source: the labelled source task (train / validation / test).
      target: the labelled target task: the oracle's training data, and the
        validation and test splits ``adaptation.TargetScores`` reads. Its training
        split keeps ``train_per_class`` images of each class (chosen by label).
      target_images: the unlabelled target training images the adaptation
        arms and DEV see: a seeded random sample of the target's training
        split, as many as ``target`` has, drawn without looking at a label.
    """

    name: str
    source: data.Task
    target: data.Task
    target_images: np.ndarray


def align_classes(source: data.Source, target: data.Source) -> data.Source:
    """``target`` with its labels re-indexed to the source's class order."""
    if tuple(source.class_names) == tuple(target.class_names):
        return target
    if sorted(source.class_names) != sorted(target.class_names):
        only_source = sorted(set(source.class_names) - set(target.class_names))
        only_target = sorted(set(target.class_names) - set(source.class_names))
        raise ValueError(
            f"domains {source.name} and {target.name} must have the same classes "
            f"(only in the source: {only_source[:10]}; only in the target: "
            f"{only_target[:10]})"
        )
    order = np.array([source.class_names.index(c) for c in target.class_names])
    return dataclasses.replace(
        target,
        class_names=tuple(source.class_names),
        y_train=order[target.y_train],
        y_test=order[target.y_test],
    )


def load_pair(source_spec: str, target_spec: str, config: data.DataConfig) -> Pair:
    """Loads two domains and makes them agree (see the module docstring): one
    image size, one channel count, one class order.

    Raises:
      ValueError: a bad spec (from ``data.load_source``) or different classes.
    """
    source = data.load_source(dataclasses.replace(config, dataset=source_spec))
    target = data.load_source(dataclasses.replace(config, dataset=target_spec))
    size = tuple(source.image_shape[:2])
    if tuple(target.image_shape[:2]) != size:
        log.info("%s: resizing its images to the source's %s", target_spec, size)
        target = data.load_source(
            dataclasses.replace(config, dataset=target_spec, image_size=size)
        )
    if source.image_shape[-1] != target.image_shape[-1]:
        # Grey to RGB loses nothing; RGB to grey would drop MNIST-M's colours.
        source, target = mnist_m.as_rgb(source), mnist_m.as_rgb(target)
    target = align_classes(source, target)
    classes = range(source.num_classes)
    every = data.make_task(
        target,
        classes,
        dataclasses.replace(config, train_per_class=None),
        name=f"target {target_spec}",
    )
    labelled = every.subset(config.train_per_class, config.subset_seed)
    rng = np.random.default_rng(UNLABELLED_SEED)
    unlabelled = data.sample_indices(len(every.x_train), len(labelled.x_train), rng)
    return Pair(
        pair_name(source_spec, target_spec),
        data.make_task(source, classes, config, name=f"source {source_spec}"),
        labelled,
        every.x_train[unlabelled],
    )
