"""infer_layers and infer_blocks on Flax stacks (``nn.scan`` with ``variable_axes={'params':
0}``, layers made by ``nnx.vmap``): a stack is one block declared with ``stack_axis=0``, read
from shapes that tell it from a 1-D convolution; shapes that do not tell are refused, naming
the layers and the declaration to write.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import gsgd_jax
from gsgd_jax._src.pytree import PROBE, key_name

Block = gsgd_jax.Block
SCAN = {"variable_axes": {"params": 0}, "split_rngs": {"params": True}, "length": 3}


def _tree(**leaves):
  """A params tree of shapes written by hand: ``a__b__kernel=(3, 4)`` is the leaf
  ``a/b/kernel``."""
  tree: dict = {}
  for name, shape in leaves.items():
    *parents, last = name.split("__")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[last] = jax.ShapeDtypeStruct(shape, jnp.float32)
  return tree


def _draw(model, x):
  """Variables of a Linen model drawn at random from its shapes (norm scales in [0.5, 1.5]):
  a scan's init, eager or compiled, takes seconds."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if key_name(path[-1]) == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(draw, shapes)


# ----------------------------------------------------------------------------
# infer_layers.


class MLPBody(nn.Module):
  """One copy of the scanned body: ``d -> h -> d`` with ReLUs (the carry keeps its width)."""

  bias: bool

  @nn.compact
  def __call__(self, h, _):
    # Linen numbers modules as they are built: build each before calling the next.
    h = nn.relu(nn.Dense(8, use_bias=self.bias)(h))
    return nn.relu(nn.Dense(4, use_bias=self.bias)(h)), None


class ScannedMLP(nn.Module):
  bias: bool = True

  @nn.compact
  def __call__(self, x):
    h, _ = nn.scan(MLPBody, **SCAN)(self.bias)(x, None)
    return h


SCANNED_MLP = Block(["params/ScanMLPBody_0/Dense_0", "params/ScanMLPBody_0/Dense_1"], stack_axis=0)


def test_infer_layers_reads_a_linen_scan_as_one_stacked_block():
  model, x = ScannedMLP(), jax.random.normal(jax.random.key(1), (5, 4))
  params = _draw(model, x)
  assert params["params"]["ScanMLPBody_0"]["Dense_0"]["kernel"].shape == (3, 4, 8)
  layers = gsgd_jax.infer_layers(params)
  assert layers == [SCANNED_MLP]
  assert gsgd_jax.verify_invariance(jax.jit(model.apply), params, layers, x) < 1e-4


def test_infer_layers_refuses_a_stack_without_biases():
  params = jax.eval_shape(ScannedMLP(bias=False).init, jax.random.key(0), jnp.ones((1, 4)))
  message = (
    r"'params/ScanMLPBody_0/Dense_0' \(3, 4, 8\), 'params/ScanMLPBody_0/Dense_1' \(3, 8, 4\) "
    r"have rank-3 kernels and no bias .* stacked dense layer .* 1-D convolution .*"
    r"gsgd_jax\.Block\(\[\.\.\.\], stack_axis=0\)"
  )
  with pytest.raises(ValueError, match=message):
    gsgd_jax.infer_layers(params)


class NNXStack(nnx.Module):
  """Three copies of a two-layer list made by ``nnx.vmap``, as a scanned NNX model holds."""

  def __init__(self, biases: tuple[bool, bool]):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      rngs = nnx.Rngs(key)
      return nnx.List(
        [
          nnx.Linear(4, 8, use_bias=biases[0], rngs=rngs),
          nnx.Linear(8, 4, use_bias=biases[1], rngs=rngs),
        ]
      )

    self.layers = make(jax.random.split(jax.random.key(0), 3))


@pytest.mark.parametrize("biases", [(True, True), (False, True)], ids=["biases", "one_bias"])
def test_infer_layers_reads_an_nnx_vmap_stack(biases):
  """One stacked bias is evidence for the whole group: a stack's layers all carry it."""
  params = nnx.state(nnx.eval_shape(lambda: NNXStack(biases)), nnx.Param)
  layers = gsgd_jax.infer_layers(params)
  assert layers == [Block(["layers/0", "layers/1"], stack_axis=0)]


def test_infer_layers_refuses_an_nnx_vmap_stack_without_biases():
  params = nnx.state(nnx.eval_shape(lambda: NNXStack((False, False))), nnx.Param)
  with pytest.raises(ValueError, match=r"'layers/0' \(3, 4, 8\), 'layers/1' .*stack_axis=0"):
    gsgd_jax.infer_layers(params)


def test_infer_layers_reads_a_stack_from_its_probes():
  params = _tree(
    **{f"stack__fc{i}__kernel": shape for i, shape in ((1, (3, 4, 8)), (2, (3, 8, 4)))},
    **{f"stack__fc{i}__{PROBE}": (3, n) for i, n in ((1, 8), (2, 4))},
  )
  assert gsgd_jax.infer_layers(params) == [Block(["stack/fc1", "stack/fc2"], stack_axis=0)]


class EmbeddedStack(nn.Module):
  """A scanned body between an unstacked embedding and head."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    h, _ = nn.scan(MLPBody, **SCAN)(True)(h, None)
    return nn.Dense(2)(h)


@pytest.mark.parametrize(
  "params, match",
  [
    (
      jax.eval_shape(EmbeddedStack().init, jax.random.key(0), jnp.ones((1, 3))),
      r"the stacks params/ScanMLPBody_0/Dense_\* \(3 copies\) .* stand beside params/Dense_\*.*"
      r"Declare the blocks explicitly: gsgd_jax\.Block\(\[\.\.\.\], stack_axis=0\)",
    ),
    (
      _tree(
        a__l1__kernel=(3, 4, 8),
        a__l1__bias=(3, 8),
        a__l2__kernel=(8, 4),
        a__l2__bias=(4,),
      ),
      r"'a/l1' \(3, 4, 8\) carry a stack of 3 copies .* but 'a/l2' \(8, 4\) beside them do not",
    ),
    (
      _tree(
        a__l1__kernel=(4, 8),
        a__l1__bias=(8,),
        a__l2__kernel=(3, 8, 4),
        a__l2__bias=(3, 4),
      ),
      r"'a/l2' \(3, 8, 4\) carry a stack of 3 copies .* but 'a/l1' \(4, 8\) beside them do not",
    ),
    (
      _tree(
        a__l1__kernel=(3, 4, 8),
        a__l1__bias=(3, 8),
        b__l2__kernel=(2, 8, 4),
        b__l2__bias=(2, 4),
      ),
      r"the stacks a/l\* \(3 copies\), b/l\* \(2 copies\) .* stand beside each other",
    ),
  ],
  ids=["stack_between_layers", "stack_then_unstacked", "unstacked_then_stack", "two_stacks"],
)
def test_infer_layers_refuses_stacks_beside_other_layers(params, match):
  with pytest.raises(ValueError, match=match):
    gsgd_jax.infer_layers(params)


def test_a_one_d_convolution_with_its_bias_is_still_an_unsupported_kind():
  """A bias ``(out,)`` says the rank-3 kernel is no stack: a 1-D convolution, as before."""
  params = _tree(c1__kernel=(3, 2, 4), c1__bias=(4,), c2__kernel=(3, 4, 4), c2__bias=(4,))
  with pytest.raises(ValueError, match=r"infer_layers: unsupported layer kind: .*rank-3"):
    gsgd_jax.infer_layers(params)


# ----------------------------------------------------------------------------
# infer_blocks(params, 'preln').


class Attention(nn.Module):
  """Stands for the attention: a dense map in a sub-tree named for it, which preln skips."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1], name="out")(x)


class PreLNLayer(nn.Module):
  """One pre-LN transformer layer: ``x + attention(LN(x))``, then ``x + fc2(relu(fc1(
  LN(x))))``."""

  names: tuple[str, str] = ("fc1", "fc2")
  bias: bool = True

  @nn.compact
  def __call__(self, x, _):
    x = x + Attention(name="attention")(nn.LayerNorm(name="attn_norm")(x))
    first, second = self.names
    h = nn.relu(nn.Dense(8, use_bias=self.bias, name=first)(nn.LayerNorm(name="ffn_norm")(x)))
    return x + nn.Dense(x.shape[-1], use_bias=self.bias, name=second)(h), None


class ScannedPreLN(nn.Module):
  names: tuple[str, str] = ("fc1", "fc2")
  bias: bool = True
  scanned: bool = True

  @nn.compact
  def __call__(self, x):
    if self.scanned:
      return nn.scan(PreLNLayer, **SCAN)(self.names, self.bias, name="layers")(x, None)[0]
    for i in range(3):
      x = PreLNLayer(self.names, self.bias, name=f"layers_{i}")(x, None)[0]
    return x


def _preln(model, x=None):
  x = jnp.ones((1, 2, 4)) if x is None else x
  return gsgd_jax.infer_blocks(jax.eval_shape(model.init, jax.random.key(0), x)["params"], "preln")


def test_preln_reads_a_linen_scan_as_one_stacked_block():
  model = ScannedPreLN()
  x = jax.random.normal(jax.random.key(1), (2, 3, 4))
  params = _draw(model, x)["params"]
  assert params["layers"]["fc1"]["kernel"].shape == (3, 4, 8)
  assert params["layers"]["ffn_norm"]["scale"].shape == (3, 4)
  blocks = gsgd_jax.infer_blocks(params, "preln")
  assert blocks == [Block(["layers/ffn_norm", "layers/fc1", "layers/fc2"], stack_axis=0)]
  apply = jax.jit(lambda p, inputs: model.apply({"params": p}, inputs))
  assert gsgd_jax.verify_invariance(apply, params, blocks, x) < 1e-4


def test_preln_reads_a_scanned_t5_feed_forward_without_biases():
  """T5's ``wi``/``wo`` have no biases: the stacked norm ``(S, d)`` in front and the names
  tell the stack from 1-D convolutions."""
  blocks = _preln(ScannedPreLN(names=("wi", "wo"), bias=False))
  assert blocks == [Block(["layers/ffn_norm", "layers/wi", "layers/wo"], stack_axis=0)]


def test_preln_unscanned_layers_stay_unstacked():
  blocks = _preln(ScannedPreLN(scanned=False))
  assert blocks == [
    Block([f"layers_{i}/ffn_norm", f"layers_{i}/fc1", f"layers_{i}/fc2"]) for i in range(3)
  ]


class NNXPreLN(nnx.Module):
  """Three pre-LN feed-forward layers made by ``nnx.vmap``: ``layers/{norm, fc1, fc2}``."""

  def __init__(self):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
      rngs = nnx.Rngs(key)
      return nnx.Dict(
        norm=nnx.LayerNorm(4, rngs=rngs),
        fc1=nnx.Linear(4, 8, rngs=rngs),
        fc2=nnx.Linear(8, 4, rngs=rngs),
      )

    self.layers = make(jax.random.split(jax.random.key(0), 3))


def test_preln_reads_an_nnx_vmap_stack():
  params = nnx.state(nnx.eval_shape(NNXPreLN), nnx.Param)
  blocks = gsgd_jax.infer_blocks(params, "preln")
  assert blocks == [Block(["layers/norm", "layers/fc1", "layers/fc2"], stack_axis=0)]


def test_preln_a_stacked_pair_with_biases_and_no_norm():
  tree = _tree(
    mlp__fc1__kernel=(3, 4, 8),
    mlp__fc1__bias=(3, 8),
    mlp__fc2__kernel=(3, 8, 4),
    mlp__fc2__bias=(3, 4),
  )
  assert gsgd_jax.infer_blocks(tree, "preln") == [Block(["mlp/fc1", "mlp/fc2"], stack_axis=0)]


@pytest.mark.parametrize(
  "tree, match",
  [
    (
      _tree(mlp__wi__kernel=(3, 4, 8), mlp__wo__kernel=(3, 8, 4)),
      r"found none; the rank-3 kernels 'mlp/wi', 'mlp/wo' may be stacked dense layers .*"
      r"1-D convolutions.*stack_axis=0",
    ),
    (
      _tree(
        ln__scale=(4,),
        mlp__c1__kernel=(3, 4, 8),
        mlp__c1__bias=(8,),
        mlp__c2__kernel=(3, 8, 4),
        mlp__c2__bias=(4,),
      ),
      r"feed-forward blocks .* found none\. Layers found",
    ),
  ],
  ids=["no_bias_no_norm", "one_d_convolutions"],
)
def test_preln_rank_3_pairs_that_are_not_proven_stacks(tree, match):
  """Without a stacked bias or norm, a rank-3 pair may be 1-D convolutions; with biases
  ``(out,)`` it is: neither is a feed-forward block."""
  with pytest.raises(ValueError, match=match):
    gsgd_jax.infer_blocks(tree, "preln")


def test_preln_a_stacked_norm_is_not_put_in_front_of_an_unstacked_pair():
  tree = _tree(ln__scale=(3, 4), mlp__fc1__kernel=(4, 8), mlp__fc2__kernel=(8, 4))
  assert gsgd_jax.infer_blocks(tree, "preln") == [Block(["mlp/fc1", "mlp/fc2"])]
