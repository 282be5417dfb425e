"""The corpus of real layouts (``corpus.py``): for each public Flax model it reproduces, what
inference returns (a correct declaration or a refusal that names the norms, blocks or
layout at fault), ``verify_invariance`` with default arguments in float32 and float64 (it
passes on the right declaration and fails on the wrong ones users would write), and a
float64 trajectory check: path space follows the same outputs from a start rescaled by
random factors, the plain optimizer does not.
"""

import re

import corpus
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import gsgd_jax

Block = gsgd_jax.Block
Layer = gsgd_jax.Layer
STEPS = 6


def _f64(tree):
  """Floating leaves in float64 (boxes, such as nn.LogicallyPartitioned, kept)."""
  wide = lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
  return jax.tree.map(wide, tree)


def _passes_in_both_precisions(apply, params, blocks, x, float64_bound=0.0):
  """``verify_invariance`` with default arguments passes in float32 and in float64, the
  outputs reproduced bit for bit (the guide says so): the largest difference is 0, or in
  float64 at most ``float64_bound`` (BiT's weight standardization adds its epsilon to a
  standard deviation, which a lift of 2**30 leaves at 2e-13)."""
  worst32 = gsgd_jax.verify_invariance(apply, params, blocks, x)
  worst64 = gsgd_jax.verify_invariance(apply, _f64(params), blocks, _f64(x))
  assert worst32 == 0.0 and worst64 <= float64_bound, (worst32, worst64)


def _trajectory_gap(apply, params, layers, x, make_tx, seed=3):
  """The largest difference of the outputs on ``x`` after ``STEPS`` steps of ``make_tx()``
  from ``params`` and from ``params`` rescaled at random (every hidden node of the
  declared blocks, and the outputs of normalized ones), relative to the outputs' scale;
  and how far training moved those outputs, on the same scale."""
  target = jax.random.normal(jax.random.key(seed), jnp.shape(apply(params, x)))
  loss = lambda p: jnp.mean((apply(p, x) - target) ** 2)
  tx = make_tx()

  @jax.jit
  def train(p):
    def step(carry, _):
      p, state = carry
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), length=STEPS)
    return apply(p, x)

  rescaled = gsgd_jax.random_rescale(params, layers, jax.random.key(seed + 1))
  start, a, b = apply(params, x), train(params), train(rescaled)
  scale = float(jnp.max(jnp.abs(a)))
  return float(jnp.max(jnp.abs(a - b))) / scale, float(jnp.max(jnp.abs(a - start))) / scale


def _invariant_where_plain_is_not(apply, params, layers, x, path_tx, plain_tx):
  gap, moved = _trajectory_gap(apply, params, layers, x, path_tx)
  assert moved > 1e-3 and gap < 1e-10, (gap, moved)
  plain_gap, _ = _trajectory_gap(apply, params, layers, x, plain_tx)
  assert plain_gap > 1e-4, plain_gap


def _fails(apply, params, layers, x, match):
  with pytest.raises(ValueError, match=match):
    gsgd_jax.verify_invariance(apply, params, layers, x)


def _linen_train_mode(model, x):
  """Float32 variables of a Linen model and its forward pass in training mode (batch
  statistics), compiled once."""
  variables = jax.jit(model.init)(jax.random.key(0), x)
  state = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def apply(params, inputs):
    if not state:
      return model.apply({"params": params}, inputs)
    return model.apply({"params": params, **state}, inputs, mutable=list(state))[0]

  return variables["params"], state, apply


def _images(shape, seed=1):
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)  # pixels in [0, 1]


# ---------------------------------------------------------------------------------------------
# Flax ImageNet ResNet (BatchNorm, post-activation).


@pytest.mark.parametrize(
  "block", [corpus.ResNetBlock, corpus.BottleneckResNetBlock], ids=["basic", "bottleneck"]
)
def test_imagenet_resnet(block):
  model, x = corpus.ImagenetResNet(block=block), _images((4, 16, 16, 3))
  params, state, apply = _linen_train_mode(model, x)
  blocks = corpus.imagenet_blocks(block)
  with pytest.raises(ValueError, match=r"params hold norms .*infer_blocks"):
    gsgd_jax.infer_layers(params)
  assert gsgd_jax.infer_blocks(params, "resnet", batch_stats=state["batch_stats"]) == blocks
  _passes_in_both_precisions(apply, params, blocks, x)
  # A chain straight through the norms, as infer_layers used to return: caught.
  _fails(apply, params, ["conv_init", f"{block.__name__}_0/Conv_0"], x, r"layer 'conv_init'")

  exact = corpus.ImagenetResNet(epsilon=1e-30, block=block)  # the output rescaling exact
  params, _, apply = _linen_train_mode(exact, x)
  params = gsgd_jax.set_skeleton(_f64(params), blocks)
  _invariant_where_plain_is_not(
    apply, params, blocks, _f64(x), lambda: gsgd_jax.gsgd(0.05, layers=blocks),
    lambda: optax.sgd(0.05),
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Flax NNX MNIST CNN (BatchNorm, dropout, average pooling, flatten into dense).


def _nnx_apply(model, cast=lambda tree: tree):
  """An NNX model's ``nnx.Param`` state (through ``cast``) and its forward pass, compiled
  once, with the rest of its state (batch statistics) cast alike and held fixed."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rest = cast(rest)

  @jax.jit
  def apply(p, inputs):
    # A copy: the BatchNorms update their statistics, which may not leak out of a trace.
    return nnx.merge(graphdef, p, rest, copy=True)(inputs)

  return cast(params), apply


def test_nnx_mnist_cnn():
  model, x = corpus.MnistCNN(rngs=nnx.Rngs(0)), _images((4, 28, 28, 1))
  blocks = corpus.mnist_blocks()
  with pytest.raises(ValueError, match=r"params hold norms \('batch_norm1', 'batch_norm2'\)"):
    gsgd_jax.infer_layers(nnx.state(model, nnx.Param))
  assert gsgd_jax.infer_blocks(nnx.state(model), "plainnet") == blocks
  params, apply = _nnx_apply(model)
  assert gsgd_jax.verify_invariance(apply, params, blocks, x) < 1e-6
  params, apply = _nnx_apply(model, _f64)
  assert gsgd_jax.verify_invariance(apply, params, blocks, _f64(x)) < 1e-12

  params, apply = _nnx_apply(corpus.MnistCNN(rngs=nnx.Rngs(0), epsilon=1e-30), _f64)
  params = gsgd_jax.set_skeleton(params, blocks)
  _invariant_where_plain_is_not(
    apply, params, blocks, _f64(x), lambda: gsgd_jax.g_momentum(0.01, 0.9, layers=blocks),
    lambda: optax.sgd(0.01, 0.9),
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Flax lm1b: pre-LN decoder, int32 tokens, boxed params.


def _tokens(shape=(2, 8), vocab=40, seed=2):
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


def test_lm1b_transformer():
  model, tokens = corpus.Lm1b(), _tokens()
  params, _, apply = _linen_train_mode(model, tokens)
  assert isinstance(params["decoder"]["logitdense"]["kernel"], nn.LogicallyPartitioned)
  blocks = corpus.lm1b_blocks()
  assert gsgd_jax.infer_blocks(params, "preln") == blocks
  # Integer tokens are never scaled: no out-of-vocabulary NaN, no false alarm.
  _passes_in_both_precisions(apply, params, blocks, tokens)
  # Tokens passed as floats are scaled at the perturbed params (the embedding's gather
  # then leaves the table): the message says so, and input_scale=None is the way out.
  as_float = tokens.astype(jnp.float32)
  _fails(apply, params, blocks, as_float, r"NaN or infinite outputs .* not a failure of the sym")
  assert gsgd_jax.verify_invariance(apply, params, blocks, as_float, input_scale=None) < 1e-6
  # The attention's norm in front of the feed-forward block: caught.
  b = "decoder/encoderdecoderblock_0"
  wrong = [Block([f"{b}/LayerNorm_0", f"{b}/MlpBlock_0/Dense_0", f"{b}/MlpBlock_0/Dense_1"])]
  _fails(apply, params, wrong, tokens, r"affine layer 'decoder/encoderdecoderblock_0/LayerNorm_0'")

  # Its attention's value/output chains, read by the 'llama' layout (Flax's names, multi-axis
  # kernels with biases), join the feed-forward blocks.
  blocks = blocks + gsgd_jax.infer_blocks(params, "llama")
  assert len(blocks) == 4 and blocks[2].readings[1] == gsgd_jax.Layer("o", input_axes=2).reading
  _passes_in_both_precisions(apply, params, blocks, tokens)

  params = gsgd_jax.set_skeleton(_f64(params), blocks)
  _invariant_where_plain_is_not(
    apply, params, blocks, tokens,
    lambda: gsgd_jax.path_space(optax.adam(1e-2), layers=blocks, fallback=optax.adamw(1e-2)),
    lambda: optax.adamw(1e-2),
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# t5x's scanned T5: layers stacked on axis 1, RMSNorm, no biases; ReLU and gated GELU.


T5_LAYER = "encoder/encoder"


def test_scanned_t5_on_axis_1():
  model, tokens = corpus.ScannedT5(), _tokens()
  params, _, apply = _linen_train_mode(model, tokens)
  assert params["encoder"]["encoder"]["mlp"]["wi"]["kernel"].shape == (16, 3, 32)
  blocks = [
    Block([f"{T5_LAYER}/{x}" for x in ("pre_mlp_layer_norm", "mlp/wi", "mlp/wo")], stack_axis=1)
  ]
  assert gsgd_jax.infer_blocks(params, "preln") == blocks
  _passes_in_both_precisions(apply, params, blocks, tokens)
  # Read on axis 0, the stack would be another model: refused at init, named.
  message = (
    r"'encoder/encoder/mlp/wo': kernel of shape \(32, 3, 16\) has no stack of length 16"
    r".*agree on axis 1 \(length 3\): is the stack there \(stack_axis=1"
  )
  with pytest.raises(ValueError, match=message):
    gsgd_jax.gsgd(0.1, layers=[Block(blocks[0].layers, stack_axis=0)]).init(params)
  _adam_in_path_space_is_invariant(apply, params, blocks, tokens)


def _adam_in_path_space_is_invariant(apply, params, blocks, tokens):
  params = gsgd_jax.set_skeleton(_f64(params), blocks)
  _invariant_where_plain_is_not(
    apply, params, blocks, tokens,
    lambda: gsgd_jax.path_space(optax.adam(1e-2), layers=blocks), lambda: optax.adam(1e-2),
  )  # fmt: skip


def test_scanned_t5_gated_is_refused_and_its_up_down_chain_declared_by_hand():
  model, tokens = corpus.ScannedT5(corpus.T5Config(gated=True)), _tokens()
  params, _, apply = _linen_train_mode(model, tokens)
  message = r"gated feed-forward block.*'encoder/encoder/mlp/wi_0'.*stack_axis=1"
  with pytest.raises(ValueError, match=message):
    gsgd_jax.infer_blocks(params, "preln")
  mlp = f"{T5_LAYER}/mlp"
  up_down = [Block([f"{mlp}/wi_1", f"{mlp}/wo"], stack_axis=1)]
  _passes_in_both_precisions(apply, params, up_down, tokens)
  # The gate in the chain, or the norm in front of it (it feeds the gate too): caught.
  _fails(apply, params, [Block([f"{mlp}/wi_0", f"{mlp}/wo"], stack_axis=1)], tokens, "wi_0")
  with_norm = [Block([f"{T5_LAYER}/pre_mlp_layer_norm", *up_down[0].layers], stack_axis=1)]
  _fails(apply, params, with_norm, tokens, "pre_mlp_layer_norm")
  _adam_in_path_space_is_invariant(apply, params, up_down, tokens)
  # The 'llama' layout reads it: the value/output chain of the attention too, its kernels
  # (d, L, heads, head_dim) and (heads, L, head_dim, d) multi-axis and stacked on axis 1.
  blocks = gsgd_jax.infer_blocks(params, "llama")
  assert blocks[1] == up_down[0]
  _passes_in_both_precisions(apply, params, blocks, tokens)
  _adam_in_path_space_is_invariant(apply, params, blocks, tokens)


@pytest.mark.slow  # the scanned LLaMA 3-style decoder above runs in `make test`
def test_scanned_maxtext_style_grouped_query_attention():
  # MaxText's layout: T5's names, layers scanned on axis 1, multi-axis kernels, and 4 query
  # heads sharing 2 key-value heads: key and value (d, L, 2, head_dim), query (d, L, 4,
  # head_dim), out (4, L, head_dim, d). The shapes tell the grouping; no head_dim is needed.
  config = corpus.T5Config(gated=True, heads=4, kv_heads=2)
  model, tokens = corpus.ScannedT5(config), _tokens()
  params, _, apply = _linen_train_mode(model, tokens)
  blocks = gsgd_jax.infer_blocks(params, "llama", query_key="plain")
  attention = f"{T5_LAYER}/attention"
  assert blocks[:2] == [
    Block(
      [
        Layer(f"{attention}/query", input_axes=1, kv_heads=2),
        Layer(f"{attention}/key", input_axes=1, transposed=True),
      ],
      stack_axis=1,
    ),
    Block(
      [Layer(f"{attention}/value", input_axes=1), Layer(f"{attention}/out", input_axes=2,
                                                         kv_heads=2)],
      stack_axis=1,
    ),
  ]  # fmt: skip
  _passes_in_both_precisions(apply, params, blocks, tokens)
  ungrouped = [Block([Layer(f"{attention}/value", input_axes=1),
                      Layer(f"{attention}/out", input_axes=2)], stack_axis=1)]  # fmt: skip
  with pytest.raises(ValueError, match=r"gsgd_jax\.Layer\(\.\.\., kv_heads=\.\.\.\)"):
    gsgd_jax.verify_invariance(apply, params, ungrouped, tokens)
  _adam_in_path_space_is_invariant(apply, params, blocks, tokens)


# ---------------------------------------------------------------------------------------------
# A LLaMA-style decoder with Hugging Face's Flax names: RMSNorm, RoPE, SwiGLU, no biases.


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
def test_llama_decoder(scanned):
  model, tokens = corpus.Llama(scanned=scanned), _tokens()
  params, _, apply = _linen_train_mode(model, tokens)
  blocks = gsgd_jax.infer_blocks(params, "llama")
  assert blocks == corpus.llama_blocks(model)
  _passes_in_both_precisions(apply, params, blocks, tokens)
  # The gate in place of the up projection, or the query in place of the value: caught.
  layer = "model/layers" if scanned else "model/layers/0"
  axis = 0 if scanned else None
  gate = Block([f"{layer}/mlp/gate_proj", f"{layer}/mlp/down_proj"], stack_axis=axis)
  _fails(apply, params, [gate], tokens, "gate_proj")
  query = Block([f"{layer}/self_attn/q_proj", f"{layer}/self_attn/o_proj"], stack_axis=axis)
  _fails(apply, params, [query], tokens, "q_proj")
  # The query-key chain with the key not read transposed: refused, the fix named.
  q, k = (
    Layer(f"{layer}/self_attn/{name}", input_axes=1, pairs="half", head_dim=model.config.head_dim)
    for name in ("q_proj", "k_proj")
  )
  _fails(apply, params, [Block([q, k], stack_axis=axis)], tokens, "k_proj' transposed")
  params = gsgd_jax.set_skeleton(_f64(params), blocks)
  _invariant_where_plain_is_not(
    apply, params, blocks, tokens,
    lambda: gsgd_jax.path_space(optax.adamw(1e-2), layers=blocks), lambda: optax.adamw(1e-2),
  )  # fmt: skip


@pytest.mark.parametrize(
  "scanned",
  [pytest.param(False, id="unrolled", marks=pytest.mark.slow), pytest.param(True, id="scanned")],
)
def test_llama_decoder_with_grouped_query_attention(scanned):
  # LLaMA 3's and Mistral's layout: 4 query heads share 2 key-value heads, k_proj and v_proj
  # (d, kv_heads * head_dim), q_proj and o_proj (d, heads * head_dim) and back.
  config = corpus.LlamaConfig(heads=4, kv_heads=2)
  model, tokens = corpus.Llama(config, scanned=scanned), _tokens()
  params, _, apply = _linen_train_mode(model, tokens)
  head_dim = config.head_dim
  with pytest.raises(ValueError, match=r"grouped-query attention.*Pass head_dim"):
    gsgd_jax.infer_blocks(params, "llama")
  blocks = gsgd_jax.infer_blocks(params, "llama", head_dim=head_dim)
  assert blocks == corpus.llama_blocks(model)
  _passes_in_both_precisions(apply, params, blocks, tokens)
  with_qk = gsgd_jax.infer_blocks(params, "llama", query_key="half", head_dim=head_dim)
  layer = "model/layers" if scanned else "model/layers/0"
  axis = 0 if scanned else None
  assert with_qk[1] == Block(
    [
      Layer(f"{layer}/self_attn/q_proj", input_axes=1, pairs="half", head_dim=head_dim,
            kv_heads=2),
      Layer(f"{layer}/self_attn/k_proj", input_axes=1, transposed=True, pairs="half",
            head_dim=head_dim),
    ],
    stack_axis=axis,
  )  # fmt: skip
  _passes_in_both_precisions(apply, params, with_qk, tokens)
  # Half the head size on both: the pairs declared alike no longer line up; the nodes told.
  half = Block(
    [
      Layer(f"{layer}/self_attn/q_proj", input_axes=1, pairs="half", head_dim=head_dim // 2,
            kv_heads=2),
      Layer(f"{layer}/self_attn/k_proj", input_axes=1, transposed=True, pairs="half",
            head_dim=head_dim // 2),
    ],
    stack_axis=axis,
  )  # fmt: skip
  _fails(apply, params, [half], tokens, r"do not line up: .* has 2 nodes there \(heads of 2, 4")
  # The value's dimensions grouped with the wrong heads (interleaved instead of consecutive)
  # reads the same nodes at other places: caught.
  wrong = Block(
    [
      f"{layer}/self_attn/v_proj",
      Layer(f"{layer}/self_attn/o_proj", input_axes=1, head_dim=head_dim * 2, kv_heads=1),
    ],
    stack_axis=axis,
  )
  _fails(apply, params, [wrong], tokens, "v_proj")
  # Twice the key-value heads the model has: refused, the declared arguments named.
  doubled = Block(
    [
      f"{layer}/self_attn/v_proj",
      Layer(f"{layer}/self_attn/o_proj", input_axes=1, head_dim=head_dim, kv_heads=4),
    ],
    stack_axis=axis,
  )
  _fails(apply, params, [doubled], tokens, r"'.*o_proj' is declared with kv_heads=4 and head_dim")
  params = gsgd_jax.set_skeleton(_f64(params), with_qk)
  _invariant_where_plain_is_not(
    apply, params, with_qk, tokens,
    lambda: gsgd_jax.path_space(optax.adamw(1e-2), layers=with_qk), lambda: optax.adamw(1e-2),
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# big_vision's BiT: GroupNorm and weight-standardized convolutions.


def test_bit_group_norm_is_refused_and_its_standardized_convolutions_declared_by_hand():
  model, x = corpus.BiT(), _images((4, 16, 16, 3))
  params, _, apply = _linen_train_mode(model, x)
  with pytest.raises(ValueError, match=r"'gn_root'.* are not BatchNorms \(GroupNorm\).*StdConv"):
    gsgd_jax.infer_blocks(params, "resnet")
  blocks = corpus.bit_blocks(model)
  _passes_in_both_precisions(apply, params, blocks, x, float64_bound=1e-12)
  # What infer_blocks used to write here (GroupNorm read as BatchNorm), and a block through
  # a standardized convolution: caught.
  unit = "block1/unit1"
  _fails(apply, params, [Block([f"{unit}/gn1", f"{unit}/conv2"])], x, r"'block1/unit1/gn1'")

  exact = corpus.BiT(epsilon=1e-30)  # the weight standardization's epsilon negligible
  params, _, apply = _linen_train_mode(exact, x)
  _invariant_where_plain_is_not(
    apply, _f64(params), blocks, _f64(x), lambda: gsgd_jax.gsgd(0.05, layers=blocks),
    lambda: optax.sgd(0.05),
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A pre-activation ResNet with BatchNorm.


def test_preact_resnet():
  model, x = corpus.PreActResNet(), _images((4, 8, 8, 3))
  params, state, apply = _linen_train_mode(model, x)
  stats = state["batch_stats"]
  blocks = corpus.preact_blocks()
  assert gsgd_jax.infer_blocks(params, "preact", batch_stats=stats) == blocks
  with pytest.raises(ValueError, match=re.escape("a pre-activation block") + ".*'preact'"):
    gsgd_jax.infer_blocks(params, "resnet", batch_stats=stats)
  _passes_in_both_precisions(apply, params, blocks, x)
  # Where the projection reads the first norm's output, that norm cannot start a block.
  _fails(apply, params, [Block(["block1/bn1", "block1/conv1"], normalized=True)], x, "bn1")

  params, _, apply = _linen_train_mode(corpus.PreActResNet(epsilon=1e-30), x)
  params = gsgd_jax.set_skeleton(_f64(params), blocks)
  _invariant_where_plain_is_not(
    apply, params, blocks, _f64(x), lambda: gsgd_jax.gsgd(0.05, layers=blocks),
    lambda: optax.sgd(0.05),
  )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The project's own BatchNorm models (benchmarks/loop.py), PlainNet-BN at depth 20 among them.


@pytest.mark.parametrize("name", ["plainnet_bn_20", "resnet_bn"])
def test_the_benchmarks_batchnorm_models(name):
  from benchmarks import loop

  if name == "plainnet_bn_20":
    model, layout = loop.PlainNetBN(((4, 7), (6, 7), (8, 6)), 5), "plainnet"
  else:
    model, layout = loop.ResNetBN(((4, 2), (6, 2)), 5), "resnet"
  x = _images((4, 8, 8, 3))
  params, state, apply = _linen_train_mode(model, x)
  blocks = model.gsgd_blocks()
  assert gsgd_jax.infer_blocks(params, layout, batch_stats=state["batch_stats"]) == blocks
  _passes_in_both_precisions(apply, params, blocks, x)
