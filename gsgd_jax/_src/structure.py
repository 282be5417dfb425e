"""Static structure of a ReLU chain: layer specs, skeleton and per-node index tables.

Everything here is derived from key paths and shapes only (never from values or
pytree order), so it is identical in ``init`` and ``update``.

Conventions (docs/math.md). Layers are numbered ``k = 0..L-1``; layer ``k`` maps
node level ``k`` to level ``k + 1``; level 0 holds the inputs, level ``L`` the
outputs and levels ``1..L-1`` the hidden nodes. ``taps`` parallel edges join each
pair of nodes of adjacent levels and tap ``centre`` is the skeleton one. The
layer kinds (kernels are used in their own shape, see ``basis.py``):

  * dense ``(n_in, n_out)``: one tap;
  * convolution ``(*window, c_in, c_out)`` (2-D, 3-D): channels are nodes, one
    tap per window position, the centre ``(k // 2, ...)`` is the skeleton tap;
  * dense after a flatten of ``(S positions, C channels)`` (NHWC order, row
    ``s * C + c``): recognised when a dense kernel with ``S * C`` rows follows a
    convolution (or an affine layer) with ``C`` output channels; S taps,
    skeleton position ``S // 2``;
  * general: a multi-axis kernel (Flax ``DenseGeneral``, declared with
    ``gsgd_jax.Layer(path, input_axes=..., transposed=..., pairs=...)``): one
    side of its axes indexes the inputs, the other the outputs, and a node is
    one entry of a side's axes taken together (flattened in row-major order, as
    a reshape would), or a RoPE pair of them (``reading.py``);
  * affine ``(C,)``: a norm's per-channel ``scale`` (and ``bias``), the diagonal
    edges ``o -> o``. Only first in a block of at least two layers: the norm
    before it cuts every path, and its outputs are hidden nodes whose incoming
    skeleton edge is their own ``scale`` entry, so the whole layer is in F.

A stacked block (``gsgd_jax.Block(..., stack_axis=A)``: Flax ``nn.scan``,
``nnx.vmap``) holds ``S`` copies of one chain, every leaf of its layers carrying
them on axis ``A``; the structure here describes one copy (``ChainStructure.stack``
says where the copies are) and ``stacking.per_copy`` runs the per-chain code once
per copy. An undeclared rank-3 kernel is refused: a stacked dense layer and a
1-D convolution have that shape and different symmetry groups.

Several independent chains (blocks) may be declared; nothing crosses a block
boundary, so the inputs and outputs of each block are not hidden nodes.

Skeleton, per hidden node:
  * incoming edge of node ``j`` of level ``k + 1``: from node ``pi[k][j] = j mod n_in``;
  * outgoing edge of node ``a`` of level ``k``: to node ``sigma[k][a] = a mod n_out``
    of layer ``k``.
The incoming skeleton edges form the fixed set F that G-SGD never moves.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsgd_jax._src import declaration, pytree
from gsgd_jax._src import reading as readings
from gsgd_jax._src.pytree import PROBE, Path
from gsgd_jax._src.reading import Reading


class UnsupportedLayerError(ValueError):
  """A declared layer is of a kind whose symmetry G-SGD does not model."""


UNDECLARED_STACK = (
  "stack_axis=0 for Flax nn.scan / nnx.vmap stacks, 1 for the (in, stack, out) "
  "layout; gsgd_jax.infer_layers(params) finds Flax stacks"
)


# Per layer (path, kernel or scale shape, has bias, is an affine layer, the reading of a
# multi-axis kernel declared as gsgd_jax.Layer or None).
Signature = tuple[tuple[Path, tuple[int, ...], bool, bool, Reading | None], ...]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of a chain, as seen by the path-space algorithm."""

  path: Path  # normalised key path of the layer's sub-tree
  kind: str  # 'dense', 'conv', 'flatten' (a dense layer after a flatten), 'general' (a
  # multi-axis kernel) or 'affine' (kernel_shape is then the scale's (C,))
  kernel_shape: tuple[int, ...]
  has_bias: bool
  taps: int  # parallel edges per (input node, output node) pair
  centre: int  # index of the skeleton tap in [0, taps)
  n_in: int
  n_out: int
  reading: Reading | None = None  # a general kernel's reading (None for the other kinds)

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def sides(self) -> tuple[readings.Side, readings.Side]:
    """A general kernel's input and output sides (``reading.py``)."""
    if self.reading is None:
      raise ValueError(f"internal: layer {self.name!r} is no general kernel")
    return readings.sides(self.kernel_shape, self.reading)

  def _full(self, axes: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel's shape with a unit axis wherever ``axes`` are not."""
    return tuple(d if a in axes else 1 for a, d in enumerate(self.kernel_shape))

  @property
  def row_shape(self) -> tuple[int, ...]:
    """The shape a per-row vector takes to broadcast against the kernel: the one row
    axis of ``(*window, rows, n_out)``, or a general kernel's input axes."""
    if self.kind == "general":
      return self._full(self.sides[0].axes)
    return (self.kernel_shape[-2], 1)

  @property
  def col_shape(self) -> tuple[int, ...]:
    """The shape a per-output vector takes to broadcast against the kernel."""
    if self.kind == "general":
      return self._full(self.sides[1].axes)
    return (1, self.n_out)

  @property
  def output_shape(self) -> tuple[int, ...]:
    """The output axes of the kernel: the shape of its bias (and scale probe)."""
    return self.sides[1].shape if self.kind == "general" else (self.n_out,)

  @property
  def reduced_axes(self) -> tuple[int, ...]:
    """The kernel axes that a per-output sum runs over (taps and inputs)."""
    if self.kind == "general":
      return self.sides[0].axes
    return tuple(range(len(self.kernel_shape) - 1))

  @property
  def centre_index(self) -> tuple[int, ...]:
    """A convolution's skeleton tap as a position in its window axes (() otherwise)."""
    if self.kind != "conv":
      return ()
    return tuple(int(i) for i in np.unravel_index(self.centre, self.kernel_shape[:-2]))

  @property
  def centre_row(self) -> int:
    """First kernel row of a flatten layer's skeleton tap (0 otherwise)."""
    return self.centre * self.n_in if self.kind == "flatten" else 0


@dataclasses.dataclass(frozen=True, eq=False)
class LevelTables:
  """The chain's index tables padded to one width ``W``, one row per layer.

  Per-node vectors of all ``L + 1`` node levels are held stacked, as an
  ``(L + 1, W)`` array whose row ``k`` starts with level ``k``'s ``widths[k]``
  entries (see ``basis.propagate``). Row ``k`` of a table below belongs to layer
  ``k``; entries past a level's width, and where a table is undefined (the ends
  of the chain), hold index 0 and ``False``.

  Attributes:
    widths: ``n_0, ..., n_L``, the width of every node level.
    down: ``pi[k]``: for each node of level ``k + 1``, its skeleton source.
    up: ``sigma[k]``: for each node of level ``k``, its skeleton target.
    loops_back: ``loops_back[k]``, on level ``k + 1``.
    out_fixed: ``out_fixed[k]``, on level ``k``.
    hidden: on level ``k``: the hidden nodes (levels ``1..L-1``).
  """

  widths: tuple[int, ...]
  down: np.ndarray
  up: np.ndarray
  loops_back: np.ndarray
  out_fixed: np.ndarray
  hidden: np.ndarray

  @property
  def width(self) -> int:
    return self.down.shape[1]


def _level_tables(
  specs: Sequence[LayerSpec],
  pi: Sequence[np.ndarray | None],
  sigma: Sequence[np.ndarray | None],
  out_fixed: Sequence[np.ndarray | None],
  loops_back: Sequence[np.ndarray | None],
) -> LevelTables:
  widths = (specs[0].n_in, *(s.n_out for s in specs))
  depth, width = len(specs), max(widths)
  down, up = np.zeros((depth, width), np.int32), np.zeros((depth, width), np.int32)
  loops, fixed = np.zeros((depth, width), bool), np.zeros((depth, width), bool)
  hidden = np.zeros((depth, width), bool)
  for k, spec in enumerate(specs):
    rows = ((down, pi[k]), (up, sigma[k]), (loops, loops_back[k]), (fixed, out_fixed[k]))
    for table, row in rows:
      if row is not None:
        table[k, : len(row)] = row
    if k >= 1:
      hidden[k, : spec.n_in] = True
  for table in (down, up, loops, fixed, hidden):
    table.setflags(write=False)
  return LevelTables(widths, down, up, loops, fixed, hidden)


@dataclasses.dataclass(frozen=True)
class Stack:
  """Where a stacked block keeps its copies: axis ``axis`` of every leaf of its
  layers (kernels, scales, biases, probes), of length ``length``."""

  axis: int
  length: int


@dataclasses.dataclass(frozen=True, eq=False)
class ChainStructure:
  """Skeleton and index tables of one chain of layers (see module docstring).

  Attributes:
    layers: the ``L`` layer specs in order.
    pi: ``pi[k]`` (for ``k < L-1``): source of the incoming skeleton edge of each
      node of level ``k + 1``.
    sigma: ``sigma[k]`` (for ``k >= 1``; ``sigma[0]`` is ``None``): target of the
      outgoing skeleton edge of each node of level ``k``.
    out_fixed: ``out_fixed[k][a]`` (for ``k >= 1``): the outgoing skeleton edge
      of node ``a`` of level ``k`` is itself in F.
    loops_back: ``loops_back[k][j]`` (for ``1 <= k < L-1``): the incoming
      skeleton edge of node ``j`` of level ``k + 1`` is also the outgoing
      skeleton edge of its source, i.e. ``sigma[k][pi[k][j]] == j``.
    levels: the same tables padded to one width, for per-node vectors of all
      levels held stacked.
    normalized: the chain's outputs feed a per-channel normalization
      (``gsgd_jax.Block(..., normalized=True)``).
    stack: for a stacked block, where its copies are (everything else here
      describes one copy); None otherwise.
  """

  layers: tuple[LayerSpec, ...]
  pi: tuple[np.ndarray | None, ...]
  sigma: tuple[np.ndarray | None, ...]
  out_fixed: tuple[np.ndarray | None, ...]
  loops_back: tuple[np.ndarray | None, ...]
  levels: LevelTables
  normalized: bool = False
  stack: Stack | None = None

  @functools.cached_property
  def one_copy(self) -> ChainStructure:
    """The structure of one copy of a stacked chain (the chain itself otherwise)."""
    return self if self.stack is None else dataclasses.replace(self, stack=None)

  @property
  def depth(self) -> int:
    return len(self.layers)

  @property
  def paths(self) -> tuple[Path, ...]:
    return tuple(spec.path for spec in self.layers)

  @property
  def copies(self) -> int:
    """The number of copies of the chain: a stacked block's length, else 1."""
    return 1 if self.stack is None else self.stack.length

  @property
  def num_hidden(self) -> int:
    """H: the number of hidden nodes, i.e. the dimension of the group G."""
    return self.copies * sum(spec.n_out for spec in self.layers[:-1])

  @property
  def num_weights(self) -> int:
    """m: weights plus biases (biases count as edges from a constant node)."""
    per_copy = sum(
      int(np.prod(s.kernel_shape)) + (int(np.prod(s.output_shape)) if s.has_bias else 0)
      for s in self.layers
    )
    return self.copies * per_copy

  @property
  def num_basis_paths(self) -> int:
    """m - H: the dimension of the positively scale-invariant space."""
    return self.num_weights - self.num_hidden


def defined(table: np.ndarray | None) -> np.ndarray:
  """An index table at a level where it exists (the ends of a chain have None)."""
  if table is None:
    raise ValueError("internal: skeleton table used at a chain's input or output level")
  return table


def _general_spec(
  path: Path, kernel_shape: tuple[int, ...], has_bias: bool, reading: Reading
) -> LayerSpec:
  """A multi-axis kernel declared with ``gsgd_jax.Layer(path, input_axes=..., ...)``."""
  name = "/".join(path)
  why = readings.check(name, kernel_shape, reading)
  if why is not None:
    raise ValueError(why)
  if reading.transposed and has_bias:  # refused with its message by _check_layer
    raise ValueError(f"internal: transposed layer {name!r} with a bias")
  inputs, outputs = readings.sides(kernel_shape, reading)
  n_in, n_out = inputs.nodes, outputs.nodes
  return LayerSpec(path, "general", tuple(kernel_shape), has_bias, 1, 0, n_in, n_out, reading)


def _layer_spec(
  path: Path,
  kernel_shape: tuple[int, ...],
  has_bias: bool,
  affine: bool,
  reading: Reading | None,
  prev: LayerSpec | None,
) -> LayerSpec:
  name = "/".join(path)
  if reading is not None and affine:
    raise ValueError(
      f"layer {name!r} is declared gsgd_jax.Layer(..., input_axes={reading.input_axes}), but "
      "it holds a norm's 'scale', not a kernel: declare it by its path alone."
    )
  if reading is not None and (len(kernel_shape) != 2 or reading != Reading(1)):
    return _general_spec(path, kernel_shape, has_bias, reading)
  if affine:
    if len(kernel_shape) != 1:
      raise ValueError(
        f"layer {name!r}: a norm's 'scale' of shape {kernel_shape} is not per "
        "channel; an affine layer needs scale (and bias) of shape (C,) per copy. A "
        f"stacked norm's block needs stack_axis ({UNDECLARED_STACK})."
      )
    (c,) = kernel_shape
    return LayerSpec(path, "affine", tuple(kernel_shape), has_bias, 1, 0, c, c)
  if len(kernel_shape) < 2 or min(kernel_shape) < 1:
    raise ValueError(
      f"layer {name!r}: kernel of shape {kernel_shape} is neither a dense "
      "(in, out) kernel nor a convolution (*window, in, out) kernel"
    )
  if len(kernel_shape) == 3:
    raise UnsupportedLayerError(
      f"layer {name!r}: a rank-3 kernel {kernel_shape} is a stacked dense layer "
      "(nn.scan / nnx.vmap: one (in, out) kernel per copy), a 1-D convolution "
      "(width, in, out) or a multi-axis kernel (Flax DenseGeneral, attention's "
      "(d, heads, head_dim)), and they have different symmetry groups. For a stack, "
      f"declare its block as gsgd_jax.Block([...], stack_axis=0) ({UNDECLARED_STACK}); "
      "for a multi-axis kernel, declare the layer as gsgd_jax.Layer(path, input_axes=n), "
      "n its leading input axes. 1-D convolutions are not supported: leave the layer "
      "out of `layers` (it then takes the fallback)."
    )
  *window, n_in, n_out = kernel_shape
  if window:  # convolution: one tap per window position, the centre is the skeleton
    centre = int(np.ravel_multi_index(tuple(d // 2 for d in window), window))
    return LayerSpec(
      path, "conv", tuple(kernel_shape), has_bias, int(np.prod(window)), centre, n_in, n_out
    )
  after_channels = prev is not None and prev.kind in ("conv", "affine")
  if prev is not None and after_channels and n_in != prev.n_out and n_in % prev.n_out == 0:
    positions = n_in // prev.n_out  # flatten of (positions, channels), NHWC order
    return LayerSpec(
      path, "flatten", tuple(kernel_shape), has_bias, positions, positions // 2, prev.n_out, n_out
    )
  return LayerSpec(path, "dense", tuple(kernel_shape), has_bias, 1, 0, n_in, n_out)


def _check_affine(spec: LayerSpec, k: int, depth: int) -> None:
  """An affine layer may only start a block of at least two layers."""
  if k > 0:
    raise UnsupportedLayerError(
      f"layer {spec.name!r}: a norm's affine layer (scale, bias) inside a block. The "
      "normalization before it breaks the rescaling symmetry of the layers before it, "
      "so a block cannot run through a norm: start a block at it, "
      "gsgd_jax.Block([norm, next_layer, ...]), and if the layer before it feeds the "
      "norm, end that block there and declare it normalized=True."
    )
  if depth == 1:
    raise UnsupportedLayerError(
      f"layer {spec.name!r}: a norm's affine layer alone is no block (it has no "
      "hidden nodes): declare it with the layers after it, "
      "gsgd_jax.Block([norm, next_layer, ...]), or leave it out of `layers` (it then "
      "takes the fallback)."
    )


def _facing(spec: LayerSpec, inputs: bool) -> readings.Side | None:
  """The side of a general kernel that faces its neighbour (None for other kinds)."""
  return None if spec.kind != "general" else spec.sides[0 if inputs else 1]


def _check_facing_sides(prev: LayerSpec, spec: LayerSpec) -> None:
  """Where either of two chained layers groups its entries into paired nodes (RoPE), both
  must pair the same dimensions of heads of the same size (grouped query heads, on one
  side, share each node among the heads of a group: the other side has one head per
  group)."""
  before, after = _facing(prev, inputs=False), _facing(spec, inputs=True)
  paired = [s for s in (before, after) if s is not None and s.pairs is not None]
  if not paired:
    return
  same = (
    before is not None
    and after is not None
    and before.pairs == after.pairs
    and before.head == after.head
    and before.nodes == after.nodes
  )
  if not same:
    describe = lambda s: (
      "no pairs"
      if s.reading is None
      else (f"pairs={s.reading.pairs!r}, head_dim={s.reading.head_dim}")
    )
    fix = "so declare the same pairs and head_dim on both layers."
    first, second = prev.reading, spec.reading
    alike = (
      first is not None
      and second is not None
      and first.pairs is not None
      and (first.pairs, first.head_dim) == (second.pairs, second.head_dim)
    )
    if alike and before is not None and after is not None and before.pairs == after.pairs:
      # Declared alike and facing each other: the heads (head_dim, kv_heads) do not fit.
      heads = lambda s: (
        f"heads of {s.head}" + (f", {s.groups} query heads to a node" if s.groups > 1 else "")
      )
      fix = (
        f"and here they do not line up: {prev.name!r} has {before.nodes} nodes there "
        f"({heads(before)}), {spec.name!r} {after.nodes} ({heads(after)}). Check head_dim "
        "(the size of one head) and kv_heads (the key-value heads) against the model's."
      )
    elif alike:  # the same pairs on both, but on a side that is not the one they share
      fix = (
        "and a layer's pairs fall on its kernel's last axis: its outputs, or its inputs when "
        f"it is read transposed. So read {prev.name!r} as it is and {spec.name!r} transposed "
        f"(a query, then its key: gsgd_jax.Layer({spec.name!r}, ..., transposed=True))."
      )
    raise ValueError(
      f"layers {prev.name!r} ({describe(prev)}) and {spec.name!r} ({describe(spec)}) meet at "
      "nodes they group differently: the dimensions a rotary embedding pairs are one node on "
      f"both sides of it, {fix}"
    )


def _grouped(path: Path, reading: Reading, k: int, depth: int) -> Reading:
  """A reading with ``kv_heads``, its grouped side set: the side facing the chain's other
  layer (a query kernel's outputs, an output kernel's inputs)."""
  if depth != 2:
    raise ValueError(
      f"layer {'/'.join(path)!r} is declared with kv_heads={reading.kv_heads} in a block of "
      f"{depth} layer(s): grouped-query attention's chains are two layers, [query, key] "
      "(kv_heads on the query) and [value, out] (kv_heads on the output)."
    )
  return dataclasses.replace(reading, grouped="outputs" if k == 0 else "inputs")


def chain_structure(
  signature: Signature, normalized: bool = False, stack: Stack | None = None
) -> ChainStructure:
  """Specs and skeleton index tables of one chain of layers (of one copy of a stacked
  chain, whose copies ``stack`` places)."""
  if not signature:
    raise ValueError("a block of `layers` is empty: declare at least one layer per block")
  specs: list[LayerSpec] = []
  for k, entry in enumerate(signature):
    path, kernel_shape, has_bias, affine, reading = entry
    if reading is not None and reading.kv_heads is not None:
      reading = _grouped(path, reading, k, len(signature))
    spec = _layer_spec(
      path, kernel_shape, has_bias, affine, reading, prev=specs[-1] if specs else None
    )
    if spec.kind == "affine":
      _check_affine(spec, len(specs), len(signature))
    if specs:
      _check_facing_sides(specs[-1], spec)
    if specs and spec.n_in != specs[-1].n_out:
      prev = specs[-1]
      if spec.kind == "conv" and prev.n_out % spec.n_in == 0:
        raise UnsupportedLayerError(
          f"layer {spec.name!r}: kernel {spec.kernel_shape} takes {spec.n_in} input "
          f"channels but the layer before it, {prev.name!r}, has {prev.n_out} outputs: "
          "a grouped or depthwise convolution (feature_group_count > 1)? G-SGD "
          "supports only convolutions whose output channels each see every input "
          "channel; leave this layer out of `layers` (it then takes the fallback) and "
          "split the chain around it."
        )
      grouped = ""
      declared = [x for x in (prev, spec) if x.reading is not None and x.reading.kv_heads]
      if declared:  # grouped-query attention declared, but not as the model has it
        x = declared[0]
        assert x.reading is not None
        head_dim = "" if x.reading.head_dim is None else f" and head_dim={x.reading.head_dim}"
        grouped = (
          f" {x.name!r} is declared with kv_heads={x.reading.kv_heads}{head_dim}: check them "
          "against the model (its number of key-value heads, the size of one head)."
        )
      elif (
        len(specs) == 1
        and len(signature) == 2
        and (spec.n_in % prev.n_out == 0 or prev.n_out % spec.n_in == 0)
      ):
        grouped = (
          " If they are an attention's [value, out] or [query, key] with grouped-query "
          "attention (fewer key-value heads than query heads), declare the layer of the "
          "query heads gsgd_jax.Layer(..., kv_heads=...) (with head_dim where one axis holds "
          "every head)."
        )
      raise ValueError(
        f"layer {spec.name!r} takes {spec.n_in} inputs (kernel {spec.kernel_shape}) "
        f"but the layer before it, {prev.name!r}, has {prev.n_out} outputs "
        f"(kernel {prev.kernel_shape}); are `layers` in forward order?{grouped}"
      )
    specs.append(spec)
  depth = len(specs)
  pi = tuple(np.arange(s.n_out) % s.n_in if k < depth - 1 else None for k, s in enumerate(specs))
  sigma = tuple(np.arange(s.n_in) % s.n_out if k >= 1 else None for k, s in enumerate(specs))
  out_fixed = tuple(
    None
    if k == 0
    else (defined(pi[k])[defined(sigma[k])] == np.arange(s.n_in))
    if k < depth - 1
    else np.zeros(s.n_in, bool)
    for k, s in enumerate(specs)
  )
  loops_back = tuple(
    (defined(sigma[k])[defined(pi[k])] == np.arange(s.n_out)) if 1 <= k < depth - 1 else None
    for k, s in enumerate(specs)
  )
  for table in (*pi, *sigma, *out_fixed, *loops_back):
    if table is not None:
      table.setflags(write=False)
  levels = _level_tables(specs, pi, sigma, out_fixed, loops_back)
  return ChainStructure(tuple(specs), pi, sigma, out_fixed, loops_back, levels, normalized, stack)


@functools.lru_cache(maxsize=256)
def _build(
  signatures: tuple[tuple[Signature, bool, Stack | None], ...],
) -> tuple[ChainStructure, ...]:
  return tuple(chain_structure(*entry) for entry in signatures)


def block_paths(blocks: Sequence[ChainStructure]) -> list[tuple[Path, ...]]:
  """The layer paths of each block, for ``pytree.locate_blocks`` and ``pytree.map_layers``."""
  return [block.paths for block in blocks]


def _masked_paths(tree: Any) -> set[Path]:
  """Key paths of the ``optax.MaskedNode`` stand-ins of leaves that ``optax.masked``
  or ``optax.partition`` handed to another transformation."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
  return {tuple(pytree.key_name(k) for k in path) for path, leaf in with_path if is_masked(leaf)}


def _copy_shape(name: str, what: str, shape: tuple[int, ...], stack: Stack | None):
  """The shape of one copy of a leaf of a stacked layer (the shape itself otherwise)."""
  if stack is None:
    return shape
  if len(shape) <= stack.axis or shape[stack.axis] != stack.length:
    raise ValueError(
      f"layer {name!r}: {what} of shape {shape} has no stack of length {stack.length} "
      f"on axis {stack.axis}, as its block declares (stack_axis={stack.axis}); every "
      "kernel, scale, bias and probe of a stacked block carries its copies on that "
      "axis, where nn.scan's variable_axes puts them. Is this layer stacked?"
    )
  return shape[: stack.axis] + shape[stack.axis + 1 :]


def _block_stack(
  block: declaration.Block, paths: list[Path], leaves: list[Any], slots: pytree.LayerSlots
):
  """Where a block declared with ``stack_axis`` keeps its copies (read off its
  first kernel or scale); None for a block without."""
  if block.stack_axis is None:
    return None
  shape = np.shape(leaves[slots.kernel[0]])
  if paths[slots.kernel[0]][-1] == "scale" and len(shape) < 2:
    raise ValueError(
      f"layer {'/'.join(block.layers[0])!r}: a norm's scale of shape {shape} carries no "
      f"stack, but it starts a block declared stack_axis={block.stack_axis}: one norm in "
      "front of every copy of a stack would tie their channels together, so it cannot "
      "join the stacked chains. Leave it out of the block (it then takes the fallback): "
      f"gsgd_jax.Block({[('/'.join(p)) for p in block.layers[1:]]!r}, "
      f"stack_axis={block.stack_axis})."
    )
  if len(shape) <= block.stack_axis:
    raise ValueError(
      f"layer {'/'.join(block.layers[0])!r}: shape {shape} has no axis "
      f"{block.stack_axis}, but its block declares stack_axis={block.stack_axis}"
    )
  stack = Stack(block.stack_axis, int(shape[block.stack_axis]))
  shapes = [tuple(np.shape(leaves[i])) for i in slots.kernel]
  whats = ["scale" if paths[i][-1] == "scale" else "kernel" for i in slots.kernel]
  _check_copies_agree(block, shapes, whats, stack)
  return stack


def _check_copies_agree(
  block: declaration.Block, shapes: list[tuple[int, ...]], whats: list[str], stack: Stack
) -> None:
  """Every kernel (or scale) of a stacked block has ``stack.length`` copies on its
  axis; where one has not, the error names the axes on which they all agree (a stack
  declared on the wrong axis, e.g. 0 for T5's and MaxText's layers scanned on axis 1)."""
  at_axis = lambda shape: shape[stack.axis] if len(shape) > stack.axis else None
  if all(at_axis(shape) == stack.length for shape in shapes):
    return
  names = ["/".join(layer) for layer in block.layers]
  other = next(i for i, shape in enumerate(shapes) if at_axis(shape) != stack.length)
  agree = [
    axis
    for axis in range(min(map(len, shapes)))
    if axis != stack.axis and len({shape[axis] for shape in shapes}) == 1
  ]
  hint = (
    "Is this layer stacked?"
    if not agree
    else "Their kernels and scales agree on axis "
    + " and on axis ".join(f"{axis} (length {shapes[0][axis]})" for axis in agree)
    + f": is the stack there (stack_axis={agree[0]}; Flax's nn.scan puts it on "
    "variable_axes, T5 and MaxText on 1)?"
  )
  raise ValueError(
    f"layer {names[other]!r}: {whats[other]} of shape {shapes[other]} has no stack of length "
    f"{stack.length} on axis {stack.axis}, the copies that the block's first layer "
    f"{names[0]!r} (shape {shapes[0]}) has there (stack_axis={stack.axis}); every kernel, "
    f"scale, bias and probe of a stacked block carries the same copies on that axis. {hint}"
  )


def _looks_stacked(shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
  """A bias (or probe) ``shape`` that a stack of the kernel's layer would give:
  ``(S, n_out)`` beside an ``(S, ..., n_out)`` kernel, or ``(n_out, S)`` beside
  ``(in, S, ..., n_out)``."""
  if len(shape) != 2 or len(kernel_shape) < 3:
    return False
  return shape in ((kernel_shape[0], kernel_shape[-1]), (kernel_shape[-1], kernel_shape[1]))


def _check_layer(
  name: str,
  leaves: list[Any],
  slots: tuple[int, int | None, int | None],
  affine: bool,
  stack: Stack | None,
  reading: Reading | None = None,
) -> tuple[int, ...]:
  """Checks one layer's leaves; returns its kernel's (or scale's) shape per copy."""
  slot_kernel, slot_bias, slot_probe = slots
  kernel = "scale" if affine else "kernel"
  full_kernel_shape = tuple(int(d) for d in np.shape(leaves[slot_kernel]))
  kernel_shape = _copy_shape(name, kernel, full_kernel_shape, stack)
  if affine and slot_probe is not None:
    raise ValueError(
      f"layer {name!r}: a norm's affine layer has a {PROBE!r} leaf; probes stand "
      "for a reduction over a kernel, and an affine layer has none. Remove it."
    )
  for i, what in ((slot_kernel, kernel), (slot_bias, "bias"), (slot_probe, PROBE)):
    if i is not None and not jnp.issubdtype(jnp.result_type(leaves[i]), jnp.inexact):
      raise ValueError(
        f"layer {name!r}: {what} has dtype {jnp.result_type(leaves[i])}; "
        "G-SGD needs floating-point parameters"
      )
  for i, what in ((slot_bias, "bias"), (slot_probe, PROBE)):
    if i is None:
      continue
    full_shape = tuple(int(d) for d in np.shape(leaves[i]))
    general = reading is not None and not affine
    if stack is None and not general and _looks_stacked(full_shape, full_kernel_shape):
      raise UnsupportedLayerError(
        f"layer {name!r}: kernel {full_kernel_shape} and {what} {full_shape} carry a "
        "stack axis (nn.scan / nnx.vmap): read without it, the stack would train as "
        "one layer of another kind. Declare its block as gsgd_jax.Block([...], "
        f"stack_axis=...) ({UNDECLARED_STACK})."
      )
    shape = _copy_shape(name, what, full_shape, stack)
    if general and reading is not None:
      # (An unreadable kernel is refused with the reading.)
      if reading.transposed:
        raise UnsupportedLayerError(
          f"layer {name!r}: declared transposed, but it has a {what}, which would sit on the "
          "layer's inputs. A key's bias changes no attention weight (softmax ignores what is "
          "constant over the keys), but it cannot join the chain: build the keys without a "
          "bias (or probe), or leave the queries and keys to the fallback."
        )
      outputs = kernel_shape[reading.input_axes :]
      fits = reading.input_axes < len(kernel_shape)
      if fits and shape != outputs:
        raise ValueError(
          f"layer {name!r}: {what} of shape {shape} does not match the output axes "
          f"{outputs} of its kernel {kernel_shape} (declared input_axes={reading.input_axes}). "
          f"If the layer is stacked, declare its block's stack_axis ({UNDECLARED_STACK})."
        )
    elif shape != (kernel_shape[-1],):
      multi_axis = (
        " A multi-axis kernel (Flax DenseGeneral) is declared as "
        "gsgd_jax.Layer(path, input_axes=n), n its leading input axes."
        if len(shape) > 1 and kernel_shape[-len(shape) :] == shape
        else ""
      )
      raise ValueError(
        f"layer {name!r}: {what} of shape {shape} does not match the "
        f"{kernel}'s {kernel_shape[-1]} outputs.{multi_axis}"
      )
  return kernel_shape


def build_structure(
  tree: Any, layers: declaration.Declaration | Any, what: str = "params"
) -> tuple[ChainStructure, ...]:
  """The (cached) chain structure of every block of ``layers`` in ``tree``.

  Raises, naming the layer, when a declared layer is missing, masked out, not
  floating point, of an unsupported kind (an undeclared stack among them), or
  does not chain with its neighbour, or when a stacked block's leaves do not
  carry their copies where it says.
  """
  decl = declaration.as_declaration(layers)
  paths, leaves, _ = pytree.leaf_paths(tree)
  masked = _masked_paths(tree)
  blocks = decl.resolve(set(paths), masked)
  signatures = []
  for block in blocks:
    slots = pytree.locate_layers(paths, block.layers, what=what)
    stack = _block_stack(block, paths, leaves, slots)
    signature = []
    layer_slots = zip(slots.kernel, slots.bias, slots.probe, strict=True)
    for name, reading, (k, b, s) in zip(block.layers, block.readings, layer_slots, strict=True):
      affine = paths[k][-1] == "scale"
      shape = _check_layer("/".join(name), leaves, (k, b, s), affine, stack, reading)
      signature.append((name, shape, b is not None, affine, reading))
    signatures.append((tuple(signature), block.normalized, stack))
  built = _build(tuple(signatures))  # raises on layers that do not chain, before warning
  declaration.warn_one_layer_blocks(blocks)
  return built
