r"""The advisor: which of your pretrained nets, which layer, freeze or fine-tune,
for your labelled images, and how sure that is.

    python experiments/advise.py --target=folder:PATH --sources=net.keras,MobileNetV2 \
        --labels_per_class=10 --time_budget=600 --workdir=runs/advice

``--target`` is a data spec (``folder:PATH`` with ``PATH/train/<class>/*.jpg``
and ``PATH/test/<class>/*.jpg``; ``npz:PATH``; ``digits``; with ``--split=B``
and the class-split flags, one half of a dataset's classes). A folder of
mixed image sizes is resized to its first image's size, or to
``--image_size=HEIGHT,WIDTH``. ``--sources`` lists ``.keras`` files, SavedModel
directories, study work directories (their base nets) and Keras Applications
names (ImageNet weights from ``~/.keras/models``, or
``--backbone_weights=PATH``; offline without them: an error saying so). A
transfer_tf net trained at another input size takes your images through a
resizing and channel-mapping stage in front of it.

Stage 1 scores every (source, layer) with LogME and H-score from the labelled
training images (seconds); stage 2, within ``--time_budget`` seconds, checks the
top candidates with linear probes on the validation split and then trains the
strategies the fine-tuning study favours for the label budget (freeze at the
best layer, LP-FT, fine-tuning every layer) by the shared convergence rule,
seed after seed while time allows. It writes into ``--workdir``:

- ``advice.md``: the recommendation, every checked option's validation top-1
  with its interval, what was skipped for time, a confidence statement;
- ``advice.json``: everything measured (scores and times, every run);
- ``stage1_vs_probes.png``: stage-1 scores against the probes' accuracy;
- ``model/``: the recommended net as ``model.keras`` and ``saved_model/``,
  taking raw images of the target's size;
- ``runs/``: one directory per step (``stage1``, ``probe/rank<i>``,
  ``strategy/<arm>/seed<s>``, ``export``) with its record; results.jsonl.

Every step is a run of the studies' runner: rerunning the same command resumes
an advice that was killed (finished steps are kept) and reruns a finished one in
seconds without training; a second advice into the same ``--workdir`` is
refused while the first runs, and so is one with other flags (or other source
files) unless ``--overwrite``, which deletes only what the advisor wrote there.

Flags: ``--target``, ``--sources``, ``--labels_per_class``, ``--split``,
``--workdir``, ``--overwrite``, ``--dry_run`` (below), and one flag per field
of ``transfer_tf.studies.advisor.plan.Config`` with that field's documentation:
the data flags (``--image_size``, ``--validation_fraction``, ``--batch_size``,
``--class_split``, ``--split_seed``, ...), the training flags of the plateau
rule (``--learning_rate``, ``--epochs``, ``--min_epochs``, ...), the probes'
``--probe_*`` and the advisor's own (``--labels_seed``, ``--time_budget``,
``--seeds``, ``--strategies``, ``--top_candidates``, ``--layers``,
``--pooling``, ``--estimators``, ``--min_epoch_steps``, ``--backbone_weights``,
``--backbone_image_size``); ``--helpfull`` lists each with its help.
docs/advisor.md has the measured comparison with the fine-tuning study's
exhaustive search.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

import common
from transfer_tf import data, training
from transfer_tf.studies import advisor, runner
from transfer_tf.studies import config as config_lib
from transfer_tf.studies.advisor import plan

FLAGS = flags.FLAGS
FLAG_TABLE = common.flag_table(
    plan.Config(),
    renames={"data.dataset": "target"},
    exclude=("labels_per_class", "training.seed"),
)
common.define_config_flags(plan.Config(), FLAG_TABLE)
flags.DEFINE_string(
    "labels_per_class",
    "all",
    "Labelled training images per class to use, or 'all' (drawn after the "
    "validation split is carved, as in the studies).",
)
flags.DEFINE_enum(
    "split",
    "all",
    list(data.SPLITS),
    "Which classes of --target: all, or half A or B of --class_split (to compare "
    "with the studies' halves).",
)
flags.DEFINE_string(
    "workdir",
    "runs/advice",
    "Output directory: advice.md, advice.json, the figure, model/ and runs/. "
    "Rerunning the same command there resumes (or, finished, only rewrites what "
    "changed); another advice there is refused unless --overwrite.",
)
flags.DEFINE_bool(
    "overwrite",
    False,
    "Delete the work directory's earlier advice when its flags or source files "
    "differ (only what the advisor wrote there; without it, such a rerun is "
    "refused).",
)
flags.DEFINE_bool(
    "dry_run", False, "List the advice's steps (done or pending); write nothing."
)


def config_from_flags() -> plan.Config:
    """The advisor's configuration from the flags given (the rest: defaults)."""
    changes = common.overrides(plan.Config(), FLAG_TABLE)
    changes["labels_per_class"] = labels_per_class(FLAGS.labels_per_class)
    changes["data.split"] = FLAGS.split
    return config_lib.override(plan.Config(), changes)


def labels_per_class(text: str) -> int | None:
    """``--labels_per_class``: a positive integer, or ``all`` (None)."""
    text = text.strip().lower()
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"--labels_per_class={text!r} must be a positive integer or 'all'"
        )
    return int(text)


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags start with --)")
    common.setup_logging()
    try:
        config = config_from_flags()
        runner.run_study(
            advisor.STUDY, config, FLAGS.workdir, FLAGS.overwrite, FLAGS.dry_run
        )
    except KeyboardInterrupt:
        common.interrupted(FLAGS.workdir)
    except OSError as e:
        sys.exit(f"error: {common.os_error(e, FLAGS.workdir)}")
    except (ValueError, training.NonFiniteLossError) as e:
        sys.exit("error: " + " ".join(str(e).split()))
    if FLAGS.dry_run:
        return
    workdir = pathlib.Path(FLAGS.workdir)
    print((workdir / plan.REPORT_FILE).read_text())
    print(f"outputs in {workdir}/:")
    for name in (plan.REPORT_FILE, plan.JSON_FILE, plan.FIGURE_FILE):
        print(f"  {workdir / name}")
    for name in advisor.STUDY.outputs:
        print(f"  {workdir / name}")


if __name__ == "__main__":
    app.run(main)
