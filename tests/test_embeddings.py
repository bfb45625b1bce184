"""text and embeddings: vocabulary, word2vec's sampling rules, skip-gram and
CBOW examples, SGNS/CBOW learning a planted structure, 3CosAdd, WordSim
Spearman, the word2vec text format (read back by gensim when it is installed),
and the shared corpora read where they exist."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from transfer_tf import embeddings, text

SHARED_TEXT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def test_the_vocabulary_keeps_frequent_words_by_count_and_drops_the_rest():
    sentences = [["b", "a", "a", "c"], ["a", "b", "d"]]
    vocab = text.Vocabulary.build(sentences, min_count=2)
    assert vocab.words == ("a", "b") and vocab.counts == (3, 2)
    encoded = vocab.encode([["a", "c", "b", "zz"]])
    assert encoded[0].tolist() == [0, 1]  # unknown words dropped
    assert text.Vocabulary.build(sentences, 1, max_size=3).words == ("a", "b", "c")
    with pytest.raises(ValueError, match="no word occurs 9 times"):
        text.Vocabulary.build(sentences, min_count=9)


def test_subsampling_and_negatives_follow_word2vecs_formulas():
    vocab = text.Vocabulary(("the", "cat", "rare"), (9000, 990, 10))
    keep = text.keep_probabilities(vocab, sample=1e-3)
    f = np.array([0.9, 0.099, 0.001])
    np.testing.assert_allclose(keep, np.minimum(1, (np.sqrt(f / 1e-3) + 1) * 1e-3 / f))
    assert keep[0] < keep[1] < keep[2] == 1.0
    assert (text.keep_probabilities(vocab, 0) == 1).all()
    dist = text.negative_distribution(vocab)
    np.testing.assert_allclose(dist, f**0.75 / (f**0.75).sum())
    draws = text.negatives(200_000, 2, dist, np.random.default_rng(0))
    counts = np.bincount(draws.ravel(), minlength=3) / draws.size
    np.testing.assert_allclose(counts, dist, atol=0.005)


def test_long_sentences_are_cut_into_pieces_without_losing_a_token():
    pieces = text.split_long([list("abcdefg"), list("xy")], size=3)
    assert pieces == [list("abc"), list("def"), ["g"], list("xy")]
    with pytest.raises(ValueError, match="size=1"):
        text.split_long([["a"]], size=1)


def test_skipgram_pairs_stay_in_the_window_and_the_sentence():
    sequences = [np.array([0, 1, 2, 3]), np.array([4, 5])]
    rng = np.random.default_rng(0)
    centres, contexts = text.skipgram_pairs(sequences, 1, rng, dynamic=False)
    pairs = sorted(zip(centres.tolist(), contexts.tolist(), strict=True))
    assert pairs == sorted(
        [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (4, 5), (5, 4)]
    )  # never across sentences, never a word with itself
    wide = text.skipgram_pairs(sequences, 2, rng, dynamic=False)
    assert len(wide[0]) == 8 + 4  # (0,2), (2,0), (1,3), (3,1) added
    # the dynamic window draws 1..window: on average fewer, never more pairs
    sizes = [len(text.skipgram_pairs(sequences, 2, rng)[0]) for _ in range(50)]
    assert 8 <= min(sizes) and max(sizes) <= 12 and np.mean(sizes) < 12
    contexts, centres = text.cbow_windows(sequences, 1, rng, dynamic=False)
    assert contexts.shape == (6, 2) and centres.tolist() == [0, 1, 2, 3, 4, 5]
    assert sorted(contexts[0].tolist()) == [-1, 1]  # padded with -1
    assert sorted(contexts[1].tolist()) == [0, 2]


def _planted_corpus(sentences=1500, seed=0):
    """Two topics that never meet: animals with pet words, vehicles with road
    words; a word's neighbours must be its own topic's."""
    rng = np.random.default_rng(seed)
    topics = [
        ["cat", "dog", "mouse", "horse", "fur", "pet", "tail", "paw"],
        ["car", "bus", "truck", "train", "road", "wheel", "engine", "fuel"],
    ]
    return [list(rng.choice(topics[i % 2], 8)) for i in range(sentences)], topics


@pytest.mark.parametrize("architecture", ["skipgram", "cbow"])
def test_word_vectors_learn_which_words_share_contexts(architecture):
    corpus, topics = _planted_corpus()
    config = embeddings.EmbeddingConfig(
        architecture,
        dimension=16,
        window=2,
        min_count=1,
        sample=0,
        epochs=3,
        learning_rate=0.05 if architecture == "cbow" else 0.025,
        batch_size=256,
    )
    trained = embeddings.train(corpus, config, verbose=False)
    assert trained.vectors.shape == (16, 16) and trained.words == 1500 * 8
    assert trained.losses[-1] < trained.losses[0]  # it learnt
    assert trained.words_per_second > 0
    for topic in topics:
        near = embeddings.neighbours(trained.vectors, trained.vocabulary, topic[0], 5)
        assert {w for w, _ in near} <= set(topic), near
    with pytest.raises(KeyError, match="'zebra' is not in the vocabulary"):
        embeddings.neighbours(trained.vectors, trained.vocabulary, "zebra")


def test_3cosadd_answers_a_planted_analogy_and_counts_what_it_asked():
    words = ("man", "woman", "king", "queen", "apple")
    vocab = text.Vocabulary(words, (5, 4, 3, 2, 1))
    gender, royal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    base = np.array([0.2, 0.2, 1.0])
    vectors = np.stack(
        [base, base + gender, base + royal, base + royal + gender, [0, 0, -1.0]]
    )
    questions = [
        ("family", "man", "woman", "king", "queen"),
        ("family", "woman", "man", "queen", "king"),
        ("capitals", "man", "king", "woman", "apple"),  # wrong on purpose
        ("capitals", "man", "woman", "emperor", "empress"),  # not in vocabulary
    ]
    result = embeddings.analogies(vectors, vocab, questions)
    assert (result["correct"], result["asked"], result["total"]) == (2, 3, 4)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["sections"] == {"family": (2, 2), "capitals": (0, 1)}


def test_similarity_correlation_is_spearman_over_known_pairs(tmp_path):
    vocab = text.Vocabulary(("a", "b", "c", "d"), (4, 3, 2, 1))
    vectors = np.array([[1.0, 0], [0.9, 0.1], [0.5, 0.5], [0, 1.0]])
    path = tmp_path / "sim.tsv"
    path.write_text("# comment\na\tb\t9\na\tc\t5\na\td\t1\nA\tzz\t3\n")
    pairs = embeddings.read_similarities(path)
    assert pairs[0] == ("a", "b", 9.0) and len(pairs) == 4
    found = embeddings.similarity_correlation(vectors, vocab, pairs)
    assert found == {"spearman": pytest.approx(1.0), "pairs": 3, "total": 4}
    path.write_text("a\tb\tnine\n")
    with pytest.raises(ValueError, match="is not word, word, score"):
        embeddings.read_similarities(path)


def test_vectors_round_trip_through_word2vecs_text_format(tmp_path):
    vocab = text.Vocabulary(("über", "b"), (2, 1))
    vectors = np.array([[0.5, -1.25, 3.0], [1e-3, 0.0, 2.5]], np.float32)
    path = tmp_path / "vectors.txt"
    embeddings.save_word2vec(path, vocab, vectors)
    words, loaded = embeddings.load_word2vec(path)
    assert words == ["über", "b"]
    np.testing.assert_allclose(loaded, vectors, rtol=1e-5)
    gensim = pytest.importorskip("gensim")
    kv = gensim.models.KeyedVectors.load_word2vec_format(str(path), binary=False)
    np.testing.assert_allclose(kv["über"], vectors[0], rtol=1e-5)


def test_bad_text_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        text.read_lines(tmp_path / "missing.txt")
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"ok\n\xff\xfe broken")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        text.read_lines(binary)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="has no text"):
        text.read_lines(tmp_path / "empty.txt")
    truncated = tmp_path / "v.txt"
    truncated.write_text("2 3\na 1 2 3\nb 1 2\n")
    with pytest.raises(ValueError, match="line 3 has 2 numbers, not 3"):
        embeddings.load_word2vec(truncated)
    with pytest.raises(ValueError, match="architecture='glove'"):
        embeddings.EmbeddingConfig("glove")
    with pytest.raises(ValueError, match="no training example"):
        embeddings.train([["a"], ["a"]], embeddings.EmbeddingConfig(min_count=1))


@pytest.mark.skipif(not SHARED_TEXT.is_dir(), reason="../shared/data/text is absent")
def test_the_shared_corpora_read_as_tokenised_text():
    reviews = text.read_lines(
        [SHARED_TEXT / "rt-polarity" / f"rt-polarity.{p}" for p in ("pos", "neg")]
    )
    assert len(reviews) == 10_662
    news = text.read_lines(sorted((SHARED_TEXT / "bbc").glob("bbctext*")))
    tokens = sum(len(text.tokenize(line)) for line in news)
    assert 400_000 < tokens < 550_000
