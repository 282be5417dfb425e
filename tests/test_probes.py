"""Scale probes: the node sums from the backward pass give the same updates as the reduction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import nnx_layers_at_skeleton, train_nnx
from problems import linen

import gsgd_jax
from gsgd_jax import probes
from gsgd_jax._src import basis
from gsgd_jax._src.pytree import locate_blocks
from gsgd_jax._src.structure import build_structure
from gsgd_jax.probes import PROBE


class ProbedMLP(nn.Module):
  """ReLU MLP; hidden layers carry probes, one before and one after its ReLU."""

  probe: bool = True

  @nn.compact
  def __call__(self, x):
    dense = probes.Dense if self.probe else nn.Dense
    x = nn.relu(dense(7, name="Dense_0")(x))
    x = dense(5, name="Dense_1")(x)
    x = nn.relu(x)
    x = nn.relu(nn.Dense(6, name="Dense_2")(x))  # a hidden layer without a probe
    return dense(3, name="Dense_3")(x)


class ProbedCNN(nn.Module):
  probe: bool = True

  @nn.compact
  def __call__(self, x):
    conv, dense = (probes.Conv, probes.Dense) if self.probe else (nn.Conv, nn.Dense)
    x = nn.relu(conv(4, (3, 3), name="Conv_0")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(conv(3, (3, 3), strides=2, name="Conv_1")(x))
    x = nn.relu(dense(5, name="Dense_0")(x.reshape(x.shape[0], -1)))
    return nn.Dense(3, name="Dense_1")(x)


def _strip(tree):
  """The same tree without probe leaves."""
  return {
    "params": {
      name: {k: v for k, v in layer.items() if k != PROBE} for name, layer in tree["params"].items()
    }
  }


CASES = {"mlp": (ProbedMLP, (16, 4)), "cnn": (ProbedCNN, (8, 8, 8, 2))}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
  "make_tx",
  [
    lambda layers: gsgd_jax.gsgd(0.1, layers=layers),
    lambda layers: gsgd_jax.g_adamw(1e-2, layers=layers, weight_decay=0.1),
    lambda layers: gsgd_jax.path_space(
      optax.sgd(0.1, momentum=0.9), layers=layers, fallback=optax.adam(1e-2)
    ),
  ],
  ids=["gsgd", "g_adamw", "momentum+fallback"],
)
def test_probed_updates_equal_plain_updates(case, make_tx):
  model, x_shape = CASES[case]
  params, layers, loss, *_ = linen(model(probe=True), x_shape)
  plain_params, _, plain_loss, *_ = linen(model(probe=False), x_shape)
  grad, plain_grad = jax.grad(loss), jax.grad(plain_loss)
  # Drop-in: the probed modules draw the same kernels as Flax's own.
  jax.tree.map(np.testing.assert_array_equal, _strip(params), plain_params)
  tx = make_tx(layers)
  state, plain_state = tx.init(params), tx.init(plain_params)
  for _ in range(3):  # a few steps, so that inner states enter too
    assert gsgd_jax.verify_probes(loss, params, layers) < 1e-12
    grads = grad(params)
    updates, state = tx.update(grads, state, params)
    plain_updates, plain_state = tx.update(plain_grad(plain_params), plain_state, plain_params)
    for layer in updates["params"].values():
      if PROBE in layer:
        np.testing.assert_array_equal(layer[PROBE], 0)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
      _strip(updates),
      plain_updates,
    )
    params = optax.apply_updates(params, updates)
    plain_params = optax.apply_updates(plain_params, plain_updates)
  np.testing.assert_array_equal(params["params"]["Dense_0"][PROBE], 1)


def test_probe_values_other_than_one_are_exact():
  """A probe ``s`` != 1 is a frozen per-node gain: ``s * dL/ds`` is still the node sum."""
  params, layers, *_ = linen(ProbedMLP(), (16, 4))
  params["params"]["Dense_0"][PROBE] = jnp.linspace(0.5, 2.0, 7)
  params["params"]["Dense_1"][PROBE] = -jnp.linspace(0.5, 2.0, 5)
  x = jax.random.normal(jax.random.key(3), (16, 4), jnp.float64)
  loss = lambda p: jnp.sum(ProbedMLP().apply(p, x) ** 2)
  gsgd_jax.verify_probes(loss, params, layers, rtol=1e-12)
  grads = jax.grad(loss)(params)
  (struct,) = build_structure(params, layers)
  (p,) = [
    s.take(located.leaves)
    for located in [locate_blocks(params, [struct.paths], "params")]
    for s in located.slots
  ]
  (g,) = [
    s.take(located.leaves)
    for located in [locate_blocks(grads, [struct.paths], "grads")]
    for s in located.slots
  ]
  args = [p.kernels, p.biases, g.kernels, g.biases]
  sums = [None if s is None else s * gs for s, gs in zip(p.probes, g.probes, strict=True)]
  with_sums = basis.inverse_chain_rule(struct, *args, probe_sums=sums)
  reduced = basis.inverse_chain_rule(struct, *args)
  for a, b in zip(with_sums.kernels, reduced.kernels, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def _mlp_params(key, probe=True):
  k0, k1 = jax.random.split(key)
  params = {
    "l0": {"kernel": jax.random.normal(k0, (4, 5)), "bias": jnp.zeros(5)},
    "l1": {"kernel": jax.random.normal(k1, (5, 3))},
  }
  if probe:
    params["l0"][PROBE] = jnp.ones(5)
  return params


@pytest.mark.parametrize(
  "placement", ["on_outputs", "after_relu", "after_tanh", "unused", "before_bias"]
)
def test_verify_probes_names_a_miswired_layer(placement):
  x = jax.random.normal(jax.random.key(0), (8, 4))
  params = _mlp_params(jax.random.key(1))

  def loss(p):
    z = x @ p["l0"]["kernel"] + p["l0"]["bias"]
    s = p["l0"][PROBE]
    h = {
      "on_outputs": lambda: jax.nn.relu(z * s),
      "after_relu": lambda: jax.nn.relu(z) * s,  # homogeneous in between: fine
      "after_tanh": lambda: jnp.tanh(z) * s,
      # Caught although this layer's bias is 0: verify_probes shifts biases.
      "before_bias": lambda: jax.nn.relu((z - p["l0"]["bias"]) * s + p["l0"]["bias"]),
      "unused": lambda: jax.nn.relu(z),
    }[placement]()
    return jnp.sum((h @ p["l1"]["kernel"]) ** 2)

  if placement in ("on_outputs", "after_relu"):
    assert gsgd_jax.verify_probes(loss, params, ["l0", "l1"]) < 1e-5
  else:
    with pytest.raises(ValueError, match=r"layer 'l0': scale_probe"):
      gsgd_jax.verify_probes(loss, params, ["l0", "l1"])


def test_verify_probes_without_probes_says_so():
  params = _mlp_params(jax.random.key(1), probe=False)
  with pytest.raises(ValueError, match=r"no declared layer has a 'scale_probe'"):
    gsgd_jax.verify_probes(lambda p: jnp.sum(p["l0"]["kernel"]), params, ["l0", "l1"])


def test_probe_of_wrong_shape_is_named():
  params = {
    "l0": {"kernel": jnp.ones((3, 4)), PROBE: jnp.ones(3)},
    "l1": {"kernel": jnp.ones((4, 2))},
  }
  with pytest.raises(ValueError, match=rf"'l0': {PROBE} of shape"):
    gsgd_jax.gsgd(0.1, layers=["l0", "l1"]).init(params)


def test_path_sgd_and_labels_leave_probes_alone():
  params, layers, loss, *_ = linen(ProbedMLP(), (16, 4))
  grads = jax.grad(loss)(params)
  tx = gsgd_jax.path_sgd(0.1, layers=layers)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["params"]["Dense_1"][PROBE], 0)
  labels = gsgd_jax.block_labels(params, layers)
  assert labels["params"]["Dense_0"][PROBE] == "path"
  # A probe outside the declared blocks is not trained by the fallback either.
  block = layers[:2]
  for fallback in (None, optax.adamw(1e-2, weight_decay=0.1)):
    tx = gsgd_jax.gsgd(0.1, layers=block, fallback=fallback)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["params"]["Dense_3"][PROBE], 0)
    assert float(jnp.max(jnp.abs(updates["params"]["Dense_3"]["kernel"]))) > 0


class ProbedNNX(nnx.Module):
  def __init__(self, rngs):
    self.convs = nnx.List([probes.NNXConv(1, 4, (3, 3), rngs=rngs)])
    self.head = nnx.List([probes.Linear(256, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.convs[0](x)).reshape(x.shape[0], -1)
    return self.head[1](nnx.relu(self.head[0](x)))


def test_nnx_probed_model_trains_and_probes_stay_one():
  x = jax.random.normal(jax.random.key(0), (32, 8, 8, 1), jnp.float32)
  y = (jnp.mean(x, axis=(1, 2, 3)) > 0).astype(jnp.int32)
  model = ProbedNNX(nnx.Rngs(1))
  layers = nnx_layers_at_skeleton(model)
  assert layers == [("convs", 0), ("head", 0), ("head", 1)]
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  assert gsgd_jax.verify_probes(lambda p: loss(nnx.merge(graphdef, p, rest)), state, layers) < 1e-4
  start, end = train_nnx(model, gsgd_jax.gsgd(0.05, layers=layers), loss, steps=30)
  assert end < 0.8 * start
  np.testing.assert_array_equal(getattr(model.head[0], PROBE)[...], 1)


def test_multisteps_averages_probe_gradients_with_the_rest():
  """Probe gradients are linear in the loss: MultiSteps' mean of micro-batch
  gradients (all taken at the same params) keeps them consistent."""
  params, layers, *_ = linen(ProbedMLP(probe=True), (16, 4))
  plain_params = _strip(params)
  batches = [
    (
      jax.random.normal(jax.random.key(10 + i), (16, 4), jnp.float64),
      jax.random.normal(jax.random.key(20 + i), (16, 3), jnp.float64),
    )
    for i in range(4)
  ]

  def grad(model, p, batch):
    x, y = batch
    return jax.grad(lambda q: jnp.mean((model.apply(q, x) - y) ** 2))(p)

  tx = optax.MultiSteps(gsgd_jax.gsgd(0.1, layers=layers), every_k_schedule=2)
  state, plain_state = tx.init(params), tx.init(plain_params)
  for batch in batches:
    updates, state = tx.update(grad(ProbedMLP(), params, batch), state, params)
    plain_updates, plain_state = tx.update(
      grad(ProbedMLP(probe=False), plain_params, batch), plain_state, plain_params
    )
    # MultiSteps accumulates gradients in float32, even for float64 params.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      _strip(updates),
      plain_updates,
    )
    params = optax.apply_updates(params, updates)
    plain_params = optax.apply_updates(plain_params, plain_updates)
  assert int(state.gradient_step) == 2
