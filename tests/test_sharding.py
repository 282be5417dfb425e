"""Sharded params (8 fake CPU devices, set in conftest) under Auto and Explicit meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gsgd_jax
from gsgd_jax.probes import PROBE

WIDTHS = (6, 16, 16, 3)
# Sharded along hidden units: columns into a hidden level, rows out of it.
SPECS = {
  "Dense_0": {"kernel": P(None, "x"), "bias": P("x")},
  "Dense_1": {"kernel": P("x", None), "bias": P("x")},
  "Dense_2": {"kernel": P("x", None), "bias": P()},
}
OPTIMIZERS = {
  "gsgd": lambda layers: gsgd_jax.gsgd(0.05, layers=layers, momentum=0.9),
  "g_adam": lambda layers: gsgd_jax.g_adam(1e-2, layers=layers),
  "path_sgd": lambda layers: gsgd_jax.path_sgd(0.05, layers=layers),
}


def _problem():
  params, layers = ref.make_mlp(jax.random.key(0), WIDTHS)
  params = gsgd_jax.set_skeleton(params, layers)
  x = jax.random.normal(jax.random.key(1), (32, WIDTHS[0]))
  y = jax.random.normal(jax.random.key(2), (32, WIDTHS[-1]))

  def loss(p):
    h = x
    explicit = bool(jax.sharding.get_abstract_mesh().explicit_axes)
    for k, (name,) in enumerate(layers):
      # Contractions over sharded hidden units need an output sharding when explicit.
      h = jnp.matmul(h, p[name]["kernel"], out_sharding=P() if explicit else None)
      h = h + p[name]["bias"]
      if k < len(layers) - 1:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  return params, layers, loss


def _train(tx, params, loss, out_shardings=None, steps=5):
  state = tx.init(params)
  init_state = state

  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, out_shardings=out_shardings(state) if out_shardings else None)
  for _ in range(steps):
    params, state = step(params, state)
  return params, init_state, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_training_matches_single_device(name, axis_type):
  params, layers, loss = _problem()
  tx = OPTIMIZERS[name](layers)
  want, _, want_state = _train(tx, params, loss)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, SPECS)
    param_shardings = jax.tree.map(lambda a: a.sharding, sharded)
    # Auto: XLA picks output shardings unless told; pin the state to init's layout.
    pin = (
      None
      if axis_type == AxisType.Explicit
      else (lambda state: (param_shardings, jax.tree.map(lambda a: a.sharding, state)))
    )
    got, init_state, state = _train(tx, sharded, loss, out_shardings=pin)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  for before, after in zip(jax.tree.leaves(init_state), jax.tree.leaves(state), strict=True):
    assert (before.dtype, before.shape) == (after.dtype, after.shape)
    assert before.sharding.is_equivalent_to(after.sharding, before.ndim), (
      before.sharding,
      after.sharding,
    )
  # The params keep their sharding along hidden units.
  for a, spec in zip(
    jax.tree.leaves(got), jax.tree.leaves(SPECS, is_leaf=lambda s: isinstance(s, P)), strict=True
  ):
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim)


CONV_SPECS = {
  "Conv_0": {"kernel": P(None, None, None, "x"), "bias": P("x"), PROBE: P("x")},
  "Conv_1": {"kernel": P(None, None, "x", None), "bias": P(), PROBE: P()},
  "Dense_0": {"kernel": P(), "bias": P()},
}


def _conv_problem(probes):
  """Two 3x3 convolutions (channels sharded), a flatten and a dense read-out."""
  ks = jax.random.split(jax.random.key(0), 3)
  params = {
    "Conv_0": {"kernel": jax.random.normal(ks[0], (3, 3, 2, 16)) / 4, "bias": jnp.full(16, 0.1)},
    "Conv_1": {"kernel": jax.random.normal(ks[1], (3, 3, 16, 8)) / 12, "bias": jnp.full(8, 0.1)},
    "Dense_0": {"kernel": jax.random.normal(ks[2], (4 * 4 * 8, 3)) / 10, "bias": jnp.zeros(3)},
  }
  if probes:
    params["Conv_0"][PROBE], params["Conv_1"][PROBE] = jnp.ones(16), jnp.ones(8)
  layers = ["Conv_0", "Conv_1", "Dense_0"]
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  y = jax.random.normal(jax.random.key(2), (4, 3))

  def loss(p):
    explicit = bool(jax.sharding.get_abstract_mesh().explicit_axes)
    out = P() if explicit else None
    h = x
    for name, stride in (("Conv_0", 1), ("Conv_1", 2)):
      h = jax.lax.conv_general_dilated(
        h,
        p[name]["kernel"],
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        out_sharding=out,
      )
      h = h + p[name]["bias"]
      h = jax.nn.relu(gsgd_jax.probes.scale_probe(h, p[name][PROBE]) if probes else h)
    h = jnp.matmul(h.reshape(h.shape[0], -1), p["Dense_0"]["kernel"], out_sharding=out)
    return jnp.mean((h + p["Dense_0"]["bias"] - y) ** 2)

  return gsgd_jax.set_skeleton(params, layers), layers, loss


@pytest.mark.parametrize("probes", [False, True], ids=["reduction", "probes"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_cnn_matches_single_device(probes, axis_type):
  params, layers, loss = _conv_problem(probes)
  tx = gsgd_jax.gsgd(0.05, layers=layers, momentum=0.9)
  want, _, _ = _train(tx, params, loss, steps=3)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    specs = {n: {k: CONV_SPECS[n][k] for k in layer} for n, layer in params.items()}
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    param_shardings = jax.tree.map(lambda a: a.sharding, sharded)
    pin = (
      None
      if axis_type == AxisType.Explicit
      else (lambda state: (param_shardings, jax.tree.map(lambda a: a.sharding, state)))
    )
    got, _, _ = _train(tx, sharded, loss, out_shardings=pin, steps=3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  for a, spec in zip(
    jax.tree.leaves(got), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)), strict=True
  ):
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim)
