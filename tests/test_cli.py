"""The shared main plumbing: cli.setup sets the matmul precision the config asks for."""

import types

import jax
import ml_collections
import pytest

from lvs_jax.core import cli


def _setup(monkeypatch, tmp_path, **config):
  fake = types.SimpleNamespace(distributed=False, workdir=str(tmp_path / "w"), verbosity=0,
                               config=ml_collections.ConfigDict(config))
  monkeypatch.setattr(cli.flags, "FLAGS", fake)
  monkeypatch.delenv("LVS_DISTRIBUTED", raising=False)
  before = jax.config.jax_default_matmul_precision
  jax.config.update("jax_default_matmul_precision", "default")
  try:
    cli.setup([])
    return jax.config.jax_default_matmul_precision
  finally:
    jax.config.update("jax_default_matmul_precision", before)


def test_setup_sets_matmul_precision_from_the_config(monkeypatch, tmp_path):
  # float32 runs get "highest" (no TF32 on GPUs) even when the config does not name a precision.
  assert _setup(monkeypatch, tmp_path, dtype="float32") == "highest"
  assert _setup(monkeypatch, tmp_path, dtype="float32", matmul_precision="auto") == "highest"
  assert _setup(monkeypatch, tmp_path, dtype="bfloat16") == "default"
  assert _setup(monkeypatch, tmp_path, dtype="float32", matmul_precision="high") == "high"
  assert (tmp_path / "w").is_dir()
  with pytest.raises(ValueError, match="matmul_precision='fast'"):
    _setup(monkeypatch, tmp_path, dtype="float32", matmul_precision="fast")
