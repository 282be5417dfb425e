"""infer_blocks: the block declarations of docs/math.md ("Where the blocks go") written from a
params tree's names and shapes, for plain CNNs and ResNets with BatchNorm and pre-LN
transformer feed-forward blocks; and the trees it refuses, naming their layers.

Most trees here come from ``jax.eval_shape(model.init, ...)``: names and shapes are all
infer_blocks reads.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from problems import (
  NORM_EPSILON,
  NNXPlainNetBN,
  PlainNetBN,
  PreLNFeedForward,
  ResNetBN,
  plainnet_bn_blocks,
  preln_blocks,
  resnet_bn_blocks,
)

import gsgd_jax
from gsgd_jax._src.layouts import infer_blocks
from gsgd_jax._src.pytree import key_name

Block = gsgd_jax.Block


def _params(model, x_shape):
  """``variables['params']`` of a Linen model, as shapes only."""
  return _variables(model, x_shape)["params"]


def _variables(model, x_shape):
  """All the variables of a Linen model, as shapes only."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.ones(x_shape))


def _tree(**layers):
  """A params tree written by hand: ``name=shape`` is a kernel (or, with a 1-tuple, a norm's
  scale); ``/`` in a name (written ``__``) nests it."""
  tree: dict = {}
  for name, shape in layers.items():
    *parents, last = name.split("__")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    leaf = "scale" if len(shape) == 1 else "kernel"
    node[last] = {leaf: jax.ShapeDtypeStruct(shape, jnp.float32)}
  return tree


# ----------------------------------------------------------------------------
# Plain CNNs with BatchNorm.


class AutoPlainNet(nn.Module):
  """Linen auto names: ``Conv_i -> BatchNorm_i -> ReLU``, then ``Dense_0 -> ReLU ->
  Dense_1``."""

  channels: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(c, (3, 3))(x)))
    # Linen numbers modules as they are built: build each before the next.
    x = nn.relu(nn.Dense(5)(x.mean(axis=(1, 2))))
    return nn.Dense(2)(x)


def test_plainnet_reproduces_the_hand_written_declaration():
  got = infer_blocks(_params(PlainNetBN((4, 5, 4)), (1, 5, 5, 2)), "plainnet")
  assert got == plainnet_bn_blocks(3)


def test_plainnet_from_a_frozen_dict():
  params = flax.core.freeze(_params(PlainNetBN((4, 5)), (1, 5, 5, 2)))
  assert infer_blocks(params, "plainnet") == plainnet_bn_blocks(2)


def test_plainnet_nnx_lists():
  """``norms/0`` says nothing of its kind; the whole NNX state holds each BatchNorm's
  statistics beside its scale, and they do."""
  model = nnx.eval_shape(lambda: NNXPlainNetBN(2, (3, 4, 5), nnx.Rngs(0)))
  assert infer_blocks(nnx.state(model), "plainnet") == model.blocks()
  with pytest.raises(ValueError, match=r"the names of the norms 'norms/0', .* do not say"):
    infer_blocks(nnx.state(model, nnx.Param), "plainnet")


def test_plainnet_linen_auto_names_order_numerically_with_a_two_layer_head():
  """Eleven convolutions: ``Conv_10`` comes after ``Conv_9``, not after ``Conv_1`` (the
  pytree order)."""
  channels = (3, 4) * 5 + (6,)
  got = infer_blocks(_params(AutoPlainNet(channels), (1, 4, 4, 2)), "plainnet")
  n = len(channels)
  want = [
    Block(["Conv_0"], normalized=True),
    *(Block([f"BatchNorm_{i}", f"Conv_{i + 1}"], normalized=True) for i in range(n - 1)),
    Block([f"BatchNorm_{n - 1}", "Dense_0", "Dense_1"]),
  ]
  assert got == want


def test_plainnet_lettered_names():
  tree = _tree(conv_a=(3, 3, 2, 4), bn_a=(4,), conv_b=(3, 3, 4, 5), bn_b=(5,), classifier=(5, 3))
  assert infer_blocks(tree, "plainnet") == [
    Block(["conv_a"], normalized=True),
    Block(["bn_a", "conv_b"], normalized=True),
    Block(["bn_b", "classifier"]),
  ]


# ----------------------------------------------------------------------------
# ResNets with BatchNorm.


def test_resnet_reproduces_the_hand_written_declaration_with_a_projection():
  model = ResNetBN(3, (3, 4, 4))
  got = infer_blocks(_params(model, (1, 6, 6, 2)), "resnet")
  assert got == resnet_bn_blocks(model)
  assert Block(["block1/proj"], normalized=True) in got


class ImagenetBasic(nn.Module):
  """The Flax imagenet example's ResNetBlock naming: ``Conv_0, BatchNorm_0, Conv_1,
  BatchNorm_1`` and, when the shape changes, ``conv_proj, norm_proj``."""

  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=False, epsilon=NORM_EPSILON)
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
    y = norm(scale_init=nn.initializers.zeros_init())(conv(self.filters, (3, 3))(y))
    if x.shape != y.shape:
      x = conv(self.filters, (1, 1), self.strides, name="conv_proj")(x)
      x = norm(name="norm_proj")(x)
    return nn.relu(x + y)


class ImagenetBottleneck(nn.Module):
  """The Flax imagenet example's BottleneckResNetBlock naming: three main convolutions."""

  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(nn.BatchNorm, use_running_average=False, epsilon=NORM_EPSILON)
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(y)))
    y = norm()(conv(self.filters * 4, (1, 1))(y))
    if x.shape != y.shape:
      x = norm(name="norm_proj")(conv(self.filters * 4, (1, 1), self.strides, name="conv_proj")(x))
    return nn.relu(x + y)


class ImagenetResNet(nn.Module):
  """Stem ``conv_init, bn_init``, auto-named blocks, ``Dense_0`` head."""

  block: type
  stages: tuple[int, ...]  # filters of each block; stride 2 where they change

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.relu(nn.BatchNorm(False, epsilon=NORM_EPSILON, name="bn_init")(x))
    previous = None
    for filters in self.stages:
      x = self.block(filters, 1 if previous in (None, filters) else 2)(x)
      previous = filters
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def _imagenet_main(block, convs):
  return [
    Block([f"{block}/Conv_0"], normalized=True),
    *(
      Block([f"{block}/BatchNorm_{i}", f"{block}/Conv_{i + 1}"], normalized=True)
      for i in range(convs - 1)
    ),
  ]


def _imagenet_blocks(model):
  """``norm_proj`` names no kind of norm: its batch statistics say it is a BatchNorm."""
  variables = _variables(model, (1, 8, 8, 2))
  with pytest.raises(ValueError, match=r"the names of the norms '.*norm_proj' do not say"):
    infer_blocks(variables["params"], "resnet")
  return infer_blocks(variables["params"], "resnet", batch_stats=variables["batch_stats"])


def test_resnet_flax_imagenet_basic_blocks():
  got = _imagenet_blocks(ImagenetResNet(ImagenetBasic, (4, 4, 6)))
  assert got == [
    Block(["conv_init"], normalized=True),
    *_imagenet_main("ImagenetBasic_0", 2),
    *_imagenet_main("ImagenetBasic_1", 2),
    *_imagenet_main("ImagenetBasic_2", 2),
    Block(["ImagenetBasic_2/conv_proj"], normalized=True),
  ]


def test_resnet_flax_imagenet_bottleneck_blocks():
  got = _imagenet_blocks(ImagenetResNet(ImagenetBottleneck, (2, 2, 3)))
  b = [f"ImagenetBottleneck_{i}" for i in range(3)]
  assert got == [
    Block(["conv_init"], normalized=True),
    *_imagenet_main(b[0], 3),
    Block([f"{b[0]}/conv_proj"], normalized=True),  # 4 -> 8 channels
    *_imagenet_main(b[1], 3),
    *_imagenet_main(b[2], 3),
    Block([f"{b[2]}/conv_proj"], normalized=True),
  ]


def test_resnet_deep_stem_and_a_nested_shortcut():
  """A stem of two conv/norm pairs (the last norm left out), and a projection in a sub-tree
  of its block (``downsample/conv``, ``downsample/bn``)."""
  tree = _tree(
    stem_conv0=(3, 3, 2, 4),
    stem_bn0=(4,),
    stem_conv1=(3, 3, 4, 4),
    stem_bn1=(4,),
    layer1__conv1=(3, 3, 4, 6),
    layer1__bn1=(6,),
    layer1__conv2=(3, 3, 6, 6),
    layer1__bn2=(6,),
    layer1__downsample__conv=(1, 1, 4, 6),
    layer1__downsample__bn=(6,),
    fc=(6, 3),
  )
  assert infer_blocks(tree, "resnet") == [
    Block(["stem_conv0"], normalized=True),
    Block(["stem_bn0", "stem_conv1"], normalized=True),
    Block(["layer1/conv1"], normalized=True),
    Block(["layer1/bn1", "layer1/conv2"], normalized=True),
    Block(["layer1/downsample/conv"], normalized=True),
  ]


# ----------------------------------------------------------------------------
# Pre-LN transformer feed-forward blocks.


def test_preln_reproduces_the_hand_written_declaration():
  model = PreLNFeedForward(blocks=3)
  assert infer_blocks(_params(model, (1, 3, 4)), "preln") == preln_blocks(model)


class MlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Dense(self.mlp_dim)(x))
    return nn.Dense(x.shape[-1])(y)


class Lm1bBlock(nn.Module):
  """lm1b's EncoderDecoderBlock: ``LayerNorm_0``, self-attention (DenseGeneral, rank-3
  kernels), ``LayerNorm_1``, ``MlpBlock_0``."""

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    y = nn.MultiHeadDotProductAttention(num_heads=2, name="SelfAttention_0")(y, y)
    x = x + y
    return x + MlpBlock(8)(nn.LayerNorm()(x))


class Lm1bDecoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = Lm1bBlock(name=f"encoderdecoderblock_{i}")(x)
    x = nn.LayerNorm(name="encoderdecoder_norm")(x)
    return nn.Dense(5, name="logitdense")(x)


class Lm1b(nn.Module):
  """lm1b's names: ``decoder/{encoderdecoderblock_i, encoderdecoder_norm, logitdense}``."""

  @nn.compact
  def __call__(self, x):
    return Lm1bDecoder(name="decoder")(x)


def test_preln_lm1b_takes_the_second_layernorm_and_skips_the_attention():
  params = _params(Lm1b(), (1, 3, 4))
  attention = params["decoder"]["encoderdecoderblock_0"]["SelfAttention_0"]
  assert attention["query"]["kernel"].ndim == 3
  got = infer_blocks(params, "preln")
  assert got == [
    Block([f"{b}/LayerNorm_1", f"{b}/MlpBlock_0/Dense_0", f"{b}/MlpBlock_0/Dense_1"])
    for b in ("decoder/encoderdecoderblock_0", "decoder/encoderdecoderblock_1")
  ]


class T5Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, x.shape[-1], use_bias=False)
    q, k, v = dense(name="q")(x), dense(name="k")(x), dense(name="v")(x)
    weights = jax.nn.softmax(q @ k.swapaxes(-1, -2), axis=-1)
    return dense(name="o")(weights @ v)


class T5DenseReluDense(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(self.hidden, use_bias=False, name="wi")(x))
    return nn.Dense(x.shape[-1], use_bias=False, name="wo")(h)


class T5SelfAttentionLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x + T5Attention(name="SelfAttention")(nn.RMSNorm(name="layer_norm")(x))


class T5FeedForwardLayer(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    y = nn.RMSNorm(name="layer_norm")(x)
    return x + T5DenseReluDense(self.hidden, name="DenseReluDense")(y)


class T5Layers(nn.Module):
  """One T5 block's ``layer`` list: ``0`` self-attention, ``1`` feed-forward."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    x = T5SelfAttentionLayer(name="0")(x)
    return T5FeedForwardLayer(self.hidden, name="1")(x)


class T5Block(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return T5Layers(self.hidden, name="layer")(x)


class T5Blocks(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = T5Block(self.hidden, name=str(i))(x)
    return x


class T5(nn.Module):
  """T5's names: ``block/i/layer/0/{SelfAttention/{q,k,v,o}, layer_norm}`` and
  ``block/i/layer/1/{DenseReluDense/{wi,wo}, layer_norm}``; RMSNorm (a scale, no bias), no
  biases."""

  hidden: int

  @nn.compact
  def __call__(self, x):
    x = T5Blocks(self.hidden, name="block")(x)
    return nn.RMSNorm(name="final_layer_norm")(x)


@pytest.mark.parametrize("hidden", [4, 8], ids=["d_equals_h", "d_less_than_h"])
def test_preln_t5_wi_before_wo(hidden):
  """With ``d == h`` the shapes chain both ways round: the names put ``wi`` first."""
  got = infer_blocks(_params(T5(hidden), (1, 3, 4)), "preln")
  layer = lambda i, *keys: ("block", i, "layer", 1, *keys)
  assert got == [
    Block(
      [layer(i, "layer_norm"), layer(i, "DenseReluDense", "wi"), layer(i, "DenseReluDense", "wo")]
    )
    for i in range(2)
  ]


class OPTAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    q, k, v = (nn.Dense(x.shape[-1], name=n)(x) for n in ("q_proj", "k_proj", "v_proj"))
    return nn.Dense(x.shape[-1], name="out_proj")(jax.nn.softmax(q @ k.swapaxes(-1, -2)) @ v)


class OPTLayer(nn.Module):
  """OPT naming: ``self_attn``, ``self_attn_layer_norm``, ``fc1``, ``fc2``,
  ``final_layer_norm``, all in the layer's sub-tree."""

  @nn.compact
  def __call__(self, x):
    x = x + OPTAttention(name="self_attn")(nn.LayerNorm(name="self_attn_layer_norm")(x))
    h = nn.relu(nn.Dense(8, name="fc1")(nn.LayerNorm(name="final_layer_norm")(x)))
    return x + nn.Dense(x.shape[-1], name="fc2")(h)


class OPT(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = OPTLayer(name=f"layers_{i}")(x)
    return nn.LayerNorm(name="final_layer_norm")(x)


def test_preln_opt_takes_the_final_layer_norm_of_its_layer():
  got = infer_blocks(_params(OPT(), (1, 3, 4)), "preln")
  assert got == [
    Block([f"{b}/final_layer_norm", f"{b}/fc1", f"{b}/fc2"]) for b in ("layers_0", "layers_1")
  ]


def test_preln_the_norm_width_orders_layers_whose_names_do_not():
  tree = _tree(ln=(4,), mlp__expand=(4, 8), mlp__shrink=(8, 4))
  assert infer_blocks(tree, "preln") == [Block(["ln", "mlp/expand", "mlp/shrink"])]


def test_preln_names_and_widths_that_do_not_order_the_layers():
  """``d == h``: the norm's width fits either order, and ``expand``/``shrink`` say nothing."""
  tree = _tree(ln=(4,), mlp__expand=(4, 4), mlp__shrink=(4, 4))
  message = r"neither the names 'mlp/expand', 'mlp/shrink' nor the widths of the norms"
  with pytest.raises(ValueError, match=message + ".*" + ADVICE):
    infer_blocks(tree, "preln")


def test_preln_without_a_norm():
  tree = _tree(mlp__fc1=(4, 8), mlp__fc2=(8, 4))
  assert infer_blocks(tree, "preln") == [Block(["mlp/fc1", "mlp/fc2"])]


# ----------------------------------------------------------------------------
# What infer_blocks writes passes verify_invariance in training mode.


def _training_mode(module, x_shape, seed=0):
  """Float64 variables of a Linen model with BatchNorm drawn at random (scales in [0.5,
  1.5]), inputs, and its forward pass in training mode (batch statistics), compiled once
  for verify_invariance's many calls. Drawn from the shapes, not by ``init``: an eager
  init costs seconds per model."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape)
  shapes = jax.eval_shape(module.init, jax.random.key(seed), x)

  def draw(path, leaf):
    if key_name(path[-1]) in ("scale", "var"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    return rng.normal(0.0, 0.5, leaf.shape)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  state = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def forward(params, inputs):
    return module.apply({"params": params, **state}, inputs, mutable=list(state))[0]

  return variables["params"], forward, x, variables.get("batch_stats")


@pytest.mark.parametrize(
  "module, shape, layout",
  [
    (PlainNetBN((4, 5, 4)), (6, 5, 5, 2), "plainnet"),
    (ResNetBN(3, (3, 4)), (6, 6, 6, 2), "resnet"),
    (ImagenetResNet(ImagenetBottleneck, (2, 3)), (6, 8, 8, 2), "resnet"),
  ],
  ids=["plainnet", "resnet", "imagenet_bottleneck"],
)
def test_the_declarations_pass_verify_invariance_in_training_mode(module, shape, layout):
  params, forward, x, batch_stats = _training_mode(module, shape)
  blocks = infer_blocks(params, layout, batch_stats=batch_stats)
  assert gsgd_jax.verify_invariance(forward, params, blocks, x) < 1e-8


# ----------------------------------------------------------------------------
# Refusals, naming the layers.

ADVICE = r"Declare `layers` explicitly with gsgd_jax\.Block"


def test_an_unknown_layout_names_the_accepted_ones():
  with pytest.raises(ValueError, match="unknown layout 'vgg'; accepted layouts: 'plainnet', "):
    infer_blocks(_tree(fc=(2, 3)), "vgg")


def test_plainnet_conv_and_norm_counts_differ():
  tree = _tree(conv0=(3, 3, 2, 4), bn0=(4,), conv1=(3, 3, 4, 4), head=(4, 3))
  message = r"2 convolutions \('conv0', 'conv1'\) but 1 norms \('bn0'\).*" + ADVICE
  with pytest.raises(ValueError, match=message):
    infer_blocks(tree, "plainnet")


@pytest.mark.parametrize(
  "tree, layout, match",
  [
    (
      _tree(conv0=(3, 3, 2, 4), bn0=(4,), conv1=(3, 3, 5, 6), bn1=(6,), head=(6, 3)),
      "plainnet",
      r"'conv1' takes 5 input channels .* 'conv0' before it has 4 outputs",
    ),
    (
      _tree(conv0=(3, 3, 2, 4), bn0=(5,), head=(5, 3)),
      "plainnet",
      r"norm 'bn0' has width 5 but pairs with 'conv0', which has 4 outputs",
    ),
    (
      _tree(
        stem=(3, 3, 2, 4),
        stem_bn=(4,),
        b__conv_a=(3, 3, 4, 6),
        b__bn_a=(6,),
        b__conv_b=(3, 3, 6, 6),
        b__bn_b=(6,),
        b__proj=(1, 1, 4, 5),
        b__bn_proj=(5,),
      ),
      "resnet",
      r"projection 'b/proj' .* does not map the block's input \(4 channels, 'b/conv_a'\) to "
      r"its output \(6 channels, 'b/conv_b'\)",
    ),
  ],
  ids=["plainnet_convs", "plainnet_norm_width", "resnet_projection"],
)
def test_shapes_that_do_not_chain(tree, layout, match):
  with pytest.raises(ValueError, match=match + ".*" + ADVICE):
    infer_blocks(tree, layout)


def test_preln_two_candidate_norms_without_a_deciding_name_or_number():
  tree = _tree(attn_ln=(4,), pre_ln=(4,), mlp__fc1=(4, 8), mlp__fc2=(8, 4))
  message = r"'mlp' \('mlp/fc1', 'mlp/fc2'\): several norms .* 'attn_ln', 'pre_ln'"
  with pytest.raises(ValueError, match=message + ".*" + ADVICE):
    infer_blocks(tree, "preln")


def test_preln_names_against_the_norm_width():
  """``Dense_0`` maps 8 -> 4, but the norm in front has width 4: numbered in the order the
  modules were built, not run (``nn.Dense(4)(nn.Dense(8)(x))`` builds the outer one first)."""
  tree = _tree(ln=(4,), mlp__Dense_0=(8, 4), mlp__Dense_1=(4, 8))
  message = r"the names put 'mlp/Dense_0' first, but the norms before it \('ln'\) have the width"
  with pytest.raises(ValueError, match=message + ".*" + ADVICE):
    infer_blocks(tree, "preln")


def test_preln_one_norm_in_front_of_two_blocks():
  tree = _tree(ln=(4,), a__fc1=(4, 8), a__fc2=(8, 4), b__fc1=(4, 8), b__fc2=(8, 4))
  with pytest.raises(ValueError, match=r"norm 'ln' would stand in front of two .* 'a' and 'b'"):
    infer_blocks(tree, "preln")


@pytest.mark.parametrize(
  "tree, layout, match",
  [
    (
      _tree(conv0=(3, 3, 2, 4), bn0=(4,), Conv_1=(3, 3, 4, 4), bn1=(4,), head=(4, 3)),
      "plainnet",
      r"convolutions 'Conv_1', 'conv0' form several groups",
    ),
    (
      _tree(conv=(3, 3, 2, 4), first=(4,), second=(4,), head=(4, 3)),
      "plainnet",
      r"the norms 'first', 'second' cannot be ordered: 'first' ends in no number",
    ),
    (_tree(conv0=(3, 3, 2, 4), bn0=(4,), head=(4, 3)), "resnet", "found none"),
    (_tree(fc0=(4, 8), fc1=(8, 4)), "plainnet", "a plainnet has convolutions"),
    (_tree(ln=(4,), fc1=(4, 8), fc2=(8, 3)), "preln", "feed-forward blocks .* found none"),
    (
      _tree(ln=(4,), attention__key=(4, 4), attention__value=(4, 4)),
      "preln",
      "feed-forward blocks .* found none",
    ),
  ],
  ids=["two_groups", "unordered", "no_residual_block", "no_conv", "no_pair", "attention"],
)
def test_trees_that_do_not_fit_the_layout(tree, layout, match):
  with pytest.raises(ValueError, match=match + ".*Layers found .*" + ADVICE):
    infer_blocks(tree, layout)


def test_a_declaration_the_params_refuse_is_not_returned():
  """Names that fit the layout, but a head whose inputs are not the last norm's channels:
  the check at the end refuses the blocks and says why."""
  tree = _tree(conv0=(3, 3, 2, 4), bn0=(4,), head=(6, 3))
  with pytest.raises(ValueError, match=r"wrote blocks that the params refuse.*'head'.*" + ADVICE):
    infer_blocks(tree, "plainnet")


# ----------------------------------------------------------------------------
# Inference never guesses: norm kinds, pre-activation blocks, gated and left-out kernels.


@pytest.mark.parametrize(
  "names, kind",
  [(("ln0", "ln1"), "LayerNorm"), (("gn0", "gn1"), "GroupNorm"), (("rms0", "rms1"), "RMSNorm")],
)
def test_plainnet_refuses_norms_that_mix_channels(names, kind):
  a, b = names
  tree = _tree(conv0=(3, 3, 2, 4), **{a: (4,)}, conv1=(3, 3, 4, 4), **{b: (4,)}, head=(4, 3))
  message = rf"the norms '{a}', '{b}' are not BatchNorms \({kind}\).*Block\(\[conv\], normalized"
  with pytest.raises(ValueError, match=message):
    infer_blocks(tree, "plainnet")


def test_batch_statistics_decide_over_names():
  """A norm named for a BatchNorm without statistics in ``batch_stats`` is none."""
  tree = _tree(conv0=(3, 3, 2, 4), bn0=(4,), conv1=(3, 3, 4, 4), bn1=(4,), head=(4, 3))
  stats = {"bn0": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"the norms 'bn1' are not BatchNorms \(a norm without"):
    infer_blocks(tree, "plainnet", batch_stats=stats)


def _preact_tree(projection_norm=False):
  tree = _tree(
    stem=(3, 3, 2, 4),
    b0__bn1=(4,),
    b0__conv1=(3, 3, 4, 6),
    b0__bn2=(6,),
    b0__conv2=(3, 3, 6, 6),
    b0__proj=(1, 1, 4, 6),
    bn_final=(6,),
    head=(6, 3),
  )
  if projection_norm:
    tree["b0"]["bn_proj"] = {"scale": jax.ShapeDtypeStruct((6,), jnp.float32)}
  return tree


def test_preact_blocks_and_the_layouts_that_contradict_the_widths():
  assert infer_blocks(_preact_tree(), "preact") == [
    Block(["b0/conv1"], normalized=True),  # b0/bn1 also feeds the projection
    Block(["b0/bn2", "b0/conv2"]),
    Block(["bn_final", "head"]),
  ]
  with pytest.raises(ValueError, match=r"'b0'.*pre-activation block .* Use the layout 'preact'"):
    infer_blocks(_preact_tree(), "resnet")
  with pytest.raises(ValueError, match=r"'b0/bn_proj'.* Use the layout 'resnet'"):
    infer_blocks(_preact_tree(projection_norm=True), "preact")
  post = _params(ResNetBN(3, (3, 4)), (1, 6, 6, 2))
  with pytest.raises(ValueError, match=r"norm 'block1/bn_a' .* use the layout 'resnet'"):
    infer_blocks(post, "preact")


@pytest.mark.parametrize(
  "tree, match",
  [
    (
      _tree(ln=(4,), mlp__gate_proj=(4, 8), mlp__up_proj=(4, 8), mlp__down_proj=(8, 4)),
      r"'mlp' holds a gated feed-forward block.*gsgd_jax\.Block\(\[up, down\]\)",
    ),
    (  # a flat scope: fc1_0 the gate, fc1_1 the up projection, fc2_0 the down projection
      _tree(ln_0=(4,), fc1_0=(4, 8), fc1_1=(4, 8), fc2_0=(8, 4), out=(4, 2)),
      r"the kernels 'fc1_1' stand beside the feed-forward pairs 'fc1_0', 'fc2_0'",
    ),
    (
      _tree(ln=(4,), mlp__fc1=(4, 8), mlp__fc2=(8, 8), mlp__fc3=(8, 4)),
      r"found none; the dense kernels 'mlp/fc1', 'mlp/fc2', 'mlp/fc3' in 'mlp' form no pair",
    ),
    (
      _tree(mlp__wi=(4, 3, 8), mlp__wo=(8, 3, 4)),
      r"copies on axis 1: .* stack_axis=1\)",
    ),
  ],
  ids=["gated", "gated_flat", "three_layers", "axis_1_unproven"],
)
def test_preln_refuses_what_it_cannot_read_and_says_why(tree, match):
  with pytest.raises(ValueError, match=match):
    infer_blocks(tree, "preln")
