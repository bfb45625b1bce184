r"""A second, independent DANN as referee of the domain-adaptation study: ADAPT's
(``pip install '.[referee]'``: adapt 0.4.5, not a runtime dependency) on the same
arrays, the same net, the same optimizer and the same budget, side by side with
the study's own DANN and source only.

    python experiments/da_referee.py --workdir=runs/domain_adaptation_digits

reads the study's work directory (its ``config.json`` and ``results.jsonl``): for
``--pair`` (default: its first) and each seed it finished, it loads the same
domains, builds the same base net (``models.base_net``, the run's seed), splits it
at the adapted layer into ADAPT's encoder and task head, adds the study's domain
classifier (``adaptation.domain_units`` ReLU units, one sigmoid output), and trains
ADAPT's ``DANN`` with SGD at the study's rate and momentum for the study's budget
in optimizer steps (``training.epochs`` rounds of ``training.steps_per_epoch``),
its ``lambda_`` rising by Ganin et al.'s schedule to ``--weight`` (``UpdateLambda``).
After every round it scores the source validation loss and the target test top-1;
like the study's ``source val`` rule, the round of the lowest source validation
loss is chosen. The table: per seed the study's source only, the study's DANN at
``--weight`` (its own ``source val`` choice) and ADAPT's, with the paired
differences' 95% t-intervals over seeds.

Two differences of ADAPT's DANN from the study's, both documented rather than
patched: its domain loss is the sum of the source and target terms' means (twice
the study's mean over the joined batch, so ``lambda_`` = w scales the features'
reversed gradient like the study's weight 2w, and its classifier learns at twice
the rate); it has no reversal layer but three optimizers (task, encoder,
classifier) over three tapes, which is the same update. ADAPT's ``DeepCORAL`` is
no referee: it trains the encoder on the CORAL loss alone (never on the
classification loss; its docstring says otherwise), see docs/domain_adaptation.md.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

import common  # noqa: F401  (logging and TensorFlow's start-up settings)
from transfer_tf import cache as activation_cache
from transfer_tf import domains, models, results
from transfer_tf.studies import config as config_lib
from transfer_tf.studies import stats
from transfer_tf.studies.domain_adaptation import plan as da_plan

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A domain-adaptation study's work directory.")
flags.DEFINE_string(
    "pair", None, "The pair, as the study names it (default: its first pair)."
)
flags.DEFINE_float("weight", 0.1, "The DANN weight compared (one the study ran).")
flags.DEFINE_list("seeds", [], "Seeds (default: every seed the study finished).")
flags.DEFINE_integer(
    "rounds", None, "Rounds of training (default: the study's training.epochs)."
)
flags.DEFINE_string("out", None, "Also write the table as JSON here.")


def adapt_available() -> bool:
    try:
        import adapt  # noqa: F401
    except ImportError:
        return False
    return True


def _split_net(net, layer: str):
    """ADAPT's encoder (images -> the layer's features) and task head (features
    -> logits) of a base net, sharing its weights (``cache.split_at``)."""
    if layer not in ("fc6", "fc7"):
        raise ValueError(
            f"the referee adapts a dense layer (fc6, fc7), not {layer!r}: a feature "
            "map would need the study's pooling"
        )
    return activation_cache.split_at(net, models.layer_index(layer))


def adapt_dann(pair, config, seed: int, weight: float, rounds: int) -> list[dict]:
    """Trains ADAPT's DANN on ``pair`` as the study would train its own (see the
    module docstring); returns one row per round: ``epoch``,
    ``source_val_loss``, ``target_test_accuracy``."""
    import keras
    import tensorflow as tf
    from adapt.feature_based import DANN
    from adapt.utils import UpdateLambda

    keras.utils.set_random_seed(seed)
    net = models.base_net(pair.source, config.model, seed, "float32")
    encoder, task = _split_net(net, config.adaptation.layer)
    discriminator = keras.Sequential(
        [
            keras.Input(encoder.output.shape[1:]),
            *(
                keras.layers.Dense(u, activation="relu")
                for u in config.adaptation.domain_units
            ),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    t = config.training
    batch = config.data.batch_size
    steps = t.steps_per_epoch or math.ceil(len(pair.source.y_train) / batch)
    classes = pair.source.num_classes
    xs, ys = pair.source.arrays("train")
    xv, yv = pair.source.arrays("validation")
    xt_test, yt_test = pair.target.arrays("test")
    # A round of ``steps`` batches: the source repeated (as the study's stream).
    per_round = steps * batch
    reps = math.ceil(per_round * rounds / len(xs))
    order = np.random.default_rng(seed).permutation(np.tile(np.arange(len(xs)), reps))
    xs_all, ys_all = xs[order], keras.utils.to_categorical(ys[order], classes)
    xt_pool = pair.target_images
    xt_all = xt_pool[
        np.random.default_rng(seed + 1).integers(0, len(xt_pool), len(order))
    ]
    model = DANN(
        encoder,
        task,
        discriminator,
        lambda_=tf.Variable(0.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        optimizer=keras.optimizers.SGD(t.learning_rate, momentum=t.momentum),
        metrics=["accuracy"],
        verbose=0,
        random_state=seed,
    )
    schedule = UpdateLambda(
        lambda_max=weight,
        max_steps=steps * rounds,
        gamma=config.adaptation.reversal_gamma,
    )
    rows = []
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for r in range(rounds):
        part = slice(r * per_round, (r + 1) * per_round)
        model.fit(
            xs_all[part],
            ys_all[part],
            Xt=xt_all[part],
            epochs=1,
            batch_size=batch,
            callbacks=[schedule],
            verbose=0,
        )
        # ADAPT trains copies of the networks it was given
        enc, head = model.encoder_, model.task_
        val_logits = head(enc.predict(xv, verbose=0), training=False)
        test_logits = head(enc.predict(xt_test, verbose=0), training=False)
        rows.append(
            {
                "epoch": r + 1,
                "source_val_loss": float(loss(yv, val_logits)),
                "target_test_accuracy": float(
                    np.mean(np.argmax(test_logits, 1) == yt_test)
                ),
            }
        )
    return rows


def study_choices(records, pair: str, weight: float) -> dict:
    """Per seed, the study's ``source val`` choice for source only and for DANN
    at ``weight``: ``{seed: {"source_only": acc, "dann": acc}}``."""
    out = {}
    for r in records:
        if r.get("pair") != pair or r["arm"] not in ("source_only", "dann"):
            continue
        if r["arm"] == "dann" and not math.isclose(r["weight"], weight):
            continue
        chosen = da_plan.choose(r.get("candidates") or [], "source_val")
        if chosen is not None:
            out.setdefault(r["seed"], {})[r["arm"]] = chosen["target_test_accuracy"]
    return out


def saved_config(default, saved: dict):
    """The configuration a work directory's ``config.json`` records (its
    fields over ``default``'s)."""
    changes = {}
    for path in config_lib.leaves(default):
        node = saved
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            changes[path] = tuple(node) if isinstance(node, list) else node
    return config_lib.override(default, changes)


def main(argv):
    del argv
    if not FLAGS.workdir:
        sys.exit(
            "error: --workdir (a domain-adaptation study's work directory) is required"
        )
    workdir = pathlib.Path(FLAGS.workdir)
    try:
        refereed = _study_config(workdir)
        _check_out(FLAGS.out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if not adapt_available():
        sys.exit("error: ADAPT is not installed: pip install '.[referee]'")
    try:
        _referee(workdir, refereed)
    except KeyboardInterrupt:
        print("interrupted (the referee writes nothing until it ends)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def _study_config(workdir: pathlib.Path) -> dict:
    """The domain-adaptation study's recorded configuration in ``workdir``, or a
    ValueError saying what the folder is instead."""
    path = workdir / "config.json"
    if not workdir.is_dir():
        raise ValueError(f"--workdir={str(workdir)!r} does not exist")
    if not path.is_file():
        raise ValueError(
            f"{workdir} has no config.json: not a study's work directory (give the "
            "--workdir of a domain_adaptation.py run)"
        )
    try:
        recorded = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not readable JSON ({e})") from None
    study = recorded.get("study") if isinstance(recorded, dict) else None
    if study != "domain_adaptation":
        raise ValueError(
            f"{workdir} is not a domain-adaptation study's work directory (its "
            f"config.json names study {study!r}); the referee reruns DANN of a "
            "domain_adaptation.py run: give that run's --workdir"
        )
    if not (workdir / "results.jsonl").is_file():
        raise ValueError(
            f"{workdir} holds no results.jsonl yet: run the study first (the "
            "referee compares against its finished source only and DANN runs)"
        )
    return recorded


def _check_out(out):
    """``--out`` is a new file or an earlier referee table (never a user's file)."""
    if not out:
        return
    path = pathlib.Path(out)
    if path.is_dir():
        raise ValueError(f"--out={out!r} is a directory: give a file name")
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (ValueError, OSError):
            earlier = None
        if not (isinstance(earlier, dict) and {"pair", "rows"} <= set(earlier)):
            raise ValueError(
                f"--out={out!r} exists and is not an earlier referee table: give "
                "another file (the referee never writes over a file it did not write)"
            )


def _referee(workdir: pathlib.Path, recorded: dict):
    from transfer_tf.studies import domain_adaptation

    config = saved_config(domain_adaptation.STUDY.config_class(), recorded)
    records = results.read_jsonl(workdir / "results.jsonl")
    names = {domains.pair_name(s, t): (s, t) for s, t in config.pairs}
    pair_name = FLAGS.pair or next(iter(names))
    if pair_name not in names:
        raise ValueError(f"--pair={pair_name!r} is not one of {sorted(names)}")
    ours = study_choices(records, pair_name, FLAGS.weight)
    seeds = [int(s) for s in FLAGS.seeds] or sorted(
        s for s, arms in ours.items() if {"source_only", "dann"} <= set(arms)
    )
    missing = [s for s in seeds if {"source_only", "dann"} - set(ours.get(s, {}))]
    if not seeds or missing:
        raise ValueError(
            f"the study has no finished source only and DANN at weight "
            f"{FLAGS.weight:g} on {pair_name} for seeds {missing or 'any'}"
        )
    pair = domains.load_pair(*names[pair_name], config.data)
    rounds = FLAGS.rounds or config.training.epochs
    table = []
    for seed in seeds:
        started = time.time()
        rows = adapt_dann(pair, config, seed, FLAGS.weight, rounds)
        chosen = da_plan.choose(rows, "source_val")
        table.append(
            {
                "seed": seed,
                "source_only": ours[seed]["source_only"],
                "dann": ours[seed]["dann"],
                "adapt_dann": chosen["target_test_accuracy"],
                "adapt_epoch": chosen["epoch"],
                "seconds": time.time() - started,
            }
        )
        print(
            f"seed {seed}: source only {table[-1]['source_only']:.4f}  DANN "
            f"{table[-1]['dann']:.4f}  ADAPT DANN {table[-1]['adapt_dann']:.4f} "
            f"(round {chosen['epoch']}, {table[-1]['seconds']:.0f} s)",
            flush=True,
        )
    print(
        f"\n{pair_name}, DANN weight {FLAGS.weight:g} (ADAPT lambda_ the same), "
        f"{rounds} rounds of {config.training.steps_per_epoch} steps, target test "
        "top-1 of the round of the lowest source validation loss:\n"
    )
    print("| seed | source only | DANN (ours) | DANN (ADAPT) |")
    print("|---|---|---|---|")
    for row in table:
        print(
            f"| {row['seed']} | {row['source_only']:.4f} | {row['dann']:.4f} | "
            f"{row['adapt_dann']:.4f} |"
        )
    print()
    for label, a, b in (
        ("DANN (ours) - source only", "dann", "source_only"),
        ("DANN (ADAPT) - source only", "adapt_dann", "source_only"),
        ("DANN (ours) - DANN (ADAPT)", "dann", "adapt_dann"),
    ):
        diffs = [100 * (row[a] - row[b]) for row in table]
        iv = stats.interval([d / 100 for d in diffs])
        print(f"{label}: {stats.format_interval(iv)} points ({len(diffs)} seeds)")
    if FLAGS.out:
        results.write_json(pathlib.Path(FLAGS.out), {"pair": pair_name, "rows": table})


if __name__ == "__main__":
    app.run(main)
