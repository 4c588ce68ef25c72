"""Sharded forward equals the single-device forward (4 CPU devices from conftest); 8B shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny

from lvs_jax.core import model as model_lib
from lvs_jax.core import sharding
from lvs_jax.core.config import ModelConfig


@pytest.mark.parametrize("rules", [sharding.REPLICATED, sharding.FSDP, sharding.TENSOR])
def test_sharded_forward_matches_single_device(rules):
  assert len(jax.devices()) >= 4
  cfg, params = tiny("llama")
  mesh = sharding.make_mesh(data=2, model=2)
  toks = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 16)).astype(np.int32)
  ref = model_lib.forward(params, jnp.asarray(toks), cfg).logits
  sp = sharding.shard_params(params, cfg, mesh, rules)
  st = jax.device_put(jnp.asarray(toks), sharding.batch_sharding(mesh))
  got = jax.jit(lambda p, t: model_lib.forward(p, t, cfg).logits)(sp, st)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
  if rules is sharding.TENSOR:
    assert sp.layers.wq.sharding.spec == jax.sharding.PartitionSpec(None, "data", "model", None)


def test_8b_shardings_without_memory():
  cfg = ModelConfig(arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336)
  mesh = sharding.make_mesh(data=2, model=2)
  sh = sharding.param_shardings(cfg, mesh, sharding.TENSOR)
  abstract = model_lib.abstract_params(cfg, jnp.bfloat16)
  per_device = sum(np.prod(s.shard_shape(a.shape)) * 2 for s, a in zip(jax.tree.leaves(sh), jax.tree.leaves(abstract)))
  total = sum(np.prod(a.shape) * 2 for a in jax.tree.leaves(abstract))
  assert per_device < total / 3.5  # ~1/4 of 16 GB per device on a 2x2 mesh
