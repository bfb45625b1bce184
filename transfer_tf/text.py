"""Text as word ids: reading a corpus, a vocabulary, the frequent-word
subsampling of word2vec, and the training examples of skip-gram (pairs with
negative samples) and CBOW (context windows) as ``tf.data`` pipelines.

The corpora this project reads are already tokenised (lower-cased, tokens
separated by spaces, one sentence or document per line), so a token is a
whitespace-separated string; :func:`tokenize` says so in one place.

Word2vec's sampling rules (Mikolov et al. 2013, and the reference C code that
gensim follows), each a function here with its formula:

- a word of corpus frequency ``f`` is kept with probability
  ``(sqrt(f / t) + 1) * t / f`` (at most 1; ``t`` = ``sample``, 1e-3 by default);
- the window is "dynamic": for each centre word a window ``b`` is drawn
  uniformly from ``1..window``, so nearer words are context more often;
- negatives are drawn from the unigram distribution raised to 0.75.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np


def tokenize(line: str) -> list[str]:
    """The tokens of one line of a pre-tokenised corpus (lower-cased, split on
    whitespace)."""
    return line.lower().split()


def read_lines(paths: str | pathlib.Path | Iterable, what: str = "corpus") -> list[str]:
    """The non-empty lines of one or more UTF-8 text files.

    Raises:
      ValueError: a file is missing, is not UTF-8 text, or everything is empty.
    """
    if isinstance(paths, (str, pathlib.Path)):
        paths = [paths]
    lines = []
    for path in map(pathlib.Path, paths):
        if not path.is_file():
            raise ValueError(f"{what} file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{what} file {str(path)!r} is not UTF-8 text (byte {e.start}: "
                f"{e.reason})"
            ) from e
        lines += [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"the {what} ({', '.join(map(str, paths))}) has no text")
    return lines


# gensim's Word2Vec reads at most this many tokens of a sentence (the rest are
# silently ignored); the BBC corpus is six lines of ~80,000 tokens.
MAX_SENTENCE = 10_000


def split_long(
    sentences: Iterable[Sequence[str]], size: int = MAX_SENTENCE
) -> list[list[str]]:
    """Sentences longer than ``size`` tokens cut into pieces of at most
    ``size`` (no window then spans a cut; nothing is dropped)."""
    if size < 2:
        raise ValueError(f"size={size!r} must be >= 2")
    return [list(s[i : i + size]) for s in sentences for i in range(0, len(s), size)]


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Words by descending corpus count (ties alphabetical), and their counts.

    Attributes:
      words: the words; a word's id is its position.
      counts: each word's count in the corpus it was built from.
    """

    words: tuple[str, ...]
    counts: tuple[int, ...]

    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str]],
        min_count: int = 5,
        max_size: int | None = None,
    ) -> Vocabulary:
        """The vocabulary of tokenised ``sentences``: every word seen at least
        ``min_count`` times, at most the ``max_size`` most frequent.

        Raises:
          ValueError: no word is that frequent.
        """
        if min_count < 1:
            raise ValueError(f"min_count={min_count!r} must be >= 1")
        counter = collections.Counter(w for s in sentences for w in s)
        kept = sorted(
            ((w, c) for w, c in counter.items() if c >= min_count),
            key=lambda wc: (-wc[1], wc[0]),
        )[:max_size]
        if not kept:
            raise ValueError(
                f"no word occurs {min_count} times or more in the corpus "
                f"({sum(counter.values())} tokens, {len(counter)} distinct): lower "
                "min_count"
            )
        words, counts = zip(*kept, strict=True)
        return cls(tuple(words), tuple(int(c) for c in counts))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        """Word -> id."""
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, sentences: Iterable[Sequence[str]]) -> list[np.ndarray]:
        """Each tokenised sentence as an int32 array of ids, words outside the
        vocabulary dropped (as word2vec does)."""
        index = self.index
        return [
            np.array([index[w] for w in s if w in index], dtype=np.int32)
            for s in sentences
        ]

    def frequencies(self) -> np.ndarray:
        """Each word's share of the vocabulary's tokens."""
        counts = np.asarray(self.counts, dtype=np.float64)
        return counts / counts.sum()


def keep_probabilities(vocabulary: Vocabulary, sample: float = 1e-3) -> np.ndarray:
    """Word2vec's probability of keeping each occurrence of a word:
    ``(sqrt(f / sample) + 1) * sample / f`` for frequency ``f``, at most 1;
    ``sample=0`` keeps everything."""
    if sample < 0:
        raise ValueError(f"sample={sample!r} must be >= 0")
    f = vocabulary.frequencies()
    if sample == 0:
        return np.ones_like(f)
    return np.minimum(1.0, (np.sqrt(f / sample) + 1.0) * sample / f)


def negative_distribution(vocabulary: Vocabulary, power: float = 0.75) -> np.ndarray:
    """The distribution negatives are drawn from: counts to the ``power``,
    normalised."""
    weights = np.asarray(vocabulary.counts, dtype=np.float64) ** power
    return weights / weights.sum()


def subsample(
    sequences: Sequence[np.ndarray], keep: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """``sequences`` with each occurrence kept with its word's probability
    ``keep[id]`` (drawn anew on every call: every epoch its own sample)."""
    return [s[rng.random(len(s)) < keep[s]] for s in sequences]


def _context_slots(sequences, window: int, rng, dynamic: bool):
    """The corpus as one id array, and per context slot (offsets -1, +1, -2,
    +2, ... up to ``window``): which positions have a context word there (within
    the centre's window half-width, drawn from 1..``window`` when ``dynamic``,
    and inside the same sequence) and that word's position.

    Returns:
      ``(ids, [(ok mask, other positions), ...])``; ``ids`` is None when no
      sequence has two words.
    """
    if window < 1:
        raise ValueError(f"window={window!r} must be >= 1")
    sequences = [s for s in sequences if len(s) > 1]
    if not sequences:
        return None, []
    lengths = np.array([len(s) for s in sequences])
    ids = np.concatenate(sequences)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    ends = starts + np.repeat(lengths, lengths)
    positions = np.arange(len(ids))
    reach = (
        rng.integers(1, window + 1, len(ids)) if dynamic else np.full(len(ids), window)
    )
    slots = []
    for offset in range(1, window + 1):
        for sign in (-1, 1):
            other = positions + sign * offset
            slots.append(
                ((reach >= offset) & (other >= starts) & (other < ends), other)
            )
    return ids, slots


def skipgram_pairs(
    sequences: Sequence[np.ndarray],
    window: int,
    rng: np.random.Generator,
    dynamic: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Every (centre, context) pair of ``sequences``: the words within the
    centre's window in the same sequence, itself excluded, with word2vec's
    dynamic window when ``dynamic`` (else every word within ``window``).

    Returns:
      ``(centres, contexts)``, int32 arrays of equal length.
    """
    ids, slots = _context_slots(sequences, window, rng, dynamic)
    if ids is None:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    centres = [ids[ok] for ok, _ in slots]
    contexts = [ids[other[ok]] for ok, other in slots]
    return np.concatenate(centres), np.concatenate(contexts)


def cbow_windows(
    sequences: Sequence[np.ndarray],
    window: int,
    rng: np.random.Generator,
    dynamic: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Every (context window, centre) example of ``sequences``: the ids within
    the centre's (dynamic) window, padded with -1 to ``2 * window`` columns;
    centres without any context are left out.

    Returns:
      ``(contexts (n, 2 * window) int32 with -1 padding, centres (n,) int32)``.
    """
    ids, slots = _context_slots(sequences, window, rng, dynamic)
    if ids is None:
        return np.zeros((0, 2 * window), np.int32), np.zeros(0, np.int32)
    contexts = np.full((len(ids), 2 * window), -1, dtype=np.int32)
    for column, (ok, other) in enumerate(slots):
        contexts[ok, column] = ids[other[ok]]
    has = (contexts >= 0).any(axis=1)
    return contexts[has], ids[has]


def negatives(
    count: int, k: int, distribution: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``(count, k)`` int32 negative word ids drawn from ``distribution``."""
    if k < 1:
        raise ValueError(f"negatives={k!r} must be >= 1")
    cumulative = np.cumsum(distribution)
    draws = rng.random((count, k)) * cumulative[-1]
    return np.searchsorted(cumulative, draws, side="right").astype(np.int32)
