"""Stacked blocks: per-chain code run once per copy, as one vectorised program.

A block declared with ``stack_axis`` (Flax ``nn.scan``, ``nnx.vmap``) holds ``S``
copies of one chain, every leaf of its layers carrying them on that axis. Its
G-space is the product of the copies' (docs/math.md, stacked layers), so every
per-chain computation (chain products, inverse chain rule, weight allocation,
rescaling) runs on each copy as if it were declared alone. ``jax.vmap`` does
that: one traced copy, so the compiled update does not grow with ``S``, and
its batching keeps a sharding of the stack axis (Explicit meshes included).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from gsgd_jax._src.structure import ChainStructure

# In ``in_axes``/``out_axes`` of ``per_copy``: the block's stack axis in its params.
STACK = "stack"


def per_copy(
  struct: ChainStructure,
  fn: Callable[..., Any],
  in_axes: Any,
  out_axes: Any,
) -> Callable[..., Any]:
  """``fn(struct, *args)`` for a chain; ``fn(one copy, *args)`` over a stack's copies.

  Args:
    struct: the chain's structure.
    fn: a per-chain function taking the structure first; the arguments after
      it are arrays (or pytrees of arrays, ``None`` entries allowed).
    in_axes: as ``jax.vmap``'s, for the arguments after ``struct``; ``STACK``
      stands for the stack axis of the block's params (kernels, scales,
      biases, probes), an integer for other per-copy inputs (per-copy results
      of another ``per_copy`` call are on axis 0), ``None`` for shared ones.
    out_axes: as ``jax.vmap``'s, with ``STACK`` as in ``in_axes``.

  Returns:
    ``fn`` with ``struct`` bound: as it is for an unstacked chain, vectorised
    over the copies of a stacked one.
  """
  if struct.stack is None:
    return functools.partial(fn, struct)
  axis = struct.stack.axis
  resolve = lambda axes: jax.tree.map(lambda a: axis if a == STACK else a, axes)
  return jax.vmap(
    functools.partial(fn, struct.one_copy), in_axes=resolve(in_axes), out_axes=resolve(out_axes)
  )


def expand(struct: ChainStructure, x: jax.Array) -> jax.Array:
  """A per-copy array (a mask in a kernel's shape) made broadcastable against the
  block's stacked leaves: a unit axis where their stack is."""
  return x if struct.stack is None else jax.numpy.expand_dims(x, struct.stack.axis)
