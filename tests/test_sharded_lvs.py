"""The LVS audit on a 4-device mesh (sweep and PGD cells sharded, weights loaded into their shards) gives
the smoke experiment's results without a mesh: same sweep.npz and cells."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import experiment_config

from lvs_jax.core import sharding
from lvs_jax.io import registry
from lvs_jax.lvs import audit as lvs_audit


@pytest.fixture(scope="module")
def smoke():
  try:
    model = registry.load_model()
  except registry.ModelNotFoundError as e:
    pytest.skip(str(e))
  cfg = experiment_config("lvs").get_config("smoke")
  prompts, targets = lvs_audit.load_targets(cfg)
  return model, cfg, prompts, targets


def test_gguf_load_into_mesh_equals_single_device_load(smoke):
  model = smoke[0]
  mesh = sharding.make_mesh(data=4)
  placed = registry.load_model(tokenizer=False, mesh=mesh, rules=sharding.FSDP).params
  assert placed.layers.wq.sharding.spec == sharding.P(None, "data", None, None)
  assert placed.layers.wq.addressable_shards[0].data.shape[1] == model.cfg.d_model // 4
  np.testing.assert_array_equal(np.asarray(placed.layers.wq), np.asarray(model.params.layers.wq))
  np.testing.assert_array_equal(np.asarray(placed.embed), np.asarray(model.params.embed))


def test_lvs_smoke_on_a_mesh_equals_single_device(smoke, tmp_path, monkeypatch):
  model, cfg, prompts, targets = smoke
  lvs_audit.run(model, prompts, targets, cfg, str(tmp_path / "one"))

  calls = []
  for name in ("sweep", "pgd_attack", "generate_under_delta"):
    fn = getattr(sharding, name)
    monkeypatch.setattr(sharding, name, lambda *a, _fn=fn, _name=name, **k: (calls.append(_name), _fn(*a, **k))[1])
  mesh, rules = sharding.mesh_from_spec("4"), sharding.FSDP
  host = registry.load_model(dtype=jnp.float32, host=True)  # what experiments/lvs.py loads under a mesh
  lvs_audit.run(host, prompts, targets, cfg, str(tmp_path / "mesh"), mesh=mesh, rules=rules)
  n_cells = len(cfg.layers) * len(cfg.radii)
  assert calls.count("sweep") >= 1 and calls.count("pgd_attack") == calls.count("generate_under_delta") == n_cells

  one, four = (np.load(tmp_path / d / "lvs" / "sweep.npz") for d in ("one", "mesh"))
  assert sorted(one.files) == sorted(four.files)
  # FSDP splits every d_model contraction over the 4 devices: the same function, summed in another order
  # (30 layers, logits ~10: differences ~4e-5; a wrong row or layer would differ by O(0.1)).
  for k in one.files:
    np.testing.assert_allclose(four[k], one[k], atol=1e-4, rtol=1e-4, err_msg=k)
  for layer in cfg.layers:
    for ri in range(len(cfg.radii)):
      a, b = (json.loads((tmp_path / d / "lvs" / "cells" / f"l{layer}_r{ri}.json").read_text())
              for d in ("one", "mesh"))
      np.testing.assert_allclose(b["final_loss"], a["final_loss"], atol=1e-4, rtol=1e-5)
      for k in ("loss_success", "success", "target_match", "completions", "prompts", "radius"):
        assert b[k] == a[k], (layer, ri, k)
