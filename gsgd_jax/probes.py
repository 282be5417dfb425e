"""Scale probes: the per-node sums of the inverse chain rule, taken from the backward pass.

The inverse chain rule needs, for every hidden node ``j``, the derivative of the
loss along the rescaling of that node's incoming weights and bias::

    sum_{i, taps} w_ij g_ij + b_j g_bj  =  sum_{batch, positions} delta_j z_j,

where ``z`` is the layer's output and ``delta = dL/dz``. The left side is a
reduction over the whole kernel (two extra passes over the weights per
update); the right side costs ``O(batch x width)`` and the backward pass all
but computes it already. A *scale probe* is a per-node factor ``s`` (held at
1) that multiplies the layer's output: its gradient ``dL/ds_j = sum delta_j
z_j`` is exactly the right side, so :func:`gsgd_jax.path_space` reads it from
the gradients (``s * dL/ds``) instead of reducing over the kernel.

Use it by giving each declared layer a ``scale_probe`` leaf of shape
``(n_out,)`` (a multi-axis kernel's: its output axes, the shape of its bias; a
transposed one takes none) next to its ``kernel`` and ``bias``, multiplied into the layer's
output before the next layer: the modules here (:class:`Dense`, :class:`Conv`
for Linen; :class:`Linear`, :class:`NNXConv` for NNX) do that. Anything
positively homogeneous may sit between the layer and the probe (ReLU, max or
average pooling), since it commutes with the rescaling. G-SGD never updates
the probes (their update is 0) and the result is the same as without them, up
to rounding. Check the wiring of a new model with
:func:`gsgd_jax.verify_probes`.

When probes pay: they trade two passes over each kernel for ``O(batch x
positions x width)`` work in the backward pass, a gain for dense layers, whose
kernels outnumber their activations. A convolution's activations usually
outnumber its kernel, so there the reduction is the cheaper of the two.
Applied after the activation (``scale_probe(relu(z), probe)``) a probe reuses
the activations the backward pass keeps anyway.

The probe's gradient must belong to the same gradients as the kernels', taken
at the params given to ``update``: give ``path_space`` the raw gradients, or
gradients transformed linearly as a whole (averaged by ``optax.MultiSteps``,
scaled by a clip). A transformation that
changes kernel gradients alone before ``path_space`` (e.g. weight decay added
to the gradients) would make the sums stale; apply it inside ``path_space``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from gsgd_jax._src.pytree import PROBE

__all__ = ["PROBE", "Conv", "Dense", "Linear", "NNXConv", "scale_probe"]


def scale_probe(outputs: jax.Array, probe: jax.Array) -> jax.Array:
  """Multiplies a layer's outputs by its probe (channels last).

  With ``probe`` held at 1 the outputs are unchanged, and ``dL/dprobe_j`` is
  ``sum delta_j z_j`` over every axis but the last.

  Args:
    outputs: the layer's outputs ``(..., n_out)``.
    probe: the layer's ``scale_probe`` leaf, shape ``(n_out,)``.

  Returns:
    ``outputs * probe``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from gsgd_jax import probes
    >>> z, probe = jnp.array([[1.0, -2.0, 3.0]]), jnp.ones(3)
    >>> print(probes.scale_probe(z, probe))  # held at 1: the outputs unchanged
    [[ 1. -2.  3.]]
    >>> # The sum of z per node:
    >>> print(jax.grad(lambda s: probes.scale_probe(z, s).sum())(probe))
    [ 1. -2.  3.]
  """
  return outputs * probe.astype(outputs.dtype)


def _linen_probe(module: nn.Module, outputs: jax.Array) -> jax.Array:
  """Declares a Linen layer's probe (after its kernel, so that the kernel draws
  the same key as in Flax's own layer) and applies it."""
  probe = module.param(PROBE, nn.initializers.ones, (module.features,), module.param_dtype)
  return scale_probe(outputs, probe)


def _add_nnx_probe(module: nnx.Linear | nnx.Conv, out_features: int) -> None:
  setattr(module, PROBE, nnx.Param(jnp.ones(out_features, module.param_dtype)))


class Dense(nn.Dense):
  """``flax.linen.Dense`` with a scale probe (see :mod:`gsgd_jax.probes`).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> from gsgd_jax import probes
    >>> model = nn.Sequential([probes.Dense(16), nn.relu, probes.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> sorted(params['params']['layers_0'])
    ['bias', 'kernel', 'scale_probe']
  """

  @nn.compact
  def __call__(self, inputs):
    return _linen_probe(self, super().__call__(inputs))


class Conv(nn.Conv):
  """``flax.linen.Conv`` with a scale probe (see :mod:`gsgd_jax.probes`).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from gsgd_jax import probes
    >>> model = nn.Sequential([probes.Conv(4, (3, 3)), nn.relu, nn.Conv(2, (3, 3))])
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
    >>> params['params']['layers_0']['scale_probe'].shape
    (4,)
  """

  @nn.compact
  def __call__(self, inputs):
    return _linen_probe(self, super().__call__(inputs))


class Linear(nnx.Linear):
  """``flax.nnx.Linear`` with a scale probe (see :mod:`gsgd_jax.probes`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gsgd_jax import probes
    >>> layer = probes.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8))).shape
    (2, 4)
  """

  def __init__(self, in_features: int, out_features: int, **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    _add_nnx_probe(self, out_features)

  def __call__(self, inputs):
    return scale_probe(super().__call__(inputs), getattr(self, PROBE)[...])


class NNXConv(nnx.Conv):
  """``flax.nnx.Conv`` with a scale probe (see :mod:`gsgd_jax.probes`).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gsgd_jax import probes
    >>> layer = probes.NNXConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 8, 8, 3))).shape, layer.scale_probe.shape
    ((1, 8, 8, 4), (4,))
  """

  def __init__(self, in_features: int, out_features: int, kernel_size, *args, **kwargs):
    super().__init__(in_features, out_features, kernel_size, *args, **kwargs)
    _add_nnx_probe(self, out_features)

  def __call__(self, inputs):
    return scale_probe(super().__call__(inputs), getattr(self, PROBE)[...])
