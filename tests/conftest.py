"""Test setup: offline hub, float32 matmuls, strict dtype promotion, several CPU devices."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_module():
  """One pytest process compiles several hundred programs (four virtual devices); keeping them all alive
  once ended in a segfault inside XLA's compiler near the end of the suite. Each module starts afresh."""
  yield
  jax.clear_caches()
