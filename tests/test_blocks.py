"""Several independent blocks in one transformation, and the fallback for the rest."""

import chex
import jax
import numpy as np
import optax
import pytest
from helpers import train_scan
from problems import BLOCKS, make_optimizer, two_blocks

import gsgd_jax


@pytest.mark.parametrize(
  "make",
  [
    lambda: make_optimizer("gsgd", BLOCKS),
    lambda: make_optimizer("gsgd", BLOCKS, fallback=optax.adam(1e-2)),
    lambda: make_optimizer("g_adam", BLOCKS),
  ],
  ids=["gsgd", "gsgd+adam-fallback", "g-adam"],
)
def test_invariance_inside_blocks(make):
  params, _, loss, forward, x, *_ = two_blocks()
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
  params, _, loss, *_ = two_blocks()
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
    chex.assert_trees_all_close({k: updates[k] for k in rest}, want, rtol=1e-12, atol=1e-15)
    p = optax.apply_updates(p, updates)


def test_blocks_are_independent_chains():
  params, *_ = two_blocks()
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
  params, *_ = two_blocks()
  with pytest.raises(ValueError, match=r"'a1' is declared twice"):
    gsgd_jax.gsgd(0.1, layers=[["a0", "a1"], ["a1"]]).init(params)
  with pytest.raises(ValueError, match=r"block .* is empty"):
    gsgd_jax.gsgd(0.1, layers=[["a0", "a1"], []]).init(params)
  with pytest.raises(TypeError, match=r"mixes paths and blocks"):
    gsgd_jax.gsgd(0.1, layers=["a0", [["a1"]]]).init(params)
  with pytest.raises(TypeError, match=r"not the string|got the string"):
    gsgd_jax.gsgd(0.1, layers="a0").init(params)
