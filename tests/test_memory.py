"""Memory plan: exact weight / optimizer bytes from jax.eval_shape, per-device shards, activation scaling."""

import dataclasses

import pytest

from lvs_jax.core import memory


def test_llama3_8b_bf16_weights_match_the_published_size():
  cfg, _ = memory.MODELS["llama-3-8b"]
  w = memory.weights_and_optimizer(cfg, memory.Plan())["weights"][0]
  assert abs(w - 8.03e9 * 2) / (8.03e9 * 2) < 0.01, w


@pytest.mark.parametrize("name,billions", [("mistral-7b", 7.24), ("qwen2-7b", 7.62), ("llama-3-70b", 70.55)])
def test_parameter_counts_of_the_other_configs(name, billions):
  # Published sizes: Mistral-7B-v0.1 7.24B, Qwen2-7B 7.62B (model cards), Llama-3-70B 70.6B.
  cfg, src = memory.MODELS[name]
  assert src.startswith("https://huggingface.co/")
  assert abs(memory.n_params(cfg) / 1e9 - billions) / billions < 0.01


def test_per_device_bytes_follow_the_mesh_and_the_optimizer():
  cfg, _ = memory.MODELS["llama-3-8b"]
  one = memory.weights_and_optimizer(cfg, memory.Plan(data=1))
  eight = memory.weights_and_optimizer(cfg, memory.Plan(data=8, rules="fsdp"))
  rep = memory.weights_and_optimizer(cfg, memory.Plan(data=8, rules="replicated"))
  assert one["weights"][1] == one["weights"][0]
  assert abs(eight["weights"][1] * 8 / eight["weights"][0] - 1) < 0.01  # FSDP: ~1/8 per device
  assert rep["weights"][1] == rep["weights"][0]
  assert rep["fsdp.gathered_layers"][1] == one["fsdp.gathered_layers"][1] == 0
  assert eight["fsdp.gathered_layers"][1] == 2 * 218_112_000 * 2  # two Llama-3-8B layers in bf16
  # AdamW: mu + nu in float32 = 2 x the float32 master weights (+ a counter), sharded like them.
  assert abs(one["full_ft.adamw_state"][0] / one["full_ft.master_f32"][0] - 2) < 1e-3
  assert abs(eight["full_ft.adamw_state"][1] * 8 / eight["full_ft.adamw_state"][0] - 1) < 0.01
  assert one["lora.adapters_f32"][0] < one["weights"][0] / 50


def test_activations_scale_with_batch_and_split_over_data():
  cfg, _ = memory.MODELS["llama-3-8b"]
  base = memory.Plan(batch=8, seq=256, data=1)
  a1 = memory.activations(cfg, base)
  a2 = memory.activations(cfg, dataclasses.replace(base, batch=16))
  a8 = memory.activations(cfg, dataclasses.replace(base, data=8))
  assert 1.95 < a2["pgd_step"][0] / a1["pgd_step"][0] <= 2.0
  assert a8["pgd_step"][1] * 8 == pytest.approx(a8["pgd_step"][0], rel=1e-6)
  assert a1["r2d2_step"][0] < a1["pgd_step"][0]  # remat keeps far less than PGD's unrematerialized pass
  long = memory.activations(cfg, dataclasses.replace(base, seq=512))
  assert long["gcg_step"][0] > 2 * a1["gcg_step"][0]  # attention scores grow as seq^2


def test_cli_prints_the_plan(capsys):
  assert memory.main(["--model=qwen2-7b", "--mesh=4x2", "--rules=tensor", "--device_gb=80"]) == 0
  out = capsys.readouterr().out
  assert "qwen2-7b: 7.62B parameters" in out and "mesh data=4 x model=2" in out
  assert "full fine-tune (r2d2 step)" in out and "fits" in out
  with pytest.raises(SystemExit):
    memory.main(["--mesh=2x2x2"])
