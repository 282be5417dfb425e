"""Skeleton masks, skeleton initialisation and function-preserving rescaling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from problems import make_mlp

import gsgd_jax


@pytest.mark.parametrize("widths", [(3, 4, 4, 2), (5, 8, 3, 7, 2), (2, 1, 3)], ids=str)
def test_random_rescale_preserves_function_and_basis_values(widths):
  params, layers = make_mlp(jax.random.key(0), widths)
  params["other"] = {"scale": jnp.arange(3.0)}
  x = jax.random.normal(jax.random.key(1), (9, widths[0]))
  scaled = gsgd_jax.random_rescale(params, layers, jax.random.key(2))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), params, scaled))
  assert sum(changed) >= 2 * (len(widths) - 2)  # the weights really moved
  np.testing.assert_array_equal(scaled["other"]["scale"], params["other"]["scale"])
  np.testing.assert_allclose(
    ref.forward(scaled, layers, x), ref.forward(params, layers, x), rtol=1e-12, atol=1e-12
  )
  chex.assert_trees_all_close(
    gsgd_jax.basis_path_values(scaled, layers),
    gsgd_jax.basis_path_values(params, layers),
    rtol=1e-12,
    atol=1e-14,
  )


def test_skeleton_masks_follow_the_skeleton_rule():
  widths = (3, 5, 2, 4)
  params, layers = make_mlp(jax.random.key(0), widths)
  fixed, outgoing = ref.skeleton_sets(widths)
  got_fixed = gsgd_jax.skeleton_mask(params, layers)
  got_all = gsgd_jax.skeleton_mask(params, layers, which="all")
  for k, (name,) in enumerate(layers):
    want = np.zeros(params[name]["kernel"].shape, bool)
    for i, j in fixed[k]:
      want[i, j] = True
    np.testing.assert_array_equal(got_fixed[name]["kernel"], want)
    for i, j in outgoing[k]:
      want[i, j] = True
    np.testing.assert_array_equal(got_all[name]["kernel"], want)
    assert not np.any(got_all[name]["bias"])
  # One fixed edge per hidden node: |F| = H.
  assert sum(int(np.sum(m)) for m in jax.tree.leaves(got_fixed)) == sum(widths[1:-1])
  with pytest.raises(ValueError, match=r"which"):
    gsgd_jax.skeleton_mask(params, layers, which="some")


def test_equal_widths_give_the_papers_skeleton():
  d, h, classes = 6, 4, 3
  params, layers = make_mlp(jax.random.key(0), (d, h, h, h, classes))
  mask = gsgd_jax.skeleton_mask(params, layers, which="all")
  want = [
    np.zeros((d, h), bool),
    np.eye(h, dtype=bool),
    np.eye(h, dtype=bool),
    np.zeros((h, classes), bool),
  ]
  for i in range(h):
    want[0][i % d, i] = True  # w^1(i mod d, i)
    want[3][i, i % classes] = True  # w^L(i, i mod K)
  for k, (name,) in enumerate(layers):
    np.testing.assert_array_equal(mask[name]["kernel"], want[k])


def test_set_skeleton_sets_every_skeleton_weight_and_nothing_else():
  params, layers = make_mlp(jax.random.key(0), (4, 6, 3, 2))
  new = gsgd_jax.set_skeleton(params, layers, value=1.0)
  mask = gsgd_jax.skeleton_mask(params, layers, which="all")
  for (name,) in layers:
    m = np.asarray(mask[name]["kernel"])
    np.testing.assert_array_equal(np.asarray(new[name]["kernel"])[m], 1.0)
    np.testing.assert_array_equal(
      np.asarray(new[name]["kernel"])[~m], np.asarray(params[name]["kernel"])[~m]
    )
    np.testing.assert_array_equal(new[name]["bias"], params[name]["bias"])
  with pytest.raises(ValueError, match=r"nonzero"):
    gsgd_jax.set_skeleton(params, layers, value=0.0)


def test_set_skeleton_keeps_dtype():
  params, layers = make_mlp(jax.random.key(0), (4, 6, 2), dtype=jnp.bfloat16)
  new = gsgd_jax.set_skeleton(params, layers)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(new))


def test_init_runs_its_per_node_work_as_programs_compiled_once_per_declaration():
  # init runs eagerly, where each small operation would compile a program of its own
  # (seconds for a ResNet-34): its skeleton checks, the normalized blocks' norms and the
  # inner transformation's starting values run as one compiled program each, which a
  # later init of the same model reuses.
  from gsgd_jax._src import transform, validate

  params, layers = make_mlp(jax.random.key(0), (5, 8, 3, 7, 2))
  params = gsgd_jax.set_skeleton(params, layers)
  tx = gsgd_jax.g_adam(1e-3, layers=layers)
  first = tx.init(params)
  caches = (transform._compiled, validate._compiled_summaries)
  before = [cache.cache_info() for cache in caches]
  second = tx.init(params)
  for cache, old in zip(caches, before, strict=True):
    new = cache.cache_info()
    assert new.misses == old.misses and new.hits > old.hits, cache
  # The starting values are the basis-path values, as the uncompiled path computes them.
  chex.assert_trees_all_close(second, first)
  values = gsgd_jax.basis_path_values(params, layers)
  chex.assert_trees_all_equal_structs(second.inner_state[0].mu, values)
