"""gsgd_jax: G-SGD and path-space optimizers for ReLU networks, as optax transformations."""

from gsgd_jax import probes
from gsgd_jax.aliases import g_adam, g_adamw, g_momentum, g_rmsprop
from gsgd_jax.init import random_rescale, rescale, set_skeleton, skeleton_mask
from gsgd_jax.path_norm import path_norm_scales, path_sgd, scale_by_path_norm
from gsgd_jax.optimizers import (
    PathSpaceState,
    basis_path_values,
    block_labels,
    gsgd,
    path_space,
)
from gsgd_jax.structure import ChainStructure, LayerSpec, infer_layers
from gsgd_jax.validate import verify_invariance, verify_probes

__version__ = "0.1.0"

__all__ = [
    "ChainStructure",
    "LayerSpec",
    "PathSpaceState",
    "basis_path_values",
    "g_adam",
    "g_adamw",
    "g_momentum",
    "g_rmsprop",
    "block_labels",
    "gsgd",
    "infer_layers",
    "path_norm_scales",
    "path_sgd",
    "path_space",
    "probes",
    "random_rescale",
    "rescale",
    "scale_by_path_norm",
    "set_skeleton",
    "skeleton_mask",
    "verify_invariance",
    "verify_probes",
]
