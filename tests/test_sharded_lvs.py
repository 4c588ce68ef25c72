"""The LVS audit on a mesh (sweep and PGD cells sharded, weights loaded into their shards) gives the smoke
experiment's results without a mesh: same sweep.npz and cells. In process on 4 virtual CPU devices, and
experiments/lvs.py as 2 jax.distributed processes (1 CPU device each) sharing one mesh."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, experiment_config

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

  # FSDP splits every d_model contraction over the 4 devices: the same function, summed in another order
  # (30 layers, logits ~10: differences ~4e-5; a wrong row or layer would differ by O(0.1)).
  _compare(str(tmp_path / "one"), str(tmp_path / "mesh"), cfg, sweep_atol=1e-4)


def _compare(one_dir, mesh_dir, cfg, sweep_atol):
  one, four = (np.load(os.path.join(d, "lvs", "sweep.npz")) for d in (one_dir, mesh_dir))
  assert sorted(one.files) == sorted(four.files)
  for k in one.files:
    np.testing.assert_allclose(four[k], one[k], atol=sweep_atol, rtol=1e-4, err_msg=k)
  for layer in cfg.layers:
    for ri in range(len(cfg.radii)):
      a, b = (json.loads(open(os.path.join(d, "lvs", "cells", f"l{layer}_r{ri}.json")).read())
              for d in (one_dir, mesh_dir))
      np.testing.assert_allclose(b["final_loss"], a["final_loss"], atol=1e-4, rtol=1e-5)
      for k in ("loss_success", "success", "target_match", "completions", "prompts", "radius"):
        assert b[k] == a[k], (layer, ri, k)


def test_lvs_main_two_processes_on_one_mesh_equal_one_process_and_only_process_0_writes(smoke, tmp_path):
  """experiments/lvs.py under jax.distributed (2 processes, 1 CPU device each, --config.mesh=auto): one
  sharded sweep and one set of PGD cells across both processes == the single-process run without a mesh;
  process 1 writes nothing into the workdir."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_distributed import _env, _free_port, _writes

  cfg = smoke[1]
  child = os.path.join(ROOT, "tests", "lvs_child.py")
  single, multi = tmp_path / "single", tmp_path / "multi"
  flags = ["--config=" + os.path.join(ROOT, "experiments", "configs", "lvs.py") + ":smoke"]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, child, str(tmp_path / "single.log"), *flags, f"--workdir={single}"],
                            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  for pid in range(2):
    env = _env(LVS_COORDINATOR=f"localhost:{port}", LVS_NUM_PROCESSES="2", LVS_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, child, str(tmp_path / f"p{pid}.log"), *flags, f"--workdir={multi}",
                                   "--config.mesh=auto"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  for p in procs:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-3000:]
  _compare(str(single), str(multi), cfg, sweep_atol=1e-4)
  assert _writes(str(tmp_path / "p1.log"), str(multi)) == []
  wrote0 = {os.path.relpath(p, multi) for _, p in _writes(str(tmp_path / "p0.log"), str(multi))}
  assert any(p.startswith("lvs" + os.sep + "cells" + os.sep) for p in wrote0), sorted(wrote0)  # the writer wrote
