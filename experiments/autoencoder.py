r"""Self-supervised pretraining with a convolutional autoencoder, and its transfer.

    python experiments/transferability.py --seeds=0 --treatments=AnB --layers=5 \
        --width=0.25 --epochs=12 --batch_size=128 \
        --workdir=runs/transferability_digits_ae
    python experiments/autoencoder.py --workdir=runs/autoencoder_digits \
        --grid_workdir=runs/transferability_digits_ae

runs the default ``digits`` preset on the embedded MNIST digits: it pretrains an
autoencoder (encoder = the base net's conv1..conv5 at width 0.25, a 128-unit code,
binary cross-entropy) on the training images of all ten classes without their
labels, then on half B of the random class split (split seed 0) with k = 1, 5, 10,
50 and all labelled examples per class, seeds 0, 1 and 2, compares (a) linear probes
on the code and on each encoder layer (and on the untrained autoencoder), (b) a base
net whose conv layers come from the encoder, fine-tuned, (c) the same net from
scratch and, with ``--grid_workdir`` (a transferability.py work directory whose
base net on half A is finished), (d) that supervised source net, conv layers copied
and fine-tuned the same way, plus linear probes on its layers. Fine-tuned nets
train at learning rate 0.005 (scratch: 0.02) with the copied conv5 rescaled to a
fresh net's output scale (``--match_scale``); without both they collapsed.
README.md has the measured numbers and wall times. It writes to ``--workdir``:

- ``results.jsonl``: one line per finished run (the pretraining, every probe and
  classifier), with test accuracy, wall time and configuration hash;
- ``summary.md`` / ``summary.csv``: reconstruction error, accuracy per label budget
  for every method, the paired gain over scratch (marking where there is none),
  the probe per layer, the layers validation chose, wall times;
- ``reconstructions.png``: test images above their reconstructions;
- ``label_budget.png``: test accuracy vs labelled examples per class;
- ``encoder/``: the encoder as ``model.keras`` and ``saved_model/`` (raw uint8
  images in, float32 codes out);
- ``pretrain/``: the autoencoder (``autoencoder.keras``), ``metrics.jsonl`` and
  TensorBoard events with reconstructed validation images after every epoch
  (``tensorboard --logdir <workdir>``); ``runs/<seed>/<run>/``: every other run.

Rerunning the same command continues where it stopped (finished runs are skipped,
a killed pretraining resumes after its last finished epoch); changing a downstream
setting (e.g. ``--fine_tune_learning_rate``) redoes only the runs it affects; a
work directory holding another pretraining is refused unless ``--overwrite``.
``--dry_run`` lists the runs. Adding seeds, budgets, layers or arms to a finished
study runs only the new ones.

Other presets: ``--preset=smoke`` (seconds, for tests) and
``--preset=cifar10`` (``../shared/data/cifar10``: pretraining on all 50,000
training images, 8 epochs; target half B of the random split, seed 0, with k = 1,
10, 100 and "all" capped at 1,000 labelled images per class to fit in about 45
minutes on a busy 2-core CPU; fine-tuning at learning rate 0.005, scratch at 0.02;
for the supervised source pass
``--grid_workdir=runs/transferability_cifar10``). Every flag overrides its
preset value.
"""

from __future__ import annotations

from absl import app, flags

import common
from transfer_tf import autoencoder, features, training

FLAGS = flags.FLAGS

common.define_preset_flag("the shared CIFAR-10 image folder")
flags.DEFINE_enum(
    "target", "B", list(autoencoder.TARGETS),
    "The half of --class_split with few labels (the grid's source is the other).",
)  # fmt: skip
common.define_study_flags(
    "Downstream seeds: own k-example subsets and initialisations each."
)
common.define_probe_flags(
    layers=(
        [*autoencoder.ENCODER_LAYERS, autoencoder.CODE_LAYER],
        f"Layers probed, of {list(autoencoder.PROBE_LAYERS)} (code: the "
        "autoencoder's; fc6/fc7: the supervised source's).",
    ),
    poolings=(["flatten"], f"Poolings of conv layers, of {list(features.POOLINGS)}."),
    sources=(
        list(autoencoder.PROBE_SOURCES),
        "Probe sources: autoencoder (pretrained encoder), random (the autoencoder "
        "before pretraining), supervised (the grid's source net; needs "
        "--grid_workdir).",
    ),
    arms=(
        list(autoencoder.ARMS),
        "What to run: probe, encoder_init (conv layers from the encoder, "
        "fine-tuned), scratch, supervised (the grid's source net, fine-tuned; "
        "needs --grid_workdir).",
    ),
)
# The autoencoder's studies were measured with heads trained for at least 10 steps
# an epoch (docs/autoencoder.md).
FLAGS.set_default("probe_min_epoch_steps", 10)
flags.DEFINE_integer("code_size", 128, "Units of the autoencoder's bottleneck code.")
flags.DEFINE_enum(
    "reconstruction_loss", "mse", list(autoencoder.LOSSES),
    "mse (mean squared error) or bce (binary cross-entropy) on [0, 1] pixels.",
)  # fmt: skip
flags.DEFINE_float(
    "noise_stddev", 0.0,
    "Denoising: Gaussian noise on the training inputs ([0, 1] units; 0: off).",
)  # fmt: skip
flags.DEFINE_float(
    "mask_rate", 0.0, "Denoising: fraction of training input pixels zeroed (0: off)."
)
flags.DEFINE_integer(
    "max_pretrain_images", None, "Pretrain on at most this many images (default all)."
)
flags.DEFINE_float(
    "pretrain_validation_fraction", 0.05,
    "Unlabelled images held out to stop pretraining early (seeded, label-free).",
)  # fmt: skip
flags.DEFINE_integer("pretrain_epochs", 30, "Maximum pretraining epochs.")
flags.DEFINE_enum(
    "pretrain_optimizer", "adam", list(training.OPTIMIZERS), "Pretraining optimiser."
)
flags.DEFINE_float("pretrain_learning_rate", 1e-3, "Pretraining learning rate.")
flags.DEFINE_float("pretrain_weight_decay", 0.0, "Pretraining weight decay.")
flags.DEFINE_integer(
    "pretrain_patience", 5, "Stop pretraining after this many epochs without progress."
)
flags.DEFINE_integer(
    "init_layers", 5,
    "Conv layers 1..n copied into the encoder_init and supervised classifiers (1..5).",
)  # fmt: skip
flags.DEFINE_bool(
    "match_scale", True,
    "Rescale the last copied conv block of encoder_init/supervised classifiers to "
    "the output RMS of a freshly initialised net (measured on unlabelled images).",
)  # fmt: skip
PRESETS = {
    "smoke": dict(
        workdir="runs/autoencoder_smoke", width=0.05, epochs=1, patience=0,
        batch_size=32, learning_rate=0.05, train_per_class=30, code_size=16,
        max_pretrain_images=320, pretrain_epochs=3, budgets=["2", "all"],
        probe_layers=["conv2", "code"], probe_sources=["autoencoder",
        "supervised"], probe_epochs=20, min_epoch_steps=2,
        probe_min_epoch_steps=2, tensorboard=True,
    ),
    "digits": dict(
        workdir="runs/autoencoder_digits", width=0.25, epochs=12, patience=3,
        learning_rate=0.02, reconstruction_loss="bce", seeds=["0", "1", "2"],
        # Fine-tuning copied layers at the scratch rate 0.02 collapsed to one
        # class (encoder) or diverged (CIFAR-10); 0.005 with match_scale did not.
        fine_tune_learning_rate=0.005,
    ),
    "cifar10": dict(
        workdir="runs/autoencoder_cifar10",
        dataset=common.CIFAR10_SPEC,
        width=0.25, epochs=10, patience=3, learning_rate=0.02, code_size=256,
        pretrain_epochs=8, pretrain_patience=3, train_per_class=1000,
        fine_tune_learning_rate=0.005,
        budgets=["1", "10", "100", "all"],
    ),
}  # fmt: skip


def study_config() -> autoencoder.StudyConfig:
    """The StudyConfig of the parsed flags (preset applied)."""
    common.check_split_seed()
    return autoencoder.StudyConfig(
        data=common.data_config(),
        model=common.model_config(),
        autoencoder=autoencoder.AutoencoderConfig(
            code_size=FLAGS.code_size,
            loss=FLAGS.reconstruction_loss,
            noise_stddev=FLAGS.noise_stddev,
            mask_rate=FLAGS.mask_rate,
            validation_fraction=FLAGS.pretrain_validation_fraction,
            max_images=FLAGS.max_pretrain_images,
        ),
        pretraining=common.train_config(
            epochs=FLAGS.pretrain_epochs,
            optimizer=FLAGS.pretrain_optimizer,
            learning_rate=FLAGS.pretrain_learning_rate,
            weight_decay=FLAGS.pretrain_weight_decay,
            patience=FLAGS.pretrain_patience,
        ),
        training=common.train_config(),
        probe=common.probe_config(),
        target=FLAGS.target,
        seeds=common.numbers("seeds"),
        budgets=common.budgets(),
        probe_layers=tuple(FLAGS.probe_layers),
        poolings=tuple(FLAGS.poolings),
        probe_sources=tuple(FLAGS.probe_sources),
        arms=tuple(FLAGS.arms),
        init_layers=FLAGS.init_layers,
        match_scale=FLAGS.match_scale,
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate,
        min_epoch_steps=FLAGS.min_epoch_steps,
        grid_workdir=FLAGS.grid_workdir or None,
    )


main = common.study_main(
    PRESETS, study_config, autoencoder.run_study,
    outputs=("results.jsonl", "summary.md", "summary.csv", "reconstructions.png",
             "label_budget.png", "encoder/saved_model"),
    tensorboard="",
)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
