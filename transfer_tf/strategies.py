"""Fine-tuning strategies: freeze or fine-tune a transferred net, and how much.

Every strategy starts from :func:`models.transfer_net` (layers 1..n copied from a
source net, layers n+1..8 fresh) and trains through :func:`training.train`: one
``fit`` with the project's callbacks, one compiled train step per training, no
hand-written loop. They differ only in the net's trainable flags and in what
``train`` is given:

- ``freeze``: ``transfer_net(..., fine_tune=False)`` (Yosinski's AnB), layers 1..n
  frozen with batch normalisation in inference mode; the config's optimiser.
  Nothing to add here (``training.train_task`` can also cache the frozen
  prefix's activations).
- ``fine_tune``: ``transfer_net(..., fine_tune=True)`` (AnB+); the config's
  optimiser.
- ``scratch``: ``transfer_net(source, 0, ...)``, the source's architecture freshly
  initialised; the config's optimiser.
- ``discriminative``: ``fine_tune=True``; ``optimizer=``
  :func:`discriminative_optimizer`, a ``keras.optimizers.MultiOptimizer`` with one
  optimiser per layer at its own rate.
- ``gradual_unfreezing``: ``fine_tune=True``; ``optimizer=`` and
  ``callbacks=`` from :func:`gradual_unfreezing`: a callback that freezes the
  lower layers and sets each one trainable at its epoch, and a per-layer
  MultiOptimizer that knows every variable from the start.
- ``l2_sp``: ``fine_tune=True``, wrapped in :class:`L2SPModel`, which adds the
  L2-SP penalty to the training loss; weight decay 0.
- ``lp_ft``: ``fine_tune=True``; two trainings (:func:`probe_then_fine_tune`):
  layers 1..n frozen, then every layer at a smaller rate.

:data:`STRATEGIES` holds each one's description, how to build its net
(:meth:`Strategy.build`) and how to train it (``Strategy.train``).

Gradual unfreezing changes ``trainable`` during one ``fit``. Keras 3 traces the
train step with the trainable variables of its first call, so the callback
re-traces it (``model.make_train_function(force=True)``) when the flags change.
That keeps frozen layers frozen the Keras way, which is what makes them exact:
until its epoch a layer gets no gradient, its optimiser does not run (no
momentum, Adam moments or weight decay, which would move weights even at a
learning rate of 0) and its batch normalisation runs in inference mode (in
training mode it would update its moving statistics and normalise with batch
statistics, which a learning-rate-only scheme cannot prevent). Its weights and
statistics stay bit-identical until its epoch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
from collections.abc import Callable

import keras

from transfer_tf import models, training

log = logging.getLogger(__name__)

NUM_LAYERS = len(models.LAYER_NAMES)  # conv1..fc8

# ULMFiT's per-layer learning-rate ratio (Howard & Ruder 2018): each layer 2.6x
# slower than the one above.
DEFAULT_FACTOR = 1 / 2.6
# L2-SP strengths of the order Li et al. 2018 use; they choose both by
# cross-validation, and so should a study.
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 0.01
# LP-FT's second stage: every layer at a tenth of the probe's learning rate.
DEFAULT_FINE_TUNE_FACTOR = 0.1


def count_steps(train_ds) -> int:
    """Batches per epoch of a batched dataset (what ``training.train`` uses)."""
    steps = int(train_ds.cardinality())
    if steps <= 0:
        raise ValueError(
            "train_ds must be a batched dataset of known, non-zero length "
            f"(cardinality {steps})"
        )
    return steps


# ---------------------------------------------------- per-layer optimiser groups


def _check_cut(n, top):
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= top:
        raise ValueError(f"n={n!r} must be a layer index in 0..{top}")


def _check_factor(factor, name="factor"):
    if isinstance(factor, bool) or not factor > 0:
        raise ValueError(f"{name}={factor!r} must be positive")


def layer_multipliers(model: keras.Model, factor: float) -> dict[str, float]:
    """Per-layer learning-rate multipliers of discriminative fine-tuning.

    ``fc8`` gets 1 and each lower weight layer ``factor`` times the one above:
    layer i (``models.layer_index``) gets ``factor ** (8 - i)``.

    Args:
      model: a net with (some of) the layers ``conv1``..``fc8``.
      factor: ratio between adjacent layers, > 0 (ULMFiT: 1 / 2.6).

    Returns:
      ``{layer name: multiplier}`` for the weight layers present in ``model``.
    """
    _check_factor(factor)
    present = sorted({models.layer_index(layer.name) for layer in model.layers} - {0})
    return {
        models.LAYER_NAMES[i - 1]: float(factor) ** (NUM_LAYERS - i) for i in present
    }


def _layer_variables(model: keras.Model) -> dict[str, list]:
    """Variables of each weight layer (with its batch norm), by layer name."""
    out = collections.defaultdict(list)
    for layer in model.layers:
        index = models.layer_index(layer.name)
        if index:
            out[models.LAYER_NAMES[index - 1]].extend(layer.weights)
    return out


def _group_optimizer(config, steps, multiplier, start_step=0):
    """The config's optimiser (schedule, weight decay) at ``multiplier`` times its
    learning rate, counting its schedule from global step ``start_step``."""
    scaled = dataclasses.replace(
        config, learning_rate=config.learning_rate * multiplier
    )
    optimizer = training.make_optimizer(scaled, steps)
    schedule = optimizer.get_config()["learning_rate"]
    if start_step and isinstance(schedule, dict):
        optimizer.learning_rate = StartAt(
            keras.optimizers.schedules.deserialize(schedule), start_step
        )
    return optimizer


def _optimizer_map(model, config, steps, multipliers, start_steps=None):
    """An OptimizerMap with one optimiser per weight layer, keyed by variable path;
    variables outside the weight layers get the config's own optimiser."""
    start_steps = start_steps or {}
    optimizer_map = keras.optimizers.OptimizerMap(
        training.make_optimizer(config, steps)
    )
    owner = {}
    for name, variables in _layer_variables(model).items():
        optimizer = _group_optimizer(
            config, steps, multipliers.get(name, 1.0), start_steps.get(name, 0)
        )
        for variable in variables:
            if variable.path in owner:
                if owner[variable.path] == name:
                    continue
                raise ValueError(
                    f"variable path {variable.path!r} occurs in layers "
                    f"{owner[variable.path]!r} and {name!r}; per-layer optimisers "
                    "need unique variable paths"
                )
            owner[variable.path] = name
            optimizer_map[variable.path] = optimizer
    return optimizer_map


def discriminative_optimizer(
    model: keras.Model,
    config: training.TrainConfig,
    steps_per_epoch: int,
    factor: float = DEFAULT_FACTOR,
) -> keras.optimizers.MultiOptimizer:
    """Discriminative fine-tuning (Howard & Ruder 2018): per-layer learning rates.

    One optimiser per weight layer (with its batch normalisation), each built by
    ``training.make_optimizer`` from ``config`` at ``learning_rate * multiplier``
    (:func:`layer_multipliers`), so each follows the config's schedule and
    weight decay; Keras' decoupled weight decay is ``w -= lr * weight_decay * w``,
    so it scales with the layer's rate. Pass the result as
    ``training.train(..., optimizer=...)``.

    Args:
      model: the net to train (its variables are assigned to layers here).
      config: the TrainConfig the training uses.
      steps_per_epoch: batches per epoch (:func:`count_steps`), for the schedule.
      factor: ratio between adjacent layers' rates.

    Returns:
      A ``keras.optimizers.MultiOptimizer``. It has no single learning rate, so
      ``metrics.jsonl`` carries no ``learning_rate``.
    """
    multipliers = layer_multipliers(model, factor)
    return keras.optimizers.MultiOptimizer(
        _optimizer_map(model, config, steps_per_epoch, multipliers)
    )


# ------------------------------------------------------------- gradual unfreezing


@keras.saving.register_keras_serializable(package="transfer_tf")
class StartAt(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule for an optimiser that takes its first step at global step
    ``start``: it counts only its own steps, so it reads ``schedule`` at
    ``step + start`` and stays on the training's common schedule."""

    def __init__(self, schedule, start: int):
        self.schedule = schedule
        self.start = int(start)

    def __call__(self, step):
        return self.schedule(step + self.start)

    def get_config(self):
        return {
            "schedule": keras.optimizers.schedules.serialize(self.schedule),
            "start": self.start,
        }

    @classmethod
    def from_config(cls, config):
        schedule = keras.optimizers.schedules.deserialize(config["schedule"])
        return cls(schedule, config["start"])


@keras.saving.register_keras_serializable(package="transfer_tf")
class LayerwiseOptimizer(keras.optimizers.MultiOptimizer):
    """A MultiOptimizer that takes gradients for any subset of its variables.

    ``keras.optimizers.MultiOptimizer.apply`` insists on gradients for every
    variable it was built on. Built on all the variables that will ever train,
    this one applies each sub-optimiser to the variables that are trainable in
    the current train step and leaves the others alone: a sub-optimiser whose
    variables are all frozen is not run at all (no update, no state, no weight
    decay, no step count).
    """

    def __init__(self, optimizer_map, loss_scale_factor=None, name=None):
        super().__init__(optimizer_map, loss_scale_factor=loss_scale_factor, name=name)
        self._map = optimizer_map

    def optimizer_for(self, variable):
        """The sub-optimiser that trains ``variable``."""
        return self._map(variable)

    def apply(self, grads, trainable_variables=None):
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "when passing grads without variables, build the optimizer first"
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        groups = {}
        for grad, variable in zip(grads, trainable_variables, strict=True):
            optimizer = self.optimizer_for(variable)
            group = groups.setdefault(id(optimizer), (optimizer, [], []))
            group[1].append(grad)
            group[2].append(variable)
        for optimizer, group_grads, group_variables in groups.values():
            optimizer.apply(group_grads, group_variables)
        self.iterations.assign_add(1)


def unfreeze_epochs(every_epochs: int = 1, initial_layers: int = 1) -> dict[str, int]:
    """The epoch (0-based) from which each weight layer trains.

    The top ``initial_layers`` layers train from epoch 0; then one more layer,
    top down, every ``every_epochs`` epochs (ULMFiT: the top layer first, one more
    per epoch).

    Returns:
      ``{layer name: epoch}`` for ``conv1``..``fc8``.
    """
    if isinstance(every_epochs, bool) or not isinstance(every_epochs, int):
        raise ValueError(f"every_epochs={every_epochs!r} must be a positive integer")
    if every_epochs < 1:
        raise ValueError(f"every_epochs={every_epochs!r} must be a positive integer")
    if not 1 <= initial_layers <= NUM_LAYERS:
        raise ValueError(
            f"initial_layers={initial_layers!r} must be in 1..{NUM_LAYERS}"
        )
    top_frozen = NUM_LAYERS - initial_layers  # index of the top frozen layer
    return {
        name: max(0, top_frozen + 1 - i) * every_epochs
        for i, name in enumerate(models.LAYER_NAMES, start=1)
    }


class GradualUnfreezing(keras.callbacks.Callback):
    """Sets each weight layer trainable from its epoch on, re-tracing the train step.

    At the start of every epoch, each managed layer (with its batch normalisation)
    is trainable if its epoch has come and frozen otherwise; when that changes,
    ``model.make_train_function(force=True)`` re-traces the train step with the
    new trainable variables (Keras 3's documented way; no recompile, so the
    optimiser, metrics and callbacks keep their state). Frozen layers are frozen
    the Keras way: no gradients, batch normalisation in inference mode, so their
    weights and statistics stay bit-identical until their epoch. Because the flags
    follow the epoch number, a training resumed from its backup starts with the
    right ones.

    Args:
      epochs: ``{layer name: first epoch (0-based) it trains}``
        (:func:`unfreeze_epochs`).
      managed: the layer names to manage (default: all in ``epochs``); others
        keep their ``trainable`` flag.
    """

    def __init__(self, epochs: dict[str, int], managed=None):
        super().__init__()
        self.epochs = dict(epochs)
        self.managed = set(self.epochs if managed is None else managed)

    def on_epoch_begin(self, epoch, logs=None):
        changed = []
        for layer in self.model.layers:
            index = models.layer_index(layer.name)
            name = models.LAYER_NAMES[index - 1] if index else None
            if name not in self.managed or not layer.weights:
                continue
            trainable = epoch >= self.epochs[name]
            if layer.trainable != trainable:
                layer.trainable = trainable
                changed.append(layer.name)
        if changed:
            self.model.make_train_function(force=True)
            log.info("epoch %d: trainable now %s", epoch + 1, self._trainable_names())

    def _trainable_names(self):
        return [
            layer.name
            for layer in self.model.layers
            if layer.name in models.LAYER_NAMES and layer.trainable
        ]


def gradual_unfreezing(
    model: keras.Model,
    config: training.TrainConfig,
    steps_per_epoch: int,
    every_epochs: int = 1,
    initial_layers: int = 1,
    factor: float = 1.0,
) -> tuple[LayerwiseOptimizer, GradualUnfreezing]:
    """Gradual unfreezing (Howard & Ruder 2018) in one ``training.train``.

    Layer by layer from the top (:func:`unfreeze_epochs`), each trainable weight
    layer of ``model`` (with its batch normalisation) is frozen until its epoch
    by the returned callback. The returned optimiser has one sub-optimiser per
    layer, built here on every variable that will train, so a layer unfrozen
    later trains as if freshly unfrozen: its optimiser state starts at zero and
    counts its own steps (Adam's bias correction), while its learning rate
    follows the config's schedule at the global step (:class:`StartAt`).
    ``factor < 1`` adds discriminative learning rates (:func:`layer_multipliers`),
    as ULMFiT does. With early stopping (``config.patience``) a training may stop
    before every layer has trained; layers whose epoch is ``config.epochs`` or
    later never train and stay frozen.

    Use both: ``training.train(model, ..., optimizer=optimizer,
    callbacks=[callback])``.

    Args:
      model: the net to train; its trainable layers are the ones managed (use
        ``transfer_net(..., fine_tune=True)``); frozen layers stay frozen.
      config: the TrainConfig the training uses.
      steps_per_epoch: batches per epoch (:func:`count_steps`).
      every_epochs: epochs between unfreezing one layer and the next.
      initial_layers: top layers trained from the first epoch.
      factor: per-layer learning-rate ratio (1: the config's rate everywhere).

    Returns:
      ``(optimizer, callback)``.
    """
    epochs = unfreeze_epochs(every_epochs, initial_layers)
    multipliers = layer_multipliers(model, factor)
    managed = {
        models.LAYER_NAMES[models.layer_index(layer.name) - 1]
        for layer in model.layers
        if models.layer_index(layer.name) and layer.trainable_weights
    }
    late = sorted(n for n in managed if epochs[n] >= config.epochs)
    if late:
        log.warning(
            "gradual unfreezing: %s would start at epoch %d or later and never "
            "train in a %d-epoch training",
            late,
            config.epochs + 1,
            config.epochs,
        )
    start_steps = {name: epoch * steps_per_epoch for name, epoch in epochs.items()}
    optimizer = LayerwiseOptimizer(
        _optimizer_map(model, config, steps_per_epoch, multipliers, start_steps)
    )
    # Built now, on every variable that will train: fit() builds an optimiser on
    # the variables trainable at its start only, and ours must know them all.
    optimizer.build(model.trainable_variables)
    return optimizer, GradualUnfreezing(epochs, managed)


# -------------------------------------------------------------------------- L2-SP


class _Penalised:
    def __init__(self, anchored, plain):
        self.anchored = tuple(anchored)  # (kernel, its value w0 at the start)
        self.plain = tuple(plain)


class L2SPModel(keras.Model):
    """A net trained with the L2-SP penalty (Li, Grandvalet & Davoine 2018).

    The training loss becomes ``loss + alpha/2 Σ ||w - w0||² + beta/2 Σ ||w||²``:
    the first sum over the kernels of layers 1..n (copied from the source; ``w0``
    are their values when this wrapper is made), the second over the kernels of
    the new layers n+1..8; a frozen kernel is left out. Biases and batch-norm
    parameters are not penalised, as in the project's weight decay, which L2-SP
    replaces: train with ``weight_decay=0``.

    The wrapper is a Functional model over ``model``'s own layers, so training it
    trains ``model`` in place; export and evaluate ``model`` itself. The penalty
    is added by ``compute_loss`` only when training, so ``train/loss`` in
    ``metrics.jsonl`` includes it while ``val/loss`` (early stopping, model
    selection) is the plain cross-entropy, comparable with other strategies.
    (Keras' own route, a regularizer on each kernel variable, trains the same but
    adds the penalty in ``test_step`` too, i.e. to ``val/loss`` and to the loss
    ``training.evaluate`` reports; so does a penalty hidden in ``loss=``.)

    Args:
      model: a transfer net (``transfer_net(..., fine_tune=True)``).
      n: its cut: layers 1..n are the copied ones.
      alpha: strength of the pull towards the source's weights.
      beta: strength of the ordinary L2 penalty on the new layers.
    """

    def __init__(
        self,
        model: keras.Model,
        n: int,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
    ):
        _check_cut(n, top=NUM_LAYERS)
        for field, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"{field}={value!r} must be >= 0")
        super().__init__(model.inputs, model.outputs, name=f"{model.name}_l2_sp")
        self.alpha, self.beta, self.n = float(alpha), float(beta), n
        anchored, plain = [], []
        for layer in model.layers:
            index = models.layer_index(layer.name)
            for variable in layer.weights if index else ():
                if variable.name != "kernel":
                    continue
                if index <= n:
                    anchor = keras.Variable(
                        variable.numpy(), trainable=False, name=f"{layer.name}_w0"
                    )
                    anchored.append((variable, anchor))
                else:
                    plain.append(variable)
        # Kept in a plain object that Keras does not track: the anchors are inputs
        # of the penalty, not weights of the model (not in its get_weights()).
        self._penalised = _Penalised(anchored, plain)

    def penalty(self):
        """The L2-SP penalty of the current weights (trainable kernels only)."""
        anchored, plain = self._penalised.anchored, self._penalised.plain
        total = keras.ops.zeros(())
        for variable, anchor in anchored:
            if variable.trainable and self.alpha:
                diff = keras.ops.subtract(variable, anchor)
                total += self.alpha / 2 * keras.ops.sum(keras.ops.square(diff))
        for variable in plain:
            if variable.trainable and self.beta:
                total += self.beta / 2 * keras.ops.sum(keras.ops.square(variable))
        return total

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        return loss + self.penalty() if training else loss


# -------------------------------------------------------------------------- LP-FT


def probe_then_fine_tune(
    model: keras.Model,
    train_ds,
    val_ds,
    config: training.TrainConfig,
    workdir,
    n: int = NUM_LAYERS - 1,
    fine_tune_config: training.TrainConfig | None = None,
    callbacks=(),
) -> dict:
    """LP-FT (Kumar et al. 2022): a linear probe first, then fine-tune everything.

    Stage ``probe``: layers 1..n frozen (``models.set_trainable``; their batch
    normalisation in inference mode, so they stay bit-identical), the rest trained
    with ``config``; with the default ``n = 7`` only ``fc8`` trains, a linear
    probe of the frozen ``fc7`` features. Stage ``fine_tune``: every layer
    trainable, trained from the probe's best weights with ``fine_tune_config``
    (default: ``config`` at a tenth of its learning rate), so the fine-tuning
    starts from a head that already fits instead of distorting the features to
    fit a random one. Each stage is one ``training.train`` in its own work
    directory (``<workdir>/probe``, ``<workdir>/fine_tune``).

    Returns:
      ``{"probe": TrainResult, "fine_tune": TrainResult}``; ``model`` holds the
      fine-tuning stage's best weights.
    """
    _check_cut(n, top=NUM_LAYERS - 1)
    workdir = pathlib.Path(workdir)
    if fine_tune_config is None:
        fine_tune_config = dataclasses.replace(
            config, learning_rate=config.learning_rate * DEFAULT_FINE_TUNE_FACTOR
        )
    models.set_trainable(model, n, trainable_below=False)
    probe = training.train(
        model, train_ds, val_ds, config, workdir / "probe", callbacks=callbacks
    )
    models.set_trainable(model, n, trainable_below=True)
    fine_tune = training.train(
        model,
        train_ds,
        val_ds,
        fine_tune_config,
        workdir / "fine_tune",
        callbacks=callbacks,
    )
    return {"probe": probe, "fine_tune": fine_tune}


# ----------------------------------------------------------------------- registry


def _train_plain(model, n, train_ds, val_ds, config, workdir, callbacks=()):
    del n  # the net's trainable flags say everything
    result = training.train(
        model, train_ds, val_ds, config, workdir, callbacks=callbacks
    )
    return {"train": result}


def _train_discriminative(
    model, n, train_ds, val_ds, config, workdir, callbacks=(), factor=DEFAULT_FACTOR
):
    del n
    optimizer = discriminative_optimizer(model, config, count_steps(train_ds), factor)
    result = training.train(
        model,
        train_ds,
        val_ds,
        config,
        workdir,
        callbacks=callbacks,
        optimizer=optimizer,
    )
    return {"train": result}


def _train_gradual(
    model,
    n,
    train_ds,
    val_ds,
    config,
    workdir,
    callbacks=(),
    every_epochs=1,
    initial_layers=None,
    factor=1.0,
):
    if initial_layers is None:  # the new layers from the start, then the copied
        initial_layers = NUM_LAYERS - n
    optimizer, callback = gradual_unfreezing(
        model, config, count_steps(train_ds), every_epochs, initial_layers, factor
    )
    result = training.train(
        model,
        train_ds,
        val_ds,
        config,
        workdir,
        callbacks=[callback, *callbacks],
        optimizer=optimizer,
    )
    return {"train": result}


def _train_l2_sp(
    model,
    n,
    train_ds,
    val_ds,
    config,
    workdir,
    callbacks=(),
    alpha=DEFAULT_ALPHA,
    beta=DEFAULT_BETA,
):
    if config.weight_decay:
        log.info("l2_sp replaces weight decay %g by its penalty", config.weight_decay)
        config = dataclasses.replace(config, weight_decay=0.0)
    wrapper = L2SPModel(model, n, alpha, beta)
    result = training.train(
        wrapper, train_ds, val_ds, config, workdir, callbacks=callbacks
    )
    return {"train": result}


def _train_lp_ft(
    model, n, train_ds, val_ds, config, workdir, callbacks=(), fine_tune_config=None
):
    return probe_then_fine_tune(
        model,
        train_ds,
        val_ds,
        config,
        workdir,
        n=n,
        fine_tune_config=fine_tune_config,
        callbacks=callbacks,
    )


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A fine-tuning strategy: how its net is built and how it is trained.

    Attributes:
      name: its key in :data:`STRATEGIES`.
      description: one line for tables and plots.
      reference: where it comes from.
      copies_source: layers 1..n come from the source (``False``: scratch).
      fine_tune: the copied layers are trainable (``transfer_net``'s flag).
      train: ``train(model, n, train_ds, val_ds, config, workdir, callbacks=(),
        **options)`` trains the built net in place through ``training.train`` and
        returns ``{stage: TrainResult}`` (``{"train": ...}``, or ``{"probe":
        ..., "fine_tune": ...}`` for lp_ft).
      options: the keyword options of ``train`` and their defaults (``None``:
        derived, see the comment in :data:`STRATEGIES`).
    """

    name: str
    description: str
    reference: str
    copies_source: bool
    fine_tune: bool
    train: Callable
    options: dict = dataclasses.field(default_factory=dict)

    def build(
        self,
        source_model: keras.Model,
        n: int,
        num_classes: int,
        seed: int = 0,
        input_shape=None,
        dtype=None,
    ) -> keras.Model:
        """The strategy's net: ``models.transfer_net`` with its flags."""
        return models.transfer_net(
            source_model,
            n if self.copies_source else 0,
            num_classes,
            fine_tune=self.fine_tune,
            seed=seed,
            input_shape=input_shape,
            dtype=dtype,
        )


def _registry(*strategies: Strategy) -> dict[str, Strategy]:
    return {s.name: s for s in strategies}


# Strategy(name, description, reference, copies_source, fine_tune, train, options)
STRATEGIES = _registry(
    Strategy(
        "freeze",
        "layers 1..n copied and frozen, n+1..8 trained (AnB)",
        "Yosinski et al. 2014",
        True,
        False,
        _train_plain,
    ),
    Strategy(
        "fine_tune",
        "layers 1..n copied, every layer trained (AnB+)",
        "Yosinski et al. 2014",
        True,
        True,
        _train_plain,
    ),
    Strategy(
        "discriminative",
        "every layer trained, each at factor x the rate of the one above",
        "Howard & Ruder 2018",
        True,
        True,
        _train_discriminative,
        {"factor": DEFAULT_FACTOR},
    ),
    Strategy(
        "gradual_unfreezing",
        "new layers trained first, one copied layer more every epoch",
        "Howard & Ruder 2018",
        True,
        True,
        _train_gradual,
        # initial_layers None: the 8 - n new layers
        {"every_epochs": 1, "initial_layers": None, "factor": 1.0},
    ),
    Strategy(
        "lp_ft",
        "layers 1..n frozen first, then every layer at a lower rate",
        "Kumar et al. 2022",
        True,
        True,
        _train_lp_ft,
        # fine_tune_config None: the config at DEFAULT_FINE_TUNE_FACTOR x its rate
        {"fine_tune_config": None},
    ),
    Strategy(
        "l2_sp",
        "every layer trained, copied ones pulled towards the source",
        "Li, Grandvalet & Davoine 2018",
        True,
        True,
        _train_l2_sp,
        {"alpha": DEFAULT_ALPHA, "beta": DEFAULT_BETA},
    ),
    Strategy(
        "scratch",
        "the source's architecture, freshly initialised, all trained",
        "baseline",
        False,
        True,
        _train_plain,
    ),
)


def strategy(name: str) -> Strategy:
    """The strategy called ``name`` (see :data:`STRATEGIES`)."""
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}"
        )
    return STRATEGIES[name]


# ------------------------------------------------------------------ on a task


def _stage(name: str, result: training.TrainResult) -> dict:
    return {
        "stage": name,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "learning_rate_reductions": result.learning_rate_reductions,
        "val_loss": result.best_val_loss,
        "val_accuracy": result.best_val_accuracy,
        "train_time": result.wall_time,
    }


def train_on_task(
    name: str,
    model: keras.Model,
    n: int,
    task,
    train_config: training.TrainConfig,
    run_dir,
    batch_size: int,
    augment: str = "none",
    min_epoch_steps: int = 1,
    options: dict | None = None,
) -> tuple[training.TaskResult, dict]:
    """Trains a strategy's built net (``strategy(name).build``) on a task by
    ``train_config`` (the plateau rule) and tests it: what the fine-tuning study
    and the advisor both run.

    ``freeze``, ``fine_tune`` and ``scratch`` train through
    ``training.train_task`` (a frozen prefix then trains on its cached
    activations: exact); the others through the strategy's own ``train``
    (their optimiser or callbacks), given ``options``.

    Returns:
      ``(outcome, stages)``: the tested outcome of the last stage and
      ``{stage: TrainResult}``; ``model`` holds the best weights.
    """
    if name in ("freeze", "fine_tune", "scratch"):
        outcome = training.train_task(
            model,
            task,
            train_config,
            run_dir,
            batch_size,
            augment,
            min_epoch_steps=min_epoch_steps,
        )
        return outcome, {"train": outcome.train}
    keras.utils.set_random_seed(train_config.seed)  # the pipeline's shuffle
    stages = strategy(name).train(
        model,
        n,
        task.train_dataset(batch_size, train_config.seed, augment, min_epoch_steps),
        task.eval_dataset("validation", batch_size),
        train_config,
        run_dir,
        **(options or {}),
    )
    outcome = training.tested(
        stages.get("fine_tune", stages.get("train")),
        model,
        task,
        batch_size,
        f"{name} trains through its own optimiser or callbacks",
    )
    return outcome, stages


def task_record(outcome: training.TaskResult, stages: dict, task, rate) -> dict:
    """What is recorded of a strategy's training: the outcome's fields, each
    stage's, and the totals over stages."""
    record = outcome.record()
    record.update(
        num_classes=task.num_classes,
        learning_rate=rate,
        stages=[_stage(name, result) for name, result in stages.items()],
        epochs_total=sum(r.epochs_run for r in stages.values()),
        steps_total=sum(r.epochs_run * r.steps_per_epoch for r in stages.values()),
        train_time=sum(r.wall_time for r in stages.values()),
    )
    return record
