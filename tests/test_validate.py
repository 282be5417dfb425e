"""verify_invariance: passes on ReLU chains, names the layer that breaks the symmetry."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from test_cnn import build

import gsgd_jax


def test_relu_mlp_and_cnn_pass():
  params, layers = ref.make_mlp(jax.random.key(0), (5, 8, 7, 3))
  x = jax.random.normal(jax.random.key(1), (16, 5))
  worst = gsgd_jax.verify_invariance(lambda p, x: ref.forward(p, layers, x), params, layers, x)
  assert worst < 1e-10
  params, layers, _, _, shape, forward = build("same-max-valid-flatten")
  x = jax.random.normal(jax.random.key(2), (4, *shape))
  assert gsgd_jax.verify_invariance(forward, params, layers, x) < 1e-10


def test_tanh_after_a_layer_is_named():
  params, layers = ref.make_mlp(jax.random.key(0), (5, 8, 7, 3))

  def apply(p, x):
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = jnp.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])  # not homogeneous
    return h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]

  x = jax.random.normal(jax.random.key(1), (16, 5))
  with pytest.raises(ValueError, match=r"layer 'Dense_1'.*non-ReLU activation"):
    gsgd_jax.verify_invariance(apply, params, layers, x)


def test_wrong_order_and_normalisation_inside_a_block_fail():
  params, layers = ref.make_mlp(jax.random.key(0), (6, 6, 6, 6))
  x = jax.random.normal(jax.random.key(1), (16, 6))
  forward = lambda p, x: ref.forward(p, layers, x)
  swapped = [layers[1], layers[0], layers[2]]  # shapes chain, order does not
  with pytest.raises(ValueError, match=r"rescaling the output nodes of layer 'Dense_1'"):
    gsgd_jax.verify_invariance(forward, params, swapped, x)

  class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.LayerNorm(use_scale=False, use_bias=False)(nn.Dense(8)(x)))
      return nn.Dense(2)(x)

  model = Normed()
  p = model.init(jax.random.key(2), x)
  with pytest.raises(ValueError, match=r"'params/Dense_0'"):
    gsgd_jax.verify_invariance(model.apply, p, gsgd_jax.infer_layers(p), x)


def test_blocks_name_the_block():
  a, _ = ref.make_mlp(jax.random.key(0), (4, 5, 3), layer_names=["a0", "a1"])
  b, _ = ref.make_mlp(jax.random.key(1), (3, 6, 2), layer_names=["b0", "b1"])
  params = {**a, **b}

  def apply(p, x):
    h = ref.forward(p, [("a0",), ("a1",)], x)
    h = jnp.sin(p["b0"]["kernel"].T @ h.T).T  # not ReLU inside block 1
    return h @ p["b1"]["kernel"]

  x = jax.random.normal(jax.random.key(2), (8, 4))
  with pytest.raises(ValueError, match=r"'b0' of block 1"):
    gsgd_jax.verify_invariance(apply, params, [["a0", "a1"], ["b0", "b1"]], x)


def test_rescale_with_explicit_factors():
  params, layers = ref.make_mlp(jax.random.key(0), (3, 4, 2))
  factors = [[None, jnp.array([2.0, 1.0, 1.0, 0.5]), None]]
  new = gsgd_jax.rescale(params, layers, factors)
  np.testing.assert_allclose(new["Dense_0"]["kernel"][:, 0], 2 * params["Dense_0"]["kernel"][:, 0])
  np.testing.assert_allclose(new["Dense_0"]["bias"][3], 0.5 * params["Dense_0"]["bias"][3])
  np.testing.assert_allclose(new["Dense_1"]["kernel"][0], params["Dense_1"]["kernel"][0] / 2)
