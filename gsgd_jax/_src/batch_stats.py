"""BatchNorm's running statistics re-estimated for fixed weights (honest evaluation mode)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _floating(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def recalibrate_batch_stats(
  update_stats: Callable[[Any, Any], Any],
  batch_stats: Any,
  batches: Iterable[Any],
) -> Any:
  r"""Re-estimates BatchNorm's running statistics for fixed weights.

  BatchNorm's running averages (used in evaluation mode) trail the weights they were
  gathered under: after training, and after any change of the pre-normalization scale,
  they can be stale, and evaluation-mode accuracy then says more about the averages than
  about the weights. This replaces every floating statistic by the mean, over
  ``batches``, of the statistic of each batch alone, as PyTorch's
  ``torch.optim.swa_utils.update_bn`` does.

  ``update_stats`` is one training-mode forward pass that returns the updated
  statistics; a running average updates every statistic as

  .. math::
    s \leftarrow m \, s + (1 - m) \, b,

  with ``b`` the batch's own statistic and ``m`` the momentum. A pass from statistics of
  all zeros and one from the statistics that pass gives yield :math:`m` and then
  :math:`b`, whatever the momentum of each norm, so the model is not changed (to the
  statistics' precision over :math:`1 - m`: about ``1e-5`` relative in float32 at
  momentum 0.99). One pass per batch, and one more for the first.

  Args:
    update_stats: ``update_stats(batch_stats, x)`` returns the statistics after one
      forward pass in training mode on ``x``, e.g. for Linen ``lambda s, x:
      model.apply({'params': params, 'batch_stats': s}, x, train=True,
      mutable=['batch_stats'])[1]['batch_stats']``.
    batch_stats: the statistics as they are (their structure, dtypes and any leaf
      that is not floating are kept).
    batches: inputs, e.g. a few dozen training batches.

  Returns:
    ``batch_stats`` with every floating leaf replaced by the mean of the batches' own
    statistics.

  Raises:
    ValueError: when ``batches`` is empty, or when a statistic is not a running
      average (a momentum of 1, or an update that is not of the form above). A
      model whose activations are not finite gets statistics that are not
      finite, as its running averages would be.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, gsgd_jax
    >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)) * 5 + 2
    >>> variables = model.init(jax.random.key(1), x)
    >>> def update(stats, x):
    ...   new = {**variables, 'batch_stats': stats}
    ...   return model.apply(new, x, mutable=['batch_stats'])[1]['batch_stats']
    >>> batches = [x[:32], x[32:]]
    >>> stale = variables['batch_stats']
    >>> stats = gsgd_jax.recalibrate_batch_stats(update, stale, batches)
    >>> h = model.layers[0].apply({'params': variables['params']['layers_0']}, x)
    >>> means = jnp.stack([h[:32].mean(0), h[32:].mean(0)]).mean(0)
    >>> bool(jnp.allclose(stats['layers_1']['mean'], means, atol=1e-5))
    True
  """
  batches = iter(batches)
  try:
    first = next(batches)
  except StopIteration:
    raise ValueError("recalibrate_batch_stats: `batches` is empty") from None

  def filled(value: float) -> Any:
    # A fresh tree for every pass: an NNX state's variables may be updated in place.
    return jax.tree.map(lambda s: jnp.full_like(s, value) if _floating(s) else s, batch_stats)

  from_zeros = update_stats(filled(0.0), first)
  # new = m old + (1 - m) b: from zeros it is (1 - m) b; from a start of that same size
  # (1 where it is 0), m start + (1 - m) b. Their difference over the start is m, without
  # the cancellation a start of ones would suffer where b is large.
  start = jax.tree.map(
    lambda z: jnp.where(z != 0, z, jnp.ones_like(z)) if _floating(z) else z, from_zeros
  )
  from_start = update_stats(jax.tree.map(jnp.array, start), first)
  momentum = jax.tree.map(
    lambda y, z, s: (y - z) / s if _floating(y) else 0.0, from_start, from_zeros, start
  )
  for m in jax.tree.leaves(momentum):
    # Non-finite entries come from non-finite activations (a diverged model): they give
    # non-finite statistics, as the model's own running averages would hold.
    wide = np.asarray(m, np.float64)
    wide = wide[np.isfinite(wide)]
    if np.any(wide >= 1) or np.any(wide < 0):
      raise ValueError(
        "recalibrate_batch_stats: update_stats does not update the statistics as a running "
        "average new = m old + (1 - m) batch with 0 <= m < 1 (a momentum of 1, or a "
        "function that does not run the model in training mode with its statistics "
        "mutable?)"
      )

  def own(update: Any) -> Any:
    """Each batch's own statistics, from an update of zeros: (new - m * 0) / (1 - m)."""
    return jax.tree.map(lambda u, m: u / (1 - m) if _floating(u) else u, update, momentum)

  total, count = own(from_zeros), 1
  for x in batches:
    total = jax.tree.map(lambda t, u: t + u, total, own(update_stats(filled(0.0), x)))
    count += 1
  return jax.tree.map(
    lambda s, t: (t / count).astype(jnp.result_type(s)) if _floating(s) else t,
    batch_stats,
    total,
  )
