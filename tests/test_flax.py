"""End to end with Flax: a Linen MLP and an NNX MLP train with G-SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from helpers import nnx_layers_at_skeleton
from problems import NNXMLP, LinenMLP

import gsgd_jax


def _data(n=128, d=8, classes=3):
  x = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (d, classes), jnp.float32)
  return x, jnp.argmax(x @ w, axis=-1)


def test_linen_mlp_trains():
  x, y = _data()
  model = LinenMLP((32, 16, 3))
  params = jax.jit(model.init)(jax.random.key(2), x)
  layers = gsgd_jax.infer_layers(params)
  assert layers == [("params", "Dense_0"), ("params", "Dense_1"), ("params", "Dense_2")]
  params = gsgd_jax.set_skeleton(params, layers)
  tx = gsgd_jax.gsgd(0.1, layers=layers)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  @jax.jit
  def step(p, state):
    value, grads = jax.value_and_grad(loss)(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, value

  state = tx.init(params)
  start = float(loss(params))
  for _ in range(30):
    params, state, _ = step(params, state)
  assert float(loss(params)) < 0.7 * start
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_nnx_optimizer_trains():
  x, y = _data()
  model = NNXMLP((8, 32, 16, 3), nnx.Rngs(3))
  layers = nnx_layers_at_skeleton(model)
  optimizer = nnx.Optimizer(model, gsgd_jax.gsgd(0.1, layers=layers), wrt=nnx.Param)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

  @nnx.jit
  def step(m, opt):
    value, grads = nnx.value_and_grad(loss)(m)
    opt.update(m, grads)
    return value

  start = float(loss(model))
  skeleton = gsgd_jax.skeleton_mask(nnx.state(model, nnx.Param), layers)
  kernel0 = np.asarray(model.layers[0].kernel[...])
  for _ in range(30):
    step(model, optimizer)
  assert float(loss(model)) < 0.7 * start
  # The fixed skeleton edges did not move.
  fixed = np.asarray(skeleton["layers"][0]["kernel"])
  np.testing.assert_array_equal(np.asarray(model.layers[0].kernel[...])[fixed], kernel0[fixed])
  assert not np.allclose(np.asarray(model.layers[0].kernel[...]), kernel0)
