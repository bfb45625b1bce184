"""Derived image domains: block shuffling."""

from __future__ import annotations

import numpy as np
import pytest

from transfer_tf import data, domains


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)


def position_image(height=8, width=8, count=1):
    """Images whose pixel values are their row-major positions (int32: a 28x28
    image has more positions than uint8 values; block_shuffle takes any dtype)."""
    grid = np.arange(height * width, dtype=np.int32).reshape(1, height, width, 1)
    return np.repeat(grid, count, axis=0)


def test_valid_block_sizes_are_the_common_divisors():
    assert domains.valid_block_sizes(28, 28) == (1, 2, 4, 7, 14, 28)
    assert domains.valid_block_sizes(32, 48) == (1, 2, 4, 8, 16)


def test_a_block_the_size_of_the_image_is_the_identity(images):
    out = domains.block_shuffle(images, 28, seed=3)
    np.testing.assert_array_equal(out, images)
    assert out is not images and out.dtype == np.uint8


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_block_shuffle_permutes_each_images_blocks(images, block_size, per_image):
    out = domains.block_shuffle(images, block_size, seed=0, per_image=per_image)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert not np.array_equal(out, images)

    def blocks(x):
        b = block_size
        n, h, w, c = x.shape
        grid = x.reshape(n, h // b, b, w // b, b, c).transpose(0, 1, 3, 2, 4, 5)
        return grid.reshape(n, -1, b * b * c)

    # Every image holds the same blocks as before, in another order (so also the
    # same multiset of pixels), and each pixel keeps its channels.
    for before, after in zip(blocks(images), blocks(out), strict=True):
        assert sorted(map(bytes, before)) == sorted(map(bytes, after))
    pixels = [sorted(map(bytes, x.reshape(-1, 3))) for x in (images, out)]
    assert pixels[0] == pixels[1]


def test_block_shuffle_is_deterministic_per_seed_and_differs_across_seeds(images):
    first = domains.block_shuffle(images, 7, seed=5)
    np.testing.assert_array_equal(first, domains.block_shuffle(images, 7, seed=5))
    assert not np.array_equal(first, domains.block_shuffle(images, 7, seed=6))


def test_one_permutation_for_all_images_or_one_per_image():
    grid = position_image(count=4)
    shared = domains.block_shuffle(grid, 2, seed=0)
    assert all(np.array_equal(shared[0], s) for s in shared)
    # Output block j is input block perm[j]: top-left pixels of the 16 blocks.
    perm = np.random.default_rng(0).permutation(16)
    top_left = shared[0, ::2, ::2, 0].ravel()
    np.testing.assert_array_equal(top_left, (perm // 4) * 16 + (perm % 4) * 2)

    own = domains.block_shuffle(grid, 2, seed=0, per_image=True)
    assert len({own[i].tobytes() for i in range(4)}) == 4
    # Image i's permutation does not depend on how many images follow it.
    np.testing.assert_array_equal(
        domains.block_shuffle(grid[:2], 2, seed=0, per_image=True), own[:2]
    )


def test_block_shuffle_accepts_images_without_a_channel_axis(images):
    gray = images[..., 0]
    out = domains.block_shuffle(gray, 4, seed=1)
    np.testing.assert_array_equal(
        out, domains.block_shuffle(gray[..., None], 4, seed=1)[..., 0]
    )


def test_block_sizes_that_do_not_tile_the_image_are_rejected(images):
    with pytest.raises(
        ValueError, match=r"block_size=5 .*28x28.*\[1, 2, 4, 7, 14, 28\]"
    ):
        domains.block_shuffle(images, 5, seed=0)
    with pytest.raises(ValueError, match="must be an integer"):
        domains.block_shuffle(images, 2.0, seed=0)
    with pytest.raises(ValueError, match=r"expected \(N, H, W, C\)"):
        domains.block_shuffle(images[0, :, :, 0], 4, seed=0)


def test_block_shuffle_source_uses_one_permutation_for_train_and_test():
    grid = position_image(28, 28)
    grid = np.concatenate([grid, 1000 - grid])
    source = data.Source(
        "grid", ("a", "b"), grid, np.array([0, 1]), grid[::-1].copy(), np.array([1, 0])
    )
    shuffled = domains.block_shuffle_source(source, 7, seed=2)
    assert shuffled.name == "grid/block_shuffle_b7_seed2"
    np.testing.assert_array_equal(shuffled.x_train, shuffled.x_test[::-1])
    np.testing.assert_array_equal(shuffled.y_train, source.y_train)
    np.testing.assert_array_equal(shuffled.x_train, domains.block_shuffle(grid, 7, 2))
    own = domains.block_shuffle_source(source, 7, seed=2, per_image=True)
    assert own.name.endswith("_per_image")
    assert not np.array_equal(own.x_train, own.x_test[::-1])
