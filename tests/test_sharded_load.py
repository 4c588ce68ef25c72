"""Weights loaded straight into their shardings (io loaders with mesh= / host=) on 4 virtual CPU devices."""

import jax
import numpy as np
import pytest
from helpers import tiny

from lvs_jax.core import sharding
from lvs_jax.io import hf as hf_io
from lvs_jax.io import registry


def _leaves(params):
  return jax.tree_util.tree_flatten_with_path(params)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["fsdp4", "tensor2x2"])
def test_hf_load_into_mesh_equals_single_device_load(tmp_path, arch, layout):
  cfg, params = tiny(arch, vocab_size=128)
  hf_io.save_hf_dir(params, cfg, None, tmp_path)
  mesh, rules = {"fsdp4": (sharding.make_mesh(data=4), sharding.FSDP),
                 "tensor2x2": (sharding.make_mesh(data=2, model=2), sharding.TENSOR)}[layout]

  ref = registry.load_model(str(tmp_path), tokenizer=False).params
  host = registry.load_model(str(tmp_path), tokenizer=False, host=True).params
  got = registry.load_model(str(tmp_path), tokenizer=False, mesh=mesh, rules=rules).params

  want_sh = dict((jax.tree_util.keystr(k), s) for k, s in _leaves(sharding.param_shardings(cfg, mesh, rules)))
  split = 0
  for k, x in _leaves(got):
    name = jax.tree_util.keystr(k)
    assert x.sharding.is_equivalent_to(want_sh[name], x.ndim), (name, x.sharding, want_sh[name])
    shard_shapes = {s.data.shape for s in x.addressable_shards}
    if want_sh[name].spec != sharding.P(*([None] * x.ndim)):  # a split weight: no device holds all of it
      split += 1
      assert all(np.prod(s) < np.prod(x.shape) for s in shard_shapes), (name, shard_shapes, x.shape)
  assert split >= 7  # wq, wk, wv, wo, w_gate, w_up, w_down at least are split by these rules
  for (k, a), (_, b), (_, h) in zip(_leaves(got), _leaves(ref), _leaves(host), strict=True):
    assert isinstance(h, np.ndarray), jax.tree_util.keystr(k)  # host=True: nothing on a device
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
    np.testing.assert_array_equal(h, np.asarray(b), err_msg=jax.tree_util.keystr(k))
    assert a.dtype == b.dtype == h.dtype
