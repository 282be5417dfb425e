"""gsgd_jax: G-SGD and path-space optimizers for ReLU networks, as optax transformations."""

import importlib.metadata
import pathlib
import tomllib

from gsgd_jax import probes
from gsgd_jax._src.alias import g_adam, g_adamw, g_momentum, g_rmsprop, gsgd
from gsgd_jax._src.batch_stats import recalibrate_batch_stats
from gsgd_jax._src.declaration import Block, Layer, LayerPaths
from gsgd_jax._src.infer import infer_layers
from gsgd_jax._src.layouts import infer_blocks
from gsgd_jax._src.path_norm import path_norm_scales, path_sgd, scale_by_path_norm
from gsgd_jax._src.rescaling import random_rescale, rescale
from gsgd_jax._src.skeleton import set_skeleton, skeleton_mask
from gsgd_jax._src.transform import PathSpaceState, basis_path_values, block_labels, path_space
from gsgd_jax._src.validate import verify_invariance, verify_probes


def _version(root: pathlib.Path | None = None) -> str:
  """The installed distribution's version; from a source tree that was not installed
  (vendored, or on ``PYTHONPATH``), the version in the ``pyproject.toml`` of ``root``
  (default: the tree holding this package), else ``'0+unknown'``."""
  root = pathlib.Path(__file__).resolve().parent.parent if root is None else root
  try:
    return importlib.metadata.version("gsgd_jax")
  except importlib.metadata.PackageNotFoundError:
    pass
  try:
    with (root / "pyproject.toml").open("rb") as f:
      project = tomllib.load(f).get("project", {})
  except (OSError, tomllib.TOMLDecodeError):
    return "0+unknown"
  return (
    str(project.get("version", "0+unknown")) if project.get("name") == "gsgd_jax" else "0+unknown"
  )


__version__ = _version()

__all__ = [
  "Block",
  "Layer",
  "LayerPaths",
  "PathSpaceState",
  "basis_path_values",
  "block_labels",
  "g_adam",
  "g_adamw",
  "g_momentum",
  "g_rmsprop",
  "gsgd",
  "infer_blocks",
  "infer_layers",
  "path_norm_scales",
  "path_sgd",
  "path_space",
  "probes",
  "random_rescale",
  "recalibrate_batch_stats",
  "rescale",
  "scale_by_path_norm",
  "set_skeleton",
  "skeleton_mask",
  "verify_invariance",
  "verify_probes",
]
