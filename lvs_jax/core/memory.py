"""Memory plan before launching: bytes of weights, optimizer state and activations, in total and per device.

  python -m lvs_jax.core.memory --model=llama-3-8b --mesh=8 --batch=16 --seq=512
  python -m lvs_jax.core.memory --model=llama-3-70b --mesh=8x8 --rules=tensor --device_gb=80

Weights and optimizer state are exact: shapes from `jax.eval_shape` of the real initializers
(`model.init_params`, `training.lora.init`, the AdamW of `training.core.make_optimizer`), per-device
shard shapes from the same logical-axis rules the run uses (`sharding.param_shardings`,
`sharding.state_shardings`) on an abstract mesh (no devices needed). Activations are an analytic
count of what the backward pass keeps, per layer and token (in the spirit of Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", sec. 4), for the three attack /
training steps of this project:

  pgd    `lvs.attack`: fwd + bwd to a residual delta through every layer (no remat; worst case l = 0),
         the clean residual captured at every layer, target logits and their gradient in float32.
  gcg    `attacks.gcg`: `width` candidates per prompt evaluated forward only (one layer live at a time,
         float32 logits at the target positions) and the token-gradient pass over the P prompts;
         peak of the two phases, plus the prefix KV cache.
  r2d2   an adversarial-training step (HarmBench R2D2): fwd + bwd over `batch` rows with per-layer
         remat (`training.core.forward_train`): layer inputs of every layer, one layer's intermediates,
         float32 logits and their gradient.

Rows of the batch (prompts, candidates) are split over the "data" axis of the mesh; heads and MLP
hidden over "model" (tensor rules). Numbers are lower bounds on what XLA allocates (no fusion buffers,
no fragmentation): keep ~10-20% headroom.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp

from lvs_jax.core import model as model_lib
from lvs_jax.core import sharding
from lvs_jax.core.config import ModelConfig, RopeScaling

# Public config.json numbers (Hugging Face model repositories, main branch).
MODELS: dict[str, tuple[ModelConfig, str]] = {
  "llama-3-8b": (ModelConfig(
    arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
    rms_eps=1e-5, rope_theta=500000.0, max_position=8192),
    "https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json"),
  "llama-3-70b": (ModelConfig(
    arch="llama", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, head_dim=128, d_ff=28672,
    rms_eps=1e-5, rope_theta=500000.0, max_position=8192),
    "https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json"),
  "llama-3.1-8b": (ModelConfig(
    arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
    rms_eps=1e-5, rope_theta=500000.0, max_position=131072,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)),
    "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json"),
  "mistral-7b": (ModelConfig(
    arch="mistral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=14336,
    rms_eps=1e-5, rope_theta=10000.0, sliding_window=4096, max_position=32768),
    "https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json"),
  "qwen2-7b": (ModelConfig(
    arch="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128, d_ff=18944,
    rms_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, max_position=131072),
    "https://huggingface.co/Qwen/Qwen2-7B/blob/main/config.json"),
}

RULES = {"replicated": sharding.REPLICATED, "fsdp": sharding.FSDP, "tensor": sharding.TENSOR}
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Plan:
  """What one run needs. Shapes: B rows (prompts / training rows), T tokens per row, Tt target tokens,
  W GCG candidates per prompt; mesh = (data, model)."""

  batch: int = 8
  seq: int = 512
  target_len: int = 32
  width: int = 512
  gcg_prompts: int = 1
  suffix_len: int = 20
  lora_rank: int = 16
  data: int = 1
  model: int = 1
  rules: str = "fsdp"
  dtype: str = "bfloat16"


def _bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _per_device(tree, shardings) -> int:
  return int(sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))))


def abstract_params(cfg: ModelConfig, dtype=jnp.bfloat16) -> model_lib.Params:
  """Weight shapes via `jax.eval_shape` of the real initializer (no memory, no FLOPs)."""
  return jax.eval_shape(lambda k: model_lib.init_params(cfg, k, dtype), jax.random.key(0))


def n_params(cfg: ModelConfig) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg))))


def weights_and_optimizer(cfg: ModelConfig, plan: Plan) -> dict[str, tuple[int, int]]:
  """{component: (total bytes, bytes per device)} for inference weights, full AdamW fine-tuning
  (float32 master weights + mu + nu + gradients) and LoRA (frozen base in `plan.dtype`, float32
  adapters of rank plan.lora_rank on all seven linear maps + AdamW state + gradients)."""
  from lvs_jax.training import core as training
  from lvs_jax.training import lora as lora_lib

  mesh = sharding.abstract_mesh(plan.data, plan.model)
  rules = RULES[plan.rules]
  dt = jnp.dtype(plan.dtype)
  p = abstract_params(cfg, dt)
  p_sh = sharding.param_shardings(cfg, mesh, rules)
  out = {"weights": (_bytes(p), _per_device(p, p_sh))}
  # FSDP gathers each layer's weights before using them (scan: about two layers live, one prefetched).
  layer = _bytes(p.layers) // cfg.n_layers
  gathered = 0 if out["weights"][1] == out["weights"][0] else 2 * layer
  if plan.rules == "tensor":  # gathered over "data" only: each device keeps its "model" slice
    gathered //= plan.model
  out["fsdp.gathered_layers"] = (gathered, gathered)
  opt = training.make_optimizer(1e-5, weight_decay=0.0)

  master = abstract_params(cfg, jnp.float32)
  full = jax.eval_shape(lambda w: training.init_state(w, opt), master)
  full_sh = sharding.state_shardings(full, cfg, mesh, rules)
  opt_only = (_bytes(full.opt_state), _per_device(full.opt_state, full_sh.opt_state))
  out["full_ft.master_f32"] = (_bytes(master), _per_device(master, full_sh.params))
  out["full_ft.adamw_state"] = opt_only
  out["full_ft.grads_f32"] = out["full_ft.master_f32"]
  out["full_ft.compute_copy"] = out["weights"]  # weights cast to plan.dtype inside the step

  adapters = jax.eval_shape(lambda k: lora_lib.init(k, cfg, plan.lora_rank, 2 * plan.lora_rank), jax.random.key(0))
  lo = jax.eval_shape(lambda w: training.init_state(w, opt), adapters)
  lo_sh = sharding.state_shardings(lo, cfg, mesh, rules)
  out["lora.adapters_f32"] = (_bytes(adapters), _per_device(adapters, lo_sh.params))
  out["lora.adamw_state"] = (_bytes(lo.opt_state), _per_device(lo.opt_state, lo_sh.opt_state))
  out["lora.grads_f32"] = out["lora.adapters_f32"]
  return out


def _layer_bytes_per_token(cfg: ModelConfig, plan: Plan, S: int) -> float:
  """Bytes one layer keeps for its backward pass per token (activations in plan.dtype, attention scores
  in float32): residual in, two norm outputs, q/k/v before and after RoPE, attention output, o-proj
  output, gate, up, silu(gate) and their product; scores [H, S] float32 + probabilities [H, S]."""
  a = jnp.dtype(plan.dtype).itemsize
  m = plan.model if plan.rules == "tensor" else 1
  D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  dense = 5 * D + (2 * (H + 2 * K) * Dh + H * Dh + 4 * F) / m
  return a * dense + (4 + a) * H * S / m


def activations(cfg: ModelConfig, plan: Plan) -> dict[str, tuple[int, int]]:
  """{step: (total bytes, bytes per device)} of the pgd / gcg / r2d2 steps (see module docstring)."""
  a = jnp.dtype(plan.dtype).itemsize
  L, D, V, K, Dh = cfg.n_layers, cfg.d_model, cfg.vocab_size, cfg.n_kv_heads, cfg.head_dim
  T, Tt, d = plan.seq, plan.target_len, plan.data
  m = plan.model if plan.rules == "tensor" else 1

  def rows(n):  # per-device rows of an n-row batch split over "data"
    return -(-n // d)

  def pgd(b):
    per_layer = _layer_bytes_per_token(cfg, plan, T) * b * T * L
    clean = L * b * T * D * a  # clean pass: resid_pre captured at every layer
    logits = 2 * b * Tt * V * 4 / m  # float32 logits + their gradient
    delta = 3 * b * T * D * 4  # delta, its gradient, best delta (float32)
    return per_layer + clean + logits + delta

  def gcg(P, W):
    c = P * W
    cand = c * T * (_layer_bytes_per_token(cfg, plan, T) + 2 * D * a) + c * Tt * V * 4 / m
    grad = P * T * L * _layer_bytes_per_token(cfg, plan, T) + 2 * P * plan.suffix_len * V * 4
    cache = 2 * L * P * T * K * Dh * a / m
    return max(cand, grad) + cache

  def r2d2(b):
    inputs = L * b * T * D * a  # per-layer remat: only each layer's input is kept
    one_layer = _layer_bytes_per_token(cfg, plan, T) * b * T
    logits = 2 * b * T * V * 4 / m
    return inputs + one_layer + logits

  B, P, W = plan.batch, plan.gcg_prompts, plan.width
  return {
    "pgd_step": (int(pgd(B)), int(pgd(rows(B)))),
    "gcg_step": (int(gcg(P, W)), int(gcg(P, W) if P * W < d else gcg(P, W) / d)),
    "r2d2_step": (int(r2d2(B)), int(r2d2(rows(B)))),
  }


def plan_report(name: str, plan: Plan, device_gb: float | None = None) -> str:
  """The printed plan: one line per component, total and per device, and what fits."""
  cfg, source = MODELS[name]
  w = weights_and_optimizer(cfg, plan)
  act = activations(cfg, plan)
  lines = [f"{name}: {n_params(cfg) / 1e9:.2f}B parameters (config: {source})",
           f"mesh data={plan.data} x model={plan.model}, rules={plan.rules}, compute dtype={plan.dtype}; "
           f"batch={plan.batch} seq={plan.seq} target={plan.target_len} gcg width={plan.width} "
           f"lora rank={plan.lora_rank}",
           f"{'component':<24}{'total GB':>12}{'per device GB':>16}"]
  for k, (tot, dev) in {**w, **act}.items():
    lines.append(f"{k:<24}{tot / GB:>12.2f}{dev / GB:>16.2f}")
  steps = {
    "pgd / gcg (inference weights)": ("weights", "fsdp.gathered_layers"),
    "lora train (r2d2 step)": ("weights", "fsdp.gathered_layers", "lora.adapters_f32", "lora.adamw_state",
                               "lora.grads_f32"),
    "full fine-tune (r2d2 step)": ("full_ft.master_f32", "full_ft.adamw_state", "full_ft.grads_f32",
                                   "full_ft.compute_copy", "fsdp.gathered_layers"),
  }
  lines.append("per device, state + activations of the step:")
  for label, keys in steps.items():
    state = sum(w[k][1] for k in keys)
    for s in (("pgd_step", "gcg_step") if label.startswith("pgd") else ("r2d2_step",)):
      need = (state + act[s][1]) / GB
      fits = "" if device_gb is None else ("  fits" if need <= device_gb * 0.9 else "  DOES NOT FIT (90% of device)")
      lines.append(f"  {label:<32} {s:<10} {need:>9.2f} GB{fits}")
  return "\n".join(lines)


def _mesh(s: str) -> tuple[int, int]:
  parts = [int(x) for x in s.lower().split("x")]
  if len(parts) == 1:
    return parts[0], 1
  if len(parts) == 2:
    return parts[0], parts[1]
  raise argparse.ArgumentTypeError(f"--mesh must be DATA or DATAxMODEL, got {s!r}")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m lvs_jax.core.memory", description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
  ap.add_argument("--mesh", type=_mesh, default=(1, 1), help="devices: DATA or DATAxMODEL, e.g. 8 or 4x2")
  ap.add_argument("--rules", default="fsdp", choices=sorted(RULES))
  ap.add_argument("--batch", type=int, default=8, help="prompts (PGD) / training rows (R2D2)")
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--target_len", type=int, default=32)
  ap.add_argument("--width", type=int, default=512, help="GCG candidates per prompt")
  ap.add_argument("--gcg_prompts", type=int, default=1)
  ap.add_argument("--lora_rank", type=int, default=16)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--device_gb", type=float, default=None, help="device memory, e.g. 80 (H100) or 141 (H200)")
  a = ap.parse_args(argv)
  plan = Plan(batch=a.batch, seq=a.seq, target_len=a.target_len, width=a.width, gcg_prompts=a.gcg_prompts,
              lora_rank=a.lora_rank, data=a.mesh[0], model=a.mesh[1], rules=a.rules, dtype=a.dtype)
  print(plan_report(a.model, plan, a.device_gb))
  return 0


if __name__ == "__main__":
  sys.exit(main())
