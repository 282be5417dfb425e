"""A ReLU MLP trained with G-SGD on Fashion-MNIST, in about ten lines of gsgd_jax.

G-SGD (Meng et al., ICLR 2019) trains the basis-path values of a ReLU network: products
of weights along paths, which stay the same when a hidden unit's incoming weights are
multiplied by c > 0 and its outgoing weights divided by c. So the trained network does
not depend on how its initial weights were rescaled, which SGD cannot promise. For a
plain MLP the whole change from SGD is: declare the ReLU chain (`infer_layers`), check
it once (`verify_invariance`), start from the authors' initialisation (`set_skeleton`)
and swap `optax.sgd` for `gsgd_jax.gsgd`.

Run it from a checkout with the package installed:

  python examples/mlp.py           # 784-256-256-10, 5 epochs (half a minute on 2 cores)
  python examples/mlp.py --tiny    # a smoke test in seconds

It reads Fashion-MNIST from Debian's dataset-fashion-mnist package, or else uses
scikit-learn's bundled 8x8 digits (no download) and says so.
"""

import argparse
import gzip
import os
import time

import flax.linen as nn
import jax
import numpy as np
import optax

import gsgd_jax

DATA_DIR = "/usr/share/datasets/fashion-mnist"


def load_data():
  """(x_train, y_train, x_test, y_test): images (n, h, w, 1) in [0, 1], int labels."""

  def read(name, offset):
    with gzip.open(os.path.join(DATA_DIR, f"{name}-ubyte.gz")) as f:
      return np.frombuffer(f.read(), np.uint8, offset=offset)

  try:
    x_train, x_test = (read(f"{s}-images-idx3", 16) for s in ("train", "t10k"))
    y_train, y_test = (read(f"{s}-labels-idx1", 8) for s in ("train", "t10k"))
    x_train, x_test = (
      x.reshape(-1, 28, 28, 1) / np.float32(255) for x in (x_train, x_test)
    )
  except FileNotFoundError:
    from sklearn.datasets import load_digits

    print(f"Fashion-MNIST not found in {DATA_DIR}: using scikit-learn's 8x8 digits")
    digits = load_digits()
    x, y = (digits.images[..., None] / 16).astype(np.float32), digits.target
    x_train, x_test, y_train, y_test = x[:1500], x[1500:], y[:1500], y[1500:]
  return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a few seconds' smoke test")
  args = parser.parse_args()
  # --tiny: a smoke test; otherwise the README's setting, 5 epochs of batch 64.
  width, epochs, subset = (32, 2, 2048) if args.tiny else (256, 5, None)
  batch_size, min_accuracy = 64, (0.3 if args.tiny else 0.8)  # chance is 0.1

  x_train, y_train, x_test, y_test = load_data()
  x_train, y_train = x_train[:subset], y_train[:subset]
  x_train, x_test = (x.reshape(len(x), -1) for x in (x_train, x_test))

  # The ten lines: a model, its ReLU chain checked once, the authors' start, G-SGD.
  model = nn.Sequential(
    [nn.Dense(width), nn.relu, nn.Dense(width), nn.relu, nn.Dense(10)]
  )
  params = model.init(jax.random.key(0), x_train[:batch_size])
  layers = gsgd_jax.infer_layers(params)  # the Dense layers, in forward order
  # Raises, naming the layer, if rescaling a hidden unit changed the outputs (a tanh
  # or a residual addition in the chain would): the symmetry G-SGD relies on.
  gsgd_jax.verify_invariance(model.apply, params, layers, x_train[:batch_size])
  # Skeleton weights 1 keep G-SGD's steps at SGD's scale: from Flax's initialisation
  # they scale as 1 / (B F)^2 and lr 0.1 diverges. It changes the function, so only
  # on a fresh init (docs/guide.md, "Initialisation and learning rates").
  params = gsgd_jax.set_skeleton(params, layers)
  tx = gsgd_jax.gsgd(0.1, layers=layers)  # the README's rate; no fallback: all declared
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    x, y = batch

    def loss_fn(p):
      logits = model.apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)  # params are required
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, x, y):
    return (model.apply(params, x).argmax(-1) == y).mean()

  print(f"{len(x_train)} training images; G-SGD on the chain {layers}")
  rng = np.random.default_rng(0)
  steps_per_epoch = len(x_train) // batch_size
  epoch_losses = []
  for epoch in range(epochs):
    start = time.perf_counter()
    order = rng.permutation(len(x_train))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size : (i + 1) * batch_size]
      params, opt_state, loss = train_step(
        params, opt_state, (x_train[idx], y_train[idx])
      )
      losses.append(loss)
    epoch_losses.append(np.asarray(losses))
    test_acc = float(accuracy(params, x_test, y_test))
    print(
      f"epoch {epoch + 1}: train loss {epoch_losses[-1].mean():.4f}, "
      f"test accuracy {test_acc:.4f} ({time.perf_counter() - start:.1f} s)"
    )

  losses = np.concatenate(epoch_losses)
  first, last = losses[:20].mean(), losses[-20:].mean()
  print(f"train loss, first 20 steps {first:.4f} -> last 20 steps {last:.4f}")
  assert np.all(np.isfinite(losses)), "the training loss is not finite"
  assert last < first, "the training loss did not go down"
  assert test_acc > min_accuracy, f"test accuracy {test_acc:.4f}: chance is 0.1"
  # What G-SGD never moves: the incoming skeleton weights stay at the 1 set above.
  fixed = gsgd_jax.skeleton_mask(params, layers)
  kept = jax.tree.map(
    lambda w, m: bool(np.all(np.asarray(w)[np.asarray(m)] == 1)), params, fixed
  )
  assert all(jax.tree.leaves(kept)), "a fixed skeleton weight moved"


if __name__ == "__main__":
  main()
