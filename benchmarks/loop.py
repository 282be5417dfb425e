"""Models and the jitted training loop shared by the experiment scripts."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gsgd_jax


class MLP(nn.Module):
  """ReLU MLP: hidden widths, then a linear read-out."""

  widths: tuple[int, ...]
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.relu(nn.Dense(width, use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x)


class PlainCNN(nn.Module):
  """PlainNet-style CNN: stages of 3x3 ReLU convolutions, 2x2 max pooling between
  stages, global average pooling and a dense read-out. One plain ReLU chain."""

  stages: tuple[tuple[int, ...], ...]
  num_classes: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    for s, stage in enumerate(self.stages):
      if s:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for channels in stage:
        x = nn.relu(nn.Conv(channels, (3, 3), use_bias=self.use_bias)(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias)(x.mean(axis=(1, 2)))


class ResidualBlock(nn.Module):
  """``relu(shortcut(x) + conv_b(relu(conv_a(x))))``; conv_a -> conv_b is one ReLU chain."""

  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.channels, (3, 3), self.strides, name="conv_a")(x))
    y = nn.Conv(self.channels, (3, 3), name="conv_b")(y)
    if self.strides != 1 or x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), self.strides, name="shortcut")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR-style ResNet: a stem convolution, stages of ``(channels, blocks)``
  residual blocks (stride 2 entering every stage after the first), global average
  pooling and a dense head. Each residual branch is one G-space block (as the
  authors did); stem, shortcuts and head are outside the blocks."""

  stages: tuple[tuple[int, int], ...]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.stages[0][0], (3, 3), name="stem")(x))
    for s, (channels, blocks) in enumerate(self.stages):
      for b in range(blocks):
        x = ResidualBlock(channels, 2 if s and not b else 1, name=f"stage{s}_block{b}")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))

  def gsgd_blocks(self) -> list[list[tuple[str, ...]]]:
    """The ``layers`` argument for gsgd_jax: one block per residual branch."""
    return [
      [("params", f"stage{s}_block{b}", "conv_a"), ("params", f"stage{s}_block{b}", "conv_b")]
      for s, (_, blocks) in enumerate(self.stages)
      for b in range(blocks)
    ]


BN_MOMENTUM = 0.9
"""Running-average momentum of every BatchNorm: PyTorch's default (update rate 0.1).
Flax's default 0.99 averages over hundreds of steps, too long for short runs."""


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, name=name)


class PlainNetBN(nn.Module):
  """PlainNet with BatchNorm: ``conv_i -> BN_i -> ReLU`` for every 3x3 convolution (no bias),
  global average pooling and a dense head.

  ``stages`` holds ``(channels, convs)`` pairs; the first convolution of every stage after
  the first has stride 2. Layers are numbered globally: ``conv0, bn0, conv1, ...``, ``head``.
  """

  stages: tuple[tuple[int, int], ...]
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    i = 0
    for s, (channels, convs) in enumerate(self.stages):
      for c in range(convs):
        stride = 2 if s and not c else 1
        x = nn.Conv(channels, (3, 3), stride, use_bias=False, name=f"conv{i}")(x)
        x = nn.relu(_batch_norm(train, f"bn{i}")(x))
        i += 1
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))

  @property
  def depth(self) -> int:
    """The number of convolutions."""
    return sum(convs for _, convs in self.stages)

  def gsgd_blocks(self, normalized: bool = True) -> list[gsgd_jax.Block]:
    """The blocks for gsgd_jax (paths relative to ``variables['params']``).

    ``[conv0]`` and ``[BN_k affine, conv_{k+1}]`` feed a BatchNorm (normalized);
    ``[BN_last affine, head]`` does not (average pooling commutes with the per-channel
    scaling, so the head's block is exact).

    Args:
      normalized: declare the BatchNorm-fed blocks normalized (the ``N^2`` scaling that
        makes the step invariant under per-channel rescaling). False is the ablation: the
        same chains without the scaling, and no ``[conv0]`` block (a one-layer block that
        is not normalized has no symmetry to use; the fallback gives it the same step).

    Returns:
      The list of ``gsgd_jax.Block`` for ``layers=``.
    """
    n = self.depth
    return [
      *([gsgd_jax.Block(["conv0"], normalized=True)] if normalized else []),
      *(gsgd_jax.Block([f"bn{k}", f"conv{k + 1}"], normalized=normalized) for k in range(n - 1)),
      gsgd_jax.Block([f"bn{n - 1}", "head"]),
    ]

  def stage_chains(self) -> list[list[str]]:
    """The authors' declaration: each stage's convolutions as one chain, straight through
    the BatchNorms between them (approximate: a BatchNorm undoes the rescaling of its
    inputs, so these chains' basis paths are not the network's invariants and
    ``verify_invariance`` rejects them). The norms and the head take the fallback."""
    chains, first = [], 0
    for _, convs in self.stages:
      chains.append([f"conv{i}" for i in range(first, first + convs)])
      first += convs
    return chains


class BasicBlockBN(nn.Module):
  """ResNet basic block ``relu(shortcut(x) + BN_b(conv_b(relu(BN_a(conv_a(x))))))``; the
  shortcut is a 1x1 projection convolution and a BatchNorm when the stride or width changes."""

  channels: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    y = nn.Conv(self.channels, (3, 3), self.strides, use_bias=False, name="conv_a")(x)
    y = nn.relu(_batch_norm(train, "bn_a")(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv_b")(y)
    y = _batch_norm(train, "bn_b")(y)
    if self.strides != 1 or x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), self.strides, use_bias=False, name="proj")(x)
      x = _batch_norm(train, "bn_proj")(x)
    return nn.relu(x + y)


class ResNetBN(nn.Module):
  """CIFAR-style ResNet with BatchNorm: stem ``conv -> BN -> ReLU`` (the first stage's
  width), stages of ``(channels, blocks)`` basic blocks (stride 2 entering every stage after
  the first), global average pooling and a dense head."""

  stages: tuple[tuple[int, int], ...]
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.stages[0][0], (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(_batch_norm(train, "stem_bn")(x))
    for s, (channels, blocks) in enumerate(self.stages):
      for b in range(blocks):
        strides = 2 if s and not b else 1
        x = BasicBlockBN(channels, strides, name=f"stage{s}_block{b}")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))

  def gsgd_blocks(self, normalized: bool = True) -> list[gsgd_jax.Block]:
    """The blocks for gsgd_jax (paths relative to ``variables['params']``).

    The stem, every ``conv_a`` and every projection alone (each feeds a BatchNorm), and
    ``[BN_a affine, conv_b]`` per basic block, all normalized. The stem's BatchNorm,
    ``BN_b``, the projections' BatchNorms and the head are left to the optimizer's
    fallback: the residual stream's per-channel symmetry couples all blocks.

    Args:
      normalized: declare the blocks normalized (the ``N^2`` scaling). False is the
        ablation: only the ``[BN_a affine, conv_b]`` chains, without the scaling (the
        one-layer blocks, not normalized, would have no symmetry to use; the fallback
        gives them the same step).

    Returns:
      The list of ``gsgd_jax.Block`` for ``layers=``.
    """
    one_layer = normalized  # one-layer blocks exist only for their normalization
    blocks = [gsgd_jax.Block(["stem"], normalized=True)] if one_layer else []
    width = self.stages[0][0]
    for s, (channels, count) in enumerate(self.stages):
      for b in range(count):
        name = f"stage{s}_block{b}"
        if one_layer:
          blocks.append(gsgd_jax.Block([(name, "conv_a")], normalized=True))
        blocks.append(gsgd_jax.Block([(name, "bn_a"), (name, "conv_b")], normalized=normalized))
        if one_layer and ((s and not b) or channels != width):  # a projection shortcut
          blocks.append(gsgd_jax.Block([(name, "proj")], normalized=True))
        width = channels
    return blocks


class ViTLayer(nn.Module):
  """One pre-LN transformer layer on ``(batch, tokens, dim)``: ``x + attn(ln_attn(x))``, then
  ``x + fc2(relu(fc1(ln_ff(x))))``. ``ln_ff -> fc1 -> relu -> fc2`` is a ReLU chain whose
  hidden units (``ln_ff``'s channels and ``fc1``'s outputs) may be rescaled positively: the
  G-space block. Called by ``nn.scan`` (``(carry, _) -> (carry, None)``)."""

  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm(name="ln_attn")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
    y = nn.relu(nn.Dense(self.hidden, name="fc1")(nn.LayerNorm(name="ln_ff")(x)))
    return x + nn.Dense(x.shape[-1], name="fc2")(y), None


class ViT(nn.Module):
  """A small Vision Transformer: non-overlapping ``patch x patch`` patches embedded by one
  Dense layer, a learned position embedding, ``depth`` pre-LN layers (:class:`ViTLayer`)
  under ``nn.scan`` (every layer's parameters stacked on axis 0, as models trained at scale
  store them), a final LayerNorm, the mean over tokens and a Dense head.

  Takes images ``(batch, height, width, channels)`` whose sides ``patch`` divides: 28x28
  Fashion-MNIST with ``patch=7`` gives 16 tokens, with ``patch=4`` 49.
  """

  num_classes: int
  patch: int = 7
  dim: int = 64
  hidden: int = 128
  depth: int = 4
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    n, height, width, channels = x.shape
    p = self.patch
    if height % p or width % p:
      raise ValueError(f"patch {p} does not divide the {height}x{width} images")
    # (n, H, W, C) -> (n, H/p * W/p tokens, p*p*C), tokens in row-major order of the grid.
    x = x.reshape(n, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = nn.Dense(self.dim, name="embed")(x.reshape(n, -1, p * p * channels))
    x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
    layers = nn.scan(
      ViTLayer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.depth,
      in_axes=nn.broadcast,
    )
    x, _ = layers(self.heads, self.hidden, name="layers")(x, None)
    return nn.Dense(self.num_classes, name="head")(nn.LayerNorm(name="ln_out")(x).mean(axis=1))

  def gsgd_blocks(self) -> list[gsgd_jax.Block]:
    """The blocks for gsgd_jax (paths relative to the whole variables, which the optimizer
    of this stateless model sees): every layer's ``ln_ff -> fc1 -> fc2``, declared once for
    the ``depth`` stacked copies. Attention, the other LayerNorms, the embeddings and the
    head are left to the fallback (a LayerNorm mixes the residual stream's channels, so they
    have no per-channel rescaling symmetry)."""
    scope = ("params", "layers")
    return [gsgd_jax.Block([(*scope, "ln_ff"), (*scope, "fc1"), (*scope, "fc2")], stack_axis=0)]


@functools.partial(jax.jit, static_argnums=0)
def init_variables(model: nn.Module, key: jax.Array, x: jax.Array):
  """``model.init(key, x)`` as one compiled program, compiled once per model and input
  shape (op by op, each initialiser of a deep model compiles on its own).

  Args:
    model: the Flax module (hashable: its fields are its settings).
    key: the PRNG key.
    x: an example input batch.

  Returns:
    The model's variables.
  """
  return model.init(key, x)


BN_MODELS = (PlainNetBN, ResNetBN)
"""Models with BatchNorm: their optimizer sees ``variables['params']`` and their blocks
take ``normalized``."""


DECLARATIONS = ("blocks", "stage_chains")
"""How a BatchNorm model is declared: ``blocks`` (exact: the normalized blocks of
docs/math.md) or ``stage_chains`` (the authors' approximation, PlainNet-BN only)."""


def gsgd_layers(
  model: nn.Module, params, *, normalized: bool = True, declaration: str = "blocks"
) -> list:
  """The layers (or blocks) of ``model`` for gsgd_jax: declared by the model, or
  inferred from a plain chain's names.

  Args:
    model: the Flax module.
    params: what the optimizer sees: the whole variables of a stateless model,
      ``variables['params']`` of a BatchNorm model (its blocks are relative to it).
    normalized: for BatchNorm models, declare the blocks feeding a BatchNorm normalized;
      False (the ablation without the ``N^2`` scaling) is rejected for other models.
    declaration: one of :data:`DECLARATIONS`; ``stage_chains`` applies to
      :class:`PlainNetBN` only.

  Returns:
    The ``layers`` argument of the gsgd_jax optimizers.
  """
  if declaration not in DECLARATIONS:
    raise ValueError(f"unknown declaration {declaration!r}: use one of {', '.join(DECLARATIONS)}")
  if declaration == "stage_chains":
    if not isinstance(model, PlainNetBN):
      name = type(model).__name__
      raise ValueError(f"declaration 'stage_chains' applies to PlainNetBN, not {name}")
    return model.stage_chains()
  if isinstance(model, BN_MODELS):
    return model.gsgd_blocks(normalized)
  if not normalized:
    raise ValueError(f"normalized=False applies to BatchNorm models, not {type(model).__name__}")
  if hasattr(model, "gsgd_blocks"):
    return model.gsgd_blocks()
  return gsgd_jax.infer_layers(params)


def split_variables(variables) -> tuple[Any, dict | None]:
  """Splits a model's variables into what the optimizer sees and the model state.

  Args:
    variables: the output of ``model.init``.

  Returns:
    ``(variables, None)`` for a stateless model (the optimizer sees the whole tree, as
    the stateless models always did), else ``(variables['params'], other collections)``
    (e.g. ``{'batch_stats': ...}``).
  """
  if set(variables) == {"params"}:
    return variables, None
  return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def merge_variables(params, model_state: dict | None):
  """The inverse of :func:`split_variables`: what ``model.apply`` takes."""
  return params if model_state is None else {"params": params, **model_state}


PAD = 4
"""Zero padding of the random crop (the CIFAR convention)."""


def crop_flip(key: jax.Array, x: jax.Array, pad: int = PAD) -> jax.Array:
  """Random crop from the zero-padded images and random horizontal flip, per image.

  Args:
    key: a PRNG key; the same key gives the same crops and flips.
    x: images ``(batch, height, width, channels)``.
    pad: zero padding on every side before cropping back to the original size.

  Returns:
    The augmented images, same shape and dtype.
  """
  height, width, channels = x.shape[1:]
  shift_key, flip_key = jax.random.split(key)
  shifts = jax.random.randint(shift_key, (len(x), 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (len(x),))
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image, shift, flip):
    crop = jax.lax.dynamic_slice(image, (shift[0], shift[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, shifts, flips)


AUGMENTATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {"crop_flip": crop_flip}
"""Data augmentations by config name, each ``(key, images) -> images``."""


def augmentation_keys(seed: int, epoch: int, steps: int) -> jax.Array:
  """One PRNG key per step of an epoch, a function of ``(seed, epoch)`` only, so that
  augmented runs are deterministic per seed (independent of the chunking)."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0x4A06), epoch)
  return jax.random.split(base, steps)


def make_chunk(
  model: nn.Module,
  tx: optax.GradientTransformation,
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
  *,
  scan: bool = True,
) -> Callable:
  """A function running a chunk of training steps: one jitted ``lax.scan``, or a Python
  loop over a jitted step.

  Args:
    model: the Flax module.
    tx: the optimizer, over what :func:`split_variables` calls params.
    augment: ``(key, images) -> images`` applied to every batch inside the step, or None.
    scan: run the chunk as one ``lax.scan`` (fewest dispatches); False runs a Python loop
      of jitted steps, which XLA:CPU runs far faster for convolutional models (see
      :func:`use_scan`).

  Returns:
    ``chunk(params, opt_state, model_state, xs, ys, keys) -> (params, opt_state,
    model_state, losses)``. ``model_state`` is None for a stateless model; otherwise
    (BatchNorm) the model runs with ``train=True`` and its ``batch_stats`` are carried
    through the scan. ``keys`` (one PRNG key per step) is None without augmentation.
  """

  def loss_fn(params, model_state, x, y):
    if model_state is None:
      # apply returns the outputs alone when no collection is mutable.
      logits, new_state = cast(jax.Array, model.apply(params, x)), None
    else:
      variables = merge_variables(params, model_state)
      logits, new_state = cast(
        tuple[jax.Array, Any], model.apply(variables, x, train=True, mutable=list(model_state))
      )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_state

  def step(carry, batch):
    params, opt_state, model_state = carry
    x, y, key = batch
    if augment is not None:
      x = augment(key, x)
    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, model_state, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, model_state), loss

  @jax.jit
  def chunk(params, opt_state, model_state, xs, ys, keys):
    carry = (params, opt_state, model_state)
    (params, opt_state, model_state), losses = jax.lax.scan(step, carry, (xs, ys, keys))
    return params, opt_state, model_state, losses

  jit_step = jax.jit(step)

  def loop(params, opt_state, model_state, xs, ys, keys):
    carry, losses = (params, opt_state, model_state), []
    for i in range(len(xs)):
      carry, loss = jit_step(carry, (xs[i], ys[i], None if keys is None else keys[i]))
      losses.append(loss)
    return (*carry, jnp.stack(losses))

  return chunk if scan else loop


def use_scan(model: nn.Module) -> bool:
  """Whether :func:`train` runs chunks of steps as one ``lax.scan`` by default.

  Not for the BatchNorm models on CPU: XLA:CPU runs convolutions inside a while loop
  more than ten times slower than outside one (jax-ml/jax#12868; 2.4 s against 0.15 s per
  step measured for a small PlainNetBN), so they step in a Python loop there. The other
  models keep the scan they always used.
  """
  return not (isinstance(model, BN_MODELS) and jax.default_backend() == "cpu")


def make_train_chunk(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """A jitted chunk of training steps for a stateless model without augmentation:
  ``chunk(params, opt_state, xs, ys) -> (params, opt_state, losses)``."""
  chunk = make_chunk(model, tx)

  def run(params, opt_state, xs, ys):
    params, opt_state, _, losses = chunk(params, opt_state, None, xs, ys, None)
    return params, opt_state, losses

  return run


@functools.partial(jax.jit, static_argnums=(0, 1))
def _logits(model: nn.Module, stateful: bool, variables, x) -> jax.Array:
  # A module-level jit keyed on the (hashable) module compiles once per model and batch
  # shape, not once per evaluation.
  if stateful:
    return cast(jax.Array, model.apply(variables, x, train=False))
  return cast(jax.Array, model.apply(variables, x))


def accuracy(model, params, x, y, batch=2048, model_state=None) -> float:
  """Accuracy of the model's ``argmax`` predictions.

  Args:
    model: the Flax module.
    params: what the optimizer sees (see :func:`split_variables`).
    x: inputs.
    y: integer labels.
    batch: examples per forward pass.
    model_state: the BatchNorm statistics, or None for a stateless model. BatchNorm
      models run with ``train=False``, i.e. on their running averages.

  Returns:
    The fraction of correct predictions.
  """
  variables = merge_variables(params, model_state)
  stateful = model_state is not None
  hits = 0
  for i in range(0, len(x), batch):
    logits = _logits(model, stateful, variables, x[i : i + batch])
    hits += int(jnp.sum(jnp.argmax(logits, -1) == y[i : i + batch]))
  return hits / len(x)


RECALIBRATION_BATCHES = 50
"""Training batches whose own statistics replace BatchNorm's running averages for the
recalibrated evaluation (:func:`recalibrated_accuracy`)."""


@functools.partial(jax.jit, static_argnums=0)
def _updated_stats(model: nn.Module, params, model_state, x):
  # Module-level jit keyed on the module, as _logits: one compilation per model and shape.
  variables = merge_variables(params, model_state)
  return model.apply(variables, x, train=True, mutable=list(model_state))[1]


def recalibrated_accuracy(
  model, params, model_state, train_x, test_xy, *, batch_size: int, seed: int
) -> float:
  """Test accuracy in evaluation mode after BatchNorm's statistics are re-estimated for the
  final weights: the mean of the own statistics of :data:`RECALIBRATION_BATCHES` training
  batches (drawn with ``seed``), with :func:`gsgd_jax.recalibrate_batch_stats`. The running
  averages that training leaves trail the weights they were gathered under; this is what
  the weights themselves score."""
  order = np.random.default_rng([seed, 999]).permutation(len(train_x))
  count = max(1, min(RECALIBRATION_BATCHES, len(train_x) // batch_size))
  batches = (train_x[order[i * batch_size : (i + 1) * batch_size]] for i in range(count))
  update = lambda state, x: _updated_stats(model, params, state, x)
  state = gsgd_jax.recalibrate_batch_stats(update, model_state, batches)
  return accuracy(model, params, *test_xy, model_state=state)


def total_clipped(state) -> int | None:
  """Clipped path ratios so far, wherever a ``PathSpaceState`` sits in ``state``."""
  found = [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, gsgd_jax.PathSpaceState))
    if isinstance(s, gsgd_jax.PathSpaceState)
  ]
  return sum(int(s.total_clipped_ratios) for s in found) if found else None


CURVE_STEPS = 10
"""Steps per point of an epoch's ``train_loss_curve``."""


def train(
  name: str,
  tx: optax.GradientTransformation,
  model: nn.Module,
  params,
  train_xy: Sequence[np.ndarray],
  test_xy: Sequence[np.ndarray],
  *,
  epochs: int,
  batch_size: int,
  seed: int,
  chunk_steps: int = 100,
  progress: bool = True,
  model_state: dict | None = None,
  augment: str | None = None,
  scan: bool | None = None,
):
  """Trains with shuffled mini-batches; returns per-epoch metrics and final variables.

  The batch order (and the augmentation) depends only on ``seed`` and the epoch, so
  runs are deterministic per seed and every optimizer sees the same batches.

  Args:
    name: label of the progress bar and log lines.
    tx: the optimizer over ``params``.
    model: the Flax module.
    params: what the optimizer sees (see :func:`split_variables`).
    train_xy: training inputs and labels.
    test_xy: inputs and labels of the evaluation after every epoch.
    epochs: number of passes over the training set.
    batch_size: examples per step; the last partial batch of an epoch is dropped.
    seed: the seed of the batch order and the augmentation.
    chunk_steps: steps per jitted ``lax.scan`` call.
    progress: show a progress bar and a line per epoch.
    model_state: the non-params collections of a BatchNorm model (``batch_stats``),
      updated in training mode; evaluation uses the running averages, and after the last
      epoch also statistics re-estimated for the final weights
      (``test_accuracy_recalibrated``, :func:`recalibrated_accuracy`). None for a
      stateless model.
    augment: a key of :data:`AUGMENTATIONS` (e.g. ``"crop_flip"``), applied to every
      training batch inside the jitted step, or None.
    scan: run the steps of a chunk as one ``lax.scan``; None: :func:`use_scan`.

  Returns:
    ``(history, variables)``: one dict per epoch (train loss, its curve in means of
    :data:`CURVE_STEPS` steps, test accuracy, seconds, clipped path ratios when G-SGD
    ran) and the trained variables (``params`` alone for a stateless model,
    ``{'params': ..., 'batch_stats': ...}`` otherwise).
  """
  x_train, y_train = train_xy
  if augment is not None and augment not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {augment!r}: use one of {sorted(AUGMENTATIONS)}")
  scan = use_scan(model) if scan is None else scan
  chunk = make_chunk(model, tx, AUGMENTATIONS[augment] if augment else None, scan=scan)
  state = tx.init(params)
  steps = len(x_train) // batch_size
  if steps == 0:
    raise ValueError(f"batch size {batch_size} exceeds the {len(x_train)} training examples")
  history = []
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(x_train))
    order = order[: steps * batch_size].reshape(steps, batch_size)
    keys = augmentation_keys(seed, epoch, steps) if augment else None
    losses, start = [], time.perf_counter()
    with tqdm(
      total=steps,
      desc=f"{name:>12} epoch {epoch + 1}/{epochs}",
      unit="step",
      leave=False,
      disable=not progress,
    ) as bar:
      for first in range(0, steps, chunk_steps):
        idx = order[first : first + chunk_steps]
        chunk_keys = None if keys is None else keys[first : first + chunk_steps]
        params, state, model_state, chunk_losses = chunk(
          params, state, model_state, x_train[idx], y_train[idx], chunk_keys
        )
        losses.append(np.asarray(chunk_losses))
        bar.update(len(idx))
    seconds = time.perf_counter() - start
    step_losses = np.concatenate(losses)
    windows = step_losses[: len(step_losses) // CURVE_STEPS * CURVE_STEPS]
    entry = {
      "epoch": epoch + 1,
      "train_loss": float(step_losses.mean()),
      "steps": len(step_losses),
      # The loss over the epoch, a mean per CURVE_STEPS steps (early training is where
      # optimizers differ most).
      "train_loss_curve": [float(v) for v in windows.reshape(-1, CURVE_STEPS).mean(1)],
      "test_accuracy": accuracy(model, params, *test_xy, model_state=model_state),
      "seconds": seconds,
    }
    if model_state is not None and epoch == epochs - 1:
      entry["test_accuracy_recalibrated"] = recalibrated_accuracy(
        model, params, model_state, x_train, test_xy, batch_size=batch_size, seed=seed
      )
    clipped = total_clipped(state)
    if clipped is not None:
      entry["clipped_ratios"] = clipped
    history.append(entry)
    if progress:
      tqdm.write(
        f"{name:>12} epoch {epoch + 1}: loss {entry['train_loss']:.4f}  "
        f"test acc {entry['test_accuracy']:.4f}  {seconds:.1f}s"
      )
  return history, merge_variables(params, model_state)


def seconds_per_epoch(history) -> float:
  """Mean epoch time, leaving out the first epoch (it includes compilation)."""
  times = [h["seconds"] for h in history]
  return float(np.mean(times[1:] if len(times) > 1 else times))
