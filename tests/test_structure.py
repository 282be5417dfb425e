"""Layer specs, index tables, key paths across tree forms, and layer inference."""

import itertools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from problems import NNXMLP, LinenMLP, make_mlp

import gsgd_jax
from gsgd_jax._src.structure import build_structure


def test_dimension_counts():
  widths = (5, 7, 3, 4)
  params, layers = make_mlp(jax.random.key(0), widths, bias=True)
  (struct,) = build_structure(params, layers)
  m = sum(a * b + b for a, b in itertools.pairwise(widths))
  assert struct.num_weights == m
  assert struct.num_hidden == 10
  assert struct.num_basis_paths == m - 10
  # Every path-owning entry carries a basis value; F is exactly H entries.
  mask = gsgd_jax.skeleton_mask(params, layers)
  assert sum(int(np.sum(leaf)) for leaf in jax.tree.leaves(mask)) == struct.num_hidden


def test_structure_is_cached_and_independent_of_tree_form():
  params, layers = make_mlp(jax.random.key(0), (3, 4, 2))
  (a,) = build_structure(params, layers)
  (b,) = build_structure(jax.tree.map(jnp.zeros_like, params), ["Dense_0", "Dense_1"])
  assert a is b
  state = nnx.State(
    {
      "Dense_0": {"kernel": nnx.Param(params["Dense_0"]["kernel"])},
      "Dense_1": {"kernel": nnx.Param(params["Dense_1"]["kernel"])},
    }
  )
  (c,) = build_structure(state, layers)
  assert c.layers[0].path == a.layers[0].path and not c.layers[0].has_bias


def test_missing_layer_names_the_path():
  params, _layers = make_mlp(jax.random.key(0), (3, 4, 2))
  with pytest.raises(ValueError, match=r"Dense_7.*no 'kernel'"):
    gsgd_jax.gsgd(0.1, layers=[("Dense_0",), ("Dense_7",)]).init(params)


def test_wrong_order_names_both_layers():
  params, layers = make_mlp(jax.random.key(0), (3, 4, 2))
  with pytest.raises(ValueError, match=r"Dense_0.*Dense_1.*forward order"):
    gsgd_jax.gsgd(0.1, layers=layers[::-1]).init(params)


def test_duplicate_and_empty_layers():
  params, layers = make_mlp(jax.random.key(0), (3, 3, 3))
  with pytest.raises(ValueError, match=r"twice"):
    gsgd_jax.gsgd(0.1, layers=[layers[0], layers[0]]).init(params)
  with pytest.raises(ValueError, match=r"empty"):
    gsgd_jax.gsgd(0.1, layers=[]).init(params)


def test_unsupported_kernel_rank_and_bias_shape():
  params = {"a": {"kernel": jnp.ones(3)}, "b": {"kernel": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match=r"'a'.*neither a dense"):
    gsgd_jax.gsgd(0.1, layers=["a", "b"]).init(params)
  params = {
    "a": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(3)},
    "b": {"kernel": jnp.ones((4, 2))},
  }
  with pytest.raises(ValueError, match=r"'a'.*bias of shape"):
    gsgd_jax.gsgd(0.1, layers=["a", "b"]).init(params)


def test_update_without_params_raises():
  params, layers = make_mlp(jax.random.key(0), (3, 4, 2))
  tx = gsgd_jax.gsgd(0.1, layers=layers)
  with pytest.raises(ValueError, match=r"needs the current params"):
    tx.update(params, tx.init(params))


def test_infer_layers_linen_orders_numerically():
  widths = tuple(range(2, 14))  # 12 layers: Dense_10 must follow Dense_9, not Dense_1
  params = jax.jit(LinenMLP(widths).init)(jax.random.key(0), jnp.ones((1, 3)))
  layers = gsgd_jax.infer_layers(params)
  assert layers == [("params", f"Dense_{k}") for k in range(12)]


def test_infer_layers_nnx_list():
  model = NNXMLP((3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 2), nnx.Rngs(0))
  layers = gsgd_jax.infer_layers(nnx.state(model, nnx.Param))
  assert layers == [("layers", k) for k in range(12)]


def test_infer_layers_named_fc():
  params = {"fc2": {"kernel": jnp.ones((4, 2))}, "fc1": {"kernel": jnp.ones((3, 4))}}
  assert gsgd_jax.infer_layers(params) == [("fc1",), ("fc2",)]


@pytest.mark.parametrize(
  "params, why",
  [
    (
      {"fc": {"kernel": jnp.ones((3, 4))}, "out": {"kernel": jnp.ones((4, 2))}},
      "carries no number",
    ),
    ({"a1": {"kernel": jnp.ones((3, 4))}, "b2": {"kernel": jnp.ones((4, 2))}}, "several groups"),
    (
      {"x": {"l1": {"kernel": jnp.ones((3, 4))}}, "l2": {"kernel": jnp.ones((4, 2))}},
      "several groups",
    ),
    (
      {"l1": {"kernel": jnp.ones((3, 4))}, "l2": {"kernel": jnp.ones((3, 3, 4, 2))}},
      "numbers a dense layer before a convolution",
    ),
    ({"l1": {"kernel": jnp.ones((3, 4))}, "l01": {"kernel": jnp.ones((4, 2))}}, "same number"),
    (
      {"l1": {"kernel": jnp.ones((3, 4))}, "l2": {"kernel": jnp.ones((5, 2))}},
      "shapes do not chain.*'l2' takes 5 inputs",
    ),
    ({"l1": {"scale": jnp.ones(3)}}, "no sub-tree"),
  ],
)
def test_infer_layers_fails_clearly(params, why):
  with pytest.raises(ValueError, match=why):
    gsgd_jax.infer_layers(params)


def test_string_and_tuple_paths_agree():
  params, _layers = make_mlp(jax.random.key(0), (3, 4, 2))
  nested = {"params": params}
  a = gsgd_jax.basis_path_values(nested, [("params", "Dense_0"), ("params", "Dense_1")])
  b = gsgd_jax.basis_path_values(nested, ["params/Dense_0", "params/Dense_1"])
  chex.assert_trees_all_equal(a, b)


def test_non_floating_params_are_refused():
  params = {"a": {"kernel": jnp.ones((3, 4), jnp.int32)}, "b": {"kernel": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match=r"'a': kernel has dtype int32"):
    gsgd_jax.gsgd(0.1, layers=["a", "b"]).init(params)


def test_zero_skeleton_weight_is_named_at_init():
  params, layers = make_mlp(jax.random.key(0), (3, 4, 2))
  params = gsgd_jax.set_skeleton(params, layers)
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[3, 1].set(0.0)  # 3 -> 3 mod 2
  with pytest.raises(ValueError, match=r"'Dense_1': the outgoing skeleton weight of input node 3"):
    gsgd_jax.gsgd(0.1, layers=layers).init(params)
  params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[3, 1].set(1.0)
  params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[1, 1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"'Dense_0': the incoming skeleton weight of output node 1"):
    gsgd_jax.g_adam(0.1, layers=layers).init(params)
  jax.jit(gsgd_jax.gsgd(0.1, layers=layers).init)(params)  # traced: not checked, no error
  # A subnormal float32 skeleton weight is as bad as zero: its reciprocal overflows.
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), gsgd_jax.set_skeleton(params, layers))
  kernel = np.array(params32["Dense_0"]["kernel"])
  kernel[2, 2] = 1e-40  # set in NumPy: XLA on CPU flushes subnormal results to 0
  params32["Dense_0"]["kernel"] = kernel
  assert 0 < float(kernel[2, 2]) < float(jnp.finfo(jnp.float32).tiny)
  with pytest.raises(ValueError, match=r"incoming skeleton weight of output node 2 is 9.9999"):
    gsgd_jax.gsgd(0.1, layers=layers).init(params32)


def test_extreme_skeleton_chains_warn_at_init():
  """Flax's default init gives skeleton-chain products far from 1: G-SGD's steps
  scale as 1/(B F)^2 there, so init warns; the skeleton initialisation does not."""
  params, layers = make_mlp(jax.random.key(0), (64, 128, 128, 10), dtype=jnp.float32)
  tx = gsgd_jax.gsgd(0.1, layers=layers)
  with pytest.warns(UserWarning, match=r"skeleton-chain products B\*F .* 'Dense_0' span"):
    tx.init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.init(gsgd_jax.set_skeleton(params, layers))
