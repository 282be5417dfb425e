"""Basis-path values, the inverse chain rule (ICR) and weight allocation (WA).

The functions here act on one chain (a ``ChainStructure``) given as lists of
per-layer arrays; ``transform.py`` maps pytrees to these lists. Notation follows
docs/math.md with 0-based layers (see ``structure.py``): ``B[k]`` and ``F[k]`` are
the back and forward skeleton-chain products at node level ``k``.

Everything is O(m): per layer, one reduction over the taps and inputs and
elementwise work with per-node vectors broadcast along the kernel's axes. Masks
of skeleton edges are built from iotas and per-node index vectors inside the
fused elementwise code, so no dense mask or structure matrix is ever stored.
The only gathers take one entry per node (the skeleton edges, and each level's
row of a stacked per-node array); the only scatter adds per-node vectors (the
``N^2`` of normalized chains).

Per-node vectors of all levels are held as one list per quantity in a chain of
one or two layers, and stacked in a deeper one, whose recurrences from level to
level run as one ``lax.scan`` (see ``propagate`` and ``level``): the compiled
update is linear in depth.

A stacked block's chain functions below (those taking a ``ChainStructure``) run
on each copy through ``stacking.per_copy``; the rest of this module sees one copy.

Kernels are used in their own shape, ``(*window, rows, n_out)``: dense
``(n_in, n_out)``, convolution ``(*window, n_in, n_out)``, flatten ``(taps * n_in,
n_out)`` with row ``s * n_in + c`` fed by node ``c``; a multi-axis (general) kernel
is ``(*inputs, *outputs)``, its nodes the entries of those axes in row-major
order. Per-node vectors broadcast against them through ``rows`` and ``cols``
(reshaped to the kernel's input or output axes: only the small vectors are ever
reshaped). Never reshaping a kernel matters:
XLA writes a fused update into the buffer of the gradient it reads only if it
reads it without a reshape; with the kernels viewed as ``(taps, n_in, n_out)``
a train step held kernel-sized temporaries that SGD's does not (measured in
benchmarks/RESULTS.md, checked by the memory test).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Generator, Sequence
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from gsgd_jax._src.reading import Side
from gsgd_jax._src.stacking import STACK, per_copy
from gsgd_jax._src.structure import ChainStructure, LayerSpec, defined

Array = jax.Array


@contextlib.contextmanager
def inlined(*trees) -> Generator[None]:
  """While ``trees`` hold tracers, traces ``jax.numpy``'s functions as the primitives
  they are made of (called eagerly, each stays one compiled call).

  Each ``jax.numpy`` function is jitted: called while tracing with arguments of a shape
  it has not seen, it is traced as a program of its own, batched again under
  ``jax.vmap`` (a stack's copies) and only then inlined. A block's per-node work is
  hundreds of such calls on vectors of many widths, and tracing was over a quarter of
  the time the blocks add to compiling a train step (benchmarks/RESULTS.md, speed of the
  LLaMA-style decoder). Under ``jax.disable_jit`` they run as Python and add their
  primitives directly: the traced program is the same, traced faster. ``scan`` turns
  jit back on, or a scan would run as a Python loop.
  """
  tracing = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))
  jit_disabled = jax.config.jax_disable_jit  # type: ignore[attr-defined]  # read per context
  if not tracing or _INLINED.get() or jit_disabled:
    yield
    return
  token = _INLINED.set(True)
  try:
    with jax.disable_jit():
      yield
  finally:
    _INLINED.reset(token)


# Whether ``inlined`` disabled jit here (not a user's own ``jax.disable_jit``, kept as it is).
_INLINED: contextvars.ContextVar[bool] = contextvars.ContextVar("inlined", default=False)


def scan(*args, **kwargs):
  """``jax.lax.scan``, traced as a loop also inside ``inlined``."""
  if not _INLINED.get():
    return jax.lax.scan(*args, **kwargs)
  with jax.disable_jit(False):
    return jax.lax.scan(*args, **kwargs)


def where(condition, x, y) -> Array:
  """``jnp.where(condition, x, y)`` as one ``lax.select``.

  ``jnp.where`` is a jitted function: every call adds a call of its own to the traced
  program, which ``jax.vmap`` over a stack's copies traces again, and the dozens of
  per-node selects of a block made tracing a sizeable part of its compile time.
  Operands sharded over Explicit axes take ``jnp.where``, which reconciles their
  shardings.
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  if any(_explicit_mesh(a) is not None for a in (condition, x, y) if isinstance(a, Array)):
    return jnp.where(condition, x, y)
  dtype = jnp.result_type(x, y)
  shape = jnp.broadcast_shapes(np.shape(condition), x.shape, y.shape)
  return jax.lax.select(
    jnp.broadcast_to(condition, shape),
    jnp.broadcast_to(x.astype(dtype), shape),
    jnp.broadcast_to(y.astype(dtype), shape),
  )


def compute_dtype(dtype) -> jnp.dtype:
  """Per-node vectors and chain products run in at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------
# Skeleton edges: per-node gathers and fused masks.


def _explicit_mesh(x: Array) -> jax.sharding.AbstractMesh | None:
  """The mesh of ``x``'s own sharding when it has Explicit axes, else None.

  Read from the array's type, not from the context mesh, so that sharded params
  work inside and outside ``jax.set_mesh`` alike.
  """
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  return mesh if mesh is not None and mesh.explicit_axes else None


def _replicated_sharding(mesh: jax.sharding.AbstractMesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicated(vector: Array) -> Array:
  """A per-node vector, replicated where it is sharded over Explicit axes.

  Per-node vectors are tiny; kept replicated they broadcast against kernels of
  any sharding, and every update keeps the sharding of its gradient.
  """
  mesh = _explicit_mesh(vector)
  if mesh is None:
    return vector
  return jax.sharding.reshard(vector, _replicated_sharding(mesh))


def entries(x: Array, points: np.ndarray) -> Array:
  """``x`` at each row of ``points``, an ``(n, x.ndim)`` table of in-bounds
  indices known when tracing: one gather, replicated when ``x`` is sharded over
  Explicit axes.

  Written as one ``lax.gather`` of one constant table: NumPy-style indexing
  would add, per index array, the handling of negative indices and the
  concatenation of the index arrays, a dozen operations for every layer that
  XLA then spends compile time removing.
  """
  mesh = _explicit_mesh(x)
  if mesh is not None:
    return x.at[tuple(points.T)].get(
      out_sharding=_replicated_sharding(mesh),
      mode="promise_in_bounds",
      wrap_negative_indices=False,
    )
  axes = tuple(range(x.ndim))
  numbers = jax.lax.GatherDimensionNumbers(
    offset_dims=(), collapsed_slice_dims=axes, start_index_map=axes
  )
  return jax.lax.gather(
    x,
    np.asarray(points, np.int32),
    numbers,
    (1,) * x.ndim,
    unique_indices=True,
    mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )


def _take(kernel: Array, spec: LayerSpec, nodes_in: np.ndarray, nodes_out: np.ndarray) -> Array:
  """The skeleton-tap entries ``(nodes_in[p], nodes_out[p])``: one per node
  (replicated when the kernel is sharded over Explicit axes). An affine layer's
  only edges are ``o -> o``, its ``scale`` entries."""
  if spec.kind == "affine":
    if not np.array_equal(nodes_in, nodes_out):
      raise ValueError(f"internal: an edge off the diagonal of affine layer {spec.name!r}")
    return entries(kernel, np.asarray(nodes_in)[:, None])
  if spec.kind == "general":  # each node's skeleton-tap entry, placed on its side's axes
    point = np.zeros((len(nodes_in), kernel.ndim), np.int64)
    for side, nodes in zip(spec.sides, (nodes_in, nodes_out), strict=True):
      index = np.unravel_index(side.centre[np.asarray(nodes)], side.shape)
      for axis, values in zip(side.axes, index, strict=True):
        point[:, axis] = values
    return entries(kernel, point)
  window = np.broadcast_to(
    np.asarray(spec.centre_index, np.int64), (len(nodes_in), len(spec.centre_index))
  )
  return entries(kernel, np.column_stack([window, spec.centre_row + nodes_in, nodes_out]))


def incoming_skeleton(kernel: Array, spec: LayerSpec, pi: np.ndarray) -> Array:
  """The weight of edge ``pi[j] -> j`` on the skeleton tap, for every output node ``j``."""
  return _take(kernel, spec, pi, np.arange(spec.n_out))


def outgoing_skeleton(kernel: Array, spec: LayerSpec, sigma: np.ndarray) -> Array:
  """The weight of edge ``a -> sigma[a]`` on the skeleton tap, for every input node ``a``."""
  return _take(kernel, spec, np.arange(spec.n_in), sigma)


def _row_iota(spec: LayerSpec) -> Array:
  """Each kernel row's index (a general kernel's input node), broadcastable against it."""
  if spec.kind == "general":
    return _side_nodes(spec.sides[0], spec.row_shape)
  return jax.lax.broadcasted_iota(jnp.int32, (spec.kernel_shape[-2], 1), 0)


def _col_iota(spec: LayerSpec) -> Array:
  """Each output entry's node, broadcastable against the kernel."""
  if spec.kind == "general":
    return _side_nodes(spec.sides[1], spec.col_shape)
  return jax.lax.broadcasted_iota(jnp.int32, (1, spec.n_out), 1)


def _side_nodes(side: Side, shape: tuple[int, ...]) -> Array:
  """The node of each entry of a general kernel's side, in ``shape``."""
  if side.plain:
    return jax.lax.broadcasted_iota(jnp.int32, (side.entries,), 0).reshape(shape)
  return jnp.asarray(side.node, jnp.int32).reshape(shape)


def _on_centre_taps(spec: LayerSpec, mask: Array) -> Array:
  """``mask``, and False off the skeleton tap of a general kernel's paired side."""
  if spec.kind != "general":
    return mask
  for side, shape in zip(spec.sides, (spec.row_shape, spec.col_shape), strict=True):
    if not side.plain:
      mask = mask & jnp.asarray(side.tap == side.taps // 2).reshape(shape)
  return mask


def _on_centre_window(spec: LayerSpec, mask: Array) -> Array:
  """``mask``, and False off a convolution's centre window position."""
  window = spec.kernel_shape[:-2]
  for axis, index in enumerate(spec.centre_index):
    mask = mask & (jax.lax.broadcasted_iota(jnp.int32, (*window, 1, 1), axis) == index)
  return mask


def fixed_mask(spec: LayerSpec, pi: np.ndarray | None) -> Array | None:
  """Boolean mask of F in this layer, broadcastable against the kernel (None: F
  is empty)."""
  if pi is None:
    return None
  skeleton_row = cols(jnp.asarray(spec.centre_row + pi, jnp.int32), spec)
  return _on_centre_taps(spec, _on_centre_window(spec, _row_iota(spec) == skeleton_row))


def outgoing_mask(spec: LayerSpec, sigma: np.ndarray | None) -> Array | None:
  """Boolean mask of the outgoing skeleton edges of this layer's input nodes,
  broadcastable against the kernel."""
  if sigma is None:
    return None
  mask = _on_centre_window(spec, _col_iota(spec) == rows(jnp.asarray(sigma, jnp.int32), spec))
  mask = _on_centre_taps(spec, mask)
  if spec.kind == "flatten":  # only the skeleton tap's rows
    row = _row_iota(spec)
    mask = mask & (row >= spec.centre_row) & (row < spec.centre_row + spec.n_in)
  return mask


def outgoing_all_fixed(struct: ChainStructure, k: int) -> bool:
  """Every outgoing skeleton edge of layer ``k``'s input nodes is in F (or the
  layer has none: layer 0)."""
  out_fixed = struct.out_fixed[k]
  return out_fixed is None or bool(out_fixed.all())


def free_outgoing_mask(struct: ChainStructure, k: int) -> Array | None:
  """``outgoing_mask`` of layer ``k`` where some outgoing skeleton edge is
  outside F, else None.

  The update zeroes every edge of F after the outgoing-edge terms, so an
  outgoing skeleton edge inside F needs no term of its own. In a layer with as
  many outputs as inputs (equal widths, equal channel counts) every one is inside
  F: such a layer's pass over its kernel then has no outgoing mask at all, and
  reads no per-node vector for those edges. Knowing this when tracing matters
  because XLA cannot: the two masks are different comparisons of iotas, and
  every operation left in the pass over each kernel is compiled once per layer.
  """
  if outgoing_all_fixed(struct, k):
    return None
  return outgoing_mask(struct.layers[k], struct.sigma[k])


def periodic(x: Array, n: int) -> Array:
  """``x[arange(n) % len(x)]`` by tiling, so that it fuses (no gather).

  Every per-node index map of the skeleton is of this form: ``pi[k][j] = j mod
  n_in`` and ``sigma[k][a] = a mod n_out``.
  """
  m = x.shape[0]
  if n <= m:
    return x[:n]
  return jnp.tile(x, -(-n // m))[:n]


def _usable(x: Array) -> Array:
  """Skeleton-chain products ``x`` where they are not degenerate, else inf: dividing by
  them gives 0 there.

  Degenerate: not finite, or smaller in magnitude than the square root of the
  smallest normal number (1e-19 in float32), e.g. behind a zero or subnormal
  skeleton weight, or a product of many small ones. Such a chain would make
  its paths' gradients and steps overflow; with 0 instead, those paths take no
  step and the update stays finite. The bound keeps a product of two
  reciprocals finite, so every per-element factor is finite too. Only per-node
  vectors pass through here.

  Vectors that scale whole kernels end in a division on purpose: XLA fuses
  cheap vector ops (selects, compares) into the pass over each kernel and
  recomputes them for every weight, but computes a division once per node
  (``read_quotients`` makes it one division per level).
  """
  ok = (jnp.abs(x) >= np.sqrt(jnp.finfo(x.dtype).tiny)) & jnp.isfinite(x)
  return where(ok, x, jnp.inf)


def _divisor(x: Array) -> Array:
  """``x`` where it is finite and nonzero, else inf (dividing by it gives 0)."""
  return where(jnp.isfinite(x) & (x != 0), x, jnp.inf)


def per_row(x: Array, spec: LayerSpec) -> Array:
  """A per-input-node vector, one entry per kernel row (tiled over a flatten
  layer's taps; a general kernel's rows are its input entries)."""
  if spec.kind == "general":
    return _expand(x, spec.sides[0])
  return periodic(x, spec.kernel_shape[-2])


def _pair_view(side: Side) -> tuple[int, ...] | None:
  """A shape of the side's entries (flat) whose axis 1 holds each node's taps and whose
  other axes, in order, its node: ``(heads, 2, half)`` for the two halves of each head,
  ``(nodes, 2)`` for adjacent pairs; None for any other map."""
  index = np.arange(side.entries)
  if np.array_equal(side.node, index // side.taps):
    return (side.nodes, side.taps)
  second = np.flatnonzero(side.tap == 1)
  if len(second):
    width = int(second[0])
    groups = side.entries // (side.taps * width)
    block = side.taps * width
    if groups * block == side.entries and np.array_equal(
      side.node, index // block * width + index % width
    ):
      return (groups, side.taps, width)
  return None


def _expand(x: Array, side: Side) -> Array:
  """A per-node vector, one value per entry of a general kernel's side (flat).

  Paired nodes are broadcast, not gathered: XLA:CPU compiles a gather as a program of
  its own for every use, while a broadcast fuses into the pass that reads it."""
  if side.plain:
    return x
  view = _pair_view(side)
  if view is None:
    return x[jnp.asarray(side.node)]
  per_node = x.reshape(view[:1] + view[2:])
  return jnp.broadcast_to(jnp.expand_dims(per_node, 1), view).reshape(-1)


def _fold(x: Array, side: Side) -> Array:
  """Per-entry values of a general kernel's side (flat) summed per node."""
  if side.plain:
    return x
  view = _pair_view(side)
  if view is None:
    return jax.ops.segment_sum(x, jnp.asarray(side.node), side.nodes, indices_are_sorted=False)
  return jnp.sum(x.reshape(view), axis=1).reshape(-1)


def _fold_entries(x: Array, side: Side | None) -> Array:
  """Values per entry of a side (any shape of them) summed per node (``side`` None: each
  entry is a node).

  Replicated first: a sum over a kernel sharded on one of the side's axes is sharded
  there, and neither its reshape nor its fold would keep that sharding.
  """
  x = replicated(x).reshape(-1)
  return x if side is None else _fold(x, side)


def fold_outputs(x: Array, spec: LayerSpec) -> Array:
  """Values per output entry (a bias's, any shape of it) summed per output node."""
  return _fold_entries(x, spec.sides[1] if spec.kind == "general" else None)


def fold_rows(x: Array, spec: LayerSpec) -> Array:
  """One value per kernel row, summed per input node (over a flatten layer's taps)."""
  if x.shape[0] == spec.n_in:
    return x
  return jnp.sum(x.reshape(spec.taps, spec.n_in), axis=0)


def rows(x: Array, spec: LayerSpec) -> Array:
  """A per-input-node vector, broadcastable against the layer's kernel."""
  return per_row(x, spec).reshape(spec.row_shape)


def _per_output_entry(x: Array, spec: LayerSpec) -> Array:
  """A per-output-node vector, one value per output entry (flat)."""
  return _expand(x, spec.sides[1]) if spec.kind == "general" else x


def cols(x: Array, spec: LayerSpec) -> Array:
  """A per-output-node vector, broadcastable against the layer's kernel."""
  return _per_output_entry(x, spec).reshape(spec.col_shape)


def at_bias(x: Array, spec: LayerSpec) -> Array:
  """A per-output-node vector in the shape of the layer's bias (a general kernel's
  output axes)."""
  return _per_output_entry(x, spec).reshape(spec.output_shape)


def per_output(x: Array, spec: LayerSpec) -> Array:
  """``x`` summed over the kernel's taps and inputs: one value per output node."""
  return fold_outputs(jnp.sum(x, axis=spec.reduced_axes), spec)


def per_input(x: Array, spec: LayerSpec) -> Array:
  """A general kernel's ``x`` summed over its outputs: one value per input node."""
  inputs, outputs = spec.sides
  return _fold_entries(jnp.sum(x, axis=outputs.axes), inputs)


# ----------------------------------------------------------------------------
# Per-node vectors of all levels.
#
# A per-node quantity (chain products, P, the ratios Q and what is derived from
# them) has one vector per node level. A chain of at most ``LISTED_LEVELS``
# layers holds them as a list of its ``L + 1`` levels, each of its own width
# (``PerNode``); recurrences from level to level are written out, and levels
# that are constant (the ends of the chain) stay constants XLA folds away. A
# deeper chain holds each quantity as one ``(L + 1, W)`` array, row k level k
# padded to the widest level W (structure.LevelTables), and a recurrence runs
# as one lax.scan (see `propagate`): its compiled update is linear in depth.
#
# Why two forms: XLA:CPU compiles each distinct fused computation separately
# (about 10 ms each), and identical ones once. Tables of a two-layer chain (a
# transformer's feed-forward and attention blocks, a ResNet's) cost pads,
# concatenations and gathers, a dozen distinct small programs per block
# (benchmarks/RESULTS.md, compile time per block). A loop is what keeps a deep
# chain's program from growing with depth; and in chains of three layers or
# more, XLA kept a kernel-sized temporary for Nesterov momentum with lists
# where it keeps none with tables (the memory tests).

# Chains of at most this many layers hold per-node quantities as lists of levels.
LISTED_LEVELS = 2

# Table recurrences of at most this many levels are unrolled: a loop costs more to
# compile than a few unrolled levels, and so short a recurrence cannot grow much.
UNROLLED_LEVELS = 8

# A per-node quantity: a list of L + 1 level vectors, or a (L + 1, W) table (masks of
# levels, known when tracing, as NumPy arrays).
PerNode = Array | list[Array]
PerNodeMask = np.ndarray | list[np.ndarray]


def listed(struct: ChainStructure) -> bool:
  """The chain holds per-node quantities as lists of levels (see above)."""
  return struct.depth <= LISTED_LEVELS


def level(x: PerNode, struct: ChainStructure, k: int) -> Array:
  """Level ``k``'s per-node vector of a per-node quantity, unpadded.

  A table's row is read by a gather whose indices are a constant operand, not
  by a slice: XLA folds a slice's offset into the fused pass that reads it, so
  every layer's pass would differ, while a gather stays a small fusion of its
  own (its result is broadcast over a kernel) and the passes of layers of equal
  shape stay identical; distinct passes cost XLA:CPU far more to compile (about
  ten times, for small passes over 16 x 16 kernels). A chain of at most
  ``UNROLLED_LEVELS`` layers has few passes to compile and uses a slice.
  """
  if isinstance(x, list):
    return x[k]
  n = struct.levels.widths[k]
  if struct.depth <= UNROLLED_LEVELS:
    return x[k, :n]
  return entries(x, np.column_stack([np.full(n, k), np.arange(n)]))


def per_level(fn, *quantities: PerNode | PerNodeMask) -> PerNode:
  """``fn`` applied level by level (on a table: to the whole table at once)."""
  if isinstance(quantities[0], list):
    return [fn(*xs) for xs in zip(*quantities, strict=True)]
  return fn(*quantities)


def _dtype(x: PerNode) -> jnp.dtype:
  return x[0].dtype if isinstance(x, list) else x.dtype


def hidden_levels(x: PerNode, struct: ChainStructure) -> Array:
  """The entries of every hidden node (levels ``1..L-1``), concatenated on the last
  axis (any leading axes of ``x``'s levels, e.g. a stack's copies, kept)."""
  if isinstance(x, list):
    return jnp.concatenate(x[1:-1], axis=-1)
  return x[..., :-1, :][..., struct.levels.hidden]


def level_masks(struct: ChainStructure, name: str) -> PerNodeMask:
  """A boolean index table of the chain (``structure.LevelTables``: ``hidden``,
  ``out_fixed``), row ``k`` on level ``k``, as the chain holds per-node quantities."""
  table = getattr(struct.levels, name)
  if not listed(struct):
    return table
  return [table[k, :n] for k, n in enumerate(struct.levels.widths[:-1])]


def read_quotients(
  struct: ChainStructure,
  numerators: Sequence[PerNode | float],
  divisors: Sequence[PerNode],
  parts: Sequence[Sequence[tuple[int, int]]],
  summed: tuple[int, Sequence[int]] | None = None,
) -> tuple[list[list[Array]], Array | None]:
  """Per layer, the per-node vectors its pass over the kernel reads: the quotient
  ``numerators[i] / divisors[i]`` (a float numerator: the same on every node) at level
  ``k`` for each ``(i, k)`` in that layer's ``parts``, unpadded, each read level divided
  by one division.

  In a table, all of them are read together, so that all are computed before any pass
  starts: a pass that writes its result into the buffer of the gradient it reads must
  come after every other read of that gradient, and these vectors depend on those reads
  (the inverse chain rule's ``P``), even where this layer's pass uses none of them. Left
  free, XLA's scheduler may put the pass first, and the gradient must then survive it in a
  kernel-sized temporary. So the quantities are stacked into one array and each layer's
  vectors read from it by one gather (a slice would become a slice of the one quantity
  read, and the order would be lost). A chain of lists has at most one hidden level, and XLA
  orders its passes after its reads unaided. The memory tests check both.

  XLA:CPU recomputes cheap per-node work (selects, products) in every pass over a
  kernel that reads it, but gives a division that several passes read a program of its
  own, and each program costs about as much to compile as a pass over a kernel
  (benchmarks/RESULTS.md, compile time per block). Stacked, the quotients of a level
  (of the whole table, in a table) cost one program.

  ``summed``, where given, is ``(i, levels)``: the quotients of quantity ``i`` on
  those levels (0 on the others) are also returned, as one vector (else None), for a sum.
  """
  dtype = _dtype(divisors[0])

  if not listed(struct):
    tables = [cast(Array, d) for d in divisors]
    pairs = zip(numerators, tables, strict=True)
    nums = [jnp.broadcast_to(jnp.asarray(x, dtype), t.shape) for x, t in pairs]
    table = _stacked(nums, axis=1) / _stacked(tables, axis=1)
    sums = None if summed is None else table[:, summed[0]].reshape(-1)
    return [_levels(table, struct, layer) for layer in parts], sums
  wanted = {(k, i) for layer in parts for i, k in layer}
  if summed is not None:
    wanted |= {(k, summed[0]) for k in summed[1]}
  read: dict[tuple[int, int], Array] = {}
  sums = None
  for k in sorted({k for k, _ in wanted}):
    rows = sorted(i for level_k, i in wanted if level_k == k)
    dens = [cast(list, divisors[i])[k] for i in rows]
    nums = [
      jnp.broadcast_to(jnp.asarray(x if isinstance(x, float) else x[k], dtype), d.shape)
      for x, d in zip((numerators[i] for i in rows), dens, strict=True)
    ]
    out = _stacked(nums, axis=0) / _stacked(dens, axis=0)
    read |= {(i, k): out[n] for n, i in enumerate(rows)}
    if summed is not None and k in summed[1]:
      sums = read[summed[0], k] if sums is None else jnp.concatenate([sums, read[summed[0], k]])
  return [[read[i, k] for i, k in layer] for layer in parts], sums


def _padded_level(struct: ChainStructure, x: PerNode, fill: float) -> PerNode:
  """A per-node quantity of levels ``0..L-1`` with level ``L`` added, all ``fill``."""
  if isinstance(x, list):
    return [*x, jnp.full(struct.levels.widths[-1], fill, x[0].dtype)]
  return jnp.concatenate([x, jnp.full_like(x[:1], fill)])


def _stacked(xs: Sequence[Array], axis: int) -> Array:
  """``jnp.stack``, written as a concatenation (see ``stack_rows``)."""
  return jnp.concatenate([jnp.expand_dims(x, axis) for x in xs], axis=axis)


def _levels(table: Array, struct: ChainStructure, parts: Sequence[tuple[int, int]]) -> list[Array]:
  """Per-node vectors from a ``(L + 1, q, W)`` table of ``q`` stacked quantities:
  quantity ``i`` at level ``k`` for each ``(i, k)`` in ``parts``, by one gather."""
  widths = [struct.levels.widths[k] for _, k in parts]
  points = np.concatenate(
    [
      np.column_stack([np.full(n, k), np.full(n, i), np.arange(n)])
      for (i, k), n in zip(parts, widths, strict=True)
    ]
  )
  return jnp.split(entries(table, points), np.cumsum(widths)[:-1])


def stack_rows(
  struct: ChainStructure, vectors: Sequence[Array | None], fill: float, dtype
) -> Array:
  """Per-layer vectors (``None``: all ``fill``) as a ``(len(vectors), W)`` array."""
  width = struct.levels.width

  def row(x: Array | None) -> Array:
    if x is None:
      return jnp.full(width, fill, dtype)
    x = x.astype(dtype)
    if x.shape[0] == width:
      return x
    return jax.lax.pad(x, jnp.asarray(fill, dtype), [(0, width - x.shape[0], 0)])

  # Concatenated, not jnp.stack-ed: under jax.vmap over a stack axis sharded on an
  # Explicit mesh, stacking a copy's gathered row with a constant one is refused (their
  # shardings differ), concatenating them is not.
  return jnp.concatenate([row(x)[None] for x in vectors])


def rows_of(struct: ChainStructure, vectors: Sequence[Array | None], fill: float, dtype) -> PerNode:
  """Per-level vectors (``None``: all ``fill``, at that level's width), as the chain
  holds them: a list, or stacked into ``(len(vectors), W)``."""
  if not listed(struct):
    return stack_rows(struct, vectors, fill, dtype)
  widths = struct.levels.widths
  return [
    jnp.full(widths[k], fill, dtype) if x is None else x.astype(dtype)
    for k, x in enumerate(vectors)
  ]


def _step(y: Array, row: tuple[Array, Array, Array, Array]) -> tuple[Array, Array]:
  """One level of ``propagate`` (a module-level function, so that JAX traces and
  compiles the scan once per shape, also outside ``jit``)."""
  source, scale, shift, keep = row
  y = where(keep, scale * y[source], 0) + shift
  return y, y


def propagate(
  struct: ChainStructure,
  start: Array,
  sources: np.ndarray,
  scales: Sequence[Array | None] | None = None,
  shifts: PerNode | Sequence[Array | None] | None = None,
  keeps: np.ndarray | None = None,
  *,
  reverse: bool = False,
) -> PerNode:
  """Every level of a per-node recurrence along the chain.

  Row ``k`` of the tables (``sources``, ``keeps``: the chain's ``(L, W)`` index
  tables) and entry ``k`` of ``scales`` and ``shifts`` (one vector per layer, on
  the level it maps to; ``None``: a scale of 1, a shift of 0) map level ``k`` to
  level ``k + 1`` (level ``k + 1`` to level ``k`` when ``reverse``)::

      y_next[j] = (scales[k][j] * y[sources[k][j]] if keeps[k][j] else 0) + shifts[k][j]

  from ``start`` (level 0, or level ``L`` when ``reverse``, unpadded). ``None``
  for ``keeps`` keeps every node.

  Why a loop for a deep chain: each step is cheap elementwise work on a tiny
  vector, and XLA fuses such producers into every consumer, recomputing them
  there. Written out level by level, the pass over each layer's kernel would
  recompute the whole recurrence up to its level: a compiled program, and a
  compile time, quadratic in depth. The scan's body is compiled once and its
  output is one buffer that every consumer reads, whatever the fusion
  heuristics do.
  """
  if listed(struct):
    return _written_out(struct, start, sources, scales, shifts, keeps, reverse)
  steps, width = sources.shape
  dtype = start.dtype

  def table(x, fill: float) -> Array:
    """Per-layer vectors as a ``(L, W)`` table (``None``: all ``fill``)."""
    if x is None:
      return jnp.full((steps, width), fill, dtype)
    return x if isinstance(x, jax.Array) else stack_rows(struct, x, fill, dtype)

  keeps = np.ones((steps, width), bool) if keeps is None else keeps
  start = jax.lax.pad(start, jnp.zeros((), dtype), [(0, width - start.shape[0], 0)])
  rows = (jnp.asarray(sources), table(scales, 1), table(shifts, 0), jnp.asarray(keeps))
  _, ys = scan(_step, start, rows, reverse=reverse, unroll=steps <= UNROLLED_LEVELS)
  return jnp.concatenate([ys, start[None]] if reverse else [start[None], ys])


def _written_out(struct, start, sources, scales, shifts, keeps, reverse) -> list[Array]:
  """``propagate`` written out level by level, as a list of levels. Every skeleton
  index map is periodic (``j mod n``), so each step reads by tiling, not a gather."""
  widths, depth = struct.levels.widths, struct.depth
  ys: list[Array] = [start] * (depth + 1)
  y = start
  for k in reversed(range(depth)) if reverse else range(depth):
    n = widths[k] if reverse else widths[k + 1]
    y = _periodic_take(y, sources[k, :n])
    if scales is not None and scales[k] is not None:
      y = scales[k] * y
    if keeps is not None and not keeps[k, :n].all():
      y = where(keeps[k, :n], y, 0)
    if shifts is not None and shifts[k] is not None:
      y = y + shifts[k]
    ys[k if reverse else k + 1] = y
  return ys


def _periodic_take(y: Array, source: np.ndarray) -> Array:
  """``y[source]`` for a per-node index map known when tracing: by tiling where it is
  ``j mod len(y)`` (every skeleton map is), else one gather (the rows of the index tables
  where a map is undefined, at the chain's ends, hold 0: levels never read)."""
  if np.array_equal(source, np.arange(len(source)) % y.shape[0]):
    return periodic(y, len(source))
  return entries(y, np.asarray(source)[:, None])


def _periodic_fold(x: Array, target: np.ndarray, n: int) -> Array:
  """``x`` summed into ``n`` targets, entry ``a`` into ``target[a]``: by a reshape where
  the map is ``a mod n`` (every skeleton map is), else one scatter."""
  if np.array_equal(target, np.arange(len(target)) % n):
    pad = -len(target) % n
    if pad:
      x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, pad, 0)])
    return jnp.sum(x.reshape(-1, n), axis=0)
  return jax.ops.segment_sum(x, jnp.asarray(target), n)


# ----------------------------------------------------------------------------
# Chain products and basis-path values.


class SkeletonProducts(NamedTuple):
  """Skeleton-chain products of every node level, stacked ``(L + 1, W)``.

  ``back[k, j]``: product of incoming skeleton weights from an input to node j
  of level k (1 at level 0). ``forward[k, a]``: product of outgoing skeleton
  weights from node a of level k to an output (1 at level L). Level L of
  ``back`` and level 0 of ``forward`` are never used.
  """

  back: PerNode
  forward: PerNode
  # ``back`` and ``forward`` where not degenerate, else inf (``_usable``): filled in by
  # the inverse chain rule, which divides by them, for weight allocation to reuse.
  usable_back: PerNode | None = None
  usable_forward: PerNode | None = None


def _with_usable(products: SkeletonProducts) -> tuple[SkeletonProducts, PerNode, PerNode]:
  """``products`` with ``usable_back`` and ``usable_forward`` filled in, and those two."""
  back, forward = products.usable_back, products.usable_forward
  if back is None:
    back = per_level(_usable, products.back)
  if forward is None:
    forward = per_level(_usable, products.forward)
  return products._replace(usable_back=back, usable_forward=forward), back, forward


def skeleton_products(struct: ChainStructure, kernels: Sequence[Array], dtype) -> SkeletonProducts:
  """Back and forward skeleton-chain products, O(sum of widths) after the gathers."""
  if struct.stack is not None:
    one = lambda s, kernels: skeleton_products(s, kernels, dtype)
    return per_copy(struct, one, (STACK,), 0)(kernels)
  specs, depth, tables = struct.layers, struct.depth, struct.levels
  incoming = [
    incoming_skeleton(kernels[k], specs[k], defined(struct.pi[k])) for k in range(depth - 1)
  ]
  outgoing = [
    outgoing_skeleton(kernels[k], specs[k], defined(struct.sigma[k])) for k in range(1, depth)
  ]
  back = propagate(
    struct,
    jnp.ones(tables.widths[0], dtype),
    tables.down,
    [*(x.astype(dtype) for x in incoming), None],
  )
  forward = propagate(
    struct,
    jnp.ones(tables.widths[-1], dtype),
    tables.up,
    [None, *(x.astype(dtype) for x in outgoing)],
    reverse=True,
  )
  return SkeletonProducts(back, forward)


def basis_values(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  products: SkeletonProducts | None = None,
) -> tuple[list[Array], list[Array | None]]:
  """Basis-path values owned by every weight and bias; 0 on the fixed edges F.

  ``v_e = B[k][i] * w_e * F[k+1][j]`` for an edge ``i -> j`` of layer ``k`` and
  ``v_b = b_j * F[k+1][j]`` for a bias. ``products`` may be passed when
  already computed for these kernels.
  """
  if struct.stack is not None:
    return per_copy(struct, basis_values, (STACK, STACK, 0), (STACK, STACK))(
      kernels, biases, products
    )
  ct = compute_dtype(kernels[0].dtype)
  products = skeleton_products(struct, kernels, ct) if products is None else products
  values, bias_values = [], []
  for k, spec in enumerate(struct.layers):
    forward = level(products.forward, struct, k + 1)
    if spec.kind == "affine":  # every scale entry is in F
      values.append(jnp.zeros_like(kernels[k]))
    else:
      v = rows(level(products.back, struct, k), spec) * kernels[k].astype(ct) * cols(forward, spec)
      fixed = fixed_mask(spec, struct.pi[k])
      if fixed is not None:
        v = where(fixed, 0, v)
      values.append(v.astype(kernels[k].dtype))
    b = biases[k]
    bias_values.append(
      None if b is None else (b.astype(ct) * at_bias(forward, spec)).astype(b.dtype)
    )
  return values, bias_values


# ----------------------------------------------------------------------------
# Normalized outputs: N^2 per output node.


def _scatter_step(y: Array, row: tuple[Array, Array, Array]) -> tuple[Array, None]:
  """One level of ``_at_outputs``' sum: every node adds ``y`` into its skeleton
  target (module level, so that the scan compiles once per shape)."""
  target, keep, own = row
  y = jnp.zeros_like(y).at[target].add(where(keep, y, 0)) + own
  return y, None


def normalized_norms(
  struct: ChainStructure, kernels: Sequence[Array], biases: Sequence[Array | None]
) -> Array:
  """``N^2`` of every output node of a normalized chain (``(S, n_out)`` for a stack)."""
  if struct.stack is not None:
    return per_copy(struct, normalized_norms, (STACK, STACK), 0)(kernels, biases)
  products = skeleton_products(struct, kernels, compute_dtype(kernels[0].dtype))
  return output_sums(struct, kernels, biases, products)


def read_back(struct: ChainStructure, at_outputs: Array) -> PerNode:
  """A per-output-node quantity read back along the skeleton chains: level ``k`` holds, for
  each node of level ``k``, the value of the output node its forward chain ends at."""
  return propagate(struct, at_outputs, struct.levels.up, reverse=True)


def output_sums(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  products: SkeletonProducts,
) -> Array:
  """``N^2`` of every output node of a normalized chain.

  ``N_k^2`` sums the squared values of the owned paths ending at output node
  ``k`` (docs/math.md, normalized outputs): a node's own paths (its incoming
  edges outside F and its bias, each ``v = B w F``) end where its forward chain
  ends, so the per-node sums are carried forward along the skeleton targets
  like ``P`` in the inverse chain rule, and ``N^2`` is read back along the same
  chains. One extra reduction per kernel (of ``(B w)^2``).

  Returns:
    ``N^2`` per output node (``read_back`` gives every node its chain's).
  """
  ct = _dtype(products.back)
  own = []  # per layer k, on level k + 1: sum of v^2 of the paths owned by its edges
  for k, spec in enumerate(struct.layers):
    # v = B w F: the squares of B w summed per node, times F^2 once per node.
    weighted = None
    if spec.kind != "affine":
      weighted = rows(level(products.back, struct, k), spec) * kernels[k].astype(ct)
    b = biases[k]
    bias = None if b is None else b.astype(ct)
    total = _owned_square_sums(struct, k, weighted, bias, ct)
    own.append(total * jnp.square(level(products.forward, struct, k + 1)))
  return _at_outputs(struct, own, ct)


def _owned_square_sums(
  struct: ChainStructure, k: int, values: Array | None, bias_values: Array | None, dtype
) -> Array:
  """Per node of level ``k + 1``: the sum of the squares of the values of the paths layer
  ``k``'s edges own, given per kernel entry (``values``; None for an affine layer, whose
  scale entries are all in F) and per bias entry. An entry fixed by the skeleton owns no
  path."""
  spec = struct.layers[k]
  if values is None:
    total = jnp.zeros(spec.n_out, dtype)
  else:
    squares = jnp.square(values)
    fixed = fixed_mask(spec, struct.pi[k])
    if fixed is not None:
      squares = where(fixed, 0, squares)
    total = per_output(squares, spec)
  if bias_values is not None:  # any shape of the bias: summed per output node
    total = total + fold_outputs(jnp.square(bias_values), spec)
  return total


def _at_outputs(struct: ChainStructure, own: Sequence[Array], dtype) -> Array:
  """Per-node sums of the paths each node owns (``own[k]`` on level ``k + 1``) carried
  forward along the skeleton targets to the output node each forward chain ends at: the
  sums per output node (level ``L``)."""
  tables = struct.levels
  if listed(struct):
    at = own[0].astype(dtype)  # level 0 has no hidden nodes: nothing is carried from it
    for k in range(1, struct.depth):
      at = _periodic_fold(at, defined(struct.sigma[k]), tables.widths[k + 1]) + own[k]
    return at
  rows_ = (jnp.asarray(tables.up), jnp.asarray(tables.hidden), stack_rows(struct, own, 0, dtype))
  at_outputs, _ = scan(
    _scatter_step,
    jnp.zeros(tables.width, dtype),
    rows_,
    unroll=struct.depth <= UNROLLED_LEVELS,
  )
  return at_outputs[: tables.widths[-1]]


# ----------------------------------------------------------------------------
# Inverse chain rule.


def node_sums(
  spec: LayerSpec, kernel: Array, grad: Array, bias: Array | None, bias_grad: Array | None, dtype
) -> Array:
  """``sum_{taps, i} (w g)[., i, j] + b_j g_bj`` per output node ``j``, in ``dtype``.

  The derivative of the loss along rescaling node ``j``'s incoming weights and
  bias: the one full reduction of the inverse chain rule (a scale probe's
  ``s * dL/ds`` equals it).
  """
  total = per_output(kernel.astype(dtype) * grad.astype(dtype), spec)
  if bias is not None and bias_grad is not None:
    total += fold_outputs(bias.astype(dtype) * bias_grad.astype(dtype), spec)
  return total


class PathGradients(NamedTuple):
  """Output of ``inverse_chain_rule``: path-space gradients and what WA reuses."""

  kernels: list[Array]  # dL/dv, shaped like each kernel, 0 on F (times N^2 if normalized)
  biases: list[Array | None]
  products: SkeletonProducts
  output_norms: Array | None = None  # a normalized chain's N^2 per output node
  # A normalized chain's N^2 (over the rate norm, with the implicit decay) of the output
  # each node's forward chain ends at, a per-node quantity as ``read_back`` returns it;
  # what the gradients above were multiplied by.
  end_norms: PerNode | None = None


def inverse_chain_rule(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_grads: Sequence[Array],
  bias_grads: Sequence[Array | None],
  probe_sums: Sequence[Array | None] | None = None,
  rate_norms: Array | None = None,
) -> PathGradients:
  """Basis-path gradients from weight gradients (docs/math.md).

  With ``u_p = v_p * dL/dv_p`` (the path's share of ``w * g``)::

      u_e = w_e g_e - [e = (a -> sigma(a)) outgoing skeleton] * P[k][a]
      P[k+1][j] = sum_{i, taps} (w g)[., i, j] - (w g)[centre, pi(j), j]
                  + b_j g_bj + [sigma(pi(j)) = j] * P[k][pi(j)]

  ``P[k][a]`` totals ``u`` over paths whose forward chain passes through node a.
  Dividing by ``v = B w F`` gives ``dL/dv_e = g_e / (B[k][i] F[k+1][j])`` minus,
  on outgoing skeleton edges, ``P[k][a] / (B[k][a] F[k][a])``; no weight is
  ever a divisor, only chain products.

  ``probe_sums[k]``, where given, is layer ``k``'s ``node_sums`` obtained
  elsewhere (a scale probe's ``s * dL/ds``, see ``gsgd_jax.probes``); it
  replaces the only full reduction of layer ``k``.

  ``rate_norms``, where given (a normalized chain's implicit decay), is a positive
  number per output node that the gradients of the paths ending there are divided
  by, after their multiplication by ``N^2``.
  """
  if one_hidden_level(struct):
    numerators, divisors = hidden_level_quotients(
      struct, kernels, biases, kernel_grads, bias_grads, probe_sums
    )
    (columns,), _ = divide_together([(numerators, divisors)])
    return path_gradients_from(struct, kernel_grads, bias_grads, columns)
  if struct.stack is not None:
    out = (STACK, STACK, 0, 0, 0)
    return PathGradients(
      *per_copy(struct, lambda *a: tuple(inverse_chain_rule(*a)), (STACK,) * 5 + (0,), out)(
        kernels, biases, kernel_grads, bias_grads, probe_sums, rate_norms
      )
    )
  ct = compute_dtype(kernels[0].dtype)
  specs = struct.layers
  sums = _node_sums_of(struct, kernels, biases, kernel_grads, bias_grads, probe_sums, ct)
  # Each hidden node's own term of P: its sum less its incoming skeleton edge's w g.
  own = [
    p
    - incoming_skeleton(kernels[k], specs[k], defined(struct.pi[k])).astype(ct)
    * incoming_skeleton(kernel_grads[k], specs[k], defined(struct.pi[k])).astype(ct)
    for k, p in enumerate(sums)
  ]
  factors, products, norms, ends = _level_factors(struct, kernels, biases, own, rate_norms, ct)
  grads, bias_grads_v = _path_gradient_passes(struct, kernel_grads, bias_grads, factors, ct)
  return PathGradients(grads, bias_grads_v, products, norms, ends)


def _node_sums_of(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_grads: Sequence[Array],
  bias_grads: Sequence[Array | None],
  probe_sums: Sequence[Array | None] | None,
  ct,
) -> list[Array]:
  """Each hidden node's sum (``node_sums``, or its probe's): the derivative along
  rescaling its incoming weights and bias."""
  sums = []
  for k in range(struct.depth - 1):
    probe_sum = None if probe_sums is None else probe_sums[k]
    if probe_sum is not None:
      sums.append(fold_outputs(probe_sum.astype(ct), struct.layers[k]))
    else:
      spec = struct.layers[k]
      sums.append(node_sums(spec, kernels[k], kernel_grads[k], biases[k], bias_grads[k], ct))
  return sums


def _path_gradient_passes(
  struct: ChainStructure,
  kernel_grads: Sequence[Array],
  bias_grads: Sequence[Array | None],
  factors: Sequence[Sequence[Array]],
  ct,
) -> tuple[list[Array], list[Array | None]]:
  """The passes over every kernel and bias of the inverse chain rule, given each layer's
  per-node factors ``(1 / B, 1 / F[, carried])``."""
  grads, bias_grads_v = [], []
  for k, spec in enumerate(struct.layers):
    out = free_outgoing_mask(struct, k)
    inv_back_k, inv_fwd_k, *carried_k = factors[k]
    gb = bias_grads[k]
    bias_grads_v.append(
      None if gb is None else (gb.astype(ct) * at_bias(inv_fwd_k, spec)).astype(gb.dtype)
    )
    if spec.kind == "affine":  # every scale entry is in F
      grads.append(jnp.zeros_like(kernel_grads[k]))
      continue
    gv = kernel_grads[k].astype(ct) * rows(inv_back_k, spec) * cols(inv_fwd_k, spec)
    if out is not None:
      gv -= where(out, rows(carried_k[0], spec), 0)
    fixed = fixed_mask(spec, struct.pi[k])
    if fixed is not None:
      gv = where(fixed, 0, gv)
    grads.append(gv.astype(kernel_grads[k].dtype))
  return grads, bias_grads_v


def _level_factors(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  own: Sequence[Array],
  rate_norms: Array | None,
  ct,
) -> tuple[list[list[Array]], SkeletonProducts, Array | None, PerNode | None]:
  """The inverse chain rule's per-node factors of every layer (``(1 / B, 1 / F)`` and,
  where the layer has outgoing skeleton edges outside F, ``carried``), from each hidden
  node's own term of ``P``; with the skeleton products and, for a normalized chain,
  ``N^2`` per output node and per node (see ``PathGradients``)."""
  depth, tables = struct.depth, struct.levels
  products = skeleton_products(struct, kernels, ct)
  p_levels = propagate(
    struct,
    jnp.zeros(tables.widths[0], ct),
    tables.down,
    shifts=[*own, None],
    keeps=tables.loops_back,
  )
  products, usable_back, usable_fwd = _with_usable(products)

  norms = ends = None
  fwd_numerator: PerNode | float = 1.0
  if struct.normalized:
    # Every path's gradient times N^2 of the output node its forward chain ends at (over
    # its rate norm, with the implicit decay).
    norms = output_sums(struct, kernels, biases, products)
    ends = norms if rate_norms is None else norms / _divisor(rate_norms.astype(ct))
    ends = read_back(struct, ends)
    fwd_numerator = ends
    p_levels = per_level(jnp.multiply, p_levels, ends)

  # The kernels' factors 1 / B, 1 / F (times the ends' N^2) and
  # carried[k][a] = P[k][a] / (B[k][a] F[k][a]) (times N^2), all 0 where a chain is
  # degenerate; read together, so that every layer's pass comes after all node sums
  # (see `read_quotients`).
  parts = [
    [(0, k), (1, k + 1)] + ([] if outgoing_all_fixed(struct, k) else [(2, k)]) for k in range(depth)
  ]
  numerators = [1.0, fwd_numerator, p_levels]
  divisors = [usable_back, usable_fwd, per_level(jnp.multiply, usable_back, usable_fwd)]
  hidden = range(1, depth)
  if listed(struct):
    # The hidden levels' products, raw and usable, are read out of the same program (over
    # 1), for the passes that read them later (basis values, weight allocation): a gather
    # of skeleton weights that one program reads is fused into it, one that several read
    # costs a program of its own and another to transpose its result (XLA:CPU).
    ones = per_level(jnp.ones_like, usable_back)
    numerators += [products.back, products.forward, usable_back, usable_fwd]
    divisors += [ones] * 4
    parts = [*parts, [(i, k) for k in hidden for i in range(3, 7)]]
  factors, _ = read_quotients(struct, numerators, divisors, parts)
  if listed(struct):
    *factors, read = factors
    held = (products.back, products.forward, usable_back, usable_fwd)
    levels = [cast(list, q).copy() for q in held]
    for n, (k, i) in enumerate((k, i) for k in hidden for i in range(4)):
      levels[i][k] = read[n]
    products = SkeletonProducts(*levels)
  return factors, products, norms, ends


def invariant_sq_norm(
  struct: ChainStructure,
  grads: Sequence[Array],
  bias_grads: Sequence[Array | None],
  end_norms: PerNode | None,
) -> Array:
  """The squared norm of a chain's path gradients, measured so that it does not change
  under the symmetries of the chain: the sum of their squares, and in a normalized
  chain, whose gradients of the paths ending at output node ``k`` are ``N_k^2 dL/dv``
  (over ``rho_k`` with the implicit decay), the sum of their squares over ``end_norms``,
  ``(N_k dL/dv)^2`` (over ``rho_k``): ``N_k |dL/dv_k|`` is the same under the output
  rescaling the BatchNorm absorbs (docs/math.md, normalization layers). One reduction
  per kernel (per column: every path of a column ends at one output node).
  """
  if struct.stack is not None:
    copies = per_copy(struct, invariant_sq_norm, (STACK, STACK, 0), 0)(grads, bias_grads, end_norms)
    return jnp.sum(copies)
  ct = compute_dtype(grads[0].dtype)
  total = jnp.zeros((), ct)
  for k, spec in enumerate(struct.layers):
    # 1 / N_k per column, before squaring: (N^2 g)^2 / N^2 could overflow where N^2 g
    # itself does not.
    scale = None
    if end_norms is not None:
      scale = jax.lax.rsqrt(_divisor(level(end_norms, struct, k + 1)))
    if spec.kind == "affine":  # every scale entry is in F: only biases own paths
      per_node = jnp.zeros(spec.n_out, ct)
    else:
      g = grads[k].astype(ct) if scale is None else grads[k].astype(ct) * cols(scale, spec)
      per_node = per_output(jnp.square(g), spec)
    b = bias_grads[k]
    if b is not None:
      gb = b.astype(ct) if scale is None else b.astype(ct) * at_bias(scale, spec)
      per_node = per_node + fold_outputs(jnp.square(gb), spec)
    total = total + jnp.sum(per_node)
  return total


# ----------------------------------------------------------------------------
# Chains with one hidden level.


def one_hidden_level(struct: ChainStructure) -> bool:
  """A two-layer chain whose outputs feed no normalization (a transformer's feed-forward
  and attention chains): its per-node work is on its one hidden level, the ends being
  constants (``B = 1`` on the inputs, ``F = 1`` and ``Q = 1`` on the outputs), and is
  traced as those few vectors (``hidden_level_quotients``, ``allocation_quotients``)
  rather than level by level. The level-generic form traces the constant levels too: the
  LLaMA-style decoder's update traced 1312 primitives instead of 923 (AdamW's alone: 214),
  and tracing and lowering them was a sizeable part of what the blocks add to
  compiling a train step (benchmarks/RESULTS.md, speed of the LLaMA-style decoder). Both
  forms compute the same values, up to rounding (tests/test_basis.py). Each ends in one
  division, which ``gsgd_jax._src.all_blocks`` does for all such chains together.
  """
  return struct.depth == 2 and not struct.normalized


def hidden_level_quotients(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_grads: Sequence[Array],
  bias_grads: Sequence[Array | None],
  probe_sums: Sequence[Array | None] | None = None,
) -> tuple[list[Array], list[Array]]:
  """The inverse chain rule of a chain with one hidden level (``one_hidden_level``), up
  to its one division: the numerators and divisors of the hidden nodes' factors
  (``divide_together`` divides them, ``path_gradients_from`` finishes), per copy of a
  stacked chain on a leading axis."""
  if struct.stack is not None:
    fn = hidden_level_quotients
    return per_copy(struct, fn, (STACK,) * 5, 0)(
      kernels, biases, kernel_grads, bias_grads, probe_sums
    )
  ct = compute_dtype(kernels[0].dtype)
  (sums,) = _node_sums_of(struct, kernels, biases, kernel_grads, bias_grads, probe_sums, ct)
  specs = struct.layers
  pi = defined(struct.pi[0])
  back = incoming_skeleton(kernels[0], specs[0], pi).astype(ct)
  own_skeleton = back * incoming_skeleton(kernel_grads[0], specs[0], pi).astype(ct)
  forward = outgoing_skeleton(kernels[1], specs[1], defined(struct.sigma[1])).astype(ct)
  usable_back, usable_fwd = _usable(back), _usable(forward)
  ones = jnp.ones_like(back)
  # 1 / B, 1 / F, carried = P / (B F) and, over 1, the skeleton weights for the passes that
  # read them later: one division, read together (see `_level_factors`, `read_quotients`).
  # P, the node sum less the incoming skeleton edge's w g, is divided term by term: with
  # the difference taken first, XLA:CPU fused it into the node sums' reduction or read the
  # skeleton weights in two layouts, and gave their gathers programs of their own (one to
  # three per block); divided apart, every gather fuses into this division's program.
  path_value = usable_back * usable_fwd
  numerators = [ones, ones, sums, own_skeleton, back, forward, usable_back, usable_fwd]
  divisors = [usable_back, usable_fwd, path_value, path_value, ones, ones, ones, ones]
  return numerators, divisors


def path_gradients_from(
  struct: ChainStructure,
  kernel_grads: Sequence[Array],
  bias_grads: Sequence[Array | None],
  quotients: Sequence[Array],
) -> PathGradients:
  """The inverse chain rule of a chain with one hidden level, from the quotients of
  ``hidden_level_quotients``."""
  if struct.stack is not None:
    out = (STACK, STACK, 0, 0, 0)
    fn = lambda *a: tuple(path_gradients_from(*a))
    return PathGradients(
      *per_copy(struct, fn, (STACK, STACK, 0), out)(kernel_grads, bias_grads, list(quotients))
    )
  ct = quotients[0].dtype
  specs = struct.layers
  inv_back, inv_fwd, summed, skeleton_term, *held = quotients
  carried = summed - skeleton_term
  inputs, outputs = jnp.ones(specs[0].n_in, ct), jnp.ones(specs[1].n_out, ct)
  factors = [[inputs, inv_fwd], [inv_back, outputs, carried]]
  grads, bias_grads_v = _path_gradient_passes(struct, kernel_grads, bias_grads, factors, ct)
  # Levels 0..2; the ends are never read but for B = 1 on the inputs and F = 1 on the
  # outputs, which every end holds.
  back_, forward_, usable_back_, usable_fwd_ = ([inputs, x, outputs] for x in held)
  products = SkeletonProducts(back_, forward_, usable_back_, usable_fwd_)
  return PathGradients(grads, bias_grads_v, products)


def divide_together(
  requests: Sequence[tuple[Sequence[Array], Sequence[Array]]],
) -> tuple[list[list[Array]], list[Array]]:
  """``numerators[i] / divisors[i]`` for every ``(numerators, divisors)`` of ``requests``
  (per-node vectors; a stacked chain's with its copies on a leading axis), in as few
  divisions as there are dtypes and numbers of copies; with the tables those divisions
  wrote, ``(..., nodes, quantities)``.

  XLA:CPU compiles a division that passes over kernels read as a program of its own, and
  every program costs about as much to compile as the next: the divisions of all the
  blocks of the LLaMA-style decoder, together, are one program for the inverse chain rule
  and one for weight allocation, not one each per block (benchmarks/RESULTS.md, speed of
  the LLaMA-style decoder; tests/test_basis.py counts the programs). The quantities are
  stacked on a last axis and the requests' nodes concatenated on the axis before it, so
  that each request's quantities are slices of the table in the shape they are read, which
  fuse into the passes that read them (a part flattened first was copied out), and a sum
  of one quantity can read the table whole (see ``transform._count``). Divided apart:
  requests of different numbers of quantities, and vectors on an Explicit mesh (a block
  sharded over its copies keeps its per-node vectors sharded so).
  """
  numerators = [_stacked(n, axis=-1) for n, _ in requests]
  divisors = [_stacked(d, axis=-1) for _, d in requests]
  meshed = any(_explicit_mesh(t) is not None for t in numerators + divisors)
  if len({t.shape[-1] for t in numerators}) > 1 or meshed:
    tables = [n / d for n, d in zip(numerators, divisors, strict=True)]
    return [_columns(t) for t in tables], tables
  # Grouped by dtype and by the copies' axes before the nodes (a stack's), concatenated on
  # the nodes: the blocks' parts are then slices of the table, in the shape they are read.
  groups: dict[tuple, list[int]] = {}
  for i, (n, d) in enumerate(zip(numerators, divisors, strict=True)):
    groups.setdefault((jnp.result_type(n, d), n.shape[:-2]), []).append(i)
  columns: list[list[Array]] = [[] for _ in requests]
  tables = []
  for group in groups.values():
    table = jnp.concatenate([numerators[i] for i in group], axis=-2) / jnp.concatenate(
      [divisors[i] for i in group], axis=-2
    )
    tables.append(table)
    start = 0
    for i in group:
      size = numerators[i].shape[-2]
      columns[i] = _columns(jax.lax.slice_in_dim(table, start, start + size, axis=table.ndim - 2))
      start += size
  return columns, tables


def _columns(table: Array) -> list[Array]:
  """The quantities of a ``(..., quantities)`` table."""
  last = table.ndim - 1
  return [jax.lax.index_in_dim(table, i, last, keepdims=False) for i in range(table.shape[-1])]


def allocation_quotients(
  struct: ChainStructure,
  kernel_steps: Sequence[Array],
  products: SkeletonProducts,
  ratio_clip: tuple[float, float] | None,
) -> tuple[list[Array], list[Array]]:
  """Weight allocation of a chain with one hidden level (``one_hidden_level``), up to its
  one division: the numerators and divisors of the hidden nodes' factors
  (``divide_together`` divides them, ``allocation_from`` finishes), per copy of a stacked
  chain on a leading axis. Without renormalization: each hidden node's ``Q`` is the ratio
  of its outgoing skeleton path, and the outputs' ``Q`` is 1."""
  if struct.stack is not None:
    fn = functools.partial(allocation_quotients, ratio_clip=ratio_clip)
    return per_copy(struct, fn, (STACK, 0), 0)(kernel_steps, products)
  specs = struct.layers
  _, usable_back, usable_fwd = _with_usable(products)
  usable_back, usable_fwd = usable_back[1], usable_fwd[1]
  ct = usable_back.dtype
  step = outgoing_skeleton(kernel_steps[1], specs[1], defined(struct.sigma[1])).astype(ct)
  inv_path_value = 1 / (usable_back * usable_fwd)  # 0 on a degenerate chain
  ratio = 1 + step * inv_path_value
  ones = jnp.ones_like(ratio)
  moved = []
  if ratio_clip is not None:
    clipped = _clipped_ratio(ratio, *ratio_clip)
    moved = [(jnp.isfinite(ratio) & (clipped != ratio)).astype(ct)]
    ratio = clipped
  # 1/Q - 1, 1 / (Q F), 1 / B and the skeleton steps (R - 1) B F, per hidden node (and
  # the moved ratios, over 1: counted from the same program, see `_level_allocation`).
  numerators = [1 - ratio, ones, ones, ratio - 1, *moved]
  divisors = [
    ratio,
    ratio * usable_fwd,
    usable_back,
    _divisor(inv_path_value),
    *[ones] * len(moved),
  ]
  return numerators, divisors


def allocation_from(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_steps: Sequence[Array],
  bias_steps: Sequence[Array | None],
  quotients: Sequence[Array],
) -> tuple[list[Array], list[Array | None]]:
  """Weight updates of a chain with one hidden level, from the quotients of
  ``allocation_quotients``."""
  if struct.stack is not None:
    in_axes = (STACK, STACK, STACK, STACK, 0)
    return per_copy(struct, allocation_from, in_axes, (STACK, STACK))(
      kernels, biases, kernel_steps, bias_steps, list(quotients)
    )
  specs = struct.layers
  shrink, inv_fwd, inv_back, skeleton_steps = quotients[:4]
  ct = shrink.dtype
  inputs, outputs = jnp.ones(specs[0].n_in, ct), jnp.ones(specs[1].n_out, ct)
  factors = [
    [shrink, inv_fwd, inputs],
    [jnp.zeros_like(outputs), outputs, inv_back, skeleton_steps],
  ]
  return _allocation_passes(struct, kernels, biases, kernel_steps, bias_steps, factors, None, ct)


# ----------------------------------------------------------------------------
# Weight allocation.


# Bounds of the skeleton path ratios that become divisors (see weight_allocation).
DEFAULT_RATIO_CLIP = (0.1, 10.0)


def norm_ratio(new: Array, old: Array) -> Array:
  """``new / old`` per output node, for two values of ``N^2``; 1 where either is zero or
  not finite."""
  ok = (new > 0) & (old > 0) & jnp.isfinite(new) & jnp.isfinite(old)
  return where(ok, where(ok, new, 1) / where(ok, old, 1), 1)


def _renormalizing_scales(target: Array, now: Array) -> Array:
  """``sqrt(target / now)`` per output node: the rescaling that brings ``N^2`` to
  ``target``; 1 where either is zero or not finite."""
  return jnp.sqrt(norm_ratio(target, now))


def _landed_norms(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_steps: Sequence[Array],
  bias_steps: Sequence[Array | None],
  products: SkeletonProducts,
  skeleton_steps: PerNode,
) -> Array:
  """``N'^2`` per output node: the sum of the squares of the values the paths ending
  there land on, ``v + dv`` (a clipped skeleton path: ``R v``, its step in
  ``skeleton_steps``, a per-node quantity)."""
  ct = _dtype(products.back)
  own = []
  for k, spec in enumerate(struct.layers):
    forward = level(products.forward, struct, k + 1)
    landed = None
    if spec.kind != "affine":
      dv = kernel_steps[k].astype(ct)
      out = free_outgoing_mask(struct, k)
      if out is not None:
        dv = where(out, rows(level(skeleton_steps, struct, k), spec), dv)
      v = rows(level(products.back, struct, k), spec) * kernels[k].astype(ct) * cols(forward, spec)
      landed = v + dv
    b, db = biases[k], bias_steps[k]
    landed_bias = None
    if b is not None and db is not None:
      landed_bias = b.astype(ct) * at_bias(forward, spec) + db.astype(ct)
    own.append(_owned_square_sums(struct, k, landed, landed_bias, ct))
  return _at_outputs(struct, own, ct)


def weight_allocation(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_steps: Sequence[Array],
  bias_steps: Sequence[Array | None],
  products: SkeletonProducts,
  ratio_clip: tuple[float, float] | None,
  target_norms: Array | None = None,
) -> tuple[list[Array], list[Array | None], Array, Array | None]:
  """Weight updates that move every basis path from ``v`` to ``v + dv`` (docs/math.md).

  F stays fixed. Node ratios ``Q`` come from the outgoing skeleton paths::

      Q[L] = 1;  Q[k][a] = R(a -> sigma(a)) = 1 + dv / (B[k][a] F[k][a])
                 (or Q[k+1][sigma(a)] where that edge is in F)
      w_new = w R_e / Q[k+1][j] = (w + dv_e / (B[k][i] F[k+1][j])) / Q[k+1][j]

  The additive form needs no division by ``v``, so zero weights and biases move
  exactly. The magnitudes of the finite ratios ``R`` that become divisors ``Q``
  are clipped to ``ratio_clip``, their signs kept, so a step that would shrink a
  skeleton path to zero cannot produce infinite weights, and one that would carry
  it across zero does (its skeleton weight changes sign); only the clipped paths
  then miss ``v + dv`` (every other path still lands on it). A NaN or infinite
  ratio (from a non-finite gradient or step) is not clipped: the update is not
  finite either.

  ``target_norms``, where given (a normalized chain's renormalization), is an
  ``N^2`` per output node: after the step, the incoming weights and bias of each
  output node are multiplied by ``sqrt(target / N'^2)``, ``N'^2`` the sum of the
  squared values the paths ending there land on, so that ``N'^2`` lands on the
  target exactly (an element of the output rescaling the BatchNorm absorbs). The
  landed sums take one more reduction per kernel, over ``B w F + dv``.

  Returns:
    ``(kernel_updates, bias_updates, clipped, landed_norms)``: ``clipped`` holds a 1 per
    clipped ratio and zeros (one per other node, or more), a vector to be summed (in one
    sum with other blocks': XLA:CPU compiles each sum as programs of its own);
    ``landed_norms`` is ``N'^2`` per output node before the renormalization, where
    ``target_norms`` is given, else None.
  """
  if one_hidden_level(struct):
    numerators, divisors = allocation_quotients(struct, kernel_steps, products, ratio_clip)
    (quotients,), (table,) = divide_together([(numerators, divisors)])
    updates, bias_updates = allocation_from(
      struct, kernels, biases, kernel_steps, bias_steps, quotients
    )
    moved = jnp.zeros(0, table.dtype) if ratio_clip is None else table[..., -1].reshape(-1)
    return updates, bias_updates, moved, None
  allocate = functools.partial(_allocate, ratio_clip=ratio_clip)
  in_axes = (STACK, STACK, STACK, STACK, 0, 0)
  updates, bias_updates, clipped, landed = per_copy(
    struct, allocate, in_axes, (STACK, STACK, 0, 0)
  )(kernels, biases, kernel_steps, bias_steps, products, target_norms)
  return updates, bias_updates, clipped.reshape(-1), landed


def _clipped_ratio(r: Array, low: float, high: float) -> Array:
  """A skeleton path's ratio ``r`` with its magnitude clipped to ``[low, high]``, its sign
  kept.

  A non-finite ratio comes from a non-finite gradient or step: it stays as it is, so
  that the update is not finite either (optax.apply_if_finite then skips it) rather than
  a finite step that silently leaves that path where it was. A path asked to cross zero
  crosses it (its skeleton weight changes sign, as SGD's would) but lands no nearer to
  zero than ``low * |v|``. Clipped at ``+low`` instead, a path pushed across zero step
  after step shrank geometrically, and every path through its node with it needed
  weights that grow as ``1 / F`` (a norm's bias, in deep BatchNorm nets at lr 1.0:
  benchmarks/RESULTS).
  """
  magnitude = jnp.minimum(jnp.maximum(jnp.abs(r), low), high)  # jnp.clip is a jitted call
  return where(jnp.isfinite(r), where(r < 0, -magnitude, magnitude), r)


def _level_allocation(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_steps: Sequence[Array],
  bias_steps: Sequence[Array | None],
  products: SkeletonProducts,
  target_norms: Array | None,
  ratio_clip: tuple[float, float] | None,
  ct,
) -> tuple[list[list[Array]], Array | None, Array | None, Array | None]:
  """Weight allocation's per-node factors of every layer (``1 / Q - 1``, ``1 / (Q F)``,
  ``1 / B`` and, where the layer has outgoing skeleton edges outside F, their steps);
  with the clipped ratios (1 per moved ratio, a vector to sum; None without
  ``ratio_clip``) and, for a normalized chain's renormalization, the scales of its
  outputs and ``N'^2`` (see ``weight_allocation``)."""
  specs, depth, tables = struct.layers, struct.depth, struct.levels
  # A ratio is used only where its outgoing edge is outside F (see free_outgoing_mask).
  outgoing_steps = [
    None
    if outgoing_all_fixed(struct, k)
    else outgoing_skeleton(kernel_steps[k], specs[k], defined(struct.sigma[k]))
    for k in range(1, depth)
  ]
  # Per level 0..L-1 (level 0 has no skeleton paths out: R = 1 there).
  dv_out = rows_of(struct, [None, *outgoing_steps], 0, ct)
  products, usable_back, usable_fwd = _with_usable(products)
  inv_path_value = per_level(  # 0 on a degenerate chain
    lambda b, f: 1 / (b * f), usable_back[:-1], usable_fwd[:-1]
  )
  ratio = per_level(lambda dv, inv: 1 + dv * inv, dv_out, inv_path_value)
  moved_numerator: PerNode | None = None
  hidden, out_fixed = level_masks(struct, "hidden"), level_masks(struct, "out_fixed")
  if ratio_clip is not None:
    low, high = ratio_clip

    def is_moved(r, clipped, hidden, out_fixed):  # 1 where a ratio used as a divisor moved
      return (hidden & ~out_fixed & jnp.isfinite(r) & (clipped != r)).astype(r.dtype)

    clipped = per_level(lambda r: _clipped_ratio(r, low, high), ratio)
    moved_numerator = _padded_level(
      struct, per_level(is_moved, ratio, clipped, hidden, out_fixed), 0.0
    )
    ratio = clipped
  # The skeleton edge takes the step its ratio stands for (clipped, or 0 on a
  # degenerate chain), or the forward chain through it would not be rescaled
  # by exactly Q: (R - 1) / inv_path_value, per level 0..L (level L, never read, pads
  # the table with 0 / 1).
  step_numerator = _padded_level(struct, per_level(lambda r: r - 1, ratio), 0.0)
  step_divisor = _padded_level(struct, per_level(_divisor, inv_path_value), 1.0)
  # Q[k][a] = R(a -> sigma(a)), or Q[k+1][sigma(a)] where that edge is in F;
  # level 0 gets R = 1 and is never used.
  q = propagate(
    struct,
    jnp.ones(tables.widths[-1], ct),
    tables.up,
    shifts=per_level(lambda fixed, r: where(fixed, 0, r), out_fixed, ratio),
    keeps=tables.out_fixed,
    reverse=True,
  )
  output_scales = landed = None
  if target_norms is not None:
    steps = per_level(jnp.divide, step_numerator, step_divisor)
    landed = _landed_norms(struct, kernels, biases, kernel_steps, bias_steps, products, steps)
    output_scales = _renormalizing_scales(target_norms.astype(ct), landed)
  parts = [
    [(0, k + 1), (1, k + 1), (2, k)] + ([] if outgoing_all_fixed(struct, k) else [(3, k)])
    for k in range(depth)
  ]
  numerators = [per_level(lambda q: 1 - q, q), 1.0, 1.0, step_numerator]
  divisors = [
    q,
    per_level(jnp.multiply, q, usable_fwd),
    usable_back,
    step_divisor,
  ]
  # The clipped ratios are counted from the same program (1 / 1 per moved ratio): a
  # count of its own would need the ratios in a second program, and the division
  # behind them in a third.
  summed = None
  if moved_numerator is not None:
    counted = [k for k in range(depth) if (tables.hidden[k] & ~tables.out_fixed[k]).any()]
    numerators.append(moved_numerator)
    divisors.append(per_level(jnp.ones_like, step_divisor))
    summed = (len(divisors) - 1, counted)
  # 1/Q - 1, 1 / (Q F), 1 / B and the skeleton steps, per node (and the moved ratios).
  factors, num_moved = read_quotients(struct, numerators, divisors, parts, summed)
  return factors, num_moved, output_scales, landed


def _allocate(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_steps: Sequence[Array],
  bias_steps: Sequence[Array | None],
  products: SkeletonProducts,
  target_norms: Array | None,
  *,
  ratio_clip: tuple[float, float] | None,
) -> tuple[list[Array], list[Array | None], Array, Array | None]:
  """``weight_allocation`` of one copy of a chain with more than one hidden level or
  normalized outputs."""
  ct = compute_dtype(kernels[0].dtype)
  factors, num_moved, output_scales, landed = _level_allocation(
    struct, kernels, biases, kernel_steps, bias_steps, products, target_norms, ratio_clip, ct
  )
  updates, bias_updates = _allocation_passes(
    struct, kernels, biases, kernel_steps, bias_steps, factors, output_scales, ct
  )
  return updates, bias_updates, jnp.zeros(0, ct) if num_moved is None else num_moved, landed


def _allocation_passes(
  struct: ChainStructure,
  kernels: Sequence[Array],
  biases: Sequence[Array | None],
  kernel_steps: Sequence[Array],
  bias_steps: Sequence[Array | None],
  factors: Sequence[Sequence[Array]],
  output_scales: Array | None,
  ct,
) -> tuple[list[Array], list[Array | None]]:
  """The passes over every kernel and bias of weight allocation, given each layer's
  per-node factors ``(1/Q - 1, 1 / (Q F), 1 / B[, skeleton steps])`` and, for a
  renormalized chain, the output scales."""
  specs, depth = struct.layers, struct.depth
  updates, bias_updates = [], []
  for k, spec in enumerate(specs):
    out = free_outgoing_mask(struct, k)
    shrink_k, inv_fwd_k, inv_back_k, *skeleton_steps_k = factors[k]
    # The last layer's outputs rescaled: new = (w + du) * a, i.e. du * a + w * (a - 1).
    rescale = output_scales if k == depth - 1 else None
    b, bias_step = biases[k], bias_steps[k]
    if b is None or bias_step is None:
      bias_updates.append(None)
    else:
      bias = b.astype(ct)
      db = bias * at_bias(shrink_k, spec) + bias_step.astype(ct) * at_bias(inv_fwd_k, spec)
      if rescale is not None:
        db = db * at_bias(rescale, spec) + bias * at_bias(rescale - 1, spec)
      bias_updates.append(db.astype(b.dtype))
    if spec.kind == "affine":  # every scale entry is in F
      updates.append(jnp.zeros_like(kernels[k]))
      continue
    w = kernels[k].astype(ct)
    dv = kernel_steps[k].astype(ct)
    if out is not None:
      dv = where(out, rows(skeleton_steps_k[0], spec), dv)
    du = w * cols(shrink_k, spec) + dv * rows(inv_back_k, spec) * cols(inv_fwd_k, spec)
    fixed = fixed_mask(spec, struct.pi[k])
    if fixed is not None:
      du = where(fixed, 0, du)
    if rescale is not None:
      du = du * cols(rescale, spec) + w * cols(rescale - 1, spec)
    updates.append(du.astype(kernels[k].dtype))
  return updates, bias_updates
