"""`make run`: a 2-hidden-layer ReLU MLP on Fashion-MNIST, SGD vs G-SGD.

Both optimizers start from the same Flax initialisation with every skeleton
weight set to 1 (the authors' choice), see the same batches, and report test
accuracy, mean train loss of the last epoch, and seconds per epoch.

    python -m benchmarks.fmnist [--config configs/fmnist_mlp.toml] [--epochs N]
                                [--widths 256,256] [--lr 0.1] [--data-dir DIR]

Settings come from the TOML config; flags override it.
"""

from __future__ import annotations

import argparse
import json
import tomllib

import jax
import jax.numpy as jnp
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks.loop import MLP, seconds_per_epoch, train

DEFAULT_CONFIG = "configs/fmnist_mlp.toml"


def parse_args(argv=None) -> argparse.Namespace:
  """Flags over the TOML config's values over built-in defaults."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="TOML file of settings")
  parser.add_argument("--data-dir", help="directory with the four standard idx files")
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--widths", default="256,256", help="hidden widths, comma separated")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.1, help="learning rate of both")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="also write the results to this JSON file")
  pre, _ = parser.parse_known_args(argv)
  try:
    with open(pre.config, "rb") as f:
      config = tomllib.load(f)
  except FileNotFoundError:
    if pre.config != DEFAULT_CONFIG:
      parser.error(f"config file {pre.config!r} not found")
    config = {}
  known = set(vars(parser.parse_args([])))
  unknown = sorted(set(config) - known)
  if unknown:
    parser.error(f"unknown keys in {pre.config}: {', '.join(unknown)}")
  if "widths" in config and not isinstance(config["widths"], str):
    config["widths"] = ",".join(str(w) for w in config["widths"])
  parser.set_defaults(**config)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)

  ds = datasets.load_dataset(args.data_dir)
  print(
    f"dataset: {ds.name} ({ds.source}); {len(ds.x_train)} train / "
    f"{len(ds.x_test)} test, {ds.x_train.shape[1]} features, {ds.num_classes} classes"
  )
  widths = tuple(int(w) for w in args.widths.split(","))
  model = MLP(widths, ds.num_classes)
  params = model.init(jax.random.key(args.seed), jnp.zeros((1, ds.x_train.shape[1])))
  layers = gsgd_jax.infer_layers(params)
  params = gsgd_jax.set_skeleton(params, layers, 1.0)
  print(
    f"model: {ds.x_train.shape[1]}-{'-'.join(map(str, widths))}-{ds.num_classes} ReLU MLP, "
    f"{sum(p.size for p in jax.tree.leaves(params))} parameters, skeleton weights = 1; "
    f"lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs"
  )

  results = {}
  for name, tx in [("SGD", optax.sgd(args.lr)), ("G-SGD", gsgd_jax.gsgd(args.lr, layers=layers))]:
    results[name], _ = train(
      name,
      tx,
      model,
      params,
      (ds.x_train, ds.y_train),
      (ds.x_test, ds.y_test),
      epochs=args.epochs,
      batch_size=args.batch_size,
      seed=args.seed,
    )

  print(f"\n{ds.name}, after {args.epochs} epochs:\n")
  print("| optimizer | test accuracy | train loss (last epoch) | s/epoch |")
  print("|---|---|---|---|")
  for name, history in results.items():
    last = history[-1]
    print(
      f"| {name} | {last['test_accuracy']:.4f} | {last['train_loss']:.4f} | "
      f"{seconds_per_epoch(history):.2f} |"
    )
  clipped = results["G-SGD"][-1].get("clipped_ratios", 0)
  print(f"\nG-SGD clipped skeleton path ratios: {clipped}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"dataset": ds.name, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
