"""The advisor (transfer_tf/studies/advisor.py, experiments/advise.py): sources of every
kind, a net saved at another input size on a folder of mixed image sizes, the
time budget's skips, the ranking and the confidence on planted inputs, the
export, and bad inputs as one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import (
    TINY,
    fake_grid,
    make_image_folder,
    run_main,
    run_script,
    write_image,
)
from transfer_tf import (
    backbones,
    data,
    export,
    heads,
    models,
    results,
    training,
)
from transfer_tf.studies import advisor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of 32x32 RGB images, plus train images of 40x36 and 24x24."""
    root = make_image_folder(
        tmp_path_factory.mktemp("mixed") / "folder", per_class=(12, 4)
    )
    rng = np.random.default_rng(1)
    for i in range(3):
        big = rng.integers(0, 60, (40, 36, 3))
        write_image(root / "train" / "cat" / f"big{i}.png", big)
        small = rng.integers(80, 140, (24, 24, 3))
        write_image(root / "train" / "dog" / f"small{i}.png", small)
    return root


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    """A tiny base net saved at 28x28x1: another size and channel count than
    the folder's 32x32x3 images."""
    path = tmp_path_factory.mktemp("net") / "digits_net.keras"
    models.build_base_net((28, 28, 1), 5, seed=0, **TINY).save(path)
    return path


def config(folder, sources, **changes) -> advisor.Config:
    """A few seconds of advice: tiny probes and trainings."""
    base = advisor.Config(
        data=data.DataConfig(
            dataset=f"folder:{folder}", batch_size=16, validation_fraction=0.25
        ),
        training=training.plateau(
            epochs=3, min_epochs=1, select_initial=True, tensorboard=False
        ),
        probe=heads.ProbeConfig(l2_grid=(0.0, 1e-2), epochs=5, patience=2),
        sources=tuple(str(s) for s in sources),
        labels_per_class=6,
        seeds=(0,),
        strategies=("freeze", "fine_tune"),
        layers=("conv2", "fc6"),
        top_candidates=2,
        min_epoch_steps=2,
    )
    return dataclasses.replace(base, **changes)


def test_a_folder_of_mixed_sizes_loads_at_one_size(folder):
    task = advisor.load_target(config(folder, ["x"]))
    assert task.image_shape == (32, 32, 3)  # the first image's size
    assert len(task.y_train) + len(task.y_validation) == 3 * 12 + 6
    resized = advisor.load_target(
        config(
            folder, ["x"], data=data.DataConfig(f"folder:{folder}", image_size=(20, 24))
        )
    )
    assert resized.image_shape == (20, 24, 3)


def test_a_net_of_another_input_size_takes_the_targets_images(small_net):
    net = export.load_keras_model(small_net)
    gray = np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1)).astype(np.uint8)
    # Channels: an RGB image of three equal channels is the gray image.
    adapted, note = advisor.adapt_input(net, (28, 28, 3))
    assert "3 channel(s) mapped to 1" in note and "resized" not in note
    rgb = np.repeat(gray, 3, axis=-1)
    np.testing.assert_allclose(
        adapted.predict(rgb, verbose=0), net.predict(gray, verbose=0), atol=1e-4
    )
    # Size: a 56x56 image is resized to the net's 28x28 in front of it.
    adapted, note = advisor.adapt_input(net, (56, 56, 1))
    assert note == "resized 56x56 to 28x28"
    big = np.repeat(np.repeat(gray, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(
        adapted.predict(big, verbose=0), net.predict(gray, verbose=0), atol=0.05
    )
    # Its layers keep their names and weights; the original net is untouched.
    copied, original = (models.layer_weights(m, 8) for m in (adapted, net))
    assert copied.keys() == original.keys()
    for key, weights in original.items():
        np.testing.assert_array_equal(copied[key], weights)
    assert tuple(net.input_shape[1:]) == (28, 28, 1)
    # A transfer net built from it gets the adapter's weights back.
    adapted, _ = advisor.adapt_input(net, (32, 32, 3))
    built = models.transfer_net(adapted, 3, 4, input_shape=(32, 32, 3))
    advisor.copy_adapter(adapted, built)
    np.testing.assert_array_equal(
        built.get_layer("adapt_channels").get_weights()[0],
        adapted.get_layer("adapt_channels").get_weights()[0],
    )
    assert not built.get_layer("adapt_channels").trainable


@pytest.fixture(scope="module")
def advice(folder, small_net, tmp_path_factory):
    """One advice on the mixed folder from the 28x28x1 net (one seed)."""
    workdir = tmp_path_factory.mktemp("advice") / "work"
    made = advisor.advise(config(folder, [small_net]), workdir)
    paths = advisor.write_report(made, workdir)
    return made, paths, workdir


def test_the_advice_ranks_checks_recommends_and_exports(advice, folder):
    made, paths, workdir = advice
    ranked = made["stage1"]["candidates"]
    assert [c["layer"] for c in ranked] in (["conv2", "fc6"], ["fc6", "conv2"])
    assert [c["rank"] for c in ranked] == [1, 2]
    for c in ranked:
        assert set(c["scores"]) == {"logme", "h_score"}
        assert all(np.isfinite(v) for v in c["scores"].values())
        assert c["seconds"] > 0
    runs = made["stage2"]["runs"]
    kinds = [(r["kind"], r["strategy"]) for r in runs]
    # Scarce labels: freeze before fine-tuning (strategy_order).
    assert kinds == [
        ("probe", None),
        ("probe", None),
        ("strategy", "freeze"),
        ("strategy", "fine_tune"),
    ]
    assert made["stage2"]["skipped"] == []
    best_probe = max(
        (r for r in runs if r["kind"] == "probe"),
        key=lambda r: (r["val_accuracy"], -r["val_loss"]),
    )
    check = made["stage1_check"]
    assert check["best_probe"] == best_probe["option"]
    assert check["agrees"] == (best_probe["stage1_rank"] == 1)
    assert check["statement"] in (workdir / advisor.REPORT_FILE).read_text()
    freeze = next(r for r in runs if r["strategy"] == "freeze")
    assert freeze["layer"] == best_probe["layer"]  # frozen at the probe's layer
    pick = made["recommendation"]
    best = max(r["val_accuracy"] for r in runs)
    assert pick["val_accuracy"] == best  # validation decides, never test
    assert made["confidence"]["level"] in (
        "clear",
        "likely",
        "cannot tell apart",
    )
    # The files, and the JSON holds what the report says.
    text = (workdir / advisor.REPORT_FILE).read_text()
    assert pick["option"] in text and made["confidence"]["statement"] in text
    assert json.loads((workdir / advisor.JSON_FILE).read_text())["options"]
    assert (workdir / advisor.FIGURE_FILE).stat().st_size > 1000
    # The export reloads, takes the folder's raw images and predicts as the
    # kept run measured: its validation accuracy, recomputed.
    task = advisor.load_target(config(folder, ["x"]))
    model = export.load_keras_model(workdir / advisor.MODEL_DIR)
    logits = model.predict(task.x_validation, verbose=0)
    accuracy = float(np.mean(logits.argmax(1) == task.y_validation))
    kept = [r for r in runs if r["option"] == pick["option"]]
    assert accuracy == pytest.approx(max(r["val_accuracy"] for r in kept), abs=1e-6)
    served = export.load_saved_model(workdir / advisor.MODEL_DIR)
    np.testing.assert_allclose(
        np.asarray(served.serve(task.x_validation)), logits, atol=1e-4
    )


def test_an_exported_model_is_a_source_and_so_is_its_bare_saved_model(
    advice, folder, tmp_path
):
    import shutil

    _, _, workdir = advice
    cfg = config(folder, ["x"])
    (source,) = advisor.load_source(str(workdir / advisor.MODEL_DIR), (32, 32, 3), cfg)
    assert source.name == "model/model.keras"
    bare = tmp_path / "bare"
    shutil.copytree(workdir / advisor.MODEL_DIR / export.SAVED_MODEL_DIR, bare)
    (source,) = advisor.load_source(str(bare), (32, 32, 3), cfg)
    assert source.kind == "saved model" and source.layers == ("output",)
    x = np.zeros((2, 32, 32, 3), np.uint8)
    reference = export.load_keras_model(workdir / advisor.MODEL_DIR)
    np.testing.assert_allclose(
        source.model.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-4
    )
    with pytest.raises(ValueError, match=r"takes images of shape \(32, 32, 3\)"):
        advisor.load_source(str(bare), (28, 28, 3), cfg)


def test_a_study_work_directory_gives_its_base_nets(tmp_path, folder):
    grid = fake_grid(tmp_path / "grid")
    sources = advisor.load_source(str(grid), (32, 32, 3), config(folder, ["x"]))
    assert [s.name for s in sources] == ["grid/random/seed0/baseA"]
    assert sources[0].base_net and sources[0].layers == ("conv2", "fc6")
    assert "resized 32x32 to 28x28" in sources[0].note
    empty = tmp_path / "empty"
    empty.mkdir()
    results.append_jsonl(empty / "results.jsonl", {"key": "x", "kind": "probe"})
    with pytest.raises(ValueError, match="holds no finished base net"):
        advisor.load_source(str(empty), (32, 32, 3), config(folder, ["x"]))


def test_bad_sources_are_clear_errors(tmp_path, folder, monkeypatch):
    cfg = config(folder, ["x"])
    with pytest.raises(ValueError, match="unknown source 'ResNet9'.*MobileNetV2"):
        advisor.load_source("ResNet9", (32, 32, 3), cfg)
    with pytest.raises(ValueError, match="no such file or directory"):
        advisor.load_source(str(tmp_path / "missing.keras"), (32, 32, 3), cfg)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a .keras file"):
        advisor.load_source(str(tmp_path / "notes.txt"), (32, 32, 3), cfg)
    with pytest.raises(ValueError, match="sources=\\(\\) names no candidate"):
        advisor.load_sources(config(folder, []), (32, 32, 3))

    # Offline ImageNet weights: the download is not attempted here (no network
    # in tests); Keras' failure is what it raises offline.
    def offline(**kwargs):
        raise Exception(
            "URL fetch failure on https://example.org/mobilenet_v2_no_top.h5: None "
            "-- [Errno -2] Name or service not known"
        )

    spec = backbones.BACKBONES["MobileNetV2"]
    monkeypatch.setitem(
        backbones.BACKBONES,
        "MobileNetV2",
        dataclasses.replace(spec, constructor=offline),
    )
    with pytest.raises(backbones.BackboneWeightsError, match="cannot load ImageNet"):
        advisor.load_source("MobileNetV2", (32, 32, 3), cfg)


def test_the_script_fails_in_one_line_and_claims_nothing(tmp_path, folder):
    work = tmp_path / "w"
    for args, message in (
        (["--sources=ResNet9"], "error: unknown source 'ResNet9'"),
        ([f"--sources={tmp_path / 'x.keras'}"], "no such file or directory"),
        (["--sources=MobileNetV2", "--labels_per_class=0"], "--labels_per_class='0'"),
        (["--sources=MobileNetV2", "--strategies=thaw"], "strategies=['thaw']"),
        (["--sources=MobileNetV2", "--time_budget=-1"], "time_budget=-1.0"),
    ):
        proc = run_main(
            "advise",
            f"--target=folder:{folder}",
            f"--workdir={work}",
            *args,
            check=False,
        )
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()[-1]) > 20
        assert not work.exists()
    # A directory holding something else is refused, and kept.
    (work / "mine").mkdir(parents=True)
    with pytest.raises(ValueError, match="is not empty and holds no earlier"):
        advisor._prepare_workdir(work)
    assert (work / "mine").is_dir()


class FakeClock:
    """Time that passes only when a job says so."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_the_time_budget_skips_what_does_not_fit_and_says_so():
    now = FakeClock()
    ran = []

    def job(name, seconds):
        def run():
            ran.append(name)
            now.t += seconds
            return {"name": name}

        return run

    jobs = [
        advisor.Job("probe a", "probe", job("a", 4), forced=True),
        advisor.Job("probe b", "probe", job("b", 4)),
        advisor.Job("probe c", "probe", job("c", 4)),  # 8 s spent, 2 left < 4
        advisor.Job("train d", "strategy", job("d", 1)),  # no estimate, time left
        advisor.Job("train e", "strategy", job("e", 1)),  # 1 <= 1 left: runs
        advisor.Job("train f", "strategy", job("f", 1)),  # nothing left
    ]
    clock = advisor.Clock(10.0, now)
    done, skipped = advisor.run_within_budget(jobs, clock)
    assert ran == ["a", "b", "d", "e"]
    assert [d["seconds"] for d in done] == [4, 4, 1, 1]
    assert [s["what"] for s in skipped] == ["probe c", "train f"]
    assert skipped[0]["reason"] == "time budget: about 4 s needed, 2 s left"
    assert skipped[1]["reason"] == "time budget: about 1 s needed, 0 s left"
    # A forced job runs even with no time left.
    done, skipped = advisor.run_within_budget(
        [advisor.Job("probe g", "probe", job("g", 1), forced=True)],
        advisor.Clock(0.0, now),
    )
    assert ran[-1] == "g" and not skipped


def test_a_budget_of_zero_checks_the_top_candidate_only(folder, small_net, tmp_path):
    made = advisor.advise(
        config(folder, [small_net], time_budget=0.0, seeds=(0, 1)), tmp_path / "w"
    )
    runs = made["stage2"]["runs"]
    assert [r["kind"] for r in runs] == ["probe"]
    assert runs[0]["layer"] == made["stage1"]["candidates"][0]["layer"]
    skipped = made["stage2"]["skipped"]
    # The second probe, then every strategy of both seeds on the checked probe.
    assert [s["kind"].split()[0] for s in skipped] == ["probe"] + ["strategy"] * 4
    assert all(s["reason"].startswith("time budget") for s in skipped)
    assert made["confidence"]["level"] == "unchecked"
    assert "skipped for time" in made["confidence"]["statement"]
    assert (tmp_path / "w" / advisor.MODEL_DIR / export.KERAS_FILE).is_file()


def test_stage_one_ranks_by_mean_rank_and_a_failed_score_last():
    candidates = [
        {"name": "a", "scores": {"logme": 0.1, "h_score": 3.0}},
        {"name": "b", "scores": {"logme": 0.3, "h_score": 1.0}},
        {"name": "c", "scores": {"logme": 0.2, "h_score": 2.0}},
        {"name": "d", "scores": {"logme": None, "h_score": 9.0}},
    ]
    ranked = advisor.mean_ranks(candidates, ("logme", "h_score"))
    # a: 3+2, b: 1+4, c: 2+3, d: 4+1 -> all 2.5; ties keep the given order.
    assert [c["mean_rank"] for c in ranked] == [2.5] * 4
    ranked = advisor.mean_ranks(candidates, ("logme",))
    assert [c["name"] for c in ranked] == ["b", "c", "a", "d"]
    assert [c["rank"] for c in ranked] == [1, 2, 3, 4]


def test_strategies_follow_the_evidence_for_the_budget():
    chosen = ("fine_tune", "freeze", "lp_ft")
    assert advisor.strategy_order(10, chosen) == ["freeze", "lp_ft", "fine_tune"]
    assert advisor.strategy_order(None, chosen) == ["fine_tune", "lp_ft", "freeze"]
    assert advisor.strategy_order(None, ("freeze", "l2_sp")) == ["freeze", "l2_sp"]


def _run(option, seed, hits, kind="strategy"):
    hits = np.asarray(hits, dtype=bool)
    return {
        "option": option,
        "kind": kind,
        "source": "s",
        "layer": "conv3",
        "strategy": option,
        "seed": seed,
        "val_accuracy": float(hits.mean()),
        "val_loss": 1.0 - float(hits.mean()),
        "test_accuracy": 0.5,
        "val_correct": results.pack_bits(hits),
        "val_examples": len(hits),
        "seconds": 1.0,
    }


def test_the_confidence_says_beats_or_cannot_tell_apart_from_the_interval():
    rng = np.random.default_rng(0)
    n = 400
    strong = [_run("a", s, rng.random(n) < 0.9) for s in (0, 1, 2)]
    weak = [_run("b", s, rng.random(n) < 0.6) for s in (0, 1, 2)]
    options = strong + weak
    rows = advisor.summarize_options(options)
    assert [r["option"] for r in rows] == ["a", "b"]
    assert rows[0]["val_interval"]["seeds"] == 3
    sure = advisor.confidence(rows, options, [])
    assert sure["level"] == "clear"
    iv = sure["difference"]
    assert 20 < iv["mean"] < 40 and iv["low"] > 0
    assert sure["statement"].startswith("The pick beats the runner-up (b) by +")
    assert "over 3 seeds and 400 validation images" in sure["statement"]
    # Two options that differ by noise only.
    same = [_run("c", s, rng.random(n) < 0.7) for s in (0, 1, 2)]
    also = [_run("d", s, rng.random(n) < 0.7) for s in (0, 1, 2)]
    rows = advisor.summarize_options(same + also)
    sure = advisor.confidence(rows, same + also, [])
    assert sure["level"] == "cannot tell apart"
    assert sure["difference"]["low"] < 0 < sure["difference"]["high"]
    assert "cannot be told apart" in sure["statement"]
    # One seed of each (a probe against a strategy): the images' noise only.
    one = [_run("e", 0, rng.random(n) < 0.95, kind="probe"), *weak]
    rows = advisor.summarize_options(one)
    sure = advisor.confidence(rows, one, [])
    assert sure["level"] == "likely" and sure["difference"]["seeds"] == 1
    assert "one seed" in sure["statement"]


def test_the_exhaustive_reference_reads_the_studys_validation_choice():
    records = [
        {
            "kind": "strategy",
            "budget": "10",
            "seed": 0,
            "line": line,
            "val_accuracy": val,
            "val_loss": 0.5,
            "test_accuracy": test,
            "wall_time": 10.0,
        }
        for line, val, test in (
            ("freeze@n3", 0.8, 0.7),
            ("fine_tune", 0.9, 0.6),
            ("lp_ft", 0.7, 0.75),
        )
    ]
    records.append({**records[0], "seed": 1, "val_accuracy": 1.0})
    found = advisor.exhaustive(records, "10", 0)
    assert found == {
        "chosen": "fine_tune",
        "chosen_test": 0.6,
        "best": 0.75,
        "runs": 3,
        "seconds": 30.0,
    }
    with pytest.raises(ValueError, match="no strategy run at k=all"):
        advisor.exhaustive(records, "all", 0)


@pytest.mark.slow
def test_the_script_runs_from_its_command_line(folder, small_net, tmp_path):
    work = tmp_path / "advice"
    proc = run_script(
        "advise",
        f"--target=folder:{folder}",
        f"--sources={small_net}",
        "--labels_per_class=4",
        "--validation_fraction=0.25",
        "--batch_size=16",
        "--layers=fc6",
        "--strategies=freeze",
        "--seeds=0",
        "--epochs=2",
        "--min_epochs=1",
        "--probe_epochs=3",
        f"--workdir={work}",
    )
    assert "# Advice" in proc.stdout and "freeze at fc6 of digits_net.keras" in (
        proc.stdout
    )
    made = json.loads((work / advisor.JSON_FILE).read_text())
    assert made["target"]["labels_per_class"] == "4"
    assert made["target"]["train"] == 12
    assert (work / advisor.MODEL_DIR / export.SAVED_MODEL_DIR).is_dir()


def test_a_net_that_is_not_a_base_net_is_probed_and_no_strategy_runs(folder, tmp_path):
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3)(x)).save(tmp_path / "other.keras")
    made = advisor.advise(config(folder, [tmp_path / "other.keras"]), tmp_path / "w")
    (source,) = made["sources"]
    assert source["kind"] == "keras" and source["layers"] == ["output"]
    assert source["note"] == "resized 32x32 to 16x16"
    assert [r["kind"] for r in made["stage2"]["runs"]] == ["probe"]
    (skipped,) = made["stage2"]["skipped"]
    assert skipped["what"] == "every strategy"
    assert "no probed candidate is a transfer_tf base net" in skipped["reason"]
