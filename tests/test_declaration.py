"""What `layers` may say, and the declarations that are refused with a message naming the layer.

Each refusal here used to train silently wrong (a masked-out bias, a stacked kernel read
as a convolution, a list of one-layer blocks) or fail with an unrelated error.
"""

import importlib.metadata
import itertools
import subprocess
import sys
import tomllib
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gsgd_jax


def _mlp(key=0, widths=(3, 5, 4, 2), bias=True):
  """Params of a chain ``l0 -> l1 -> ...`` with skeleton weights 1."""
  keys = jax.random.split(jax.random.key(key), len(widths))
  params = {}
  for k, (a, b) in enumerate(itertools.pairwise(widths)):
    params[f"l{k}"] = {"kernel": jax.random.normal(keys[k], (a, b)) / np.sqrt(a)}
    if bias:
      params[f"l{k}"]["bias"] = 0.1 * jax.random.normal(keys[-1], (b,))
  layers = [f"l{k}" for k in range(len(widths) - 1)]
  return gsgd_jax.set_skeleton(params, layers), layers


def _step(tx, params):
  grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
  return tx.update(grads, tx.init(params), params)[0]


def test_import_under_python_OO_and_without_installed_metadata():
  """-OO strips docstrings; the package must not build its own from them. A source
  tree that was never pip-installed (vendored, on PYTHONPATH) has no distribution
  metadata: the version then comes from its pyproject.toml."""
  code = (
    "import importlib.metadata as m\n"
    "installed = m.version\n"
    "def version(name):\n"
    "  if name == 'gsgd_jax':\n"
    "    raise m.PackageNotFoundError(name)\n"
    "  return installed(name)\n"
    "m.version = version\n"
    "import gsgd_jax; print(gsgd_jax.g_adam.__doc__, gsgd_jax.__version__)"
  )
  out = subprocess.run(
    [sys.executable, "-OO", "-c", code], capture_output=True, text=True, check=False
  )
  assert out.returncode == 0, out.stderr
  pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
  assert out.stdout.split() == ["None", pyproject["project"]["version"]]


def test_version_of_a_vendored_copy_without_pyproject(tmp_path, monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "version", not_installed)
  assert gsgd_jax._version(tmp_path) == "0+unknown"
  (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\nversion = "9.9"\n')
  assert gsgd_jax._version(tmp_path) == "0+unknown"  # another project's version is not ours


def test_layers_are_read_once():
  params, layers = _mlp()
  want = _step(gsgd_jax.gsgd(0.1, layers=layers), params)
  # A generator is consumed when the transformation is built, not at each call.
  got = _step(gsgd_jax.gsgd(0.1, layers=(name for name in layers)), params)
  chex.assert_trees_all_close(got, want, rtol=1e-12)
  # Changing the list afterwards changes nothing.
  mutable = list(layers)
  tx = gsgd_jax.gsgd(0.1, layers=mutable)
  mutable.reverse()
  chex.assert_trees_all_close(_step(tx, params), want, rtol=1e-12)


@pytest.mark.parametrize(
  "spelling",
  [
    [("l0",), ("l1",), ("l2",)],
    ("l0", "l1", "l2"),
    [["l0", "l1", "l2"]],  # one block written as a list
    [(("l0",), ("l1",), ("l2",))],  # one block written as a tuple of paths
    [[("l0",), ("l1",), ("l2",)]],
    [[["l0"], ["l1"], ["l2"]]],  # paths written as lists inside a block
  ],
  ids=["tuples", "tuple-of-strings", "block-list", "block-tuple", "block-of-tuples", "list-paths"],
)
def test_unambiguous_spellings_of_one_chain_agree(spelling):
  params, layers = _mlp()
  want = _step(gsgd_jax.gsgd(0.1, layers=layers), params)
  chex.assert_trees_all_close(_step(gsgd_jax.gsgd(0.1, layers=spelling), params), want, rtol=1e-12)


def test_nested_paths_written_as_lists_read_as_one_chain():
  """``[['params', 'l0'], ...]`` cannot be blocks (no layer is called 'params')."""
  params, layers = _mlp()
  nested = {"params": params}
  want = _step(gsgd_jax.gsgd(0.1, layers=[("params", n) for n in layers]), nested)
  got = _step(gsgd_jax.gsgd(0.1, layers=[["params", n] for n in layers]), nested)
  chex.assert_trees_all_close(got, want, rtol=1e-12)


def test_lists_of_names_read_as_blocks_when_the_tree_says_so():
  params = {**_mlp(0, (3, 4, 2))[0], **{f"m{k}": v for k, v in _mlp(1, (3, 4, 2))[0].items()}}
  blocks = [[("l0",), ("l1",)], [("ml0",), ("ml1",)]]
  want = _step(gsgd_jax.gsgd(0.1, layers=blocks), params)
  got = _step(gsgd_jax.gsgd(0.1, layers=[["l0", "l1"], ["ml0", "ml1"]]), params)
  chex.assert_trees_all_close(got, want, rtol=1e-12)


def test_blocks_mix_with_lists_and_a_single_block_is_one_chain():
  params = {**_mlp(0, (3, 4, 2))[0], **{f"m{k}": v for k, v in _mlp(1, (3, 4, 2))[0].items()}}
  want = _step(gsgd_jax.gsgd(0.1, layers=[["l0", "l1"], ["ml0", "ml1"]]), params)
  mixed = [gsgd_jax.Block(["l0", "l1"]), [("ml0",), ("ml1",)]]
  chex.assert_trees_all_close(_step(gsgd_jax.gsgd(0.1, layers=mixed), params), want, rtol=1e-12)
  chain, layers = _mlp()
  want = _step(gsgd_jax.gsgd(0.1, layers=layers), chain)
  got = _step(gsgd_jax.gsgd(0.1, layers=gsgd_jax.Block(layers)), chain)
  chex.assert_trees_all_close(got, want, rtol=1e-12)


def test_a_normalized_block_of_one_layer_does_not_warn():
  """Its output rescaling is the symmetry it uses: no 'one layer' warning."""
  params, _ = _mlp()
  gsgd_jax.gsgd(0.1, layers=[[("l0",), ("l1",)], gsgd_jax.Block(["l2"], normalized=True)]).init(
    params
  )


@pytest.mark.parametrize(
  "layers, match",
  [
    ("l0/l1", r"takes a list of layer paths, got 'l0/l1'"),
    (3, r"takes a list of layer paths, got 3"),
    ([], r"a block of `layers` is empty"),
  ],
)
def test_malformed_blocks_show_the_accepted_forms(layers, match):
  with pytest.raises((TypeError, ValueError), match=match):
    gsgd_jax.Block(layers)


def test_list_of_one_name_lists_is_ambiguous():
  """Three one-layer blocks (plain SGD) or one chain: refused, showing both readings."""
  params, _ = _mlp()
  with pytest.raises(ValueError, match=r"reads two ways.*as blocks.*as one chain.*one chain:"):
    gsgd_jax.gsgd(0.1, layers=[["l0"], ["l1"], ["l2"]]).init(params)


def test_one_layer_block_warns():
  params, _ = _mlp()
  with pytest.warns(UserWarning, match=r"block of `layers` has one layer, 'l2'"):
    gsgd_jax.gsgd(0.1, layers=[[("l0",), ("l1",)], [("l2",)]]).init(params)


@pytest.mark.parametrize(
  "layers, error, match",
  [
    ("l0", TypeError, r"got the string 'l0'.*Accepted forms"),
    (3, TypeError, r"sequence of layer paths.*Accepted forms"),
    (["l0", [["l1"]]], TypeError, r"mixes paths and blocks"),
    (["l0", gsgd_jax.Block(["l1"])], TypeError, r"mixes paths and blocks"),
    ([["l0", {"a": 1}]], TypeError, r"a layer path must be.*Accepted forms"),
    ([], ValueError, r"`layers` is empty"),
  ],
)
def test_malformed_layers_show_the_accepted_forms(layers, error, match):
  with pytest.raises(error, match=match):
    gsgd_jax.gsgd(0.1, layers=layers)


def test_masked_bias_of_a_declared_layer_is_refused():
  """Weight allocation rescales a node's incoming weights and bias together."""
  params, layers = _mlp()
  mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)
  with pytest.raises(ValueError, match=r"layer 'l0': its bias is masked out"):
    optax.masked(gsgd_jax.gsgd(0.1, layers=layers), mask).init(params)
  labels = jax.tree.map(lambda m: "g" if m else "other", mask)
  partitioned = optax.partition(
    {"g": gsgd_jax.gsgd(0.1, layers=layers), "other": optax.sgd(0.1)}, labels
  )
  with pytest.raises(ValueError, match=r"layer 'l0': its bias is masked out"):
    partitioned.init(params)


def test_masked_out_layer_is_refused_and_block_labels_masks_work():
  params, layers = _mlp()
  outside_l2 = {n: jax.tree.map(lambda _, keep=(n != "l2"): keep, v) for n, v in params.items()}
  with pytest.raises(ValueError, match=r"layer 'l2' is masked out"):
    optax.masked(gsgd_jax.gsgd(0.1, layers=layers), outside_l2).init(params)
  # The labels the library writes keep each layer whole, and the masked run is the plain one.
  params["norm"] = {"scale": jnp.ones(2)}
  labels = gsgd_jax.block_labels(params, layers, inside="g", outside="adam")
  tx = optax.partition({"g": gsgd_jax.gsgd(0.1, layers=layers), "adam": optax.adam(1e-3)}, labels)
  got = _step(tx, params)
  want = _step(gsgd_jax.gsgd(0.1, layers=layers, fallback=optax.adam(1e-3)), params)
  chex.assert_trees_all_close(got, want, rtol=1e-12)


def test_gradients_without_a_declared_bias_are_a_structure_error():
  params, layers = _mlp()
  tx = gsgd_jax.gsgd(0.1, layers=layers)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  del grads["l1"]["bias"]
  with pytest.raises(ValueError, match=r"layer 'l1': the params have a bias and the gradients"):
    tx.update(grads, state, params)


class _ScannedMLP(nn.Module):
  bias: bool

  @nn.compact
  def __call__(self, x):
    def body(layer, h, _):
      return nn.relu(layer(h)), None

    stack = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = stack(nn.Dense(8, use_bias=self.bias, name="hidden"), x, None)
    return h


@pytest.mark.parametrize(
  "bias, match",
  [
    (
      False,
      r"'params/hidden': a rank-3 kernel \(3, 8, 8\) is a stacked dense .*stack_axis=0",
    ),
    (True, r"'params/hidden': kernel \(3, 8, 8\) and bias \(3, 8\) carry a stack .*stack_axis"),
  ],
)
def test_linen_scan_stack_is_not_read_as_a_convolution(bias, match):
  model = _ScannedMLP(bias)
  params = model.init(jax.random.key(0), jnp.ones((2, 8)))
  layers = [("params", "hidden")]
  with pytest.raises(ValueError, match=match):
    gsgd_jax.gsgd(0.1, layers=layers).init(params)
  with pytest.raises(ValueError, match=match):
    gsgd_jax.verify_invariance(model.apply, params, layers, jnp.ones((2, 8)))


class _VmappedLinear(nnx.Module):
  """Three copies of one ``nnx.Linear`` made by ``nnx.vmap``, as a scanned NNX model holds."""

  def __init__(self, bias):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      return nnx.Linear(8, 8, use_bias=bias, rngs=nnx.Rngs(key))

    self.hidden = make(jax.random.split(jax.random.key(0), 3))


@pytest.mark.parametrize(
  "bias, match",
  [
    (False, r"'hidden': a rank-3 kernel \(3, 8, 8\) is a stacked dense .*stack_axis=0"),
    (True, r"'hidden': kernel \(3, 8, 8\) and bias \(3, 8\) carry a stack axis.*stack_axis"),
  ],
)
def test_nnx_vmap_stack_is_not_read_as_a_convolution(bias, match):
  params = nnx.state(_VmappedLinear(bias), nnx.Param)
  with pytest.raises(ValueError, match=match):
    gsgd_jax.gsgd(0.1, layers=["hidden"]).init(params)


def test_depthwise_convolution_is_an_unsupported_kind():
  model = nn.Sequential(
    [
      nn.Conv(4, (3, 3)),
      nn.relu,
      nn.Conv(4, (3, 3), feature_group_count=4),
      nn.relu,
      lambda x: x.mean(axis=(1, 2)),
      nn.Dense(2),
    ]
  )
  params = model.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)))
  with pytest.raises(ValueError, match=r"'params/layers_2'.*grouped or depthwise convolution"):
    gsgd_jax.gsgd(0.1, layers=[("params", n) for n in ("layers_0", "layers_2", "layers_5")]).init(
      params
    )
  with pytest.raises(ValueError, match=r"infer_layers: unsupported layer kind.*depthwise"):
    gsgd_jax.infer_layers(params)


def test_infer_layers_reads_a_sequential_conv_flatten_dense_stack():
  model = nn.Sequential(
    [
      nn.Conv(4, (3, 3)),
      nn.relu,
      lambda x: x.reshape(x.shape[0], -1),
      nn.Dense(8),
      nn.relu,
      nn.Dense(2),
    ]
  )
  params = model.init(jax.random.key(0), jnp.ones((1, 5, 5, 1)))
  layers = gsgd_jax.infer_layers(params)
  assert layers == [("params", "layers_0"), ("params", "layers_3"), ("params", "layers_5")]
  gsgd_jax.verify_invariance(
    model.apply,
    gsgd_jax.set_skeleton(params, layers),
    layers,
    jax.random.normal(jax.random.key(1), (4, 5, 5, 1)),
  )


# ---------------------------------------------------------------------------------------------
# Mistakes that used to end in an internal exception (IndexError, StopIteration, a broadcasting
# TypeError) or a message flooded with arrays.


def test_a_params_tree_passed_as_layers_is_shown_by_shapes():
  params = {"params": {"Dense_0": {"kernel": jnp.ones((300, 300))}}}
  with pytest.raises(
    TypeError, match=r"kernel': Array\(shape=\(300, 300\), dtype=float\d+\)"
  ) as err:
    gsgd_jax.gsgd(0.1, layers=params)
  assert len(str(err.value)) < 700
  with pytest.raises(TypeError, match=r"mixes paths and blocks: \[Array\(shape") as err:
    gsgd_jax.gsgd(0.1, layers=[jnp.ones((300, 300))])
  assert len(str(err.value)) < 700


def test_an_unstacked_norm_in_front_of_a_stacked_block_is_named():
  s, d, h = 3, 4, 6
  params = {
    "ln": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
    "fc1": {"kernel": jnp.ones((s, d, h)), "bias": jnp.zeros((s, h))},
    "fc2": {"kernel": jnp.ones((s, h, d)), "bias": jnp.zeros((s, d))},
  }
  block = gsgd_jax.Block(["ln", "fc1", "fc2"], stack_axis=0)
  with pytest.raises(
    ValueError, match=r"layer 'ln': a norm's scale of shape \(4,\) carries no stack"
  ):
    gsgd_jax.gsgd(0.1, layers=[block]).init(params)


def _normalized_problem():
  params = {
    "conv": {"kernel": jax.random.normal(jax.random.key(0), (3, 3, 2, 4))},
    "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
    "head": {"kernel": jnp.ones((4, 3))},
  }
  blocks = [gsgd_jax.Block(["conv"], normalized=True), gsgd_jax.Block(["bn", "head"])]
  return params, blocks


@pytest.mark.filterwarnings("ignore:a block of `layers` has one layer:UserWarning")
def test_a_state_made_without_renormalize_is_refused_by_name():
  params, blocks = _normalized_problem()
  grads = jax.tree.map(jnp.ones_like, params)
  state = gsgd_jax.gsgd(0.1, layers=blocks, renormalize=False).init(params)
  with pytest.raises(
    ValueError, match=r"output norms of 0 normalized blocks, but `layers` declares 1"
  ):
    gsgd_jax.gsgd(0.1, layers=blocks).update(grads, state, params)
  # The alias passes renormalize on: the same state is what path_space makes.
  want = gsgd_jax.path_space(optax.sgd(0.1), layers=blocks, renormalize=False).init(params)
  chex.assert_trees_all_equal(state, want)


@pytest.mark.filterwarnings("ignore:a block of `layers` has one layer:UserWarning")
def test_a_state_made_without_implicit_decay_is_refused_by_name():
  params, blocks = _normalized_problem()
  grads = jax.tree.map(jnp.ones_like, params)
  state = gsgd_jax.gsgd(0.1, layers=blocks).init(params)
  decayed = gsgd_jax.g_momentum(0.1, layers=blocks, implicit_decay=True)
  with pytest.raises(
    ValueError,
    match=r"rate norms of 0 normalized blocks, but `layers` declares 1 and implicit_decay=True",
  ):
    decayed.update(grads, state, params)
  # Its own state holds one rate per output node, 1 at init, which optax.tree_map_params
  # (mapping the momentum, shaped like the params) leaves as it is.
  own = decayed.init(params)
  chex.assert_trees_all_equal(own.rate_norms, (jnp.ones(4),))
  marked = optax.tree_map_params(decayed, lambda p: jnp.full_like(p, 7), own)
  chex.assert_trees_all_equal_shapes_and_dtypes(marked, own)
  chex.assert_trees_all_equal(marked.rate_norms, own.rate_norms)
  assert all(bool(jnp.all(leaf == 7)) for leaf in jax.tree.leaves(marked.inner_state))
  # A transformation without the decay passes a state's rates through untouched.
  _, passed = gsgd_jax.g_momentum(0.1, layers=blocks).update(grads, own, params)
  chex.assert_trees_all_equal(passed.rate_norms, own.rate_norms)
  with pytest.raises(ValueError, match="implicit_decay=True needs renormalize=True"):
    gsgd_jax.gsgd(0.1, layers=blocks, implicit_decay=True, renormalize=False)
  # The rates' starting value: positive, and read only with the decay.
  started = gsgd_jax.gsgd(0.1, layers=blocks, implicit_decay=True, initial_rate_norm=2.5)
  chex.assert_trees_all_equal(started.init(params).rate_norms, (jnp.full(4, 2.5),))
  with pytest.raises(ValueError, match=r"initial_rate_norm must be positive, got 0\.0"):
    gsgd_jax.gsgd(0.1, layers=blocks, implicit_decay=True, initial_rate_norm=0.0)
  with pytest.raises(ValueError, match="pass implicit_decay=True with it"):
    gsgd_jax.g_momentum(0.1, layers=blocks, initial_rate_norm=2.0)


@pytest.mark.parametrize("make", [gsgd_jax.g_adam, gsgd_jax.g_momentum])
def test_a_state_made_on_params_of_another_width_is_refused_by_name(make):
  (params, _), (narrow, _) = _mlp(widths=(3, 5, 2)), _mlp(widths=(3, 4, 2))
  tx = make(0.1, layers=["l0", "l1"])
  state = tx.init(narrow)
  with pytest.raises(
    ValueError, match=r"holds '.*/l0/(bias|kernel)' of shape \((3, )?4,?\), but init gives"
  ):
    tx.update(jax.tree.map(jnp.ones_like, params), state, params)
