"""Basis values, ICR and WA against the naive float64 reference (docs/math.md, basis paths and
their values, the inverse chain rule, weight allocation)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from helpers import USER_PIPELINE, equations
from problems import ALLOW_CHAIN_RANGE, WIDTHS, WIDTHS_IN_MAKE_TEST, mlp, widths_cases

import gsgd_jax
from gsgd_jax._src import basis, transform
from gsgd_jax._src.structure import build_structure

# This file's data: 11 samples, summed squared error.
_mlp = functools.partial(mlp, batch=11, reduce=jnp.sum)


def _jit(fn, *static, **static_kw):
  """``fn`` with its leading and keyword arguments fixed, compiled: called op by op, a
  chain's update compiles every primitive of every new shape apart, several times the
  time of compiling the update once."""
  return jax.jit(functools.partial(fn, *static, **static_kw))


def _arrays(tree, layers):
  return [tree[n]["kernel"] for (n,) in layers], [tree[n].get("bias") for (n,) in layers]


def _free_masks(widths):
  fixed, _ = ref.skeleton_sets(widths)
  masks = []
  for k, n_in in enumerate(widths[:-1]):
    m = np.ones((n_in, widths[k + 1]), bool)
    for i, j in fixed[k]:
      m[i, j] = False
    masks.append(m)
  return masks


def _scale(arrays):
  return max(float(np.max(np.abs(a))) for a in arrays if a is not None and np.size(a))


@pytest.mark.parametrize("widths", widths_cases(WIDTHS, fast=WIDTHS_IN_MAKE_TEST))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_basis_values_match_reference(widths, bias):
  params, layers, *_ = _mlp(widths, bias=bias)
  want, want_b = ref.basis_values(*_arrays(params, layers), widths)
  got = _jit(gsgd_jax.basis_path_values, layers=layers)(params)
  for k, (name,) in enumerate(layers):
    np.testing.assert_allclose(got[name]["kernel"], want[k], rtol=1e-12, atol=1e-15)
    if bias:
      np.testing.assert_allclose(got[name]["bias"], want_b[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("widths", widths_cases(WIDTHS, fast=WIDTHS_IN_MAKE_TEST))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_icr_equals_autodiff_through_reconstruction(widths, bias):
  params, layers, loss, *_ = _mlp(widths, bias=bias)
  kernels, biases = _arrays(params, layers)
  values, bias_values = ref.basis_values(kernels, biases, widths)

  def loss_of_values(v, vb):
    ks, bs = ref.reconstruct(v, vb, kernels, widths)
    rebuilt = {
      n: {"kernel": ks[k], **({"bias": bs[k]} if bias else {})} for k, (n,) in enumerate(layers)
    }
    return loss(rebuilt)

  # The reconstruction really is the inverse of the basis-value map.
  ks, _ = ref.reconstruct(values, bias_values, kernels, widths)
  for k in range(len(layers)):
    np.testing.assert_allclose(ks[k], kernels[k], rtol=1e-10, atol=1e-13)

  want, want_b = jax.jit(jax.grad(loss_of_values, argnums=(0, 1)))(values, bias_values)
  grads = jax.jit(jax.grad(loss))(params)
  (struct,) = build_structure(params, layers)
  got = _jit(basis.inverse_chain_rule, struct)(kernels, biases, *_arrays(grads, layers))
  tol = 1e-10 * _scale(want + (want_b if bias else []))
  for k, free in enumerate(_free_masks(widths)):
    np.testing.assert_allclose(
      np.asarray(got.kernels[k])[free], np.asarray(want[k])[free], rtol=1e-9, atol=tol
    )
    assert np.all(np.asarray(got.kernels[k])[~free] == 0)
    if bias:
      np.testing.assert_allclose(got.biases[k], want_b[k], rtol=1e-9, atol=tol)


# Random skeleton weights on purpose: WA must land on v + dv whatever B and F are (init
# warns for the deeper chains).
@ALLOW_CHAIN_RANGE
@pytest.mark.parametrize("widths", widths_cases(WIDTHS, fast=WIDTHS_IN_MAKE_TEST))
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_weight_allocation_lands_on_v_plus_dv(widths, inner):
  params, layers, loss, *_ = _mlp(widths, bias=True, seed=4)
  tx_inner = optax.sgd(0.03) if inner == "sgd" else optax.adam(0.01)
  tx = gsgd_jax.path_space(tx_inner, layers=layers, ratio_clip=None)
  grads = jax.jit(jax.grad(loss))(params)
  # The update and the path gradients below run op by op: a path gradient that is 0 in
  # exact arithmetic (a dead unit) may round differently in two compiled programs, and
  # Adam turns either rounding into a step of its own.
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)

  # dv as the inner transformation computes it from the path gradients.
  (struct,) = build_structure(params, layers)
  pg = basis.inverse_chain_rule(struct, *_arrays(params, layers), *_arrays(grads, layers))
  path_grads = {n: {"kernel": pg.kernels[k], "bias": pg.biases[k]} for k, (n,) in enumerate(layers)}
  values = _jit(gsgd_jax.basis_path_values, layers=layers)(params)
  steps, _ = jax.jit(tx_inner.update)(path_grads, tx_inner.init(path_grads), values)
  before, before_b = ref.basis_values(*_arrays(params, layers), widths)
  after, after_b = ref.basis_values(*_arrays(new, layers), widths)
  free = _free_masks(widths)
  for k, (name,) in enumerate(layers):
    target = before[k] + np.asarray(steps[name]["kernel"])
    tol = 1e-11 * (1 + _scale([before[k], target]))
    np.testing.assert_allclose(after[k][free[k]], target[free[k]], rtol=1e-9, atol=tol)
    np.testing.assert_allclose(
      after_b[k], before_b[k] + np.asarray(steps[name]["bias"]), rtol=1e-9, atol=tol
    )
    # Only weights outside F move.
    np.testing.assert_array_equal(
      np.asarray(new[name]["kernel"])[~free[k]], np.asarray(params[name]["kernel"])[~free[k]]
    )
    assert np.all(np.asarray(updates[name]["kernel"])[~free[k]] == 0)


def test_zero_weights_and_biases_move_exactly():
  """Zero weights own zero-valued paths; the additive WA moves them without 0/0."""
  widths = (4, 5, 3)
  params, layers, loss, *_ = _mlp(widths, bias=True)
  params = gsgd_jax.set_skeleton(params, layers)
  params["Dense_0"]["bias"] = jnp.zeros(5)
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[4, 2].set(0.0)
  tx = gsgd_jax.gsgd(0.01, layers=layers)
  grads = jax.grad(loss)(params)
  updates, state = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert int(state.clipped_ratios) == 0
  (struct,) = build_structure(params, layers)
  pg = basis.inverse_chain_rule(struct, *_arrays(params, layers), *_arrays(grads, layers))
  _before, before_b = ref.basis_values(*_arrays(params, layers), widths)
  after, after_b = ref.basis_values(*_arrays(new, layers), widths)
  np.testing.assert_allclose(
    after_b[0], before_b[0] - 0.01 * np.asarray(pg.biases[0]), rtol=1e-12, atol=1e-14
  )
  np.testing.assert_allclose(after[1][4, 2], -0.01 * np.asarray(pg.kernels[1])[4, 2], rtol=1e-12)
  assert np.asarray(pg.kernels[1])[4, 2] != 0


@ALLOW_CHAIN_RANGE  # skeleton weights at random: large ratios from ordinary steps
@pytest.mark.parametrize(
  "widths, seed, lr, ratio_clip",
  [
    ((3, 5, 5, 2), 0, 5.0, (0.9, 1.1)),
    ((3, 5, 5, 2), 11, 20.0, (0.1, 1e7)),
    ((3, 7, 2), 0, 5.0, (0.9, 1.1)),  # one hidden level (basis.one_hidden_level)
  ],
  ids=["narrow", "wide", "one-hidden-level"],
)
def test_ratio_guard_clips_counts_and_keeps_other_paths_exact(widths, seed, lr, ratio_clip):
  """The guard clips a skeleton ratio's magnitude and keeps its sign: a path asked to cross
  zero may (its skeleton weight changes sign, as SGD's would) but not land near it, nor
  leave the bounds; every other path lands on ``v + dv``."""
  params, layers, loss, *_ = _mlp(widths, bias=True, seed=seed)
  grads = jax.grad(loss)(params)
  tx = gsgd_jax.path_space(optax.sgd(lr), layers=layers, ratio_clip=ratio_clip)
  updates, state = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  (struct,) = build_structure(params, layers)
  pg = basis.inverse_chain_rule(struct, *_arrays(params, layers), *_arrays(grads, layers))
  before, _ = ref.basis_values(*_arrays(params, layers), widths)
  after, _ = ref.basis_values(*_arrays(new, layers), widths)
  _, outgoing = ref.skeleton_sets(widths)
  free = _free_masks(widths)
  missed = flipped = 0
  for k in range(len(layers)):
    target = before[k] - lr * np.asarray(pg.kernels[k])
    miss = free[k] & ~np.isclose(after[k], target, rtol=1e-9, atol=1e-12)
    for i, j in zip(*np.nonzero(free[k]), strict=True):
      ratio, asked = after[k][i, j] / before[k][i, j], target[i, j] / before[k][i, j]
      if miss[i, j]:
        assert (i, j) in outgoing[k], "only clipped skeleton paths may miss v + dv"
        assert abs(ratio) == pytest.approx(min(max(abs(asked), ratio_clip[0]), ratio_clip[1]))
        assert np.sign(ratio) == np.sign(asked)
        missed += 1
      elif (i, j) in outgoing[k] and asked < 0:
        flipped += 1  # crossed zero and landed on v + dv
  assert missed == int(state.clipped_ratios) > 0
  assert int(state.total_clipped_ratios) == missed
  if ratio_clip[1] > 1e6:
    assert flipped > 0


@pytest.mark.parametrize("dtype, n, p", [(jnp.float32, 5000, 0.7), (jnp.float16, 3001, 1.0)])
def test_clipped_count_is_exact(dtype, n, p):
  # The clipped ratios are counted by a float sum (transform._count), exact while every
  # partial sum is an integer the float type holds. Float16 holds every integer only up
  # to 2048 (not 3001): its flags are counted by an integer sum. They come as vectors (a
  # table of one quantity) and as the last quantity of wider tables, whose other
  # quantities, summed with them, may be anything.
  flags = jax.random.bernoulli(jax.random.key(0), p, (n,)).astype(dtype)
  table = jax.random.bernoulli(jax.random.key(1), p, (2, n // 2, 3)).astype(dtype)
  table = table.at[0, 0, 0].set(jnp.nan).at[1, 0, 1].set(jnp.inf)
  expected = int(np.sum(np.asarray(flags, np.int64)) + np.sum(np.asarray(table[..., -1], np.int64)))
  count = jax.jit(transform._count)([flags[:, None], table])
  assert count.dtype == jnp.int32 and int(count) == expected


@pytest.mark.parametrize("lr", [1e3, 1e12])
def test_huge_learning_rate_leaves_params_finite(lr):
  widths = (4, 6, 6, 3)
  params, layers, loss, *_ = _mlp(widths, bias=True)
  params = jax.tree.map(lambda x: x.astype(jnp.float32), gsgd_jax.set_skeleton(params, layers))
  tx = gsgd_jax.gsgd(lr, layers=layers)
  updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new))
  assert int(state.clipped_ratios) > 0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
  "where",
  # Dense_1's outgoing skeleton edge of node 1 (1 -> 1 % 2), and Dense_0's incoming
  # skeleton edge of node 1 (0 -> 1 would be pi(1) = 1 % 3 = 1: row 1, column 1), in F.
  [("Dense_1", (1, 1)), ("Dense_0", (1, 1))],
  ids=["outgoing-skeleton", "fixed"],
)
def test_a_non_finite_gradient_on_a_skeleton_edge_gives_a_non_finite_update(bad, where):
  """The ratio guard clips finite ratios only: a NaN or infinite gradient where it
  reaches a skeleton ratio must not become a finite update that silently skips
  the path (NaN -> 1) or takes the clip bound (inf)."""
  widths = (3, 4, 2)
  params, layers, loss, *_ = _mlp(widths, bias=False)
  params = gsgd_jax.set_skeleton(params, layers)
  grads = jax.grad(loss)(params)
  layer, index = where
  grads[layer]["kernel"] = grads[layer]["kernel"].at[index].set(bad)
  tx = gsgd_jax.gsgd(0.01, layers=layers)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert int(state.clipped_ratios) == 0  # not counted as clipped: not clipped
  # With the guard's bounds wide open the same holds: it was never the clip.
  tx = gsgd_jax.gsgd(0.01, layers=layers, ratio_clip=None)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("ratio_clip", [basis.DEFAULT_RATIO_CLIP, None], ids=["clip", "no_clip"])
@pytest.mark.parametrize("bad", [0.0, 1e-40, 1e-20], ids=["zero", "subnormal", "below_sqrt_tiny"])
def test_degenerate_skeleton_chain_under_jit_stays_finite(bad, ratio_clip):
  """A float32 skeleton weight that makes a back chain degenerate, in a traced update.

  ``init`` names zero and subnormal ones when run eagerly; under jit nothing
  can raise. The back chain of node 2 of level 1 is then below the square root
  of the smallest normal number: paths through it take no step (their path
  gradients are 0), every path still lands on ``v + dv``, with or without the
  ratio guard, and nothing is inf or NaN.
  """
  widths = (4, 5, 5, 3)
  params, layers, loss, *_ = _mlp(widths, bias=True, seed=4)
  params = gsgd_jax.set_skeleton(params, layers)
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  kernel = np.array(params["Dense_0"]["kernel"])
  kernel[2, 2] = bad  # pi(2) = 2; set in NumPy (XLA on CPU would flush 1e-40 to 0)
  params["Dense_0"]["kernel"] = kernel
  grads = jax.grad(loss)(params)
  lr = 0.01
  tx = gsgd_jax.path_space(optax.sgd(lr), layers=layers, ratio_clip=ratio_clip)
  updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  new = optax.apply_updates(params, updates)

  (struct,) = build_structure(params, layers)
  pg = basis.inverse_chain_rule(struct, *_arrays(params, layers), *_arrays(grads, layers))
  assert all(np.all(np.isfinite(g)) for g in pg.kernels)
  # Node 2 of level 1 heads every path of row 2 of layer 1, the outgoing skeleton one included.
  assert np.all(np.asarray(pg.kernels[1])[2] == 0)
  assert np.any(np.asarray(pg.kernels[1])[[0, 1, 3, 4]] != 0)
  to64 = lambda arrays: [None if a is None else np.asarray(a, np.float64) for a in arrays]
  before, _ = ref.basis_values(*map(to64, _arrays(params, layers)), widths)
  after, _ = ref.basis_values(*map(to64, _arrays(new, layers)), widths)
  free = _free_masks(widths)
  for k in range(len(layers)):
    target = before[k] - lr * np.asarray(pg.kernels[k], np.float64)
    np.testing.assert_allclose(
      after[k][free[k]], target[free[k]], rtol=1e-4, atol=1e-6 * _scale([before[k], target])
    )


def test_depth_50_float32_update_matches_float64():
  widths = (8,) * 50 + (3,)
  params, layers, loss, *_ = _mlp(widths, bias=True, seed=7)
  params = gsgd_jax.set_skeleton(params, layers)
  grads = jax.jit(jax.grad(loss))(params)
  # A 50-layer chain's gradients span many orders of magnitude; a step of 1e-3 of
  # the largest keeps every skeleton ratio far from the guard.
  lr = 1e-3 / max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  tx = gsgd_jax.gsgd(lr, layers=layers)
  want, state = tx.update(grads, tx.init(params), params)
  assert int(state.clipped_ratios) == 0
  to32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  got, state = jax.jit(tx.update)(to32(grads), tx.init(to32(params)), to32(params))
  assert int(state.clipped_ratios) == 0
  chex.assert_trees_all_equal_structs(got, want)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(got))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))) + 1e-30
    ),
    got,
    want,
  )


# ----------------------------------------------------------------------------
# Per-node vectors take three forms: a two-layer chain without a normalization after it
# computes those of its one hidden level directly (basis.one_hidden_level), other chains
# of at most basis.LISTED_LEVELS layers hold them as lists of levels, deeper ones as padded
# tables. The forms compute the same update.


def _two_layer_problem(name):
  if name == "llama_stacked_pairs_transposed":
    from benchmarks import transformer_speed as ts

    c = ts.Config(depth=2, dim=16, hidden=24, heads=2, vocab=8, seq=4, batch=2, model="llama")
    params, tokens = ts.problem(c)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    return params, c.blocks, lambda p: ts.loss_fn(p, tokens, c.heads)
  if name == "resnet_normalized":
    from problems import ResNetBN, linen_norm, resnet_bn_blocks

    resnet = ResNetBN(3, (3, 4))
    norm = linen_norm(resnet, resnet_bn_blocks(resnet), (4, 6, 6, 2))
    return norm.params, norm.layers, norm.loss
  params, layers, loss, *_ = _mlp((5, 7, 3), seed=3)
  return params, layers, loss


# The stacked LLaMA chain (pairs, a transposed layer) is the hardest of the three: it runs
# in `make test`, the other two in `make test-all`.
@pytest.mark.parametrize(
  "name",
  [
    pytest.param("mlp", marks=pytest.mark.slow),
    "llama_stacked_pairs_transposed",
    pytest.param("resnet_normalized", marks=pytest.mark.slow),
  ],
)
def test_the_per_node_forms_of_two_layer_chains_agree(name, monkeypatch):
  params, layers, loss = _two_layer_problem(name)
  # Which forms the update's per-node work took.
  forms = set()
  for form, function in [
    ("one hidden level", "hidden_level_quotients"),
    ("levels", "_level_factors"),
    ("written out", "_written_out"),
  ]:
    original = getattr(basis, function)
    recorded = functools.partial(lambda f, form, *a: forms.add(form) or f(*a), original, form)
    monkeypatch.setattr(basis, function, recorded)

  def run():
    tx = gsgd_jax.path_space(optax.adam(0.02), layers=layers)
    state, p = tx.init(params), params
    forms.clear()
    step = jax.jit(tx.update)
    for _ in range(3):
      updates, state = step(jax.grad(loss)(p), state, p)
      p = optax.apply_updates(p, updates)
    return p, state, set(forms)

  assert all(s.depth <= basis.LISTED_LEVELS for s in build_structure(params, layers))
  normalized = name == "resnet_normalized"
  *default, used = run()
  assert used == ({"levels", "written out"} if normalized else {"one hidden level"})
  monkeypatch.setattr(basis, "one_hidden_level", lambda _struct: False)
  *listed, used = run()
  assert used == {"levels", "written out"}
  monkeypatch.setattr(basis, "LISTED_LEVELS", 0)
  *tabled, used = run()
  assert used == {"levels"}
  chex.assert_trees_all_close(default, listed, rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(listed, tabled, rtol=1e-12, atol=1e-14)
  # Three steps moved the params: the comparison is not of two starts.
  assert float(optax.tree.norm(optax.tree.sub(listed[0], params))) > 1e-3


def test_one_hidden_level_traces_fewer_primitives_than_the_levels(monkeypatch):
  # What the one-hidden-level form is for: tracing and lowering the update's primitives is
  # part of compiling a train step (benchmarks/RESULTS.md, speed of the LLaMA-style decoder).
  params, layers, loss = _two_layer_problem("llama_stacked_pairs_transposed")
  tx = gsgd_jax.path_space(optax.adam(0.02), layers=layers)
  state, grads = tx.init(params), jax.grad(loss)(params)

  def traced():
    jax.clear_caches()  # make_jaxpr caches its traces
    program = jax.make_jaxpr(tx.update)(grads, state, params)
    return sum(1 for _ in equations(program.jaxpr))

  hidden_level = traced()
  monkeypatch.setattr(basis, "one_hidden_level", lambda _struct: False)
  levels = traced()
  assert hidden_level <= 0.8 * levels, (hidden_level, levels)


def test_the_blocks_divide_together_in_fewer_programs(monkeypatch):
  # What basis.divide_together is for: XLA:CPU compiles every division that passes over
  # kernels read as a program of its own, at about the same cost each (benchmarks/
  # RESULTS.md, speed of the LLaMA-style decoder). Programs are counted, not timed: their
  # number does not vary between runs.
  from benchmarks import transformer_speed as ts

  c = ts.Config(depth=2, dim=32, hidden=64, heads=2, seq=8, batch=2, model="llama")
  params, tokens = ts.problem(c)
  tx = ts.optimizer("path_space(AdamW)", c)

  def kernels():
    # As users compile it: XLA's default emitters, LLVM's optimisation (see conftest.py).
    options = {**USER_PIPELINE, "xla_backend_optimization_level": 3}
    return ts.step_llvm_ir(tx, params, tokens, c.heads, options)[0]

  together = basis.divide_together
  requests = []

  def recording(batch):
    requests.append(len(batch))
    return together(batch)

  def apart(batch):
    divided = [together([request]) for request in batch]
    return [c for columns, _ in divided for c in columns], [t for _, ts in divided for t in ts]

  monkeypatch.setattr(basis, "divide_together", recording)
  joined = kernels()
  assert requests == [len(c.blocks)] * 2  # one division for the ICR, one for the WA
  monkeypatch.setattr(basis, "divide_together", apart)
  # Two divisions fewer per block after the first.
  assert 0 < joined <= kernels() - 2 * (len(c.blocks) - 1)
