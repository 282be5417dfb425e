"""recalibrate_batch_stats: BatchNorm's statistics re-estimated for fixed weights are the mean
of the batches' own statistics, whatever the momentum and the stale statistics before (in
float32, as the models keep their statistics: to float32 rounding amplified by 1 / (1 - m),
so to 1e-4 relative at momentum 0.99)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gsgd_jax


class Net(nn.Module):
  momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.Dense(5, name="fc")(x)
    h = nn.relu(nn.BatchNorm(not train, momentum=self.momentum, name="bn")(h))
    return nn.Dense(2, name="head")(h)


def _batches(n=4, size=16, seed=0):
  x = 3.0 * jax.random.normal(jax.random.key(seed), (n * size, 3), jnp.float32) + 1.0
  return [x[i * size : (i + 1) * size] for i in range(n)]


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.99])
def test_linen_statistics_are_the_mean_of_each_batchs_own(momentum):
  model, batches = Net(momentum), _batches()
  variables = model.init(jax.random.key(0), batches[0])
  params = variables["params"]

  def update(stats, x):
    out = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return out[1]["batch_stats"]

  # Stale statistics (far from anything these weights give) must not matter.
  stale = jax.tree.map(lambda s: s + 7.0, variables["batch_stats"])
  got = gsgd_jax.recalibrate_batch_stats(update, stale, batches)
  pre = [x @ params["fc"]["kernel"] + params["fc"]["bias"] for x in batches]
  np.testing.assert_allclose(got["bn"]["mean"], np.mean([h.mean(0) for h in pre], 0), rtol=1e-4)
  np.testing.assert_allclose(got["bn"]["var"], np.mean([h.var(0) for h in pre], 0), rtol=1e-4)
  assert jax.tree.structure(got) == jax.tree.structure(stale)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(3, 5, rngs=rngs)
    self.bn = nnx.BatchNorm(5, momentum=0.99, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.bn(self.fc(x)))


def test_nnx_statistics_with_their_own_momentum():
  model, batches = NNXNet(nnx.Rngs(0)), _batches()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

  def update(s, x):
    m = nnx.merge(graphdef, params, s)
    m(x)
    return nnx.state(m, nnx.BatchStat)

  got = gsgd_jax.recalibrate_batch_stats(update, stats, batches)
  pre = [model.fc(x) for x in batches]
  mean, var = (np.mean([f(h) for h in pre], 0) for f in (lambda h: h.mean(0), lambda h: h.var(0)))
  np.testing.assert_allclose(got["bn"]["mean"][...], mean, rtol=1e-4)
  np.testing.assert_allclose(got["bn"]["var"][...], var, rtol=1e-4)


def test_what_is_not_a_running_average_is_refused():
  model, batches = Net(), _batches()
  variables = model.init(jax.random.key(0), batches[0])

  def frozen(stats, x):  # evaluation mode: the statistics never change (momentum 1)
    del x
    return stats

  with pytest.raises(ValueError, match="does not update the statistics as a running average"):
    gsgd_jax.recalibrate_batch_stats(frozen, variables["batch_stats"], batches)
  with pytest.raises(ValueError, match="`batches` is empty"):
    gsgd_jax.recalibrate_batch_stats(frozen, variables["batch_stats"], [])


def test_non_finite_activations_give_non_finite_statistics_not_an_error():
  model, batches = Net(), _batches()
  variables = model.init(jax.random.key(0), batches[0])
  params = jax.tree.map(lambda a: a * jnp.nan, variables["params"])  # a diverged model

  def update(stats, x):
    out = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return out[1]["batch_stats"]

  got = gsgd_jax.recalibrate_batch_stats(update, variables["batch_stats"], batches)
  assert not np.any(np.isfinite(got["bn"]["mean"]))


def test_huge_statistics_are_estimated_without_cancellation():
  """Activations of 1e12 (a norm's bias that blew up): a start of ones would lose the
  momentum to cancellation against statistics of 1e24."""
  model, batches = Net(0.9), _batches()
  variables = model.init(jax.random.key(0), batches[0])
  params = jax.tree.map(lambda a: a, variables["params"])
  params["fc"] = {"kernel": params["fc"]["kernel"] * 1e12, "bias": params["fc"]["bias"] + 1e12}

  def update(stats, x):
    out = model.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return out[1]["batch_stats"]

  got = gsgd_jax.recalibrate_batch_stats(update, variables["batch_stats"], batches)
  pre = [x @ params["fc"]["kernel"] + params["fc"]["bias"] for x in batches]
  np.testing.assert_allclose(got["bn"]["var"], np.mean([h.var(0) for h in pre], 0), rtol=1e-4)
