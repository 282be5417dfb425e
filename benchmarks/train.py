"""Experiment runner: optimizers x seeds (x a swept model setting) from a TOML config.

    python -m benchmarks.train --config configs/NAME.toml [--out DIR] [--seeds 0 1 2]
                               [--epochs N] [--train-subset N] [--data-dir DIR]
                               [--sweep V [V ...]] [--no-progress]

Writes ``DIR/results.json`` (every run: settings, seed, learning rate, per-epoch
train loss, test accuracy, seconds and clipped path ratios), ``DIR/summary.md``
(mean +- std over seeds) and PNG plots. Runs already in ``results.json`` with the
same settings are skipped, so an interrupted sweep resumes where it stopped; the
optimizers are compared entry by entry, so an optimizer added to a config (or changed)
runs alone, and the runs of one removed leave the results.
Everything is deterministic per seed (initialisation, batch order, augmentation).

Config keys beyond the obvious ones:

- ``[model] kind``: ``mlp`` (``widths``, ``bias``), ``cnn`` (``stages`` of channel
  lists), ``resnet`` (``stages`` of ``[channels, blocks]``), ``plainnet_bn`` (``stages``
  of ``[channels, convs]``: conv -> BatchNorm -> ReLU) or ``resnet_bn`` (``stages`` of
  ``[channels, basic blocks]`` with BatchNorm) or ``vit`` (``patch``, ``dim``, ``hidden``,
  ``depth``, ``heads``: a pre-LN Vision Transformer whose ``depth`` layers are scanned, with
  one stacked G-space block ``ln_ff -> fc1 -> fc2``). BatchNorm models train on batch
  statistics and are evaluated on their running averages; the optimizer sees
  ``variables['params']``.
- ``[sweep]``: one key, ``width`` (every hidden width of an MLP) or ``depth`` (the
  number of convolutions of a ``plainnet_bn``, spread over its stages as evenly as
  possible, earlier stages taking the remainder). Learning rates from ``lr_grid`` are
  chosen once, at the first swept value, or at every swept value with ``[grid]
  per_point = true`` (then ``--sweep`` runs some values and a later call adds others to the
  same results).
- ``compare``: the two optimizers of a sweep's gap table (default: the first two).
- ``train_subset``, ``test_subset``: train (test) on the first N examples only.
- ``skeleton_init`` (default true, also per optimizer): set every skeleton weight to 1
  before training, as the authors did; G-SGD barely trains the BatchNorm models without
  it (their tiny skeleton weights make its weight steps huge).
- ``augment = "crop_flip"``: random crop from the images zero-padded by 4 and random
  horizontal flip, per image, inside the jitted training step, with keys that depend on
  the seed and the epoch only (deterministic per seed; also used in the grid runs).
- Per optimizer: ``lr_decay`` (``lr * exp(-decay * epoch)``), ``lr_boundaries`` (epochs
  at which the learning rate is multiplied by ``lr_factor``, default 0.1, as
  PyTorch's ``MultiStepLR``: the factor applies from the first step of that epoch,
  counted from 0), ``momentum`` (default 0.9), ``weight_decay`` (``adamw`` and
  ``path_adamw``, default 1e-4) and ``normalized`` (default true; false declares the
  BatchNorm models' blocks without the ``N^2`` scaling, an ablation), ``implicit_decay``
  (``gsgd`` and ``g_momentum`` on normalized blocks: SGD's learning-rate decay from the
  growth of weights before a BatchNorm, ``gsgd_jax.path_space``'s option; with it,
  ``initial_rate_norm``, where its rate norms start, default 1) and ``declaration``
  (``blocks``, default, or ``stage_chains``: a ``plainnet_bn``'s stages as chains straight
  through the BatchNorms, the authors' approximation; it also sets the skeleton pattern
  ``skeleton_init`` uses, for SGD too).
- Optimizer kinds: ``sgd``, ``momentum``, ``adam``, ``adamw`` (optax's), ``gsgd``,
  ``g_momentum``, ``g_adam``, ``path_sgd`` (gsgd_jax's, with the same optimizer on plain
  gradients outside the blocks) and ``path_adamw``: ``gsgd_jax.path_space(optax.adamw(...))``
  on the blocks with ``optax.adamw(...)`` of the same settings on everything else.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import tomllib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks.loop import (
  AUGMENTATIONS,
  BN_MODELS,
  CURVE_STEPS,
  DECLARATIONS,
  MLP,
  PlainCNN,
  PlainNetBN,
  ResNet,
  ResNetBN,
  ViT,
  gsgd_layers,
  init_variables,
  seconds_per_epoch,
  split_variables,
  train,
)

TOP_KEYS = {
  "description",
  "dataset",
  "data_dir",
  "epochs",
  "batch_size",
  "seeds",
  "skeleton_init",
  "augment",
  "train_subset",
  "test_subset",
  "model",
  "sweep",
  "optimizers",
  "grid",
  "compare",
}
OPTIMIZER_KEYS = {
  "name",
  "kind",
  "lr",
  "lr_decay",
  "lr_boundaries",
  "lr_factor",
  "lr_grid",
  "momentum",
  "normalized",
  "implicit_decay",
  "initial_rate_norm",
  "declaration",
  "skeleton_init",
  "weight_decay",
}
VIT_DEFAULTS = {"patch": 7, "dim": 64, "hidden": 128, "depth": 4, "heads": 4}
"""The ``vit`` model's keys and their defaults (those of :class:`benchmarks.loop.ViT`)."""
MODEL_KEYS = {"kind", "widths", "bias", "stages", *VIT_DEFAULTS}
GRID_KEYS = {"validation", "epochs", "seed", "per_point"}
KINDS = (
  "sgd",
  "momentum",
  "adam",
  "adamw",
  "gsgd",
  "g_momentum",
  "g_adam",
  "path_sgd",
  "path_adamw",
)
WEIGHT_DECAY_KINDS = ("adamw", "path_adamw")
DECAY_KINDS = ("gsgd", "g_momentum")
MODEL_KINDS = ("mlp", "cnn", "resnet", "plainnet_bn", "resnet_bn", "vit")
BN_KINDS = ("plainnet_bn", "resnet_bn")
IMAGE_KINDS = ("cnn", "resnet", *BN_KINDS, "vit")
SWEEPS = {"width": ("mlp",), "depth": ("plainnet_bn",)}
"""Swept keys and the model kinds they apply to."""


# ----------------------------------------------------------------------------
# Configuration.


def load_config(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """Reads and checks a TOML config; ``overrides`` (from flags) replace top-level keys."""
  with open(path, "rb") as f:
    config = tomllib.load(f)
  config.update({k: v for k, v in overrides.items() if v is not None})
  config.setdefault("name", os.path.splitext(os.path.basename(path))[0])
  _check_keys(config, TOP_KEYS | {"name"}, path)
  _check_keys(config.get("model", {}), MODEL_KEYS, f"{path} [model]")
  _check_keys(config.get("grid", {}), GRID_KEYS, f"{path} [grid]")
  if not isinstance(config.get("grid", {}).get("per_point", False), bool):
    raise ValueError(f"{path} [grid]: per_point is true or false")
  names = [o.get("name") for o in config.get("optimizers", [])]
  compare = config.get("compare")
  if compare is not None and (len(compare) != 2 or not set(compare) <= set(names)):
    raise ValueError(f"{path}: compare names two optimizers of {names}, not {compare}")
  kind = config.get("model", {}).get("kind", "mlp")
  if kind not in MODEL_KINDS:
    raise ValueError(f"{path}: unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
  _check_vit(config.get("model", {}), kind, path)
  augment = config.get("augment")
  if augment is not None and augment not in AUGMENTATIONS:
    raise ValueError(f"{path}: unknown augment {augment!r}; use one of {sorted(AUGMENTATIONS)}")
  if not config.get("optimizers"):
    raise ValueError(f"{path}: no [[optimizers]] declared")
  for opt in config["optimizers"]:
    _check_optimizer(opt, kind, path)
  sweep = config.get("sweep", {})
  if len(sweep) > 1 or any(k not in SWEEPS for k in sweep):
    raise ValueError(
      f"{path}: [sweep] supports one key, 'width' (every hidden width of an MLP) or "
      "'depth' (the number of convolutions of a plainnet_bn)"
    )
  for key in sweep:
    if kind not in SWEEPS[key]:
      raise ValueError(f"{path}: a {key} sweep needs model kind {' or '.join(SWEEPS[key])}")
  return config


def _check_optimizer(opt: dict, model_kind: str, path: str) -> None:
  """Raises ValueError for an optimizer entry the runner cannot run."""
  _check_keys(opt, OPTIMIZER_KEYS, f"{path} [[optimizers]] {opt.get('name', '?')}")
  if opt.get("kind") not in KINDS:
    raise ValueError(
      f"{path}: optimizer {opt.get('name')!r} has kind {opt.get('kind')!r}; "
      f"use one of {', '.join(KINDS)}"
    )
  if "lr" not in opt and "lr_grid" not in opt:
    raise ValueError(f"{path}: optimizer {opt['name']!r} needs lr or lr_grid")
  if "weight_decay" in opt and opt["kind"] not in WEIGHT_DECAY_KINDS:
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: weight_decay applies to kinds "
      f"{' and '.join(WEIGHT_DECAY_KINDS)}, not {opt['kind']}"
    )
  if not opt.get("normalized", True) and model_kind not in BN_KINDS:
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: normalized = false needs a BatchNorm model "
      f"({', '.join(BN_KINDS)})"
    )
  declaration = opt.get("declaration", "blocks")
  if "initial_rate_norm" in opt and not opt.get("implicit_decay"):
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: initial_rate_norm is where implicit_decay's rate "
      "norms start: set implicit_decay = true with it"
    )
  if opt.get("implicit_decay"):
    if opt["kind"] not in DECAY_KINDS:
      raise ValueError(
        f"{path}: optimizer {opt['name']!r}: implicit_decay applies to kinds "
        f"{' and '.join(DECAY_KINDS)}, not {opt['kind']}"
      )
    normalized_blocks = opt.get("normalized", True) and declaration != "stage_chains"
    if not (model_kind in BN_KINDS and normalized_blocks):
      raise ValueError(
        f"{path}: optimizer {opt['name']!r}: implicit_decay acts on normalized blocks, "
        "which only the BatchNorm models' declaration 'blocks' with normalized = true has"
      )
  if declaration not in DECLARATIONS:
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: declaration {declaration!r}; use one of "
      f"{', '.join(DECLARATIONS)}"
    )
  if declaration == "stage_chains" and not opt.get("normalized", True):
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: normalized applies to declaration 'blocks'; "
      "stage chains are never normalized"
    )
  if declaration == "stage_chains" and model_kind != "plainnet_bn":
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: declaration 'stage_chains' needs model kind plainnet_bn"
    )
  boundaries = opt.get("lr_boundaries", [])
  if list(boundaries) != sorted(boundaries) or any(b <= 0 for b in boundaries):
    raise ValueError(
      f"{path}: optimizer {opt['name']!r}: lr_boundaries must be increasing epochs > 0"
    )


def _check_vit(spec: dict, kind: str, path: str) -> None:
  """Raises ValueError for ViT keys on another model, or a width the heads do not divide."""
  vit_keys = sorted(set(spec) & set(VIT_DEFAULTS))
  if kind != "vit":
    if vit_keys:
      raise ValueError(f"{path} [model]: {vit_keys} apply to model kind vit, not {kind}")
    return
  dim, heads = (spec.get(k, VIT_DEFAULTS[k]) for k in ("dim", "heads"))
  if dim % heads:
    raise ValueError(f"{path} [model]: dim {dim} is not a multiple of heads {heads}")


def _check_keys(table: dict, allowed: set, where: str) -> None:
  unknown = sorted(set(table) - allowed)
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def sweep_points(config) -> list[dict[str, Any]]:
  """The model settings to run: one per swept value (``{"width": 64}``,
  ``{"depth": 20}``), or one empty setting."""
  return [{key: v} for key, values in config.get("sweep", {}).items() for v in values] or [{}]


def swept_key(config) -> str | None:
  """The swept setting's name, or None without a sweep."""
  return next(iter(config.get("sweep", {})), None)


def spread_depth(depth: int, stages) -> tuple[tuple[int, int], ...]:
  """Spreads ``depth`` convolutions over ``stages`` (``(channels, convs)`` pairs, whose
  conv counts are replaced) as evenly as possible, earlier stages taking the remainder:
  8 over 3 stages gives 3, 3, 2."""
  if depth < len(stages):
    raise ValueError(f"depth {depth} is less than the {len(stages)} stages")
  base, extra = divmod(depth, len(stages))
  return tuple((channels, base + (s < extra)) for s, (channels, _) in enumerate(stages))


# ----------------------------------------------------------------------------
# Data, models and optimizers.


def load_data(config) -> datasets.Dataset:
  name, data_dir = config.get("dataset", "fashion-mnist"), config.get("data_dir") or None
  if name in ("cifar10", "cifar100"):
    if data_dir is None:
      raise ValueError(f"dataset {name} needs data_dir (the python-pickle batches)")
    ds = datasets.load_cifar(data_dir, name)
  elif name == "digits":
    ds = datasets.load_digits()
  elif name == "fashion-mnist":
    ds = datasets.load_dataset(data_dir)
  else:
    raise ValueError(f"unknown dataset {name!r}: use fashion-mnist, digits, cifar10, cifar100")
  subset, test_subset = config.get("train_subset", 0), config.get("test_subset", 0)
  if subset or test_subset:
    ds = datasets.Dataset(
      ds.name,
      ds.x_train[: subset or None],
      ds.y_train[: subset or None],
      ds.x_test[: test_subset or None],
      ds.y_test[: test_subset or None],
      ds.num_classes,
      ds.source
      + (f" (first {subset} train)" if subset else "")
      + (f" (first {test_subset} test)" if test_subset else ""),
    )
  return ds


def as_images(x: np.ndarray) -> np.ndarray:
  """Flat grey images (n, side*side) as (n, side, side, 1); images pass through."""
  if x.ndim == 4:
    return x
  side = math.isqrt(x.shape[1])
  if side * side != x.shape[1]:
    raise ValueError(f"cannot view {x.shape[1]} features as a square image")
  return x.reshape(len(x), side, side, 1)


def make_model(config, point, num_classes):
  """The Flax module of ``config['model']`` at the sweep ``point``."""
  spec = dict(config.get("model", {"kind": "mlp", "widths": [256, 256]}))
  kind = spec.get("kind", "mlp")
  if kind == "mlp":
    widths = spec.get("widths", [256, 256])
    if "width" in point:
      widths = [point["width"]] * len(widths)
    return MLP(tuple(widths), num_classes, spec.get("bias", True))
  if kind == "cnn":
    stages = tuple(tuple(s) for s in spec.get("stages", [[32, 32], [64, 64]]))
    return PlainCNN(stages, num_classes, spec.get("bias", True))
  if kind == "vit":
    patch, dim, hidden, depth, heads = (int(spec.get(k, v)) for k, v in VIT_DEFAULTS.items())
    return ViT(num_classes, patch, dim, hidden, depth, heads)
  # The others take stages of [channels, residual blocks or convolutions].
  stages = tuple((int(c), int(n)) for c, n in spec.get("stages", [[16, 3], [32, 3], [64, 3]]))
  if kind == "resnet":
    return ResNet(stages, num_classes)
  if kind == "plainnet_bn":
    if "depth" in point:
      stages = spread_depth(point["depth"], stages)
    return PlainNetBN(stages, num_classes)
  if kind == "resnet_bn":
    return ResNetBN(stages, num_classes)
  raise ValueError(f"unknown model kind {kind!r}: use one of {', '.join(MODEL_KINDS)}")


def make_schedule(opt, lr: float, steps_per_epoch: int) -> optax.ScalarOrSchedule:
  """The learning rate of optimizer entry ``opt``: ``lr``, times ``exp(-lr_decay * epoch)``
  and ``lr_factor`` per boundary of ``lr_boundaries`` reached (epochs counted from 0;
  step ``count`` is in epoch ``count // steps_per_epoch``).

  Args:
    opt: the optimizer's config entry.
    lr: the base learning rate.
    steps_per_epoch: optimizer steps per epoch.

  Returns:
    ``lr`` itself when neither option is set, else a schedule of the step count.
  """
  decay = opt.get("lr_decay", 0.0)
  boundaries = np.asarray(opt.get("lr_boundaries", []), np.int32)
  factor = opt.get("lr_factor", 0.1)
  if not decay and not len(boundaries):
    return lr

  def schedule(count):
    epoch = count // steps_per_epoch
    reached = jnp.sum(epoch >= boundaries) if len(boundaries) else 0
    return lr * jnp.exp(-decay * epoch) * factor**reached

  return schedule


def make_optimizer(opt, lr, layers, steps_per_epoch) -> optax.GradientTransformation:
  """The optax optimizer of config entry ``opt`` with base learning rate ``lr``."""
  schedule = make_schedule(opt, lr, steps_per_epoch)
  momentum = opt.get("momentum", 0.9)
  # The implicit decay's settings, for the kinds that take them.
  decay = {
    "implicit_decay": opt.get("implicit_decay", False),
    "initial_rate_norm": opt.get("initial_rate_norm", 1.0),
  }

  def adamw():
    # One AdamW for the path values and another for the weights outside the blocks: the
    # same settings, separate moments (they see different parameters).
    return optax.adamw(schedule, weight_decay=opt.get("weight_decay", 1e-4))

  return {
    "sgd": lambda: optax.sgd(schedule),
    "momentum": lambda: optax.sgd(schedule, momentum=momentum),
    "adam": lambda: optax.adam(schedule),
    "adamw": adamw,
    "gsgd": lambda: gsgd_jax.gsgd(schedule, layers=layers, **decay),
    "g_momentum": lambda: gsgd_jax.g_momentum(schedule, momentum, layers=layers, **decay),
    "g_adam": lambda: gsgd_jax.g_adam(schedule, layers=layers),
    "path_sgd": lambda: gsgd_jax.path_sgd(schedule, layers=layers),
    "path_adamw": lambda: gsgd_jax.path_space(adamw(), layers=layers, fallback=adamw()),
  }[opt["kind"]]()


# ----------------------------------------------------------------------------
# Runs.


def run_one(config, opt, point, seed, lr, ds, train_xy, test_xy, *, epochs, progress):
  """One training run; returns its per-epoch history."""
  model = make_model(config, point, ds.num_classes)
  # The BatchNorm models and the ViT (new, often deep) initialise in one compiled program:
  # op by op, each of their many initialisers compiles on its own (seconds per run; 7.6 s
  # against 3.8 s for the first ViT init, nothing for the next of the same shape). The others
  # keep the eager init their published results came from.
  compiled = isinstance(model, (*BN_MODELS, ViT))
  init = functools.partial(init_variables, model) if compiled else model.init
  params, model_state = split_variables(init(jax.random.key(seed), train_xy[0][:1]))
  layers = gsgd_layers(
    model,
    params,
    normalized=opt.get("normalized", True),
    declaration=opt.get("declaration", "blocks"),
  )
  if opt.get("skeleton_init", config.get("skeleton_init", True)):
    skeleton = functools.partial(gsgd_jax.set_skeleton, layers=layers, value=1.0)
    params = (jax.jit(skeleton) if compiled else skeleton)(params)
  batch = config.get("batch_size", 64)
  tx = make_optimizer(opt, lr, layers, len(train_xy[0]) // batch)
  label = opt["name"] + "".join(f" {_short(k)}={v}" for k, v in point.items())
  history, _ = train(
    label,
    tx,
    model,
    params,
    train_xy,
    test_xy,
    epochs=epochs,
    batch_size=batch,
    seed=seed,
    progress=progress,
    model_state=model_state,
    augment=config.get("augment"),
  )
  return history


def _short(key: str) -> str:
  return {"width": "H", "depth": "D"}.get(key, key)


def choose_lr(config, opt, point, ds, xy, progress) -> dict[str, Any]:
  """Picks ``lr`` from ``lr_grid`` by accuracy on a held-out part of the train split,
  training the model of the sweep ``point``."""
  grid = config.get("grid", {})
  seed = grid.get("seed", 0)
  x, y = xy
  order = np.random.default_rng([seed, 12345]).permutation(len(x))
  n_val = max(1, int(len(x) * grid.get("validation", 0.1)))
  val, fit = order[:n_val], order[n_val:]
  scores = {}
  for lr in opt["lr_grid"]:
    history = run_one(
      config,
      opt,
      point,
      seed,
      lr,
      ds,
      (x[fit], y[fit]),
      (x[val], y[val]),
      epochs=grid.get("epochs", config.get("epochs", 1)),
      progress=progress,
    )
    scores[str(lr)] = history[-1]["test_accuracy"]
  best = max(opt["lr_grid"], key=lambda lr: scores[str(lr)])
  return {"lr": best, "validation_accuracy": scores}


def run_experiment(config, out_dir, *, progress=True) -> dict[str, Any]:
  """Runs every (optimizer, sweep point, seed) not yet in ``out_dir/results.json``.

  Runs saved there are kept when the settings are the same and their optimizer's entry is
  unchanged: adding an optimizer to a config runs that optimizer only."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "results.json")
  results = {"config": config, "lr_choices": {}, "runs": []}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if _settings(previous["config"]) == _settings(config):
      kept = _unchanged_optimizers(previous["config"], config)
      results["runs"] = [r for r in previous["runs"] if r["optimizer"] in kept]
      points = [*sweep_points(previous["config"]), *sweep_points(config)]
      keys = {lr_choice_key(name, p, _per_point(config)) for name in kept for p in points}
      results["lr_choices"] = {
        key: choice for key, choice in previous["lr_choices"].items() if key in keys
      }
      if _per_point(config) and swept_key(config) == swept_key(previous["config"]):
        # Points run before (--sweep) stay; the summary covers them all, in order.
        key = swept_key(config)
        values = {*previous["config"]["sweep"][key], *config["sweep"][key]}
        results["config"] = {**config, "sweep": {key: sorted(values)}}
  done = {(r["optimizer"], _point_key(r["point"]), r["seed"]) for r in results["runs"]}
  ds = load_data(config)
  cnn = config.get("model", {}).get("kind", "mlp") in IMAGE_KINDS
  prepare = as_images if cnn else (lambda x: x.reshape(len(x), -1))
  train_xy = (prepare(ds.x_train), ds.y_train)
  test_xy = (prepare(ds.x_test), ds.y_test)
  results["dataset"] = {
    "name": ds.name,
    "source": ds.source,
    "train": len(ds.x_train),
    "test": len(ds.x_test),
  }

  def save():
    with open(path + ".tmp", "w") as f:
      json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)

  epochs = config.get("epochs", 1)
  per_point = _per_point(config)
  for opt in config["optimizers"]:
    for point in sweep_points(config):
      lr = opt.get("lr")
      if "lr_grid" in opt:
        # Chosen at this point, or once at the first (where the other points reuse it).
        at = point if per_point else sweep_points(config)[0]
        choice = lr_choice_key(opt["name"], at, per_point)
        if choice not in results["lr_choices"]:
          results["lr_choices"][choice] = choose_lr(config, opt, at, ds, train_xy, progress)
          save()
        lr = results["lr_choices"][choice]["lr"]
      for seed in config.get("seeds", [0]):
        key = (opt["name"], _point_key(point), seed)
        if key in done:
          continue
        history = run_one(
          config, opt, point, seed, lr, ds, train_xy, test_xy, epochs=epochs, progress=progress
        )
        results["runs"].append(
          {
            "optimizer": opt["name"],
            "kind": opt["kind"],
            "point": point,
            "seed": seed,
            "lr": lr,
            "history": history,
          }
        )
        save()
  save()
  return results


def lr_choice_key(name: str, point: dict[str, Any], per_point: bool) -> str:
  """Where ``results['lr_choices']`` keeps an optimizer's choice: its name, with the sweep
  point when each point chooses its own."""
  return f"{name} ({_point_label(point)})" if per_point and point else name


def _per_point(config) -> bool:
  return bool(config.get("grid", {}).get("per_point", False))


def _unchanged_optimizers(previous, config) -> set[str]:
  """The names of the optimizer entries that ``config`` holds exactly as ``previous`` did."""
  before = {opt["name"]: opt for opt in previous["optimizers"]}
  return {opt["name"] for opt in config["optimizers"] if before.get(opt["name"]) == opt}


def _settings(config) -> dict:
  """The config without what may change between resumed invocations: the seeds, what
  only the summary reads (the description, ``compare``), the optimizers (compared one by
  one) and, where every swept value chooses its own learning rates, the swept values
  (``--sweep`` adds points)."""
  settings = copy.deepcopy(config)
  for key in ("seeds", "description", "compare", "optimizers"):
    settings.pop(key, None)
  if _per_point(config):
    settings.pop("sweep", None)
    settings["swept"] = swept_key(config)
  return settings


# ----------------------------------------------------------------------------
# Summary and plots.


def _stats(values) -> str:
  values = np.asarray(values, float)
  return f"{values.mean():.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def summarize(results) -> str:
  config = results["config"]
  lines = [
    f"# {config['name']}",
    "",
    config.get("description", "").strip(),
    "",
    f"Dataset: {results['dataset']['name']} ({results['dataset']['source']}); "
    f"{config.get('epochs', 1)} epochs, batch {config.get('batch_size', 64)}; "
    "mean ± std over seeds of the last epoch.",
    "",
  ]
  groups = _groups(results)
  # BatchNorm models: evaluation mode with the running averages, and with statistics
  # re-estimated for the final weights (loop.recalibrated_accuracy).
  recalibrated = any(
    "test_accuracy_recalibrated" in r["history"][-1] for runs in groups.values() for r in runs
  )
  extra = " recalibrated test accuracy |" if recalibrated else ""
  lines += [
    f"| optimizer | setting | lr | seeds | test accuracy |{extra} train loss | s/epoch | "
    "clipped ratios |",
    "|---|---|---|---|---|" + ("---|" if recalibrated else "") + "---|---|---|",
  ]
  for (name, _), runs in groups.items():
    point = runs[0]["point"]
    last = [r["history"][-1] for r in runs]
    clipped = [h.get("clipped_ratios") for h in last]
    recal = ""
    if recalibrated:
      values = [h["test_accuracy_recalibrated"] for h in last if "test_accuracy_recalibrated" in h]
      recal = f" {_stats(values) if values else '-'} |"
    lines.append(
      f"| {name} | {_point_label(point)} | {runs[0]['lr']:g} | {len(runs)} | "
      f"{_stats([h['test_accuracy'] for h in last])} |{recal} "
      f"{_stats([h['train_loss'] for h in last])} | "
      f"{np.mean([seconds_per_epoch(r['history']) for r in runs]):.2f} | "
      f"{'-' if clipped[0] is None else sum(clipped)} |"
    )
  if results["lr_choices"]:
    lines += ["", "Learning rates chosen on a validation split:", ""]
    for name, choice in results["lr_choices"].items():
      scores = ", ".join(f"{lr}: {acc:.4f}" for lr, acc in choice["validation_accuracy"].items())
      lines.append(f"- {name}: {choice['lr']:g} (validation accuracy {scores})")
  lines += curve_table(results)
  gaps = gap_table(results)
  if gaps:
    first, second = compared(config)
    recal_gaps = any(row[5] is not None for row in gaps)
    lines += [
      "",
      f"Gap {second} minus {first}, paired by seed (mean ± std):",
      "",
      f"| {swept_key(config)} | test accuracy gap |"
      + (" recalibrated test accuracy gap |" if recal_gaps else "")
      + " train loss gap |",
      "|---|---|" + ("---|" if recal_gaps else "") + "---|",
    ]
    lines += [
      f"| {value} | {acc:+.4f} ± {acc_std:.4f} |"
      + (
        "" if not recal_gaps else " - |" if recal is None else f" {recal:+.4f} ± {recal_std:.4f} |"
      )
      + f" {loss:+.4f} ± {loss_std:.4f} |"
      for value, acc, acc_std, loss, loss_std, recal, recal_std in gaps
    ]
  return "\n".join(lines) + "\n"


def _point_key(point) -> str:
  return json.dumps(point, sort_keys=True)


def _groups(results) -> dict[tuple[str, str], list]:
  """Runs grouped by (optimizer, sweep point key), in the order they were run."""
  groups: dict[tuple[str, str], list] = {}
  for run in results["runs"]:
    groups.setdefault((run["optimizer"], _point_key(run["point"])), []).append(run)
  return groups


def _point_label(point) -> str:
  return ", ".join(f"{k}={v}" for k, v in point.items()) or "-"


CURVE_CHECKPOINTS = (10, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
"""Steps at which the summary reads the loss curves."""


def curve_table(results) -> list[str]:
  """Summary lines: the train loss (mean over seeds of the 10 steps ending there) at the
  :data:`CURVE_CHECKPOINTS` the runs reached; none for results without curves."""
  curves = mean_curves(results)
  if not curves:
    return []
  rows, reached = [], set()
  for (name, point), (ends, mean) in curves.items():
    at = {int(e): float(v) for e, v in zip(ends, mean, strict=True)}
    reached |= {c for c in CURVE_CHECKPOINTS if c in at}
    rows.append((name, json.loads(point), at))
  checkpoints = sorted(reached)
  lines = [
    "",
    "Train loss over the first steps (the mean over seeds of the 10 steps ending there):",
    "",
    "| optimizer | setting | " + " | ".join(f"step {c}" for c in checkpoints) + " |",
    "|---|---|" + "---|" * len(checkpoints),
  ]
  for name, point, at in rows:
    cells = " | ".join(f"{at[c]:.3f}" if c in at else "-" for c in checkpoints)
    lines.append(f"| {name} | {_point_label(point)} | {cells} |")
  return lines


def compared(config) -> tuple[str, str]:
  """The optimizers of the gap table: ``compare`` (two names), else the first two."""
  first, second = config.get("compare") or [o["name"] for o in config["optimizers"][:2]]
  return first, second


def gap_table(results):
  """Per swept value (width or depth): the second optimizer minus the first, paired by
  seed (same initialisation and batches): (value, accuracy gap mean, std, loss gap mean,
  std, recalibrated accuracy gap mean, std), the last two None without BatchNorm."""
  config = results["config"]
  key = swept_key(config)
  if key is None or len(config["optimizers"]) < 2:
    return []
  first, second = compared(config)
  groups = _groups(results)
  rows = []
  for point in sweep_points(config):
    a = {r["seed"]: r["history"][-1] for r in groups.get((first, _point_key(point)), [])}
    b = {r["seed"]: r["history"][-1] for r in groups.get((second, _point_key(point)), [])}
    seeds = sorted(set(a) & set(b))
    if seeds:
      acc = [b[s]["test_accuracy"] - a[s]["test_accuracy"] for s in seeds]
      loss = [b[s]["train_loss"] - a[s]["train_loss"] for s in seeds]
      recal_key = "test_accuracy_recalibrated"
      recal = [
        b[s][recal_key] - a[s][recal_key] for s in seeds if recal_key in a[s] and recal_key in b[s]
      ]
      rows.append(
        (
          point[key],
          float(np.mean(acc)),
          float(np.std(acc)),
          float(np.mean(loss)),
          float(np.std(loss)),
          float(np.mean(recal)) if recal else None,
          float(np.std(recal)) if recal else None,
        )
      )
  return rows


def plot(results, out_dir) -> list[str]:
  """Learning curves (mean over seeds) and, for a sweep, the gap against the swept value."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for (name, _), runs in _groups(results).items():
    point = runs[0]["point"]
    epochs = np.arange(1, len(runs[0]["history"]) + 1)
    label = name + (f" ({_point_label(point)})" if point else "")
    for ax, key in zip(axes, ("test_accuracy", "train_loss"), strict=True):
      curves = np.array([[h[key] for h in r["history"]] for r in runs])
      ax.plot(epochs, curves.mean(0), marker="o", label=label)
      if len(runs) > 1:
        ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15)
  for ax, title in zip(axes, ("test accuracy", "train loss"), strict=True):
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(results["config"]["name"])
  fig.tight_layout()
  written.append(os.path.join(out_dir, "curves.png"))
  fig.savefig(written[-1], dpi=110)
  plt.close(fig)
  written += _plot_step_curves(results, out_dir, plt)
  gaps = gap_table(results)
  if gaps:
    key = swept_key(results["config"]) or ""  # set: gaps exist only with a sweep
    # (title, column of the mean, column of the std); recalibrated where a row has it.
    panels = [("test accuracy gap", 1, 2), ("train loss gap", 3, 4)]
    if any(row[5] is not None for row in gaps):
      panels.insert(1, ("recalibrated test accuracy gap", 5, 6))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    first, second = compared(results["config"])
    for ax, (title, mean, std) in zip(axes[0], panels, strict=True):
      rows = [row for row in gaps if row[mean] is not None]
      ax.errorbar(
        [r[0] for r in rows],
        [r[mean] for r in rows],
        yerr=[r[std] for r in rows],
        marker="o",
        capsize=3,
      )
      ax.axhline(0, color="grey", lw=0.8)
      if key == "width":
        ax.set_xscale("log", base=2)
      ax.set_xlabel({"width": "hidden width H", "depth": "convolutions"}.get(key, key))
      ax.set_title(f"{title}\n{second} minus {first}", fontsize=9)
      ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(os.path.join(out_dir, "gap.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
  return written


def _curve_steps(history) -> np.ndarray:
  """The step each point of the concatenated loss curves ends on: an epoch's last
  ``steps % CURVE_STEPS`` steps have no point, but count."""
  ends, first = [], 0
  for h in history:
    ends += [first + CURVE_STEPS * (i + 1) for i in range(len(h["train_loss_curve"]))]
    first += h.get("steps", CURVE_STEPS * len(h["train_loss_curve"]))
  return np.asarray(ends)


def mean_curves(results) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
  """Per (optimizer, sweep point key): the steps each point of the loss curve ends on and
  the curve's mean over seeds; empty for results from before the curves were recorded, or
  with epochs under 10 steps."""
  groups = _groups(results)
  if not all(h.get("train_loss_curve") for r in groups.values() for h in r[0]["history"]):
    return {}
  return {
    key: (
      _curve_steps(runs[0]["history"]),
      np.array([[v for h in r["history"] for v in h["train_loss_curve"]] for r in runs]).mean(0),
    )
    for key, runs in groups.items()
  }


def _plot_step_curves(results, out_dir, plt) -> list[str]:
  """The train loss over steps (mean over seeds), one panel per sweep point: the early
  steps, where optimizers and initialisations part, are hidden in per-epoch means."""
  curves = mean_curves(results)
  if not curves:
    return []
  points = sweep_points(results["config"])
  # One colour per optimizer in every panel, so a point that some have not run yet does
  # not shift the others' colours; one legend with every optimizer drawn.
  names = list(dict.fromkeys(name for name, _ in curves))
  lines = {}
  fig, axes = plt.subplots(1, len(points), figsize=(5.5 * len(points), 4), squeeze=False)
  for ax, point in zip(axes[0], points, strict=True):
    for (name, key), (ends, mean) in curves.items():
      if key == _point_key(point):
        (lines[name],) = ax.plot(ends, mean, color=f"C{names.index(name) % 10}", label=name)
    ax.set_xlabel("step")
    ax.set_yscale("log")  # a diverging start would flatten the others
    ax.set_title(f"train loss ({_point_label(point)})" if point else "train loss")
    ax.grid(alpha=0.3)
  axes[0][-1].legend([lines[n] for n in names], names, fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, "steps.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="TOML file in configs/")
  parser.add_argument("--out", help="output directory (default runs/NAME)")
  parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
  parser.add_argument("--epochs", type=int, help="override the config's epochs")
  parser.add_argument(
    "--train-subset", type=int, help="override the config's train_subset (first N examples)"
  )
  parser.add_argument("--data-dir", help="override the config's data_dir")
  parser.add_argument(
    "--sweep", type=int, nargs="+", help="override the values of the config's [sweep] key"
  )
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  config = load_config(
    args.config,
    {
      "seeds": args.seeds,
      "epochs": args.epochs,
      "train_subset": args.train_subset,
      "data_dir": args.data_dir,
    },
  )
  if args.sweep:
    key = swept_key(config)
    if key is None:
      parser.error(f"--sweep: {args.config} has no [sweep]")
    config["sweep"] = {key: args.sweep}
  out_dir = args.out or os.path.join("runs", config["name"])
  results = run_experiment(config, out_dir, progress=not args.no_progress)
  summary = summarize(results)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary)
  plots = plot(results, out_dir)
  print("\n" + summary)
  print(
    "wrote "
    + ", ".join(
      [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "summary.md"), *plots]
    )
  )


if __name__ == "__main__":
  main()
