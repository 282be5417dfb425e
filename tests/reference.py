"""A deliberately naive float64 reference of the mathematics for chains of layers.

Written from docs/math.md (nodes, edges and levels; the skeleton; basis paths and their
values; the inverse chain rule and weight allocation, here as a reconstruction of the
weights) with explicit loops and index sets, sharing no code with the library, so the
library is checked against an independent reading. Kernels are handled as
``(taps, n_in, n_out)`` views with a skeleton tap ``centre`` (``taps = 1`` for dense
layers); the caller works the views out from the page's table of layer kinds. The test
set-ups (networks, data, losses) live in ``problems.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def forward(params, layers, x):
  """ReLU MLP; no activation after the last layer."""
  for k, (name,) in enumerate(layers):
    layer = params[name]
    x = x @ layer["kernel"] + layer.get("bias", 0.0)
    if k < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def dense_views(kernels):
  """Dense kernels as one-tap views: (views, centres)."""
  return [jnp.asarray(w)[None] for w in kernels], [0] * len(kernels)


def skeleton_sets(widths, centres=None):
  """(F, OUT): per layer, the sets of (tap, i, j) incoming-fixed and outgoing skeleton
  edges; with ``centres=None`` (dense) the sets hold (i, j) pairs."""
  depth = len(widths) - 1
  tap = (lambda _k: ()) if centres is None else (lambda k: (centres[k],))
  fixed = [set() for _ in range(depth)]
  out = [set() for _ in range(depth)]
  for level in range(1, depth):  # hidden levels
    for j in range(widths[level]):
      fixed[level - 1].add((*tap(level - 1), j % widths[level - 1], j))
    for a in range(widths[level]):
      out[level].add((*tap(level), a, a % widths[level + 1]))
  return fixed, out


def chain_products(views, widths, centres):
  """B (back) and F (forward) chains by the recurrences of docs/math.md (the skeleton),
  with loops."""
  depth = len(widths) - 1
  back = [np.ones(widths[0])]
  for level in range(1, depth):
    n_prev, c = widths[level - 1], centres[level - 1]
    back.append(
      np.array(
        [
          back[level - 1][j % n_prev] * views[level - 1][c, j % n_prev, j]
          for j in range(widths[level])
        ]
      )
    )
  back.append(np.ones(widths[depth]))
  fwd = [None] * (depth + 1)
  fwd[depth] = np.ones(widths[depth])
  for level in range(depth - 1, 0, -1):
    n_next, c = widths[level + 1], centres[level]
    fwd[level] = np.array(
      [views[level][c, a, a % n_next] * fwd[level + 1][a % n_next] for a in range(widths[level])]
    )
  fwd[0] = np.ones(widths[0])
  return back, fwd


def basis_values_taps(views, biases, widths, centres):
  """v per layer view (0 on F) and v per bias, from explicit loops over edges."""
  views = [np.asarray(w, np.float64) for w in views]
  fixed, _ = skeleton_sets(widths, centres)
  back, fwd = chain_products(views, widths, centres)
  values, bias_values = [], []
  for k, w in enumerate(views):
    v = np.zeros_like(w)
    for t in range(w.shape[0]):
      for i in range(w.shape[1]):
        for j in range(w.shape[2]):
          if (t, i, j) not in fixed[k]:
            v[t, i, j] = back[k][i] * w[t, i, j] * fwd[k + 1][j]
    values.append(v)
    bias_values.append(None if biases[k] is None else np.asarray(biases[k]) * fwd[k + 1])
  return values, bias_values


def basis_values(kernels, biases, widths):
  """Dense chains: v per kernel (0 on F) and per bias."""
  views, centres = dense_views(kernels)
  values, bias_values = basis_values_taps(views, biases, widths, centres)
  return [v[0] for v in values], bias_values


def fixed_masks(views, widths, centres):
  fixed, _ = skeleton_sets(widths, centres)
  masks = []
  for k, w in enumerate(views):
    m = np.zeros(np.shape(w), bool)
    for idx in fixed[k]:
      m[idx] = True
    masks.append(m)
  return masks


def reconstruct_taps(values, bias_values, fixed_views, widths, centres):
  """Weight views from basis values and the fixed edges F (differentiable in values)."""
  depth = len(widths) - 1
  masks = fixed_masks(fixed_views, widths, centres)
  back = [jnp.ones(widths[0])]  # back chains use F only
  for level in range(1, depth):
    idx = np.arange(widths[level]) % widths[level - 1]
    back.append(
      back[level - 1][idx]
      * fixed_views[level - 1][centres[level - 1], idx, np.arange(widths[level])]
    )
  views, biases = [None] * depth, [None] * depth
  fwd = jnp.ones(widths[depth])
  for k in range(depth - 1, -1, -1):
    w = values[k] / (back[k][None, :, None] * fwd[None, None, :])
    views[k] = jnp.where(masks[k], fixed_views[k], w)
    if bias_values[k] is not None:
      biases[k] = bias_values[k] / fwd
    if k > 0:
      a = np.arange(widths[k])
      fwd = views[k][centres[k], a, a % widths[k + 1]] * fwd[a % widths[k + 1]]
  return views, biases


def reconstruct(values, bias_values, fixed_kernels, widths):
  """Dense chains: kernels from basis values and F."""
  views, centres = dense_views(fixed_kernels)
  rebuilt, biases = reconstruct_taps(
    [jnp.asarray(v)[None] for v in values], bias_values, views, widths, centres
  )
  return [w[0] for w in rebuilt], biases
