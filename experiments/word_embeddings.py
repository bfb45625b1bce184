r"""Transferable word embeddings: pretrained word vectors transferred to a
sentence classifier across label budgets.

    python experiments/word_embeddings.py

runs the ``default`` preset on ``../shared/data/text``: per seed (0, 1, 2) it
pretrains skip-gram vectors (dimension 100, window 5, 5 negatives, min_count 5,
20 epochs) on three sources — ``in_domain`` (rt-polarity's non-test sentences,
without labels), ``out_of_domain`` (BBC news, cut to the in-domain corpus's
number of tokens) and ``both`` (the two together, all of BBC) — then trains a
sentence classifier (embedding -> mean pooling -> dropout -> dense) on
rt-polarity's positive/negative sentences with k = 10, 100, 1,000 and all
labelled sentences per class: from a random embedding (``scratch``), and from
each source's vectors ``frozen``, ``fine_tuned`` and fine-tuned at a tenth of the
rate (``fine_tuned_low``); every classifier to convergence by the project's
plateau rule. docs/word_embeddings.md has the measured results and wall time.
It writes to ``--workdir`` (default ``runs/word_embeddings_default``):

- ``results.jsonl``: one line per finished run (each pretraining with its
  corpus, vocabulary, coverage of the task, WordSim353 Spearman and analogy
  accuracy when gensim is installed, neighbours of ``--neighbour_words`` and a
  2-D projection of ``--projection_words``; each classifier with its test top-1,
  its per-sentence hits and why its training stopped);
- ``summary.md`` (and its tables as CSV files): the caveats, the pretrained
  vectors per source, test top-1 per arm, source and budget (mean and 95%
  interval over seeds), the gain over scratch paired by seed and test sentence,
  the claims judged by the tool (pretrained vectors help most with few labels;
  in-domain text beats out-of-domain text of the same size; fine-tuning helps
  only with enough labels) with Holm's correction over the family, nearest
  neighbours per source, convergence and wall time; ``summary.csv``: one row
  per run;
- ``label_budget.png`` (test top-1 vs labelled sentences per class, a panel per
  source) and ``projection.png`` (the chosen words on the first two principal
  components of each source's vectors);
- ``runs/pretrain/<source>/seed<s>/vectors.txt``: the vectors in word2vec text
  format (gensim's ``KeyedVectors.load_word2vec_format`` reads them);
  ``runs/seed<s>/<arm>[:<source>]/k<k>/``: each classifier's metrics and
  TensorBoard events.

Your own task: ``--task_dir`` is a directory of one text file per class (one
pre-tokenised sentence per line; the class is the file's suffix, or its name),
``--out_of_domain`` a file or directory of unlabelled text.

Rerunning the same command continues where it stopped; changing a classifier
setting (``--learning_rate``, ``--pooling``) redoes the classifiers and keeps the
pretrained vectors; a work directory holding another configuration is refused
unless ``--overwrite``. ``--dry_run`` lists the runs. Adding seeds, budgets,
sources or arms to a finished study runs only the new ones. ``--preset=smoke``
is seconds on a tiny corpus (tests pass their own ``--task_dir`` and
``--out_of_domain``).
"""

from __future__ import annotations

from absl import app

import common
from transfer_tf.studies import word_embeddings

STUDY = word_embeddings.STUDY
FLAG_TABLE = common.flag_table(
    STUDY.config_class(),
    renames={
        "embedding.dimension": "dimension",
        "embedding.window": "window",
        "embedding.architecture": "architecture",
        "embedding.negatives": "negatives",
        "embedding.min_count": "min_count",
    },
    exclude=("training.seed", "embedding.seed"),
)
common.define_study_flags(STUDY, FLAG_TABLE)
main = common.study_main(STUDY, FLAG_TABLE)


if __name__ == "__main__":
    app.run(main)
