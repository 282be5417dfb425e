"""Checkpoints with orbax: resuming G-SGD exactly, and fine-tuning pretrained weights.

Two things a training script needs beyond the training loop:

1. Resuming. The state of every gsgd_jax optimizer is a pytree of arrays (a
   `PathSpaceState`: the inner optax state, here a momentum buffer per basis path and
   the schedule's step count, and two counters), so orbax saves and restores it like any
   optax state. A run interrupted and resumed from its last checkpoint ends with the
   very same params and optimizer state as the run that was never interrupted: the
   script checks it bit for bit.
2. Fine-tuning. Weights pretrained in path space are loaded and trained on as they are,
   with a fresh optimizer and WITHOUT `set_skeleton`: `set_skeleton` overwrites weights
   and so changes the function the weights compute; it is an initialisation, for a
   fresh model only (docs/guide.md, "Initialisation and learning rates").

Run it from a checkout with the package installed (orbax-checkpoint is needed):

  python examples/checkpointing.py          # about half a minute on 2 cores
  python examples/checkpointing.py --tiny   # a smoke test in seconds

It reads Fashion-MNIST from Debian's dataset-fashion-mnist package, or else uses
scikit-learn's bundled 8x8 digits (no download) and says so.
"""

import argparse
import gzip
import os
import tempfile
import warnings

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

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


def make_train_step(model, tx):
  """The jitted step `(params, opt_state, batch) -> (params, opt_state, loss)`."""

  @jax.jit
  def train_step(params, opt_state, batch):
    x, y = batch

    def loss_fn(p):
      logits = model.apply(p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)  # params are required
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a few seconds' smoke test")
  args = parser.parse_args()
  if args.tiny:
    width, steps, every, crash, finetune_steps = 32, 40, 10, 25, 40
  else:
    width, steps, every, crash, finetune_steps = 256, 2000, 500, 1300, 1000
  batch_size = 64

  x_train, y_train, x_test, y_test = load_data()
  # The fine-tuning task (part 2): the same classes, upside down.
  new_train, new_test = x_train[:, ::-1], x_test[:, ::-1]
  x_train, x_test, new_train, new_test = (
    x.reshape(len(x), -1) for x in (x_train, x_test, new_train, new_test)
  )

  def batch(step, x, y):
    """The batch of a step, a function of the step alone: a resumed run sees the
    batches the uninterrupted one saw, as a data loader restored with the step would
    give."""
    idx = np.random.default_rng(step).integers(0, len(x), batch_size)
    return x[idx], y[idx]

  model = nn.Sequential(
    [nn.Dense(width), nn.relu, nn.Dense(width), nn.relu, nn.Dense(10)]
  )
  params = jax.jit(model.init)(jax.random.key(0), x_train[:batch_size])
  layers = gsgd_jax.infer_layers(params)
  logits = jax.jit(model.apply)
  gsgd_jax.verify_invariance(logits, params, layers, x_train[:batch_size])
  params = gsgd_jax.set_skeleton(params, layers)  # a fresh init: the authors' start
  # Momentum and a schedule give the state something to lose: a momentum buffer per
  # basis path and the step count the schedule reads. 0.01 with momentum 0.9 takes
  # steps of the size plain G-SGD takes at 0.1, the MLP example's rate.
  tx = gsgd_jax.gsgd(
    optax.cosine_decay_schedule(0.01, steps), momentum=0.9, layers=layers
  )
  train_step = make_train_step(model, tx)
  start = {"params": params, "opt_state": tx.init(params)}

  def train(state, first, last, manager=None):
    """Steps `first` to `last`; the state after them and, by step, the states saved."""
    params, opt_state = state["params"], state["opt_state"]
    saved = {}
    for step in range(first, last):
      params, opt_state, _ = train_step(
        params, opt_state, batch(step, x_train, y_train)
      )
      state = {"params": params, "opt_state": opt_state}
      # A checkpoint is named by the number of steps taken; the manager keeps only
      # every `every`-th and returns whether it saved this one.
      if manager is not None and manager.save(
        step + 1, args=ocp.args.StandardSave(state)
      ):
        saved[step + 1] = state
    return state, saved

  with tempfile.TemporaryDirectory() as folder:
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=2)

    # 1a. The reference: `steps` steps without a break.
    uninterrupted, _ = train(start, 0, steps)

    # 1b. The same run, checkpointed, and killed after `crash` steps.
    with ocp.CheckpointManager(f"{folder}/run", options=options) as manager:
      _, saved = train(start, 0, crash, manager)

    # 1c. A new process would start here: the model and `tx` built by the same code,
    # and the latest checkpoint restored into their shapes. `abstract` holds only
    # shapes and dtypes (and the pytree structure, PathSpaceState included).
    abstract = jax.eval_shape(lambda: start)
    with ocp.CheckpointManager(f"{folder}/run", options=options) as manager:
      resume_at = manager.latest_step()
      restored = manager.restore(resume_at, args=ocp.args.StandardRestore(abstract))
      jax.tree.map(np.testing.assert_array_equal, restored, saved[resume_at])
      resumed, _ = train(restored, resume_at, steps, manager)

    # Bit for bit, params and optimizer state alike: nothing was lost in the round trip.
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
    print(
      f"killed at step {crash} of {steps}, resumed from the checkpoint of step "
      f"{resume_at}:\n  params and optimizer state end equal to the uninterrupted run's"
    )

    # 2. Fine-tuning. The trained params are published alone, as pretrained weights
    # are; a fine-tuning script builds the same model and restores them.
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(f"{folder}/pretrained", uninterrupted["params"])
      checkpointer.wait_until_finished()
      abstract_params = jax.eval_shape(model.init, jax.random.key(0), x_train[:1])
      pretrained = checkpointer.restore(f"{folder}/pretrained", abstract_params)

  accuracy = jax.jit(lambda p, x, y: (model.apply(p, x).argmax(-1) == y).mean())

  # No set_skeleton here. G-SGD keeps only the fixed skeleton weights at 1; those into
  # the outputs moved in training, so setting them to 1 again would replace part of
  # what was learnt and change the function (pretrained weights from elsewhere would
  # lose far more):
  changed = gsgd_jax.set_skeleton(pretrained, layers)
  moved = float(np.abs(logits(changed, x_test) - logits(pretrained, x_test)).max())
  print(
    f"set_skeleton on the pretrained weights would move the test logits by {moved:.3f}"
  )
  assert moved > 0, "set_skeleton left the pretrained function unchanged"

  # A fresh optimizer (a new task: new moments), Adam on the basis paths. init warns
  # when some hidden node's skeleton-chain product B*F lies outside [1e-3, 1e3]: the
  # steps on the weights behind it scale as 1 / (B F)^2, far from SGD's. These weights
  # were trained in path space from set_skeleton, so their products stayed moderate;
  # the warning is made an error to check it. Weights trained without path space from
  # Flax's initialisation (with Adam, say) have products far below 1, and no
  # rescaling moves them (B*F is the value of a path): G-SGD diverged on such weights
  # at every rate tried (python -m benchmarks.fine_tune in a checkout), so fine-tune
  # those with a weight-space optimizer.
  finetune_tx = gsgd_jax.g_adam(3e-4, layers=layers)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="G-SGD: skeleton-chain products")
    finetune_state = finetune_tx.init(pretrained)
  finetune_step = make_train_step(model, finetune_tx)

  upright = float(accuracy(pretrained, x_test, y_test))
  before = float(accuracy(pretrained, new_test, y_test))
  print(f"pretrained test accuracy {upright:.4f}, upside down {before:.4f}")
  params, losses = pretrained, []
  for step in range(finetune_steps):
    xy = batch(steps + step, new_train, y_train)
    params, finetune_state, loss = finetune_step(params, finetune_state, xy)
    losses.append(loss)
  after = float(accuracy(params, new_test, y_test))
  losses = np.asarray(losses)
  print(
    f"fine-tuned upside down, {finetune_steps} steps: train loss "
    f"{losses[:20].mean():.4f} -> {losses[-20:].mean():.4f}, "
    f"test accuracy {before:.4f} -> {after:.4f}"
  )
  assert np.all(np.isfinite(losses)), "the fine-tuning loss is not finite"
  assert losses[-20:].mean() < losses[:20].mean(), "fine-tuning did not lower the loss"
  assert after > before, "fine-tuning did not raise the accuracy on the new task"


if __name__ == "__main__":
  main()
