"""The runnable examples in docstrings and in the README run and do what they say."""

import doctest
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gsgd_jax
from gsgd_jax import probes
from gsgd_jax._src import alias, infer, path_norm, transform, validate


@pytest.mark.parametrize(
  "module, examples",
  [(transform, 9), (alias, 10), (path_norm, 5), (probes, 3), (infer, 3), (validate, 5)],
  ids=lambda m: getattr(m, "__name__", ""),
)
def test_docstring_examples(module, examples):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= examples and result.failed == 0


@pytest.mark.parametrize(
  "name",
  [
    "path_space",
    "gsgd",
    "g_momentum",
    "g_adam",
    "g_adamw",
    "g_rmsprop",
    "path_sgd",
    "scale_by_path_norm",
  ],
)
def test_public_docstrings_follow_optax_style(name):
  doc = getattr(gsgd_jax, name).__doc__
  summary = doc.strip().splitlines()[0]
  assert summary.endswith(".") and len(summary) < 90
  for section in ("Args:", "Returns:", ".. math::"):
    assert section in doc, (name, section)
  if name != "scale_by_path_norm":
    assert "Example:" in doc and "References:" in doc, name


def _readme_blocks():
  readme = (Path(__file__).parent.parent / "README.md").read_text()
  return re.findall(r"```python\n(.*?)```", readme, re.S)


def test_readme_mlp_and_partition_examples():
  mlp, partition, *_ = _readme_blocks()
  ns = {}
  exec(compile(mlp, "README.md", "exec"), ns)
  assert ns["layers"] == [("params", "layers_0"), ("params", "layers_2"), ("params", "layers_4")]
  # The train step runs with both transformations the block defines.
  for tx in (gsgd_jax.gsgd(0.1, layers=ns["layers"]), ns["tx"]):
    ns["tx"] = tx
    x, y = jnp.ones((4, 784)), jnp.arange(4)
    params, _ = ns["step"](ns["params"], tx.init(ns["params"]), x, y)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert not all(
      bool(jnp.all(a == b))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ns["params"]), strict=True)
    )
  exec(compile(partition, "README.md", "exec"), ns)
  assert set(jax.tree.leaves(ns["labels"])) == {"chain"}
  assert isinstance(ns["tx"], optax.GradientTransformation)


def test_readme_resnet_blocks_are_invariant():
  resnet = _readme_blocks()[2]
  ns = {}
  exec(
    compile(
      "import flax.linen as nn, jax, jax.numpy as jnp, optax, gsgd_jax\n" + resnet,
      "README.md",
      "exec",
    ),
    ns,
  )
  model, params, blocks, tx = ns["model"], ns["params"], ns["blocks"], ns["tx"]
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float32)
  y = jnp.arange(4)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
  rescaled = gsgd_jax.random_rescale(params, blocks, jax.random.key(2))
  np.testing.assert_allclose(model.apply(rescaled, x), model.apply(params, x), rtol=1e-4, atol=1e-5)

  @jax.jit
  def step(p, state):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return optax.apply_updates(p, updates), state

  runs = []
  for start in (params, rescaled):
    p, state = start, tx.init(start)
    for _ in range(5):
      p, state = step(p, state)
    runs.append(p)
  np.testing.assert_allclose(model.apply(runs[0], x), model.apply(runs[1], x), rtol=1e-3, atol=1e-4)
  # The stem is outside the blocks: plain SGD moved it identically in both runs.
  np.testing.assert_allclose(
    runs[0]["params"]["stem"]["kernel"], runs[1]["params"]["stem"]["kernel"], rtol=1e-4, atol=1e-5
  )
  assert not np.allclose(runs[0]["params"]["stem"]["kernel"], params["params"]["stem"]["kernel"])


def test_readme_probe_example_matches_plain_gsgd():
  ns = {}
  exec(
    compile(
      "import flax.linen as nn, jax, jax.numpy as jnp, optax, gsgd_jax\n" + _readme_blocks()[3],
      "README.md",
      "exec",
    ),
    ns,
  )
  params, tx, loss = ns["params"], ns["tx"], ns["loss"]
  assert all("scale_probe" in params["params"][name] for name in ("layers_0", "layers_2"))
  grads = jax.grad(loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  strip = lambda t: {
    "params": {
      n: {k: v for k, v in layer.items() if k != "scale_probe"} for n, layer in t["params"].items()
    }
  }
  plain, _ = tx.update(strip(grads), tx.init(strip(params)), strip(params))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), strip(updates), plain
  )
