"""A deliberately naive float64 reference of SPEC §1-4 for dense ReLU chains.

Written from the SPEC with explicit loops and index sets, sharing no code with
the library, so the library is checked against an independent reading.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def make_mlp(key, widths, bias=True, dtype=jnp.float64, layer_names=None):
  """Random params ``{'Dense_k': {'kernel', 'bias'}}``; random signs and scales."""
  params = {}
  names = layer_names or [f"Dense_{k}" for k in range(len(widths) - 1)]
  for k, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
    key, k1, k2 = jax.random.split(key, 3)
    layer = {"kernel": (jax.random.normal(k1, (n_in, n_out)) / np.sqrt(n_in)).astype(dtype)}
    if bias:
      layer["bias"] = (0.1 * jax.random.normal(k2, (n_out,))).astype(dtype)
    params[names[k]] = layer
  return params, [(n,) for n in names]


def forward(params, layers, x):
  """ReLU MLP; no activation after the last layer."""
  for k, (name,) in enumerate(layers):
    layer = params[name]
    x = x @ layer["kernel"] + layer.get("bias", 0.0)
    if k < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def skeleton_sets(widths):
  """(F, OUT): per layer, the sets of (i, j) incoming-fixed and outgoing skeleton edges."""
  depth = len(widths) - 1
  fixed = [set() for _ in range(depth)]
  out = [set() for _ in range(depth)]
  for level in range(1, depth):  # hidden levels
    for j in range(widths[level]):
      fixed[level - 1].add((j % widths[level - 1], j))
    for a in range(widths[level]):
      out[level].add((a, a % widths[level + 1]))
  return fixed, out


def chain_products(kernels, widths):
  """B (back) and F (forward) chains by the SPEC's recurrences, with loops."""
  depth = len(widths) - 1
  back = [np.ones(widths[0])]
  for level in range(1, depth):
    n_prev = widths[level - 1]
    back.append(np.array([back[level - 1][j % n_prev] * kernels[level - 1][j % n_prev, j]
                          for j in range(widths[level])]))
  back.append(np.ones(widths[depth]))
  fwd = [None] * (depth + 1)
  fwd[depth] = np.ones(widths[depth])
  for level in range(depth - 1, 0, -1):
    n_next = widths[level + 1]
    fwd[level] = np.array([kernels[level][a, a % n_next] * fwd[level + 1][a % n_next]
                           for a in range(widths[level])])
  fwd[0] = np.ones(widths[0])
  return back, fwd


def basis_values(kernels, biases, widths):
  """v per layer (0 on F) and v per bias, from explicit loops over edges."""
  kernels = [np.asarray(w, np.float64) for w in kernels]
  fixed, _ = skeleton_sets(widths)
  back, fwd = chain_products(kernels, widths)
  values, bias_values = [], []
  for k, w in enumerate(kernels):
    v = np.zeros_like(w)
    for i in range(w.shape[0]):
      for j in range(w.shape[1]):
        if (i, j) not in fixed[k]:
          v[i, j] = back[k][i] * w[i, j] * fwd[k + 1][j]
    values.append(v)
    bias_values.append(None if biases[k] is None else np.asarray(biases[k]) * fwd[k + 1])
  return values, bias_values


def reconstruct(values, bias_values, fixed_kernels, widths):
  """Weights from basis values and the fixed edges F (differentiable in the values)."""
  depth = len(widths) - 1
  fixed, _ = skeleton_sets(widths)
  masks = []
  for k in range(depth):
    m = np.zeros((widths[k], widths[k + 1]), bool)
    for (i, j) in fixed[k]:
      m[i, j] = True
    masks.append(m)
  # Back chains use F only.
  back = [jnp.ones(widths[0])]
  for level in range(1, depth):
    n_prev = widths[level - 1]
    idx = np.arange(widths[level]) % n_prev
    back.append(back[level - 1][idx] * fixed_kernels[level - 1][idx, np.arange(widths[level])])
  kernels = [None] * depth
  biases = [None] * depth
  fwd = jnp.ones(widths[depth])
  for k in range(depth - 1, -1, -1):
    w = values[k] / (back[k][:, None] * fwd[None, :])
    kernels[k] = jnp.where(masks[k], fixed_kernels[k], w)
    if bias_values[k] is not None:
      biases[k] = bias_values[k] / fwd
    if k > 0:
      n_next = widths[k + 1]
      a = np.arange(widths[k])
      fwd = kernels[k][a, a % n_next] * fwd[a % n_next]
  return kernels, biases
