"""Shared test utilities."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import gsgd_jax

# XLA:CPU's default fusion pipeline. conftest.py turns the fusion emitters off for
# the whole suite, since that halves compile times, but it also changes which
# operations XLA fuses; the tests of a compiled program's size and memory compile
# with this, so that they see the program a user gets.
USER_PIPELINE = {"xla_cpu_use_fusion_emitters": True}


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


def train_nnx(model, tx, loss, steps):
  """``steps`` jitted ``nnx.Optimizer`` updates of ``model`` (``nnx.Param``) on
  ``loss(model)``; returns the loss before and after."""
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(m, opt):
    opt.update(m, nnx.grad(loss)(m))

  start = float(loss(model))
  for _ in range(steps):
    step(model, optimizer)
  return start, float(loss(model))


def nnx_layers_at_skeleton(model):
  """Infers the layers of an NNX ``model``, sets its skeleton weights to 1 in
  place (``set_skeleton``) and returns the layers."""
  state = nnx.state(model, nnx.Param)
  layers = gsgd_jax.infer_layers(state)
  nnx.update(model, gsgd_jax.set_skeleton(state, layers))
  return layers


def orbax_roundtrip(directory, tree):
  """``tree`` saved by orbax's ``StandardCheckpointer`` into ``directory / 'ckpt'`` and
  restored into zeros of its layout, as a resumed run reads it."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "ckpt", tree)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(directory / "ckpt", jax.tree.map(np.zeros_like, tree))


def equations(jaxpr):
  """Every equation of a traced program, its sub-programs' (scan bodies, inlined calls)
  included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from equations(inner)
