"""The word-embeddings study: expansion and what each run depends on, the task's
split and encoding, the classifier, the claims computed from records, and a
smoke run of experiments/word_embeddings.py on a tiny planted corpus as a user
runs it (resume, refusal, the vectors readable by other tools)."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest

from conftest import assert_refused, assert_verdicts_agree, run_main, write_tiny_text
from transfer_tf import embeddings, results
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import report
from transfer_tf.studies import word_embeddings as study_we
from transfer_tf.studies.word_embeddings import execution, plan, summary

STUDY = study_we.STUDY


def smoke_config(tmp_path, **changes):
    task, other = write_tiny_text(tmp_path)
    config = STUDY.preset("smoke")
    data = dataclasses.replace(
        config.data, task_dir=str(task), out_of_domain=str(other)
    )
    return dataclasses.replace(config, data=data, **changes)


# ------------------------------------------------------------------ the plan


def test_expand_pretrains_each_source_and_seed_before_the_classifiers():
    config = STUDY.preset("default")
    runs = plan.expand(config)
    pretrains = [r for r in runs if r.kind == "pretrain"]
    trains = [r for r in runs if r.kind == "train"]
    assert len(pretrains) == 3 * 3  # seeds x sources
    # per seed and budget: scratch + 3 sources x 3 pretrained arms
    assert len(trains) == 3 * 4 * (1 + 3 * 3)
    assert runs[: len(pretrains)] == pretrains
    keys = {r.key for r in runs}
    assert {
        "pretrain/both/seed2",
        "seed0/scratch/k10",
        "seed1/in_domain/fine_tuned_low/kall",
    } <= keys
    run = plan.Run("train", 1, k=100, arm="frozen", source="out_of_domain")
    assert run.needs() == ["pretrain/out_of_domain/seed1"]
    assert run.line == "frozen:out_of_domain"
    assert plan.Run("train", 1, arm="scratch").needs() == []
    only_scratch = config_lib.override(config, {"arms": ("scratch",)})
    assert all(r.kind == "train" for r in plan.expand(only_scratch))


def test_each_run_depends_only_on_what_changes_its_result():
    config = STUDY.preset("default")
    scratch = plan.Run("train", 0, k=10, arm="scratch")
    frozen = plan.Run("train", 0, k=10, arm="frozen", source="in_domain")
    low = plan.Run("train", 0, k=10, arm="fine_tuned_low", source="in_domain")
    pretrain = plan.Run("pretrain", 0, source="in_domain")

    def changed(changes):
        other = config_lib.override(config, changes)
        return {
            r.key
            for r in (scratch, frozen, low, pretrain)
            if config_lib.hash_of(plan.run_part(config, r))
            != config_lib.hash_of(plan.run_part(other, r))
        }

    assert changed({"training.learning_rate": 0.01}) == {
        scratch.key,
        frozen.key,
        low.key,
    }
    assert changed({"embedding.window": 3}) == {frozen.key, low.key, pretrain.key}
    assert changed({"low_rate_factor": 0.3}) == {low.key}
    assert changed({"data.max_length": 32}) == {scratch.key, frozen.key, low.key}
    assert changed({"data.split_seed": 1}) == {
        scratch.key,
        frozen.key,
        low.key,
        pretrain.key,
    }
    assert changed({"seeds": (0, 5), "neighbour_words": ("bad",)}) == set()


def test_config_errors_name_the_field():
    config = STUDY.preset("default")
    for changes, message in (
        ({"sources": ("wiki",)}, r"sources=\['wiki'\] not in"),
        ({"arms": ("frozen", "frozen")}, "has duplicates"),
        ({"pooling": "max"}, "pooling='max' is not one of"),
        ({"budgets": (10,)}, "must include 'all'"),
        ({"data.test_fraction": 1.0}, r"test_fraction=1.0 must be in \(0, 1\)"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"low_rate_factor": 0.0}, "low_rate_factor=0.0 must be > 0"),
        ({"sources": (), "arms": ("frozen",)}, "need sources"),
        ({"embedding.dimension": 0}, "dimension=0 must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            config_lib.override(config, changes)


# ---------------------------------------------------------------- the text


def test_the_task_splits_per_class_without_overlap_and_encodes_ids(tmp_path):
    config = smoke_config(tmp_path)
    corpus = execution.Corpus.read(config.data)
    assert corpus.classes == ("neg", "pos")
    assert len(corpus.sentences) == 120
    for c in (0, 1):
        of_class = corpus.split[corpus.labels == c]
        assert np.sum(of_class == "test") == 12  # 20% of 60
        assert np.sum(of_class == "validation") == 5  # 10% of the other 48
    again = execution.Corpus.read(config.data)
    assert np.array_equal(again.split, corpus.split)  # seeded
    other = execution.Corpus.read(dataclasses.replace(config.data, split_seed=1))
    assert not np.array_equal(other.split, corpus.split)
    # the in-domain pretraining text never holds a test sentence
    assert len(corpus.unlabelled()) == 120 - 24
    ids = corpus.encode([["good", "zzz", "good", "bad"], []], 3)
    index = corpus.vocabulary.index
    assert ids.tolist() == [
        [index["good"] + 2, plan.UNKNOWN, index["good"] + 2],
        [plan.PAD] * 3,
    ]
    task = corpus.task(config.data.max_length)
    assert task.x_train.shape == (120 - 24 - 10, 16) and task.x_train.dtype == np.int32
    small = task.subset(5, seed=0)
    assert np.bincount(small.y_train).tolist() == [5, 5]
    # a few sentences (rank-2 arrays) are repeated until a pass has 2 steps:
    # 10 sentences x 4 = 40, three batches of 16
    assert small.train_dataset(16, 0, min_steps=2).cardinality() == 3


def test_bad_text_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="task directory .* does not exist"):
        execution.read_task(tmp_path / "nowhere")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.pos").write_text("good film\n")
    with pytest.raises(ValueError, match="holds 1 class file"):
        execution.read_task(tmp_path / "one")
    (tmp_path / "one" / "b.pos").write_text("fine film\n")
    with pytest.raises(ValueError, match=r"several files name class\(es\) \['pos'\]"):
        execution.read_task(tmp_path / "one")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "x.pos").write_text("good film\n")
    (tmp_path / "two" / "x.neg").write_bytes(b"bad \xff film\n")
    with pytest.raises(ValueError, match="class 'neg' file .* is not UTF-8"):
        execution.read_task(tmp_path / "two")
    with pytest.raises(ValueError, match="out-of-domain text .* does not exist"):
        execution.read_text(tmp_path / "missing.txt")
    assert execution.cut_to([["a", "b", "c"], ["d", "e"]], 4) == [
        ["a", "b", "c"],
        ["d"],
    ]


def test_a_class_file_of_one_long_line_is_a_clear_error(tmp_path):
    config = smoke_config(tmp_path)
    task = pathlib.Path(config.data.task_dir)
    (task / "tiny.pos").write_text(" ".join(["good"] * 20_000) + "\n")
    with pytest.raises(ValueError, match=r"class 'pos' .* holds 1 sentence") as e:
        execution.Corpus.read(config.data)
    assert "20,000 tokens: put one sentence per line" in str(e.value)


def test_pretrained_rows_are_copied_scaled_and_unknown_words_start_at_zero(tmp_path):
    corpus = execution.Corpus.read(smoke_config(tmp_path).data)
    vectors = np.array([[2.0, 0.0], [0.0, -2.0], [4.0, 4.0]], np.float32)
    matrix, hits = execution.initial_vectors(
        corpus, ["good", "bad", "nowhere"], vectors
    )
    rms = np.sqrt(np.mean(vectors**2))
    index = corpus.vocabulary.index
    assert hits == 2
    assert np.allclose(matrix[index["good"] + 2], vectors[0] / rms)
    assert np.allclose(matrix[index["bad"] + 2], vectors[1] / rms)
    covered = {index["good"] + 2, index["bad"] + 2}
    others = [i for i in range(len(matrix)) if i not in covered]
    assert not matrix[others].any()  # padding, unknown, uncovered words


@pytest.mark.parametrize("pooling", ["mean", "conv"])
def test_the_classifier_ignores_padding_and_freezes_on_request(tmp_path, pooling):
    config = smoke_config(tmp_path, pooling=pooling, dropout=0.0)
    initial = np.random.default_rng(0).normal(size=(30, 16)).astype(np.float32)
    initial[plan.PAD] = 0.0
    model = execution.classifier(
        config, 30, 2, seed=0, initial=initial, trainable=False
    )
    embedding = model.get_layer("embedding")
    assert not embedding.trainable
    assert np.array_equal(embedding.get_weights()[0], initial)
    trainable = execution.classifier(config, 30, 2, seed=0)
    assert trainable.get_layer("embedding").trainable
    short = np.zeros((1, 16), np.int32)
    short[0, :3] = [5, 6, 7]
    longer = short.copy()
    longer[0, 3] = 8
    a, b = model.predict(short, verbose=0), model.predict(longer, verbose=0)
    assert not np.allclose(a, b)  # the words count ...
    if pooling == "mean":
        # ... and padding does not: a mean over the three words alone
        hidden = initial[[5, 6, 7]].mean(0)
        w, bias = model.get_layer("logits").get_weights()
        assert np.allclose(a[0], hidden @ w + bias, atol=1e-5)


# ---------------------------------------------------------------- the claims


def _record(line, budget, seed, hits):
    hits = np.asarray(hits, dtype=bool)
    arm, _, source = line.partition(":")
    return {
        "kind": "train",
        "key": f"seed{seed}/{line}/k{budget}",
        "line": line,
        "arm": arm,
        "source": source or None,
        "budget": budget,
        "seed": seed,
        "test_accuracy": float(hits.mean()),
        "val_accuracy": float(hits.mean()),
        "test_correct": results.pack_bits(hits),
        "test_examples": len(hits),
        "test_set": "same",
        "num_train": 20 if budget != "all" else 2000,
        "num_classes": 2,
        "wall_time": 1.0,
    }


PLANTED = {
    ("scratch", "10"): 0.55,
    ("frozen:in_domain", "10"): 0.70,
    ("fine_tuned:in_domain", "10"): 0.60,
    ("frozen:out_of_domain", "10"): 0.58,
    ("scratch", "all"): 0.78,
    ("frozen:in_domain", "all"): 0.70,
    ("fine_tuned:in_domain", "all"): 0.78,
    ("frozen:out_of_domain", "all"): 0.60,
}


def _planted_records(n=2000, seeds=(0, 1, 2), **changes):
    """Per-sentence hits at the accuracies of :data:`PLANTED` (``changes``:
    ``line_budget=accuracy``) plus a seed's jitter: pretrained vectors help at
    k=10 and not with all labels, in-domain beats out-of-domain, fine-tuning
    helps only with all labels (the three claims hold)."""
    accuracy = dict(PLANTED)
    for name, value in changes.items():
        line, budget = name.rsplit("_", 1)
        accuracy[(line.replace("__", ":"), budget)] = value
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for (line, budget), p in accuracy.items():
            p = p + rng.uniform(-0.01, 0.01)
            out.append(_record(line, budget, seed, rng.random(n) < p))
    return out


def test_claims_are_computed_from_per_sentence_hits_with_holm():
    config = STUDY.preset("default")
    aggregate = summary.cells(_planted_records())
    # the pretrained arm a user would take: the validation-best, per seed
    assert aggregate["chosen"][("in_domain", "10")] == ["frozen"] * 3
    assert aggregate["chosen"][("in_domain", "all")] == ["fine_tuned"] * 3
    findings = {f.key: f for f in summary.claims(aggregate, config)}
    assert set(findings) == {"1a", "1b", "2", "3a", "3b"}  # each claim once
    assert findings["1a"].outcome == "reproduced"  # frozen 0.70 - 0.55
    assert findings["1b"].outcome == "reproduced"  # +15 vs 0
    assert findings["2"].outcome == "reproduced"
    assert findings["3a"].outcome == "reproduced"  # +8 with all labels
    assert findings["3b"].outcome == "reproduced"  # +8 - (-10)
    records = aggregate["records"]

    def test(line, budget):
        return records[(line, budget)][0]["test_accuracy"]

    assert findings["1a"].values[0] == pytest.approx(
        test("chosen:in_domain", "10") - test("scratch", "10")
    )
    assert findings["3b"].values[0] == pytest.approx(
        test("fine_tuned:in_domain", "all")
        - test("frozen:in_domain", "all")
        - test("fine_tuned:in_domain", "10")
        + test("frozen:in_domain", "10")
    )
    # the interval counts the test sentences: never narrower than their
    # sampling alone makes it (hits of two arms on 2,000 sentences, 3 seeds)
    iv = findings["1a"].interval
    sampling = np.sqrt((0.70 * 0.30 + 0.55 * 0.45) / 2000 / 3)
    assert iv["high"] - iv["mean"] >= 1.959 * sampling * 0.95 and iv["df"] >= 2
    # a scratch net better than every pretrained one contradicts 1a
    better = summary.cells(_planted_records(scratch_10=0.85))
    contradicted = {f.key: f for f in summary.claims(better, config)}
    assert contradicted["1a"].outcome == "contradicted"
    # one seed: nothing resolved
    single = summary.claims(summary.cells(_planted_records(seeds=(0,))), config)
    assert {f.outcome for f in single} == {"not resolved"}
    text = report.markdown(summary.summarize(_planted_records(), config))
    row = next(line for line in text.splitlines() if line.startswith("| 1a |"))
    assert row.rstrip(" |").endswith("| reproduced")  # family-wise (Holm) too


def test_scarce_budgets_are_one_claim_and_the_pieces_are_shown_untested():
    # Two scarce budgets: the scarce side of each claim is their mean, and the
    # family is still five rows (before: 1a, 1b, 2a per budget, 3b per budget).
    config = STUDY.preset("default")
    records = _planted_records(
        scratch_100=0.65,
        frozen__in_domain_100=0.72,
        fine_tuned__in_domain_100=0.70,
        frozen__out_of_domain_100=0.60,
    )
    aggregate = summary.cells(records)
    assert aggregate["budgets"] == ["10", "100", "all"]
    findings = {f.key: f for f in summary.claims(aggregate, config)}
    assert len(findings) == 5

    def test(line, budget, seed=1):
        return aggregate["records"][(line, budget)][seed]["test_accuracy"]

    gains = [test("chosen:in_domain", k) - test("scratch", k) for k in ("10", "100")]
    assert findings["1a"].values[1] == pytest.approx(np.mean(gains))
    assert findings["1b"].values[1] == pytest.approx(
        np.mean(gains) - test("chosen:in_domain", "all") + test("scratch", "all")
    )
    frozen = [
        test("frozen:in_domain", k) - test("frozen:out_of_domain", k)
        for k in ("10", "100", "all")
    ]
    assert findings["2"].values[1] == pytest.approx(np.mean(frozen))
    assert "mean over k=10, 100" in findings["1a"].measure
    pieces = summary.pieces(aggregate)
    assert pieces.column("difference")[-1] == "fine-tuned − frozen (in-domain)"
    tuned = pieces.rows[-1][1:]
    assert tuned[0]["mean"] == pytest.approx(
        np.mean(
            [
                test("fine_tuned:in_domain", "10", s)
                - test("frozen:in_domain", "10", s)
                for s in (0, 1, 2)
            ]
        )
    )
    assert all(iv["low"] < iv["mean"] < iv["high"] for iv in tuned)
    text = report.markdown(summary.summarize(records, config))
    assert "## The claims' differences per budget" in text


# ------------------------------------------------------------------- smoke


@pytest.mark.slow
def test_the_smoke_run_reports_every_run_and_writes_readable_vectors(
    word_embeddings_smoke,
):
    smoke = word_embeddings_smoke
    assert smoke.finished.returncode == 0
    runs = plan.expand(smoke.config)
    assert sorted(r["key"] for r in smoke.records) == sorted(r.key for r in runs)
    pretrain = next(r for r in smoke.records if r["key"] == "pretrain/in_domain/seed0")
    assert pretrain["vocabulary"] > 10 and pretrain["task_words_covered"] == 1.0
    assert set(pretrain["neighbours"]) == {"good"}
    assert len(pretrain["neighbours"]["good"]) == 5
    assert set(pretrain["projection"]) <= {"good", "bad", "fine", "awful", "plot"}
    # out-of-domain text of the in-domain corpus's size
    other = next(r for r in smoke.records if r["key"] == "pretrain/out_of_domain/seed0")
    assert other["corpus_tokens"] == pretrain["corpus_tokens"]
    both = next(r for r in smoke.records if r["key"] == "pretrain/both/seed0")
    assert both["corpus_tokens"] == pretrain["corpus_tokens"] + 3000
    path = smoke.workdir / "runs" / "pretrain" / "in_domain" / "seed0" / "vectors.txt"
    words, vectors = embeddings.load_word2vec(path)
    assert len(words) == pretrain["vocabulary"] and vectors.shape[1] == 16
    gensim = pytest.importorskip("gensim")
    loaded = gensim.models.KeyedVectors.load_word2vec_format(str(path))
    assert np.allclose(loaded["good"], vectors[words.index("good")], atol=1e-5)
    trained = [r for r in smoke.records if r["kind"] == "train"]
    frozen = [r for r in trained if r["arm"] == "frozen"]
    assert all(r["pretrained_words"] > 0 for r in frozen)
    low = next(r for r in trained if r["arm"] == "fine_tuned_low")
    assert low["learning_rate"] == pytest.approx(
        smoke.config.training.learning_rate * smoke.config.low_rate_factor
    )
    text = (smoke.workdir / "summary.md").read_text()
    for heading in (
        "Pretraining the word vectors",
        "Test top-1 per label budget",
        "Gain over scratch",
        "Claims judged by this run",
        "Nearest neighbours by cosine",
    ):
        assert heading in text
    for name in ("label_budget.png", "projection.png", "summary.csv", "findings.csv"):
        assert (smoke.workdir / name).stat().st_size > 0


@pytest.mark.slow
def test_a_rerun_skips_finished_runs_and_another_setting_is_refused(
    word_embeddings_smoke, tmp_path
):
    smoke = word_embeddings_smoke
    data = smoke.config.data
    flags = [f"--task_dir={data.task_dir}", f"--out_of_domain={data.out_of_domain}"]
    rerun = run_main(
        "word_embeddings", "--preset=smoke", f"--workdir={smoke.workdir}", *flags
    )
    assert "0 to run" in rerun.stderr + rerun.stdout
    assert_refused(smoke, *flags, "--window=2", because="window")
    missing = run_main(
        "word_embeddings",
        "--preset=smoke",
        f"--workdir={tmp_path / 'w'}",
        f"--task_dir={tmp_path / 'none'}",
        check=False,
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_the_smoke_summarys_verdicts_agree_with_their_p_values(word_embeddings_smoke):
    smoke = word_embeddings_smoke
    summary_ = summary.summarize(smoke.records, smoke.config)
    assert assert_verdicts_agree(summary_) > 0
