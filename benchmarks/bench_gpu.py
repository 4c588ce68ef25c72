"""Step time, tokens/s and model FLOP utilization (MFU) of the four hot loops, on random weights.

  python benchmarks/bench_gpu.py                                   # Llama-2-7B shape, bf16, all local devices
  python benchmarks/bench_gpu.py --model=llama-3-8b --batch=16 --seq=512 --repeats=10
  python benchmarks/bench_gpu.py --smoke                           # tiny config on CPU (tests)

Workloads (bf16 weights and activations, float32 accumulation and logits; rows over the "data" axis of
a mesh of every local device, weights FSDP when there is more than one device):

  forward  `model.forward` on [B, T], logits at the Tt target positions.
  pgd      one PGD iteration of `lvs.attack`: loss and gradient with respect to a residual delta
           [B, T, D] added at layer 0 (`attack.attack_loss` through every layer; no weight gradients).
  gcg      one GCG step at width W: the token gradient d loss / d one-hot(suffix) [n, V] for one prompt
           (through an edit at resid_pre of layer 0), then the target loss of W candidate sequences
           [W, T] (full forward per candidate: no prefix cache, so this is the upper bound of the step).
  lora     one LoRA train step (`training.core.make_train_step`, rank 16 on all seven linear maps,
           per-layer remat, AdamW) on [B, T].

Model FLOPs (MFU numerator; remat recomputation not counted): a forward costs 2 * N_matmul per token
plus attention 4 * S * H * Dh per token and layer (the full [T, S] score matrix, as computed) plus the
LM head at the positions that produce logits; a backward pass to activations only (PGD, GCG token
gradient, frozen base under LoRA) costs one more forward's worth. MFU = model FLOPs / step time /
(peak bf16 dense FLOP/s of the device x devices). Anchors from the issue: MaxText Llama-2-7B on
8 x H100 ~ 46% MFU; latent adversarial training on Llama-3-8B ~ 56 s per step with 16 PGD iterations
(the "lat_equiv" line prints 16 x pgd + 1 x lora at this batch and sequence).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import memory, sharding
from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.lvs import attack as lvs_attack
from lvs_jax.lvs import sweeps
from lvs_jax.training import core as training
from lvs_jax.training import lora as lora_lib

# Peak dense bf16 FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16 = {
  "H200": 989.4e12,  # NVIDIA H200 SXM datasheet
  "H100 80GB HBM3": 989.4e12,  # H100 SXM5
  "H100 PCIe": 756.0e12,
  "H100 NVL": 835.0e12,
  "GH200": 989.4e12,
  "A100": 312.0e12,
  "L40S": 362.05e12,
}

MODELS = {
  **{k: v[0] for k, v in memory.MODELS.items()},
  # The MaxText anchor's shape (https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json).
  "llama-2-7b": ModelConfig(arch="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                            head_dim=128, d_ff=11008, rms_eps=1e-5, max_position=4096),
  # The shipped default (SmolLM2-135M-Instruct's GGUF metadata), for CPU rows on the same script.
  "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                              head_dim=64, d_ff=1536, rms_eps=1e-5, rope_theta=1e5, tie_embeddings=True,
                              max_position=8192),
  "smoke": ModelConfig(arch="llama", vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                       d_ff=256, max_position=256),
}


@dataclasses.dataclass(frozen=True)
class Opts:
  model: str = "llama-2-7b"
  batch: int = 8
  seq: int = 512
  target_len: int = 32
  width: int = 512
  suffix_len: int = 20
  lora_rank: int = 16
  repeats: int = 5
  workloads: tuple[str, ...] = ("forward", "pgd", "gcg", "lora")
  dtype: str = "bfloat16"
  peak_flops: float | None = None


SMOKE = Opts(model="smoke", batch=4, seq=32, target_len=4, width=8, suffix_len=4, lora_rank=2, repeats=1,
             dtype="float32")


def peak_flops(device=None) -> float | None:
  """Peak bf16 dense FLOP/s of `device` (default: the first), None when not in the table (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, v in PEAK_BF16.items():
    if name in kind:
      return v
  return None


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that enter matmuls per token in the blocks (attention + MLP), LM head excluded."""
  D, H, K, Dh, F, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.n_layers
  return L * (D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F)


def forward_flops(cfg: ModelConfig, rows: int, T: int, logit_positions: int) -> float:
  """Model FLOPs of one forward over rows x T tokens, logits at `logit_positions` per row."""
  attn = 4 * T * cfg.n_heads * cfg.head_dim * cfg.n_layers  # per token: QK^T and PV over S = T slots
  return rows * (T * (2 * matmul_params(cfg) + attn) + logit_positions * 2 * cfg.d_model * cfg.vocab_size)


def _time(fn, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `repeats` further calls); blocks on results."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def _sweep_batch(cfg: ModelConfig, B: int, T: int, Tt: int, rng) -> sweeps.SweepBatch:
  tp = T - Tt
  toks = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
  ones = np.ones((B, T), np.int32)
  pm = np.concatenate([np.ones((B, tp), np.int32), np.zeros((B, Tt), np.int32)], 1)
  return sweeps.SweepBatch(toks, ones, pm, np.ones((B, Tt), np.int32), tp)


def _pgd(params, cfg, sb, ids, mesh, B, T, Tt):
  """One PGD iteration: loss and gradient with respect to a residual delta at layer 0."""
  acfg = lvs_attack.AttackConfig()

  @jax.jit
  def pgd_step(p, b, delta):
    ctx = model_lib.context(b.mask, cfg)
    h0 = model_lib.embed(p, b.tokens)
    loss = lambda d: lvs_attack.attack_loss(p, cfg, ctx, b, ids, h0, jnp.int32(0), d, acfg).sum()  # noqa: E731
    return jax.value_and_grad(loss)(delta)

  delta = jax.device_put(jnp.zeros((B, T, cfg.d_model), jnp.float32), sharding.batch_sharding(mesh, 3))
  return "pgd", lambda: pgd_step(params, sb, delta), 2 * forward_flops(cfg, B, T, Tt), B * T


def _gcg(params, cfg, batch, mesh, rng, opts, T, Tt):
  """One GCG step: the one-hot token gradient of one prompt, then the losses of W candidates."""
  W, n = opts.width, opts.suffix_len
  s0 = T - Tt - n - 4  # suffix slots, then 4 template tokens, then the target

  @jax.jit
  def token_grad(p, toks, onehot):
    # d loss / d one-hot(suffix): the embedding swap enters as an edit at resid_pre of layer 0.
    emb = onehot.astype(p.embed.dtype) @ p.embed - p.embed[toks[0, s0:s0 + n]]
    add = jnp.zeros((1, T, cfg.d_model), emb.dtype).at[0, s0:s0 + n].set(emb)
    e = {"resid_pre": edit_lib.SiteEdit(add=edit_lib.layer_mask(cfg.n_layers, 0)[:, None, None, None]
                                        .astype(emb.dtype) * add[None])}
    pos1 = jnp.arange(T - Tt - 1, T - 1)[None]
    logits = model_lib.forward(p, toks, cfg, edit=e, logits_positions=pos1).logits
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[:, T - Tt:, None], -1).mean()
    return nll

  gcg_grad = jax.jit(jax.grad(token_grad, argnums=2))
  toks1 = sharding.replicate(np.asarray(batch.tokens[:1]), mesh)
  onehot = jax.nn.one_hot(toks1[0, s0:s0 + n], cfg.vocab_size, dtype=jnp.float32)
  cands = np.repeat(np.asarray(batch.tokens[:1]), W, 0)
  cands[np.arange(W), s0 + rng.integers(0, n, W)] = rng.integers(3, cfg.vocab_size, W)
  cpos = np.broadcast_to(np.arange(T - Tt - 1, T - 1), (W, Tt)).astype(np.int32)
  c = sharding.shard_rows(dict(t=cands, m=np.ones_like(cands), p=cpos, l=cands[:, T - Tt:],
                               w=np.ones((W, Tt), np.int32)), mesh)

  def gcg_step():
    g = gcg_grad(params, toks1, onehot)
    losses = sharding._candidate_losses(params, cfg, c["t"], c["m"], c["p"], c["l"], c["w"])
    return g, losses

  flops = 2 * forward_flops(cfg, 1, T, Tt) + forward_flops(cfg, W, T, Tt)
  return f"gcg(w={W})", gcg_step, flops, (W + 1) * T


def _lora(params, cfg, mesh, rules, rng, opts, dtype, B, T):
  """One LoRA train step (rank opts.lora_rank, remat, AdamW) on [B, T]."""
  opt = training.make_optimizer(1e-4)
  state0 = training.init_state(lora_lib.init(jax.random.key(1), cfg, opts.lora_rank, 2 * opts.lora_rank), opt)
  sh = sharding.state_shardings(state0, cfg, mesh, rules)
  st = [sharding.place_state(state0, sh)]
  step = sharding.make_train_step(cfg, opt, mesh, sh, params, compute_dtype=dtype, remat=True)
  toks = rng.integers(3, cfg.vocab_size, (1, B, T)).astype(np.int32)
  tb = training.Batch(tokens=toks, targets=np.roll(toks, -1, -1), loss_mask=np.ones((1, B, T), np.float32),
                      segment_ids=np.ones((1, B, T), np.int32), positions=np.broadcast_to(np.arange(T), (1, B, T)))
  tb = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tb, sharding.batch_shardings(mesh))

  def lora_step():
    st[0], m = step(st[0], tb)
    return m["loss"]

  return "lora_train", lora_step, 2 * forward_flops(cfg, B, T, T), B * T


def run(opts: Opts, mesh=None) -> list[dict]:
  """Runs the workloads; returns one row per workload: seconds, tokens/s, model TFLOP/s and MFU."""
  cfg = MODELS[opts.model]
  dtype = jnp.dtype(opts.dtype)
  mesh = mesh or sharding.make_mesh()
  n_dev = mesh.devices.size
  rules = sharding.FSDP if n_dev > 1 else sharding.REPLICATED
  p_sh = sharding.param_shardings(cfg, mesh, rules)
  # Random weights generated in place, already sharded: no host copy, no full copy on one device.
  params = jax.jit(lambda k: model_lib.init_params(cfg, k, dtype), out_shardings=p_sh)(jax.random.key(0))
  peak = opts.peak_flops or peak_flops()
  rng = np.random.default_rng(0)
  B, T, Tt = opts.batch, opts.seq, opts.target_len
  rows = []

  def record(name, fn, flops, tokens):
    first, sec = _time(fn, opts.repeats)
    tf = flops / sec
    rows.append(dict(workload=name, seconds=sec, compile_s=first, tokens_per_s=tokens / sec, tflops=tf / 1e12,
                     mfu=None if peak is None else tf / (peak * n_dev)))

  batch = _sweep_batch(cfg, B, T, Tt, rng)
  sb = sweeps.SweepBatch(**sharding.shard_rows(dict(tokens=batch.tokens, mask=batch.mask,
                                                    prompt_mask=batch.prompt_mask, target_mask=batch.target_mask),
                                               mesh), n_prompt=batch.n_prompt)
  ids = sharding.replicate(np.array([5, 7], np.int32), mesh)
  pos = sweeps.readout_positions(sb)

  if "forward" in opts.workloads:
    fwd = jax.jit(lambda p, t, m: model_lib.forward(p, t, cfg, attention_mask=m, logits_positions=pos).logits)
    record("forward", lambda: fwd(params, sb.tokens, sb.mask), forward_flops(cfg, B, T, Tt), B * T)
  if "pgd" in opts.workloads:
    record(*_pgd(params, cfg, sb, ids, mesh, B, T, Tt))
  if "gcg" in opts.workloads:
    record(*_gcg(params, cfg, batch, mesh, rng, opts, T, Tt))
  if "lora" in opts.workloads:
    record(*_lora(params, cfg, mesh, rules, rng, opts, dtype, B, T))

  by = {r["workload"]: r for r in rows}
  if "pgd" in by and "lora_train" in by:
    sec = 16 * by["pgd"]["seconds"] + by["lora_train"]["seconds"]
    rows.append(dict(workload="lat_equiv(16 pgd + 1 lora)", seconds=sec, compile_s=0.0,
                     tokens_per_s=B * T / sec, tflops=float("nan"), mfu=None))
  return rows


def format_rows(rows: list[dict], opts: Opts) -> str:
  dev = jax.devices()[0]
  head = (f"{opts.model} {opts.dtype} batch={opts.batch} seq={opts.seq} target={opts.target_len} on "
          f"{len(jax.devices())} x {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  lines = [head, f"{'workload':<28}{'step s':>10}{'compile s':>11}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"]
  for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    tf = "" if math.isnan(r["tflops"]) else f"{r['tflops']:.2f}"
    lines.append(f"{r['workload']:<28}{r['seconds']:>10.4f}{r['compile_s']:>11.1f}{r['tokens_per_s']:>12.0f}"
                 f"{tf:>10}{mfu:>8}")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="benchmarks/bench_gpu.py", description=__doc__.split("\n")[0])
  d = Opts()
  ap.add_argument("--model", default=d.model, choices=sorted(MODELS))
  ap.add_argument("--smoke", action="store_true", help="tiny config, one repeat (CPU; tests)")
  for f in ("batch", "seq", "target_len", "width", "suffix_len", "lora_rank", "repeats"):
    ap.add_argument(f"--{f}", type=int, default=getattr(d, f))
  ap.add_argument("--workloads", default=",".join(d.workloads))
  ap.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float32"))
  ap.add_argument("--peak_tflops", type=float, default=None, help="device peak when not in the table")
  a = ap.parse_args(argv)
  if a.smoke:
    opts = SMOKE
  else:
    opts = Opts(model=a.model, batch=a.batch, seq=a.seq, target_len=a.target_len, width=a.width,
                suffix_len=a.suffix_len, lora_rank=a.lora_rank, repeats=a.repeats, dtype=a.dtype,
                workloads=tuple(a.workloads.split(",")),
                peak_flops=None if a.peak_tflops is None else a.peak_tflops * 1e12)
  print(format_rows(run(opts), opts), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
