"""Exact activation caching for frozen prefixes: exactness, fallback, spill, reuse."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY
from transfer_tf import cache, data, export, models, training


@pytest.fixture(scope="module")
def task(digits_source):
    return data.make_task(
        digits_source, (0, 1, 2, 3), data.DataConfig(train_per_class=60)
    )


@pytest.fixture(scope="module")
def source():
    return models.build_base_net((28, 28, 1), 4, seed=0, batch_norm=True, **TINY)


def config(**kw):
    values = dict(
        epochs=1,
        learning_rate=0.05,
        patience=0,
        tensorboard=False,
        verbose=0,
        precision="float32",
        seed=3,
    )
    values.update(kw)
    return training.TrainConfig(**values)


def test_frozen_cut_follows_trainable_flags_and_dropout(source):
    assert cache.frozen_cut(source)[0] == 0
    for n in (1, 3, 5, 6):
        net = models.transfer_net(source, n, 4, fine_tune=False)
        assert cache.frozen_cut(net) == (n, f"layers 1..{n} are frozen")
    frozen7 = models.transfer_net(source, 7, 4, fine_tune=False)
    n, reason = cache.frozen_cut(frozen7)
    assert n == 6 and "dropout" in reason  # fc6's dropout is random in training
    no_dropout = models.build_base_net((28, 28, 1), 4, dropout=0.0, **TINY)
    assert cache.frozen_cut(models.transfer_net(no_dropout, 7, 4))[0] == 7
    assert cache.frozen_cut(models.transfer_net(source, 4, 4, fine_tune=True))[0] == 0
    n, reason = cache.frozen_cut(models.transfer_net(source, 4, 4), augment="crop")
    assert n == 0 and "augmentation" in reason
    assert cache.boundary(frozen7, 2) == "conv2_pool"
    assert cache.boundary(frozen7, 6) == "fc6_relu"


def test_prefix_and_head_compose_to_the_net(source, task):
    net = models.transfer_net(source, 3, 4, fine_tune=False, seed=1)
    prefix, head = cache.split_at(net, 3)
    x = task.x_test[:32]
    np.testing.assert_array_equal(head(prefix(x)).numpy(), net(x).numpy())
    assert prefix.output.shape[1:] == net.get_layer("conv3_relu").output.shape[1:]


def _twin_nets(source, n, dtype="float32"):
    return [
        models.transfer_net(source, n, 4, fine_tune=False, seed=7, dtype=dtype)
        for _ in range(2)
    ]


# n=3 in the inner loop; n=7 (the cut below a dropout) in the full suite.
@pytest.mark.parametrize("n", [3, pytest.param(7, marks=pytest.mark.slow)])
def test_cached_training_equals_uncached_float32(source, task, tmp_path, n):
    cached, full = _twin_nets(source, n)
    np.testing.assert_array_equal(cached.get_weights()[-1], full.get_weights()[-1])
    a = training.train_task(cached, task, config(), tmp_path / "c", batch_size=32)
    b = training.train_task(
        full, task, config(activation_cache=False), tmp_path / "f", batch_size=32
    )
    assert a.path == "cached" and a.cached_layers == min(n, 6)
    assert b.path == "full" and b.path_reason == "activation_cache is off"
    for wa, wb in zip(cached.get_weights(), full.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=1e-5)
    assert a.test_accuracy == pytest.approx(b.test_accuracy, abs=1e-9)
    # The model that comes out is the whole net: its raw-image accuracy is reported.
    full_eval = training.evaluate(cached, task.eval_dataset("test"))
    assert full_eval["accuracy"] == pytest.approx(a.test_accuracy, abs=1e-9)


# bfloat16 is emulated on most CPUs: the full suite's.
@pytest.mark.slow
def test_cached_training_matches_in_bfloat16(source, task, tmp_path):
    cached, full = _twin_nets(source, 4, dtype="mixed_bfloat16")
    a = training.train_task(cached, task, config(epochs=2), tmp_path / "c")
    b = training.train_task(
        full, task, config(epochs=2, activation_cache=False), tmp_path / "f"
    )
    assert a.path == "cached"
    # bf16 kernels differ with batch composition: equal within a stated tolerance.
    assert abs(a.test_accuracy - b.test_accuracy) <= 0.02
    for wa, wb in zip(cached.get_weights(), full.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=0.05)


def test_fallback_paths_say_why(source, task, tmp_path):
    tuned = models.transfer_net(source, 3, 4, fine_tune=True)
    r = training.train_task(tuned, task, config(), tmp_path / "t")
    assert r.path == "full" and "conv1 is trainable" in r.path_reason
    frozen = models.transfer_net(source, 3, 4, fine_tune=False)
    r = training.train_task(frozen, task, config(), tmp_path / "a", augment="crop")
    assert r.path == "full" and "augmentation" in r.path_reason
    assert r.record()["path"] == "full" and "best_epoch" in r.record()


# Two trainings to compare; the disk round trip alone is tested below, fast.
@pytest.mark.slow
def test_disk_spill_gives_the_same_model(source, task, tmp_path):
    memory_net, disk_net = _twin_nets(source, 3)
    tiny_budget = cache.ActivationCache(
        memory_budget_bytes=1000, directory=tmp_path / "c"
    )
    a = training.train_task(
        disk_net, task, config(epochs=2), tmp_path / "d", cache=tiny_budget
    )
    b = training.train_task(memory_net, task, config(epochs=2), tmp_path / "m")
    assert a.cache_storage == "disk" and b.cache_storage == "memory"
    assert tiny_budget.stats["disk_entries"] == 1
    assert len(list((tmp_path / "c").rglob("train.npy"))) == 1
    for wa, wb in zip(disk_net.get_weights(), memory_net.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, atol=1e-5)
    with pytest.raises(ValueError, match="above the memory budget"):
        cache.ActivationCache(memory_budget_bytes=1000).get(
            cache.split_at(disk_net, 3)[0], task
        )


def test_disk_entries_round_trip_bfloat16(source, task, tmp_path):
    net = models.transfer_net(source, 2, 4, dtype="mixed_bfloat16")
    prefix, _ = cache.split_at(net, 2)
    on_disk = cache.ActivationCache(1000, tmp_path).get(prefix, task)
    in_memory = cache.ActivationCache().get(prefix, task)
    assert (
        on_disk.train.dtype
        == in_memory.train.dtype
        == np.dtype(tf.bfloat16.as_numpy_dtype)
    )
    np.testing.assert_array_equal(
        np.asarray(on_disk.validation).view(np.uint16),
        in_memory.validation.view(np.uint16),
    )
    again = cache.ActivationCache(1000, tmp_path).get(prefix, task)  # another process
    assert again.hit and again.storage == "disk"
    ds = cache.dataset(on_disk.train, task.y_train, 16, training=True, seed=1)
    reference = data.pipeline(in_memory.train, task.y_train, 16, True, seed=1)
    for (xa, ya), (xb, yb) in zip(ds.take(3), reference.take(3), strict=True):
        np.testing.assert_array_equal(ya, yb)  # same shuffled order
        np.testing.assert_array_equal(
            xa.numpy().view(np.uint16), xb.numpy().view(np.uint16)
        )


def test_one_cache_serves_every_run_with_the_same_prefix(source, task, tmp_path):
    shared = cache.ActivationCache()
    # A training fills the shared cache with its frozen prefix's activations...
    net = models.transfer_net(source, 3, 4, fine_tune=False, seed=0)
    result = training.train_task(net, task, config(), tmp_path / "s0", cache=shared)
    assert result.path == "cached"
    assert shared.stats == {"hits": 0, "misses": 1, "disk_entries": 0, "evictions": 0}
    # ... which another head on the same source's layers (another seed of AnB)
    # finds, while a prefix with other weights (random layers) does not.
    other_head = models.transfer_net(source, 3, 4, fine_tune=False, seed=1)
    hit = shared.get(cache.split_at(other_head, 3)[0], task)
    assert hit.hit and shared.stats["hits"] == 1
    other = models.random_frozen_net(source, 3, 4, seed=5)
    missed = shared.get(cache.split_at(other, 3)[0], task)
    assert not missed.hit and shared.stats["misses"] == 2
    assert not np.array_equal(missed.train, hit.train)


# A training and a SavedModel export: the full suite's.
@pytest.mark.slow
def test_cached_model_exports_whole(source, task, tmp_path):
    net = models.transfer_net(source, 5, 4, fine_tune=False, seed=2)
    r = training.train_task(net, task, config(), tmp_path / "run")
    assert r.path == "cached"
    export.export_model(net, tmp_path / "export")
    loaded = export.load_saved_model(tmp_path / "export")
    served = loaded.serve(task.x_test).numpy()
    accuracy = float(np.mean(served.argmax(1) == task.y_test))
    assert accuracy == pytest.approx(r.test_accuracy, abs=1e-6)
