"""Sharded params (8 fake CPU devices, set in conftest) under Auto and Explicit meshes."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from problems import make_optimizer, mlp

import gsgd_jax
from gsgd_jax.probes import PROBE

# Hidden widths that the 8 devices divide.
WIDTHS = (6, 16, 16, 3)
# Sharded along hidden units: columns into a hidden level, rows out of it.
SPECS = {
  "Dense_0": {"kernel": P(None, "x"), "bias": P("x")},
  "Dense_1": {"kernel": P("x", None), "bias": P("x")},
  "Dense_2": {"kernel": P("x", None), "bias": P()},
}
# Optimizers of the table (problems.OPTIMIZERS): momentum, Adam and Path-SGD states.
SHARDED = ["g_momentum", "g_adam", "path_sgd"]


def _sharding_aware_loss(layers, x, y):
  """The MLP's mean squared error; under an Explicit mesh a contraction over sharded hidden
  units needs an output sharding."""

  def loss(p):
    h = x
    explicit = bool(jax.sharding.get_abstract_mesh().explicit_axes)
    for k, (name,) in enumerate(layers):
      h = jnp.matmul(h, p[name]["kernel"], out_sharding=P() if explicit else None)
      h = h + p[name]["bias"]
      if k < len(layers) - 1:
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  return loss


def _assert_sharded_as(tree, specs, mesh):
  """Every leaf of ``tree`` is sharded as its PartitionSpec in ``specs`` (same structure) says."""

  def check(a, spec):
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (a.sharding, spec)

  jax.tree.map(check, tree, specs)


def _assert_same_shardings(before, after):
  """Leaf by leaf, ``after`` keeps the shapes, dtypes and shardings of ``before``."""
  chex.assert_trees_all_equal_shapes_and_dtypes(before, after)

  def check(b, a):
    assert b.sharding.is_equivalent_to(a.sharding, b.ndim), (b.sharding, a.sharding)

  jax.tree.map(check, before, after)


def _train(tx, params, loss, out_shardings=None, steps=5):
  # init compiled, as the steps are. Run eagerly, its per-level scans dispatch one small
  # sharded program after another over the 8 fake CPU devices, and about one run of this
  # file in eight (two xdist workers on two cores) aborted inside XLA:CPU in one of them,
  # after a stall of some 40 s, on this code and on the code before it alike; compiled,
  # twenty runs in a row passed. The library code is the same either way.
  state = jax.jit(tx.init)(params)
  init_state = state

  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  step = jax.jit(step, out_shardings=out_shardings(state) if out_shardings else None)
  for _ in range(steps):
    params, state = step(params, state)
  return params, init_state, state


def _train_sharded(tx, params, specs, loss, axis_type, steps=5):
  """``_train`` on ``params`` placed as ``specs`` says on an 8-device mesh of ``axis_type``;
  returns ``(params, init_state, state, mesh)``."""
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    param_shardings = jax.tree.map(lambda a: a.sharding, sharded)
    # Auto: XLA picks output shardings unless told; pin the state to init's layout.
    pin = (
      None
      if axis_type == AxisType.Explicit
      else (lambda state: (param_shardings, jax.tree.map(lambda a: a.sharding, state)))
    )
    return (*_train(tx, sharded, loss, out_shardings=pin, steps=steps), mesh)


@pytest.mark.parametrize("name", SHARDED)
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_training_matches_single_device(name, axis_type):
  params, layers, _, _, x, y, *_ = mlp(WIDTHS, skeleton=True)
  loss = _sharding_aware_loss(layers, x, y)
  tx = make_optimizer(name, layers)
  want, _, want_state = _train(tx, params, loss)
  got, init_state, state, mesh = _train_sharded(tx, params, SPECS, loss, axis_type)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(state, want_state, rtol=1e-12, atol=1e-14)
  _assert_same_shardings(init_state, state)
  # The params keep their sharding along hidden units.
  _assert_sharded_as(got, SPECS, mesh)


# A chain deeper than basis.UNROLLED_LEVELS (its recurrences run as loops and its levels are
# read by gathers), hidden units sharded into and out of every hidden level.
DEEP_WIDTHS = (6, *(16,) * 11, 3)


def _deep_specs():
  last = len(DEEP_WIDTHS) - 2
  specs = {}
  for k in range(last + 1):
    into_hidden = k < last and k % 2 == 0  # columns into a hidden level, else rows out of one
    specs[f"Dense_{k}"] = {
      "kernel": P(None, "x") if into_hidden else P("x", None),
      "bias": P("x") if into_hidden else P(),
    }
  return specs


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_deep_chain_matches_single_device(axis_type):
  params, layers, _, _, x, y, *_ = mlp(DEEP_WIDTHS, skeleton=True, kernel_scale=0.5)
  loss = _sharding_aware_loss(layers, x, y)
  tx = make_optimizer("g_momentum", layers)
  want, _, _ = _train(tx, params, loss)
  mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    specs = _deep_specs()
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    got, _, _ = _train(tx, sharded, loss)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
  if axis_type == AxisType.Explicit:  # (Auto lets XLA choose the outputs' shardings)
    _assert_sharded_as(got, specs, mesh)


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
  specs = {n: {k: CONV_SPECS[n][k] for k in layer} for n, layer in params.items()}
  got, _, _, mesh = _train_sharded(tx, params, specs, loss, axis_type, steps=3)
  chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)
  _assert_sharded_as(got, specs, mesh)


# A dense net with batch normalization: fc0 -> BN0 -> ReLU -> fc1 -> BN1 -> ReLU -> head, its
# hidden units and the norms' channels sharded.
BN_SPECS = {
  "fc0": {"kernel": P(None, "x")},
  "bn0": {"scale": P("x"), "bias": P("x")},
  "fc1": {"kernel": P("x", None)},
  "bn1": {"scale": P(), "bias": P()},
  "head": {"kernel": P(), "bias": P()},
}
BN_BLOCKS = [
  gsgd_jax.Block(["fc0"], normalized=True),
  gsgd_jax.Block(["bn0", "fc1"], normalized=True),
  gsgd_jax.Block(["bn1", "head"]),
]


def _bn_problem():
  ks = jax.random.split(jax.random.key(0), 4)
  params = {
    "fc0": {"kernel": jax.random.normal(ks[0], (6, 16)) / 3},
    "bn0": {"scale": 1 + 0.1 * jax.random.normal(ks[1], (16,)), "bias": jnp.full(16, 0.1)},
    "fc1": {"kernel": jax.random.normal(ks[2], (16, 8)) / 4},
    "bn1": {"scale": jnp.ones(8), "bias": jnp.full(8, -0.1)},
    "head": {"kernel": jax.random.normal(ks[3], (8, 3)) / 3, "bias": jnp.zeros(3)},
  }
  x = jax.random.normal(jax.random.key(1), (12, 6))
  y = jax.random.normal(jax.random.key(2), (12, 3))

  def norm(h, layer):  # training mode: the batch's statistics
    h = (h - h.mean(axis=0)) / jnp.sqrt(h.var(axis=0) + 1e-14)
    return h * layer["scale"] + layer["bias"]

  def loss(p):
    out = P() if jax.sharding.get_abstract_mesh().explicit_axes else None
    h = jax.nn.relu(norm(x @ p["fc0"]["kernel"], p["bn0"]))
    h = jax.nn.relu(norm(jnp.matmul(h, p["fc1"]["kernel"], out_sharding=out), p["bn1"]))
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"] - y) ** 2)

  return gsgd_jax.set_skeleton(params, BN_BLOCKS), loss


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_normalized_blocks_match_single_device(axis_type):
  """Affine layers and normalized blocks (N^2, renormalization) sharded along channels."""
  params, loss = _bn_problem()
  tx = gsgd_jax.gsgd(0.1, layers=BN_BLOCKS, momentum=0.9)
  want, _, want_state = _train(tx, params, loss, steps=3)
  got, init_state, state, mesh = _train_sharded(tx, params, BN_SPECS, loss, axis_type, steps=3)
  chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)
  chex.assert_trees_all_close(state, want_state, rtol=1e-10, atol=1e-12)
  _assert_same_shardings(init_state, state)
  _assert_sharded_as(got, BN_SPECS, mesh)


def test_explicit_sharded_params_outside_a_mesh_context():
  """init and a jitted update read Explicit shardings from the arrays, as optax does,
  whether or not a mesh context is set."""
  mesh = jax.make_mesh((8,), ("x",))  # Explicit axes by default
  key = jax.random.split(jax.random.key(0), 3)
  params = {
    "l0": {"kernel": jax.random.normal(key[0], (4, 16)), "bias": jnp.zeros(16)},
    "l1": {"kernel": jax.random.normal(key[1], (16, 16)), "bias": jnp.zeros(16)},
    "l2": {"kernel": jax.random.normal(key[2], (16, 3))},
  }
  layers = ["l0", "l1", "l2"]
  params = gsgd_jax.set_skeleton(params, layers)
  specs = {
    "l0": {"kernel": P(None, "x"), "bias": P("x")},
    "l1": {"kernel": P("x", None), "bias": P()},
    "l2": {"kernel": P("x", None)},
  }
  sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
  x = jax.random.normal(jax.random.key(1), (8, 4))

  def loss(p):
    # Contractions over sharded hidden units name their output sharding (Explicit axes).
    explicit = any(jax.typeof(leaf).sharding.mesh.explicit_axes for leaf in jax.tree.leaves(p))
    matmul = lambda a, b: jnp.matmul(
      a, b, out_sharding=NamedSharding(mesh, P()) if explicit else None
    )
    h = jax.nn.relu(matmul(x, p["l0"]["kernel"]) + p["l0"]["bias"])
    h = jax.nn.relu(matmul(h, p["l1"]["kernel"]) + p["l1"]["bias"])
    return jnp.sum(matmul(h, p["l2"]["kernel"]) ** 2)

  tx = gsgd_jax.g_adam(1e-2, layers=layers)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  want, _ = step(params, tx.init(params))
  got, _ = step(sharded, tx.init(sharded))  # no jax.set_mesh anywhere
  chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-12)
  for a, s in zip(
    jax.tree.leaves(got), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)), strict=True
  ):
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, s), a.ndim)


# A stacked block (8 copies of a two-layer chain on axis 0, each on its own inputs), sharded
# along the stack axis or along its hidden units.
STACK_COPIES, STACK_HIDDEN = 8, 16
STACK_SPECS = {
  "stack": {
    "fc1": {"kernel": P("x"), "bias": P("x")},
    "fc2": {"kernel": P("x"), "bias": P("x")},
  },
  "hidden": {
    "fc1": {"kernel": P(None, None, "x"), "bias": P(None, "x")},
    "fc2": {"kernel": P(None, "x", None), "bias": P()},
  },
}


def _stacked_problem():
  keys = iter(jax.random.split(jax.random.key(4), 6))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float64)
  params = {
    "fc1": {
      "kernel": normal(STACK_COPIES, 3, STACK_HIDDEN),
      "bias": normal(STACK_COPIES, STACK_HIDDEN),
    },
    "fc2": {"kernel": normal(STACK_COPIES, STACK_HIDDEN, 2), "bias": normal(STACK_COPIES, 2)},
  }
  layers = [gsgd_jax.Block(["fc1", "fc2"], stack_axis=0)]
  x, y = normal(STACK_COPIES, 5, 3), normal(STACK_COPIES, 5, 2)

  def loss(p):
    explicit = bool(jax.sharding.get_abstract_mesh().explicit_axes)
    out = P() if explicit else None
    h = jax.nn.relu(jnp.einsum("sbi,sih->sbh", x, p["fc1"]["kernel"]) + p["fc1"]["bias"][:, None])
    h = jnp.einsum("sbh,sho->sbo", h, p["fc2"]["kernel"], out_sharding=out)
    return jnp.mean((h + p["fc2"]["bias"][:, None] - y) ** 2)

  return gsgd_jax.set_skeleton(params, layers), layers, loss


@pytest.mark.parametrize(
  "along, axis_type",
  [("stack", AxisType.Explicit), ("hidden", AxisType.Explicit), ("stack", AxisType.Auto)],
  ids=["stack-explicit", "hidden-explicit", "stack-auto"],
)
def test_sharded_stack_matches_single_device(along, axis_type):
  params, layers, loss = _stacked_problem()
  tx = gsgd_jax.g_adam(1e-2, layers=layers)
  want, _, want_state = _train(tx, params, loss, steps=3)
  specs = STACK_SPECS[along]
  got, init_state, state, mesh = _train_sharded(tx, params, specs, loss, axis_type, steps=3)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(state, want_state, rtol=1e-12, atol=1e-14)
  _assert_same_shardings(init_state, state)
  _assert_sharded_as(got, specs, mesh)


# ----------------------------------------------------------------------------
# Multi-axis kernels sharded by heads: an attention's value/output chain and a query-key chain
# with RoPE's pairs (the per-node sums fold entries of a sharded axis).


def _attention_problem():
  keys = iter(jax.random.split(jax.random.key(6), 8))
  normal = lambda *shape: jax.random.normal(next(keys), shape, jnp.float64)
  d, heads, head_dim = 4, 8, 4
  params = {
    "value": {"kernel": normal(d, heads, head_dim), "bias": normal(heads, head_dim)},
    "out": {"kernel": normal(heads, head_dim, d), "bias": normal(d)},
    "query": {"kernel": normal(d, heads, head_dim)},
    "key": {"kernel": normal(d, heads, head_dim)},
  }
  Layer = gsgd_jax.Layer
  layers = [
    gsgd_jax.Block([Layer("value", input_axes=1), Layer("out", input_axes=2)]),
    gsgd_jax.Block([
      Layer("query", input_axes=1, pairs="half"),
      Layer("key", input_axes=1, transposed=True, pairs="half"),
    ]),
  ]  # fmt: skip
  x, y = normal(5, d), normal(5, d)

  def loss(p):
    explicit = bool(jax.sharding.get_abstract_mesh().explicit_axes)
    out = P() if explicit else None
    h = jnp.einsum("bd,dhe->bhe", x, p["value"]["kernel"]) + p["value"]["bias"]
    values = jnp.einsum("bhe,hed->bd", h, p["out"]["kernel"], out_sharding=out) + p["out"]["bias"]
    q = jnp.einsum("bd,dhe->bhe", x, p["query"]["kernel"])
    mixed = jnp.einsum("bhe,dhe->bd", q, p["key"]["kernel"], out_sharding=out)
    return jnp.mean((values - y) ** 2) + jnp.mean(jnp.tanh(mixed) ** 2)

  specs = {
    "value": {"kernel": P(None, "x", None), "bias": P("x", None)},
    "out": {"kernel": P("x", None, None), "bias": P()},
    "query": {"kernel": P(None, "x", None)},
    "key": {"kernel": P(None, "x", None)},
  }
  return gsgd_jax.set_skeleton(params, layers), layers, loss, specs


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_sharded_multi_axis_kernels_match_single_device(axis_type):
  params, layers, loss, specs = _attention_problem()
  tx = gsgd_jax.g_adam(1e-2, layers=layers)
  want, _, want_state = _train(tx, params, loss, steps=3)
  got, init_state, state, mesh = _train_sharded(tx, params, specs, loss, axis_type, steps=3)
  chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-14)
  chex.assert_trees_all_close(state, want_state, rtol=1e-12, atol=1e-14)
  _assert_same_shardings(init_state, state)
  _assert_sharded_as(got, specs, mesh)
