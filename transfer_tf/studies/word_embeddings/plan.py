"""The word-embeddings study's configuration, presets and runs: what it
pretrains (:func:`expand`: one embedding per source and seed), which
classifiers it trains on the labelled task, and what each run depends on
(:func:`run_part`). See the package docstring for the study."""

from __future__ import annotations

import dataclasses

from transfer_tf import embeddings, precision, training
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import runner

# Where the pretraining text comes from: the task's own sentences without their
# labels (the test sentences left out), the out-of-domain corpus (cut to the
# in-domain corpus's size when ``match_size``), or both together (all of it).
SOURCES = ("in_domain", "out_of_domain", "both")
# How a classifier's embedding starts and trains: random and trained
# (``scratch``), pretrained and ``frozen``, pretrained and ``fine_tuned`` at the
# study's rate, or fine-tuned at ``low_rate_factor`` times it.
ARMS = ("scratch", "frozen", "fine_tuned", "fine_tuned_low")
PRETRAINED_ARMS = ARMS[1:]
POOLINGS = ("mean", "conv")
VECTORS_FILE = "vectors.txt"
# Token ids of the classifiers' vocabulary: 0 pads, 1 is every word outside it.
PAD, UNKNOWN = 0, 1


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """The labelled task and the unlabelled text.

    Attributes:
      task_dir: a directory of one UTF-8 file per class, one pre-tokenised
        sentence per line (lower-cased, tokens separated by spaces); a class is
        named after its file's suffix (``rt-polarity.pos`` -> ``pos``) or, without
        one, the file's name.
      out_of_domain: a file, or a directory of files, of unlabelled
        pre-tokenised text from another domain.
      test_fraction: the share of each class's sentences held out for testing
        (never read by pretraining).
      validation_fraction: the share of the rest held out for validation (early
        stopping and model selection).
      split_seed: seeds the test and validation split.
      max_length: tokens of a sentence the classifiers read (longer ones are cut).
      match_size: cut the out-of-domain text to the in-domain corpus's number of
        tokens, so that ``in_domain`` and ``out_of_domain`` differ in domain,
        not in size (``both`` always takes all of it).
      batch_size: sentences per optimizer step of the classifiers.
    """

    task_dir: str = "../shared/data/text/rt-polarity"
    out_of_domain: str = "../shared/data/text/bbc"
    test_fraction: float = 0.2
    validation_fraction: float = 0.1
    split_seed: int = 0
    max_length: int = 64
    match_size: bool = True
    batch_size: int = 50

    def __post_init__(self):
        for field in ("test_fraction", "validation_fraction"):
            value = getattr(self, field)
            if not 0 < value < 1:
                raise ValueError(f"{field}={value!r} must be in (0, 1)")
        config_lib.check_int("max_length", self.max_length, 2)
        config_lib.check_int("batch_size", self.batch_size, 1)
        config_lib.check_int("split_seed", self.split_seed, 0)


@dataclasses.dataclass(frozen=True)
class Config(config_lib.StudyConfig):
    """Pretrained word vectors transferred to a sentence classifier with few labels.

    Attributes:
      data: the labelled task, the out-of-domain text and their splits.
      embedding: how the word vectors are pretrained (skip-gram or CBOW,
        dimension, window, negatives, epochs, ...); its seed is the run's.
      training: how the classifiers train: to convergence by the plateau rule
        in rounds of 50 optimizer steps (at most 4 passes over a small training
        set), whatever the label budget.
      seeds: replicates: each seed pretrains its own vectors and draws its own
        k-sentence subsets and initialisations.
      budgets: labelled sentences per class; ``None`` = all (required).
      sources: pretraining text: ``in_domain``, ``out_of_domain``, ``both``.
      arms: ``scratch``, ``frozen``, ``fine_tuned``, ``fine_tuned_low``.
      pooling: the classifier: ``mean`` (embedding -> mean over the sentence's
        words -> dropout -> dense) or ``conv`` (embedding -> a 1-D convolution of
        ``conv_width`` words with ``conv_filters`` ReLU filters -> max over the
        sentence -> dropout -> dense).
      conv_filters: filters of the ``conv`` classifier.
      conv_width: words a ``conv`` filter spans.
      dropout: dropout rate before the dense layer.
      low_rate_factor: ``fine_tuned_low`` trains at this times the rate.
      neighbour_words: words whose nearest neighbours the summary lists per
        source (those in a source's vocabulary).
      projection_words: words drawn in ``projection.png`` (a 2-D principal
        component projection of each source's vectors).
    """

    data: TextDataConfig = TextDataConfig()
    embedding: embeddings.EmbeddingConfig = embeddings.EmbeddingConfig(epochs=20)
    training: training.TrainConfig = training.plateau(
        epochs=60,
        min_epochs=2,
        optimizer="adam",
        learning_rate=3e-3,
        weight_decay=0.0,
        precision="float32",
        xla="off",
    )
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[int | None, ...] = (10, 100, 1000, None)
    sources: tuple[str, ...] = SOURCES
    arms: tuple[str, ...] = ARMS
    pooling: str = "mean"
    conv_filters: int = 100
    conv_width: int = 3
    dropout: float = 0.5
    low_rate_factor: float = 0.1
    neighbour_words: tuple[str, ...] = ("good", "bad", "funny", "film", "story")
    projection_words: tuple[str, ...] = (
        "good",
        "great",
        "best",
        "bad",
        "worst",
        "boring",
        "funny",
        "film",
        "movie",
        "story",
        "actor",
        "music",
        "government",
        "election",
        "market",
        "company",
        "team",
        "game",
    )

    NOT_RESULT_AFFECTING = {
        # The study's extent only chooses which runs exist, so a finished study
        # can grow in place; the words shown are read from the records.
        "": (
            "seeds",
            "budgets",
            "sources",
            "arms",
            "neighbour_words",
            "projection_words",
        ),
        "embedding": ("seed",),
        "training": ("seed",),
    }

    def __post_init__(self):
        config_lib.as_tuples(
            self,
            ("seeds", "budgets", "sources", "arms", "neighbour_words"),
            required=("seeds", "budgets", "arms"),
        )
        config_lib.as_tuples(self, ("projection_words",))
        config_lib.check_seeds("seeds", self.seeds)
        config_lib.check_values("sources", self.sources, SOURCES)
        config_lib.check_values("arms", self.arms, ARMS)
        precision.check_choice("pooling", self.pooling, POOLINGS)
        object.__setattr__(self, "budgets", config_lib.budgets(self.budgets))
        if set(self.arms) & set(PRETRAINED_ARMS) and not self.sources:
            raise ValueError(
                f"arms {sorted(set(self.arms) & set(PRETRAINED_ARMS))} need sources"
            )
        config_lib.check_int("conv_filters", self.conv_filters, 1)
        config_lib.check_int("conv_width", self.conv_width, 1)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        config_lib.check_positive("low_rate_factor", self.low_rate_factor, False)

    def pretraining_part(self) -> dict:
        """What a pretraining depends on: the text (the task's split decides which
        sentences are in-domain text) and the embedding's training."""
        d = self.result_affecting()
        data = {k: v for k, v in d["data"].items() if k not in ("max_length",)}
        data.pop("batch_size")
        return {"data": data, "embedding": d["embedding"]}


@dataclasses.dataclass(frozen=True)
class Run(runner.BudgetRun):
    """One unit of the study.

    ``kind``: ``pretrain`` (word vectors of ``source`` with ``seed``) or
    ``train`` (a classifier of ``arm`` on ``k`` labelled sentences per class,
    ``None`` = all; a pretrained arm reads ``source``'s vectors of its seed).
    """

    RECORDED = ("budget", "line")

    kind: str
    seed: int = 0
    arm: str | None = None

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain/{self.source}/seed{self.seed}"
        parts = [self.arm] if self.source is None else [self.source, self.arm]
        return "/".join([f"seed{self.seed}", *parts, f"k{self.budget}"])

    @property
    def line(self) -> str:
        """The method a run belongs to in tables and figures."""
        if self.kind == "pretrain":
            return f"pretrain:{self.source}"
        return self.arm if self.source is None else f"{self.arm}:{self.source}"

    def needs(self) -> list[str]:
        """The pretraining a pretrained classifier reads."""
        if self.kind == "train" and self.source is not None:
            return [Run("pretrain", self.seed, source=self.source).key]
        return []


def expand(config: Config) -> list[Run]:
    """Every run, in execution order: the pretrainings (per seed and source),
    then per seed and budget the scratch classifier and each source's arms."""
    arms = [a for a in config.arms if a in PRETRAINED_ARMS]
    runs = []
    if arms:
        runs += [
            Run("pretrain", seed, source=source)
            for seed in config.seeds
            for source in config.sources
        ]
    for seed in config.seeds:
        for k in config.budgets:
            if "scratch" in config.arms:
                runs.append(Run("train", seed, k=k, arm="scratch"))
            runs += [
                Run("train", seed, k=k, arm=arm, source=source)
                for source in config.sources
                for arm in arms
            ]
    return runner.check_keys(runs)


def run_part(config: Config, run: Run) -> dict:
    """What one run depends on, so that changing, say, the classifier's rate
    redoes the classifiers and keeps the pretrainings, and changing the
    embedding's window redoes the pretrained arms but not scratch."""
    if run.kind == "pretrain":
        return {"pretraining": config.pretraining_part()}
    d = config.result_affecting()
    part = {
        "data": d["data"],
        "training": d["training"],
        "classifier": {
            k: d[k] for k in ("pooling", "conv_filters", "conv_width", "dropout")
        },
        # scratch's embedding has the pretrained one's dimension
        "dimension": d["embedding"]["dimension"],
    }
    if run.source is not None:
        part["pretraining"] = config.pretraining_part()
    if run.arm == "fine_tuned_low":
        part["low_rate_factor"] = d["low_rate_factor"]
    return part


PRESETS = {
    # Seconds, for tests: give --task_dir and --out_of_domain (tests write a
    # tiny corpus); one seed, small vectors, short runs.
    "smoke": {
        "embedding.dimension": 16,
        "embedding.epochs": 2,
        "embedding.min_count": 2,
        "embedding.batch_size": 64,
        "training.epochs": 3,
        "training.min_epochs": 1,
        "training.steps_per_epoch": 8,
        "training.tensorboard": False,
        "data.batch_size": 16,
        "data.max_length": 16,
        "seeds": (0,),
        "budgets": (5, None),
        "neighbour_words": ("good",),
        "projection_words": ("good", "bad", "fine", "awful", "plot"),
    },
    # The defaults: rt-polarity (../shared/data/text/rt-polarity) with BBC news
    # (../shared/data/text/bbc) as out-of-domain text.
    "default": {},
}
