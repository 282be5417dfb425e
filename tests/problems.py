"""The set-ups several test files build: networks with data and a loss, Flax models, optimizers.

``reference.py`` is the independent float64 oracle and stays free of set-up code; this module
builds the problems the tests run the library and the oracle on:

* ``make_mlp`` and ``mlp``: dense ReLU chains of given widths, with or without biases, with
  regression data (random targets or a teacher network's) and a squared-error loss;
* ``CNNS`` and ``cnn``: plain ReLU convolutional networks (convolutions, pooling, flatten or
  global pooling, dense read-out) written with ``jax.lax``, with their reference views;
* ``LinenMLP``, ``NNXMLP``, ``LinenCNN`` and ``NNXCNN``: the Flax models, and ``linen``: a
  Linen model's problem in float64;
* ``two_blocks``: two independent chains with leaves outside both, for blocks and fallbacks;
* ``OPTIMIZERS`` and ``make_optimizer``: the public optimizers and the hyperparameters the
  invariance, conformance, sharding and memory tests run them with.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from flax import nnx

import gsgd_jax
from gsgd_jax._src.pytree import key_name


class Problem(NamedTuple):
  """A network with its data; ``loss(params)`` is the squared error of
  ``forward(params, x)`` against ``y``."""

  params: dict
  layers: list  # [(name,), ...] in forward order
  loss: Callable[[Any], jax.Array]
  forward: Callable[[Any, jax.Array], jax.Array]
  x: jax.Array
  y: jax.Array
  widths: tuple[int, ...] = ()  # nodes per level: units, or channels
  # Per layer (taps, skeleton tap, n_in, n_out): the (taps, n_in, n_out) view of its kernel
  # that reference.py computes on; (1, 0, n_in, n_out) for a dense layer.
  taps: Sequence[tuple[int, int, int, int]] = ()


def squared_error(forward, x, y, reduce=jnp.mean):
  """``reduce((forward(p, x) - y) ** 2)``, in float32 at least (float16 and bfloat16
  networks)."""

  def loss(p):
    out = forward(p, x)
    dtype = jnp.promote_types(out.dtype, jnp.float32)
    return reduce((out.astype(dtype) - y.astype(dtype)) ** 2)

  return loss


# ----------------------------------------------------------------------------
# Dense chains.


def normal(key, shape, dtype=jnp.float64):
  """N(0, 1) draws of ``shape``, by NumPy from the bits of ``key``: jax.random compiles a
  program for every new shape, most of the time of building a small problem."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  return jnp.asarray(rng.standard_normal(shape), dtype)


def make_mlp(key, widths, bias=True, dtype=jnp.float64, layer_names=None):
  """Random params ``{'Dense_k': {'kernel', 'bias'}}`` (random signs, scale
  ``1/sqrt(fan-in)``, biases 0.1 N(0, 1)) and the layers ``[('Dense_k',), ...]``."""
  names = layer_names or [f"Dense_{k}" for k in range(len(widths) - 1)]
  params = {}
  for name, (n_in, n_out) in zip(names, itertools.pairwise(widths), strict=True):
    key, k1, k2 = jax.random.split(key, 3)
    layer = {"kernel": (normal(k1, (n_in, n_out)) / np.sqrt(n_in)).astype(dtype)}
    if bias:
      layer["bias"] = (0.1 * normal(k2, (n_out,))).astype(dtype)
    params[name] = layer
  return params, [(n,) for n in names]


def mlp(
  widths,
  *,
  bias=True,
  seed=0,
  dtype=jnp.float64,
  skeleton=False,
  batch=32,
  reduce=jnp.mean,
  teacher=False,
  output_scale=False,
  kernel_scale=1.0,
):
  """A ReLU MLP of ``widths`` (``make_mlp(key(seed))``) on ``batch`` inputs N(0, 1).

  ``skeleton``: skeleton weights set to 1 (``gsgd_jax.set_skeleton``), as the authors
  train. Targets are N(0, 1), or with ``teacher`` the outputs of another random MLP of
  the same widths (a function the network can fit). ``kernel_scale`` multiplies the
  kernels before the skeleton is set: small, with ``skeleton``, every layer nearly
  passes its inputs on, and a deep chain neither explodes nor dies. ``output_scale`` adds a leaf
  ``'scale'`` (ones) outside the layers that multiplies the outputs: something for a
  fallback, a mask or a partition to handle.
  """
  params, layers = make_mlp(jax.random.key(seed), widths, bias, dtype)
  params = {
    name: {**layer, "kernel": kernel_scale * layer["kernel"]} for name, layer in params.items()
  }
  if skeleton:
    params = gsgd_jax.set_skeleton(params, layers)
  x = normal(jax.random.key(seed + 1), (batch, widths[0]))
  if teacher:
    y = ref.forward(make_mlp(jax.random.key(seed + 9), widths)[0], layers, x)
  else:
    y = normal(jax.random.key(seed + 2), (batch, widths[-1]))
  x, y = x.astype(dtype), y.astype(dtype)
  if output_scale:
    params["scale"] = jnp.ones(widths[-1], dtype)
    forward = lambda p, x: ref.forward(p, layers, x) * p["scale"]
  else:
    forward = lambda p, x: ref.forward(p, layers, x)
  taps = [(1, 0, a, b) for a, b in itertools.pairwise(widths)]
  loss = squared_error(forward, x, y, reduce)
  return Problem(params, layers, loss, forward, x, y, tuple(widths), taps)


# Equal, expanding, narrowing, width 1 and depths 1-6. `make test` runs one of each kind
# (WIDTHS_IN_MAKE_TEST), `make test-all` every one.
WIDTHS = [
  (5, 3),
  (3, 4, 2),
  (4, 4, 4, 4),
  (3, 8, 8, 2),
  (8, 5, 3, 2),
  (2, 3, 7, 12, 4),
  (3, 2, 7, 1, 4),
  (1, 1, 1, 1),
  (2, 1, 5, 1),
  (4, 6, 6, 6, 6, 6, 3),
  (7, 3, 9, 2, 6, 4, 5),
]
WIDTHS_IN_MAKE_TEST = {
  (5, 3),
  (3, 4, 2),
  (3, 8, 8, 2),
  (3, 2, 7, 1, 4),
  (1, 1, 1, 1),
  (7, 3, 9, 2, 6, 4, 5),
}


# ----------------------------------------------------------------------------
# Plain ReLU CNNs written with jax.lax.
#
# Each net: input shape (H, W, C), biases or not, then ops. ('conv', kh, kw, c_out, stride,
# padding), ('pool', kind, window, stride, padding), ('flatten',), ('gap',), ('dense', n_out).
CNNS = {
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
NHWC = ("NHWC", "HWIO", "NHWC")


class _Level(NamedTuple):
  """The shape of the activations between two ops."""

  h: int
  w: int
  c: int  # channels, or units after a flatten or a dense layer
  conv_channels: int | None  # channels of the last convolution, until a dense layer


def _conv(op, level):
  """A convolution: (kernel shape, taps entry, step, next level)."""
  _, kh, kw, c_out, stride, padding = op
  strides = (stride, stride) if isinstance(stride, int) else stride
  step = lambda x, layer: (
    jax.lax.conv_general_dilated(x, layer["kernel"], strides, padding, dimension_numbers=NHWC)
    + layer.get("bias", 0.0)
  )
  kernel = (kh, kw, level.c, c_out)
  out = jax.eval_shape(
    step, jnp.zeros((1, level.h, level.w, level.c)), {"kernel": jnp.zeros(kernel)}
  )
  taps = (kh * kw, (kh // 2) * kw + kw // 2, level.c, c_out)
  return kernel, taps, step, _Level(*out.shape[1:3], c_out, c_out)


def _dense(op, level):
  """A dense layer: (kernel shape, taps entry, step, next level). After a flatten its
  rows are positions x channels: one tap per position."""
  n_out, c, channels = op[1], level.c, level.conv_channels
  if channels is not None and c != channels:
    positions = c // channels
    taps = (positions, positions // 2, channels, n_out)
  else:
    taps = (1, 0, c, n_out)
  step = lambda x, layer: x @ layer["kernel"] + layer.get("bias", 0.0)
  return (c, n_out), taps, step, level._replace(c=n_out, conv_channels=None)


def _pool(op, level):
  """A max or average pool (VALID): (step, next level)."""
  _, kind, window, stride, padding = op
  dims, steps = (1, window, window, 1), (1, stride, stride, 1)
  if kind == "max":
    step = lambda x, _: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, steps, padding)
  else:
    step = lambda x, _: jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, steps, padding) / window**2
  size = lambda n: (n - window) // stride + 1
  return step, level._replace(h=size(level.h), w=size(level.w))


def _flatten(_op, level):
  return lambda x, _: x.reshape(x.shape[0], -1), level._replace(c=level.h * level.w * level.c)


def _global_average_pool(_op, level):
  return lambda x, _: x.mean(axis=(1, 2)), level


LAYER_OPS = {"conv": ("Conv", _conv), "dense": ("Dense", _dense)}
SHAPE_OPS = {"pool": _pool, "flatten": _flatten, "gap": _global_average_pool}


def _layer_params(key, kernel_shape, bias):
  """Kernel N(0, 1/fan-in), bias 0.1 N(0, 1); returns the next key too."""
  key, k1, k2 = jax.random.split(key, 3)
  layer = {"kernel": normal(k1, kernel_shape) / np.sqrt(np.prod(kernel_shape[:-1]))}
  if bias:
    layer["bias"] = 0.1 * normal(k2, kernel_shape[-1:])
  return key, layer


def cnn(name, seed=0, batch=6):
  """The CNN ``CNNS[name]`` with random weights, ``batch`` random images and targets."""
  shape, bias, ops = CNNS[name]
  key = jax.random.key(seed)
  level = _Level(*shape, conv_channels=None)
  params, layers, taps, plan = {}, [], [], []
  for op in ops:
    if op[0] in LAYER_OPS:
      prefix, make = LAYER_OPS[op[0]]
      layer_name = f"{prefix}_{sum(n.startswith(prefix) for n in params)}"
      kernel_shape, tap, step, level = make(op, level)
      key, params[layer_name] = _layer_params(key, kernel_shape, bias)
      layers.append((layer_name,))
      taps.append(tap)
    else:
      layer_name = None
      step, level = SHAPE_OPS[op[0]](op, level)
    plan.append((step, layer_name))
  last = max(i for i, (_, layer_name) in enumerate(plan) if layer_name is not None)

  def forward(p, x):
    for i, (step, layer_name) in enumerate(plan):
      x = step(x, None if layer_name is None else p[layer_name])
      if layer_name is not None and i < last:
        x = jax.nn.relu(x)
    return x

  widths = (taps[0][2], *(t[3] for t in taps))
  x = normal(jax.random.key(seed + 10), (batch, *shape))
  y = normal(jax.random.key(seed + 11), (batch, widths[-1]))
  return Problem(params, layers, squared_error(forward, x, y), forward, x, y, widths, taps)


def views(tree, problem):
  """The kernels of ``tree`` as reference views ``(taps, n_in, n_out)`` and its biases
  (None where a layer has none)."""
  kernels = [
    jnp.asarray(tree[n]["kernel"]).reshape(t, a, b)
    for (n,), (t, _, a, b) in zip(problem.layers, problem.taps, strict=True)
  ]
  return kernels, [tree[n].get("bias") for (n,) in problem.layers]


# ----------------------------------------------------------------------------
# Two blocks and leaves outside them.

BLOCKS = [["a0", "a1"], ["b0", "b1", "b2"]]


def two_blocks(seed=0):
  """Two independent chains, ``a`` (5 -> 7 -> 6) and ``b`` (6 -> 8 -> 4 -> 3), joined by a
  ReLU and a per-unit ``'scale'``, then a ``'shift'`` of the outputs: leaves outside
  both blocks. Skeletons set, batch of 16."""
  a, _ = make_mlp(jax.random.key(seed), (5, 7, 6), layer_names=["a0", "a1"])
  b, _ = make_mlp(jax.random.key(seed + 1), (6, 8, 4, 3), layer_names=["b0", "b1", "b2"])
  params = {**a, **b, "scale": jnp.linspace(0.5, 1.5, 6), "shift": jnp.zeros(3)}
  params = gsgd_jax.set_skeleton(params, BLOCKS)
  x = normal(jax.random.key(seed + 2), (16, 5))
  y = normal(jax.random.key(seed + 3), (16, 3))

  def forward(p, x):
    h = ref.forward(p, [("a0",), ("a1",)], x)
    h = jax.nn.relu(h) * p["scale"]  # between blocks: outside both, like a norm scale
    return ref.forward(p, [("b0",), ("b1",), ("b2",)], h) + p["shift"]

  return Problem(params, BLOCKS, squared_error(forward, x, y), forward, x, y)


# ----------------------------------------------------------------------------
# Flax models.


def linen(model, x_shape, seed=0):
  """A Linen ``model`` in float64 on ``x_shape`` inputs N(0, 1) and targets N(0, 1):
  layers inferred, skeleton set, and every bias shifted by 0.1 (non-zero biases)."""
  x = jax.random.normal(jax.random.key(seed), x_shape, jnp.float64)
  params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(seed + 1), x))
  layers = gsgd_jax.infer_layers(params)
  params = shift_biases(gsgd_jax.set_skeleton(params, layers))
  out = jax.eval_shape(model.apply, params, x)
  y = jax.random.normal(jax.random.key(seed + 2), out.shape, jnp.float64)
  return Problem(params, layers, squared_error(model.apply, x, y), model.apply, x, y)


class LinenMLP(nn.Module):
  """ReLU MLP with hidden widths ``widths[:-1]`` and ``widths[-1]`` outputs."""

  widths: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for w in self.widths[:-1]:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(self.widths[-1])(x)


class NNXMLP(nnx.Module):
  """ReLU MLP of ``widths`` (inputs first) in an ``nnx.List`` named ``layers``."""

  def __init__(self, widths, rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.relu(layer(x))
    return self.layers[-1](x)


class LinenCNN(nn.Module):
  """Two 3x3 convolutions (a max pool, a stride), a flatten of 4 positions, two dense
  layers; for 8x8 images of one channel."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


class NNXCNN(nnx.Module):
  """Two 3x3 convolutions (the second with stride 2) and a flatten into a dense head; for
  8x8 images of one channel."""

  def __init__(self, rngs):
    self.convs = nnx.List(
      [nnx.Conv(1, 6, (3, 3), rngs=rngs), nnx.Conv(6, 4, (3, 3), strides=2, rngs=rngs)]
    )
    self.head = nnx.List([nnx.Linear(64, 3, rngs=rngs)])

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head[0](x.reshape(x.shape[0], -1))


# ----------------------------------------------------------------------------
# Models with normalization layers (docs/math.md, normalization layers), in training mode.
#
# BatchNorm's epsilon makes the output rescaling (S1) approximate; the exactness tests
# use NORM_EPSILON, negligible against the variances here.

NORM_EPSILON = 1e-14


class PlainNetBN(nn.Module):
  """``conv_i -> BN_i -> ReLU`` for each of ``channels`` (3x3, no bias), global average
  pool, dense head."""

  channels: tuple[int, ...]
  classes: int = 3
  conv: Any = nn.Conv  # or gsgd_jax.probes.Conv

  @nn.compact
  def __call__(self, x, train: bool = True):
    for i, c in enumerate(self.channels):
      x = self.conv(c, (3, 3), use_bias=False, name=f"conv{i}")(x)
      x = nn.BatchNorm(not train, epsilon=NORM_EPSILON, name=f"bn{i}")(x)
      x = nn.relu(x)
    return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


class NNXPlainNetBN(nnx.Module):
  """:class:`PlainNetBN` in NNX (float64; BatchNorm in training mode): ``convs``, ``norms``
  and ``head``."""

  def __init__(self, in_channels, channels, rngs, classes=3):
    f64 = {"param_dtype": jnp.float64, "rngs": rngs}
    pairs = itertools.pairwise((in_channels, *channels))
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), use_bias=False, **f64) for a, b in pairs])
    self.norms = nnx.List([nnx.BatchNorm(c, epsilon=NORM_EPSILON, **f64) for c in channels])
    self.head = nnx.Linear(channels[-1], classes, **f64)

  def __call__(self, x):
    for conv, norm in zip(self.convs, self.norms, strict=True):
      x = nnx.relu(norm(conv(x)))
    return self.head(x.mean(axis=(1, 2)))

  def blocks(self):
    n = len(self.convs)
    return [
      gsgd_jax.Block([("convs", 0)], normalized=True),
      *(gsgd_jax.Block([("norms", i), ("convs", i + 1)], normalized=True) for i in range(n - 1)),
      gsgd_jax.Block([("norms", n - 1), ("head",)]),
    ]


def nnx_norm(model, x_shape, seed=0):
  """An NNX model with BatchNorm as a :class:`NormProblem` over its ``nnx.Param`` state:
  skeleton set; the other variables (batch statistics) held fixed, BatchNorm in training
  mode."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = jax.tree.map(lambda a: a.astype(jnp.float64), rest)  # (batch statistics)
  layers = model.blocks()
  params = gsgd_jax.set_skeleton(params, layers)
  x = jax.random.normal(jax.random.key(seed), x_shape, jnp.float64)

  def forward(p, inputs):
    # A copy: the BatchNorms update their statistics, which may not leak out of a trace.
    return nnx.merge(graphdef, p, rest, copy=True)(inputs)

  y = jax.random.normal(jax.random.key(seed + 2), jax.eval_shape(forward, params, x).shape)
  return NormProblem(params, layers, squared_error(forward, x, y), forward, x, y)


def plainnet_bn_blocks(depth, normalized=True):
  """PlainNet-with-BN blocks (paths in params): ``[conv0]`` and ``[BN_i affine,
  conv_{i+1}]`` normalized, and
  ``[BN_last affine, head]``. ``normalized=False`` declares the same blocks without the
  ``N^2`` scaling (not invariant under the output rescaling)."""
  block = gsgd_jax.Block
  return [
    block(["conv0"], normalized=normalized),
    *(block([f"bn{i}", f"conv{i + 1}"], normalized=normalized) for i in range(depth - 1)),
    block([f"bn{depth - 1}", "head"]),
  ]


class BasicBlockBN(nn.Module):
  """ResNet basic block: ``conv_a -> BN_a -> ReLU -> conv_b -> BN_b``, plus the input
  (through a 1x1 projection and BN when the width or stride changes), then ReLU."""

  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, not train, epsilon=NORM_EPSILON)
    y = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False, name="conv_a")(x)
    y = nn.relu(norm(name="bn_a")(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv_b")(y)
    y = norm(name="bn_b")(y)
    if x.shape[-1] != self.channels or self.stride != 1:
      x = nn.Conv(self.channels, (1, 1), self.stride, use_bias=False, name="proj")(x)
      x = norm(name="bn_proj")(x)
    return nn.relu(x + y)


class ResNetBN(nn.Module):
  """Stem ``conv -> BN -> ReLU``, basic blocks of ``channels`` (stride 2 where the width
  changes), global average pool, dense head."""

  stem: int
  channels: tuple[int, ...]
  classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.stem, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(not train, epsilon=NORM_EPSILON, name="stem_bn")(x))
    width = self.stem
    for i, c in enumerate(self.channels):
      x = BasicBlockBN(c, 1 if c == width else 2, name=f"block{i}")(x, train)
      width = c
    return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


def resnet_bn_blocks(model: ResNetBN, normalized=True):
  """The ResNet-with-BN declaration (paths in params): the stem, each block's ``conv_a``
  and projection
  alone, and ``[BN_a affine, conv_b]``, all normalized; the stem's norm, ``BN_b``, the
  projections' norms and the head take the fallback."""
  blocks = [gsgd_jax.Block(["stem"], normalized=normalized)]
  width = model.stem
  for i, c in enumerate(model.channels):
    b = f"block{i}"
    blocks.append(gsgd_jax.Block([f"{b}/conv_a"], normalized=normalized))
    blocks.append(gsgd_jax.Block([f"{b}/bn_a", f"{b}/conv_b"], normalized=normalized))
    if c != width:
      blocks.append(gsgd_jax.Block([f"{b}/proj"], normalized=normalized))
    width = c
  return blocks


class PreLNFeedForward(nn.Module):
  """Tokens ``(batch, seq, d)``: ``x + fc2(relu(fc1(LN(x))))`` twice (pre-LN feed-forward
  blocks with residual connections), a final LN and a dense read-out."""

  d: int = 4
  hidden: int = 6
  blocks: int = 2
  dense: Any = nn.Dense  # of fc1 (the hidden layer): or gsgd_jax.probes.Dense

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      y = nn.LayerNorm(epsilon=NORM_EPSILON, name=f"ln{i}")(x)
      y = self.dense(self.hidden, name=f"fc1_{i}")(y)
      x = x + nn.Dense(self.d, name=f"fc2_{i}")(nn.relu(y))
    return nn.Dense(2, name="out")(nn.LayerNorm(epsilon=NORM_EPSILON, name="ln_out")(x))


def preln_blocks(model: PreLNFeedForward):
  """One block ``[LN affine, fc1, fc2]`` per feed-forward block."""
  return [gsgd_jax.Block([f"ln{i}", f"fc1_{i}", f"fc2_{i}"]) for i in range(model.blocks)]


class NormProblem(NamedTuple):
  """A model with normalization layers in float64: ``forward(params, x)`` runs it in
  training mode (batch statistics), ``loss(params)`` is its squared error on ``(x, y)``."""

  params: dict
  layers: list
  loss: Callable[[Any], jax.Array]
  forward: Callable[[Any, jax.Array], jax.Array]
  x: jax.Array
  y: jax.Array


def shift_biases(params, shift=0.1):
  """Every ``bias`` shifted (non-zero biases, so that their paths count)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, a: a + shift if key_name(path[-1]) == "bias" else a, params
  )


def linen_norm(model, layers, x_shape, seed=0):
  """A Linen model with BatchNorm or LayerNorm as a :class:`NormProblem`: float64, skeleton
  set, biases shifted by 0.1, scales drawn in [0.5, 1.5]; BatchNorm in training mode."""
  x = jax.random.normal(jax.random.key(seed), x_shape, jnp.float64)
  variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(seed + 1), x))
  params = gsgd_jax.set_skeleton(variables["params"], layers)
  params = jax.tree_util.tree_map_with_path(
    lambda path, a: (
      a * np.random.default_rng(seed).uniform(0.5, 1.5, a.shape)
      if key_name(path[-1]) == "scale"
      else a
    ),
    shift_biases(params),
  )
  state = {k: v for k, v in variables.items() if k != "params"}

  def forward(p, inputs):
    if not state:
      return model.apply({"params": p}, inputs)
    return model.apply({"params": p, **state}, inputs, mutable=list(state))[0]

  y = jax.random.normal(jax.random.key(seed + 2), jax.eval_shape(forward, params, x).shape)
  return NormProblem(params, layers, squared_error(forward, x, y), forward, x, y)


# ----------------------------------------------------------------------------
# The optimizers.


class Optimizer(NamedTuple):
  factory: Callable[..., Any]  # factory(**hyper, layers=...)
  hyper: dict[str, Any]
  # How many trees shaped like the params its state keeps (momentum, Adam's two moments):
  # what optax.tree_map_params maps.
  param_trees: int


OPTIMIZERS = {
  "gsgd": Optimizer(gsgd_jax.gsgd, {"learning_rate": 0.05}, 0),
  "g_momentum": Optimizer(gsgd_jax.g_momentum, {"learning_rate": 0.01, "momentum": 0.9}, 1),
  "g_nesterov": Optimizer(
    functools.partial(gsgd_jax.g_momentum, nesterov=True),
    {"learning_rate": 0.01, "momentum": 0.9},
    1,
  ),
  "g_adam": Optimizer(gsgd_jax.g_adam, {"learning_rate": 3e-3}, 2),
  "g_adamw": Optimizer(gsgd_jax.g_adamw, {"learning_rate": 3e-3, "weight_decay": 0.1}, 2),
  "g_rmsprop": Optimizer(gsgd_jax.g_rmsprop, {"learning_rate": 1e-3}, 1),
  "path_sgd": Optimizer(gsgd_jax.path_sgd, {"learning_rate": 0.05}, 0),
}


def make_optimizer(name, layers, **overrides):
  """``OPTIMIZERS[name]`` for ``layers``, hyperparameters overridden by ``overrides``."""
  factory, hyper, _ = OPTIMIZERS[name]
  return factory(**{**hyper, **overrides}, layers=layers)


# ----------------------------------------------------------------------------
# Library warnings some tests provoke on purpose; each test that allows one says why.

# A chain of one layer has no hidden nodes; the library warns that the declaration is
# probably a mistake (a flat chain written as blocks).
ALLOW_ONE_LAYER = pytest.mark.filterwarnings("ignore:a block of `layers` has one layer:UserWarning")
# Skeleton weights left at a random init: the chain products B*F of the hidden nodes are far
# from 1, and init warns that training may diverge.
ALLOW_CHAIN_RANGE = pytest.mark.filterwarnings(
  "ignore:G-SGD. skeleton-chain products B.F of the hidden nodes:UserWarning"
)


def widths_cases(widths_list, fast=None):
  """``widths_list`` as parameters named by their widths; depth-1 chains (one layer, no
  hidden node: the edge case of every formula) allow the one-layer warning. Widths not in
  ``fast`` (where given) are marked slow."""

  def marks(w):
    return [
      *([ALLOW_ONE_LAYER] if len(w) == 2 else []),
      *([pytest.mark.slow] if fast is not None and tuple(w) not in fast else []),
    ]

  return [pytest.param(w, id=str(w), marks=marks(w)) for w in widths_list]
