"""How a multi-axis kernel is read as a layer (``gsgd_jax.Layer``): which of its axes hold
the layer's inputs and which its outputs, and how their entries map to nodes.

A Flax ``DenseGeneral`` kernel is ``(*inputs, *features)``. Read forwards, its leading
``input_axes`` axes are the layer's inputs and its features its outputs (an attention's
values ``(d, heads, head_dim)``, its outputs ``(heads, head_dim, d)``). Read transposed, the
features are the layer's inputs and the leading axes its outputs: the key kernel in the chain
``[W_q, W_k^T]`` of queries and keys (docs/math.md). A side's entries (its axes taken
together, numbered in row-major order) are its nodes, except on a side whose last axis holds
rotary position embedding's pairs (``pairs``): a pair of dimensions of a head is then one node
whose two entries are two parallel edges (taps), as a convolution's taps are, the second the
skeleton's (as a window of 2's centre is). Grouped-query attention (``kv_heads``) shares
each key-value head among several query heads: on the side of the query heads (a query
kernel's outputs, an output kernel's inputs), the same dimension of the heads of one group
is one node, each head's entry one of its parallel edges.

Everything here is static: NumPy tables built from shapes, never from values.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

PAIRINGS = ("half", "interleaved")
"""RoPE's pairs of each head's dimensions: ``'half'`` pairs ``j`` with ``j + head_dim / 2``
(Hugging Face's ``rotate_half``), ``'interleaved'`` pairs ``2p`` with ``2p + 1`` (Meta's and
GPT-J's)."""


@dataclasses.dataclass(frozen=True)
class Reading:
  """A declared reading of a multi-axis kernel (see the module docstring).

  Attributes:
    input_axes: how many leading axes are the kernel's own inputs (Flax's ``len(axis)``).
    transposed: the layer runs from the kernel's features to its leading axes.
    pairs: ``None``, or how the last feature axis pairs RoPE's dimensions (``PAIRINGS``).
    head_dim: the size of one head on that axis, where it holds several heads (Hugging
      Face's ``(d, heads * head_dim)``); ``None``: the whole axis.
    kv_heads: ``None``, or the key-value heads the query heads of ``grouped`` share.
    grouped: the side of the query heads, ``'inputs'`` or ``'outputs'`` (set from the
      layer's place in its chain, see ``structure``); ``None`` without ``kv_heads``.
  """

  input_axes: int
  transposed: bool = False
  pairs: str | None = None
  head_dim: int | None = None
  kv_heads: int | None = None
  grouped: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Side:
  """One side (inputs or outputs) of a kernel read as a layer.

  Attributes:
    axes: the kernel axes of this side, in order.
    shape: their sizes.
    node: per entry of the side (row-major over ``axes``), its node.
    tap: per entry, which of its node's parallel edges it is.
    nodes: the number of nodes; ``taps`` the parallel edges per node.
    centre: per node, the entry of its skeleton tap.
    pairs: the side's RoPE pairing, and ``head`` the size of one head on its last axis
      (None without pairs or groups).
    groups: the query heads that share one node (grouped-query attention), else 1.
  """

  axes: tuple[int, ...]
  shape: tuple[int, ...]
  node: np.ndarray
  tap: np.ndarray
  nodes: int
  taps: int
  centre: np.ndarray
  pairs: str | None = None
  head: int | None = None
  groups: int = 1

  @property
  def entries(self) -> int:
    return int(np.prod(self.shape))

  @property
  def plain(self) -> bool:
    """Each entry is a node of its own (no pairs)."""
    return self.taps == 1


def side(
  axes: tuple[int, ...],
  shape: tuple[int, ...],
  pairs: str | None,
  head_dim: int | None = None,
  groups: int = 1,
) -> Side:
  """The node and tap of every entry of a side (pairs on its last axis, if any, in heads of
  ``head_dim``; ``groups`` consecutive heads sharing nodes)."""
  entries = int(np.prod(shape))
  index = np.arange(entries)
  last = None
  if pairs is None and groups == 1:
    node, tap, taps = index, np.zeros(entries, np.int64), 1
  else:
    last = shape[-1] if head_dim is None else head_dim
    head, position = index // last, index % last
    if pairs is None:
      pair, pair_tap, pair_taps, per_head = position, np.zeros(entries, np.int64), 1, last
    elif pairs == "half":
      half = last // 2
      pair, pair_tap, pair_taps, per_head = position % half, position // half, 2, half
    else:
      pair, pair_tap, pair_taps, per_head = position // 2, position % 2, 2, last // 2
    node = head // groups * per_head + pair
    tap = head % groups * pair_taps + pair_tap
    taps = groups * pair_taps
  nodes = entries // taps
  centre = np.zeros(nodes, np.int64)
  skeleton = tap == taps // 2
  centre[node[skeleton]] = index[skeleton]
  for table in (node, tap, centre):
    table.setflags(write=False)
  return Side(axes, shape, node, tap, nodes, taps, centre, pairs, last, groups)


@functools.lru_cache(maxsize=512)
def sides(kernel_shape: tuple[int, ...], reading: Reading) -> tuple[Side, Side]:
  """The input and output sides of a kernel of this shape (one copy) read so."""
  rank = len(kernel_shape)
  leading = tuple(range(reading.input_axes))
  features = tuple(range(reading.input_axes, rank))
  inputs, outputs = (features, leading) if reading.transposed else (leading, features)
  shape = lambda axes: tuple(kernel_shape[a] for a in axes)
  pairs_in = reading.pairs if reading.transposed else None
  pairs_out = None if reading.transposed else reading.pairs
  groups = lambda axes, name: _groups(shape(axes), reading) if reading.grouped == name else 1
  return (
    side(inputs, shape(inputs), pairs_in, reading.head_dim, groups(inputs, "inputs")),
    side(outputs, shape(outputs), pairs_out, reading.head_dim, groups(outputs, "outputs")),
  )


def _groups(shape: tuple[int, ...], reading: Reading) -> int:
  """The query heads per key-value head on a side of this shape holding the query heads."""
  if reading.kv_heads is None:
    return 1
  head = shape[-1] if reading.head_dim is None else reading.head_dim
  return int(np.prod(shape)) // head // reading.kv_heads


def check(name: str, kernel_shape: tuple[int, ...], reading: Reading) -> str | None:
  """Why a kernel of this shape cannot be read so (None when it can)."""
  if min(kernel_shape, default=0) < 1:
    return f"layer {name!r}: its kernel of shape {kernel_shape} has an empty axis"
  if reading.input_axes >= len(kernel_shape):
    return (
      f"layer {name!r}: declared gsgd_jax.Layer(..., input_axes={reading.input_axes}), but "
      f"its kernel of shape {kernel_shape} then has no output axis; input_axes counts the "
      "leading axes that index the inputs (1 for a DenseGeneral with features=(heads, "
      "head_dim), 2 for one with axis=(-2, -1)), in one copy of a stacked block."
    )
  head = kernel_shape[-1] if reading.head_dim is None else reading.head_dim
  if reading.pairs is not None and (head % 2 or kernel_shape[-1] % head):
    return (
      f"layer {name!r}: declared pairs={reading.pairs!r}, but its last axis ({kernel_shape[-1]}) "
      f"is not made of heads of an even head_dim ({head}): rotary position embeddings pair "
      "each head's dimensions. For a kernel (d, heads * head_dim), pass head_dim."
    )
  why = _check_groups(name, kernel_shape, reading)
  if why is not None:
    return why
  features = len(kernel_shape) - reading.input_axes
  if reading.pairs is not None and reading.head_dim is None and features == 1:
    return (
      f"layer {name!r}: declared pairs={reading.pairs!r} on a kernel {kernel_shape} whose "
      "features are one axis, which usually holds every head (Hugging Face's (d, heads * "
      "head_dim)): pass head_dim, the size of one head (the axis's own size for one head)."
    )
  return None


def _check_groups(name: str, kernel_shape: tuple[int, ...], reading: Reading) -> str | None:
  """Why the query heads of a kernel cannot be grouped so (None when they can)."""
  kv_heads = reading.kv_heads
  if kv_heads is None:
    return None
  leading = kernel_shape[: reading.input_axes]
  features = kernel_shape[reading.input_axes :]
  on_features = (reading.grouped == "outputs") != reading.transposed
  grouped = features if on_features else leading
  if reading.pairs is not None and not on_features:
    return (
      f"layer {name!r}: declared kv_heads={reading.kv_heads} and pairs={reading.pairs!r}, "
      "but its query heads face the chain's other layer on its leading axes, and RoPE's "
      "pairs are on its last: group the query heads of a query kernel (the first layer of "
      "[query, key]) and of an output kernel (the last of [value, out])."
    )
  head = grouped[-1] if reading.head_dim is None else reading.head_dim
  entries = int(np.prod(grouped))
  if len(grouped) == 1 and reading.head_dim is None:
    return (
      f"layer {name!r}: declared kv_heads={reading.kv_heads} on a kernel {kernel_shape} "
      f"whose query heads are one axis of {entries}, which holds every head (Hugging "
      "Face's heads * head_dim): pass head_dim, the size of one head."
    )
  if grouped[-1] % head or (entries // head) % kv_heads:
    return (
      f"layer {name!r}: declared kv_heads={reading.kv_heads} (head_dim {head}), but the "
      f"axes {grouped} of its kernel {kernel_shape} that face the chain's other layer do "
      f"not hold a multiple of {reading.kv_heads} heads of {head}: grouped-query attention "
      "shares each key-value head among the same number of query heads."
    )
  return None
