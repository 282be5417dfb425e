"""G-SGD on sharded params: data- and model-parallel training on a device mesh.

What it shows: a ReLU MLP trained with G-SGD (with momentum) on a 2-D mesh of devices,
the batch split along ``data`` and the hidden units along ``model``: the first layer's
kernel by columns, the second's by rows (Megatron's pairing, so one all-reduce per
forward pass). The optimizer needs nothing for this: it keeps each update, and its own
state, sharded as the gradient it came from. The script checks that after a step the
params are still sharded as declared, that the optimizer state keeps the shardings
``init`` gave it, and that the sharded step computes what the same step computes on
one device (to float32 rounding).

The mesh has Explicit axes: every array carries its
sharding in its type, and a matrix product that sums over sharded hidden units must
say how its output is sharded (``out_sharding=``). With Auto axes instead, XLA picks
the shardings of a jitted step's outputs unless ``out_shardings=`` pins them.

No cluster needed: the script asks JAX for 8 CPU devices, so it runs anywhere (the 8
share the CPU's cores, so expect no speed-up). On a machine with 8 accelerators,
delete the ``jax_num_cpu_devices`` line.

Data: Fashion-MNIST from /usr/share/datasets/fashion-mnist (Debian's
``dataset-fashion-mnist``), else scikit-learn's bundled 8x8 digits (no download).

    python examples/sharding.py           # 3 epochs of a 784-512-512-10 MLP: 30 s
    python examples/sharding.py --tiny    # a smoke run of a few seconds, as CI runs it
"""

from __future__ import annotations

import argparse
import functools
import gzip
import pathlib
import time
from collections.abc import Sequence
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gsgd_jax

# Before any JAX operation: the CPU backend is created with its devices on first use.
jax.config.update("jax_num_cpu_devices", 8)

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
  data = {"x_train": x[train], "y_train": y[train], "x_test": x[test]}
  return "digits", {**data, "y_test": y[test]}


class MLP(nn.Module):
  """A ReLU MLP of ``widths`` (outputs of each layer)."""

  widths: Sequence[int]
  # The sharding of the activations after the first layer: under an Explicit mesh a
  # product that sums over sharded hidden units must be told it. None on one device.
  out_sharding: P | None = None

  @nn.compact
  def __call__(self, x):
    contract = functools.partial(jax.lax.dot_general, out_sharding=self.out_sharding)
    for i, width in enumerate(self.widths):
      x = nn.Dense(width, dot_general=contract if i > 0 else None)(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return x


# Hidden units sharded along `model`: columns into the first hidden level, rows out
# of it; the last layer replicated.
SPECS = {
  "params": {
    "Dense_0": {"kernel": P(None, "model"), "bias": P("model")},
    "Dense_1": {"kernel": P("model", None), "bias": P()},
    "Dense_2": {"kernel": P(), "bias": P()},
  }
}


def make_step(model: MLP, tx: optax.GradientTransformation):
  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      logits = cast(jax.Array, model.apply(p, x))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)  # params are required
    return optax.apply_updates(params, updates), state, value

  return step


def shardings(tree):
  return jax.tree.map(lambda a: a.sharding, tree)


def assert_sharded_as(tree, specs, mesh):
  """Every leaf of ``tree`` is sharded as its PartitionSpec in ``specs`` says."""

  def check(a, spec):
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (a, spec)

  jax.tree.map(check, tree, specs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="a smoke run (seconds)")
  args = parser.parse_args(argv)
  epochs, hidden, batch, lr = (1, 64, 64, 0.02) if args.tiny else (3, 512, 128, 0.02)

  name, data = load_data()
  if name == "digits":  # 1500 images: more epochs for as many steps
    epochs *= 10
  if args.tiny:  # a slice keeps the smoke run short
    data = {k: v[:2000] if k.endswith("train") else v[:1000] for k, v in data.items()}
  classes = int(data["y_train"].max()) + 1
  widths = (hidden, hidden, classes)
  print(f"{name}: {len(data['x_train'])} training, {len(data['x_test'])} test examples")

  # Two devices for the hidden units, the rest for the batch: (4, 2) on 8 devices.
  devices = jax.device_count()
  model_axis = 2 if devices % 2 == 0 else 1
  mesh = jax.make_mesh(
    (devices // model_axis, model_axis),
    ("data", "model"),
    axis_types=(AxisType.Explicit, AxisType.Explicit),
  )
  print(f"mesh: {dict(mesh.shape)}, axis types {mesh.axis_types}")

  x0 = jnp.asarray(data["x_train"][:batch])
  model = MLP(widths)
  params = model.init(jax.random.key(0), x0)
  layers = gsgd_jax.infer_layers(params)
  worst = gsgd_jax.verify_invariance(model.apply, params, layers, x0)
  print(f"verify_invariance on {layers}: largest output change {worst:.1e}")
  params = gsgd_jax.set_skeleton(params, layers)  # on the fresh init, before sharding
  tx = gsgd_jax.gsgd(lr, momentum=0.9, layers=layers)
  rng = np.random.default_rng(0)
  n = len(data["x_train"]) // batch * batch
  orders = [rng.permutation(len(data["x_train"]))[:n] for _ in range(epochs)]
  batches = np.concatenate(orders).reshape(-1, batch)

  # The reference: the first step on one device, no mesh.
  reference_step = make_step(model, tx)
  x, y = data["x_train"][batches[0]], data["y_train"][batches[0]]
  want, _, _ = reference_step(params, tx.init(params), x, y)

  sharded_model = MLP(widths, out_sharding=P("data", None))
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  with jax.set_mesh(mesh):
    params = jax.tree.map(put, params, SPECS)
    state = tx.init(params)
    init_shardings = shardings(state)
    step = make_step(sharded_model, tx)

    @jax.jit
    def predict(p, x):
      return cast(jax.Array, sharded_model.apply(p, x)).argmax(-1)

    losses, start = [], time.perf_counter()
    for i, rows in enumerate(batches):
      x = put(data["x_train"][rows], P("data", None))
      y = put(data["y_train"][rows], P("data"))
      params, state, value = step(params, state, x, y)
      if i == 0:
        # The claims of the docstring: shardings kept, the single-device result.
        assert_sharded_as(params, SPECS, mesh)
        assert shardings(state) == init_shardings
        gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, want)
        first_gap = max(jax.tree.leaves(gaps))
        print(f"first step: sharded and single-device params {first_gap:.1e} apart")
        assert first_gap < 1e-5, gaps
      losses.append(float(value))
    seconds = time.perf_counter() - start

    assert_sharded_as(params, SPECS, mesh)
    test_rows = len(data["x_test"]) // mesh.shape["data"] * mesh.shape["data"]
    x_test = put(data["x_test"][:test_rows], P("data", None))
    predicted = np.asarray(predict(params, x_test))
  accuracy = float(np.mean(predicted == data["y_test"][:test_rows]))
  first, last = np.mean(losses[:20]), np.mean(losses[-20:])
  print(
    f"G-SGD, momentum 0.9, lr {lr}: train loss {first:.3f} -> {last:.3f} over "
    f"{len(losses)} steps of {batch} ({seconds:.1f} s), test accuracy {accuracy:.4f}"
  )
  kernel = params["params"]["Dense_1"]["kernel"]
  print(f"Dense_1 kernel {kernel.shape}: {kernel.sharding.spec}, per device")
  for shard in kernel.addressable_shards[:2]:
    print(f"  {shard.device}: rows {shard.index[0]}, shape {shard.data.shape}")
  assert last < first
  assert accuracy > (0.3 if args.tiny else 0.7)


if __name__ == "__main__":
  main()
