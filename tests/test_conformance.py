"""Every optimizer of the table (``problems.OPTIMIZERS``) behaves as an optax citizen.

Mirrors the coverage of optax's own test suites: extra args, compile once, convergence
under jit + scan, inject_hyperparams, schedules, dtypes, lax.cond, MultiSteps, chain,
masked, apply_if_finite, tree_map_params. Their rescaling invariance is tested in
``test_optimizers.py``, on the same table.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import train_scan
from problems import OPTIMIZERS, make_optimizer, mlp

import gsgd_jax

# A small chain, for the many optimizer x dtype combinations; skeleton set, 64 samples and a
# teacher's targets (a function G-SGD can fit).
WIDTHS = (4, 7, 6, 3)
_mlp = functools.partial(mlp, WIDTHS, skeleton=True, batch=64, teacher=True)
NAMES = sorted(OPTIMIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_converges_under_jit_and_scan(name):
  params, layers, loss, *_ = _mlp(seed=5)
  tx = make_optimizer(name, layers)
  (_final, _), losses = train_scan(tx, params, loss, 150, loss)
  assert float(losses[-1]) < 0.5 * float(loss(params))
  assert bool(jnp.all(jnp.isfinite(losses)))


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_ignored_and_compiled_once(name):
  params, layers, loss, *_ = _mlp()
  tx = make_optimizer(name, layers)
  grads = jax.grad(loss)(params)
  state = tx.init(params)
  plain, _ = tx.update(grads, state, params)
  extra, _ = optax.with_extra_args_support(tx).update(grads, state, params, value=1.0, unknown="x")
  chex.assert_trees_all_equal(plain, extra)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = step(params, state)
  p, s = step(p, s)
  step(p, s)
  assert len(traces) == 1


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_and_constant_schedule(name):
  params, layers, loss, *_ = _mlp()
  factory, hyper, _ = OPTIMIZERS[name]
  injected = optax.inject_hyperparams(factory)(**hyper, layers=layers)
  scheduled = make_optimizer(
    name, layers, learning_rate=optax.constant_schedule(hyper["learning_rate"])
  )
  plain = make_optimizer(name, layers)
  runs = [train_scan(tx, params, loss, 5, lambda p: p)[0][0] for tx in (plain, injected, scheduled)]
  for other in runs[1:]:
    chex.assert_trees_all_close(runs[0], other, rtol=1e-13, atol=1e-15)
  state = injected.init(params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(hyper["learning_rate"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_dtypes_kept_and_stable_under_cond(name, dtype):
  params, layers, loss, *_ = _mlp(dtype=dtype)
  tx = make_optimizer(name, layers)
  grads = jax.grad(loss)(params)
  state = tx.init(params)

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

  new_state = maybe_update(True, state)
  same = maybe_update(False, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state, same)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  if dtype in (jnp.float32, jnp.float64):
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_accumulates(name):
  params, layers, loss, *_ = _mlp()
  tx = make_optimizer(name, layers)
  grads = jax.grad(loss)(params)
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  state = multi.init(params)
  first, state = multi.update(grads, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(first))
  second, _ = multi.update(grads, state, params)
  # MultiSteps' running mean of two equal gradients is not bit-exact (~1e-8
  # relative): compare with the update of the mean it actually forms.
  averaging = optax.MultiSteps(optax.identity(), every_k_schedule=2)
  avg_state = averaging.init(params)
  _, avg_state = averaging.update(grads, avg_state, params)
  mean_grads, _ = averaging.update(grads, avg_state, params)
  want, _ = tx.update(mean_grads, tx.init(params), params)
  chex.assert_trees_all_close(second, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_chain_and_masked(name):
  params, layers, loss, *_ = _mlp(output_scale=True)
  tx = make_optimizer(name, layers)
  grads = jax.grad(loss)(params)
  clip = optax.clip_by_global_norm(0.01)
  chained = optax.chain(clip, tx)
  got, _ = chained.update(grads, chained.init(params), params)
  clipped, _ = clip.update(grads, clip.init(params))
  want, _ = tx.update(clipped, tx.init(params), params)
  chex.assert_trees_all_close(got, want, rtol=1e-13, atol=1e-16)

  mask = {k: not k.startswith("scale") for k in params}
  masked = optax.masked(tx, mask)
  updates, _ = masked.update(grads, masked.init(params), params)
  np.testing.assert_array_equal(updates["scale"], grads["scale"])  # passed through
  chain_only = {k: v for k, v in params.items() if k != "scale"}
  want, _ = tx.update({k: grads[k] for k in chain_only}, tx.init(chain_only), chain_only)
  chex.assert_trees_all_close(want, {k: updates[k] for k in chain_only}, rtol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params_maps_every_param_shaped_tree(name):
  """``optax.tree_map_params`` maps exactly the trees of the state shaped like the params
  (momentum, Adam's moments: ``param_trees`` of them in the table), every leaf of them,
  and leaves the rest of the state as it is. For an optimizer without such trees (G-SGD,
  Path-SGD) it returns the state unchanged."""
  params, layers, *_ = _mlp(output_scale=True)  # a leaf outside the layers, too
  tx = make_optimizer(name, layers)
  state = tx.init(params)
  # The state holds zeros and counters: 7 marks a mapped leaf.
  marked = optax.tree_map_params(tx, lambda p: jnp.full_like(p, 7), state)
  chex.assert_trees_all_equal_shapes_and_dtypes(marked, state)
  # The leaves tree_map_params changed (None elsewhere drops out of the leaves).
  changed = jax.tree.leaves(
    jax.tree.map(lambda new, old: None if np.array_equal(new, old) else new, marked, state)
  )
  assert all(bool(jnp.all(leaf == 7)) for leaf in changed)
  trees = OPTIMIZERS[name].param_trees
  assert sorted(leaf.shape for leaf in changed) == sorted(
    leaf.shape for leaf in jax.tree.leaves(params) * trees
  )
  if trees:
    assert len(changed) > 0  # what this test checked
  else:  # nothing shaped like the params to map
    chex.assert_trees_all_equal(marked, state)


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_nan_gradients(name):
  params, layers, loss, *_ = _mlp()
  tx = optax.apply_if_finite(make_optimizer(name, layers), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), jax.grad(loss)(params))
  updates, state = tx.update(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1
  updates, state = tx.update(jax.grad(loss)(params), state, params)
  assert int(state.notfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


def test_g_adamw_decays_path_values():
  """With zero gradients the only step is decoupled decay of every basis path."""
  params, layers, *_ = _mlp()
  lr, wd = 0.1, 0.5
  tx = gsgd_jax.g_adamw(lr, weight_decay=wd, layers=layers)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  before = gsgd_jax.basis_path_values(params, layers)
  after = gsgd_jax.basis_path_values(new, layers)
  decayed = jax.tree.map(lambda b: (1 - lr * wd) * b, before)
  chex.assert_trees_all_close(after, decayed, rtol=1e-12, atol=1e-15)
  fixed = gsgd_jax.skeleton_mask(params, layers)
  chex.assert_trees_all_equal_structs(params, new, fixed)
  jax.tree.map(
    lambda w, w_new, m: np.testing.assert_array_equal(
      np.asarray(w_new)[np.asarray(m)], np.asarray(w)[np.asarray(m)]
    ),
    params,
    new,
    fixed,
  )
