"""Every public transformation behaves as an optax citizen and keeps rescaling invariance.

Mirrors the coverage of optax's own test suites: extra args, compile once, convergence
under jit + scan, inject_hyperparams, schedules, dtypes, lax.cond, MultiSteps, chain,
masked, apply_if_finite, tree_map_params.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import train_scan

import gsgd_jax

WIDTHS = (4, 7, 6, 3)

# name -> (factory, hyperparameters); every factory takes `layers=` as well.
FACTORIES = {
  "gsgd": (gsgd_jax.gsgd, {"learning_rate": 0.05}),
  "g_momentum": (gsgd_jax.g_momentum, {"learning_rate": 0.01, "momentum": 0.9}),
  "g_nesterov": (
    functools.partial(gsgd_jax.g_momentum, nesterov=True),
    {"learning_rate": 0.01, "momentum": 0.9},
  ),
  "g_adam": (gsgd_jax.g_adam, {"learning_rate": 3e-3}),
  "g_adamw": (gsgd_jax.g_adamw, {"learning_rate": 3e-3, "weight_decay": 0.1}),
  "g_rmsprop": (gsgd_jax.g_rmsprop, {"learning_rate": 1e-3}),
  "path_sgd": (gsgd_jax.path_sgd, {"learning_rate": 0.05}),
}
NAMES = sorted(FACTORIES)


def _make(name, layers, **overrides):
  factory, hyper = FACTORIES[name]
  return factory(**{**hyper, **overrides}, layers=layers)


def _problem(dtype=jnp.float64, seed=0, extra_leaf=False):
  params, layers = ref.make_mlp(jax.random.key(seed), WIDTHS, dtype=dtype)
  params = gsgd_jax.set_skeleton(params, layers)
  if extra_leaf:
    params["scale"] = jnp.ones(3, dtype)
  teacher, _ = ref.make_mlp(jax.random.key(seed + 9), WIDTHS)
  x = jax.random.normal(jax.random.key(seed + 1), (64, WIDTHS[0]))
  y = ref.forward(teacher, layers, x)
  x, y = x.astype(dtype), y.astype(dtype)

  def loss(p):
    out = ref.forward(p, layers, x)
    if extra_leaf:
      out = out * p["scale"]
    ct = jnp.promote_types(dtype, jnp.float32)  # f16/bf16 losses in float32
    return jnp.mean((out.astype(ct) - y.astype(ct)) ** 2)

  return params, layers, x, loss


@pytest.mark.parametrize("name", NAMES)
def test_rescaling_invariance(name):
  params, layers, x, loss = _problem()
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(3))
  tx = _make(name, layers)
  outputs = lambda p: ref.forward(p, layers, x)
  (final, _), out_a = train_scan(tx, params, loss, 20, outputs)
  _, out_b = train_scan(tx, rescaled, loss, 20, outputs)
  np.testing.assert_allclose(out_a, out_b, rtol=1e-9, atol=1e-10)
  assert float(loss(final)) < float(loss(params))


@pytest.mark.parametrize("name", NAMES)
def test_converges_under_jit_and_scan(name):
  params, layers, _, loss = _problem(seed=5)
  tx = _make(name, layers)
  (_final, _), losses = train_scan(tx, params, loss, 150, loss)
  assert float(losses[-1]) < 0.5 * float(loss(params))
  assert bool(jnp.all(jnp.isfinite(losses)))


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_ignored_and_compiled_once(name):
  params, layers, _, loss = _problem()
  tx = _make(name, layers)
  grads = jax.grad(loss)(params)
  state = tx.init(params)
  plain, _ = tx.update(grads, state, params)
  extra, _ = optax.with_extra_args_support(tx).update(grads, state, params, value=1.0, unknown="x")
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(extra), strict=True):
    np.testing.assert_array_equal(a, b)
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
  params, layers, _, loss = _problem()
  factory, hyper = FACTORIES[name]
  injected = optax.inject_hyperparams(factory)(**hyper, layers=layers)
  scheduled = _make(name, layers, learning_rate=optax.constant_schedule(hyper["learning_rate"]))
  plain = _make(name, layers)
  runs = [train_scan(tx, params, loss, 5, lambda p: p)[0][0] for tx in (plain, injected, scheduled)]
  for other in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
  state = injected.init(params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(hyper["learning_rate"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_dtypes_kept_and_stable_under_cond(name, dtype):
  params, layers, _, loss = _problem(dtype=dtype)
  tx = _make(name, layers)
  grads = jax.grad(loss)(params)
  state = tx.init(params)

  @jax.jit
  def maybe_update(pred, state):
    return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

  new_state = maybe_update(True, state)
  same = maybe_update(False, state)
  dtypes = lambda t: [(x.dtype, x.shape) for x in jax.tree.leaves(t)]
  assert dtypes(new_state) == dtypes(state) == dtypes(same)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  if dtype in (jnp.float32, jnp.float64):
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_accumulates(name):
  params, layers, _, loss = _problem()
  tx = _make(name, layers)
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
  for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_chain_masked_and_tree_map_params(name):
  params, layers, _, loss = _problem(extra_leaf=True)
  tx = _make(name, layers)
  grads = jax.grad(loss)(params)
  clip = optax.clip_by_global_norm(0.01)
  chained = optax.chain(clip, tx)
  got, _ = chained.update(grads, chained.init(params), params)
  clipped, _ = clip.update(grads, clip.init(params))
  want, _ = tx.update(clipped, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-16)

  mask = {k: not k.startswith("scale") for k in params}
  masked = optax.masked(tx, mask)
  updates, _ = masked.update(grads, masked.init(params), params)
  np.testing.assert_array_equal(updates["scale"], grads["scale"])  # passed through
  chain_only = {k: v for k, v in params.items() if k != "scale"}
  want, _ = tx.update({k: grads[k] for k in chain_only}, tx.init(chain_only), chain_only)
  for a, b in zip(
    jax.tree.leaves(want), jax.tree.leaves({k: updates[k] for k in chain_only}), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-13)

  state = tx.init(params)
  zeroed = optax.tree_map_params(tx, jnp.zeros_like, state)
  assert jax.tree.structure(zeroed) == jax.tree.structure(state)
  assert all(
    bool(jnp.all(leaf == 0))
    for leaf in jax.tree.leaves(zeroed)
    if leaf.shape == params["Dense_0"]["kernel"].shape
  )


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_nan_gradients(name):
  params, layers, _, loss = _problem()
  tx = optax.apply_if_finite(_make(name, layers), max_consecutive_errors=3)
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
  params, layers, _, _ = _problem()
  lr, wd = 0.1, 0.5
  tx = gsgd_jax.g_adamw(lr, weight_decay=wd, layers=layers)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  before = gsgd_jax.basis_path_values(params, layers)
  after = gsgd_jax.basis_path_values(new, layers)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
    np.testing.assert_allclose(a, (1 - lr * wd) * b, rtol=1e-12, atol=1e-15)
  fixed = gsgd_jax.skeleton_mask(params, layers)
  for w, w_new, m in zip(
    jax.tree.leaves(params), jax.tree.leaves(new), jax.tree.leaves(fixed), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(w_new)[np.asarray(m)], np.asarray(w)[np.asarray(m)])
