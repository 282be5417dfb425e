"""The scripts of the examples gallery (``examples/``) run, on their tiny settings, and
each is shown on the site.

Each script checks its own claims with ``assert`` (the loss fell, a restored state equals
the saved one, sharded params stay sharded), so a run that ends with exit status 0 is a
passing example. They run as a reader runs them, in a fresh process: the suite's fake
devices and 64-bit mode do not reach them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PAGE = ROOT / "docs" / "examples.md"
# The site shows about 90 columns of code at 1280 pixels.
CODE_COLUMNS = 88


def test_the_gallery_holds_the_examples_the_docs_promise():
  names = {path.stem for path in EXAMPLES}
  assert {
    "mlp",
    "resnet_batchnorm",
    "scanned_transformer",
    "llama_decoder",
    "nnx",
    "sharding",
    "checkpointing",
  } <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_is_on_the_site_and_fits_it(example):
  page = PAGE.read_text()
  assert f"```{{literalinclude}} ../examples/{example.name}\n" in page, example.name
  source = example.read_text()
  assert [line for line in source.splitlines() if len(line) > CODE_COLUMNS] == []
  # Every example checks its declaration once before training, and has a tiny setting.
  assert "verify_invariance(" in source and "--tiny" in source


# Marked slow (`make test-all` and CI run them): each is a fresh process that compiles
# its model from nothing, about 8 seconds, and `make test` stays well under ten minutes.
@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_on_its_tiny_setting(example):
  # The suite's XLA flags (fast compiles) are kept: they change no result it asserts.
  env = {**os.environ, "PYTHONPATH": ""}
  run = subprocess.run(
    [sys.executable, str(example), "--tiny"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert re.search(r"\S", run.stdout), "an example prints what it measured"
