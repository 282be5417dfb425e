"""The runnable examples in docstrings and in the README run."""

import doctest
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from gsgd_jax import optimizers


def test_docstring_examples():
  result = doctest.testmod(optimizers, optionflags=doctest.ELLIPSIS)
  assert result.attempted >= 10 and result.failed == 0


def test_readme_python_blocks_run():
  readme = (Path(__file__).parent.parent / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
  assert len(blocks) >= 2
  ns = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), ns)
  assert ns["layers"] == [("params", "layers_0"), ("params", "layers_2"), ("params", "layers_4")]
  assert set(jax.tree.leaves(ns["labels"])) == {"chain"}
  # The README's train step runs with the G-SGD transformation it defines first.
  tx = ns["gsgd_jax"].gsgd(0.1, layers=ns["layers"])
  ns["tx"] = tx
  x, y = jnp.ones((4, 784)), jnp.arange(4)
  params, state = ns["step"](ns["params"], tx.init(ns["params"]), x, y)
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
  assert not all(bool(jnp.all(a == b)) for a, b in
                 zip(jax.tree.leaves(params), jax.tree.leaves(ns["params"])))
  assert isinstance(tx, optax.GradientTransformation)
