"""Gated feed-forward blocks and attention value chains (docs/math.md, gated feed-forward
blocks and attention): multi-axis kernels declared with ``gsgd_jax.Layer`` act exactly as
their flattened dense twins, stacked or not; Flax's multi-head attention and a SwiGLU block
keep their outputs under the rescalings the declarations name, and path space follows them;
``infer_blocks(..., 'llama')`` writes those declarations from names and refuses the rest."""

from __future__ import annotations

import chex
import corpus
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import train_scan

import gsgd_jax
from gsgd_jax._src.structure import UnsupportedLayerError, build_structure

Layer = gsgd_jax.Layer
D, HEADS, HEAD_DIM = 5, 2, 3

# ----------------------------------------------------------------------------
# A value/output chain (d -> (heads, head_dim) -> d) against its flattened twin.


def _to_copies(a, axis):
  return a if axis is None else jnp.moveaxis(a, axis, 0)


def _from_copies(a, axis):
  return a if axis is None else jnp.moveaxis(a, 0, axis)


def _flat(a, axis, input_axes):
  """A multi-axis kernel (or bias: ``input_axes`` 0) as its dense twin, per copy."""
  a = _to_copies(a, axis)
  lead = a.shape[:1] if axis is not None else ()
  shape = a.shape[len(lead) :]
  flat = (int(np.prod(shape[:input_axes])), int(np.prod(shape[input_axes:])))
  return _from_copies(a.reshape(*lead, *(flat if input_axes else flat[1:])), axis)


def _flatten_tree(tree, axis):
  return {
    "value": {
      "kernel": _flat(tree["value"]["kernel"], axis, 1),
      "bias": _flat(tree["value"]["bias"], axis, 0),
    },
    "out": {"kernel": _flat(tree["out"]["kernel"], axis, 2), "bias": tree["out"]["bias"]},
  }


def _chain_params(axis, seed=0):
  rng = np.random.default_rng(seed)
  copies = 3
  signed = lambda *shape: rng.uniform(0.4, 1.6, shape) * rng.choice([-1.0, 1.0], shape)
  stacked = lambda shape, a=axis: shape if a is None else (*shape[:a], copies, *shape[a:])
  return {
    "value": {
      "kernel": signed(*stacked((D, HEADS, HEAD_DIM))),
      "bias": rng.normal(0, 0.5, stacked((HEADS, HEAD_DIM))),
    },
    "out": {
      "kernel": signed(*stacked((HEADS, HEAD_DIM, D))),
      "bias": rng.normal(0, 0.5, stacked((D,))),
    },
  }


@pytest.mark.parametrize("normalized", [False, True], ids=["plain", "normalized"])
@pytest.mark.parametrize("axis", [None, 0, 1], ids=["unstacked", "axis0", "axis1"])
def test_multi_axis_layers_act_as_their_flattened_twins(axis, normalized):
  params = jax.tree.map(jnp.asarray, _chain_params(axis))
  twin = _flatten_tree(params, axis)
  block = gsgd_jax.Block(
    [Layer("value", input_axes=1), Layer("out", input_axes=2)],
    normalized=normalized,
    stack_axis=axis,
  )
  twin_block = gsgd_jax.Block(["value", "out"], normalized=normalized, stack_axis=axis)
  same = lambda got, want: chex.assert_trees_all_close(
    _flatten_tree(got, axis), want, rtol=1e-12, atol=1e-14
  )
  same(gsgd_jax.basis_path_values(params, [block]), gsgd_jax.basis_path_values(twin, [twin_block]))
  for which in ("fixed", "all"):
    chex.assert_trees_all_equal(
      _flatten_tree(gsgd_jax.skeleton_mask(params, [block], which), axis),
      gsgd_jax.skeleton_mask(twin, [twin_block], which),
    )
  same(gsgd_jax.set_skeleton(params, [block]), gsgd_jax.set_skeleton(twin, [twin_block]))
  key = jax.random.key(4)
  same(
    gsgd_jax.random_rescale(params, [block], key), gsgd_jax.random_rescale(twin, [twin_block], key)
  )
  optimizers = [
    lambda b: gsgd_jax.gsgd(0.05, layers=[b]),
    lambda b: gsgd_jax.path_space(optax.adam(1e-2), layers=[b]),
  ]
  if not normalized:
    same(gsgd_jax.path_norm_scales(params, [block]), gsgd_jax.path_norm_scales(twin, [twin_block]))
    optimizers.append(lambda b: gsgd_jax.path_sgd(0.05, layers=[b]))
  grads = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(7).normal(size=a.shape)), params)
  for make in optimizers:
    tx, twin_tx = make(block), make(twin_block)
    p, state, q, twin_state = params, tx.init(params), twin, twin_tx.init(twin)
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      twin_updates, twin_state = twin_tx.update(_flatten_tree(grads, axis), twin_state, q)
      p, q = optax.apply_updates(p, updates), optax.apply_updates(q, twin_updates)
    same(p, q)


# ----------------------------------------------------------------------------
# Flax's multi-head attention and a SwiGLU block.


class _Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=HEADS * 4, name="attn")(x)


class _SwiGLU(nn.Module):
  @nn.compact
  def __call__(self, x):
    gate, up = nn.Dense(12, name="gate")(x), nn.Dense(12, name="up")(x)
    return nn.Dense(x.shape[-1], name="down")(nn.silu(gate) * up)


def _trained_outputs(apply, params, tx, x, steps=8):
  outputs = apply(params, x)
  target = jax.random.normal(jax.random.key(9), outputs.shape, outputs.dtype)
  loss = lambda p: jnp.mean((apply(p, x) - target) ** 2)
  (trained, _), _ = train_scan(tx, params, loss, steps, lambda _: None)
  return apply(trained, x)


def _invariant(apply, params, blocks, x):
  """Path space from a start and from its rescaling lands on the same outputs; Adam does
  not."""
  params = gsgd_jax.set_skeleton(params, blocks)
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(2))
  gaps = {}
  for name, tx in (
    ("path", gsgd_jax.path_space(optax.adam(1e-2), layers=blocks)),
    ("adam", optax.adam(1e-2)),
  ):
    a, b = (_trained_outputs(apply, p, tx, x) for p in (params, rescaled))
    gaps[name] = float(jnp.max(jnp.abs(a - b)))
  assert gaps["path"] < 1e-11 and gaps["adam"] > 1e-3, gaps


@pytest.mark.parametrize("model", [_Attention, _SwiGLU], ids=["attention", "swiglu"])
def test_flax_attention_and_swiglu_chains_are_invariant(model):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6), jnp.float64)
  module = model()
  params = jax.tree.map(lambda a: a.astype(jnp.float64), module.init(jax.random.key(1), x))
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x))
  params = params["params"]
  blocks = gsgd_jax.infer_blocks(params, "llama") if model is _Attention else None
  if model is _Attention:
    assert blocks == [
      gsgd_jax.Block([Layer("attn/value", input_axes=1), Layer("attn/out", input_axes=2)])
    ]
    wrong = [gsgd_jax.Block([Layer("attn/query", input_axes=1), Layer("attn/out", input_axes=2)])]
  else:
    blocks = [gsgd_jax.Block(["up", "down"])]
    wrong = [gsgd_jax.Block(["gate", "down"])]  # the gate declared as the up projection
  assert gsgd_jax.verify_invariance(apply, params, blocks, x) <= 1e-14
  with pytest.raises(ValueError, match="query" if model is _Attention else "'gate'"):
    gsgd_jax.verify_invariance(apply, params, wrong, x)
  _invariant(apply, params, blocks, x)


# ----------------------------------------------------------------------------
# infer_blocks(params, 'llama').


def _shapes(model, x):
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scanned"])
def test_llama_layout_writes_the_up_down_and_value_out_chains(scanned):
  model = corpus.Llama(scanned=scanned)
  tokens = jnp.zeros((2, 8), jnp.int32)
  blocks = gsgd_jax.infer_blocks(_shapes(model, tokens), "llama")
  assert blocks == corpus.llama_blocks(model)
  assert not any("gate" in "/".join(path) for block in blocks for path in block.layers)


def test_llama_layout_reads_t5_names_and_multi_axis_kernels_on_axis_1():
  model = corpus.ScannedT5(corpus.T5Config(gated=True))
  blocks = gsgd_jax.infer_blocks(_shapes(model, jnp.zeros((2, 8), jnp.int32)), "llama")
  scope = "encoder/encoder"
  assert blocks == [
    gsgd_jax.Block(
      [
        Layer(f"{scope}/attention/value", input_axes=1),
        Layer(f"{scope}/attention/out", input_axes=2),
      ],
      stack_axis=1,
    ),
    gsgd_jax.Block([f"{scope}/mlp/wi_1", f"{scope}/mlp/wo"], stack_axis=1),
  ]


def _kernels(**shapes):
  """A params tree of kernels: ``scope__name=shape`` gives ``{scope: {name: {'kernel'}}}``."""
  tree: dict = {}
  for key, shape in shapes.items():
    scope, name = key.split("__")
    tree.setdefault(scope, {})[name] = {"kernel": jnp.zeros(shape)}
  return tree


@pytest.mark.parametrize(
  ("shapes", "message"),
  [
    (
      {"attn__qkv_proj": (8, 24), "attn__o_proj": (8, 8)},
      "'attn/qkv_proj'.*fused query-key-value",
    ),
    (
      {"attn__q_proj": (8, 8), "attn__v_proj": (8, 4), "attn__o_proj": (8, 8)},
      "grouped-query attention.*Pass head_dim",
    ),
    ({"mlp__up_proj": (8, 16), "mlp__down_proj": (16, 8)}, "has no gate projection"),
    (
      {"mlp__gate_proj": (8, 16), "mlp__up_proj": (8, 16), "mlp__down_proj": (16, 8),
       "mlp__extra": (8, 16)},
      "'mlp/extra'.*no role",
    ),
    ({"head__Dense_0": (8, 4)}, "no gated feed-forward block"),
  ],
  ids=["fused-qkv", "grouped-query", "no-gate", "extra-kernel", "nothing"],
)  # fmt: skip
def test_llama_layout_refuses_what_it_cannot_read(shapes, message):
  with pytest.raises(ValueError, match=message):
    gsgd_jax.infer_blocks(_kernels(**shapes), "llama")


# ----------------------------------------------------------------------------
# Declarations.


def test_layer_declarations_and_their_refusals():
  params = jax.tree.map(jnp.asarray, _chain_params(None))
  value, out = Layer("value", input_axes=1), Layer("out", input_axes=2)
  assert repr(gsgd_jax.Block([value, out], stack_axis=0)) == (
    "Block([Layer('value', input_axes=1), Layer('out', input_axes=2)], stack_axis=0)"
  )
  # One chain of Layers, as a flat list, reads as one block.
  chex.assert_trees_all_close(
    gsgd_jax.basis_path_values(params, [value, out]),
    gsgd_jax.basis_path_values(params, [gsgd_jax.Block([value, out])]),
  )
  tx = lambda layers: gsgd_jax.gsgd(0.1, layers=layers).init(params)
  with pytest.raises(ValueError, match=r"bias of shape \(2, 3\).*gsgd_jax.Layer\(path, input_axes"):
    tx([gsgd_jax.Block(["value", "out"])])
  with pytest.raises(ValueError, match=r"'value'.*input_axes=3.*no output axis"):
    tx([gsgd_jax.Block([Layer("value", input_axes=3), out])])
  with pytest.raises(
    ValueError, match=r"'value': bias of shape \(2, 3\) does not match the output"
  ):
    tx([gsgd_jax.Block([Layer("value", input_axes=2), out])])
  with pytest.raises(ValueError, match=r"'out': bias of shape \(5,\) does not match the output"):
    tx([gsgd_jax.Block([value, Layer("out", input_axes=1)])])
  without_bias = {**params, "out": {"kernel": params["out"]["kernel"]}}
  with pytest.raises(ValueError, match=r"'out' takes 2 inputs .* has 6 outputs"):
    gsgd_jax.gsgd(0.1, layers=[value, Layer("out", input_axes=1)]).init(without_bias)
  with pytest.raises(TypeError, match="input_axes"):
    Layer("value", input_axes=0)
  norm = {"ln": {"scale": jnp.ones(5)}, **params}
  with pytest.raises(ValueError, match=r"'ln'.*norm's 'scale'"):
    gsgd_jax.gsgd(0.1, layers=[gsgd_jax.Block([Layer("ln", input_axes=1), value, out])]).init(norm)


def test_llama_layout_reads_flat_layers_and_metas_names():
  flat = _kernels(
    **{f"layer__{n}": (8, 8) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
    layer__gate_proj=(8, 16), layer__up_proj=(8, 16), layer__down_proj=(16, 8),
  )  # fmt: skip
  assert gsgd_jax.infer_blocks(flat, "llama") == [
    gsgd_jax.Block(["layer/up_proj", "layer/down_proj"]),
    gsgd_jax.Block(["layer/v_proj", "layer/o_proj"]),
  ]
  # Meta's names: 'wo' is the attention's output there, T5's down projection elsewhere.
  meta = _kernels(
    **{f"attention__{n}": (8, 8) for n in ("wq", "wk", "wv", "wo")},
    feed_forward__w1=(8, 16), feed_forward__w3=(8, 16), feed_forward__w2=(16, 8),
  )  # fmt: skip
  assert gsgd_jax.infer_blocks(meta, "llama") == [
    gsgd_jax.Block(["attention/wv", "attention/wo"]),
    gsgd_jax.Block(["feed_forward/w3", "feed_forward/w2"]),
  ]
  # One scope holding an attention and a gated block whose names leave 'wo' open: refused.
  ambiguous = _kernels(
    **{f"layer__{n}": (8, 8) for n in ("wq", "wk", "wv", "wo")},
    layer__w1=(8, 16), layer__w3=(8, 16),
  )  # fmt: skip
  with pytest.raises(ValueError, match=r"'layer/wo'.*may be the out or the down projection"):
    gsgd_jax.infer_blocks(ambiguous, "llama")


# ----------------------------------------------------------------------------
# Queries and keys (docs/math.md): the symmetry checked through twins the library reads
# today, before a reading of the key kernel transposed is built on it.


def _qk_logits(q_kernel, k_kernel, x, rope):
  """Attention logits ``(batch, heads, seq, seq)`` of kernels ``(d, heads, head_dim)``."""
  q = jnp.einsum("bsd,dhe->bshe", x, q_kernel)
  k = jnp.einsum("bsd,dhe->bshe", x, k_kernel)
  if rope:
    q, k = corpus.rotary(q), corpus.rotary(k)
  return jnp.einsum("bqhe,bkhe->bhqk", q, k)


def _pairs_to_kernel(twin, heads, head_dim):
  """A 2-tap kernel ``(1, 2, d, heads * head_dim / 2)`` (tap = which half of a head's
  dimensions) as ``(d, heads, head_dim)`` with RoPE's half-split pairs ``(j, j + head_dim/2)``
  in one node."""
  halves = twin[0].reshape(2, twin.shape[2], heads, head_dim // 2)
  return jnp.concatenate([halves[0], halves[1]], axis=-1)


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_queries_and_keys_chain_through_head_dimensions(rope):
  """Without RoPE, ``[W_q, W_k^T]`` is a chain whose nodes are the head dimensions (the key
  kernel read transposed: a twin stores it so); with RoPE, a node is a pair of dimensions,
  each pair a node of two parallel edges (a twin stores both kernels as 2-tap
  convolutions), and the per-dimension declaration fails."""
  rng = np.random.default_rng(3)
  d, heads, head_dim = 6, 2, 4
  x = jnp.asarray(rng.normal(size=(2, 5, d)))
  signed = lambda *shape: jnp.asarray(rng.uniform(0.4, 1.6, shape) * rng.choice([-1, 1], shape))
  loss_of = lambda logits: jnp.sum(jax.nn.softmax(logits, -1) ** 2)
  if rope:
    nodes = heads * head_dim // 2
    params = {"q": {"kernel": signed(1, 2, d, nodes)}, "kt": {"kernel": signed(1, 2, nodes, d)}}

    def apply(p, x):
      q = _pairs_to_kernel(p["q"]["kernel"], heads, head_dim)
      k = _pairs_to_kernel(jnp.swapaxes(p["kt"]["kernel"], 2, 3), heads, head_dim)
      return _qk_logits(q, k, x, rope=True)

    # Read per dimension instead: the same kernels as dense (d, heads * head_dim) ones.
    flat = {
      "q": {"kernel": _pairs_to_kernel(params["q"]["kernel"], heads, head_dim).reshape(d, -1)},
      "kt": {
        "kernel": _pairs_to_kernel(jnp.swapaxes(params["kt"]["kernel"], 2, 3), heads, head_dim)
        .reshape(d, -1)
        .T
      },
    }
    per_dimension = lambda p, x: _qk_logits(
      p["q"]["kernel"].reshape(d, heads, head_dim),
      p["kt"]["kernel"].T.reshape(d, heads, head_dim), x, rope=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="rescaling the output nodes of layer 'q'"):
      gsgd_jax.verify_invariance(per_dimension, flat, ["q", "kt"], x)
  else:
    params = {
      "q": {"kernel": signed(d, heads * head_dim)},
      "kt": {"kernel": signed(heads * head_dim, d)},
    }

    def apply(p, x):
      q = p["q"]["kernel"].reshape(d, heads, head_dim)
      return _qk_logits(q, p["kt"]["kernel"].T.reshape(d, heads, head_dim), x, rope=False)

  blocks = [gsgd_jax.Block(["q", "kt"])]
  assert gsgd_jax.verify_invariance(apply, params, blocks, x) <= 1e-13
  params = gsgd_jax.set_skeleton(params, blocks)
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(2))
  loss = lambda p: loss_of(apply(p, x))
  gaps = {}
  for name, tx in (
    ("path", gsgd_jax.path_space(optax.adam(1e-2), layers=blocks)),
    ("adam", optax.adam(1e-2)),
  ):
    ends = []
    for start in (params, rescaled):
      p, state = start, tx.init(start)
      for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
      ends.append(apply(p, x))
    gaps[name] = float(jnp.max(jnp.abs(ends[0] - ends[1])))
  assert gaps["path"] < 1e-11 and gaps["adam"] > 1e-3, gaps


# ----------------------------------------------------------------------------
# Queries and keys read natively: the key kernel transposed, RoPE pairs as two-tap nodes,
# against the twins above (dense, or two-tap convolutions), stacked too.


def _qk_native(axis, rng):
  copies = 3
  stacked = lambda shape: shape if axis is None else (*shape[:axis], copies, *shape[axis:])
  signed = lambda shape: rng.uniform(0.4, 1.6, shape) * rng.choice([-1.0, 1.0], shape)
  return {
    "q": {
      "kernel": jnp.asarray(signed(stacked((D, HEADS, 4)))),
      "bias": jnp.asarray(rng.normal(0, 0.5, stacked((HEADS, 4)))),
    },
    "k": {"kernel": jnp.asarray(signed(stacked((D, HEADS, 4))))},
  }


def _entries_of_pairs(pairs, head_dim):
  """Per (tap, pair) the position of the dimension in a head of ``head_dim``."""
  t, p = np.meshgrid(np.arange(2), np.arange(head_dim // 2), indexing="ij")
  return t * (head_dim // 2) + p if pairs == "half" else 2 * p + t


def _qk_twin(tree, axis, pairs):
  """The native query/key tree as its twin: dense ``q (d, n)``, ``kt (n, d)`` without pairs;
  two-tap convolutions ``q (1, 2, d, n / 2)``, ``kt (1, 2, n / 2, d)`` with them (and the
  query's bias ``(2, n / 2)`` per tap... as the convolution's bias is per node, the twin of
  a paired bias is refused: the paired trees here carry none)."""
  q, k = _to_copies(tree["q"]["kernel"], axis), _to_copies(tree["k"]["kernel"], axis)
  lead = q.shape[:1] if axis is not None else ()
  head_dim = q.shape[-1]
  if pairs is None:
    twin = {
      "q": {"kernel": q.reshape(*lead, D, -1)},
      "kt": {"kernel": jnp.swapaxes(k.reshape(*lead, D, -1), -1, -2)},
    }
    if "bias" in tree["q"]:
      twin["q"]["bias"] = _to_copies(tree["q"]["bias"], axis).reshape(*lead, -1)
  else:
    where = _entries_of_pairs(pairs, head_dim)  # (2, head_dim / 2)
    taps = lambda a: jnp.stack(
      [a[..., where[t]].reshape(*a.shape[:-2], -1) for t in range(2)], axis=-3
    )  # (..., 2, d, heads * head_dim / 2)
    twin = {
      "q": {"kernel": taps(q)[..., None, :, :, :]},
      "kt": {"kernel": jnp.swapaxes(taps(k), -1, -2)[..., None, :, :, :]},
    }
  return jax.tree.map(lambda a: _from_copies(a, axis), twin)


@pytest.mark.parametrize("pairs", [None, "half", "interleaved"])
@pytest.mark.parametrize("axis", [None, 0], ids=["unstacked", "axis0"])
def test_query_key_layers_act_as_their_twins(axis, pairs):
  rng = np.random.default_rng(11)
  params = _qk_native(axis, rng)
  if pairs is not None:
    del params["q"]["bias"]
  twin = _qk_twin(params, axis, pairs)
  q = Layer("q", input_axes=1, pairs=pairs)
  k = Layer("k", input_axes=1, transposed=True, pairs=pairs)
  block = gsgd_jax.Block([q, k], stack_axis=axis)
  twin_block = gsgd_jax.Block(["q", "kt"], stack_axis=axis)
  same = lambda got, want: chex.assert_trees_all_close(
    _qk_twin(got, axis, pairs), want, rtol=1e-12, atol=1e-14
  )
  same(gsgd_jax.basis_path_values(params, [block]), gsgd_jax.basis_path_values(twin, [twin_block]))
  for which in ("fixed", "all"):
    chex.assert_trees_all_equal(
      _qk_twin(gsgd_jax.skeleton_mask(params, [block], which), axis, pairs),
      gsgd_jax.skeleton_mask(twin, [twin_block], which),
    )
  same(gsgd_jax.set_skeleton(params, [block]), gsgd_jax.set_skeleton(twin, [twin_block]))
  key = jax.random.key(4)
  same(
    gsgd_jax.random_rescale(params, [block], key), gsgd_jax.random_rescale(twin, [twin_block], key)
  )
  same(gsgd_jax.path_norm_scales(params, [block]), gsgd_jax.path_norm_scales(twin, [twin_block]))
  grads = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(7).normal(size=a.shape)), params)
  for make in (
    lambda b: gsgd_jax.gsgd(0.05, layers=[b]),
    lambda b: gsgd_jax.path_space(optax.adam(1e-2), layers=[b]),
    lambda b: gsgd_jax.path_sgd(0.05, layers=[b]),
  ):
    tx, twin_tx = make(block), make(twin_block)
    p, state, t, twin_state = params, tx.init(params), twin, twin_tx.init(twin)
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      twin_updates, twin_state = twin_tx.update(_qk_twin(grads, axis, pairs), twin_state, t)
      p, t = optax.apply_updates(p, updates), optax.apply_updates(t, twin_updates)
    same(p, t)


def test_query_key_chain_of_the_llama_decoder():
  """The corpus decoder's q_proj/k_proj (``(d, heads * head_dim)``, Hugging Face's RoPE halves):
  the pairs declared, the chain keeps the outputs; per dimension, it does not."""
  model = corpus.Llama()
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 0, 40)
  params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), tokens))
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  params = params["params"]
  layer = "model/layers/0/self_attn"
  head_dim = model.config.head_dim

  def chain(**pairs):
    return [
      gsgd_jax.Block([
        Layer(f"{layer}/q_proj", input_axes=1, **pairs),
        Layer(f"{layer}/k_proj", input_axes=1, transposed=True, **pairs),
      ])
    ]  # fmt: skip

  blocks = chain(pairs="half", head_dim=head_dim)
  assert gsgd_jax.verify_invariance(apply, params, blocks, tokens) <= 1e-13
  # The message names the layer and points at the pairing it was declared with.
  with pytest.raises(ValueError, match=r"q_proj.*declared pairs='interleaved'"):
    gsgd_jax.verify_invariance(apply, params, chain(pairs="interleaved", head_dim=head_dim), tokens)
  with pytest.raises(ValueError, match=r"q_proj.*declared pairs=None"):
    gsgd_jax.verify_invariance(apply, params, chain(), tokens)
  _invariant(apply, params, blocks + corpus.llama_blocks(model), tokens)


def test_query_key_declarations_refused():
  params = _qk_native(None, np.random.default_rng(1))
  k_bias = {**params, "k": {**params["k"], "bias": jnp.zeros((HEADS, 4))}}
  q, k = Layer("q", input_axes=1), Layer("k", input_axes=1, transposed=True)
  with pytest.raises(UnsupportedLayerError, match="'k': declared transposed, but it has a bias"):
    gsgd_jax.gsgd(0.1, layers=[q, k]).init(k_bias)
  odd = {"q": {"kernel": jnp.ones((D, 2, 3))}}
  with pytest.raises(ValueError, match="not made of heads of an even head_dim"):
    gsgd_jax.gsgd(0.1, layers=[Layer("q", input_axes=1, pairs="half"), "q2"]).init(
      {**odd, "q2": {"kernel": jnp.ones((6, D))}}
    )
  with pytest.raises(ValueError, match="`pairs` must be None, 'half' or 'interleaved'"):
    Layer("q", input_axes=1, pairs="rope")
  assert repr(Layer("k", input_axes=1, transposed=True, pairs="half", head_dim=8)) == (
    "Layer('k', input_axes=1, transposed=True, pairs='half', head_dim=8)"
  )


def test_llama_layout_declares_queries_and_keys_when_told_how_positions_enter():
  tokens = jnp.zeros((2, 8), jnp.int32)
  llama = _shapes(corpus.Llama(), tokens)
  blocks = gsgd_jax.infer_blocks(llama, "llama", query_key="half", head_dim=8)
  scope = "model/layers/0/self_attn"
  assert blocks[1] == gsgd_jax.Block([
    Layer(f"{scope}/q_proj", input_axes=1, pairs="half", head_dim=8),
    Layer(f"{scope}/k_proj", input_axes=1, transposed=True, pairs="half", head_dim=8),
  ])  # fmt: skip
  assert len(blocks) == 6 and blocks[0::3] == corpus.llama_blocks(corpus.Llama())[0::2]
  with pytest.raises(ValueError, match="pass head_dim"):
    gsgd_jax.infer_blocks(llama, "llama", query_key="half")
  t5 = _shapes(corpus.ScannedT5(corpus.T5Config(gated=True)), tokens)
  (qk, *_) = gsgd_jax.infer_blocks(t5, "llama", query_key="plain")
  assert qk == gsgd_jax.Block(
    [
      Layer("encoder/encoder/attention/query", input_axes=1),
      Layer("encoder/encoder/attention/key", input_axes=1, transposed=True),
    ],
    stack_axis=1,
  )
  # Flax's attention has a key bias by default: it cannot join the chain.
  flax_attention = _shapes(_Attention(), jnp.zeros((1, 3, 6)))
  with pytest.raises(ValueError, match=r"'attn/key'.*has a bias"):
    gsgd_jax.infer_blocks(flax_attention, "llama", query_key="plain")
  with pytest.raises(ValueError, match="query_key must be None, 'plain'"):
    gsgd_jax.infer_blocks(llama, "llama", query_key="rope")
  with pytest.raises(ValueError, match="apply to the layout 'llama' only"):
    gsgd_jax.infer_blocks(llama, "preln", query_key="plain")


def test_paired_chains_check_their_pairs_probes_and_counts():
  rng = np.random.default_rng(5)
  d, heads, head_dim = 4, 2, 4
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape))
  params = {
    "q": {
      "kernel": normal(d, heads, head_dim),
      "bias": normal(heads, head_dim),
      "scale_probe": jnp.ones((heads, head_dim)),
    },
    "k": {"kernel": normal(d, heads, head_dim)},
  }
  x = normal(3, d)
  q = Layer("q", input_axes=1, pairs="half")
  k = lambda **kw: Layer("k", input_axes=1, transposed=True, **kw)
  # The pairs must be the same on both sides of the nodes the two layers share.
  for other in ({"pairs": "interleaved"}, {}):
    with pytest.raises(
      ValueError, match=r"'q' .* and 'k' .* meet at nodes they group differently.*same pairs"
    ):
      gsgd_jax.gsgd(0.1, layers=[q, k(**other)]).init(params)
  # The same pairs on both, but the key not read transposed (its pairs then fall on its
  # outputs): the message says to read it transposed.
  square = {name: {"kernel": normal(2 * head_dim, heads, head_dim)} for name in ("q", "k")}
  with pytest.raises(ValueError, match=r"group differently.*read 'q' as it is and 'k' transposed"):
    gsgd_jax.gsgd(0.1, layers=[q, Layer("k", input_axes=1, pairs="half")]).init(square)
  transposed_q = Layer("q", input_axes=1, transposed=True, pairs="half")
  with pytest.raises(ValueError, match=r"group differently.*read 'q' as it is"):
    gsgd_jax.gsgd(0.1, layers=[transposed_q, k(pairs="half")]).init(square)

  # A probe of a paired layer is checked per node, its two entries summed.
  def loss(p):
    h = (jnp.einsum("bd,dhe->bhe", x, p["q"]["kernel"]) + p["q"]["bias"]) * p["q"]["scale_probe"]
    return jnp.mean(jnp.tanh(jnp.einsum("bhe,dhe->bd", h, p["k"]["kernel"])) ** 2)

  assert gsgd_jax.verify_probes(loss, params, [q, k(pairs="half")]) < 1e-10
  (struct,) = build_structure(params, [q, k(pairs="half")])
  # H = 4 paired nodes; m = 2 kernels of 32 + the query's 8 bias entries.
  assert struct.num_hidden == 4 and struct.num_weights == 72 and struct.num_basis_paths == 68
  probed_key = {**params, "k": {**params["k"], "scale_probe": jnp.ones((heads, head_dim))}}
  with pytest.raises(UnsupportedLayerError, match="'k': declared transposed, but it has a scale"):
    gsgd_jax.gsgd(0.1, layers=[q, k(pairs="half")]).init(probed_key)
  flat = {
    "q": {"kernel": normal(d, heads * head_dim)},
    "k": {"kernel": normal(d, heads * head_dim)},
  }
  with pytest.raises(ValueError, match=r"features are one axis.*pass head_dim"):
    gsgd_jax.gsgd(0.1, layers=[q, k(pairs="half")]).init(flat)
  with pytest.raises(ValueError, match="head_dim=4 is given without pairs"):
    Layer("q", input_axes=1, head_dim=4)


def test_llama_layout_leaves_relu_blocks_and_refuses_what_breaks_the_query_key_chain():
  tokens = jnp.zeros((2, 8), jnp.int32)
  t5 = _shapes(corpus.ScannedT5(), tokens)  # T5 1.0: a ReLU wi/wo block, left to 'preln'
  (attention,) = gsgd_jax.infer_blocks(t5, "llama")
  assert attention.layers[0][-1] == "value"
  llama = _shapes(corpus.Llama(), tokens)
  with pytest.raises(ValueError, match="head_dim=5 does not divide"):
    gsgd_jax.infer_blocks(llama, "llama", query_key="plain", head_dim=5)
  # head_dim tells how heads fall where grouped-query attention or RoPE needs it; it
  # changes nothing elsewhere.
  assert gsgd_jax.infer_blocks(llama, "llama", head_dim=8) == gsgd_jax.infer_blocks(llama, "llama")
  with_norms = {
    "attn": {
      **{n: {"kernel": jnp.zeros((8, 2, 4))} for n in ("query", "key", "value")},
      "out": {"kernel": jnp.zeros((2, 4, 8))},
      "query_norm": {"scale": jnp.ones(4)},
    }
  }
  with pytest.raises(ValueError, match=r"holds norms 'attn/query_norm'"):
    gsgd_jax.infer_blocks(with_norms, "llama", query_key="plain")
  assert len(gsgd_jax.infer_blocks(with_norms, "llama")) == 1  # the value chain holds


def test_llama_layout_leaves_alone_scopes_that_are_no_block():
  # A head whose kernels are 'hidden' and 'out' is no attention (no value): left alone.
  tree = _kernels(
    layer__gate_proj=(8, 16), layer__up_proj=(8, 16), layer__down_proj=(16, 8),
    head__hidden=(8, 8), head__out=(8, 4),
  )  # fmt: skip
  assert gsgd_jax.infer_blocks(tree, "llama") == [
    gsgd_jax.Block(["layer/up_proj", "layer/down_proj"])
  ]


# ----------------------------------------------------------------------------
# Grouped-query attention: kv_heads key-value heads, each shared by heads // kv_heads
# consecutive query heads (Hugging Face's repeat_kv); one key-value head is multi-query
# attention.

GQA_HEADS, GQA_KV, GQA_HEAD_DIM, GQA_D = 4, 2, 4, 8


def _gqa_params(multi_axis, rng, kv=GQA_KV):
  h, e, d = GQA_HEADS, GQA_HEAD_DIM, GQA_D
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]))
  if multi_axis:  # DenseGeneral: (d, heads, head_dim) and (heads, head_dim, d)
    shapes = {"q": (d, h, e), "k": (d, kv, e), "v": (d, kv, e), "o": (h, e, d)}
  else:  # Hugging Face: (d, heads * head_dim) and (heads * head_dim, d)
    shapes = {"q": (d, h * e), "k": (d, kv * e), "v": (d, kv * e), "o": (h * e, d)}
  return {name: {"kernel": normal(*shape)} for name, shape in shapes.items()}


def _gqa_apply(p, x):
  h, e = GQA_HEADS, GQA_HEAD_DIM
  kv = p["k"]["kernel"].size // (GQA_D * e)
  heads = lambda name, n: (x @ p[name]["kernel"].reshape(GQA_D, -1)).reshape(*x.shape[:2], n, e)
  shared = lambda z: jnp.repeat(z, h // kv, axis=2)
  q = corpus.rotary(heads("q", h))
  k = shared(corpus.rotary(heads("k", kv)))
  weights = jax.nn.softmax(jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e), -1)
  mixed = jnp.einsum("bhqk,bkhe->bqhe", weights, shared(heads("v", kv)))
  return mixed.reshape(*x.shape[:2], -1) @ p["o"]["kernel"].reshape(h * e, GQA_D)


@pytest.mark.parametrize("kv", [GQA_KV, 1], ids=["grouped", "multi-query"])
@pytest.mark.parametrize("multi_axis", [False, True], ids=["hugging-face", "dense-general"])
def test_grouped_query_attention_chains_are_invariant(multi_axis, kv):
  rng = np.random.default_rng(11)
  params = _gqa_params(multi_axis, rng, kv)
  x = jnp.asarray(rng.normal(size=(2, 5, GQA_D)))
  axes = 2 if multi_axis else 1
  head_dim = None if multi_axis else GQA_HEAD_DIM
  rope = {"pairs": "half", "head_dim": head_dim}
  blocks = [
    gsgd_jax.Block(
      [Layer("q", input_axes=1, kv_heads=kv, **rope),
       Layer("k", input_axes=1, transposed=True, **rope)]
    ),
    gsgd_jax.Block(
      ["v" if not multi_axis else Layer("v", input_axes=1),
       Layer("o", input_axes=axes, head_dim=head_dim, kv_heads=kv)]
    ),
  ]  # fmt: skip
  assert gsgd_jax.infer_blocks(params, "llama", query_key="half", head_dim=head_dim) == blocks
  assert gsgd_jax.verify_invariance(_gqa_apply, params, blocks, x) <= 1e-13
  # Without kv_heads the output's inputs are not the value's outputs: refused, with the way out.
  with pytest.raises(ValueError, match=r"grouped-query attention.*kv_heads"):
    gsgd_jax.verify_invariance(_gqa_apply, params, [["v", "o"]] if not multi_axis else [
      gsgd_jax.Block([Layer("v", input_axes=1), Layer("o", input_axes=2)])], x)  # fmt: skip
  _invariant(_gqa_apply, params, blocks, x)


@pytest.mark.parametrize("pairs", [None, "half", "interleaved"])
@pytest.mark.parametrize("head_dim", [None, 4])
def test_grouped_sides_share_each_node_among_a_group_of_heads(pairs, head_dim):
  from gsgd_jax._src import basis, reading

  shape = (3 * 2 * 4,) if head_dim else (6, 4)  # 6 query heads of 4, 2 per key-value head
  side = reading.side((1,) if head_dim else (1, 2), shape, pairs, head_dim, groups=2)
  entry = np.arange(side.entries)
  head, dim = entry // 4, entry % 4
  pair = dim if pairs is None else (dim % 2 if pairs == "half" else dim // 2)
  per_head = 4 if pairs is None else 2
  np.testing.assert_array_equal(side.node, head // 2 * per_head + pair)
  assert side.nodes == 3 * per_head and side.taps == side.entries // side.nodes
  # Each node's skeleton tap is one of its own entries, and the broadcasts and sums per node
  # that replace gathers agree with them.
  np.testing.assert_array_equal(side.node[side.centre], np.arange(side.nodes))
  x = jnp.arange(side.nodes, dtype=jnp.float64)
  np.testing.assert_array_equal(basis._expand(x, side), np.asarray(x)[side.node])
  values = jnp.arange(side.entries, dtype=jnp.float64) ** 2
  sums = np.zeros(side.nodes)
  np.add.at(sums, side.node, np.asarray(values))
  np.testing.assert_array_equal(basis._fold(values, side), sums)


def test_grouped_query_declarations_refused():
  params = _gqa_params(False, np.random.default_rng(0))
  o = lambda **kw: Layer("o", input_axes=1, **kw)
  with pytest.raises(TypeError, match="`kv_heads` must be None or an integer >= 1"):
    o(kv_heads=0)
  with pytest.raises(ValueError, match="in a block of 3 layer"):
    gsgd_jax.gsgd(0.1, layers=[["v", o(head_dim=4, kv_heads=2), "q"]]).init(params)
  with pytest.raises(ValueError, match="pass head_dim, the size of one head"):
    gsgd_jax.gsgd(0.1, layers=[["v", o(kv_heads=2)]]).init(params)
  with pytest.raises(ValueError, match="do not hold a multiple of 3 heads"):
    gsgd_jax.gsgd(0.1, layers=[["v", o(head_dim=4, kv_heads=3)]]).init(params)
  with pytest.raises(ValueError, match="RoPE's pairs are on its last"):
    gsgd_jax.gsgd(0.1, layers=[["v", o(head_dim=4, kv_heads=2, pairs="half")]]).init(params)
