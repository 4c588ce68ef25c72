"""benchmarks/bench_gpu.py in its CPU smoke mode: every workload runs on a 4-device mesh, and the analytic
model FLOPs agree with XLA's own count for the forward pass."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_gpu  # noqa: E402

from lvs_jax.core import model as model_lib  # noqa: E402


def test_smoke_runs_every_workload_and_prints_the_table():
  rows = bench_gpu.run(bench_gpu.SMOKE)
  names = [r["workload"] for r in rows]
  assert names == ["forward", "pgd", "gcg(w=8)", "lora_train", "lat_equiv(16 pgd + 1 lora)"]
  for r in rows:
    assert r["seconds"] > 0 and r["tokens_per_s"] > 0
    assert r["mfu"] is None  # CPU: no peak in the table
  table = bench_gpu.format_rows(rows, bench_gpu.SMOKE)
  assert "lora_train" in table and "MFU" in table


def test_model_flops_match_xla_cost_analysis():
  # One layer: XLA's cost analysis counts the body of the layer scan once, whatever its trip count.
  cfg = dataclasses.replace(bench_gpu.MODELS["smoke"], n_layers=1)
  B, T, Tt = 2, 64, 4
  params = model_lib.init_params(cfg, jax.random.key(0))
  toks = jnp.zeros((B, T), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T - Tt, T), (B, Tt))
  fwd = jax.jit(lambda p, t: model_lib.forward(p, t, cfg, logits_positions=pos).logits)
  cost = fwd.lower(params, toks).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ours = bench_gpu.forward_flops(cfg, B, T, Tt)
  assert 0.8 < ours / cost["flops"] < 1.2, (ours, cost["flops"])
  assert bench_gpu.matmul_params(bench_gpu.MODELS["llama-2-7b"]) == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
  assert np.isclose(bench_gpu.peak_flops(type("D", (), {"device_kind": "NVIDIA H200"})()), 989.4e12)
