"""Fine-tuning weights trained in weight space: G-SGD against SGD.

An MLP (784-128-128-10) is trained with Adam on its weights from Flax's
initialisation, as most pretrained weights are, and then trained further on the
same data with SGD and with G-SGD at several learning rates. Its skeleton-chain
products ``B F`` (the values of the skeleton paths, which no rescaling changes)
stay far below 1, and G-SGD's steps on the weights scale as ``1 / (B F)^2``.
``set_skeleton`` would change the pretrained function, so it is not an option.
Reports the products' range and the mean loss of the first and last 50 steps
of each fine-tuning run.

    python -m benchmarks.fine_tune [--pretrain-steps 500] [--steps 200]
        [--lrs 1e-4,1e-3,1e-2,1e-1] [--train-subset 20000] [--out DIR]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gsgd_jax
from benchmarks import data as datasets
from benchmarks.speed import device_name, write_report


def _loss(model, params, x, y):
  logits = model.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, tx, params, x, y, steps: int, seed: int, batch: int = 128):
  """``steps`` steps of ``tx`` on random batches; the final params and every step's loss."""

  @jax.jit
  def step(p, state, i):
    key = jax.random.fold_in(jax.random.key(seed), i)
    idx = jax.random.randint(key, (batch,), 0, x.shape[0])
    value, grads = jax.value_and_grad(lambda q: _loss(model, q, x[idx], y[idx]))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value

  state, losses = tx.init(params), []
  for i in range(steps):
    params, state, value = step(params, state, i)
    losses.append(float(value))
  return params, losses


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain-steps", type=int, default=500)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--lrs", default="1e-4,1e-3,1e-2,1e-1")
  parser.add_argument("--train-subset", type=int, default=20000)
  parser.add_argument("--out", help="directory for fine_tune.json and .md")
  args = parser.parse_args(argv)
  ds = datasets.load_dataset()
  x = jnp.asarray(ds.x_train[: args.train_subset])
  y = jnp.asarray(ds.y_train[: args.train_subset])
  widths = (x.shape[1], 128, 128, ds.num_classes)
  model = nn.Sequential([nn.Dense(128), nn.relu, nn.Dense(128), nn.relu, nn.Dense(widths[-1])])
  start = model.init(jax.random.key(0), x[:1])
  layers = gsgd_jax.infer_layers(start)
  pretrained, losses = train(model, optax.adam(1e-3), start, x, y, args.pretrain_steps, 0)
  # init's warning reports the range of the products.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    gsgd_jax.gsgd(0.1, layers=layers).init(pretrained)
  messages = [str(w.message) for w in caught if " span " in str(w.message)]
  products = [message.split(" span ")[1].split(";")[0] for message in messages]
  runs = {}
  for lr in (float(v) for v in args.lrs.split(",")):
    for name, tx in (("SGD", optax.sgd(lr)), ("G-SGD", gsgd_jax.gsgd(lr, layers=layers))):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, curve = train(model, tx, pretrained, x, y, args.steps, 1)
      runs[f"{name} {lr:g}"] = (np.mean(curve[:50]), np.mean(curve[-50:]))
  lines = [
    f"device: {device_name()}; jax {jax.__version__}",
    "",
    f"{ds.name}, first {x.shape[0]} training images; {'-'.join(map(str, widths))} trained "
    f"{args.pretrain_steps} steps with Adam (1e-3) from Flax's initialisation: mean loss of "
    f"its last 50 steps {np.mean(losses[-50:]):.4f}; skeleton-chain products of the hidden "
    f"nodes {products[0] if products else 'within [1e-3, 1e3]'}. Then {args.steps} steps:",
    "",
    "| optimizer | lr | mean loss, first 50 steps | last 50 steps |",
    "|---|---|---|---|",
    *(
      f"| {name.split()[0]} | {name.split()[1]} | {a:.4g} | {b:.4g} |"
      for name, (a, b) in runs.items()
    ),
  ]
  md = "\n".join(lines)
  print(md)
  result: dict[str, Any] = {"pretrain_loss": float(np.mean(losses[-50:]))}
  result["products"] = products
  # NaN is not JSON: a diverged run's means are written as null.
  finite = lambda v: float(v) if np.isfinite(v) else None
  result["runs"] = {name: [finite(a), finite(b)] for name, (a, b) in runs.items()}
  write_report(args.out, "fine_tune", result, md)


if __name__ == "__main__":
  main()
