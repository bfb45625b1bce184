"""The fine-tuning study: expansion, dependencies, the recommendation, verdicts and
rank correlations computed by hand from fake records, and a smoke run of
experiments/fine_tuning.py as a user runs it."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from conftest import TINY, assert_refused, assert_verdicts_agree, run_main
from transfer_tf import backbones, data, estimators, export, models
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import fine_tuning
from transfer_tf.studies import report as report_lib
from transfer_tf.studies.fine_tuning import execution as ft_execution
from transfer_tf.studies.fine_tuning import plan as ft_plan
from transfer_tf.studies.fine_tuning import scores as ft_scores
from transfer_tf.studies.fine_tuning import summary as ft_summary

STUDY = fine_tuning.STUDY


# ------------------------------------------------------------------ expansion


def test_expand_orders_sources_first_and_cuts_each_strategy():
    config = ft_plan.Config()
    runs = ft_plan.expand(config)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    position = {r.key: i for i, r in enumerate(runs)}
    for r in runs:
        for needed in r.needs():
            assert position[needed] < position[r.key], r.key
    strategies = [r for r in runs if r.kind == "strategy"]
    # per seed and budget: 3 freeze cuts and the 6 other strategies
    assert len(strategies) == 3 * 3 * (3 + 6)
    cuts = {r.arm: {s.n for s in strategies if s.arm == r.arm} for r in strategies}
    assert cuts["freeze"] == {3, 5, 7} and cuts["scratch"] == {0}
    assert cuts["fine_tune"] == cuts["lp_ft"] == {7}
    assert all(r.needs() == [f"seed{r.seed}/source_transfer"] for r in strategies)
    # part 2: 4 sources, 7 layers each (the autoencoder: conv1..conv5 and code)
    probes = [r for r in runs if r.kind == "probe"]
    assert len(probes) == 3 * (2 * (7 + 7 + 6) + 7)  # selffer: all labels only
    assert {r.budget for r in runs if r.source == "selffer"} == {"all"}
    assert {r.pooling for r in probes if r.layer.startswith("conv")} == {"avg"}
    assert {r.pooling for r in probes if not r.layer.startswith("conv")} == {"none"}
    assert [r.key for r in runs if r.kind in ("source", "pretrain")] == [
        "pretrain_autoencoder",
        "seed0/source_transfer",
        "seed0/source_selffer",
        "seed1/source_transfer",
        "seed1/source_selffer",
        "seed2/source_transfer",
        "seed2/source_selffer",
    ]
    assert "seed1/freeze/n5/k10" in keys and "seed2/score_random/kall" in keys
    # A grid supplies the source nets: none are trained here.
    with_grid = dataclasses.replace(config, grid_workdir="/somewhere")
    assert not [r for r in ft_plan.expand(with_grid) if r.kind == "source"]


def test_presets_are_valid_and_the_digits_preset_is_the_defaults():
    assert STUDY.preset("digits") == ft_plan.Config()
    smoke = STUDY.preset("smoke")
    assert set(smoke.strategies) == set(ft_plan.STRATEGIES)
    cifar = STUDY.preset("cifar10")
    assert cifar.data.class_split == "man_made" and cifar.backbones == ()
    for name in STUDY.presets:
        schedule = STUDY.preset(name).training
        assert schedule.schedule == "plateau" and schedule.min_epochs >= 1


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"strategies": ("freeze", "warm_start")}, r"strategies=\['warm_start'\]"),
        ({"freeze_layers": (3, 8)}, r"8 is not an integer in 1..7"),
        ({"estimator_budgets": (10,)}, r"estimator_budgets=\['10'\] must include"),
        ({"pooling": "mean"}, r"pooling='mean'"),
        ({"sources": ("imagenet",)}, r"sources=\['imagenet'\]"),
        ({"discriminative_factor": 0.0}, r"discriminative_factor=0.0 must be > 0"),
        ({"target": "C"}, r"target='C'"),
    ],
)
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        config_lib.override(ft_plan.Config(), changes)


def test_changing_an_option_redoes_only_the_runs_it_affects():
    config = ft_plan.Config(seeds=(0,))
    runs = ft_plan.expand(config)

    def hashes(c):
        return {r.key: config_lib.hash_of(ft_plan.run_part(c, r)) for r in runs}

    before = hashes(config)
    for changes, redone in (
        (
            {"fine_tune_learning_rate": 0.005},
            {"fine_tune", "gradual_unfreezing", "l2_sp"},
        ),
        ({"discriminative_factor": 0.5}, {"discriminative"}),
        ({"probe.learning_rate": 0.1}, {"probe"}),
        ({"pooling": "max"}, {"probe", "score"}),
        ({"autoencoder.code_size": 64}, {"pretrain", "probe", "score"}),
    ):
        after = hashes(config_lib.override(config, changes))
        changed = [r for r in runs if before[r.key] != after[r.key]]
        assert {r.arm if r.kind == "strategy" else r.kind for r in changed} == redone
        if "pretrain" in redone:  # only the autoencoder's runs
            assert {r.source for r in changed} == {None, "autoencoder"}


# ------------------------------------------------------------- part 1 by hand


def _strategy(arm, seed, budget, val, test, n=7, at_chance=False, loss=0.5):
    line = f"freeze@n{n}" if arm == "freeze" else arm
    return {
        "key": f"seed{seed}/{line}/k{budget}",
        "kind": "strategy",
        "arm": arm,
        "n": n,
        "seed": seed,
        "budget": budget,
        "line": line,
        "val_accuracy": val,
        "val_loss": loss,
        "test_accuracy": test,
        "at_chance": at_chance,
        "num_train": 5 * (360 if budget == "all" else int(budget)),
        "num_classes": 5,
        "epochs_total": 12,
        "best_epoch": 6,
        "stop_reason": "converged",
        "stages": [{"stop_reason": "converged"}],
        "train_time": 3.0,
    }


# (seed, budget): {arm: (val, test)}; freeze at n=3 wins on test, n=7 on validation.
PART1 = {
    (0, "1"): {
        "f3": (0.50, 0.70),
        "f7": (0.60, 0.60),
        "ft": (0.55, 0.50),
        "sc": (0.3, 0.3),
    },
    (1, "1"): {
        "f3": (0.50, 0.72),
        "f7": (0.62, 0.64),
        "ft": (0.52, 0.58),
        "sc": (0.3, 0.3),
    },
    (2, "1"): {
        "f3": (0.40, 0.71),
        "f7": (0.61, 0.62),
        "ft": (0.53, 0.54),
        "sc": (0.3, 0.3),
    },
    (0, "all"): {
        "f3": (0.95, 0.95),
        "f7": (0.90, 0.90),
        "ft": (0.97, 0.97),
        "sc": (0.96, 0.96),
    },
    (1, "all"): {
        "f3": (0.94, 0.94),
        "f7": (0.90, 0.91),
        "ft": (0.98, 0.96),
        "sc": (0.95, 0.95),
    },
    (2, "all"): {
        "f3": (0.95, 0.96),
        "f7": (0.89, 0.90),
        "ft": (0.97, 0.99),
        "sc": (0.96, 0.96),
    },
}
NAMES = {
    "f3": ("freeze", 3),
    "f7": ("freeze", 7),
    "ft": ("fine_tune", 7),
    "sc": ("scratch", 0),
}


def part1_records():
    records = [
        _strategy(NAMES[a][0], seed, budget, val, test, n=NAMES[a][1])
        for (seed, budget), arms in PART1.items()
        for a, (val, test) in arms.items()
    ]
    # A fine-tuned run at chance: left out of every mean and choice.
    records.append(
        {**_strategy("fine_tune", 3, "1", 0.99, 0.2, at_chance=True), "key": "x"}
    )
    return records


def test_freeze_takes_the_validation_best_cut_and_at_chance_runs_are_left_out():
    cells = ft_summary.strategy_cells(part1_records())
    chosen = cells[("freeze", "1")]
    assert {s: r["n"] for s, r in chosen.items()} == {0: 7, 1: 7, 2: 7}
    assert [r["test_accuracy"] for r in chosen.values()] == [0.60, 0.64, 0.62]
    assert set(cells[("fine_tune", "1")]) == {0, 1, 2}  # seed 3 was at chance
    assert {s: r["n"] for s, r in cells[("freeze", "all")].items()} == {
        0: 3,
        1: 3,
        2: 3,
    }


def test_recommendation_is_made_on_validation_with_a_paired_interval():
    cells = ft_summary.strategy_cells(part1_records())
    lines = ["freeze", "fine_tune", "scratch"]
    few = ft_summary.recommend(cells, "1", lines)
    # mean validation: freeze (n=7) 0.61 > fine_tune 0.533 > scratch 0.3
    assert few["strategy"] == "freeze" and few["runner_up"] == "fine_tune"
    assert few["val_accuracy"] == pytest.approx(0.61)
    assert few["test"]["mean"] == pytest.approx(0.62)
    diffs = [0.60 - 0.50, 0.64 - 0.58, 0.62 - 0.54]
    assert few["difference"]["mean"] == pytest.approx(np.mean(diffs))
    half = 4.302652729911275 * np.std(diffs, ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert few["difference"]["low"] == pytest.approx(np.mean(diffs) - half)
    assert few["chosen"] == {0: "freeze", 1: "freeze", 2: "freeze"}
    many = ft_summary.recommend(cells, "all", lines)
    assert many["strategy"] == "fine_tune" and many["runner_up"] == "scratch"


def _claim(findings, a, b, budget):
    """The finding measuring ``a - b`` at ``budget`` (None: not judged)."""
    wanted = f"{a} − {b} at k={budget}"
    found = [f for f in findings if f.measure == wanted]
    assert len(found) <= 1, wanted
    return found[0] if found else None


def test_the_lectures_claims_get_verdicts_from_paired_differences():
    cells = ft_summary.strategy_cells(part1_records())
    out = ft_summary.claims(cells, ["1", "all"])
    scarce = _claim(out, "freeze", "fine_tune", "1")
    assert scarce.key == "1/k1" and scarce.claim == ft_plan.CLAIMS[0][3]
    assert scarce.values == pytest.approx({0: 0.10, 1: 0.06, 2: 0.08})
    assert scarce.interval["mean"] == pytest.approx(np.mean([0.10, 0.06, 0.08]))
    assert scarce.interval["count"] == 3 and scarce.interval["low"] > 0
    assert scarce.verdict == "reproduced" and scarce.holds == (3, 3)
    plenty = _claim(out, "fine_tune", "freeze", "all")  # freeze at all: n=3
    assert plenty.interval["mean"] == pytest.approx(np.mean([0.02, 0.02, 0.03]))
    assert plenty.verdict == "reproduced"
    worth = _claim(out, "freeze", "scratch", "1")
    assert worth.interval["mean"] == pytest.approx(0.32)
    assert worth.verdict == "reproduced"
    # the plentiful claim is not judged at a scarce budget
    assert _claim(out, "fine_tune", "freeze", "1") is None
    # scarce claims concern every budget but all, plentiful ones all only
    more = ft_summary.claims(cells, ["1", "10", "all"])
    assert {f.key for f in more} == {"1/k1", "2/kall", "5/k1"}  # no k=10 cells
    # claims about strategies that did not run are left out
    assert not [f for f in out if "discriminative" in f.measure]
    # One seed: no interval, no verdict.
    one = ft_summary.strategy_cells([r for r in part1_records() if r["seed"] == 0])
    judged = ft_summary.claims(one, ["1", "all"])
    assert len(judged) == 3
    assert {f.outcome for f in judged} == {"not resolved"}
    assert all(f.interval["low"] is None and f.holds == (1, 1) for f in judged)


def test_a_claim_against_the_data_is_contradicted():
    # fine_tune below freeze at all labels in every seed, by 2-3 points
    records = [
        _strategy(arm, seed, "all", val, test, n=7)
        for seed, (freeze, fine_tune) in enumerate(
            ((0.9, 0.88), (0.91, 0.88), (0.9, 0.875))
        )
        for arm, val, test in (("freeze", 0.5, freeze), ("fine_tune", 0.5, fine_tune))
    ]
    cells = ft_summary.strategy_cells(records)
    plenty = _claim(ft_summary.claims(cells, ["all"]), "fine_tune", "freeze", "all")
    assert plenty.interval["high"] < 0 and plenty.holds == (0, 3)
    assert plenty.verdict == "contradicted"


# ------------------------------------------------------------- part 2 by hand


def part2_records(seeds=(0, 1, 2)):
    """Per seed: two sources x two layers; LogME ranks the probes exactly,
    H-score exactly backwards; LEEP and NCE score the sources' heads."""
    probe_acc = {
        ("transfer", "conv2"): 0.80,
        ("transfer", "fc6"): 0.90,
        ("random", "conv2"): 0.60,
        ("random", "fc6"): 0.70,
    }
    records = []
    for seed in seeds:
        for source in ("transfer", "random"):
            scores = []
            for layer in ("conv2", "fc6"):
                acc = probe_acc[(source, layer)] + 0.01 * seed
                scores.append(
                    {
                        "layer": layer,
                        "estimator": "logme",
                        "score": acc,
                        "seconds": 0.01,
                    }
                )
                scores.append(
                    {
                        "layer": layer,
                        "estimator": "h_score",
                        "score": -acc,
                        "seconds": 0.02,
                    }
                )
                records.append(
                    {
                        "key": f"seed{seed}/probe_{source}/{layer}/kall",
                        "kind": "probe",
                        "seed": seed,
                        "budget": "all",
                        "source": source,
                        "layer": layer,
                        "val_accuracy": acc,
                        "val_loss": 1.0,
                        "test_accuracy": acc
                        - (0.2 if layer == "fc6" and source == "transfer" else 0.0),
                        "at_chance": False,
                        "train_time": 2.0,
                        "extract_time": 1.0,
                    }
                )
            scores.append(
                {
                    "layer": "fc8",
                    "estimator": "leep",
                    "score": -0.1 if source == "transfer" else -1.0,
                    "seconds": 0.001,
                }
            )
            records.append(
                {
                    "key": f"seed{seed}/score_{source}/kall",
                    "kind": "score",
                    "seed": seed,
                    "budget": "all",
                    "source": source,
                    "scores": scores,
                    "extract_time": 0.5,
                    "score_time": sum(e["seconds"] for e in scores),
                }
            )
    return records


def _config(**kw):
    return ft_plan.Config(
        sources=("transfer", "random"),
        layers=("conv2", "fc6"),
        estimators=("logme", "h_score", "leep"),
        **kw,
    )


def test_rank_correlations_per_seed_and_their_verdicts():
    rows = ft_scores.correlations(part2_records(), _config())
    by = {(r["estimator"], r["level"], r["measured"]): r for r in rows}
    # Probe test accuracies: transfer/fc6 dropped to 0.70, so LogME's order
    # (0.6, 0.7, 0.8, 0.9 on validation) against test (0.6, 0.7, 0.8, 0.7):
    from scipy import stats as scipy_stats

    expected = scipy_stats.spearmanr([0.6, 0.7, 0.8, 0.9], [0.6, 0.7, 0.8, 0.7])
    logme = by[("logme", "layer", "probe")]
    assert logme["candidates"] == 4 and logme["seeds"] == 3
    assert logme["spearman"]["mean"] == pytest.approx(expected.statistic)
    h = by[("h_score", "layer", "probe")]
    assert h["spearman"]["mean"] == pytest.approx(-expected.statistic)
    # Sources: two candidates only, so no source-level correlation.
    assert ("leep", "source", "best probe") not in by
    best = ft_scores.best_estimator(rows)
    assert best["estimator"] == "logme"


def test_a_perfect_ranking_is_reproduced_and_a_reversed_one_contradicted():
    records = part2_records()
    for r in records:
        if r["kind"] == "probe":
            r["test_accuracy"] = r["val_accuracy"]
    by = {
        r["estimator"]: r
        for r in ft_scores.correlations(records, _config())
        if r["level"] == "layer"
    }
    # rho = 1 in every seed: Fisher's z at the edge of 4 candidates, an interval
    # from their sampling variance (never zero width), inside (-1, 1)
    spearman = by["logme"]["spearman"]
    assert spearman["mean"] == pytest.approx(1.0 - 0.5 / 16)
    assert 0 < spearman["low"] < spearman["mean"] < spearman["high"] < 1
    assert by["logme"]["kendall"]["mean"] == pytest.approx(1.0 - 0.5 / 16)
    assert by["logme"]["verdict"] == "reproduced"
    assert by["h_score"]["verdict"] == "contradicted"


def test_choosing_by_estimator_vs_by_validation_and_its_time():
    entry = ft_scores.choices(part2_records(), _config())[0]
    assert entry["budget"] == "all" and entry["candidates"] == 4
    # validation picks transfer/fc6 (val 0.90+), whose test accuracy is 0.70+
    assert entry["validation"] == pytest.approx({0: 0.70, 1: 0.71, 2: 0.72})
    assert entry["oracle"] == pytest.approx({0: 0.80, 1: 0.81, 2: 0.82})
    logme = entry["estimators"]["logme"]
    assert logme["picked"] == pytest.approx(entry["validation"])  # same pick
    assert logme["regret"]["mean"] == pytest.approx(0.0)
    h = entry["estimators"]["h_score"]  # picks random/conv2 (test 0.60+)
    assert h["picked"] == pytest.approx({0: 0.60, 1: 0.61, 2: 0.62})
    # Scoring: per source 0.5 s forward pass + its two layers' estimator time.
    assert logme["time"] == pytest.approx(2 * (0.5 + 2 * 0.01))
    # Probing: 4 probes of 2 s and one 1 s extraction per source.
    assert entry["probe_time"] == pytest.approx(4 * 2.0 + 2 * 1.0)


def test_the_grid_measures_the_candidates_of_its_own_seed(tmp_path):
    grid = [
        {
            "treatment": "AnB",
            "kind": "transfer",
            "seed": 0,
            "n": 3,
            "target": "B",
            "test_accuracy": 0.9,
            "split": "random",
        },
        {
            "treatment": "AnB+",
            "kind": "transfer",
            "seed": 0,
            "n": 3,
            "target": "B",
            "test_accuracy": 0.95,
            "split": "random",
        },
        {
            "treatment": "random",
            "kind": "random",
            "seed": 0,
            "n": 2,
            "target": "B",
            "test_accuracy": 0.8,
            "split": "random",
        },
        {
            "treatment": "AnB",
            "kind": "transfer",
            "seed": 1,
            "n": 3,
            "target": "B",
            "test_accuracy": 0.5,
            "split": "random",
        },
        {
            "treatment": "baseB",
            "kind": "base",
            "seed": 0,
            "n": 0,
            "target": "B",
            "test_accuracy": 0.97,
            "split": "random",
        },
        {
            "treatment": "baseB",
            "kind": "base",
            "seed": 1,
            "n": 0,
            "target": "B",
            "test_accuracy": 0.97,
            "split": "random",
        },
    ]
    config = ft_plan.Config(seeds=(0, 1), grid_workdir=str(tmp_path))
    tagged = fine_tuning.scores._grid_for_seeds(grid, config)
    measured = ft_scores.measured_table([], tagged)
    # Split seed 0: the grid's seed-0 nets are the sources of every study seed;
    # its random control matches only the study's seed 0 (same initialisation).
    assert measured["grid frozen"] == {
        (0, "all", "transfer", "conv3"): 0.9,
        (1, "all", "transfer", "conv3"): 0.9,
        (0, "all", "random", "conv2"): 0.8,
    }
    assert measured["grid fine-tuned"][(1, "all", "transfer", "conv3")] == 0.95
    with pytest.raises(ValueError, match="not a transfer-grid work directory"):
        ft_plan.grid_records(config)


def test_the_untrained_candidate_is_the_grids_random_control():
    config = ft_plan.Config(model=models.ModelConfig(**TINY))
    task = types.SimpleNamespace(image_shape=(28, 28, 1), num_classes=5)
    ours = ft_execution.random_net(config, task, 3, "float32")
    # what the grid's random control of seed 3 at n = 4 is built from
    template = models.build_base_net(task.image_shape, task.num_classes, **TINY)
    grid = models.random_frozen_net(template, 4, task.num_classes, 3, "float32")
    for name in models.LAYER_NAMES[:4]:
        for a, b in zip(
            ours.get_layer(name).get_weights(),
            grid.get_layer(name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_scores_of_a_perfect_head_and_of_constant_features():
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = 50.0 * np.eye(3)[labels]
    leep = estimators.score("leep", "fc8", logits, labels)
    nce = estimators.score("nce", "fc8", logits, labels)
    assert leep["score"] == pytest.approx(0.0, abs=1e-9) and nce["score"] == 0.0
    dead = estimators.score("logme", "conv5", np.zeros((6, 4)), labels)
    assert dead["score"] is None and "all zero" in dead["error"]
    rng = np.random.default_rng(0)
    ok = estimators.score("logme", "fc6", rng.normal(size=(6, 4)), labels)
    assert ok["converged"] and ok["seconds"] >= 0 and ok["dim"] == 4


class _StubContext:
    """What a scoring run reads of its context: the config, the target task and
    the candidate net."""

    def __init__(self, config, task, net):
        self.config, self._task, self._net = config, task, net

    def task(self, k=None, seed=0, half=None):
        return self._task

    def net(self, source, seed):
        return self._net


def _task(count=30, classes=3, shape=(32, 32, 3), seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(count) % classes
    x = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
    return data.Task("fake", ("a", "b", "c"), (0, 1, 2), x, y, x, y, x, y)


def test_a_backbone_is_scored_on_its_output_without_a_head():
    config = ft_plan.Config(
        seeds=(0,),
        strategies=(),
        sources=(),
        backbones=("MobileNetV3Small",),
        backbone_weights=None,
        backbone_image_size=32,
    )
    runs = ft_plan.expand(config)
    assert [r.key for r in runs] == [
        "seed0/score_MobileNetV3Small/k10",
        "seed0/score_MobileNetV3Small/kall",
        "seed0/probe_MobileNetV3Small/output/k10",
        "seed0/probe_MobileNetV3Small/output/kall",
    ]
    assert all(not r.needs() for r in runs)
    task = _task()
    net = backbones.backbone("MobileNetV3Small", task.image_shape, None, 32)
    context = _StubContext(config, task, net)
    record = fine_tuning.execution._execute_score(runs[1], context, None)
    assert {(e["layer"], e["estimator"]) for e in record["scores"]} == {
        ("output", "logme"),
        ("output", "h_score"),
    }
    assert record["num_train"] == 30 and record["extract_time"] > 0


def test_summary_rows_quote_the_records():
    records = part1_records() + part2_records()
    config = _config(strategies=("freeze", "fine_tune", "scratch"), budgets=(1, None))
    summary = ft_summary.summarize(records, config)
    # the at-chance run is named among the caveats, and left out of the cells
    caveats = [b for b in summary.blocks if isinstance(b, report_lib.Bullets)]
    assert any("`x`" in item for b in caveats for item in b.items)
    table = summary.table("strategies")
    assert (
        table.columns[1].name == "k=1" and table.columns[2].name == "all (~360/class)"
    )
    freeze = table.records()[0]
    assert freeze["k=1"]["mean"] == pytest.approx(0.62)
    assert freeze["k=1"]["count"] == 3 and freeze["k=1"]["low"] < 0.62
    fine_tune = table.records()[1]
    assert fine_tune["k=1"]["count"] == 3  # seed 3's run at chance is left out
    rec = {r["budget"]: r for r in summary.table("recommendation").records()}
    assert rec["1"]["recommended"].value == "freeze" and rec["1"]["recommended"].bold
    assert rec["1"]["mean val top-1"] == pytest.approx(0.61)
    assert rec["1"]["its test top-1"]["mean"] == pytest.approx(0.62)
    assert rec["all"]["recommended"].value == "fine_tune"
    assert rec["1"]["per-seed choice (seed: strategy)"] == (
        "0: freeze, 1: freeze, 2: freeze"
    )
    claims = {r["#"]: r for r in summary.table("claims").records()}
    assert claims["1/k1"]["holds in"] == "3 of 3"
    assert claims["1/k1"]["verdict"].value == "reproduced"
    assert claims["1/k1"]["ours: mean [95% CI] (n)"].value["mean"] == pytest.approx(
        0.08
    )
    assert summary.table("freeze_cuts").rows == [
        ["1", "0: 7, 1: 7, 2: 7"],
        ["all", "0: 3, 1: 3, 2: 3"],
    ]
    stopping = {r["nets"]: r for r in summary.table("stopping").records()}
    assert (
        stopping["fine_tune"]["runs"] == 7 and stopping["fine_tune"]["at chance"] == 1
    )
    assert stopping["freeze"]["stop reasons"] == "converged 12"
    assert stopping["scratch"]["mean training time (s)"] == pytest.approx(3.0)
    # part 2: correlations, the best ranker, the choices, the times
    corr = summary.table("correlations").records()
    logme = next(r for r in corr if (r["estimator"], r["ranks"]) == ("logme", "layer"))
    assert logme["candidates"] == 4 and logme["Spearman rho"]["count"] == 3
    # rho = 0.63 in all 3 seeds over 4 candidates: identical seeds, but 4
    # candidates cannot show a correlation (Fisher z's sampling variance)
    assert logme["Spearman rho"]["mean"] == pytest.approx(0.6325, abs=1e-4)
    assert logme["Spearman rho"]["low"] < 0 and logme["rho > 0"] == "not resolved"
    choice = {r["choice"]: r for r in summary.table("choices").records()}
    assert choice["highest h_score"]["regret (points)"]["mean"] == pytest.approx(0.10)
    assert choice["highest logme"]["test top-1"]["mean"] == pytest.approx(0.71)
    assert choice["highest logme"]["speed-up vs probing"] == pytest.approx(
        10.0 / (2 * (0.5 + 2 * 0.01))
    )
    assert choice["(best test top-1 of any candidate)"]["candidates"] is None
    times = dict(summary.table("times").rows)
    assert times == pytest.approx({"logme": 0.01, "h_score": 0.02, "leep": 0.001})


def test_report_renders_the_summary_and_the_records(tmp_path):
    records = part1_records() + part2_records()
    config = _config(strategies=("freeze", "fine_tune", "scratch"), budgets=(1, None))
    out = ft_summary.report(records, config)
    assert set(out) == {
        "summary.md",
        "summary.csv",
        "scores.csv",
        "strategies.png",
        "estimators.png",
    }
    assert out["summary.md"] == report_lib.markdown(
        ft_summary.summarize(records, config)
    )
    for name in ("strategies.png", "estimators.png"):
        assert out[name][:8] == b"\x89PNG\r\n\x1a\n", name
    assert out["scores.csv"].count("\n") == 1 + 3 * 2 * (2 * 2 + 1)
    header, *rows = out["summary.csv"].splitlines()
    assert header.split(",") == list(fine_tuning.summary.CSV_FIELDS)
    assert len(rows) == len(records) - len([r for r in records if r["kind"] == "score"])
    first = dict(zip(header.split(","), rows[0].split(","), strict=True))
    assert first["test_accuracy"] == "0.700000" and first["at_chance"] == "False"
    # without strategies, part 1 says so and has no tables
    part2 = ft_summary.summarize(part2_records(), _config(strategies=()))
    assert "strategies" not in [t.name for t in part2.tables()]
    assert "correlations" in [t.name for t in part2.tables()]


# ------------------------------------------------------------------- smoke run


@pytest.mark.slow
def test_fine_tuning_smoke(fine_tuning_smoke):
    work, records, proc = (
        fine_tuning_smoke.workdir,
        fine_tuning_smoke.records,
        fine_tuning_smoke.finished,
    )
    by_key = {r["key"]: r for r in records}
    # the autoencoder, the transfer source, 7 strategies, and per candidate
    # source (transfer, random, autoencoder) one scoring and two probes
    assert len(records) == 1 + 1 + 7 + 3 * 3 == len(by_key)
    assert "[18/18]" in proc.stderr and "ETA" in proc.stderr
    for name in ("config.json", "summary.md", "summary.csv", "scores.csv"):
        assert (work / name).is_file(), name
    for name in ("strategies.png", "estimators.png"):
        png = (work / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name

    strategies = [r for r in records if r["kind"] == "strategy"]
    assert {r["arm"] for r in strategies} == set(ft_plan.STRATEGIES)
    for r in strategies:
        assert r["num_train"] == 5 * 40 and r["test_examples"] == 500, r["key"]
        assert r["epochs_total"] >= 1 and r["stages"], r["key"]
        assert all(s["stop_reason"] in ("epoch cap", "converged") for s in r["stages"])
    assert len(by_key["seed0/lp_ft/kall"]["stages"]) == 2
    source = by_key["seed0/source_transfer"]
    assert source["num_classes"] == 5 and not source["at_chance"]
    # The source net is read back by the study only: model.keras, no SavedModel.
    source_dir = work / "runs" / "seed0" / "source_transfer"
    assert (source_dir / export.KERAS_FILE).is_file()
    assert not (source_dir / export.SAVED_MODEL_DIR).exists()
    # every estimator scored every layer of each candidate (LEEP/NCE: heads)
    scores = by_key["seed0/score_transfer/kall"]["scores"]
    assert {(e["layer"], e["estimator"]) for e in scores} == {
        ("conv2", "logme"),
        ("conv2", "h_score"),
        ("fc6", "logme"),
        ("fc6", "h_score"),
        ("fc8", "leep"),
        ("fc8", "nce"),
    }
    assert all(e["score"] is not None and e["seconds"] >= 0 for e in scores)
    assert {e["layer"] for e in by_key["seed0/score_autoencoder/kall"]["scores"]} == {
        "conv2",
        "code",
    }
    probe = by_key["seed0/probe_random/fc6/kall"]
    assert probe["num_train"] == 200 and probe["test_accuracy"] > 0.5  # chance 0.2

    # summary.md renders the summary's rows, which quote the records: the
    # recommendation at all labels, one seed (no verdict), part 2's tables.
    summary = ft_summary.summarize(records, fine_tuning_smoke.config)
    assert (work / "summary.md").read_text() == report_lib.markdown(summary)
    caveats = [b for b in summary.blocks if isinstance(b, report_lib.Bullets)]
    assert any("rests on 1 seed" in item for b in caveats for item in b.items)
    cells = ft_summary.strategy_cells(records)
    rec = ft_summary.recommend(cells, "all", ft_plan.STRATEGIES)
    (row,) = summary.table("recommendation").records()
    assert row["recommended"].value == rec["strategy"]
    assert row["mean val top-1"] == pytest.approx(rec["val_accuracy"])
    claims = ft_summary.claims(cells, ["all"])
    assert claims and {f.outcome for f in claims} == {"not resolved"}
    assert summary.table("claims").column("verdict")[0].value == claims[0].verdict
    stopping = {r["nets"]: r for r in summary.table("stopping").records()}
    assert set(stopping) == set(ft_plan.STRATEGIES)
    lp_ft = by_key["seed0/lp_ft/kall"]
    assert stopping["lp_ft"]["median epochs"] == lp_ft["epochs_total"]
    assert {t.name for t in summary.tables()} >= {"correlations", "choices", "times"}


@pytest.mark.slow
def test_a_finished_study_is_listed_and_another_configuration_refused(
    fine_tuning_smoke,
):
    work = fine_tuning_smoke.workdir
    listed = run_main("fine_tuning", "--preset=smoke", f"--workdir={work}", "--dry_run")
    assert listed.stdout.count(" done ") == 18 and "pending" not in listed.stdout
    assert_refused(
        fine_tuning_smoke, "--l2_sp_alpha=0.5", because="l2_sp_alpha: 0.1 -> 0.5"
    )


@pytest.mark.slow
def test_the_smoke_summarys_verdicts_agree_with_their_p_values(fine_tuning_smoke):
    smoke = fine_tuning_smoke
    summary_ = ft_summary.summarize(smoke.records, smoke.config)
    assert assert_verdicts_agree(summary_) > 0
