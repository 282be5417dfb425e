"""Path-SGD (docs/math.md, Path-SGD): gamma against autodiff of the squared network, the update."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import CNNS, cnn, make_mlp, widths_cases

import gsgd_jax


def _squared_network_sum(squares, bias_squares, views_shape):
  """Output sum of the linear network with weights w^2 on an all-ones input.

  Runs on the channel graph: node j of level k+1 sums u[t, i, j] x[i] over taps
  and inputs, plus its squared bias (an edge from a constant node).
  """
  x = jnp.ones(views_shape[0][1])
  for u, b2 in zip(squares, bias_squares, strict=True):
    x = jnp.einsum("tij,i->j", u, x) + (0.0 if b2 is None else b2)
  return jnp.sum(x)


def _gamma_by_autodiff(params, layers, views_shape):
  kernels = [
    jnp.asarray(params[n]["kernel"]).reshape(s) for (n,), s in zip(layers, views_shape, strict=True)
  ]
  biases = [params[n].get("bias") for (n,) in layers]
  squares = [jnp.square(w) for w in kernels]
  bias_squares = [None if b is None else jnp.square(b) for b in biases]
  return jax.grad(_squared_network_sum, argnums=(0, 1))(squares, bias_squares, views_shape)


@pytest.mark.parametrize("widths", widths_cases([(5, 3), (3, 4, 2), (4, 7, 5, 3), (2, 1, 6, 1, 3)]))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_gamma_equals_grad_of_squared_network(widths, bias):
  params, layers = make_mlp(jax.random.key(0), widths, bias)
  shapes = [(1, a, b) for a, b in itertools.pairwise(widths)]
  want, want_b = _gamma_by_autodiff(params, layers, shapes)
  got = gsgd_jax.path_norm_scales(params, layers)
  for k, (name,) in enumerate(layers):
    np.testing.assert_allclose(got[name]["kernel"], want[k][0], rtol=1e-12)
    if bias:
      np.testing.assert_allclose(got[name]["bias"], want_b[k], rtol=1e-12)


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_gamma_on_the_channel_graph(name):
  params, layers, *_, taps = cnn(name)
  shapes = [(t, i, o) for t, _, i, o in taps]
  want, want_b = _gamma_by_autodiff(params, layers, shapes)
  got = gsgd_jax.path_norm_scales(params, layers)
  for k, (n,) in enumerate(layers):
    np.testing.assert_allclose(np.reshape(got[n]["kernel"], shapes[k]), want[k], rtol=1e-12)
    if want_b[k] is not None:
      np.testing.assert_allclose(got[n]["bias"], want_b[k], rtol=1e-12)


def test_path_sgd_update_is_gradient_over_gamma():
  params, layers = make_mlp(jax.random.key(1), (4, 6, 3))
  params["scale"] = jnp.ones(2)
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  tx = gsgd_jax.path_sgd(0.1, layers=layers)
  updates, _ = tx.update(grads, tx.init(params), params)
  gamma = gsgd_jax.path_norm_scales(params, layers)
  for (name,) in layers:
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(
        updates[name][leaf], -0.1 * grads[name][leaf] / gamma[name][leaf], rtol=1e-13
      )
  np.testing.assert_allclose(updates["scale"], -0.1 * grads["scale"])  # plain SGD outside


def test_zero_gamma_stays_finite():
  params = {"a": {"kernel": jnp.zeros((3, 4))}, "b": {"kernel": jnp.ones((4, 2))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = gsgd_jax.path_sgd(0.1, layers=["a", "b"])
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  with pytest.raises(ValueError, match=r"needs the current params"):
    tx.update(grads, tx.init(params))
