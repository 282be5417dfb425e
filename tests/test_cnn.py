"""Convolutional networks: exact G-space for plain ReLU CNNs (docs/math.md, nodes, edges and
levels: a convolution has one edge per tap, a dense layer after a flatten one per position)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from flax import nnx
from helpers import nnx_layers_at_skeleton, train_nnx, train_scan
from problems import ALLOW_CHAIN_RANGE, CNNS, NNXCNN, LinenCNN, cnn, make_optimizer, views

import gsgd_jax
from gsgd_jax._src import basis
from gsgd_jax._src.structure import build_structure


def _path_gradients(problem, params, grads):
  """The library's ICR at ``params``, kernel-shaped."""
  (struct,) = build_structure(params, problem.layers)
  kernels = lambda tree: [tree[n]["kernel"] for (n,) in problem.layers]
  biases = lambda tree: [tree[n].get("bias") for (n,) in problem.layers]
  return basis.inverse_chain_rule(
    struct, kernels(params), biases(params), kernels(grads), biases(grads)
  )


@pytest.mark.parametrize("name", sorted(CNNS))
def test_structure_reads_taps_and_flatten(name):
  problem = cnn(name)
  (struct,) = build_structure(problem.params, problem.layers)
  assert [(s.taps, s.centre, s.n_in, s.n_out) for s in struct.layers] == problem.taps
  kinds = [s.kind for s in struct.layers]
  assert kinds[0] == "conv" and kinds[-1] in ("dense", "flatten")


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_icr_equals_autodiff(name):
  problem = cnn(name)
  params, layers, loss, widths = problem.params, problem.layers, problem.loss, problem.widths
  kernels, biases = views(params, problem)
  centres = [t[1] for t in problem.taps]
  values, bias_values = ref.basis_values_taps(kernels, biases, widths, centres)
  got_values = gsgd_jax.basis_path_values(params, layers)
  for k, (n,) in enumerate(layers):
    np.testing.assert_allclose(
      np.reshape(got_values[n]["kernel"], values[k].shape), values[k], rtol=1e-12, atol=1e-15
    )

  def loss_of_values(v, vb):
    rebuilt, rb = ref.reconstruct_taps(v, vb, kernels, widths, centres)
    p = {
      n: {
        "kernel": rebuilt[k].reshape(params[n]["kernel"].shape),
        **({"bias": rb[k]} if biases[k] is not None else {}),
      }
      for k, (n,) in enumerate(layers)
    }
    return loss(p)

  want, want_b = jax.jit(jax.grad(loss_of_values, argnums=(0, 1)))(values, bias_values)
  got = _path_gradients(problem, params, jax.grad(loss)(params))
  masks = ref.fixed_masks(kernels, widths, centres)
  scale = max(float(jnp.max(jnp.abs(g))) for g in want)
  for k in range(len(layers)):
    g = np.reshape(got.kernels[k], want[k].shape)
    np.testing.assert_allclose(
      g[~masks[k]], np.asarray(want[k])[~masks[k]], rtol=1e-8, atol=1e-10 * scale
    )
    assert np.all(g[masks[k]] == 0)
    if biases[k] is not None:
      np.testing.assert_allclose(got.biases[k], want_b[k], rtol=1e-8, atol=1e-10 * scale)


# Random skeleton weights on purpose: WA must land on v + dv whatever B and F are (init
# warns for some of the nets).
@ALLOW_CHAIN_RANGE
@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_weight_allocation_lands_on_v_plus_dv(name):
  problem = cnn(name, seed=2)
  params, layers, loss, widths = problem.params, problem.layers, problem.loss, problem.widths
  lr = 0.05
  tx = gsgd_jax.path_space(optax.sgd(lr), layers=layers, ratio_clip=None)
  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  centres = [t[1] for t in problem.taps]
  got = _path_gradients(problem, params, grads)
  kernels, biases = views(params, problem)
  new_kernels, new_biases = views(new, problem)
  before, before_b = ref.basis_values_taps(kernels, biases, widths, centres)
  after, after_b = ref.basis_values_taps(new_kernels, new_biases, widths, centres)
  masks = ref.fixed_masks(kernels, widths, centres)
  for k in range(len(layers)):
    target = before[k] - lr * np.reshape(got.kernels[k], before[k].shape)
    tol = 1e-11 * (1 + np.max(np.abs(target)))
    np.testing.assert_allclose(after[k][~masks[k]], target[~masks[k]], rtol=1e-9, atol=tol)
    np.testing.assert_array_equal(
      np.asarray(kernels[k])[masks[k]], np.asarray(new_kernels[k])[masks[k]]
    )
    if biases[k] is not None:
      np.testing.assert_allclose(
        after_b[k], before_b[k] - lr * np.asarray(got.biases[k]), rtol=1e-9, atol=tol
      )


@pytest.mark.parametrize("name", sorted(CNNS))
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_cnn_rescaling_invariance(name, inner):
  problem = cnn(name, seed=5)
  layers, loss, forward, x = problem.layers, problem.loss, problem.forward, problem.x
  params = gsgd_jax.set_skeleton(problem.params, layers)
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(9))
  np.testing.assert_allclose(forward(rescaled, x), forward(params, x), rtol=1e-11, atol=1e-12)
  tx = (
    make_optimizer("gsgd", layers, learning_rate=0.02)
    if inner == "sgd"
    else make_optimizer("g_adam", layers)
  )

  (final, state_a), out_a = train_scan(tx, params, loss, 20, lambda p: forward(p, x))
  (_, state_b), out_b = train_scan(tx, rescaled, loss, 20, lambda p: forward(p, x))
  assert int(state_a.total_clipped_ratios) == int(state_b.total_clipped_ratios) == 0
  assert float(loss(final)) < 0.95 * float(loss(params))
  np.testing.assert_allclose(out_a, out_b, rtol=1e-9, atol=1e-10)
  if inner == "sgd":  # plain SGD is not invariant on the same nets
    sgd = optax.sgd(0.02)
    _, sgd_a = train_scan(sgd, params, loss, 20, lambda p: forward(p, x))
    _, sgd_b = train_scan(sgd, rescaled, loss, 20, lambda p: forward(p, x))
    assert float(jnp.max(jnp.abs(sgd_a[-1] - sgd_b[-1]))) > 1e-3


def _images(n=64):
  x = jax.random.normal(jax.random.key(0), (n, 8, 8, 1), jnp.float32)
  y = (jnp.mean(x[:, :4], axis=(1, 2, 3)) > jnp.mean(x[:, 4:], axis=(1, 2, 3))).astype(jnp.int32)
  return x, y + (jnp.mean(x, axis=(1, 2, 3)) > 0.1)


def test_linen_cnn_trains():
  x, y = _images()
  model = LinenCNN()
  params = jax.jit(model.init)(jax.random.key(1), x)
  layers = gsgd_jax.infer_layers(params)
  assert layers == [
    ("params", "Conv_0"),
    ("params", "Conv_1"),
    ("params", "Dense_0"),
    ("params", "Dense_1"),
  ]
  (struct,) = build_structure(params, layers)
  assert [s.kind for s in struct.layers] == ["conv", "conv", "flatten", "dense"]
  assert struct.layers[2].taps == 4
  params = gsgd_jax.set_skeleton(params, layers)
  tx = gsgd_jax.gsgd(0.05, layers=layers)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  start, state = float(loss(params)), tx.init(params)
  for _ in range(40):
    params, state = step(params, state)
  assert float(loss(params)) < 0.8 * start


def test_nnx_cnn_trains():
  x, y = _images()
  model = NNXCNN(nnx.Rngs(2))
  layers = nnx_layers_at_skeleton(model)
  assert layers == [("convs", 0), ("convs", 1), ("head", 0)]
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  start, end = train_nnx(model, gsgd_jax.gsgd(0.05, layers=layers), loss, steps=40)
  assert end < 0.8 * start


def test_conv_structure_errors_name_the_layer():
  params = {"c0": {"kernel": jnp.ones((3, 3, 2, 4))}, "c1": {"kernel": jnp.ones((3, 3, 5, 4))}}
  with pytest.raises(ValueError, match=r"'c1' takes 5 inputs"):
    gsgd_jax.gsgd(0.1, layers=["c0", "c1"]).init(params)
  # A dense layer whose rows are not a multiple of the channels cannot follow a conv.
  params = {"c0": {"kernel": jnp.ones((3, 3, 2, 4))}, "d0": {"kernel": jnp.ones((10, 3))}}
  with pytest.raises(ValueError, match=r"'d0' takes 10 inputs"):
    gsgd_jax.gsgd(0.1, layers=["c0", "d0"]).init(params)
  # Dense after dense never reads as a flatten.
  params = {"d0": {"kernel": jnp.ones((3, 4))}, "d1": {"kernel": jnp.ones((8, 2))}}
  with pytest.raises(ValueError, match=r"'d1' takes 8 inputs"):
    gsgd_jax.gsgd(0.1, layers=["d0", "d1"]).init(params)
