"""Pretrained nets to transfer from: the one reader of base nets for every study
and the advisor (studies import it, never each other).

Two doors:

- a finished transfer grid's work directory (``--grid_workdir``):
  :func:`grid_records`, :func:`grid_base_net` and :func:`grid_fingerprint`
  refuse a grid built on other data or another architecture with the same words
  for every study that reuses its nets;
- any source a user names (:func:`load`): a ``.keras`` file, a SavedModel
  directory, a study's work directory (its base nets) or a Keras Applications
  name, each made to take the target's images (:func:`adapt_input`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import keras
import numpy as np
from keras import layers

from transfer_tf import backbones, export, features, models, results
from transfer_tf.studies import runner

GRID_STUDY = "transferability"  # the grid's name in its work directory's config.json

# What a study's results.jsonl calls its base nets (transfer grid, fine-tuning).
BASE_NET_KINDS = ("base", "source")

# Layers put in front of a base net by adapt_input (not base-net layers: their
# names belong to none of conv1..fc8).
ADAPTER_LAYERS = ("adapt_float", "adapt_resize", "adapt_channels")


# ------------------------------------------------------------------ a transfer grid


def base_key(split: str, seed: int, half: str) -> str:
    """The key of a grid's base net on ``half`` (``random/seed0/baseA``): its
    results line and its run directory."""
    return f"{split}/seed{seed}/base{half}"


def grid_records(workdir, data_config, model_config, fields=("dataset",)) -> list:
    """The records of a transferability work directory that another study reads
    (its source nets, its AnB curves), checked to be comparable.

    Args:
      workdir: the grid's work directory (``--grid_workdir``).
      data_config, model_config: the reading study's; the grid must have built
        its nets with the same architecture and the same data ``fields``.

    Raises:
      ValueError: the path is not a transferability work directory (naming what
        is missing), or its nets were built differently (naming the fields).
    """
    path = pathlib.Path(workdir).expanduser()
    config_path = path / runner.CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"grid_workdir {str(path)!r} is not a transfer-grid work directory (no "
            "config.json); run experiments/transferability.py there first"
        )
    grid = results.read_json(config_path)
    if grid.get("study", GRID_STUDY) != GRID_STUDY:
        raise ValueError(
            f"grid_workdir {str(path)!r} holds a {grid['study']} study, not a "
            "transferability grid"
        )
    theirs = {"data": grid.get("data", {}), "model": grid.get("model", {})}
    ours = {
        "data": {f: getattr(data_config, f) for f in fields},
        "model": dataclasses.asdict(model_config),
    }
    differences = [
        f"{section}.{k}: {theirs[section].get(k)!r} -> {v!r}"
        for section, values in ours.items()
        for k, v in values.items()
        if theirs[section].get(k) != (list(v) if isinstance(v, tuple) else v)
    ]
    if differences:
        raise ValueError(
            f"the grid in {str(path)!r} built its nets differently "
            f"({'; '.join(differences)}, grid -> this study): they would not be "
            "compared like for like; run the grid with this study's data and model "
            "flags, or leave it out"
        )
    return list(
        _read_records(path / runner.RESULTS_FILE, _stamp(path / runner.RESULTS_FILE))
    )


def _stamp(path: pathlib.Path):
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return (info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=8)
def _read_records(path: pathlib.Path, stamp) -> tuple[dict, ...]:
    # read once per version of the file: studies ask for the grid once per run
    return tuple(results.read_jsonl(path))


def grid_seed(class_split: str, split_seed: int, seed: int, seeds) -> int | None:
    """The grid seed whose base nets are a reading study's sources for its
    ``seed``: for the ``random`` class split the grid's seed equal to the
    study's ``split_seed`` (the grid draws each seed's random halves with that
    seed, so only it has the study's halves), otherwise ``seed`` when the grid
    ran it, else the grid's first seed; ``None`` when the grid has none."""
    seeds = sorted(seeds)
    if class_split == "random":
        return split_seed if split_seed in seeds else None
    if seed in seeds:
        return seed
    return seeds[0] if seeds else None


def grid_base_net(
    workdir,
    data_config,
    model_config,
    half: str,
    seed: int,
    split: str = "random",
    fields=("dataset",),
    role: str = "source",
    choose_seed: bool = True,
) -> pathlib.Path:
    """The run directory of a grid's finished base net on ``half`` (its
    ``model.keras``, ``result.json``).

    Args:
      workdir: the grid's work directory (``--grid_workdir``).
      data_config, model_config: the reading study's (see :func:`grid_records`).
      half: ``A`` or ``B``.
      seed: the reading study's seed; with ``choose_seed`` the grid's seed is
        :func:`grid_seed` of it (``data_config.split_seed`` for random halves),
        else the grid's seed is ``seed`` itself.
      split: the grid's class split.
      fields: the data fields the grid must share with the reader.
      role: what the net is to the reader, for the error text.

    Raises:
      ValueError: not a comparable grid (:func:`grid_records`), or it has no
        finished base net there (saying which command makes it).
    """
    records = grid_records(workdir, data_config, model_config, fields)
    finished = {r["key"] for r in records if r.get("kind") == "base"}
    if choose_seed:
        seeds = {
            int(k.split("/")[1][len("seed") :])
            for k in finished
            if k.startswith(f"{split}/")
        }
        chosen = grid_seed(split, data_config.split_seed, seed, seeds)
    else:
        chosen = seed
    wanted = data_config.split_seed if chosen is None else chosen
    key = base_key(split, wanted, half)
    path = pathlib.Path(workdir).expanduser() / runner.RUNS_DIR / key
    if key not in finished or not (path / export.KERAS_FILE).is_file():
        raise ValueError(
            f"the grid in {str(workdir)!r} has no finished base net {key} (the "
            f"{role}); run experiments/transferability.py --workdir={workdir} "
            f"--splits={split} --seeds={wanted}, or leave the grid out"
        )
    return path


@functools.lru_cache(maxsize=16)
def _fingerprint(path: pathlib.Path, stamp) -> str:
    return features.model_fingerprint(path)


def grid_fingerprint(run_dir: pathlib.Path) -> str:
    """Fingerprint of a grid net's ``model.keras`` (so a retrained grid redoes the
    runs that read it), computed once per version of the file."""
    path = pathlib.Path(run_dir) / export.KERAS_FILE
    info = path.stat()
    return _fingerprint(path, (info.st_mtime_ns, info.st_size))


# ------------------------------------------------------------ any source, by name


@dataclasses.dataclass
class Source:
    """A candidate net, ready to take the target's images.

    Attributes:
      name: how tables and files call it.
      kind: ``base net`` (a transfer_tf net with layers conv1..fc8: every
        layer is a candidate and every strategy applies), ``keras`` (another
        Keras model: its final output), ``saved model`` (a SavedModel without
        its ``.keras``: its serving output) or ``application`` (a Keras
        Applications backbone: its final feature map).
      origin: the file, directory or application name it came from.
      model: a Keras model from the target's raw images.
      layers: its candidate layers.
      note: how its input was adapted to the target's images, if it was.
    """

    name: str
    kind: str
    origin: str
    model: keras.Model
    layers: tuple[str, ...]
    note: str = ""

    @property
    def base_net(self) -> bool:
        return self.kind == "base net"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "origin": self.origin,
            "layers": list(self.layers),
            "note": self.note,
        }


@dataclasses.dataclass(frozen=True)
class Options:
    """How named sources become candidates.

    Attributes:
      layers: the candidate layers of a base net (other sources: their final
        output).
      backbone_weights: weights of Keras Applications sources: ``imagenet``, a
        weights file, or ``none`` (random).
      backbone_image_size: input side Keras Applications sources resize the
        images to.
    """

    layers: tuple[str, ...] = models.LAYER_NAMES[:-1]
    backbone_weights: str | None = "imagenet"
    backbone_image_size: int | None = 96


def _channel_matrix(source_channels: int, channels: int) -> np.ndarray:
    """The 1x1 map from the target's channels to the source's: grayscale to RGB
    replicates, RGB to grayscale averages."""
    if source_channels == channels:
        return np.eye(channels, dtype=np.float32)
    if channels == 1:
        return np.ones((1, source_channels), np.float32)
    return np.full((channels, source_channels), 1.0 / channels, np.float32)


def _adapter(inputs, source_shape, image_shape):
    """The target's images as the source's input: cast to float, resized
    (bilinear) to the source's height and width, channels mapped (a frozen
    1x1 convolution). Returns ``(tensor, note)``."""
    height, width, source_channels = (int(d) for d in source_shape)
    channels = int(image_shape[-1])
    x = layers.Rescaling(1.0, name="adapt_float")(inputs)
    notes = []
    if tuple(image_shape[:2]) != (height, width):
        x = layers.Resizing(height, width, name="adapt_resize")(x)
        notes.append(f"resized {image_shape[0]}x{image_shape[1]} to {height}x{width}")
    if channels != source_channels:
        conv = layers.Conv2D(
            source_channels, 1, use_bias=False, name="adapt_channels", trainable=False
        )
        x = conv(x)
        conv.set_weights([_channel_matrix(source_channels, channels)[None, None]])
        notes.append(f"{channels} channel(s) mapped to {source_channels}")
    return x, "; ".join(notes)


def _input_shape(net: keras.Model, what: str, image_shape) -> tuple[int, ...]:
    """The image shape a net takes; refuses a net whose input is not images
    (height, width, channels), naming its shape."""
    shape = net.input_shape
    if isinstance(shape, list) or len(shape) != 4 or None in shape[1:]:
        shown = shape if isinstance(shape, list) else tuple(shape[1:])
        raise ValueError(
            f"{what} takes input of shape {shown}, not images (height, width, "
            f"channels) like the target's {tuple(image_shape)}: pass a model whose "
            "input is images"
        )
    return tuple(int(d) for d in shape[1:])


def adapt_input(net: keras.Model, image_shape) -> tuple[keras.Model, str]:
    """A base net that takes images of ``image_shape``: the net itself when its
    input has that shape, else the adapter (:func:`_adapter`) followed by copies
    of the net's layers with its weights, so that its layer names stay at the
    top level (features, ``models.transfer_net``, the activation cache read
    them) and the original net is left as it was.

    Returns:
      ``(model, note)``: the note says what was adapted ("" for nothing).

    Raises:
      ValueError: the net does not take images, or is not a chain of layers (a
        base net is one).
    """
    image_shape = tuple(int(d) for d in image_shape)
    source_shape = _input_shape(net, f"net {net.name!r}", image_shape)
    if source_shape == image_shape:
        return net, ""
    inputs = keras.Input(image_shape, dtype="uint8", name="image")
    x, note = _adapter(inputs, source_shape, image_shape)
    previous = net.layers[0]
    for layer in net.layers[1:]:
        if layer.input is not previous.output:
            raise ValueError(
                f"net {net.name!r} is not a chain of layers (layer {layer.name!r} "
                f"does not take {previous.name!r}'s output); pass data of its input "
                f"shape {source_shape} (--image_size)"
            )
        copy = layer.__class__.from_config(layer.get_config())
        x = copy(x)
        copy.set_weights(layer.get_weights())
        previous = layer
    size = "x".join(map(str, image_shape))
    return keras.Model(inputs, x, name=f"{net.name}_from_{size}"), note


def copy_adapter(source: keras.Model, model: keras.Model) -> None:
    """The adapter's frozen weights of ``source`` into a net built from it
    (``models.transfer_net`` initialises every layer but 1..n afresh)."""
    names = {lay.name for lay in model.layers}
    for name in ADAPTER_LAYERS:
        if name in names and source.get_layer(name).weights:
            model.get_layer(name).set_weights(source.get_layer(name).get_weights())


def _wrapped(net, image_shape, name) -> tuple[keras.Model, str]:
    """Any image model behind the adapter, nested as one layer (its final
    output is the candidate)."""
    image_shape = tuple(int(d) for d in image_shape)
    source_shape = _input_shape(net, f"source {name!r}", image_shape)
    if source_shape == image_shape:
        return net, ""
    inputs = keras.Input(image_shape, dtype="uint8", name="image")
    x, note = _adapter(inputs, source_shape, image_shape)
    return keras.Model(inputs, net(x), name=features.safe_name(name)), note


def is_base_net(net: keras.Model) -> bool:
    """Whether a model has the base-net layers conv1..fc8."""
    names = {lay.name for lay in net.layers}
    return all(n in names for n in models.LAYER_NAMES)


def _short_name(path) -> str:
    """A source's name in tables: its file or directory name (with its parent's
    for a ``model.keras``, which every work directory holds)."""
    path = pathlib.Path(path)
    if path.name == export.KERAS_FILE:
        return f"{path.parent.name}/{path.name}"
    return path.name


def _keras_source(name, path, image_shape, options: Options) -> Source:
    net = export.load_keras_model(path)
    if is_base_net(net):
        model, note = adapt_input(net, image_shape)
        return Source(name, "base net", str(path), model, options.layers, note)
    model, note = _wrapped(net, image_shape, name)
    return Source(name, "keras", str(path), model, (features.BACKBONE_OUTPUT,), note)


def _saved_model_source(name, path, image_shape) -> Source:
    """A SavedModel without its ``.keras``: only its serving output is
    reachable (``keras.layers.TFSMLayer``), and only for images of its input
    shape (its signature cannot be resized in front of)."""
    endpoint = None
    for candidate in ("serve", "serving_default"):
        try:
            layer = keras.layers.TFSMLayer(str(path), call_endpoint=candidate)
        except ValueError:
            continue
        endpoint = candidate
        break
    if endpoint is None:
        raise ValueError(
            f"source {name!r}: SavedModel {str(path)!r} has no 'serve' or "
            "'serving_default' endpoint; pass its .keras file instead"
        )
    loaded = layer._reloaded_obj
    concrete = loaded.signatures.get(endpoint)
    if concrete is None:
        concrete = getattr(loaded, endpoint).concrete_functions[0]
    args, kwargs = concrete.structured_input_signature
    spec = [*args, *kwargs.values()][0]
    shape = tuple(spec.shape[1:])
    if shape != tuple(image_shape):
        raise ValueError(
            f"source {name!r}: SavedModel {str(path)!r} takes images of shape "
            f"{shape} and the target's are {tuple(image_shape)}; a bare SavedModel "
            "cannot be resized in front of: pass --image_size="
            f"{shape[0]},{shape[1]} or the model.keras saved with it"
        )
    inputs = keras.Input(image_shape, dtype=spec.dtype.name, name="image")
    outputs = layer(inputs)
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    model = keras.Model(inputs, outputs, name=features.safe_name(name))
    return Source(
        name, "saved model", str(path), model, (features.BACKBONE_OUTPUT,), ""
    )


def workdir_base_nets(path) -> list[tuple[str, pathlib.Path]]:
    """``(key, model.keras)`` of every finished base net of a study's work
    directory (its ``results.jsonl``: the grid's ``base`` runs, the fine-tuning
    study's ``source`` runs), in the file's order.

    Raises:
      ValueError: it holds none (saying what to do).
    """
    path = pathlib.Path(path)
    out = []
    for r in results.read_jsonl(path / runner.RESULTS_FILE):
        if r.get("kind") not in BASE_NET_KINDS:
            continue
        file = path / runner.RUNS_DIR / r["key"] / export.KERAS_FILE
        if file.is_file():
            out.append((r["key"], file))
    if not out:
        raise ValueError(
            f"source {str(path)!r}: the work directory holds no finished base net "
            f"(records of kind {list(BASE_NET_KINDS)} with a {export.KERAS_FILE}); "
            "run its study first, or pass a .keras file"
        )
    return out


def load(spec: str, image_shape, options: Options = Options()) -> list[Source]:
    """The candidate net(s) a source names (a study's work directory names
    several), each taking images of ``image_shape``.

    Raises:
      ValueError: no such file, an unknown name, a file that holds no model or
        a model that does not take images, a SavedModel of another input shape.
      backbones.BackboneWeightsError: ImageNet weights that cannot be loaded
        here (offline), saying how to provide them.
    """
    if spec in backbones.BACKBONES:
        model = backbones.backbone(
            spec, image_shape, options.backbone_weights, options.backbone_image_size
        )
        weights = options.backbone_weights or "random weights"
        size = options.backbone_image_size or "their"
        note = f"{weights}, images resized to {size} px"
        return [
            Source(spec, "application", spec, model, (features.BACKBONE_OUTPUT,), note)
        ]
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        if "/" in spec or path.suffix:
            raise ValueError(f"source {spec!r}: no such file or directory")
        raise ValueError(
            f"unknown source {spec!r}: not a file or directory, nor a Keras "
            f"Applications name; choose one of {sorted(backbones.BACKBONES)} or pass "
            "a .keras file, a SavedModel directory or a study's work directory"
        )
    if path.is_dir() and (path / runner.RESULTS_FILE).is_file():
        return [
            _keras_source(f"{path.name}/{key}", file, image_shape, options)
            for key, file in workdir_base_nets(path)
        ]
    if path.is_dir() and (path / "saved_model.pb").is_file():
        sibling = path.parent / export.KERAS_FILE
        if sibling.is_file():  # its layers: every candidate and strategy
            return [_keras_source(_short_name(path), sibling, image_shape, options)]
        return [_saved_model_source(_short_name(path), path, image_shape)]
    if path.is_dir() and (path / export.KERAS_FILE).is_file():
        file = path / export.KERAS_FILE
        return [_keras_source(_short_name(file), file, image_shape, options)]
    if path.is_file() and path.suffix == ".keras":
        return [_keras_source(_short_name(path), path, image_shape, options)]
    raise ValueError(
        f"source {spec!r} is neither a .keras file, a SavedModel directory, a "
        "directory holding model.keras nor a study's work directory (results.jsonl)"
    )


def load_all(specs, image_shape, options: Options = Options()) -> list[Source]:
    """Every candidate net of ``specs``, in order, with distinct names (two
    files of one name are called by their paths).

    Raises:
      ValueError: no sources, or a source that cannot be loaded (:func:`load`).
    """
    if not specs:
        raise ValueError(
            "sources=() names no candidate net; pass --sources=FILE_OR_NAME,... "
            "(.keras files, SavedModels, study work directories or Keras "
            f"Applications names: {sorted(backbones.BACKBONES)})"
        )
    out = []
    for spec in specs:
        out += load(spec, image_shape, options)
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        for source in out:
            if names.count(source.name) > 1:
                source.name = source.origin
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"sources {names} name one net twice")
    return out


def fingerprint(spec: str, options: Options = Options()) -> str:
    """What a source's candidates depend on, as a short text: the bytes of its
    files (a retrained or replaced net changes it) or, for a Keras Applications
    name, the name and its weights."""
    if spec in backbones.BACKBONES:
        return f"{spec}:{options.backbone_weights}:{options.backbone_image_size}"
    path = pathlib.Path(spec).expanduser()
    if path.is_dir() and (path / runner.RESULTS_FILE).is_file():
        files = [file for _, file in workdir_base_nets(path)]
    elif path.is_dir() and (path / "saved_model.pb").is_file():
        sibling = path.parent / export.KERAS_FILE
        files = [sibling] if sibling.is_file() else sorted(path.rglob("*"))
    elif path.is_dir():
        files = [path / export.KERAS_FILE]
    else:
        files = [path]
    return "+".join(_file_fingerprint(f) for f in files if f.is_file())


def _file_fingerprint(path: pathlib.Path) -> str:
    info = path.stat()
    return _fingerprint(path.resolve(), (info.st_mtime_ns, info.st_size))
