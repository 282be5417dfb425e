"""Small models, written here, that reproduce the parameter trees, module names and forward
structure of public Flax models (small widths; the layouts are facts about those models,
the code is ours):

- ``ImagenetResNet``: the Flax ImageNet example's ResNet v1.5 (``conv_init``, ``bn_init``,
  ``ResNetBlock_i/{Conv_k, BatchNorm_k, conv_proj, norm_proj}``, ``Dense_0``; the last
  BatchNorm of each branch zero-initialised; ReLU after the residual sum);
- ``MnistCNN``: the Flax NNX MNIST tutorial's CNN (``conv1``, ``batch_norm1``, ``conv2``,
  ``batch_norm2``, ``linear1``, ``linear2``; dropout between ``conv1`` and its BatchNorm,
  average pooling), on 28x28 images;
- ``Lm1b``: the Flax lm1b example's pre-LN decoder (``decoder/Embed_0``,
  ``encoderdecoderblock_i/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0/{Dense_0, Dense_1}}``, ``encoderdecoder_norm``, ``logitdense``), int32 token
  inputs, every parameter boxed with ``nn.with_logical_partitioning``;
- ``ScannedT5``: t5x's scalable T5 encoder, layers scanned with their copies on axis 1
  (``encoder/encoder/{attention/{query,key,value,out}, mlp/{wi, wo} or {wi_0, wi_1, wo},
  pre_attention_layer_norm, pre_mlp_layer_norm, relpos_bias}``: kernels ``(d, L, ...)``,
  RMSNorm scales ``(d, L)``, no biases), ReLU (T5 1.0) or gated GELU (T5 1.1);
- ``BiT``: big_vision's ResNet v1 with GroupNorm and weight-standardized convolutions
  (``conv_root``, ``gn_root``, ``block1/unit1/{conv1, gn1, conv2, gn2, conv3, gn3, conv_proj,
  gn_proj}``, ``head``);
- ``PreActResNet``: a pre-activation ResNet (v2) with BatchNorm, its projection reading the
  pre-activated input as BiT's paper version does.
- ``Llama``: a LLaMA-style decoder with Hugging Face's Flax names (``model/layers/{i}/
  {input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm, mlp/{gate,up,down}
  _proj}``; RMSNorm weights named ``weight``, RoPE, SwiGLU, causal attention, no biases), its
  layers unrolled or scanned on axis 0 (``model/layers/...`` stacked).

Each has an ``epsilon`` (of its norms, and of BiT's weight standardization) that is the
public model's by default; the trajectory tests pass a negligible one, since only then is
the output rescaling of a normalized block an exact symmetry.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gsgd_jax
from benchmarks import lm

# ---------------------------------------------------------------------------------------------
# Flax examples/imagenet: ResNet v1.5.


class ResNetBlock(nn.Module):
  filters: int
  strides: tuple[int, int] = (1, 1)
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=self.epsilon
    )
    residual = x
    y = conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3))(y)
    y = norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
  filters: int
  strides: tuple[int, int] = (1, 1)
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=self.epsilon
    )
    residual = x
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(y)))
    y = norm(scale_init=nn.initializers.zeros)(conv(self.filters * 4, (1, 1))(y))
    if residual.shape != y.shape:
      residual = conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(residual)
      residual = norm(name="norm_proj")(residual)
    return nn.relu(residual + y)


class ImagenetResNet(nn.Module):
  stage_sizes: tuple[int, ...] = (1, 1)
  num_filters: int = 4
  num_classes: int = 5
  epsilon: float = 1e-5
  block: type[nn.Module] = ResNetBlock  # or BottleneckResNetBlock (ResNet-50 and up)

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                name="conv_init")(x)  # fmt: skip
    x = nn.BatchNorm(not train, momentum=0.9, epsilon=self.epsilon, name="bn_init")(x)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block(self.num_filters * 2**i, strides, self.epsilon)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def imagenet_blocks(block: type[nn.Module] = ResNetBlock, blocks=2):
  """The declaration the layout calls for (docs/math.md, "Where the blocks go"): the stem,
  each block's first convolution and projection alone, and ``[BatchNorm_i, Conv_{i+1}]``,
  all normalized."""
  from gsgd_jax import Block

  bottleneck = block is BottleneckResNetBlock
  convs = 3 if bottleneck else 2
  out = [Block(["conv_init"], normalized=True)]
  for i in range(blocks):
    b = f"{block.__name__}_{i}"
    out += [Block([f"{b}/Conv_0"], normalized=True)]
    out += [
      Block([f"{b}/BatchNorm_{k}", f"{b}/Conv_{k + 1}"], normalized=True) for k in range(convs - 1)
    ]
    if i == 1 or (bottleneck and i == 0):  # the width changes (4 -> 16 channels in a bottleneck)
      out += [Block([f"{b}/conv_proj"], normalized=True)]
  return out


# ---------------------------------------------------------------------------------------------
# Flax NNX MNIST tutorial: a CNN with BatchNorm.


class MnistCNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs, epsilon: float = 1e-5):
    self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(32, epsilon=epsilon, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025, deterministic=True)
    self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(64, epsilon=epsilon, rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025, deterministic=True)
    self.linear2 = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout2(nnx.relu(self.linear1(x)))
    return self.linear2(x)


def mnist_blocks():
  from gsgd_jax import Block

  return [
    Block(["conv1"], normalized=True),
    Block(["batch_norm1", "conv2"], normalized=True),
    Block(["batch_norm2", "linear1", "linear2"]),
  ]


# ---------------------------------------------------------------------------------------------
# Flax examples/lm1b: a pre-LN decoder with boxed (logically partitioned) params.


def _boxed(init, names):
  return nn.with_logical_partitioning(init, names)


def _sinusoids(length, d):
  position = np.arange(length)[:, None]
  rates = np.exp(-np.log(10_000.0) * np.arange(0, d, 2) / d)
  table = np.zeros((length, d))
  table[:, 0::2], table[:, 1::2] = np.sin(position * rates), np.cos(position * rates)
  return jnp.asarray(table)


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(
      self.mlp_dim,
      kernel_init=_boxed(nn.initializers.xavier_uniform(), ("embed", "mlp")),
      bias_init=_boxed(nn.initializers.normal(1e-6), ("mlp",)),
    )(x)
    return nn.Dense(
      x.shape[-1],
      kernel_init=_boxed(nn.initializers.xavier_uniform(), ("mlp", "embed")),
      bias_init=_boxed(nn.initializers.normal(1e-6), ("embed",)),
    )(nn.relu(y))


def _layer_norm(name=None, epsilon=1e-6):
  return nn.LayerNorm(
    epsilon=epsilon,
    scale_init=_boxed(nn.initializers.ones, ("embed",)),
    bias_init=_boxed(nn.initializers.zeros, ("embed",)),
    name=name,
  )


class EncoderDecoder1DBlock(nn.Module):
  heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, mask):
    y = _layer_norm()(x)
    y = nn.MultiHeadDotProductAttention(
      self.heads,
      use_bias=False,
      kernel_init=_boxed(nn.initializers.xavier_uniform(), ("embed", "kv")),
    )(y, y, mask=mask)
    x = x + y
    return x + MlpBlock(self.mlp_dim)(_layer_norm()(x))


class Decoder(nn.Module):
  vocab: int = 40
  d: int = 16
  heads: int = 2
  mlp_dim: int = 32
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(
      self.vocab, self.d, embedding_init=_boxed(nn.initializers.normal(1.0), ("vocab", "embed"))
    )
    y = embed(tokens.astype("int32")) + _sinusoids(tokens.shape[-1], self.d)
    mask = nn.combine_masks(
      nn.make_attention_mask(tokens > 0, tokens > 0), nn.make_causal_mask(tokens)
    )
    for i in range(self.layers):
      y = EncoderDecoder1DBlock(self.heads, self.mlp_dim, name=f"encoderdecoderblock_{i}")(y, mask)
    y = _layer_norm(name="encoderdecoder_norm")(y)
    return nn.Dense(
      self.vocab,
      kernel_init=_boxed(nn.initializers.xavier_uniform(), ("embed", "vocab")),
      bias_init=_boxed(nn.initializers.normal(1e-6), ("vocab",)),
      name="logitdense",
    )(y)


class Lm1b(nn.Module):
  """lm1b's TransformerLM: everything under ``decoder``."""

  @nn.compact
  def __call__(self, tokens):
    return Decoder(name="decoder")(tokens)


def lm1b_blocks(layers=2):
  from gsgd_jax import Block

  b = [f"decoder/encoderdecoderblock_{i}" for i in range(layers)]
  return [
    Block([f"{x}/LayerNorm_1", f"{x}/MlpBlock_0/Dense_0", f"{x}/MlpBlock_0/Dense_1"]) for x in b
  ]


# ---------------------------------------------------------------------------------------------
# t5x scalable T5: an encoder scanned with its layers on axis 1.


class RelativePositionBias(nn.Module):
  heads: int
  buckets: int = 32

  @nn.compact
  def __call__(self, length):
    shape = (self.heads, self.buckets)
    table = self.param("rel_embedding", nn.initializers.normal(0.1), shape, jnp.float32)
    position = np.arange(length)
    bucket = np.clip(position[None, :] - position[:, None], -16, 15) + 16
    return table[:, bucket]  # (heads, length, length)


class T5Attention(nn.Module):
  heads: int
  head_dim: int
  kv_heads: int | None = None  # MaxText's num_kv_heads: grouped-query attention

  @nn.compact
  def __call__(self, y, bias):
    dense = functools.partial(nn.DenseGeneral, use_bias=False)
    kv_heads = self.heads if self.kv_heads is None else self.kv_heads
    q = dense((self.heads, self.head_dim), name="query")(y)
    # Each key-value head serves heads // kv_heads consecutive query heads.
    shared = lambda z: jnp.repeat(z, self.heads // kv_heads, axis=-2)
    k, v = (shared(dense((kv_heads, self.head_dim), name=n)(y)) for n in ("key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
    mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v)
    return dense(y.shape[-1], axis=(-2, -1), name="out")(mixed)


class T5Mlp(nn.Module):
  mlp_dim: int
  gated: bool

  @nn.compact
  def __call__(self, y):
    dense = functools.partial(nn.DenseGeneral, use_bias=False)
    if self.gated:  # T5 1.1: a GELU gate wi_0 times a linear wi_1
      h = nn.gelu(dense(self.mlp_dim, name="wi_0")(y)) * dense(self.mlp_dim, name="wi_1")(y)
    else:  # T5 1.0
      h = nn.relu(dense(self.mlp_dim, name="wi")(y))
    return dense(y.shape[-1], name="wo")(h)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The sizes of a small T5 (t5x keeps them in one config too)."""

  vocab: int = 40
  d: int = 16
  layers: int = 3
  heads: int = 2
  head_dim: int = 4
  mlp_dim: int = 32
  gated: bool = False
  epsilon: float = 1e-6
  kv_heads: int | None = None


class T5Layer(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, _):
    c = self.config
    norm = functools.partial(nn.RMSNorm, epsilon=c.epsilon)
    bias = RelativePositionBias(c.heads, name="relpos_bias")(x.shape[1])
    y = norm(name="pre_attention_layer_norm")(x)
    x = x + T5Attention(c.heads, c.head_dim, c.kv_heads, name="attention")(y, bias)
    y = norm(name="pre_mlp_layer_norm")(x)
    return x + T5Mlp(c.mlp_dim, c.gated, name="mlp")(y), None


class T5Encoder(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x):
    scanned = nn.scan(
      T5Layer,
      variable_axes={"params": 1},  # t5x's param_scan_axis=1
      split_rngs={"params": True},
      length=self.config.layers,
    )
    x, _ = scanned(self.config, name="encoder")(x, None)
    return nn.RMSNorm(epsilon=self.config.epsilon, name="encoder_norm")(x)


class ScannedT5(nn.Module):
  config: T5Config = T5Config()

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.config.vocab, self.config.d, name="token_embedder")(tokens)
    x = T5Encoder(self.config, name="encoder")(x)
    return nn.Dense(self.config.vocab, use_bias=False, name="logits_dense")(x)


# ---------------------------------------------------------------------------------------------
# A LLaMA-style decoder with Hugging Face's Flax names (FlaxLlamaForCausalLM: ``model/
# embed_tokens``, ``model/layers/{i}/{input_layernorm, self_attn/{q,k,v,o}_proj,
# post_attention_layernorm, mlp/{gate,up,down}_proj}``, ``model/norm``, ``lm_head``; RMSNorm
# weights named ``weight``, RoPE, SwiGLU, no biases), its layers unrolled or scanned on axis 0.


class LlamaRMSNorm(nn.Module):
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + self.epsilon) * weight


rotary = lm.rotary  # RoPE, Hugging Face's half-split pairs (j, j + head_dim / 2)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int = 40
  d: int = 16
  layers: int = 2
  heads: int = 2
  hidden: int = 24
  epsilon: float = 1e-6
  kv_heads: int | None = None  # grouped-query attention (LLaMA 3, Mistral): fewer than heads

  @property
  def head_dim(self) -> int:
    return self.d // self.heads


class LlamaDecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, _=None):
    c = self.config
    # The attention and the gated block are the experiment's (benchmarks/lm.py): the same
    # names, shapes and RoPE; the norms are Hugging Face's, whose scale is 'weight'.
    y = LlamaRMSNorm(c.epsilon, name="input_layernorm")(x)
    x = x + lm.Attention(c.d, c.heads, c.kv_heads, name="self_attn")(y)
    y = LlamaRMSNorm(c.epsilon, name="post_attention_layernorm")(x)
    return x + lm.GatedMlp(c.d, c.hidden, name="mlp")(y), None


class LlamaLayerCollection(nn.Module):
  """Hugging Face's ``layers`` holding the decoder layers named ``0``, ``1``, ..."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    for i in range(self.config.layers):
      x, _ = LlamaDecoderLayer(self.config, name=str(i))(x)
    return x


class LlamaModel(nn.Module):
  config: LlamaConfig
  scanned: bool

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    x = nn.Embed(c.vocab, c.d, name="embed_tokens")(tokens)
    if self.scanned:
      layers = nn.scan(
        LlamaDecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.layers
      )
      x, _ = layers(c, name="layers")(x, None)
    else:
      x = LlamaLayerCollection(c, name="layers")(x)
    return LlamaRMSNorm(c.epsilon, name="norm")(x)


class Llama(nn.Module):
  config: LlamaConfig = LlamaConfig()
  scanned: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = LlamaModel(self.config, self.scanned, name="model")(tokens)
    return nn.Dense(self.config.vocab, use_bias=False, name="lm_head")(x)


def llama_blocks(model: Llama) -> list:
  """The hand-written declaration: per layer ``[up_proj, down_proj]`` and ``[v_proj,
  o_proj]`` (the gate and the norms outside; with grouped-query attention, the output's
  query heads grouped by ``kv_heads``)."""
  scopes = (
    ["model/layers"] if model.scanned else [f"model/layers/{i}" for i in range(model.config.layers)]
  )
  axis = 0 if model.scanned else None
  blocks = []
  for scope in scopes:
    blocks.append(
      gsgd_jax.Block([f"{scope}/mlp/up_proj", f"{scope}/mlp/down_proj"], stack_axis=axis)
    )
    c = model.config
    out = f"{scope}/self_attn/o_proj"
    if c.kv_heads is not None:
      out = gsgd_jax.Layer(out, input_axes=1, head_dim=c.head_dim, kv_heads=c.kv_heads)
    blocks.append(gsgd_jax.Block([f"{scope}/self_attn/v_proj", out], stack_axis=axis))
  return blocks


# ---------------------------------------------------------------------------------------------
# big_vision's BiT (models/bit.py): ResNet v1 with GroupNorm and weight standardization.


class StdConv(nn.Module):
  """A convolution whose kernel is standardized per output channel at every use, as
  big_vision's: ``(w - mean) / (std + eps)`` over the window and input axes."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    shape = (*self.kernel_size, x.shape[-1], self.features)
    w = self.param("kernel", nn.initializers.lecun_normal(), shape, x.dtype)
    w = (w - w.mean(axis=(0, 1, 2))) / (w.std(axis=(0, 1, 2)) + self.epsilon)
    return jax.lax.conv_general_dilated(
      x, w, self.strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class BiTUnit(nn.Module):
  features: int  # the bottleneck's width m; the unit outputs 4 m
  strides: tuple[int, int]
  groups: int
  epsilon: float

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(StdConv, epsilon=self.epsilon)
    norm = functools.partial(nn.GroupNorm, self.groups)
    residual = x
    if x.shape[-1] != 4 * self.features or self.strides != (1, 1):
      residual = conv(4 * self.features, (1, 1), self.strides, name="conv_proj")(x)
      residual = norm(name="gn_proj")(residual)
    y = nn.relu(norm(name="gn1")(conv(self.features, (1, 1), name="conv1")(x)))
    y = nn.relu(norm(name="gn2")(conv(self.features, (3, 3), self.strides, name="conv2")(y)))
    y = norm(name="gn3", scale_init=nn.initializers.zeros)(
      conv(4 * self.features, (1, 1), name="conv3")(y)
    )
    return nn.relu(residual + y)


class BiTStage(nn.Module):
  features: int
  units: int
  strides: tuple[int, int]
  groups: int
  epsilon: float

  @nn.compact
  def __call__(self, x):
    for u in range(self.units):
      strides = self.strides if u == 0 else (1, 1)
      x = BiTUnit(self.features, strides, self.groups, self.epsilon, name=f"unit{u + 1}")(x)
    return x


class BiT(nn.Module):
  width: int = 8
  depth: tuple[int, ...] = (1, 2)
  groups: int = 2  # 32 in BiT; two channels a group at least, as there
  num_classes: int = 5
  epsilon: float = 1e-5  # of the weight standardization

  @nn.compact
  def __call__(self, x):
    x = StdConv(self.width, (7, 7), (2, 2), self.epsilon, name="conv_root")(x)
    x = nn.relu(nn.GroupNorm(self.groups, name="gn_root")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for s, units in enumerate(self.depth):
      strides = (2, 2) if s > 0 else (1, 1)
      features = self.width // 2 * 2**s
      x = BiTStage(features, units, strides, self.groups, self.epsilon, name=f"block{s + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


def bit_blocks(model: BiT):
  """What can be declared in BiT: each weight-standardized convolution alone, normalized
  (it absorbs its own output columns' scale); the GroupNorms, the head and nothing else."""
  from gsgd_jax import Block

  convs = ["conv_root"]
  for s, units in enumerate(model.depth):
    for u in range(units):
      unit = f"block{s + 1}/unit{u + 1}"
      convs += [f"{unit}/conv{i}" for i in (1, 2, 3)]
      if u == 0:
        convs.append(f"{unit}/conv_proj")
  return [Block([conv], normalized=True) for conv in convs]


# ---------------------------------------------------------------------------------------------
# A pre-activation ResNet (v2) with BatchNorm.


class PreActBlock(nn.Module):
  features: int
  strides: tuple[int, int]
  epsilon: float

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, not train, epsilon=self.epsilon)
    conv = functools.partial(nn.Conv, use_bias=False)
    shortcut = x
    x = nn.relu(norm(name="bn1")(x))
    if shortcut.shape[-1] != self.features or self.strides != (1, 1):
      shortcut = conv(self.features, (1, 1), self.strides, name="conv_proj")(x)  # pre-activated
    y = conv(self.features, (3, 3), self.strides, name="conv1")(x)
    y = conv(self.features, (3, 3), name="conv2")(nn.relu(norm(name="bn2")(y)))
    return shortcut + y


class PreActResNet(nn.Module):
  widths: tuple[int, ...] = (4, 6)
  num_classes: int = 5
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="conv_root")(x)
    width = self.widths[0]
    for i, features in enumerate(self.widths):
      strides = (1, 1) if features == width else (2, 2)
      x = PreActBlock(features, strides, self.epsilon, name=f"block{i}")(x, train)
      width = features
    x = nn.relu(nn.BatchNorm(not train, epsilon=self.epsilon, name="bn_final")(x))
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def preact_blocks():
  from gsgd_jax import Block

  return [
    Block(["block0/bn1", "block0/conv1"], normalized=True),
    Block(["block0/bn2", "block0/conv2"]),
    Block(["block1/conv1"], normalized=True),  # its bn1 also feeds the projection
    Block(["block1/bn2", "block1/conv2"]),
    Block(["bn_final", "head"]),
  ]
