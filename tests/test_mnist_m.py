"""mnist_m: the |patch - digit| blend, patches, determinism, the cache, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from transfer_tf import data, mnist_m


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def photos(tmp_path):
    """A tiny photo folder: random 32x32 RGB photos, one small grey one."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "ship"):
            for i in range(count):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                _save(root / split / name / f"{i}.png", image)
    _save(root / "train" / "cat" / "small.jpg", np.full((20, 12), 77, np.uint8))
    return root


@pytest.fixture
def digits():
    """12 train and 5 test synthetic 'digits' (a bright bar on black)."""
    rng = np.random.default_rng(1)

    def images(n):
        x = np.zeros((n, 28, 28, 1), np.uint8)
        x[:, 6:22, 12:16] = rng.integers(150, 256, (n, 1, 1, 1))
        return x

    return data.Source(
        name="digits",
        class_names=tuple(str(i) for i in range(10)),
        x_train=images(12),
        y_train=np.arange(12) % 10,
        x_test=images(5),
        y_test=np.arange(5),
    )


def _arrays(source):
    return [source.x_train, source.y_train, source.x_test, source.y_test]


def test_blend_is_the_absolute_difference_per_channel():
    digit = np.array([[[[0], [255]]]], np.uint8)  # (1, 1, 2, 1)
    patch = np.array([[[[10, 200, 255], [10, 200, 255]]]], np.uint8)
    out = mnist_m.blend(digit, patch)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[[[10, 200, 255], [245, 55, 0]]]])


def test_build_is_seeded_uint8_rgb_with_the_digits_labels(photos, digits, tmp_path):
    first = mnist_m.build(digits, photos, seed=0, cache_dir=tmp_path / "a")
    again = mnist_m.build(digits, photos, seed=0, cache_dir=tmp_path / "b")
    other = mnist_m.build(digits, photos, seed=1, cache_dir=tmp_path / "a")
    for a, b in zip(_arrays(first), _arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.x_train, other.x_train)
    assert first.x_train.shape == (12, 28, 28, 3) and first.x_test.shape == (
        5,
        28,
        28,
        3,
    )
    assert first.x_train.dtype == np.uint8 and first.image_shape == (28, 28, 3)
    np.testing.assert_array_equal(first.y_train, digits.y_train)
    np.testing.assert_array_equal(first.y_test, digits.y_test)
    assert first.class_names == digits.class_names
    # Colour: the three channels differ (the patches come from colour photos).
    assert np.abs(first.x_train[..., 0].astype(int) - first.x_train[..., 1]).mean() > 5
    assert first.name == f"mnist_m:{photos}"


def test_patches_come_from_the_photos(tmp_path, digits):
    """With one constant-colour photo per split the blend is exact."""
    root = tmp_path / "flat"
    _save(root / "train" / "a" / "0.png", np.full((40, 30, 3), (200, 100, 0), np.uint8))
    _save(root / "test" / "a" / "0.png", np.full((28, 28, 3), (0, 50, 250), np.uint8))
    out = mnist_m.build(digits, root, cache_dir=tmp_path / "cache")
    expected_train = np.abs(
        np.array([200, 100, 0], np.int16) - digits.x_train.astype(np.int16)
    )
    np.testing.assert_array_equal(out.x_train, expected_train)
    expected_test = np.abs(
        np.array([0, 50, 250], np.int16) - digits.x_test.astype(np.int16)
    )
    np.testing.assert_array_equal(out.x_test, expected_test)


def test_cut_patches_crops_large_and_enlarges_small_photos(photos):
    paths = [p for p, _ in mnist_m.list_images(photos, "train")]
    small = [p for p in paths if p.endswith("small.jpg")]
    patches = mnist_m.cut_patches(small, 4, (28, 28), np.random.default_rng(0))
    assert patches.shape == (4, 28, 28, 3)  # a 20x12 grey photo, enlarged to 28x28+
    assert np.all(np.abs(patches.astype(int) - 77) <= 2)  # grey -> equal channels
    big = [p for p in paths if p.endswith("0.png")]
    patches = mnist_m.cut_patches(big, 50, (28, 28), np.random.default_rng(0))
    photo = np.asarray(Image.open(big[0]))
    crops = {
        photo[y : y + 28, x : x + 28].tobytes() for y in range(5) for x in range(5)
    }
    from_first = [p for p in patches if p.tobytes() in crops]
    assert from_first and len({p.tobytes() for p in from_first}) > 1  # positions vary


def test_cache_returns_identical_arrays_without_rebuilding(
    photos, digits, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    built = mnist_m.build(digits, photos, cache_dir=cache)
    (archive,) = cache.iterdir()  # one .npz, no temporary file left behind
    assert archive.suffix == ".npz"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached MNIST-M was rebuilt")

    monkeypatch.setattr(mnist_m, "cut_patches", no_rebuild)
    cached = mnist_m.build(digits, photos, cache_dir=cache)
    for a, b in zip(_arrays(built), _arrays(cached), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    monkeypatch.undo()

    # Another seed, other digits or other photos: another cache file.
    mnist_m.build(digits, photos, seed=5, cache_dir=cache)
    _save(photos / "test" / "ship" / "new.png", np.zeros((32, 32, 3), np.uint8))
    mnist_m.build(digits, photos, cache_dir=cache)
    assert len(list(cache.iterdir())) == 3


def test_a_corrupt_cache_file_is_rebuilt(photos, digits, tmp_path):
    cache = tmp_path / "cache"
    built = mnist_m.build(digits, photos, cache_dir=cache)
    (archive,) = cache.iterdir()
    archive.write_bytes(archive.read_bytes()[:1000])  # as if killed mid-write
    rebuilt = mnist_m.build(digits, photos, cache_dir=cache)
    np.testing.assert_array_equal(built.x_train, rebuilt.x_train)
    np.testing.assert_array_equal(
        rebuilt.x_test, mnist_m.build(digits, photos, cache_dir=cache).x_test
    )


def test_load_spec_uses_the_digits_and_the_cache_dir(
    photos, digits, tmp_path, monkeypatch
):
    monkeypatch.setenv(mnist_m.CACHE_ENV, str(tmp_path / "env_cache"))
    spec = f"mnist_m:{photos}"
    source = mnist_m.load(spec, lambda: digits)
    assert source.name == spec and source.image_shape == (28, 28, 3)
    assert len(list((tmp_path / "env_cache").glob("mnist_m_*.npz"))) == 1
    direct = mnist_m.build(digits, photos, cache_dir=tmp_path / "other")
    np.testing.assert_array_equal(source.x_train, direct.x_train)


def test_errors_name_the_path(tmp_path, digits):
    def no_digits():
        raise AssertionError("the digits were loaded before the folder was checked")

    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere.*does not exist"):
        mnist_m.load(f"mnist_m:{missing}", no_digits)
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test").mkdir()
    (empty / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty/train.*holds no"):
        mnist_m.build(digits, empty, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="no 'train' directory"):
        mnist_m.build(digits, empty / "train", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="expected 'mnist_m:FOLDER'"):
        mnist_m.load("mnist_m", no_digits)
    broken = tmp_path / "broken"
    _save(broken / "test" / "a" / "0.png", np.zeros((32, 32, 3), np.uint8))
    (broken / "train" / "a").mkdir(parents=True)
    (broken / "train" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="unreadable image file.*bad.jpg"):
        mnist_m.build(digits, broken, cache_dir=tmp_path / "cache")


def test_as_rgb_replicates_grey_channels(digits):
    rgb = mnist_m.as_rgb(digits)
    assert rgb.image_shape == (28, 28, 3)
    np.testing.assert_array_equal(rgb.x_train[..., 2], digits.x_train[..., 0])
    assert mnist_m.as_rgb(rgb) is rgb
