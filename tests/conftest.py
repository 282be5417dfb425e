"""Test configuration, before any JAX op: 8 fake CPU devices, 64-bit types, and
XLA:CPU flags that make compiling fast.

Nearly all of the suite's time is compiling small programs, not running them.
Without LLVM's optimisation passes (``xla_backend_optimization_level=0``) and with
XLA:CPU's classic loop emitters instead of its fusion emitters, the suite runs in
well under half the time; the suite passes with and without these flags.
The optimisation level leaves the optimized HLO as it is; the emitters change
which operations XLA fuses, so the tests of a compiled program's size and memory
compile with XLA's default emitters (``helpers.USER_PIPELINE``). The benchmarks
compile with the defaults.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
  [
    os.environ.get("XLA_FLAGS", ""),
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
  ]
).strip()

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
