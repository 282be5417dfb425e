"""Reading the ``layers`` argument: one chain of layer paths, or several blocks.

Accepted forms (shown in every error about them):

  * one chain: a sequence of paths, e.g. ``['fc1', 'fc2']`` or
    ``[('params', 'Dense_0'), ('params', 'Dense_1')]``;
  * several blocks: a sequence of sequences of paths, e.g.
    ``[[('p', 'a1'), ('p', 'b1')], [('p', 'a2'), ('p', 'b2')]]`` (blocks may be
    lists or tuples of paths, or :class:`Block` declarations, mixed freely);
  * one :class:`Block`;
  * a path: a ``'a/b/c'`` string, or a tuple of keys (strings, integers or JAX
    key entries); inside a block, a list of keys is a path too;
  * a :class:`Layer` wherever a path may stand: a path with the reading of a
    multi-axis kernel (Flax ``DenseGeneral``).

``layers`` is read once, when a transformation is built: a generator is consumed
then, and changing the list afterwards changes nothing. A list of plain keys at
the top level (``[['fc1', 'fc2'], ['fc3', 'fc4']]``) reads as a block of paths
or as one path written as a list; the params tree decides, and a declaration
that the tree cannot decide is refused.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

from gsgd_jax._src import pytree
from gsgd_jax._src.pytree import KeyPath, Path
from gsgd_jax._src.reading import PAIRINGS, Reading

LayerPath: TypeAlias = KeyPath | str


FORMS = (
  "one chain: a sequence of paths, e.g. ['fc1', 'fc2'] or [('params', 'Dense_0'), "
  "('params', 'Dense_1')]; several blocks: a sequence of lists of paths, e.g. "
  "[[('p', 'a1'), ('p', 'b1')], [('p', 'a2'), ('p', 'b2')]], each block a list of paths or a "
  "gsgd_jax.Block([...], normalized=..., stack_axis=...); a path: an 'a/b' string or a "
  "tuple of keys, or gsgd_jax.Layer(path, input_axes=...) for a multi-axis kernel"
)


def _is_key(entry: Any) -> bool:
  return not isinstance(entry, (list, tuple, dict, set, Layer))


def _path(entry: Any) -> Path:
  """A path written as an ``'a/b'`` string or a sequence of keys, normalised."""
  if isinstance(entry, str):
    parts = tuple(p for p in entry.split("/") if p)
  elif isinstance(entry, (tuple, list)) and all(_is_key(k) for k in entry):
    parts = tuple(pytree.key_name(k) for k in entry)
  else:
    raise TypeError(
      f"a layer path must be a tuple of keys or an 'a/b' string, got "
      f"{pytree.short_repr(entry)}. Accepted forms of `layers`: {FORMS}"
    )
  if not parts:
    raise ValueError("a layer path must not be empty")
  return parts


def _is_path(entry: Any) -> bool:
  return isinstance(entry, (str, Layer)) or (isinstance(entry, tuple) and all(map(_is_key, entry)))


@dataclasses.dataclass(frozen=True, init=False)
class Layer:
  """A layer path with the reading of its multi-axis kernel (Flax ``DenseGeneral``).

  A kernel of rank 3 or more is a stacked dense layer, a convolution or a
  ``DenseGeneral`` with several input or output axes, and the shape alone cannot
  tell which. ``Layer`` says it is the last: its first ``input_axes`` axes index
  the layer's inputs and the remaining axes (its features) its outputs, so that a
  node is one entry of the input (or output) axes taken together. Flax's
  ``MultiHeadDotProductAttention`` keeps ``value`` as ``(d, heads, head_dim)``
  (``input_axes=1``; its bias ``(heads, head_dim)`` is per output node) and
  ``out`` as ``(heads, head_dim, d)`` (``input_axes=2``); their nodes between
  them are the ``(head, head_dim)`` pairs. In a stacked block the axes are
  counted in one copy, without the stack axis.

  Queries and keys form the chain ``[W_q, W_k^T]`` (docs/math.md): the key kernel
  is read ``transposed``, from its features to its inputs. With rotary position
  embeddings, the two dimensions of each pair a rotation mixes share one factor:
  ``pairs`` says how the head dimension (the kernel's last axis) pairs them, on
  both kernels.

  Grouped-query attention (LLaMA 2 70B and 3, Mistral, Qwen, Gemma) shares each of
  ``kv_heads`` key-value heads among consecutive query heads: rescaling a value
  dimension must be undone on that dimension of every query head of its group, and
  a key dimension likewise. ``kv_heads`` on the query kernel (the first layer of
  ``[query, key]``) and on the output kernel (the last of ``[value, out]``) groups
  their query heads; the value and key kernels keep their ``kv_heads`` heads as
  they are.

  Args:
    path: the layer's key path (an ``'a/b'`` string or a tuple of keys).
    input_axes: how many leading axes of the kernel index its inputs (Flax
      ``DenseGeneral``'s ``len(axis)``); at least 1, and fewer than the kernel's
      rank.
    transposed: read the kernel from its features to its leading axes (a key
      kernel in a query-key chain). A bias of such a layer would sit on its
      inputs; it is refused (a key's bias changes no attention weight: softmax
      ignores what is constant over the keys).
    pairs: ``None`` (default), or RoPE's pairing of the last axis: ``'half'``
      (``j`` with ``j + head_dim / 2``, Hugging Face's ``rotate_half``) or
      ``'interleaved'`` (``2p`` with ``2p + 1``, Meta's and GPT-J's).
    head_dim: with ``pairs`` or ``kv_heads``, the size of one head where one axis
      holds all heads (Hugging Face's ``(d, heads * head_dim)`` and ``(heads *
      head_dim, d)`` kernels); ``None`` (default): the heads' last axis is one
      head's dimensions.
    kv_heads: ``None`` (default), or the number of key-value heads of grouped-query
      attention, on a query or output kernel (see above); the query heads must be a
      multiple of it (1: multi-query attention). The side grouped is the one facing
      the chain's other layer.

  Example:
    >>> import gsgd_jax
    >>> value = gsgd_jax.Layer('params/attn/value', input_axes=1)
    >>> value
    Layer('params/attn/value', input_axes=1)
    >>> out = gsgd_jax.Layer('params/attn/out', input_axes=2)
    >>> block = gsgd_jax.Block([value, out])  # a chain through the value dimensions
    >>> block.layers[1], block.readings[1].input_axes
    (('params', 'attn', 'out'), 2)
    >>> gsgd_jax.Layer('attn/key', input_axes=1, transposed=True, pairs='half')
    Layer('attn/key', input_axes=1, transposed=True, pairs='half')
    >>> gsgd_jax.Layer('self_attn/o_proj', input_axes=1, head_dim=64, kv_heads=2)
    Layer('self_attn/o_proj', input_axes=1, head_dim=64, kv_heads=2)
  """

  path: Path
  input_axes: int
  transposed: bool
  pairs: str | None
  head_dim: int | None
  kv_heads: int | None

  def __init__(
    self,
    path: KeyPath | str,
    *,
    input_axes: int,
    transposed: bool = False,
    pairs: str | None = None,
    head_dim: int | None = None,
    kv_heads: int | None = None,
  ):
    if isinstance(input_axes, bool) or not isinstance(input_axes, int) or input_axes < 1:
      raise TypeError(
        "gsgd_jax.Layer: `input_axes` must be an integer >= 1 (the number of leading kernel "
        f"axes that index the layer's inputs), got {pytree.short_repr(input_axes)}"
      )
    if not isinstance(transposed, bool):
      raise TypeError(
        f"gsgd_jax.Layer: `transposed` must be True or False, got {pytree.short_repr(transposed)}"
      )
    if pairs is not None and pairs not in PAIRINGS:
      raise ValueError(
        f"gsgd_jax.Layer: `pairs` must be None, 'half' or 'interleaved', got "
        f"{pytree.short_repr(pairs)}"
      )
    object.__setattr__(self, "path", _path(path))
    object.__setattr__(self, "input_axes", input_axes)
    object.__setattr__(self, "transposed", transposed)
    if head_dim is not None and (
      isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2
    ):
      raise TypeError(
        f"gsgd_jax.Layer: `head_dim` must be None or an integer >= 2, got "
        f"{pytree.short_repr(head_dim)}"
      )
    if kv_heads is not None and (
      isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1
    ):
      raise TypeError(
        f"gsgd_jax.Layer: `kv_heads` must be None or an integer >= 1, got "
        f"{pytree.short_repr(kv_heads)}"
      )
    if head_dim is not None and pairs is None and kv_heads is None:
      raise ValueError(
        f"gsgd_jax.Layer: head_dim={head_dim} is given without pairs or kv_heads; head_dim "
        "says how RoPE's pairs and grouped-query attention's groups fall into heads"
      )
    object.__setattr__(self, "pairs", pairs)
    object.__setattr__(self, "head_dim", head_dim)
    object.__setattr__(self, "kv_heads", kv_heads)

  @property
  def reading(self) -> Reading:
    return Reading(self.input_axes, self.transposed, self.pairs, self.head_dim, self.kv_heads)

  def __repr__(self) -> str:
    extra = (
      (", transposed=True" if self.transposed else "")
      + ("" if self.pairs is None else f", pairs={self.pairs!r}")
      + ("" if self.head_dim is None else f", head_dim={self.head_dim}")
      + ("" if self.kv_heads is None else f", kv_heads={self.kv_heads}")
    )
    return f"Layer({'/'.join(self.path)!r}, input_axes={self.input_axes}{extra})"


def _entry(entry: Any) -> tuple[Path, Reading | None]:
  """A block's entry as its path and, for a :class:`Layer`, its kernel's reading."""
  if isinstance(entry, Layer):
    return entry.path, entry.reading
  return _path(entry), None


def _block(entry: Any) -> tuple[tuple[Path, Reading | None], ...]:
  if not isinstance(entry, (list, tuple)):
    raise TypeError(
      f"a block of `layers` must be a list of paths, got {pytree.short_repr(entry)}. "
      f"Accepted forms of `layers`: {FORMS}"
    )
  if not entry:
    raise ValueError("a block of `layers` is empty: declare at least one layer per block")
  return tuple(_entry(p) for p in entry)


@dataclasses.dataclass(frozen=True, init=False)
class Block:
  """One block of a model, declared explicitly: an independent chain of layers.

  Each layer is a key path to a sub-tree holding a ``kernel`` (dense or
  convolution, or a multi-axis kernel declared as a :class:`Layer`; optional
  ``bias``) or, first in the block only, a norm's
  per-channel ``scale`` and optional ``bias`` (an *affine layer*: Flax
  ``BatchNorm``, ``LayerNorm``; docs/math.md). Between the block's layers only
  positively homogeneous operations may stand (ReLU, pooling, flatten, and the
  identity after an affine layer).

  Args:
    layers: the layers' key paths in forward order (``'a/b'`` strings or tuples
      of keys), or :class:`Layer` declarations of multi-axis kernels.
    normalized: the block's outputs feed a per-channel normalization
      (BatchNorm, in training mode): each output node may then be rescaled on
      its own, and the path gradients of the paths ending at output node ``k``
      are multiplied by ``N_k^2``, the sum of their squared values, so that the
      step is equivariant under that rescaling too. A one-layer normalized
      block (a stem convolution, a residual branch's first convolution, a
      projection shortcut before a BatchNorm) scales its gradients per output
      column by the column's squared norm.
    stack_axis: the block is stacked (Flax ``nn.scan`` or ``nnx.vmap`` over
      layers): every kernel, scale, bias and scale probe of its layers holds
      ``S`` copies on this axis, as ``nn.scan``'s ``variable_axes`` puts them
      (0: kernels ``(S, in, out)``, biases ``(S, out)``; 1: kernels ``(in, S,
      out)``, biases ``(out, S)``). The block is then ``S`` independent chains,
      each updated as if declared on its own, in one vectorised update.
      ``None`` (default): not stacked.

  Example:
    >>> import gsgd_jax
    >>> block = gsgd_jax.Block(['params/bn_a', 'params/conv_b'], normalized=True)
    >>> block
    Block(['params/bn_a', 'params/conv_b'], normalized=True)
    >>> block.layers
    (('params', 'bn_a'), ('params', 'conv_b'))
    >>> gsgd_jax.Block(['params/layers/fc1', 'params/layers/fc2'], stack_axis=0)
    Block(['params/layers/fc1', 'params/layers/fc2'], stack_axis=0)
  """

  layers: tuple[Path, ...]
  normalized: bool
  stack_axis: int | None
  # Per layer: a Layer's reading of its multi-axis kernel, else None.
  readings: tuple[Reading | None, ...]

  def __init__(
    self,
    layers: Iterable[LayerPath | Layer],
    *,
    normalized: bool = False,
    stack_axis: int | None = None,
  ):
    if isinstance(layers, (str, Block)) or not isinstance(layers, Iterable):
      raise TypeError(
        f"gsgd_jax.Block takes a list of layer paths, got {pytree.short_repr(layers)}. Accepted "
        f"forms of `layers`: {FORMS}"
      )
    if not isinstance(normalized, bool):
      raise TypeError(
        f"gsgd_jax.Block: `normalized` must be True or False, got {pytree.short_repr(normalized)}"
      )
    if stack_axis is not None and (
      isinstance(stack_axis, bool) or not isinstance(stack_axis, int) or stack_axis < 0
    ):
      raise TypeError(
        "gsgd_jax.Block: `stack_axis` must be None or an axis >= 0, got "
        f"{pytree.short_repr(stack_axis)}"
      )
    entries = _block(list(layers))
    object.__setattr__(self, "layers", tuple(path for path, _ in entries))
    object.__setattr__(self, "readings", tuple(reading for _, reading in entries))
    object.__setattr__(self, "normalized", normalized)
    object.__setattr__(self, "stack_axis", stack_axis)

  def __repr__(self) -> str:
    names = ", ".join(
      repr("/".join(p)) if r is None else repr(_layer_of(p, r))
      for p, r in zip(self.layers, self.readings, strict=True)
    )
    normalized = ", normalized=True" if self.normalized else ""
    stacked = "" if self.stack_axis is None else f", stack_axis={self.stack_axis}"
    return f"Block([{names}]{normalized}{stacked})"


Blocks = tuple[Block, ...]


def _as_block(entry: Any) -> Block:
  return entry if isinstance(entry, Block) else Block(entry)


@dataclasses.dataclass(frozen=True)
class Declaration:
  """``layers`` as read once: its possible readings as blocks of paths.

  Attributes:
    readings: one reading, or two when lists of plain keys at the top level may
      be blocks of paths or paths written as lists (see :meth:`resolve`).
    text: the declaration as the user wrote it, for messages.
  """

  readings: tuple[Blocks, ...]
  text: str

  def resolve(self, leaf_paths: set[Path], masked: set[Path]) -> Blocks:
    """The blocks this declaration names in a tree with these leaf paths.

    Of two readings, the one whose every path leads to a ``kernel`` is taken;
    when both do, the declaration is ambiguous and refused. Raises, naming the
    layer, when a declared layer's kernel or bias is an ``optax.MaskedNode``.
    """
    resolves = lambda blocks: all(
      (*p, "kernel") in leaf_paths or (*p, "scale") in leaf_paths for b in blocks for p in b.layers
    )
    fitting = [blocks for blocks in self.readings if resolves(blocks)]
    if len(fitting) > 1:
      raise ValueError(
        f"`layers` = {self.text} reads two ways in these params: as blocks "
        f"{_show(fitting[0])} or as one chain {_show(fitting[1])}. Write it in one of "
        f"the accepted forms: {FORMS}."
      )
    blocks = fitting[0] if fitting else self.readings[0]
    twice = _twice(blocks)
    if twice is not None:
      raise ValueError(f"layer {'/'.join(twice)!r} is declared twice in `layers`")
    for block in blocks:
      for path in block.layers:
        name = "/".join(path)
        if (*path, "kernel") in masked or (*path, "scale") in masked:
          raise ValueError(
            f"layer {name!r} is masked out (optax.masked or optax.partition hands it "
            "to another transformation) but declared in `layers`: declare only the "
            "layers this transformation receives."
          )
        if (*path, "bias") in masked:
          raise ValueError(
            f"layer {name!r}: its bias is masked out (optax.masked or "
            "optax.partition hands it to another transformation) but its kernel is "
            "not. Weight allocation rescales a node's incoming weights and bias "
            "together, so a declared layer's kernel and bias must go to the same "
            "transformation; build the mask or labels with gsgd_jax.block_labels."
          )
    return blocks


def warn_one_layer_blocks(blocks: Blocks) -> None:
  """Warns for each block of one layer that is not normalized: it has no hidden
  nodes, so no symmetry to use."""
  for block in blocks:
    if len(block.layers) == 1 and not block.normalized:
      warnings.warn(
        f"a block of `layers` has one layer, {'/'.join(block.layers[0])!r}: it has no "
        "hidden nodes, so path space gives it the inner transformation on its "
        "weights as they are. To declare one chain, list its paths in one flat "
        f"sequence. Accepted forms: {FORMS}",
        stacklevel=4,
      )


# What the public functions take as ``layers``: one chain of paths or several blocks.
LayerPaths: TypeAlias = (
  Sequence[LayerPath | Layer] | Sequence[Sequence[LayerPath | Layer] | Block] | Block | Declaration
)


def _show(blocks: Blocks) -> str:
  return repr([["/".join(p) for p in block.layers] for block in blocks])


def _layer_of(path: Path, reading: Reading) -> Layer:
  """The ``Layer`` declaring ``path`` read so (what its chain sets, left out)."""
  r = reading
  return Layer(
    path,
    input_axes=r.input_axes,
    transposed=r.transposed,
    pairs=r.pairs,
    head_dim=r.head_dim,
    kv_heads=r.kv_heads,
  )


def as_declaration(layers: Any) -> Declaration:
  """Reads ``layers`` once (see the module docstring); a Declaration passes through."""
  if isinstance(layers, Declaration):
    return layers
  if isinstance(layers, Block):
    return Declaration(((layers,),), pytree.short_repr(layers))
  if isinstance(layers, str) or not isinstance(layers, Iterable) or isinstance(layers, dict):
    what = "the string " if isinstance(layers, str) else ""
    raise TypeError(
      f"`layers` must be a sequence of layer paths or of blocks, got "
      f"{what}{pytree.short_repr(layers)}. Accepted forms: {FORMS}"
    )
  entries = list(layers)
  text = pytree.short_repr(entries)
  if not entries:
    raise ValueError("`layers` is empty: declare at least one layer")
  # A list of plain keys is a path or a block of paths: the tree decides. (A tuple of
  # keys is always a path.)
  key_lists = [isinstance(e, list) and bool(e) and all(map(_is_key, e)) for e in entries]
  readings: list[Blocks] = []
  if all(_is_path(e) or is_keys for e, is_keys in zip(entries, key_lists, strict=True)):
    chain = (Block([e if isinstance(e, Layer) else _path(e) for e in entries]),)
    if not any(key_lists):
      readings.append(chain)
    elif all(key_lists):  # blocks of paths, or one chain of paths written as lists
      readings.append(tuple(_as_block(e) for e in entries))
      readings.append(chain)
    else:  # paths beside paths written as lists: one chain
      readings.append(chain)
  elif all(
    isinstance(e, Block) or (isinstance(e, (list, tuple)) and not _is_path(e)) or is_keys
    for e, is_keys in zip(entries, key_lists, strict=True)
  ):
    readings.append(tuple(_as_block(e) for e in entries))
  else:
    raise TypeError(f"`layers` mixes paths and blocks: {text}. Accepted forms: {FORMS}")
  return Declaration(tuple(readings), text)


def _twice(blocks: Blocks) -> Path | None:
  """The first path declared twice in ``blocks``, if any."""
  seen: set[Path] = set()
  for block in blocks:
    for path in block.layers:
      if path in seen:
        return path
      seen.add(path)
  return None
