"""How each run of the word-embeddings study executes: the labelled task read
and split (:class:`Corpus`), the pretraining text of each source, word vectors
pretrained and scored (WordSim353, analogies, neighbours, a 2-D projection),
and the sentence classifiers that start from them or from random vectors."""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import keras
import numpy as np

from transfer_tf import data, embeddings, text, training
from transfer_tf.studies import runner
from transfer_tf.studies.word_embeddings import plan

log = logging.getLogger(__name__)

NEIGHBOURS = 5  # neighbours recorded per word


# ----------------------------------------------------------------- the text


def class_name(path: pathlib.Path) -> str:
    """A class file's class: its suffix (``rt-polarity.pos`` -> ``pos``), or its
    name when it has none."""
    return path.suffix[1:] or path.name


def read_task(task_dir) -> tuple[tuple[str, ...], list[list[str]], np.ndarray]:
    """The labelled sentences of a directory of one file per class.

    Returns:
      ``(class names, tokenised sentences, labels)``, classes in name order.

    Raises:
      ValueError: the directory is missing, has fewer than two class files, two
        files name one class, or a file is not UTF-8 text or is empty.
    """
    root = pathlib.Path(task_dir).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"task directory {str(root)!r} does not exist (give --task_dir: a "
            "directory of one text file per class, one sentence per line)"
        )
    files = sorted(p for p in root.iterdir() if p.is_file() and p.name[0] != ".")
    names = [class_name(p) for p in files]
    if len(files) < 2:
        raise ValueError(
            f"task directory {str(root)!r} holds {len(files)} class file(s); a "
            "classification task needs at least two (one file per class)"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"task directory {str(root)!r}: several files name class(es) "
            f"{repeated} (a class is a file's suffix, or its name without one)"
        )
    sentences, labels = [], []
    for label, path in enumerate(files):
        lines = text.read_lines(path, f"class {names[label]!r}")
        sentences += [text.tokenize(line) for line in lines]
        labels += [label] * len(lines)
    return tuple(names), sentences, np.asarray(labels, dtype=np.int64)


def _check_parts(task_dir, classes, sentences, labels, split):
    """Every class has sentences to train on, choose by and test on."""
    for label, name in enumerate(classes):
        mine = labels == label
        empty = [
            p for p in ("train", "validation", "test") if not (split[mine] == p).any()
        ]
        if not empty:
            continue
        longest = max(len(s) for s, m in zip(sentences, mine, strict=True) if m)
        hint = (
            f"; its longest line holds {longest:,} tokens: put one sentence per line"
            if longest > text.MAX_SENTENCE
            else ""
        )
        raise ValueError(
            f"class {name!r} of {str(task_dir)!r} holds {int(mine.sum())} "
            f"sentence(s), too few for a {'/'.join(empty)} part (each class needs "
            f"sentences to train, validate and test on){hint}"
        )


@dataclasses.dataclass
class Corpus:
    """The labelled task, split, with the classifiers' vocabulary.

    Attributes:
      name: the task directory's name.
      classes: class names (label order).
      sentences: every labelled sentence, tokenised.
      labels: their labels.
      split: ``"train"``, ``"validation"`` or ``"test"`` per sentence.
      vocabulary: every word of the non-test sentences (ids from 2 on; 0 pads,
        1 stands for every other word).
    """

    name: str
    classes: tuple[str, ...]
    sentences: list[list[str]]
    labels: np.ndarray
    split: np.ndarray
    vocabulary: text.Vocabulary

    @classmethod
    def read(cls, config: plan.TextDataConfig) -> Corpus:
        classes, sentences, labels = read_task(config.task_dir)
        # per class, seeded: the test part, then validation of the rest
        seed = config.split_seed
        test = data.carve_validation(labels, config.test_fraction, [seed, 1])
        rest = np.flatnonzero(~test)
        validation = np.zeros_like(test)
        validation[rest] = data.carve_validation(
            labels[rest], config.validation_fraction, [seed, 2]
        )
        split = np.where(test, "test", np.where(validation, "validation", "train"))
        _check_parts(config.task_dir, classes, sentences, labels, split)
        name = pathlib.Path(config.task_dir).expanduser().resolve().name
        corpus = cls(name, classes, sentences, labels, split, None)
        corpus.vocabulary = text.Vocabulary.build(corpus.unlabelled(), min_count=1)
        return corpus

    def unlabelled(self) -> list[list[str]]:
        """The in-domain pretraining text: the non-test sentences, no labels."""
        return [
            s for s, p in zip(self.sentences, self.split, strict=True) if p != "test"
        ]

    def encode(self, sentences, max_length: int) -> np.ndarray:
        """Sentences as ``(n, max_length)`` int32 ids, padded with 0, words outside
        the vocabulary 1, cut after ``max_length`` tokens."""
        index = self.vocabulary.index
        out = np.full((len(sentences), max_length), plan.PAD, dtype=np.int32)
        for row, sentence in enumerate(sentences):
            ids = [
                index[w] + 2 if w in index else plan.UNKNOWN
                for w in sentence[:max_length]
            ]
            out[row, : len(ids)] = ids
        return out

    def task(self, max_length: int) -> data.Task:
        """The task as arrays of token ids."""
        parts = {}
        for part in ("train", "validation", "test"):
            keep = np.flatnonzero(self.split == part)
            chosen = [self.sentences[i] for i in keep]
            parts[part] = (self.encode(chosen, max_length), self.labels[keep])
        return data.Task(
            self.name,
            self.classes,
            tuple(range(len(self.classes))),
            *parts["train"],
            *parts["validation"],
            *parts["test"],
        )

    def summary(self) -> str:
        counts = {
            p: int(np.sum(self.split == p)) for p in ("train", "validation", "test")
        }
        return (
            f"task {self.name}: {len(self.classes)} classes {list(self.classes)}, "
            f"{counts['train']} train / {counts['validation']} validation / "
            f"{counts['test']} test sentences, {len(self.vocabulary)} words"
        )


def read_text(path) -> list[list[str]]:
    """Unlabelled pre-tokenised text of a file or a directory of files, long
    lines cut into sentences of at most ``text.MAX_SENTENCE`` tokens."""
    root = pathlib.Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and p.name[0] != ".")
        if not files:
            raise ValueError(f"out-of-domain directory {str(root)!r} has no files")
    elif root.is_file():
        files = [root]
    else:
        raise ValueError(
            f"out-of-domain text {str(root)!r} does not exist (give --out_of_domain:"
            " a file or a directory of text files)"
        )
    lines = text.read_lines(files, "out-of-domain text")
    return text.split_long(text.tokenize(line) for line in lines)


def cut_to(sentences: list[list[str]], tokens: int) -> list[list[str]]:
    """The first ``tokens`` tokens of ``sentences`` (the last sentence cut)."""
    out, left = [], tokens
    for sentence in sentences:
        if left <= 0:
            break
        out.append(sentence[:left])
        left -= len(out[-1])
    return out


def token_count(sentences) -> int:
    return sum(len(s) for s in sentences)


# -------------------------------------------------------------- the context


class Context(runner.Context):
    """The task and its subsets, each source's text and each pretraining's
    vectors; each made once."""

    def __init__(self, config: plan.Config, workdir, run_dir):
        super().__init__(config, workdir, run_dir)
        self._corpus = None
        self._out_of_domain = None
        self._tasks = {}
        self._vectors = {}

    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = Corpus.read(self.config.data)
            log.info("%s", self._corpus.summary())
        return self._corpus

    def out_of_domain(self) -> list[list[str]]:
        if self._out_of_domain is None:
            self._out_of_domain = read_text(self.config.data.out_of_domain)
            log.info(
                "out-of-domain text %s: %d tokens",
                self.config.data.out_of_domain,
                token_count(self._out_of_domain),
            )
        return self._out_of_domain

    def prepare(self):
        """Reads the task and, when a source needs it, the out-of-domain text
        (a bad path fails here, before anything is written)."""
        corpus = self.corpus
        if {"out_of_domain", "both"} & set(self.config.sources):
            self.out_of_domain()
        return corpus

    def check_halves(self):
        """No class split: the task is the whole labelled set."""

    def sentences(self, source: str) -> list[list[str]]:
        """The pretraining text of ``source``."""
        own = self.corpus.unlabelled()
        if source == "in_domain":
            return own
        other = self.out_of_domain()
        if source == "both":
            return own + other
        if self.config.data.match_size:
            return cut_to(other, token_count(own))
        return other

    def task(self, k=None, seed=0) -> data.Task:
        """The task; with ``k``, its k-per-class training subset (the same
        sentences for every arm of a seed and budget)."""
        key = (k, seed if k is not None else 0)
        if key not in self._tasks:
            task = self.corpus.task(self.config.data.max_length)
            self._tasks[key] = task if k is None else self.task().subset(k, seed)
        return self._tasks[key]

    def vectors(self, source: str, seed: int) -> tuple[list[str], np.ndarray]:
        """A pretraining's word vectors (read from its ``vectors.txt``)."""
        key = (source, seed)
        if key not in self._vectors:
            self._vectors.clear()  # one source's vectors at a time
            run = plan.Run("pretrain", seed, source=source)
            self._vectors[key] = embeddings.load_word2vec(
                self.run_dir(run) / plan.VECTORS_FILE
            )
        return self._vectors[key]

    def train(self, model, task, train_config, run_dir, **kwargs):
        return training.train_task(
            model, task, train_config, run_dir, self.config.data.batch_size, **kwargs
        )


# -------------------------------------------------------------- pretraining


def _gensim_sets():
    """WordSim353 and the analogy questions from gensim's test data, or None
    when gensim is not installed (``pip install '.[text]'``)."""
    try:
        from gensim.test.utils import datapath
    except ImportError:
        return None
    return (
        embeddings.read_similarities(datapath("wordsim353.tsv")),
        embeddings.read_analogies(datapath("questions-words.txt")),
    )


def projection(vocabulary: text.Vocabulary, vectors: np.ndarray, words) -> dict:
    """The words (those in the vocabulary) on the first two principal
    components of their unit vectors: ``{word: [x, y]}``."""
    index = vocabulary.index
    present = [w for w in words if w in index]
    if len(present) < 3:
        return {}
    unit = embeddings._unit(vectors[[index[w] for w in present]])
    centred = unit - unit.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ components[:2].T
    return {w: [float(x), float(y)] for w, (x, y) in zip(present, coords, strict=True)}


def run_pretraining(run: plan.Run, context: Context, run_dir) -> dict:
    """Trains one source's vectors with the run's seed, writes them in word2vec
    text format (``vectors.txt``) and measures them."""
    config = context.config
    sentences = context.sentences(run.source)
    embedding = dataclasses.replace(config.embedding, seed=run.seed)
    trained = embeddings.train(sentences, embedding)
    embeddings.save_word2vec(
        pathlib.Path(run_dir) / plan.VECTORS_FILE, trained.vocabulary, trained.vectors
    )
    corpus, index = context.corpus, trained.vocabulary.index
    test_tokens = [
        w
        for s, p in zip(corpus.sentences, corpus.split, strict=True)
        if p == "test"
        for w in s
    ]
    record = {
        "corpus_tokens": token_count(sentences),
        "corpus_sentences": len(sentences),
        "vocabulary": len(trained.vocabulary),
        "words_per_epoch": trained.words,
        "losses": trained.losses,
        "loss": trained.losses[-1],
        "words_per_second": trained.words_per_second,
        "train_time": trained.seconds,
        # the task's words that get a pretrained vector
        "task_words_covered": sum(w in index for w in corpus.vocabulary.words)
        / len(corpus.vocabulary),
        "test_tokens_covered": sum(w in index for w in test_tokens)
        / max(1, len(test_tokens)),
        "neighbours": {
            w: [
                [n, round(c, 4)]
                for n, c in embeddings.neighbours(
                    trained.vectors, trained.vocabulary, w, NEIGHBOURS
                )
            ]
            for w in config.neighbour_words
            if w in index
        },
        "projection": projection(
            trained.vocabulary, trained.vectors, config.projection_words
        ),
    }
    sets = _gensim_sets()
    if sets is not None:
        similarity = embeddings.similarity_correlation(
            trained.vectors, trained.vocabulary, sets[0]
        )
        analogy = embeddings.analogies(trained.vectors, trained.vocabulary, sets[1])
        record.update(
            wordsim_spearman=similarity["spearman"],
            wordsim_pairs=similarity["pairs"],
            analogy_accuracy=analogy["accuracy"],
            analogy_questions=analogy["asked"],
        )
    return record


# -------------------------------------------------------------- classifiers


def initial_vectors(
    corpus: Corpus, words: list[str], vectors: np.ndarray
) -> tuple[np.ndarray, int]:
    """The classifier's embedding matrix from pretrained vectors (scaled to a
    root mean square of 1): each word's pretrained vector where it has one,
    else zeros (as the padding and the unknown-word rows): a frozen embedding
    then adds nothing for words its text never had (noise there would drown the
    mean of a sentence whose words the vectors mostly miss), a fine-tuned one
    learns them from zero.

    Returns:
      ``(matrix, words given a pretrained vector)``.
    """
    # unit RMS: the scale SGNS gives depends on the corpus and its epochs; the
    # classifier's rate should not
    vectors = vectors / max(float(np.sqrt(np.mean(np.square(vectors)))), 1e-12)
    matrix = np.zeros((len(corpus.vocabulary) + 2, vectors.shape[1]), np.float32)
    pretrained = dict(zip(words, range(len(words)), strict=True))
    hits = 0
    for i, word in enumerate(corpus.vocabulary.words):
        j = pretrained.get(word)
        if j is not None:
            matrix[i + 2] = vectors[j]
            hits += 1
    return matrix, hits


def classifier(
    config: plan.Config,
    vocabulary_size: int,
    num_classes: int,
    seed: int,
    initial: np.ndarray | None = None,
    trainable: bool = True,
) -> keras.Model:
    """The sentence classifier: token ids -> embedding -> mean pooling (or a
    1-D convolution and max pooling) -> dropout -> dense logits. The embedding
    starts from ``initial`` when given (else uniform in +-0.05) and is frozen
    unless ``trainable``."""
    keras.utils.set_random_seed(seed)
    dimension = config.embedding.dimension
    ids = keras.Input((config.data.max_length,), dtype="int32", name="tokens")
    embedding = keras.layers.Embedding(
        vocabulary_size,
        dimension,
        embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=seed),
        mask_zero=config.pooling == "mean",
        name="embedding",
    )
    x = embedding(ids)
    if config.pooling == "mean":
        x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    else:
        words = keras.ops.cast(keras.ops.not_equal(ids, plan.PAD), x.dtype)
        x = x * keras.ops.expand_dims(words, -1)  # padding reads as zero vectors
        x = keras.layers.Conv1D(
            config.conv_filters,
            config.conv_width,
            padding="same",
            activation="relu",
            kernel_initializer=keras.initializers.GlorotUniform(seed),
            name="conv",
        )(x)
        x = keras.layers.GlobalMaxPooling1D(name="pool")(x)
    x = keras.layers.Dropout(config.dropout, seed=seed, name="dropout")(x)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.GlorotUniform(seed),
        name="logits",
    )(x)
    model = keras.Model(ids, logits, name="sentence_classifier")
    if initial is not None:
        embedding.set_weights([initial])
    embedding.trainable = trainable
    return model


def _execute_training(run: plan.Run, context: Context, run_dir) -> dict:
    config = context.config
    corpus = context.corpus
    task = context.task(run.k, run.seed)
    size = len(corpus.vocabulary) + 2
    extra = {}
    if run.source is None:
        model = classifier(config, size, task.num_classes, run.seed)
    else:
        words, vectors = context.vectors(run.source, run.seed)
        initial, hits = initial_vectors(corpus, words, vectors)
        model = classifier(
            config,
            size,
            task.num_classes,
            run.seed,
            initial=initial,
            trainable=run.arm != "frozen",
        )
        extra["pretrained_words"] = hits
    rate = config.training.learning_rate
    if run.arm == "fine_tuned_low":
        rate *= config.low_rate_factor
    train_config = runner.train_config_for(config.training, run.seed, rate)
    outcome = context.train(model, task, train_config, run_dir)
    return {
        **outcome.record(),
        "learning_rate": rate,
        "vocabulary": size,
        **extra,
    }


def execute(run: plan.Run, context: Context, run_dir) -> dict:
    """Runs one unit of the study in ``run_dir``; returns its outcome."""
    if run.kind == "pretrain":
        return run_pretraining(run, context, run_dir)
    return {
        "num_classes": len(context.corpus.classes),
        **_execute_training(run, context, run_dir),
    }


def explain(run: plan.Run, error: Exception) -> str:
    """What to change when a run's loss became NaN."""
    if isinstance(error, training.NonFiniteLossError):
        return "; lower the classifiers' --learning_rate"
    if isinstance(error, FloatingPointError) and run.kind == "pretrain":
        return "; lower --embedding_learning_rate"
    return ""


def describe(record) -> str:
    if record["kind"] == "pretrain":
        parts = [
            f"{record['vocabulary']} words",
            f"loss {record['loss']:.3f}",
            f"{record['words_per_second']:,.0f} words/s",
        ]
        if record.get("wordsim_spearman") is not None:
            parts.append(f"WordSim353 rho {record['wordsim_spearman']:.3f}")
        return ", ".join(parts)
    return f"test top-1 {record['test_accuracy']:.4f}"
