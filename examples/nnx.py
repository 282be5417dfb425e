"""G-SGD on a Flax NNX model: a ReLU MLP trained with ``nnx.Optimizer``.

What it shows: gsgd_jax's optimizers are ordinary optax transformations, so NNX takes
them as it takes ``optax.sgd``: ``nnx.Optimizer(model, gsgd_jax.gsgd(0.1,
layers=layers), wrt=nnx.Param)``. The layers are read from the model's ``nnx.Param``
state, the declaration is checked once with ``verify_invariance``, the skeleton weights
are set to 1 in place, and then the model trains as any NNX model does. SGD trains from
the same start for comparison.

Why G-SGD: a ReLU net computes the same function after any positive rescaling of a
hidden unit (incoming weights times ``c``, outgoing weights divided by ``c``), and
G-SGD's training does not depend on such a rescaling of the start; SGD's does. The
script checks it: G-SGD and SGD train twice each, from the model and from a randomly
rescaled copy, on the same batches, in float64, and it prints how far apart the two
runs of each end. (In float32 both drift apart within a hundred steps at this rate:
the training amplifies rounding, and a 1e-6 nudge to the weights grows to
differences of order 1 just as fast, for SGD and G-SGD alike.)

Data: Fashion-MNIST from /usr/share/datasets/fashion-mnist (Debian's
``dataset-fashion-mnist``), else scikit-learn's bundled 8x8 digits (no download).

    python examples/nnx.py           # 3 epochs of a 784-256-256-10 MLP: about a minute
    python examples/nnx.py --tiny    # a smoke run of a few seconds, as CI runs it
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gsgd_jax

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: pathlib.Path, offset: int) -> np.ndarray:
  """The bytes of a gzipped idx file after its header."""
  return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8)[offset:]


def load_data() -> tuple[str, dict[str, np.ndarray]]:
  """Flattened images in [0, 1] and integer labels: Fashion-MNIST if it is installed,
  else scikit-learn's bundled digits."""
  kinds = ("images-idx3", "labels-idx1")
  files = {
    split: [FASHION_MNIST / f"{prefix}-{kind}-ubyte.gz" for kind in kinds]
    for split, prefix in (("train", "train"), ("test", "t10k"))
  }
  if all(path.exists() for pair in files.values() for path in pair):
    data: dict[str, np.ndarray] = {}
    for split, (images, labels) in files.items():
      pixels = read_idx(images, 16).reshape(-1, 784)
      data[f"x_{split}"] = pixels.astype(np.float32) / 255
      data[f"y_{split}"] = read_idx(labels, 8).astype(np.int32)
    return "Fashion-MNIST", data
  from sklearn.datasets import load_digits

  print(f"Fashion-MNIST not found in {FASHION_MNIST}: falling back to sklearn's digits")
  x, y = load_digits(return_X_y=True)
  x, y = np.asarray(x, np.float32) / 16, np.asarray(y, np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  train, test = order[:1500], order[1500:]
  data = {
    "x_train": x[train],
    "y_train": y[train],
    "x_test": x[test],
    "y_test": y[test],
  }
  return "digits", data


class MLP(nnx.Module):
  """A ReLU MLP; its ``nnx.List`` of layers gives ``infer_layers`` their order."""

  def __init__(self, widths: list[int], *, rngs: nnx.Rngs):
    pairs = itertools.pairwise(widths)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = nnx.relu(x)
    return x


def cross_entropy(model: MLP, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  loss, grads = nnx.value_and_grad(cross_entropy)(model, x, y)
  optimizer.update(model, grads)  # the current params travel with the model
  return loss


def train(model, tx, batches) -> list[float]:
  """Trains ``model`` in place on ``batches``; the loss of every step."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  return [float(train_step(model, optimizer, x, y)) for x, y in batches]


def shuffled_batches(x, y, batch: int, epochs: int, seed: int = 0):
  """Batches of ``batch`` examples, in a new random order every epoch."""
  rng = np.random.default_rng(seed)
  n = len(x) // batch * batch
  for _ in range(epochs):
    for i in rng.permutation(len(x))[:n].reshape(-1, batch):
      yield jnp.asarray(x[i]), jnp.asarray(y[i])


def rescaling_gap(model, make_tx, layers, batches, x) -> tuple[float, float]:
  """Trains float64 copies of ``model`` and of a random positive rescaling of its
  hidden units (the same function) with ``make_tx()`` on ``batches``; returns the
  largest difference of their outputs on ``x`` and the outputs' largest magnitude."""
  with jax.enable_x64(True):
    wide = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    start = nnx.clone(model)
    nnx.update(start, wide(nnx.state(model, nnx.Param)))
    rescaled = nnx.clone(start)
    key = jax.random.key(1)
    params = gsgd_jax.random_rescale(nnx.state(start, nnx.Param), layers, key)
    nnx.update(rescaled, params)
    for m in (start, rescaled):
      train(m, make_tx(), [(wide(bx), by) for bx, by in batches])
    a, b = start(wide(x)), rescaled(wide(x))
    return float(jnp.max(jnp.abs(a - b))), float(jnp.max(jnp.abs(a)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a smoke run (seconds)")
  args = parser.parse_args(argv)
  epochs, hidden = (1, 64) if args.tiny else (3, 256)
  lr = 0.1  # for SGD and G-SGD alike

  name, data = load_data()
  if name == "digits":  # 1500 images: more epochs for as many steps
    epochs *= 10
  if args.tiny:  # a slice keeps the smoke run short
    data = {k: v[:3000] if k.endswith("train") else v[:1000] for k, v in data.items()}
  x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
  widths = [data["x_train"].shape[1], hidden, hidden, int(data["y_train"].max()) + 1]
  sizes = f"{len(data['x_train'])} training, {len(x_test)} test examples"
  print(f"{name}: {sizes}; MLP {widths}")

  model = MLP(widths, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  layers = gsgd_jax.infer_layers(state)  # [('layers', 0), ('layers', 1), ('layers', 2)]

  # verify_invariance calls a pure function of the params: split the model once.
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  apply = lambda params, x: nnx.merge(graphdef, params, rest)(x)
  worst = gsgd_jax.verify_invariance(apply, state, layers, x_test[:64])
  print(f"verify_invariance on {layers}: largest output change {worst:.1e}")
  nnx.update(model, gsgd_jax.set_skeleton(state, layers))  # in place, before training

  optimizers = {
    "G-SGD": lambda: gsgd_jax.gsgd(lr, layers=layers),
    "SGD": lambda: optax.sgd(lr),
  }
  results = {}
  for opt_name, make_tx in optimizers.items():
    trained = nnx.clone(model)  # both from the same start, on the same batches
    start_time = time.perf_counter()
    batches = shuffled_batches(data["x_train"], data["y_train"], 64, epochs)
    losses = train(trained, make_tx(), batches)
    seconds = time.perf_counter() - start_time
    few = list(shuffled_batches(data["x_train"], data["y_train"], 64, 1))[:100]
    gap, scale = rescaling_gap(model, make_tx, layers, few, x_test[:1000])
    r = results[opt_name] = {
      "first": float(np.mean(losses[:20])),  # means of 20 steps: less noisy
      "last": float(np.mean(losses[-20:])),
      "accuracy": float(jnp.mean(jnp.argmax(trained(x_test), -1) == y_test)),
      "gap": gap / scale,
    }
    print(
      f"{opt_name}: train loss {r['first']:.3f} -> {r['last']:.3f} over "
      f"{len(losses)} steps ({seconds:.1f} s), test accuracy {r['accuracy']:.4f}\n"
      f"  from a rescaled start, {len(few)} steps in float64: outputs end "
      f"{r['gap']:.0e} apart (relative)"
    )

  # The claims above, checked: both learn, and only G-SGD ignores the rescaling.
  for opt_name, r in results.items():
    assert r["last"] < r["first"], (opt_name, r)
    assert r["accuracy"] > (0.3 if args.tiny else 0.5), (opt_name, r)
  assert results["G-SGD"]["gap"] < 1e-9, results
  assert results["SGD"]["gap"] > 1e-3, results


if __name__ == "__main__":
  main()
