"""Convolutional networks: exact G-space for plain ReLU CNNs (SPEC §1-2 with taps)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from flax import nnx
from helpers import nnx_layers_at_skeleton, train_nnx, train_scan

import gsgd_jax
from gsgd_jax._src import basis
from gsgd_jax._src.structure import build_structure

# Each net: input shape (H, W, C), then ops. ('conv', kh, kw, c_out, stride, padding),
# ('pool', kind, window, stride, padding), ('flatten',), ('gap',), ('dense', n_out).
NETS = {
  # 3x3 SAME, max pool, 3x3 VALID into unequal channels, flatten (S = 4) into dense.
  "same-max-valid-flatten": (
    (8, 8, 3),
    True,
    [
      ("conv", 3, 3, 4, 1, "SAME"),
      ("pool", "max", 2, 2, "VALID"),
      ("conv", 3, 3, 6, 1, "VALID"),
      ("flatten",),
      ("dense", 5),
      ("dense", 3),
    ],
  ),
  # 1x1, 3x3 stride 2, avg pool, 5x5 SAME, flatten (S = 16) into dense; no biases.
  "1x1-stride2-avg-5x5": (
    (9, 9, 2),
    False,
    [
      ("conv", 1, 1, 5, 1, "SAME"),
      ("conv", 3, 3, 3, 2, "SAME"),
      ("pool", "avg", 2, 1, "VALID"),
      ("conv", 5, 5, 4, 1, "SAME"),
      ("flatten",),
      ("dense", 2),
    ],
  ),
  # 5x5 stride 2 VALID, 1x1, global average pool, dense (no flatten taps).
  "5x5-stride2-gap": (
    (7, 7, 3),
    True,
    [("conv", 5, 5, 6, 2, "VALID"), ("conv", 1, 1, 6, 1, "SAME"), ("gap",), ("dense", 4)],
  ),
  # Rectangular 3x1 window and a 1-D flatten of S = 3 positions.
  "3x1-flatten": (
    (5, 3, 2),
    True,
    [("conv", 3, 1, 3, 1, "SAME"), ("conv", 3, 1, 2, (2, 1), "VALID"), ("flatten",), ("dense", 2)],
  ),
}


def build(name, seed=0):  # noqa: C901 (one branch per kind of op in NETS)
  """Params, layer paths, reference views and a forward function for a test net."""
  shape, bias, ops = NETS[name]
  key = jax.random.key(seed)
  h, w, c = shape
  params, layers, taps, apply_ops = {}, [], [], []
  convs = denses = 0
  prev_conv_channels = None
  for op in ops:
    if op[0] == "conv":
      _, kh, kw, c_out, stride, padding = op
      key, k1, k2 = jax.random.split(key, 3)
      layer_name = f"Conv_{convs}"
      convs += 1
      params[layer_name] = {
        "kernel": jax.random.normal(k1, (kh, kw, c, c_out)) / np.sqrt(kh * kw * c)
      }
      if bias:
        params[layer_name]["bias"] = 0.1 * jax.random.normal(k2, (c_out,))
      strides = (stride, stride) if isinstance(stride, int) else stride
      conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      out = jax.eval_shape(conv, jnp.zeros((1, h, w, c)), jnp.zeros((kh, kw, c, c_out)))
      h, w = out.shape[1:3]
      layers.append((layer_name,))
      taps.append((kh * kw, (kh // 2) * kw + kw // 2, c, c_out))
      apply_ops.append(("conv", layer_name, strides, padding))
      c, prev_conv_channels = c_out, c_out
    elif op[0] == "pool":
      _, kind, window, stride, padding = op
      apply_ops.append(("pool", kind, window, stride, padding))
      h = (h - window) // stride + 1
      w = (w - window) // stride + 1
    elif op[0] == "flatten":
      apply_ops.append(("flatten",))
      c = h * w * c
    elif op[0] == "gap":
      apply_ops.append(("gap",))
    else:
      _, n_out = op
      key, k1, k2 = jax.random.split(key, 3)
      layer_name = f"Dense_{denses}"
      denses += 1
      params[layer_name] = {"kernel": jax.random.normal(k1, (c, n_out)) / np.sqrt(c)}
      if bias:
        params[layer_name]["bias"] = 0.1 * jax.random.normal(k2, (n_out,))
      layers.append((layer_name,))
      if prev_conv_channels is not None and c != prev_conv_channels:
        positions = c // prev_conv_channels  # dense after a flatten
        taps.append((positions, positions // 2, prev_conv_channels, n_out))
      else:
        taps.append((1, 0, c, n_out))
      apply_ops.append(("dense", layer_name))
      c, prev_conv_channels = n_out, None

  last = max(i for i, op in enumerate(apply_ops) if op[0] in ("conv", "dense"))

  def forward(p, x):
    for i, op in enumerate(apply_ops):
      if op[0] == "conv":
        layer = p[op[1]]
        x = jax.lax.conv_general_dilated(
          x, layer["kernel"], op[2], op[3], dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = x + layer.get("bias", 0.0)
      elif op[0] == "dense":
        x = x @ p[op[1]]["kernel"] + p[op[1]].get("bias", 0.0)
      elif op[0] == "pool":
        _, kind, window, stride, padding = op
        dims, steps = (1, window, window, 1), (1, stride, stride, 1)
        if kind == "max":
          x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, steps, padding)
        else:
          x = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, steps, padding) / window**2
      elif op[0] == "flatten":
        x = x.reshape(x.shape[0], -1)
      elif op[0] == "gap":
        x = x.mean(axis=(1, 2))
      if op[0] in ("conv", "dense") and i < last:
        x = jax.nn.relu(x)
    return x

  widths = [taps[0][2]] + [t[3] for t in taps]
  return params, layers, taps, widths, shape, forward


def _views(tree, layers, taps):
  views = [
    jnp.asarray(tree[n]["kernel"]).reshape(t[0], t[2], t[3])
    for (n,), t in zip(layers, taps, strict=True)
  ]
  return views, [tree[n].get("bias") for (n,) in layers]


def _problem(name, seed=0):
  params, layers, taps, widths, shape, forward = build(name, seed)
  x = jax.random.normal(jax.random.key(seed + 10), (6, *shape))
  y = jax.random.normal(jax.random.key(seed + 11), (6, widths[-1]))
  loss = lambda p: jnp.mean((forward(p, x) - y) ** 2)
  return params, layers, taps, widths, x, forward, loss


@pytest.mark.parametrize("name", sorted(NETS))
def test_structure_reads_taps_and_flatten(name):
  params, layers, taps, _widths, *_ = _problem(name)
  (struct,) = build_structure(params, layers)
  assert [(s.taps, s.centre, s.n_in, s.n_out) for s in struct.layers] == taps
  kinds = [s.kind for s in struct.layers]
  assert kinds[0] == "conv" and kinds[-1] in ("dense", "flatten")


@pytest.mark.parametrize("name", sorted(NETS))
def test_cnn_icr_equals_autodiff(name):
  params, layers, taps, widths, _x, _forward, loss = _problem(name)
  views, biases = _views(params, layers, taps)
  centres = [t[1] for t in taps]
  values, bias_values = ref.basis_values_taps(views, biases, widths, centres)
  got_values = gsgd_jax.basis_path_values(params, layers)
  for k, (n,) in enumerate(layers):
    np.testing.assert_allclose(
      np.reshape(got_values[n]["kernel"], values[k].shape), values[k], rtol=1e-12, atol=1e-15
    )

  def loss_of_values(v, vb):
    rebuilt, rb = ref.reconstruct_taps(v, vb, views, widths, centres)
    p = {
      n: {
        "kernel": rebuilt[k].reshape(params[n]["kernel"].shape),
        **({"bias": rb[k]} if biases[k] is not None else {}),
      }
      for k, (n,) in enumerate(layers)
    }
    return loss(p)

  want, want_b = jax.grad(loss_of_values, argnums=(0, 1))(values, bias_values)
  grads = jax.grad(loss)(params)
  (struct,) = build_structure(params, layers)
  got = basis.inverse_chain_rule(
    struct,
    [params[n]["kernel"] for (n,) in layers],
    biases,
    [grads[n]["kernel"] for (n,) in layers],
    [grads[n].get("bias") for (n,) in layers],
  )
  masks = ref.fixed_masks(views, widths, centres)
  scale = max(float(jnp.max(jnp.abs(g))) for g in want)
  for k in range(len(layers)):
    g = np.reshape(got.kernels[k], want[k].shape)
    np.testing.assert_allclose(
      g[~masks[k]], np.asarray(want[k])[~masks[k]], rtol=1e-8, atol=1e-10 * scale
    )
    assert np.all(g[masks[k]] == 0)
    if biases[k] is not None:
      np.testing.assert_allclose(got.biases[k], want_b[k], rtol=1e-8, atol=1e-10 * scale)


@pytest.mark.parametrize("name", sorted(NETS))
def test_cnn_weight_allocation_lands_on_v_plus_dv(name):
  params, layers, taps, widths, _x, _forward, loss = _problem(name, seed=2)
  lr = 0.05
  tx = gsgd_jax.path_space(optax.sgd(lr), layers=layers, ratio_clip=None)
  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  centres = [t[1] for t in taps]
  (struct,) = build_structure(params, layers)
  views, biases = _views(params, layers, taps)
  got = basis.inverse_chain_rule(
    struct,
    [params[n]["kernel"] for (n,) in layers],
    biases,
    [grads[n]["kernel"] for (n,) in layers],
    [grads[n].get("bias") for (n,) in layers],
  )
  before, before_b = ref.basis_values_taps(views, biases, widths, centres)
  after, after_b = ref.basis_values_taps(*_views(new, layers, taps), widths, centres)
  masks = ref.fixed_masks(views, widths, centres)
  for k in range(len(layers)):
    target = before[k] - lr * np.reshape(got.kernels[k], before[k].shape)
    tol = 1e-11 * (1 + np.max(np.abs(target)))
    np.testing.assert_allclose(after[k][~masks[k]], target[~masks[k]], rtol=1e-9, atol=tol)
    np.testing.assert_array_equal(
      np.asarray(views[k])[masks[k]], np.asarray(_views(new, layers, taps)[0][k])[masks[k]]
    )
    if biases[k] is not None:
      np.testing.assert_allclose(
        after_b[k], before_b[k] - lr * np.asarray(got.biases[k]), rtol=1e-9, atol=tol
      )


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_cnn_rescaling_invariance(name, inner):
  params, layers, _taps, _widths, x, forward, loss = _problem(name, seed=4)
  params = gsgd_jax.set_skeleton(params, layers)
  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(9))
  np.testing.assert_allclose(forward(rescaled, x), forward(params, x), rtol=1e-11, atol=1e-12)
  tx = (
    gsgd_jax.gsgd(0.02, layers=layers)
    if inner == "sgd"
    else gsgd_jax.path_space(optax.adam(3e-3), layers=layers)
  )

  (final, state_a), out_a = train_scan(tx, params, loss, 20, lambda p: forward(p, x))
  (_, state_b), out_b = train_scan(tx, rescaled, loss, 20, lambda p: forward(p, x))
  assert int(state_a.total_clipped_ratios) == int(state_b.total_clipped_ratios) == 0
  assert float(loss(final)) < 0.95 * float(loss(params))
  np.testing.assert_allclose(out_a, out_b, rtol=1e-9, atol=1e-10)
  if inner == "sgd":  # plain SGD is not invariant on the same nets
    sgd = optax.sgd(0.02)
    gap = []
    for start in (params, rescaled):
      p, state = start, sgd.init(start)
      for _ in range(20):
        updates, state = sgd.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
      gap.append(forward(p, x))
    assert float(jnp.max(jnp.abs(gap[0] - gap[1]))) > 1e-3


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _images(n=64):
  x = jax.random.normal(jax.random.key(0), (n, 8, 8, 1), jnp.float32)
  y = (jnp.mean(x[:, :4], axis=(1, 2, 3)) > jnp.mean(x[:, 4:], axis=(1, 2, 3))).astype(jnp.int32)
  return x, y + (jnp.mean(x, axis=(1, 2, 3)) > 0.1)


def test_linen_cnn_trains():
  x, y = _images()
  model = LinenCNN()
  params = model.init(jax.random.key(1), x)
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


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.convs = nnx.List(
      [nnx.Conv(1, 6, (3, 3), rngs=rngs), nnx.Conv(6, 4, (3, 3), strides=2, rngs=rngs)]
    )
    self.head = nnx.List([nnx.Linear(64, 3, rngs=rngs)])

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head[0](x.reshape(x.shape[0], -1))


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
