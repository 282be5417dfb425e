"""Flax Linen TrainState end to end, and orbax checkpoints that resume bit-identically."""

import chex
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from helpers import orbax_roundtrip
from problems import LinenMLP

import gsgd_jax


def _setup(tx_factory=lambda layers: gsgd_jax.g_momentum(0.05, layers=layers)):
  x = jax.random.normal(jax.random.key(0), (96, 6), jnp.float32)
  y = jnp.argmax(x[:, :3], axis=-1)
  model = LinenMLP((24, 12, 3))
  params = jax.jit(model.init)(jax.random.key(1), x)
  layers = gsgd_jax.infer_layers(params)
  params = gsgd_jax.set_skeleton(params, layers)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx_factory(layers))

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  return state, step, loss


def test_linen_train_state_trains():
  state, step, loss = _setup()
  start = float(loss(state.params))
  for _ in range(40):
    state = step(state)
  assert float(loss(state.params)) < 0.7 * start
  assert int(state.step) == 40


def test_orbax_checkpoint_resumes_bit_identically(tmp_path):
  state, step, _ = _setup(lambda layers: gsgd_jax.g_adam(1e-2, layers=layers))
  for _ in range(5):
    state = step(state)
  restored = orbax_roundtrip(tmp_path, {"params": state.params, "opt_state": state.opt_state})
  straight = state
  for _ in range(5):
    straight = step(straight)
  assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state.opt_state)
  resumed = state.replace(params=restored["params"], opt_state=restored["opt_state"])
  for _ in range(5):
    resumed = step(resumed)
  chex.assert_trees_all_equal(
    (straight.params, straight.opt_state), (resumed.params, resumed.opt_state)
  )
