"""Writing the block declarations of common Flax layouts with normalization layers.

``infer_blocks`` reads a params tree's module names and shapes (``found_layers``) and
writes the blocks of docs/math.md (normalization layers, "Where the blocks go") for a
plain CNN with BatchNorm, a ResNet with BatchNorm (post- or pre-activation:
``layout_conv``), the feed-forward blocks of a pre-LN transformer (``layout_preln``), or
the gated feed-forward blocks and attention value chains of a LLaMA-style decoder
(``layout_gated``).
A tree that does not fit the layout raises rather than guessing: such a model is
declared by hand with :class:`gsgd_jax.Block`.
"""

from __future__ import annotations

from typing import Any

import optax

from gsgd_jax._src import found_layers, layout_conv, layout_gated, layout_preln, structure
from gsgd_jax._src.declaration import Block

LAYOUTS = ("plainnet", "resnet", "preact", "preln", "llama")

_WRITERS = {
  "plainnet": layout_conv.plainnet,
  "resnet": layout_conv.resnet,
  "preact": layout_conv.preact,
  "preln": layout_preln.preln,
  "llama": layout_gated.gated,
}


def infer_blocks(
  params: optax.Params,
  layout: str,
  *,
  batch_stats: Any = None,
  query_key: str | None = None,
  head_dim: int | None = None,
) -> list[Block]:
  """Writes the block declaration of a common Flax layout with normalization layers.

  Reads the module names and shapes of ``params``, never its pytree order, and
  declares the blocks of docs/math.md (normalization layers, "Where the blocks
  go"). A layer is a sub-tree with a ``kernel`` (rank 2: dense; rank 3 to 5:
  convolution) or a norm: a sub-tree with a ``scale`` and no kernel (Flax
  ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``RMSNorm``; of rank 2 for a stack
  of norms, which ``'preln'`` reads). Layers of a kind are ordered by the number
  or single letter ending their last key (``Conv_0``, ``conv1``, ``conv_a``, NNX
  lists ``convs/0``); Linen numbers modules in the order they are built, so
  build each before calling the next. Layouts:

  * ``'plainnet'``: ``conv -> BatchNorm -> ReLU`` repeated, then a dense head
    (one layer, or one numbered group): ``Block([conv_0], normalized=True)``,
    ``Block([norm_i, conv_{i+1}], normalized=True)`` and ``Block([norm_last,
    *head])``, in forward order.
  * ``'resnet'`` (post-activation, the original ResNet and the Flax ImageNet
    example): a stem (the convolutions and norms outside residual blocks:
    ``stem``/``stem_bn``, ``conv_init``/``bn_init``), residual blocks (sub-trees
    holding two or more convolutions and two or more norms; the main branch is
    the largest numbered or lettered group of each, basic or bottleneck, each
    convolution followed by its norm; one other convolution is the projection
    shortcut, with its norm) and a dense head. The stem and each main branch
    chain like a plainnet, all normalized, but their last norm starts no block;
    the projection is a normalized block of its own; the head, the last norms
    and the projection's norm are left to the fallback.
  * ``'preact'`` (pre-activation, ResNet v2: ``norm -> ReLU -> conv`` repeated
    in each residual block, the norm's width that of the convolution's
    *inputs*): ``Block([norm_i, conv_i], normalized=True)`` for every
    convolution of a main branch but the last, ``Block([norm_last,
    conv_last])``, and after the last residual block ``Block([final_norm,
    *head])``. A projection shortcut (a convolution outside the main branch,
    without a norm of its own) may read the first norm's output, so in its
    block the first convolution is declared alone, ``Block([conv_0],
    normalized=True)``, which holds either way; the projection, the stem's
    convolutions and the first norm there take the fallback.
  * ``'preln'``: pre-LN transformer feed-forward blocks ``LN -> fc1 -> ReLU ->
    fc2``: every sub-tree whose only kernels are two dense ones forming ``d ->
    h -> d`` (or, in a flat sub-tree, the pairs whose names end in the same
    number: ``fc1_0``/``fc2_0``), ordered by their names (``fc1`` before
    ``fc2``, ``wi`` before ``wo``) or else by the norm's width, with the norm of
    width ``d`` in front: in the same sub-tree (a flat sub-tree's norm carries
    the pair's number), else in the nearest ancestor holding norms. Of several,
    the one whose name contains ``ffn``, ``mlp``, ``ff`` or ``final``, else the
    highest-numbered (the attention's norm comes first, as lm1b's
    ``LayerNorm_0`` before ``LayerNorm_1``). ``Block([ln, fc1, fc2])`` per
    feed-forward block (``Block([fc1, fc2])`` when no norm is found), in the
    numeric order of their paths. Attention projections (``query``, ``key``,
    ``value``, ``q_proj``, ..., rank-3 ``DenseGeneral`` kernels) and sub-trees
    named for attention are never feed-forward blocks. A scanned transformer
    holds ``S`` copies of each layer on one axis of its leaves: axis 0 for
    Linen ``nn.scan`` with ``variable_axes={'params': 0}`` and NNX ``nnx.vmap``
    (kernels ``(S, d, h)``), axis 1 for t5x and MaxText (``param_scan_axis=1``:
    kernels ``(d, S, h)``, norms ``(d, S)``). Where a sub-tree's kernels make no
    pair of rank 2, two of rank 3 forming such a stacked pair are one when
    biases or a stacked norm in front carry the same stack (T5's ``wi``/``wo``
    have no biases), and give ``Block([ln, fc1, fc2], stack_axis=...)``. A
    rank-3 pair with neither, or with a bias ``(h,)`` (1-D convolutions), is no
    feed-forward block.
  * ``'llama'``: today's decoder layers (docs/math.md, gated feed-forward blocks
    and attention), read by name: LLaMA-family (Hugging Face
    ``mlp/{gate,up,down}_proj`` and ``self_attn/{q,k,v,o}_proj``; Meta's
    ``feed_forward/{w1,w3,w2}`` and ``attention/{wq,wk,wv,wo}``), T5 v1.1, t5x
    and MaxText (``mlp/{wi_0,wi_1,wo}``, ``attention/{query,key,value,out}``)
    and Flax's ``MultiHeadDotProductAttention`` (``query``, ``key``, ``value``,
    ``out``). Per feed-forward sub-tree holding a gate, an up and a down
    projection, ``Block([up, down])`` (the gate's activation multiplies each
    hidden unit by a factor the chain does not change, so the gate stays out,
    with the fallback); per attention sub-tree, ``Block([value, out])``, its
    nodes the value dimensions of every head, multi-axis kernels declared as
    :class:`gsgd_jax.Layer` (``(d, heads, head_dim)`` with ``input_axes=1``,
    ``(heads, head_dim, d)`` with ``input_axes=2``). Scanned layers (axis 0 or
    1) give ``stack_axis``; where an attention's shapes read both as stacked
    dense and as multi-axis kernels, its layer's feed-forward block decides.
    Norms stay out (the norm in front feeds the gate, or the queries and
    keys, too). Sub-trees whose kernels bear none of these names are left
    alone, so in a pre-LN transformer with ReLU feed-forward blocks and Flax
    attention, ``infer_blocks(params, 'preln') + infer_blocks(params,
    'llama')`` declares both (tested on lm1b's layout). Queries and keys join
    only when ``query_key`` says how the model embeds positions, which names
    cannot tell: ``'plain'`` (no rotary
    embedding: T5's relative position biases, learned positions) gives
    ``Block([Layer(query), Layer(key, transposed=True)])`` per attention,
    ``'half'`` or ``'interleaved'`` the same with RoPE's pairs (Hugging Face's
    ``rotate_half``, or Meta's and GPT-J's adjacent pairs), ``head_dim`` saying
    the size of a head where a kernel keeps all heads on one axis
    (``(d, heads * head_dim)``). Grouped-query attention (fewer key-value heads
    than query heads: an output kernel taking a multiple of the value's
    dimensions) gets ``kv_heads`` on the output and query kernels; with
    kernels ``(d, kv_heads * head_dim)``, only ``head_dim`` tells how the
    heads fall, and is then needed. Refused, named: a fused
    query-key-value or gate-and-up kernel, a feed-forward sub-tree without a gate
    (a ReLU block: ``'preln'``), and kernels beside a block with no role in it.

  Nothing is guessed. Blocks declared ``normalized=True`` end where a BatchNorm
  follows, and only a BatchNorm absorbs one channel's scale: a norm's kind is
  read from its batch statistics (``batch_stats``, or the ``mean`` and ``var``
  an NNX state holds beside ``scale``) or else from its name (``BatchNorm_0``,
  ``bn1``, ``gn1``, ``LayerNorm_0``, ...). GroupNorm, LayerNorm and RMSNorm in
  the convolutional layouts are refused (the message says what can be declared,
  with weight-standardized convolutions too), and so are norms whose kind
  neither tells (``norm_proj``). A gated feed-forward block (a gate, an up and a
  down projection), a kernel left beside a feed-forward pair with one of its
  shapes, and widths that contradict the layout (a pre-activation block read as
  ``'resnet'``, or the reverse) are refused, named. Where every residual block
  keeps its width, the widths cannot tell a pre- from a post-activation ResNet:
  the layout named decides, and :func:`gsgd_jax.verify_invariance` catches the
  wrong one.

  Every declaration written is checked against ``params`` as the
  transformations check it at init. Run :func:`gsgd_jax.verify_invariance` on
  it once too: names cannot show a residual addition or an activation that is
  not ReLU.

  Args:
    params: the model's parameters, ``variables['params']`` (dict,
      ``FrozenDict`` or ``nnx.State``; shapes are enough, as
      ``jax.eval_shape(model.init, ...)`` gives), or for NNX the whole
      ``nnx.state(model)``, whose BatchNorms hold their statistics.
    layout: ``'plainnet'``, ``'resnet'``, ``'preact'``, ``'preln'`` or ``'llama'``.
    batch_stats: Linen's ``variables['batch_stats']``: the norms with statistics
      there are BatchNorms, the others are not. Optional; without it, names
      tell.
    query_key: ``'llama'`` only: ``None`` (default: queries and keys take the
      fallback), ``'plain'``, ``'half'`` or ``'interleaved'`` (see above).
    head_dim: ``'llama'`` with RoPE pairs or grouped-query attention on kernels
      ``(d, heads * head_dim)``: the size of one head.

  Returns:
    A list of :class:`gsgd_jax.Block`, to pass as ``layers=``; like every
    ``Block``, they hold their paths as strings (an NNX list index ``0`` as
    ``'0'``), which name the same layers.

  Raises:
    ValueError: for an unknown layout; and, naming the layers found, when the
      tree does not fit the layout: names that do not order the layers,
      convolutions and norms that do not pair, shapes that do not chain, norms
      that are not BatchNorms or of unknown kind in a convolutional layout,
      several candidate norms in front of a feed-forward block, a gated or
      ambiguous feed-forward block, or a declaration the params refuse. Then
      declare ``layers`` explicitly with :class:`gsgd_jax.Block`.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for c in (4, 8):
    ...       x = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(c, (3, 3))(x)))
    ...     return nn.Dense(2)(x.mean(axis=(1, 2)))
    >>> variables = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> for block in gsgd_jax.infer_blocks(variables['params'], 'plainnet'):
    ...   print(block)
    Block(['Conv_0'], normalized=True)
    Block(['BatchNorm_0', 'Conv_1'], normalized=True)
    Block(['BatchNorm_1', 'Dense_0'])

    GroupNorms in their place are refused (they mix channels):

    >>> class GroupNet(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     for c in (4, 8):
    ...       x = nn.relu(nn.GroupNorm(2)(nn.Conv(c, (3, 3))(x)))
    ...     return nn.Dense(2)(x.mean(axis=(1, 2)))
    >>> images = jnp.ones((1, 8, 8, 3))
    >>> variables = jax.eval_shape(GroupNet().init, jax.random.key(0), images)
    >>> gsgd_jax.infer_blocks(variables['params'], 'plainnet')
    Traceback (most recent call last):
    ...
    ValueError: infer_blocks('plainnet') cannot write the blocks: ...

    A pre-LN feed-forward block, its norm found by name among two:

    >>> class FeedForward(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = x + nn.LayerNorm(name='attn_norm')(x)  # the attention, left out here
    ...     y = nn.relu(nn.Dense(16, name='fc1')(nn.LayerNorm(name='ffn_norm')(x)))
    ...     return x + nn.Dense(4, name='fc2')(y)
    >>> tokens = jnp.ones((1, 3, 4))
    >>> params = jax.eval_shape(FeedForward().init, jax.random.key(0), tokens)
    >>> gsgd_jax.infer_blocks(params['params'], 'preln')
    [Block(['ffn_norm', 'fc1', 'fc2'])]

    Three copies of it scanned, their parameters stacked on axis 0: one
    stacked block.

    >>> class Layer(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return FeedForward()(x), None
    >>> scanned = dict(variable_axes={'params': 0}, split_rngs={'params': True})
    >>> Stack = nn.scan(Layer, length=3, **scanned)
    >>> params = jax.eval_shape(Stack().init, jax.random.key(0), tokens, None)
    >>> [block] = gsgd_jax.infer_blocks(params['params'], 'preln')
    >>> layers = ['FeedForward_0/ffn_norm', 'FeedForward_0/fc1', 'FeedForward_0/fc2']
    >>> block == gsgd_jax.Block(layers, stack_axis=0)
    True
  """
  if not isinstance(layout, str) or layout not in _WRITERS:
    raise ValueError(
      f"infer_blocks: unknown layout {layout!r}; accepted layouts: "
      f"{', '.join(map(repr, LAYOUTS))}. Declare other models' `layers` explicitly with "
      "gsgd_jax.Block"
    )
  layers = found_layers.collect(params, batch_stats)
  advice = (
    f"Layers found (kernels and norms): {found_layers.listing(layers)}. Declare `layers` "
    "explicitly with gsgd_jax.Block([...], normalized=...) (docs/math.md, normalization "
    "layers)."
  )
  if layout != "llama" and (query_key is not None or head_dim is not None):
    raise ValueError("infer_blocks: query_key and head_dim apply to the layout 'llama' only")
  if head_dim is not None and (
    isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1
  ):
    raise TypeError(f"infer_blocks: head_dim must be None or a positive integer, got {head_dim!r}")
  if query_key not in (None, *layout_gated.QUERY_KEYS):
    raise ValueError(
      f"infer_blocks: query_key must be None, 'plain', 'half' or 'interleaved', got {query_key!r}"
    )
  try:
    if layout == "llama":
      blocks = layout_gated.gated(layers, query_key, head_dim)
    else:
      blocks = _WRITERS[layout](layers)
  except found_layers.Refusal as err:
    raise ValueError(f"infer_blocks({layout!r}) cannot write the blocks: {err}. {advice}") from None
  try:
    structure.build_structure(params, blocks)
  except ValueError as err:
    raise ValueError(
      f"infer_blocks({layout!r}) wrote blocks that the params refuse, {blocks}: {err} {advice}"
    ) from None
  return blocks
