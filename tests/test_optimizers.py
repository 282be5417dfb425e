"""Rescaling invariance (docs/math.md) for G-SGD and path-space transforms, fallback, precision."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import train_scan

import gsgd_jax

WIDTHS = (6, 9, 7, 8, 3)
STEPS = 25


def _problem(seed=0, dtype=jnp.float64, widths=WIDTHS):
  params, layers = ref.make_mlp(jax.random.key(seed), widths, bias=True, dtype=dtype)
  params = gsgd_jax.set_skeleton(params, layers)
  x = jax.random.normal(jax.random.key(seed + 1), (32, widths[0]), dtype)
  y = jax.random.normal(jax.random.key(seed + 2), (32, widths[-1]), dtype)
  loss = lambda p: jnp.mean((ref.forward(p, layers, x) - y) ** 2)
  return params, layers, x, loss


def _train(tx, params, loss, steps=STEPS, observe=None):
  (params, state), trace = train_scan(tx, params, loss, steps, observe)
  return params, state, trace


OPTIMIZERS = {
  "gsgd": lambda layers: gsgd_jax.gsgd(0.05, layers=layers),
  "gsgd_schedule": lambda layers: gsgd_jax.gsgd(
    optax.exponential_decay(0.05, 5, 0.7), layers=layers
  ),
  "g_momentum": lambda layers: gsgd_jax.gsgd(0.01, layers=layers, momentum=0.9),
  "g_nesterov": lambda layers: gsgd_jax.gsgd(0.01, layers=layers, momentum=0.9, nesterov=True),
  "g_adam": lambda layers: gsgd_jax.path_space(optax.adam(3e-3), layers=layers),
  "g_rmsprop": lambda layers: gsgd_jax.path_space(optax.rmsprop(1e-3), layers=layers),
  "g_clipped_sgd": lambda layers: gsgd_jax.path_space(
    optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.05)), layers=layers
  ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rescaling_invariance(name):
  params, layers, x, loss = _problem()
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(7))
  tx = OPTIMIZERS[name](layers)
  outputs = lambda p: ref.forward(p, layers, x)
  final, state_a, out_a = _train(tx, params, loss, observe=outputs)
  _, state_b, out_b = _train(tx, rescaled, loss, observe=outputs)
  assert int(state_a.total_clipped_ratios) == int(state_b.total_clipped_ratios) == 0
  # Training really changed the function, and both runs agree at every step.
  assert float(loss(final)) < 0.9 * float(loss(params))
  np.testing.assert_allclose(out_a, out_b, rtol=1e-9, atol=1e-10)


def test_plain_sgd_is_not_invariant():
  params, layers, x, loss = _problem()
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(7))
  outputs = lambda p: ref.forward(p, layers, x)
  np.testing.assert_allclose(outputs(params), outputs(rescaled), rtol=1e-12, atol=1e-12)
  _, _, out_a = _train(optax.sgd(0.05), params, loss, observe=outputs)
  _, _, out_b = _train(optax.sgd(0.05), rescaled, loss, observe=outputs)
  assert float(jnp.max(jnp.abs(out_a - out_b))) > 0.1


def test_gsgd_is_path_space_sgd():
  params, layers, x, loss = _problem()
  outputs = lambda p: ref.forward(p, layers, x)
  a = _train(gsgd_jax.gsgd(0.05, layers=layers), params, loss, observe=outputs)[2]
  b = _train(gsgd_jax.path_space(optax.sgd(0.05), layers=layers), params, loss, observe=outputs)[2]
  np.testing.assert_array_equal(a, b)


def test_leaves_outside_layers_follow_the_fallback():
  params, layers, _x, loss = _problem()
  params["scale"] = jnp.ones(3)
  full_loss = lambda p: loss(p) + jnp.sum((p["scale"] - 2.0) ** 2)
  grads = jax.grad(full_loss)(params)
  chain_only = {k: v for k, v in params.items() if k != "scale"}
  tx = gsgd_jax.gsgd(0.05, layers=layers)
  want, _ = tx.update({k: grads[k] for k in chain_only}, tx.init(chain_only), chain_only)

  # Default: the inner transformation (here SGD at 0.05) on the ordinary gradient.
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["scale"], -0.05 * grads["scale"], rtol=1e-14)
  frozen = gsgd_jax.gsgd(0.05, layers=layers, fallback=optax.set_to_zero())
  updates_frozen, _ = frozen.update(grads, frozen.init(params), params)
  np.testing.assert_array_equal(updates_frozen["scale"], 0.0)
  for got in (updates, updates_frozen):
    for a, b in zip(
      jax.tree.leaves(want), jax.tree.leaves({k: got[k] for k in chain_only}), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-14)

  # optax.partition routes the same way.
  labels = {k: ("chain" if k.startswith("Dense") else "rest") for k in params}
  routed = optax.partition({"chain": tx, "rest": optax.sgd(0.1)}, labels)
  updates, _ = routed.update(grads, routed.init(params), params)
  np.testing.assert_allclose(updates["scale"], -0.1 * grads["scale"])
  for a, b in zip(
    jax.tree.leaves(want), jax.tree.leaves({k: updates[k] for k in chain_only}), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_float32_update_matches_float64():
  params, layers, _, loss = _problem()
  tx = gsgd_jax.gsgd(0.05, layers=layers)
  grads = jax.grad(loss)(params)
  want, _ = tx.update(grads, tx.init(params), params)
  to32 = functools.partial(jax.tree.map, lambda a: a.astype(jnp.float32))
  got, _ = tx.update(to32(grads), tx.init(to32(params)), to32(params))
  scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def _step_temp_bytes(tx, params, loss):
  """Bytes of temporaries XLA allots to one jitted train step."""

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step).lower(params, tx.init(params)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _conv_net(head):
  """Wide convolutions on small images, so that kernels outweigh activations: two
  3x3 convolutions of 256 channels and global pooling (``head='pool'``), or one of
  32 channels flattened into a dense layer of 512 (``head='flatten'``)."""
  keys = jax.random.split(jax.random.key(0), 3)
  channels = (8, 256, 256) if head == "pool" else (8, 32)
  convs = [f"Conv_{k}" for k in range(len(channels) - 1)]
  params = {
    name: {"kernel": jax.random.normal(keys[0], (3, 3, c_in, c_out)) / 30, "bias": jnp.zeros(c_out)}
    for name, c_in, c_out in zip(convs, channels, channels[1:], strict=False)
  }
  dense = [256, 10] if head == "pool" else [4 * 4 * 32, 512, 10]
  for k, (n_in, n_out) in enumerate(itertools.pairwise(dense)):
    params[f"Dense_{k}"] = {"kernel": jax.random.normal(keys[k + 1], (n_in, n_out)) / n_in}
  layers = [(name,) for name in (*convs, *(f"Dense_{k}" for k in range(len(dense) - 1)))]
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))

  def loss(p):
    h = x
    for name in convs:
      h = jax.lax.conv_general_dilated(
        h, p[name]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      h = jax.nn.relu(h + p[name]["bias"])
    h = h.mean(axis=(1, 2)) if head == "pool" else h.reshape(len(h), -1)
    for k in range(len(dense) - 1):
      h = h @ p[f"Dense_{k}"]["kernel"]
      h = jax.nn.relu(h) if k < len(dense) - 2 else h
    return jnp.mean(h**2)

  return gsgd_jax.set_skeleton(params, layers), layers, loss


# g_rmsprop keeps one kernel-sized temporary: XLA materialises rsqrt(nu), which
# both the skeleton-edge gather and the kernel pass read.
IN_PLACE = {
  **{name: OPTIMIZERS[name] for name in ("gsgd", "g_momentum", "g_nesterov", "g_adam")},
  "path_sgd": lambda layers: gsgd_jax.path_sgd(0.05, layers=layers),
}


@pytest.mark.parametrize("name", sorted(IN_PLACE))
@pytest.mark.parametrize("net", ["mlp", "cnn", "flatten"])
def test_train_step_holds_no_kernel_sized_temporary(name, net):
  # The update reads each gradient once, elementwise and in its own shape, so XLA
  # can write the new kernel into the gradient's buffer, as it does for SGD; one
  # more kernel-sized temporary than SGD's would mean an extra allocation (and,
  # for big kernels, fresh pages) every step.
  if net == "mlp":
    params, layers, _, loss = _problem(dtype=jnp.float32, widths=(64, 512, 512, 10))
  else:
    params, layers, loss = _conv_net("pool" if net == "cnn" else "flatten")
  largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
  sgd_temp = _step_temp_bytes(optax.sgd(0.1), params, loss)
  temp = _step_temp_bytes(IN_PLACE[name](layers), params, loss)
  assert temp < sgd_temp + largest / 2, (temp, sgd_temp, largest)
