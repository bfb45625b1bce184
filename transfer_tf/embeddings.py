"""Word embeddings: skip-gram with negative sampling (SGNS) and CBOW as Keras
models, trained on :mod:`transfer_tf.text` examples, and the standard ways to
read what they learnt: nearest neighbours by cosine, analogies by 3CosAdd,
WordSim353's Spearman correlation, and export in word2vec's text format (which
gensim's ``KeyedVectors.load_word2vec_format`` reads).

Both models hold two tables, as word2vec does: ``input`` vectors (the
embeddings kept) and ``output`` vectors (of words as context). SGNS scores a
(centre, context) pair by ``input[centre] . output[context]`` and ``k`` negatives
the same way, with the logistic loss ``-log s(pos) - sum log s(-neg)``; CBOW
replaces ``input[centre]`` by the mean of the window's input vectors and scores
the centre word as the positive. Training is plain SGD with the learning rate
falling linearly to ``min_learning_rate`` over the run, the loss summed over a
batch (so a batch is the same update as word2vec's pair-by-pair steps taken
together), as the reference C code and gensim do.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from transfer_tf import text

log = logging.getLogger(__name__)

ARCHITECTURES = ("skipgram", "cbow")

# Optimizer steps per call of the compiled train function (Keras'
# ``steps_per_execution``): an SGNS step is a few microseconds of arithmetic, so
# Python's per-call overhead would dominate.
STEPS_PER_EXECUTION = 32


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    """How word vectors are trained.

    Attributes:
      architecture: ``skipgram`` (SGNS) or ``cbow``.
      dimension: vector size.
      window: the (dynamic) window's largest half-width.
      negatives: negative samples per positive.
      min_count: words seen fewer times are dropped.
      sample: word2vec's subsampling threshold (0 keeps every occurrence).
      epochs: passes over the corpus.
      learning_rate: SGD's starting rate (word2vec: 0.025 skip-gram, 0.05
        CBOW), falling linearly to ``min_learning_rate``.
      min_learning_rate: the rate at the end.
      batch_size: examples per optimizer step.
      seed: initialisation and sampling.
    """

    architecture: str = "skipgram"
    dimension: int = 100
    window: int = 5
    negatives: int = 5
    min_count: int = 5
    sample: float = 1e-3
    epochs: int = 5
    learning_rate: float = 0.025
    min_learning_rate: float = 1e-4
    batch_size: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r} is not one of "
                f"{list(ARCHITECTURES)}"
            )
        for field in ("dimension", "window", "negatives", "min_count", "epochs"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise ValueError(
                f"learning rates must satisfy 0 < min_learning_rate "
                f"({self.min_learning_rate!r}) <= learning_rate "
                f"({self.learning_rate!r})"
            )
        if self.batch_size < 1 or self.sample < 0:
            raise ValueError(
                f"batch_size={self.batch_size!r} must be >= 1 and "
                f"sample={self.sample!r} >= 0"
            )


class WordVectors(keras.Model):
    """SGNS or CBOW over a vocabulary of ``size`` words (see the module
    docstring). Called on ``(inputs, candidates)`` it returns the logits of the
    candidates (column 0 the positive, the rest negatives): for skip-gram
    ``inputs`` is ``(batch,)`` centre ids, for CBOW ``(batch, 2 * window)``
    context ids padded with -1."""

    def __init__(self, size: int, config: EmbeddingConfig, **kwargs):
        super().__init__(name=f"{config.architecture}_{size}", **kwargs)
        self.config = config
        half = 0.5 / config.dimension
        # word2vec: input vectors uniform in +-0.5/dim, output vectors zero
        self.input_table = keras.layers.Embedding(
            size,
            config.dimension,
            embeddings_initializer=keras.initializers.RandomUniform(
                -half, half, seed=config.seed
            ),
            name="input",
        )
        self.output_table = keras.layers.Embedding(
            size, config.dimension, embeddings_initializer="zeros", name="output"
        )
        self.input_table.build((None,))
        self.output_table.build((None,))

    def call(self, inputs, training=False):
        ids, candidates = inputs
        if self.config.architecture == "cbow":
            mask = tf.cast(ids >= 0, tf.float32)[..., None]
            vectors = self.input_table(tf.maximum(ids, 0)) * mask
            hidden = tf.reduce_sum(vectors, 1) / tf.maximum(tf.reduce_sum(mask, 1), 1)
        else:
            hidden = self.input_table(ids)
        return tf.einsum("bd,bkd->bk", hidden, self.output_table(candidates))

    def vectors(self) -> np.ndarray:
        """The input vectors: the embeddings, one row per word id."""
        return np.asarray(self.input_table.embeddings.numpy(), dtype=np.float32)


def _loss(labels, logits):
    """Negative sampling's loss summed over the batch."""
    return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))


def examples(
    sequences: Sequence[np.ndarray],
    vocabulary: text.Vocabulary,
    config: EmbeddingConfig,
    rng: np.random.Generator,
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """One epoch's training examples: the corpus subsampled anew, its
    skip-gram pairs or CBOW windows, the positive and ``negatives`` sampled
    words as candidates, shuffled.

    Returns:
      ``((inputs, candidates), labels)``: candidates ``(n, 1 + negatives)``,
      labels ``(n, 1 + negatives)`` float32 with 1 in column 0.
    """
    kept = text.subsample(
        sequences, text.keep_probabilities(vocabulary, config.sample), rng
    )
    if config.architecture == "cbow":
        inputs, positives = text.cbow_windows(kept, config.window, rng)
    else:
        inputs, positives = text.skipgram_pairs(kept, config.window, rng)
    negative = text.negatives(
        len(positives), config.negatives, text.negative_distribution(vocabulary), rng
    )
    candidates = np.concatenate([positives[:, None], negative], axis=1)
    order = rng.permutation(len(positives))
    labels = np.zeros(candidates.shape, np.float32)
    labels[:, 0] = 1.0
    return (inputs[order], candidates[order]), labels


@dataclasses.dataclass
class Trained:
    """Word vectors and how their training went."""

    vocabulary: text.Vocabulary
    vectors: np.ndarray
    losses: list[float]  # mean loss per example, per epoch
    words: int  # corpus tokens in the vocabulary, per epoch (before subsampling)
    seconds: float

    @property
    def words_per_second(self) -> float:
        return self.words * len(self.losses) / max(self.seconds, 1e-9)


def train(
    sentences: Sequence[Sequence[str]],
    config: EmbeddingConfig,
    vocabulary: text.Vocabulary | None = None,
    verbose: bool = True,
) -> Trained:
    """Trains word vectors on tokenised ``sentences`` (see the module
    docstring); ``vocabulary`` defaults to the sentences' own at
    ``config.min_count``.

    Raises:
      ValueError: the corpus gives no training example (too short, or every
        word below ``min_count``).
    """
    vocabulary = vocabulary or text.Vocabulary.build(sentences, config.min_count)
    sequences = vocabulary.encode(sentences)
    words = int(sum(len(s) for s in sequences))
    rng = np.random.default_rng(config.seed)
    keras.utils.set_random_seed(config.seed)
    model = WordVectors(len(vocabulary), config)
    first = examples(sequences, vocabulary, config, rng)
    per_epoch = len(first[1])
    if per_epoch == 0:
        raise ValueError(
            "the corpus gives no training example: every sentence has fewer than "
            "two words of the vocabulary (lower min_count or give more text)"
        )
    steps = math.ceil(per_epoch / config.batch_size) * config.epochs
    model.compile(
        optimizer=keras.optimizers.SGD(
            # linear (power 1) from learning_rate to min_learning_rate
            keras.optimizers.schedules.PolynomialDecay(
                config.learning_rate, steps, config.min_learning_rate, power=1.0
            )
        ),
        loss=_loss,
        # many small steps: one call of the compiled function runs several
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    losses, started = [], time.perf_counter()
    batch = first
    for epoch in range(config.epochs):
        if epoch:
            batch = examples(sequences, vocabulary, config, rng)
        (inputs, candidates), labels = batch
        history = model.fit(
            (inputs, candidates),
            labels,
            batch_size=config.batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        mean = history.history["loss"][-1] / config.batch_size
        if not math.isfinite(mean):
            raise FloatingPointError(
                f"the embedding loss became {mean} in epoch {epoch + 1}: lower "
                "learning_rate"
            )
        losses.append(float(mean))
        if verbose:
            log.info(
                "%s epoch %d/%d: %d examples, loss %.4f, %.0f words/s",
                config.architecture,
                epoch + 1,
                config.epochs,
                len(labels),
                mean,
                words * (epoch + 1) / (time.perf_counter() - started),
            )
    seconds = time.perf_counter() - started
    return Trained(vocabulary, model.vectors(), losses, words, seconds)


# ------------------------------------------------------------------ evaluation


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def neighbours(
    vectors: np.ndarray, vocabulary: text.Vocabulary, word: str, k: int = 10
) -> list[tuple[str, float]]:
    """The ``k`` words of highest cosine similarity to ``word`` (itself
    excluded), with their similarities.

    Raises:
      KeyError: ``word`` is not in the vocabulary.
    """
    index = vocabulary.index
    if word not in index:
        raise KeyError(f"{word!r} is not in the vocabulary ({len(vocabulary)} words)")
    unit = _unit(vectors)
    similarity = unit @ unit[index[word]]
    similarity[index[word]] = -np.inf
    top = np.argsort(-similarity)[:k]
    return [(vocabulary.words[i], float(similarity[i])) for i in top]


def read_analogies(path) -> list[tuple[str, str, str, str, str]]:
    """``questions-words.txt`` (Mikolov et al. 2013): ``(section, a, b, c, d)``
    per question "a is to b as c is to d", lower-cased."""
    section, out = "", []
    for line in text.read_lines(path, "analogy questions"):
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        parts = line.lower().split()
        if len(parts) != 4:
            raise ValueError(f"analogy line {line!r} does not have 4 words")
        out.append((section, *parts))
    return out


def analogies(
    vectors: np.ndarray,
    vocabulary: text.Vocabulary,
    questions: Sequence[tuple[str, str, str, str, str]],
    batch: int = 256,
) -> dict:
    """3CosAdd over the questions whose four words are in the vocabulary: the
    answer is the word (other than a, b, c) closest by cosine to
    ``b - a + c``.

    Returns:
      ``{"accuracy", "correct", "asked", "total", "sections": {section:
      (correct, asked)}}``; ``accuracy`` is None when no question is asked.
    """
    index = vocabulary.index
    asked = [q for q in questions if all(w in index for w in q[1:])]
    unit = _unit(vectors)
    correct, sections = 0, {}
    for start in range(0, len(asked), batch):
        chunk = asked[start : start + batch]
        ids = np.array([[index[w] for w in q[1:]] for q in chunk])
        query = unit[ids[:, 1]] - unit[ids[:, 0]] + unit[ids[:, 2]]
        scores = _unit(query) @ unit.T
        rows = np.arange(len(chunk))
        for column in range(3):
            scores[rows, ids[:, column]] = -np.inf
        hits = scores.argmax(1) == ids[:, 3]
        for q, hit in zip(chunk, hits, strict=True):
            got, n = sections.get(q[0], (0, 0))
            sections[q[0]] = (got + int(hit), n + 1)
        correct += int(hits.sum())
    return {
        "accuracy": correct / len(asked) if asked else None,
        "correct": correct,
        "asked": len(asked),
        "total": len(questions),
        "sections": sections,
    }


def read_similarities(path) -> list[tuple[str, str, float]]:
    """WordSim353 (``wordsim353.tsv``: lines ``word1<TAB>word2<TAB>score``;
    ``#`` comments): ``(word1, word2, human score)``, lower-cased."""
    out = []
    for line in text.read_lines(path, "word similarities"):
        if line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            out.append((parts[0].lower(), parts[1].lower(), float(parts[2])))
        except (IndexError, ValueError) as e:
            raise ValueError(
                f"similarity line {line!r} is not word, word, score"
            ) from e
    return out


def similarity_correlation(
    vectors: np.ndarray,
    vocabulary: text.Vocabulary,
    pairs: Sequence[tuple[str, str, float]],
) -> dict:
    """Spearman's rho between human scores and cosine similarities over the
    pairs whose two words are in the vocabulary.

    Returns:
      ``{"spearman", "pairs", "total"}`` (``spearman`` None below 3 pairs).
    """
    from scipy import stats

    index = vocabulary.index
    unit = _unit(vectors)
    known = [(a, b, s) for a, b, s in pairs if a in index and b in index]
    if len(known) < 3:
        return {"spearman": None, "pairs": len(known), "total": len(pairs)}
    cosines = [float(unit[index[a]] @ unit[index[b]]) for a, b, _ in known]
    rho = stats.spearmanr([s for *_, s in known], cosines).statistic
    return {"spearman": float(rho), "pairs": len(known), "total": len(pairs)}


# ---------------------------------------------------------------------- export


def save_word2vec(path, vocabulary: text.Vocabulary, vectors: np.ndarray) -> None:
    """Writes word2vec's text format: a ``count dimension`` header, then one
    line per word: the word and its vector."""
    if vectors.shape[0] != len(vocabulary):
        raise ValueError(
            f"{vectors.shape[0]} vectors for a vocabulary of {len(vocabulary)} words"
        )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(f"{vectors.shape[0]} {vectors.shape[1]}\n")
        for word, row in zip(vocabulary.words, vectors, strict=True):
            f.write(word + " " + " ".join(f"{v:.6g}" for v in row) + "\n")


def load_word2vec(path) -> tuple[list[str], np.ndarray]:
    """Reads word2vec's text format: ``(words, vectors)``.

    Raises:
      ValueError: the header or a line does not match (names the line).
    """
    lines = text.read_lines(path, "word2vec file")
    try:
        count, dimension = (int(x) for x in lines[0].split())
    except ValueError as e:
        raise ValueError(
            f"{path}: first line {lines[0]!r} is not 'count dimension'"
        ) from e
    words, rows = [], []
    for number, line in enumerate(lines[1:], 2):
        parts = line.rstrip().split(" ")
        if len(parts) != dimension + 1:
            raise ValueError(
                f"{path}: line {number} has {len(parts) - 1} numbers, not {dimension}"
            )
        words.append(parts[0])
        rows.append([float(x) for x in parts[1:]])
    if len(words) != count:
        raise ValueError(
            f"{path}: the header says {count} words, the file has {len(words)}"
        )
    return words, np.asarray(rows, dtype=np.float32)
