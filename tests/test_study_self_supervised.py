"""The self-supervised study: its runs and what each depends on, the claims
computed from planted records (contrasts and contrasts of contrasts paired by
seed over test images), and the smoke run of experiments/self_supervised.py as
a user runs it (the pretexts trained on images alone, the report's tables and
figures, a rerun that trains nothing)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import assert_verdicts_agree, run_main
from transfer_tf import results
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner
from transfer_tf.studies import self_supervised as study_ss
from transfer_tf.studies.self_supervised import plan, summary

STUDY = study_ss.STUDY


# ------------------------------------------------------------------ the plan


def test_expand_runs_each_seeds_pretexts_before_what_reads_them():
    config = STUDY.preset("digits")
    runs = plan.expand(config)
    assert len({r.key for r in runs}) == len(runs)
    position = {r.key: i for i, r in enumerate(runs)}
    for run in runs:
        for needed in run.needs():
            assert position[needed] < position[run.key], run.key
    pretexts = [r for r in runs if r.kind == "pretrain"]
    assert len(pretexts) == 4 * 3  # four methods, three seeds
    # Per seed: 5 sources x 6 layers (the supervised net: 5 conv + fc6, fc7)
    # ... every one at 4 budgets; classifiers: 4 methods + supervised + scratch.
    probes = [r for r in runs if r.kind == "probe"]
    assert len(probes) == 3 * 4 * (5 * 6 + 7)
    trained = [r for r in runs if r.kind == "train"]
    assert len(trained) == 3 * 4 * 6
    keys = {r.key for r in runs}
    assert {
        "pretrain/contrastive/seed2",
        "supervised/seed0",
        "seed1/probe_rotation/conv3/flatten/k10",
        "seed0/probe_supervised/fc7/none/kall",
        "seed2/exemplar/k1",
        "seed0/scratch/kall",
    } <= keys
    run = next(r for r in runs if r.key == "seed1/probe_rotation/conv3/flatten/k10")
    assert run.needs() == ["pretrain/rotation/seed1"] and run.line == "probe:rotation"


def test_a_changed_setting_redoes_exactly_the_runs_that_depend_on_it():
    config = STUDY.preset("digits")
    runs = plan.expand(config)

    def changed(**changes):
        other = config_lib.override(config, changes)
        return sorted(
            {
                r.line if r.kind in ("probe", "train") else r.kind + ":" + str(r.arm)
                for r in runs
                if plan.run_part(config, r) != plan.run_part(other, r)
            }
        )

    assert changed(fine_tune_learning_rate=0.001) == [
        "tune:autoencoder",
        "tune:contrastive",
        "tune:exemplar",
        "tune:rotation",
        "tune:supervised",
    ]
    assert changed(**{"pretext.temperature": 0.2}) == [
        "pretrain:contrastive",
        "probe:contrastive",
        "tune:contrastive",
    ]
    assert changed(**{"pretext.exemplars": 50}) == [
        "pretrain:exemplar",
        "probe:exemplar",
        "tune:exemplar",
    ]
    # Growing the study (more seeds or budgets) keeps every finished run.
    assert not changed(seeds=(0, 1, 2, 3), budgets=(1, 5, 10, 100, None))


def test_bad_settings_are_refused_with_the_field_named():
    config = STUDY.preset("smoke")
    for changes, message in (
        ({"methods": ("jigsaw",)}, "jigsaw"),
        ({"references": ("oracle",)}, "oracle"),
        ({"init_layers": 6}, "init_layers=6 is out of range"),
        ({"pretraining.steps_per_epoch": None}, "steps_per_epoch must be set"),
        ({"pretext.temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"budgets": (1, 10)}, "all"),
    ):
        with pytest.raises(ValueError, match=message):
            config_lib.override(config, changes)


# ---------------------------------------------------------------- the claims


def _record(kind, line, budget, seed, hits, **fields):
    hits = np.asarray(hits, dtype=bool)
    return {
        "kind": kind,
        "line": line,
        "budget": budget,
        "seed": seed,
        "key": f"seed{seed}/{line}/k{budget}",
        "test_accuracy": float(hits.mean()),
        "val_accuracy": float(hits.mean()),
        "test_correct": results.pack_bits(hits),
        "test_examples": int(len(hits)),
        "test_set": "planted",
        "num_train": 50 if budget == "all" else 2 * int(budget),
        "num_classes": 2,
        **fields,
    }


def planted_records(seeds=(0, 1, 2, 3, 4), n=400):
    """Rotation's probe and fine-tuned classifier far above the untrained net
    and scratch at k=1, closer with all labels; the autoencoder equal to them."""
    rng = np.random.default_rng(0)
    out = []
    for seed in seeds:
        for budget, (low, high) in (("1", (0.55, 0.85)), ("all", (0.90, 0.95))):
            base = rng.random(n)
            for source, p in (
                ("random", low),
                ("autoencoder", low),
                ("rotation", high),
            ):
                out.append(
                    _record(
                        "probe",
                        f"probe:{source}",
                        budget,
                        seed,
                        base < p,
                        source=source,
                        layer="code",
                        pooling="none",
                        arm="probe",
                    )
                )
            for arm, p in (("scratch", low), ("autoencoder", low), ("rotation", high)):
                line = "scratch" if arm == "scratch" else f"tune:{arm}"
                out.append(_record("train", line, budget, seed, base < p, arm=arm))
    return out


def test_the_claims_are_computed_paired_by_seed_and_test_image():
    aggregate = summary.cells(planted_records())
    families = summary.claims(aggregate)
    one = {f.key: f for f in families["1"]}
    assert one["1/rotation/probe/k1"].outcome == "reproduced"
    assert one["1/rotation/fine-tuned/k1"].outcome == "reproduced"
    # Nested the same images: the autoencoder's hits equal the baseline's.
    assert one["1/autoencoder/probe/k1"].interval["mean"] == 0.0
    assert one["1/autoencoder/probe/k1"].outcome == "not resolved"
    two = {f.key: f for f in families["2"]}
    assert two["2/rotation/probe/k1"].outcome == "reproduced"
    four = {f.key: f for f in families["4"]}
    # (rotation - scratch) at k=1 - the same with all labels, by hand.
    records = aggregate["records"]
    expected = np.mean(
        [
            records[("tune:rotation", "1")][s]["test_accuracy"]
            - records[("scratch", "1")][s]["test_accuracy"]
            - records[("tune:rotation", "all")][s]["test_accuracy"]
            + records[("scratch", "all")][s]["test_accuracy"]
            for s in range(5)
        ]
    )
    assert four["4/rotation"].interval["mean"] == pytest.approx(expected)
    assert four["4/rotation"].outcome == "reproduced"
    # The interval counts the test images: it has the contrast's df.
    assert "df" in four["4/rotation"].interval


# ------------------------------------------------------------ the smoke run


@pytest.mark.slow
def test_the_smoke_run_writes_its_report_and_trains_pretexts_on_images_alone(
    self_supervised_smoke,
):
    smoke = self_supervised_smoke
    config = smoke.config
    assert {r["key"] for r in smoke.records} == {r.key for r in plan.expand(config)}
    for name in (
        "summary.md",
        "summary.csv",
        "label_budget.png",
        "probe_layers.png",
        "claim1.csv",
        "claim4.csv",
    ):
        assert (smoke.workdir / name).is_file(), name
    pretexts = [r for r in smoke.records if r["kind"] == "pretrain"]
    assert {r["arm"] for r in pretexts} == set(config.methods)
    for r in pretexts:
        assert r["steps_run"] <= config.budget_steps == r["budget_steps"]
        # the unlabelled images: every training image of the target half
        assert r["train_images"] + r["validation_images"] > 0
    rotation = next(r for r in pretexts if r["arm"] == "rotation")
    assert rotation["pretext_chance"] == 0.25
    assert (smoke.workdir / "runs/pretrain/rotation/seed0/pretext.keras").is_file()
    text = (smoke.workdir / "summary.md").read_text()
    assert "Each pretext on its own task" in text
    assert "Claim 4: the benefit of pretraining shrinks" in text
    probes = [r for r in smoke.records if r["kind"] == "probe"]
    assert all(r["test_correct"] and r["test_set"] for r in probes)
    # The report is a pure function of the records.
    assert (smoke.workdir / "summary.md").read_text() == STUDY.report(
        smoke.records, config
    )["summary.md"]


@pytest.mark.slow
def test_a_finished_study_reruns_without_training(self_supervised_smoke, tmp_path):
    work = self_supervised_smoke.copy(tmp_path / "copy")
    before = (work / runner.RESULTS_FILE).read_text()
    again = run_main("self_supervised", "--preset=smoke", f"--workdir={work}")
    assert "0 to run" in again.stderr + again.stdout
    assert (work / runner.RESULTS_FILE).read_text() == before


def test_run_keys_are_stable():
    run = plan.Run(
        "probe", 1, arm="probe", k=None, source="exemplar", layer="code", pooling="none"
    )
    assert run.key == "seed1/probe_exemplar/code/none/kall"
    assert dataclasses.replace(run, kind="pretrain", arm="exemplar").key == (
        "pretrain/exemplar/seed1"
    )


@pytest.mark.slow
def test_the_supervised_source_is_trained_probed_and_fine_tuned(tmp_path):
    config = config_lib.override(
        STUDY.preset("smoke"),
        {
            "methods": ("rotation",),
            "references": ("supervised",),
            "budgets": (None,),
            "probe_layers": ("code",),
        },
    )
    records = runner.run_study(STUDY, config, tmp_path)
    by_key = {r["key"]: r for r in records}
    assert set(by_key) == {
        "pretrain/rotation/seed0",
        "supervised/seed0",
        "seed0/probe_rotation/code/none/kall",
        "seed0/probe_supervised/fc6/none/kall",
        "seed0/probe_supervised/fc7/none/kall",
        "seed0/rotation/kall",
        "seed0/supervised/kall",
    }
    source = by_key["supervised/seed0"]
    assert source["half"] == "A" and source["test_accuracy"] > 0.2  # 5 classes
    assert (tmp_path / "runs/supervised/seed0/saved_model/saved_model.pb").is_file()
    # Fine-tuned from the source: conv1..conv5 copied, then trained.
    assert by_key["seed0/supervised/kall"]["line"] == "tune:supervised"
    text = (tmp_path / "summary.md").read_text()
    assert "fine-tuned from supervised (other half)" in text


@pytest.mark.slow
def test_the_smoke_summarys_verdicts_agree_with_their_p_values(self_supervised_smoke):
    smoke = self_supervised_smoke
    summary_ = summary.summarize(smoke.records, smoke.config)
    assert assert_verdicts_agree(summary_) > 0
