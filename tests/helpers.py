"""Shared test utilities."""

import jax
import optax


def train_scan(tx, params, loss, steps, observe):
  """``steps`` jitted updates of ``tx`` on ``loss`` inside ``lax.scan``.

  Returns ``((params, state), trace)`` with ``trace`` stacking ``observe(params)``
  after every step.
  """
  def step(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
    return (p, state), observe(p)
  return jax.lax.scan(jax.jit(step), (params, tx.init(params)), length=steps)
