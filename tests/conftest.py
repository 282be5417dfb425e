"""Test configuration: 8 fake CPU devices and 64-bit types, before any JAX op."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
