"""Several independent blocks in one transformation, and the fallback for the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import train_scan

import gsgd_jax

BLOCKS = [["a0", "a1"], ["b0", "b1", "b2"]]


def _problem(seed=0):
  a, _ = ref.make_mlp(jax.random.key(seed), (5, 7, 6), layer_names=["a0", "a1"])
  b, _ = ref.make_mlp(jax.random.key(seed + 1), (6, 8, 4, 3), layer_names=["b0", "b1", "b2"])
  params = {**a, **b, "scale": jnp.linspace(0.5, 1.5, 6), "shift": jnp.zeros(3)}
  params = gsgd_jax.set_skeleton(params, BLOCKS)
  x = jax.random.normal(jax.random.key(seed + 2), (16, 5))
  y = jax.random.normal(jax.random.key(seed + 3), (16, 3))

  def forward(p, x):
    h = ref.forward(p, [("a0",), ("a1",)], x)
    h = jax.nn.relu(h) * p["scale"]  # between blocks: outside both, like a norm scale
    return ref.forward(p, [("b0",), ("b1",), ("b2",)], h) + p["shift"]

  loss = lambda p: jnp.mean((forward(p, x) - y) ** 2)
  return params, x, forward, loss


@pytest.mark.parametrize(
  "make",
  [
    lambda: gsgd_jax.gsgd(0.05, layers=BLOCKS),
    lambda: gsgd_jax.gsgd(0.05, layers=BLOCKS, fallback=optax.adam(1e-2)),
    lambda: gsgd_jax.path_space(optax.adam(3e-3), layers=BLOCKS),
  ],
  ids=["gsgd", "gsgd+adam-fallback", "g-adam"],
)
def test_invariance_inside_blocks(make):
  params, x, forward, loss = _problem()
  rescaled = gsgd_jax.random_rescale(params, BLOCKS, jax.random.key(5))
  np.testing.assert_array_equal(rescaled["scale"], params["scale"])
  assert not np.allclose(rescaled["a0"]["kernel"], params["a0"]["kernel"])
  assert not np.allclose(rescaled["b1"]["kernel"], params["b1"]["kernel"])
  np.testing.assert_allclose(forward(rescaled, x), forward(params, x), rtol=1e-12, atol=1e-12)
  tx = make()
  (final, _), out_a = train_scan(tx, params, loss, 20, lambda p: forward(p, x))
  _, out_b = train_scan(tx, rescaled, loss, 20, lambda p: forward(p, x))
  np.testing.assert_allclose(out_a, out_b, rtol=1e-9, atol=1e-10)
  assert float(loss(final)) < 0.9 * float(loss(params))
  assert not np.allclose(final["scale"], params["scale"])  # the fallback trained it


def test_fallback_follows_its_transform_exactly():
  params, _x, _forward, loss = _problem()
  fallback = optax.adam(1e-2)
  tx = gsgd_jax.gsgd(0.05, layers=BLOCKS, fallback=fallback)
  rest = {"scale": params["scale"], "shift": params["shift"]}
  rest_state = fallback.init(rest)
  state = tx.init(params)
  p = params
  for _ in range(3):
    grads = jax.grad(loss)(p)
    updates, state = tx.update(grads, state, p)
    rest_grads = {"scale": grads["scale"], "shift": grads["shift"]}
    want, rest_state = fallback.update(rest_grads, rest_state, {k: p[k] for k in rest})
    for k in rest:
      np.testing.assert_allclose(updates[k], want[k], rtol=1e-12, atol=1e-15)
    p = optax.apply_updates(p, updates)


def test_blocks_are_independent_chains():
  params, *_ = _problem()
  whole = gsgd_jax.basis_path_values(params, BLOCKS)
  alone = gsgd_jax.basis_path_values(params, BLOCKS[1])
  for name in ("b0", "b1", "b2"):
    np.testing.assert_array_equal(whole[name]["kernel"], alone[name]["kernel"])
  np.testing.assert_array_equal(whole["scale"], 0.0)
  # |F| = hidden nodes of both blocks (7 + 8 + 4); block outputs are not hidden.
  mask = gsgd_jax.skeleton_mask(params, BLOCKS)
  assert sum(int(np.sum(m)) for m in jax.tree.leaves(mask)) == 7 + 8 + 4
  labels = gsgd_jax.block_labels(params, BLOCKS)
  assert labels["scale"] == "fallback" and labels["b2"]["bias"] == "path"


def test_block_errors():
  params, *_ = _problem()
  with pytest.raises(ValueError, match=r"'a1' is declared twice"):
    gsgd_jax.gsgd(0.1, layers=[["a0", "a1"], ["a1"]]).init(params)
  with pytest.raises(ValueError, match=r"block .* is empty"):
    gsgd_jax.gsgd(0.1, layers=[["a0", "a1"], []]).init(params)
  with pytest.raises(TypeError, match=r"mixes paths and blocks"):
    gsgd_jax.gsgd(0.1, layers=["a0", [["a1"]]]).init(params)
  with pytest.raises(TypeError, match=r"not the string|got the string"):
    gsgd_jax.gsgd(0.1, layers="a0").init(params)
