"""Deep chains: the compiled update grows linearly with depth (no per-node recurrence is
recomputed by every level), and a 100-layer chain keeps the mathematics and the invariance."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import USER_PIPELINE, equations, train_scan
from problems import mlp
from test_properties import CHECKS, NetSpec, build

import gsgd_jax
from benchmarks import compile_profile, depth, speed
from gsgd_jax._src.structure import build_structure

DEEP = 100
# Hidden widths cycling through equal, expanding and narrowing levels, so that every
# kind of skeleton map (identity, wrap-around, fixed outgoing edges) recurs along the chain.
DEEP_WIDTHS = (3, *((4, 4, 6, 3, 5) * (DEEP // 5))[: DEEP - 1], 2)
# For training: with skeleton weights 1 every narrowing level sums two skeleton paths per
# node, so the widths change only near the ends and the chain's outputs stay O(1).
TRAIN_WIDTHS = (3, 5, 4, *(4,) * (DEEP - 6), 6, 3, 2)

UPDATES = {
  "gsgd": lambda layers: gsgd_jax.gsgd(1e-3, layers=layers),
  "g_adam": lambda layers: gsgd_jax.g_adam(1e-3, layers=layers),
  "path_sgd": lambda layers: gsgd_jax.path_sgd(1e-3, layers=layers),
}


def _chain(kind, depth):
  """Params and layers of one width-8 chain of ``depth`` layers: an MLP, convolutions
  then flatten and two dense layers, or an MLP with a scale probe on every hidden layer."""
  key = jax.random.key(0)
  if kind == "mlp":
    return mlp((8,) * (depth + 1), dtype=jnp.float32, skeleton=True)[:2]
  if kind == "conv_flatten":
    return speed.cnn_params(key, 4, 3, depth - 2, 8, 10, 8)
  assert kind == "mlp_probes", kind
  params, layers = speed.mlp_params(key, 8, (8,) * (depth - 1), 8)
  return speed.with_probes(params, layers), layers


def _compiled_size(name, kind, depth):
  """Lines of the optimized HLO of one jitted update of a ``kind`` chain of ``depth`` layers."""
  params, layers = _chain(kind, depth)
  tx = UPDATES[name](layers)
  update = jax.jit(tx.update, compiler_options=USER_PIPELINE)
  compiled = update.lower(params, tx.init(params), params).compile()
  return compiled.as_text().count("\n")


@pytest.mark.parametrize(
  "name, kind",
  [(name, "mlp") for name in sorted(UPDATES)]
  + [("gsgd", "conv_flatten"), ("path_sgd", "conv_flatten"), ("gsgd", "mlp_probes")],
)
def test_compiled_update_grows_linearly_with_depth(name, kind):
  # Per-node vectors written level by level let XLA fuse the whole recurrence up to
  # each level into that level's kernel pass: the program then grows with the square
  # of depth and each doubling of depth adds about twice as much as the one before
  # (1.66 times for G-SGD on the convolutional chain, before the recurrences became
  # scans). All three deeper than basis.UNROLLED_LEVELS: one way of compiling.
  small, medium, large = (_compiled_size(name, kind, depth) for depth in (10, 20, 40))
  per_layer_before, per_layer_after = (medium - small) / 10, (large - medium) / 20
  assert per_layer_after <= 1.2 * per_layer_before, (small, medium, large)


@pytest.mark.parametrize("name", ["gsgd", "g_adam"])  # path_sgd has no recurrence
def test_deep_chain_recurrences_stay_scans_in_the_traced_update(name):
  # The update traces jax.numpy's functions with jit disabled (basis.inlined), under
  # which a lax.scan would run as a Python loop: the recurrences along a deep chain
  # must still be traced as scans, each compiled once, for the program to stay linear
  # in depth (the test above measures the compiled size; this names the cause).
  params, layers = _chain("mlp", 20)
  tx = UPDATES[name](layers)
  traced = jax.make_jaxpr(tx.update)(params, tx.init(params), params)
  assert "scan" in {eqn.primitive.name for eqn in equations(traced.jaxpr)}
  # The same update called eagerly (nothing traced) takes no such path.
  updates, _ = tx.update(params, tx.init(params), params)
  jitted, _ = jax.jit(tx.update)(params, tx.init(params), params)
  chex.assert_trees_all_close(updates, jitted, rtol=1e-5, atol=1e-6)


def test_tracing_inline_keeps_a_users_disable_jit(monkeypatch):
  # basis.inlined disables jit only while the update is traced, and basis.scan turns it
  # back on only where inlined turned it off: a user's own jax.disable_jit (debugging)
  # stays in force, scans included.
  jit_disabled_at_scans = []
  real_scan = jax.lax.scan

  def recording_scan(*args, **kwargs):
    jit_disabled_at_scans.append(jax.config.jax_disable_jit)
    return real_scan(*args, **kwargs)

  params, layers = _chain("mlp", 20)
  tx = UPDATES["gsgd"](layers)
  state = tx.init(params)
  monkeypatch.setattr(jax.lax, "scan", recording_scan)
  jax.make_jaxpr(tx.update)(params, state, params)
  assert jit_disabled_at_scans and not any(jit_disabled_at_scans)
  jit_disabled_at_scans.clear()
  with jax.disable_jit():
    tx.update(params, state, params)
    jax.vmap(tx.update, in_axes=(0, None, None))(  # traced (batched), with jit disabled
      jax.tree.map(lambda x: x[None], params), state, params
    )
  assert jit_disabled_at_scans and all(jit_disabled_at_scans)


def _train_step_fusions_per_layer(tx_of_layers):
  """Fused computations the compiled train step of a width-8 chain adds per layer
  (depth 20 to 40), as XLA compiles it for users."""

  def count(depth):
    params, layers, loss, *_ = mlp((8,) * (depth + 1), dtype=jnp.float32, skeleton=True)
    tx = tx_of_layers(layers)

    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    lowered = jax.jit(step, compiler_options=USER_PIPELINE).lower(params, tx.init(params))
    return compile_profile.entry_fusions(lowered.compile())

  return (count(40) - count(20)) / 20


@pytest.mark.parametrize(
  "name, base",
  [("gsgd", lambda _: optax.sgd(1e-3)), ("g_adam", lambda _: optax.adam(1e-3))],
)
def test_train_step_adds_few_fused_passes_per_layer(name, base):
  # Compile time per layer follows the passes XLA compiles for each layer. Over its
  # inner optimizer's, G-SGD's step adds per layer the gathers of the skeleton weights,
  # the node sum, one gather of the per-node vectors for each of the ICR's and WA's
  # passes and the bias passes: 5 (SGD) and 4 (Adam) here. Reading each per-node
  # vector by a gather of its own, and the outgoing-edge terms of layers whose
  # outgoing skeleton edges are all in F, added 10 (the code before this test).
  added = _train_step_fusions_per_layer(UPDATES[name]) - _train_step_fusions_per_layer(base)
  assert added <= 6, added


def _deep_spec(seed):
  return NetSpec(
    image=None,
    in_width=DEEP_WIDTHS[0],
    ops=tuple(("dense", n) for n in DEEP_WIDTHS[1:]),
    bias=tuple(k % 3 != 1 for k in range(DEEP)),
    signs=("mixed",) * DEEP,
    weights="bounded",
    skeleton=1.0,
    seed=seed,
  )


@pytest.mark.slow
def test_icr_equals_autodiff_on_a_100_layer_chain():
  CHECKS["test_icr_equals_autodiff"](build(_deep_spec(seed=11)))


@pytest.mark.slow
def test_weight_allocation_lands_on_v_plus_dv_on_a_100_layer_chain():
  CHECKS["test_weight_allocation_lands_on_v_plus_dv"](build(_deep_spec(seed=12)))


@pytest.mark.parametrize(
  "name, make",
  [
    ("gsgd", lambda layers: gsgd_jax.gsgd(1e-3, layers=layers)),
    ("g_adam", lambda layers: gsgd_jax.g_adam(1e-4, layers=layers)),
    ("sgd", lambda _layers: optax.sgd(1e-3)),
  ],
)
@pytest.mark.slow
def test_100_layer_training_is_invariant_and_sgd_is_not(name, make):
  """G-SGD and G-Adam train the same function from a randomly rescaled start of a
  100-layer chain; plain SGD does not."""
  params, layers, loss, forward, x, *_ = mlp(TRAIN_WIDTHS, skeleton=True, kernel_scale=0.1)
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(3))
  outputs = lambda p: forward(p, x)
  start = outputs(params)
  assert 0.1 < float(jnp.std(start)) < 10  # the chain neither explodes nor dies
  np.testing.assert_allclose(outputs(rescaled), start, rtol=1e-10, atol=1e-12)
  tx = make(layers)

  def run(p):
    (_, state), trace = train_scan(tx, p, loss, 10, outputs)
    return trace, getattr(state, "total_clipped_ratios", 0)

  # lax.map runs both starts through one compiled loop.
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, rescaled)
  (out_a, out_b), clipped = jax.lax.map(run, stacked)
  assert float(jnp.max(jnp.abs(out_a[-1] - start))) > 1e-3  # training moved the function,
  assert float(jnp.max(jnp.std(out_a[-1], axis=0))) > 0.1  # which still depends on its inputs
  if name == "sgd":
    assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-2
  else:
    assert np.all(np.asarray(clipped) == 0)
    np.testing.assert_allclose(out_b, out_a, rtol=1e-9, atol=1e-10)


def test_depth_benchmark_writes_ratios_and_slopes(tmp_path):
  args = "--depths 2,3 --widths 4 --cnn-depths= --rounds 1 --compiles 1 --min-seconds 0 --out"
  depth.main([*args.split(), str(tmp_path)])
  results = json.loads((tmp_path / "depth.json").read_text())
  assert [(r["model"], r["depth"]) for r in results["rows"]] == [("mlp", 2), ("mlp", 3)]
  for row in results["rows"]:
    for name in depth.BASELINE:
      assert np.isfinite(row["step_ratio"][name]) and row["compile_ratio"][name] > 0
  (summary,) = results["summary"]
  assert set(summary["compile_slope"]) == set(depth.OPTIMIZERS)
  assert "log-log slope" in (tmp_path / "depth.md").read_text()


@pytest.mark.slow
def test_compile_profile_reads_the_compiler_phases(tmp_path):
  args = "--optimizers SGD,G-SGD --depths 2,4 --width 4 --repeats 1 --out"
  compile_profile.main([*args.split(), str(tmp_path)])
  results = json.loads((tmp_path / "compile_profile.json").read_text())
  rows = {(r["optimizer"], r["depth"]): r for r in results["rows"]}
  assert set(rows) == {("SGD", 2), ("SGD", 4), ("G-SGD", 2), ("G-SGD", 4)}
  for row in rows.values():  # the trace holds XLA:CPU's phases, each within the whole
    for phase in ("hlo_passes_ms", "backend_ms"):
      assert 0 < row[phase] < row["compile_ms"], row
  for name in ("SGD", "G-SGD"):
    assert rows[name, 4]["hlo_instructions"] > rows[name, 2]["hlo_instructions"]
  assert rows["G-SGD", 4]["hlo_instructions"] > rows["SGD", 4]["hlo_instructions"]
  assert set(results["per_layer"]) == {"SGD", "G-SGD"}
  # With the fusion emitters users get, the backend compiles each distinct fused
  # computation once: a chain's equal layers share theirs (see RESULTS.md, depth).
  lowered, _ = depth.lower_train_step(depth.model("mlp", 12, 4), "G-SGD")
  row = compile_profile.profile(lowered, USER_PIPELINE)
  assert 0 < row["kernels"] < row["fusions"] / 2, row


def test_depth_benchmark_cnn_is_one_chain_of_convolutions():
  params, layers, forward, x, y = depth.model("cnn", 4, 5)
  (block,) = build_structure(params, layers)
  assert [spec.kind for spec in block.layers] == ["conv"] * 3 + ["dense"]
  assert forward(params, layers, x).shape == (len(y), 10)
