"""The domain-adaptation study: expansion, domain pairs made to agree, the
selection protocol (no target label outside the oracle rows, tested with poisoned
labels), summaries and verdicts recomputed by hand from made-up records, and a
smoke run of experiments/domain_adaptation.py."""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import TINY, assert_refused, assert_verdicts_agree, run_main
from transfer_tf import adaptation, data, domains, models
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import domain_adaptation as da
from transfer_tf.studies import report, runner
from transfer_tf.studies.domain_adaptation import execution as da_execution
from transfer_tf.studies.domain_adaptation import figures as da_figures
from transfer_tf.studies.domain_adaptation import plan as da_plan
from transfer_tf.studies.domain_adaptation import summary as da_summary

STUDY = da.STUDY
SMOKE = STUDY.preset("smoke")
EMBEDDED = {"sources": ("digits", "uci_digits"), "targets": ("uci_digits", "digits")}


# ------------------------------------------------------------------ configuration


def test_expand_lists_every_arm_seed_by_seed():
    config = config_lib.override(da_plan.Config(), EMBEDDED)
    runs = da_plan.expand(config)
    # per seed and pair: source only, DANN at 4 weights, CORAL and MMD at 3
    # (the published ranges: DANN 0.03-1, CORAL and MMD 1-100), the oracle
    assert len(runs) == 3 * 2 * (1 + 4 + 3 + 3 + 1)
    assert config.dann_weights == (0.03, 0.1, 0.3, 1.0)
    assert config.coral_weights == (1.0, 10.0, 100.0)
    assert len({r.key for r in runs}) == len(runs)
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)  # seed-major
    keys = [r.key for r in runs]
    assert keys[:3] == [
        "digits_to_uci_digits/seed0/source_only",
        "digits_to_uci_digits/seed0/dann/w0.03",
        "digits_to_uci_digits/seed0/dann/w0.1",
    ]
    assert "uci_digits_to_digits/seed2/coral/w10" in keys
    assert {r.labels for r in runs if r.arm == da_plan.ORACLE} == {"target"}
    assert {r.labels for r in runs if r.arm != da_plan.ORACLE} == {"source"}
    fewer = config_lib.override(config, {"methods": ("mmd",), "oracle": False})
    assert {r.arm for r in da_plan.expand(fewer)} == {"source_only", "mmd"}


def test_the_default_preset_covers_the_three_pairs_when_the_photos_are_there():
    config = STUDY.preset("digits")
    assert config == da_plan.Config()
    pairs = [domains.pair_name(s, t) for s, t in config.pairs]
    assert pairs[:2] == ["digits_to_uci_digits", "uci_digits_to_digits"]
    if data.cifar10_spec().startswith("folder:"):
        assert pairs[2] == "digits_to_mnist_m"
        assert config.targets[2] == "mnist_m:" + data.cifar10_spec()[len("folder:") :]
    else:
        assert len(pairs) == 2
    assert config.training.schedule == "plateau" and config.training.min_epochs > 0


def test_config_hash_ignores_the_extent_and_a_run_hashes_its_domains():
    grown = config_lib.override(SMOKE, {"seeds": (0, 1, 2), "mmd_weights": (0.1, 1)})
    assert grown.config_hash() == SMOKE.config_hash()
    moved = config_lib.override(SMOKE, {"adaptation.layer": "fc6"})
    assert moved.config_hash() != SMOKE.config_hash()
    # Two MNIST-M folders make the same key but not the same run.
    a = da_plan.Run("digits", "mnist_m:/photos/a", 0, "coral", 1.0)
    b = dataclasses.replace(a, target="mnist_m:/photos/b")
    assert a.key == b.key == "digits_to_mnist_m/seed0/coral/w1"
    assert config_lib.hash_of(da_plan.run_part(SMOKE, a)) != config_lib.hash_of(
        da_plan.run_part(SMOKE, b)
    )


def test_auto_settings_are_measured_on_the_net_that_trains(tmp_path):
    # All of a pair's classes (not a half's), the largest image of the pairs.
    config = config_lib.override(SMOKE, {"seeds": (0,)})
    context = da_execution.Context(config, tmp_path, tmp_path / "runs")
    (signature, steps) = da_execution.signatures(config, context)["training"]
    assert signature.model == "base_net" and signature.num_classes == 10
    assert signature.input_shape == (28, 28, 1)
    assert signature.batch_size == config.data.batch_size
    assert steps == config.training.epochs * max(config.min_epoch_steps, 10)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"targets": ("uci_digits", "digits")}, "must be non-empty and as many"),
        ({"targets": ("digits",)}, "adapt a domain to itself"),
        (
            {
                "sources": ("digits", "digits"),
                "targets": ("mnist_m:/a/x", "mnist_m:/b/y"),
            },
            "given more than once",
        ),
        ({"methods": ("dann", "cycada")}, r"methods=\['cycada'\]"),
        ({"coral_weights": (0.0,)}, "must be positive"),
        ({"mmd_weights": ()}, "must not be empty when mmd runs"),
        ({"seeds": (0, 0)}, "duplicates"),
    ],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        config_lib.override(SMOKE, changes)


def test_domain_names():
    assert domains.domain_name("uci_digits") == "uci_digits"
    assert domains.domain_name("mnist_m:/work/shared/data/cifar10") == "mnist_m"
    assert domains.domain_name("folder:/data/photos/") == "folder_photos"
    assert domains.domain_name("npz:/tmp/svhn.npz") == "npz_svhn"
    assert domains.domain_name("tfds:svhn_cropped") == "svhn_cropped"


# ------------------------------------------------------------------------ domains


def _npz(path, shape, classes, per_class=6, seed=0, names=None):
    """An npz data spec: images of ``shape`` whose mean brightness is the class."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        y = np.repeat(np.arange(classes), per_class)
        x = rng.integers(0, 20, (len(y), *shape)) + 60 * y.reshape(-1, 1, 1, 1)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x.astype(np.uint8), y
    if names is not None:
        arrays["class_names"] = np.array(names)
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_load_pair_makes_shapes_and_class_order_agree(tmp_path):
    source = _npz(tmp_path / "grey.npz", (28, 28, 1), 3, names=["0", "1", "2"])
    # RGB, larger, and its classes in another order: its class "0" is label 2.
    target = _npz(tmp_path / "rgb.npz", (32, 32, 3), 3, seed=1, names=["2", "1", "0"])
    config = data.DataConfig(validation_fraction=0.2, train_per_class=3)
    pair = domains.load_pair(source, target, config)
    assert pair.name == "npz_grey_to_npz_rgb"
    # The unlabelled target images: as many as the labelled ones, a label-blind
    # sample of the target's whole training split.
    assert len(pair.target_images) == len(pair.target.y_train) == 9
    whole = domains.load_pair(
        source, target, dataclasses.replace(config, train_per_class=None)
    )
    pool = {image.tobytes() for image in whole.target.x_train}
    assert {image.tobytes() for image in pair.target_images} <= pool
    assert pair.source.image_shape == pair.target.image_shape == (28, 28, 3)
    grey = pair.source.x_train
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])  # replicated
    assert pair.target.class_names == ("0", "1", "2")
    # Brightness 60 * original label: re-indexed labels follow the names.
    brightness = pair.target.x_test.reshape(len(pair.target.y_test), -1).mean(1)
    for label, original in ((0, 2), (1, 1), (2, 0)):
        mean = brightness[pair.target.y_test == label].mean()
        assert 60 * original <= mean < 60 * original + 25
    other = _npz(tmp_path / "four.npz", (28, 28, 1), 4, seed=2)
    with pytest.raises(ValueError, match=r"same classes .*only in the target: \['3'\]"):
        domains.load_pair(source, other, data.DataConfig())


# ------------------------------------------------------ the selection protocol


def _tiny_pair(digits_source, per_class=12):
    config = data.DataConfig(train_per_class=per_class, validation_fraction=0.1)
    task = data.make_task(digits_source, range(10), config)
    every = slice(None, None, len(task.y_test) // 60)  # every class
    small = dataclasses.replace(
        task, x_test=task.x_test[every], y_test=task.y_test[every]
    )
    return domains.Pair("digits_to_digits", small, small, small.x_train)


def _poisoned(pair):
    """The pair with every target label wrong (shifted by one class)."""

    def shift(y):
        return (y + 1) % 10

    target = dataclasses.replace(
        pair.target,
        y_train=shift(pair.target.y_train),
        y_validation=shift(pair.target.y_validation),
        y_test=shift(pair.target.y_test),
    )
    return dataclasses.replace(pair, target=target)


def _random_digits(per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), per_class)
    x = rng.integers(0, 256, (len(y), 28, 28, 1), dtype=np.uint8)
    return data.Source("random", tuple(map(str, range(10))), x, y, x[::2], y[::2])


def test_criteria_read_no_target_label():
    pair = _tiny_pair(_random_digits())
    base = models.build_base_net((28, 28, 1), 10, seed=0, **TINY)
    extractor = adaptation.AdaptationModel(
        base, adaptation.AdaptationConfig("coral")
    ).feature_model

    def scores(p):
        criteria = adaptation.Criteria(p.source, p.target_images, 0, 40, 10.0)
        target = adaptation.TargetScores(p.target)
        outputs = adaptation.predict_parts(
            extractor, {**criteria.parts, **target.parts}
        )
        return criteria(outputs), target(outputs)

    clean, poisoned = scores(pair), scores(_poisoned(pair))
    assert clean[0] == poisoned[0]  # every selection criterion, bit for bit
    assert set(clean[0]) >= {"source_val_loss", "dev_risk", "iwv_risk"}
    assert set(clean[1]) == set(adaptation.TARGET_LABELLED)
    assert clean[1]["target_val_loss"] != poisoned[1]["target_val_loss"]
    # Only the oracle's rule reads a target-labelled field.
    for rule, order in da_plan.RULES.items():
        labelled = any(field in adaptation.TARGET_LABELLED for field, _ in order)
        assert labelled == (rule == "oracle"), rule
    assert set(da_plan.UNSUPERVISED_RULES) == set(da_plan.RULES) - {"oracle"}


def _candidate(epoch, source_val, dev, test, iwv=None, target_val=None):
    return {
        "epoch": epoch,
        "source_val_loss": source_val,
        "source_val_accuracy": 0.9,
        "dev_risk": dev,
        "iwv_risk": dev if iwv is None else iwv,
        "target_val_loss": 1.0 if target_val is None else target_val,
        "target_val_accuracy": 0.5,
        "target_test_accuracy": test,
    }


def _record(seed, arm, weight, candidates, pair=("digits", "uci_digits")):
    run = da_plan.Run(*pair, seed, arm, weight)
    out = {**runner.header(run), "candidates": candidates, "wall_time": 10.0}
    if arm == da_plan.ORACLE:
        out = {**runner.header(run), "test_accuracy": candidates, "wall_time": 5.0}
    return out


# Per seed: source only's choice is epoch 2 under both rules (0.40 + 0.02 seed).
# DANN: source val picks w0.3@e1, DEV w1@e2; CORAL: both its one weight's e1.
SO = [0.40, 0.42, 0.44]
DANN_SV = [0.41, 0.40, 0.45]  # - source only: +0.01, -0.02, +0.01
DANN_DEV = [0.50, 0.54, 0.52]  # +0.10, +0.12, +0.08
CORAL = [0.30, 0.30, 0.36]  # -0.10, -0.12, -0.08
ORACLE_ACCURACY = [0.95, 0.97, 0.96]


def fake_records():
    records = []
    for seed in range(3):
        records.append(
            _record(
                seed,
                "source_only",
                0.0,
                [_candidate(1, 0.9, 0.9, 0.2), _candidate(2, 0.5, 0.5, SO[seed])],
            )
        )
        records.append(
            _record(
                seed,
                "dann",
                0.3,
                [
                    _candidate(1, 0.3, 0.8, DANN_SV[seed]),
                    _candidate(2, 0.6, 0.7, 0.9, target_val=0.1),
                ],
            )
        )
        records.append(
            _record(
                seed,
                "dann",
                1.0,
                [_candidate(1, 0.7, 0.6, 0.1), _candidate(2, 0.4, 0.2, DANN_DEV[seed])],
            )
        )
        records.append(
            _record(
                seed,
                "coral",
                1.0,
                [_candidate(1, 0.5, 0.5, CORAL[seed]), _candidate(2, 0.6, 0.6, 0.9)],
            )
        )
        records.append(_record(seed, da_plan.ORACLE, 0.0, ORACLE_ACCURACY[seed]))
    return records


def _picks(records, rule):
    return {
        k: (c["weight"], c["epoch"]) for k, c in da_plan.select(records, rule).items()
    }


def test_selection_never_follows_target_labels():
    records = fake_records()
    assert _picks(records, "source_val")[("digits_to_uci_digits", "dann", 0)] == (
        0.3,
        1,
    )
    assert _picks(records, "dev")[("digits_to_uci_digits", "dann", 0)] == (1.0, 2)
    assert _picks(records, "oracle")[("digits_to_uci_digits", "dann", 0)] == (0.3, 2)
    # Poison every target-labelled number (random target validation losses, the
    # worst candidates made best on target test): the rules that read no target
    # label choose exactly as before; the oracle selection follows the poison.
    rng = np.random.default_rng(0)
    for trial in range(5):
        poisoned = copy.deepcopy(records)
        for r in poisoned:
            for c in r.get("candidates") or []:
                c["target_val_loss"] = float(rng.random())
                c["target_val_accuracy"] = float(rng.random())
                c["target_test_accuracy"] = 1.0 - c["target_test_accuracy"]
        for rule in da_plan.UNSUPERVISED_RULES:
            assert _picks(poisoned, rule) == _picks(records, rule), (rule, trial)
        assert _picks(poisoned, "oracle") != _picks(records, "oracle")
    # The oracle arm is never a candidate of any rule.
    assert not any(
        arm == da_plan.ORACLE
        for rule in da_plan.RULES
        for _, arm, _ in _picks(records, rule)
    )


def _interval(values):
    values = np.asarray(values)
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1)
    half /= np.sqrt(len(values))
    return values.mean(), values.mean() - half, values.mean() + half


PAIR = "digits_to_uci_digits"


def test_summary_rows_and_verdicts_recomputed_by_hand():
    records = fake_records()
    summary = da_summary.summarize(records, SMOKE)
    (pair,) = summary.table("pairs").records()
    assert (pair["pair"], pair["source"], pair["target"]) == (
        PAIR,
        "digits",
        "uci_digits",
    )
    assert (pair["seeds"], pair["runs"]) == ("0, 1, 2", 15)
    oracle = pair[da.summary.ORACLE_HEADER]
    assert oracle["mean"] == pytest.approx(0.96) and oracle["count"] == 3
    assert (oracle["low"], oracle["high"]) == pytest.approx(
        _interval(ORACLE_ACCURACY)[1:]
    )

    accuracy = {(r["pair"], r["arm"]): r for r in summary.table("accuracy").records()}
    assert list(accuracy) == [
        (PAIR, "source only"),
        (PAIR, "DANN"),
        (PAIR, "Deep CORAL"),
    ]
    cell = accuracy[(PAIR, "source only")]["DEV"]
    assert (cell["mean"], cell["low"], cell["high"]) == pytest.approx(_interval(SO))
    assert cell["count"] == 3
    dann = accuracy[(PAIR, "DANN")]
    assert dann["source val"]["mean"] == pytest.approx(np.mean(DANN_SV))
    assert dann["DEV"]["mean"] == pytest.approx(np.mean(DANN_DEV))
    assert dann["IWV"]["mean"] == pytest.approx(np.mean(DANN_DEV))
    # The oracle selection (lowest target validation loss): w0.3@e2, 0.9.
    assert dann["oracle selection"]["mean"] == pytest.approx(0.9)
    assert accuracy[(PAIR, "source only")]["oracle selection"]["mean"] == (
        pytest.approx(0.2)
    )

    # Method - source only, paired within a seed and a rule, as findings.
    found = da_summary.comparisons(da_summary.outcomes(records))
    assert set(found) == {
        (PAIR, m, r) for m in ("dann", "coral") for r in da_plan.RULES
    }
    for (method, rule), values, verdict in (
        (("dann", "dev"), np.subtract(DANN_DEV, SO), "reproduced"),
        (("dann", "iwv"), np.subtract(DANN_DEV, SO), "reproduced"),
        (("dann", "source_val"), np.subtract(DANN_SV, SO), "not resolved"),
        (("coral", "dev"), np.subtract(CORAL, SO), "contradicted"),
        (("coral", "source_val"), np.subtract(CORAL, SO), "contradicted"),
    ):
        f = found[(PAIR, method, rule)]
        assert f.values == pytest.approx(dict(enumerate(values)))
        iv = f.interval
        assert (iv["mean"], iv["low"], iv["high"]) == pytest.approx(_interval(values))
        assert iv["count"] == 3 and f.verdict == verdict, (method, rule)
    # DANN's DEV interval by hand: mean 0.10, sd 0.02, t(0.975, 2) = 4.303.
    assert found[(PAIR, "dann", "dev")].interval["low"] == pytest.approx(
        0.10 - 4.3027 * 0.02 / np.sqrt(3), abs=1e-4
    )
    rows = {r["#"]: r for r in summary.table("findings").records()}
    assert list(rows) == [f.key for f in da_summary.findings(found)]
    # target labels: no verdict for the oracle selection
    assert len(rows) == 6 and not any(key.endswith("/oracle") for key in rows)
    dev = rows[f"{PAIR}/dann/dev"]
    assert dev["verdict"] == report.Cell("reproduced", bold=True)
    assert dev["ours: mean [95% CI] (n)"].value == found[(PAIR, "dann", "dev")].interval
    assert dev["holds in"] == "3 of 3"
    assert rows[f"{PAIR}/dann/source_val"]["holds in"] == "2 of 3"
    assert rows[f"{PAIR}/coral/dev"]["verdict"].value == "contradicted"
    assert rows[f"{PAIR}/coral/dev"]["holds in"] == "0 of 3"

    # Under the oracle selection: DANN 0.9 - 0.2, CORAL its one weight's e1 - 0.2.
    table = summary.table("oracle_selection")
    assert table.column("method") == ["DANN", "Deep CORAL"]
    gains = table.column("mean")
    assert (gains[0]["mean"], gains[0]["low"], gains[0]["high"]) == pytest.approx(
        (0.7, 0.7, 0.7)
    )
    assert gains[1]["mean"] == pytest.approx(np.mean(CORAL) - 0.2)

    choices = {r["arm"]: r for r in summary.table("choices").records()}
    assert choices["DANN"]["DEV"] == "w1@e2, w1@e2, w1@e2"
    assert choices["DANN"]["source val"] == "w0.3@e1, w0.3@e1, w0.3@e1"
    assert choices["DANN"]["oracle selection"] == "w0.3@e2, w0.3@e2, w0.3@e2"
    assert choices["source only"]["DEV"] == "e2, e2, e2"

    selections = {tuple(row[:4]): row[4:] for row in summary.table("selections").rows}
    assert len(selections) == 3 * (3 * len(da_plan.RULES) + 1)
    assert selections[(PAIR, "dann", "dev", 0)] == pytest.approx([1.0, 2, 0.2, 0.5])
    assert selections[(PAIR, "source_only", "source_val", 2)] == pytest.approx(
        [None, 2, 0.5, SO[2]]
    )
    assert selections[(PAIR, da_plan.ORACLE, da_plan.OWN, 1)] == [
        None,
        None,
        None,
        0.97,
    ]

    # The files: summary.md is the rows rendered; the CSVs are the tables.
    out = da_summary.report(records, SMOKE)
    assert out["summary.md"] == report.markdown(summary)
    rows = {
        (r["pair"], r["arm"], r["rule"]): r
        for r in csv.DictReader(io.StringIO(out["summary.csv"]))
    }
    assert len(rows) == 3 * len(da_plan.RULES) + 1
    row = rows[(PAIR, "dann", "dev")]
    mean, low, high = _interval(np.subtract(DANN_DEV, SO))
    assert float(row["mean"]) == pytest.approx(np.mean(DANN_DEV), abs=1e-6)
    assert float(row["difference"]) == pytest.approx(0.10, abs=1e-6)
    assert float(row["difference_low"]) == pytest.approx(low, abs=1e-6)
    assert row["count"] == "3" and row["verdict"] == "reproduced"
    assert rows[(PAIR, "coral", "dev")]["verdict"] == "contradicted"
    assert float(rows[(PAIR, "dann", "oracle")]["difference"]) == pytest.approx(0.7)
    assert rows[(PAIR, "dann", "oracle")]["verdict"] == ""  # target labels
    assert rows[(PAIR, "source_only", "dev")]["difference"] == ""
    assert rows[(PAIR, da_plan.ORACLE, da_plan.OWN)]["count"] == "3"
    assert float(rows[(PAIR, da_plan.ORACLE, da_plan.OWN)]["mean"]) == pytest.approx(
        0.96
    )
    chosen = out["selections.csv"].splitlines()
    assert chosen[0] == (
        "pair,arm,rule,seed,weight,epoch,criterion,target_test_accuracy"
    )
    assert "digits_to_uci_digits,dann,dev,0,1.000000,2,0.200000,0.500000" in chosen
    assert "digits_to_uci_digits,target_oracle,own,1,,,,0.970000" in chosen


def _caveats(summary):
    (bullets,) = [b for b in summary.blocks if isinstance(b, report.Bullets)]
    return bullets.items


def test_a_diverged_run_keeps_its_finished_epochs_and_is_flagged():
    records = fake_records()
    diverged = _record(0, "dann", 3.0, [_candidate(1, 0.05, 0.05, 0.11)])
    diverged.update(diverged="validation loss is nan after epoch 2", at_chance=False)
    empty = _record(1, "dann", 3.0, [])
    empty.update(diverged="training loss became nan at epoch 1, batch 3")
    summary = da_summary.summarize([*records, diverged, empty], SMOKE)
    # The finished epoch of the diverged run is a candidate (and the best).
    choices = {r["arm"]: r for r in summary.table("choices").records()}
    assert choices["DANN"]["DEV"] == "w3@e1, w1@e2, w1@e2"
    (caveat,) = _caveats(summary)
    assert caveat.startswith("2 run(s) diverged: ")
    assert f"`{PAIR}/seed0/dann/w3` (validation loss is nan" in caveat
    assert f"`{PAIR}/seed1/dann/w3` (training loss became nan" in caveat


def test_runs_at_chance_stay_in_and_every_caveat_is_listed():
    records = fake_records()
    for r in records:
        r.update(stop_reason="no improvement", epochs_run=4, best_epoch=2)
    stuck = records[0]  # seed 0's source only
    stuck.update(at_chance=True, stop_reason="epoch cap", epochs_run=20)
    summary = da_summary.summarize(records, SMOKE)
    chance, cap = _caveats(summary)
    assert chance.startswith("1 run(s) never rose significantly above chance")
    assert (
        f"`{PAIR}/seed0/source_only`" in chance
        and "kept in every mean and choice" in chance
    )
    assert "left out" not in chance
    assert cap.startswith("1 run(s) stopped at the epoch cap")
    assert cap.endswith(f"`{PAIR}/seed0/source_only`")
    # Its epochs still count: source only's cell keeps all three seeds.
    (row,) = [
        r for r in summary.table("accuracy").records() if r["arm"] == "source only"
    ]
    assert row["DEV"]["count"] == 3 and row["DEV"]["mean"] == pytest.approx(np.mean(SO))
    convergence = {r["nets"]: r for r in summary.table("convergence").records()}
    assert list(convergence) == [
        f"{PAIR}: source only",
        f"{PAIR}: DANN",
        f"{PAIR}: Deep CORAL",
        f"{PAIR}: target oracle",
    ]
    source_only = convergence[f"{PAIR}: source only"]
    assert (source_only["runs"], source_only["at chance"]) == (3, 1)
    assert source_only["stop reasons"] == "epoch cap 1, no improvement 2"
    assert source_only["median epochs"] == 4.0
    assert source_only["mean wall time (s)"] == pytest.approx(10.0)
    assert convergence[f"{PAIR}: DANN"]["runs"] == 6
    assert convergence[f"{PAIR}: target oracle"]["mean wall time (s)"] == 5.0
    assert convergence[f"{PAIR}: target oracle"]["mean test top-1"] == (
        pytest.approx(np.mean(ORACLE_ACCURACY))
    )


def test_one_seed_is_a_caveat_and_resolves_nothing():
    records = [r for r in fake_records() if r["seed"] == 0]
    summary = da_summary.summarize(records, SMOKE)
    (caveat,) = _caveats(summary)
    assert caveat.startswith("every result rests on 1 seed (0)")
    verdicts = summary.table("findings").column("verdict")
    assert len(verdicts) == 6
    assert {v.value for v in verdicts} == {"not resolved (1 replicate: no interval)"}


def test_report_draws_the_figures_from_the_records():
    records = fake_records()
    rng = np.random.default_rng(0)
    for r in records:
        if r["seed"] == 0:
            r["test_accuracy"] = r.get("test_accuracy", 0.5)
            r["projection"] = {
                "layer": "fc7",
                "points": rng.normal(size=(20, 2)).round(3).tolist(),
                "domain": [0] * 10 + [1] * 10,
                "label": list(range(10)) * 2,
            }
    out = da_summary.report(records, SMOKE)
    assert set(out) == {
        "summary.md",
        "summary.csv",
        "selections.csv",
        "accuracy.png",
        "features_digits_to_uci_digits.png",
    }
    for name in ("accuracy.png", "features_digits_to_uci_digits.png"):
        assert out[name][:8] == b"\x89PNG\r\n\x1a\n" and len(out[name]) > 10_000
    summary = da_summary.summarize(records, SMOKE)
    seed, panels = da_figures.figure_panels(records, summary, PAIR)
    assert seed == 0
    # Source only, DANN at the weight DEV chose (1), CORAL, the oracle.
    assert [title.split("\n")[0] for title, _ in panels] == [
        "source only",
        "DANN, w=1 (DEV)",
        "Deep CORAL, w=1 (DEV)",
        "target oracle",
    ]


# ---------------------------------------------------------------- real training


@pytest.mark.slow
def test_poisoned_target_labels_change_only_the_target_scores(digits_source, tmp_path):
    """A method trained and scored with every target label wrong: its selection
    criteria are bit-identical to the clean run's (deterministic training), its
    target scores are not."""
    config = runner.resolve_auto(
        config_lib.override(
            SMOKE,
            {
                "training.epochs": 2,
                "training.min_epochs": 2,
                "dev_examples": 30,
                "model.width": 0.05,
            },
        )
    )

    class Fixed(da_execution.Context):
        def __init__(self, pair, workdir):
            super().__init__(config, workdir, lambda run: workdir / run.key)
            self.fixed = pair

        def pair(self, source, target):
            return self.fixed

    run = da_plan.Run("digits", "uci_digits", 0, "dann", 0.1)
    pair = _tiny_pair(digits_source, per_class=20)
    outcomes = []
    for name, p in (("clean", pair), ("poisoned", _poisoned(pair))):
        context = Fixed(p, tmp_path / name)
        run_dir = context.run_dir(run)
        run_dir.mkdir(parents=True)
        outcomes.append(da_execution.execute(run, context, run_dir))
    clean, poisoned = outcomes
    assert len(clean["candidates"]) == len(poisoned["candidates"]) == 2
    for a, b in zip(clean["candidates"], poisoned["candidates"], strict=True):
        for key in a:
            if key in adaptation.TARGET_LABELLED:
                continue
            assert a[key] == b[key], key
        assert a["target_val_loss"] != b["target_val_loss"]
    assert clean["source_test_accuracy"] == poisoned["source_test_accuracy"]


@pytest.mark.slow
def test_smoke_run_of_the_script(domain_adaptation_smoke):
    workdir, proc = domain_adaptation_smoke.workdir, domain_adaptation_smoke.finished
    assert da.summary.ORACLE_HEADER in proc.stdout  # summary.md, printed
    for name in (
        "results.jsonl",
        "config.json",
        "summary.md",
        "summary.csv",
        "selections.csv",
        "accuracy.png",
        "features_digits_to_uci_digits.png",
    ):
        assert (workdir / name).is_file(), name
    records = domain_adaptation_smoke.records
    config = domain_adaptation_smoke.config
    assert [r["key"] for r in records] == [r.key for r in da_plan.expand(config)]
    assert {r["config_hash"] for r in records} == {
        config_lib.hash_of(da_plan.run_part(config, da_plan.expand(config)[0]))
    }
    target_test = len(data.load_source(data.DataConfig(dataset="uci_digits")).y_test)
    for r in records:
        assert r["precision"] == "float32", r["key"]
        # The feature figure shows every run that trained (one seed here).
        assert ("projection" in r) == (not r.get("diverged")), r["key"]
        if r["arm"] == da_plan.ORACLE:
            # Scored on the target's test images (a count of them), not the source's.
            assert r["test_examples"] == target_test, r["key"]
            # (Keras' accuracy metric is float32: a count to within 1e-3.)
            correct = r["test_accuracy"] * target_test
            assert correct == pytest.approx(round(correct), abs=1e-3), r["key"]
            continue
        assert r["candidates"], r["key"]
        if not r.get("diverged"):  # a fixed budget: never stopped on the source
            assert r["stop_reason"] == "fixed budget", r["key"]
            assert r["epochs_run"] == config.training.epochs, r["key"]
            assert r["steps_run"] == r["epochs_run"] * r["steps_per_epoch"] > 0
        for c in r["candidates"]:
            fields = {f for order in da_plan.RULES.values() for f, _ in order}
            assert set(c) >= {"epoch", *fields, "target_test_accuracy"}
    source_only = next(r for r in records if r["arm"] == "source_only")
    assert source_only["val_accuracy"] > 0.2  # above chance (0.1) on the source
    # The summary is what the records say: recompute one cell.
    dev = da_plan.select(records, "dev")
    expected = np.mean(
        [c["target_test_accuracy"] for (_, arm, _), c in dev.items() if arm == "mmd"]
    )
    rows = {
        (r["pair"], r["arm"], r["rule"]): r
        for r in csv.DictReader(io.StringIO((workdir / "summary.csv").read_text()))
    }
    assert float(rows[(PAIR, "mmd", "dev")]["mean"]) == pytest.approx(
        expected, abs=1e-6
    )
    assert (workdir / "summary.md").read_text() == report.markdown(
        da_summary.summarize(records, config)
    )
    listed = json.loads((workdir / "config.json").read_text())
    assert listed["study"] == "domain_adaptation"


@pytest.mark.slow
def test_the_referee_trains_adapts_dann_beside_the_studys(
    domain_adaptation_smoke, tmp_path
):
    pytest.importorskip("adapt")
    workdir = domain_adaptation_smoke.workdir
    out = tmp_path / "referee.json"
    proc = run_main("da_referee", f"--workdir={workdir}", f"--out={out}")
    assert "| seed | source only | DANN (ours) | DANN (ADAPT) |" in proc.stdout
    assert "DANN (ours) - DANN (ADAPT):" in proc.stdout
    table = json.loads(out.read_text())
    assert table["pair"] == PAIR and [r["seed"] for r in table["rows"]] == [0]
    row = table["rows"][0]
    ours = {
        r["arm"]: da_plan.choose(r["candidates"], "source_val")["target_test_accuracy"]
        for r in domain_adaptation_smoke.records
        if r["arm"] in ("source_only", "dann")
    }
    assert (row["source_only"], row["dann"]) == (ours["source_only"], ours["dann"])
    # ADAPT's DANN learnt (ten classes: chance is 0.1) in the study's 150 steps
    assert 0.15 < row["adapt_dann"] <= 1.0
    assert 1 <= row["adapt_epoch"] <= domain_adaptation_smoke.config.training.epochs
    bad = run_main("da_referee", f"--workdir={tmp_path}", check=False)
    assert bad.returncode == 1 and "has no config.json" in bad.stderr
    other = run_main("da_referee", f"--workdir={workdir}", "--weight=5", check=False)
    assert other.returncode == 1 and "no finished source only and DANN at weight 5" in (
        other.stderr
    )


def test_the_referee_refuses_what_is_not_a_finished_da_study(tmp_path):
    cases = {
        "missing": (None, "does not exist"),
        "empty": ({}, "has no config.json"),
        "broken": ("{not json", "is not readable JSON"),
        "grid": ({"study": "transferability"}, "names study 'transferability'"),
        "fresh": ({"study": "domain_adaptation"}, "holds no results.jsonl yet"),
    }
    for name, (config, message) in cases.items():
        work = tmp_path / name
        if config is not None:
            work.mkdir()
            if config:
                text = config if isinstance(config, str) else json.dumps(config)
                (work / "config.json").write_text(text)
        proc = run_main("da_referee", f"--workdir={work}", check=False)
        assert proc.returncode == 1, name
        assert message in proc.stderr and "Traceback" not in proc.stderr, name
    # --out never writes over a file the referee did not write.
    (tmp_path / "fresh" / "results.jsonl").write_text("")
    (tmp_path / "mine.json").write_text('{"thesis": 1}')
    proc = run_main(
        "da_referee",
        f"--workdir={tmp_path / 'fresh'}",
        f"--out={tmp_path / 'mine.json'}",
        check=False,
    )
    assert proc.returncode == 1 and "is not an earlier referee table" in proc.stderr
    assert (tmp_path / "mine.json").read_text() == '{"thesis": 1}'


def test_a_run_that_learnt_then_fell_to_chance_is_named_collapsed():
    rows = [
        {"epoch": 1, "source_val_accuracy": 0.12},  # not yet learnt
        {"epoch": 2, "source_val_accuracy": 0.60},
        {"epoch": 3, "source_val_accuracy": 0.11},  # collapsed
        {"epoch": 4, "source_val_accuracy": 0.65},
    ]
    assert da_execution.collapse_epoch(rows, 200, 10) == 3
    assert da_execution.collapse_epoch(rows[:2], 200, 10) is None
    assert da_execution.collapse_epoch(rows[:1] + rows[2:3], 200, 10) is None
    record = {"key": "p/seed0/dann/w1", "seed": 0, "collapsed_at": 3}
    found = da.summary.caveats([record, {**record, "seed": 1, "collapsed_at": None}])
    assert any("collapsed to chance" in c and "(epoch 3)" in c for c in found)


@pytest.mark.slow
def test_a_rerun_redraws_and_another_configuration_is_refused(domain_adaptation_smoke):
    workdir = domain_adaptation_smoke.workdir
    again = run_main("domain_adaptation", "--preset=smoke", f"--workdir={workdir}")
    assert "5 already finished, 0 to run" in again.stderr
    assert_refused(
        domain_adaptation_smoke,
        "--adaptation_layer=fc6",
        because="layer: 'fc7' -> 'fc6'",
    )


@pytest.mark.slow
def test_the_smoke_summarys_verdicts_agree_with_their_p_values(domain_adaptation_smoke):
    smoke = domain_adaptation_smoke
    summary_ = da_summary.summarize(smoke.records, smoke.config)
    assert assert_verdicts_agree(summary_) > 0
