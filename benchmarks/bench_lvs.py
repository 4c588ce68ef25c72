"""Sweep and PGD speed: lvs_jax vs a PyTorch reference (transformers + forward hooks), one process.

  python benchmarks/bench_lvs.py                                # the issue's grid: 30 x 8 x 4 x 32
  python benchmarks/bench_lvs.py --magnitudes=2 --directions=2 --prompts=8 --torch_cells=0

The PyTorch reference is written the way refusal_direction / latent-adversarial-training users
write it: a transformers model, a forward pre-hook on decoder layer l that adds m * ||h_t|| * d at
the prompt tokens, a Python loop over (layer, magnitude, direction) cells, each a full forward of
the prompt batch computing the same metrics (refusal score, target log-prob, KL); PGD with
autograd through the hooked model, sign steps and the same per-token L2 projection.

Timing: lvs_jax is compiled ahead of time (compile time reported apart) and the compiled function
timed `--repeats` times (median). Each torch cell costs one full forward, the same for every cell,
so with --torch_cells=k > 0 the reference times k random cells and scales to the grid (marked
"extrapolated"); --torch_cells=0 runs every cell.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from lvs_jax.evals import judges  # noqa: E402
from lvs_jax.io import datasets as data  # noqa: E402
from lvs_jax.io import registry  # noqa: E402
from lvs_jax.lvs import attack as lvs  # noqa: E402
from lvs_jax.lvs import sweeps  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct", "Named model or path.")
flags.DEFINE_integer("magnitudes", 8, "Sweep magnitudes.")
flags.DEFINE_integer("directions", 4, "Sweep directions (random unit).")
flags.DEFINE_integer("prompts", 32, "Sweep prompts (AdvBench, with targets).")
flags.DEFINE_integer("pgd_prompts", 16, "PGD prompts.")
flags.DEFINE_integer("pgd_steps", 16, "PGD steps.")
flags.DEFINE_integer("pgd_layer", 14, "PGD layer.")
flags.DEFINE_integer("torch_cells", 24, "Torch sweep cells actually timed (0 = all), scaled to the grid.")
flags.DEFINE_integer("repeats", 1, "Timed repeats of each compiled lvs_jax call (median).")
flags.DEFINE_integer("chunk", 8, "lvs_jax cells per vmapped chunk.")


def _median(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _torch_model(path):
  import torch
  import transformers

  if path.endswith(".gguf"):
    return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def torch_cell_metrics(tm, tt, tmask, pmask, tpos, targets, tw, ids, layer, vec, clean_logp):
  """One sweep cell, reference style: hook, full forward, metrics at the readout positions."""
  import torch

  def hook(module, args):
    h = args[0]
    return (h + pmask[..., None] * h.norm(dim=-1, keepdim=True) * vec,) + tuple(args[1:])

  handle = tm.model.layers[layer].register_forward_pre_hook(hook)
  try:
    logits = tm(tt, attention_mask=tmask).logits
  finally:
    handle.remove()
  logp = torch.log_softmax(logits[torch.arange(tt.shape[0])[:, None], tpos].float(), -1)
  lp_last = logp[:, 0]
  p_ref = lp_last[:, ids].logsumexp(-1)
  rest = torch.ones(logp.shape[-1], dtype=torch.bool)
  rest[ids] = False
  score = p_ref - lp_last[:, rest].logsumexp(-1)
  tlp = (logp.gather(-1, targets[..., None])[..., 0] * tw).sum(-1)
  kl = (clean_logp.exp() * (clean_logp - lp_last)).sum(-1)
  return score, tlp, kl


def bench_sweep(m, tm, ps, ids) -> tuple:
  """The full-layer perturbation sweep: lvs_jax (one compiled call) vs a torch loop over cells.
  Returns the (workload, lvs_jax s, torch s, compile s) row."""
  import torch

  L = m.cfg.n_layers
  batch = sweeps.make_batch(m.tokenizer, list(ps)[: FLAGS.prompts], ps.targets[: FLAGS.prompts])
  layers = jnp.arange(L)
  mags = jnp.linspace(0.0, 0.5, FLAGS.magnitudes)
  dirs = sweeps.random_directions(jax.random.key(0), FLAGS.directions, m.cfg.d_model)
  t0 = time.perf_counter()
  compiled = sweeps.sweep.lower(m.params, m.cfg, batch, layers, mags, dirs, ids, chunk=FLAGS.chunk).compile()
  compile_s = time.perf_counter() - t0
  jax_s = _median(lambda: jax.block_until_ready(compiled(m.params, batch, layers, mags, dirs, ids)), FLAGS.repeats)
  tt = torch.tensor(np.asarray(batch.tokens), dtype=torch.long)
  tmask = torch.tensor(np.asarray(batch.mask))
  pmask = torch.tensor(np.asarray(batch.prompt_mask), dtype=torch.float32)
  tpos = torch.tensor(np.asarray(sweeps.readout_positions(batch)), dtype=torch.long)
  targets = tt[:, batch.n_prompt:]
  tw = torch.tensor(np.asarray(batch.target_mask), dtype=torch.float32)
  tids = torch.tensor(np.asarray(ids), dtype=torch.long)
  with torch.no_grad():
    logits = tm(tt, attention_mask=tmask).logits
    clean_logp = torch.log_softmax(logits[:, batch.n_prompt - 1].float(), -1)
  cells = [(li, mi, di) for li in range(L) for mi in range(FLAGS.magnitudes) for di in range(FLAGS.directions)]
  rng = np.random.default_rng(0)
  timed = cells if FLAGS.torch_cells == 0 else [cells[i] for i in rng.choice(len(cells), FLAGS.torch_cells, False)]
  tdirs = torch.tensor(np.asarray(dirs))
  t0 = time.perf_counter()
  with torch.no_grad():
    for li, mi, di in timed:
      torch_cell_metrics(tm, tt, tmask, pmask, tpos, targets, tw, tids, li, float(mags[mi]) * tdirs[di], clean_logp)
  torch_s = (time.perf_counter() - t0) * len(cells) / len(timed)
  scaled = len(cells) / len(timed)
  note = "" if len(timed) == len(cells) else f" (torch: {len(timed)} cells timed, scaled x{scaled:.0f})"
  return f"sweep {L}x{FLAGS.magnitudes}x{FLAGS.directions}x{FLAGS.prompts}{note}", jax_s, torch_s, compile_s


def bench_pgd(m, tm, ps, ids) -> tuple:
  """PGD at one layer without early stopping: lvs_jax (compiled) vs the same loop in torch with hooks.
  Returns the (workload, lvs_jax s, torch s, compile s) row."""
  import torch

  pb = sweeps.make_batch(m.tokenizer, list(ps)[: FLAGS.pgd_prompts], ps.targets[: FLAGS.pgd_prompts])
  acfg = lvs.AttackConfig(steps=FLAGS.pgd_steps, success_loss=-1e9, stop="loss", random_start=False)  # no early stop
  eps, layer = 0.2, FLAGS.pgd_layer
  t0 = time.perf_counter()
  pgd = lvs.pgd_attack.lower(m.params, m.cfg, pb, ids, layer, eps, jax.random.key(0), acfg).compile()
  pgd_compile = time.perf_counter() - t0
  jax_pgd = _median(lambda: jax.block_until_ready(pgd(m.params, pb, ids, layer, eps, jax.random.key(0))),
                    FLAGS.repeats)
  tt = torch.tensor(np.asarray(pb.tokens), dtype=torch.long)
  tmask = torch.tensor(np.asarray(pb.mask))
  pmask = torch.tensor(np.asarray(pb.prompt_mask), dtype=torch.float32)[..., None]
  tpos = torch.tensor(np.asarray(sweeps.readout_positions(pb)), dtype=torch.long)
  targets = tt[:, pb.n_prompt:]
  tw = torch.tensor(np.asarray(pb.target_mask), dtype=torch.float32)
  for p in tm.parameters():
    p.requires_grad_(False)

  def torch_pgd():
    captured = {}

    def grab(module, args):
      captured["h"] = args[0].detach()

    hd = tm.model.layers[layer].register_forward_pre_hook(grab)
    with torch.no_grad():
      tm(tt, attention_mask=tmask)
    hd.remove()
    scale = captured["h"].norm(dim=-1, keepdim=True) * pmask
    delta = torch.zeros_like(captured["h"], requires_grad=True)
    hook = tm.model.layers[layer].register_forward_pre_hook(lambda mod, args: (args[0] + delta,) + tuple(args[1:]))
    try:
      for _ in range(FLAGS.pgd_steps):
        logits = tm(tt, attention_mask=tmask).logits
        logp = torch.log_softmax(logits[torch.arange(tt.shape[0])[:, None], tpos].float(), -1)
        nll = -(logp.gather(-1, targets[..., None])[..., 0] * tw).sum(-1) / tw.sum(-1)
        (g,) = torch.autograd.grad(nll.sum(), delta)
        with torch.no_grad():
          step = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
          delta -= acfg.step_size * eps * scale * step
          n = delta.norm(dim=-1, keepdim=True)
          delta *= torch.clamp(eps * scale / n.clamp_min(1e-30), max=1.0)
    finally:
      hook.remove()

  torch_pgd()  # warm-up
  torch_pgd_s = _median(torch_pgd, FLAGS.repeats)
  return f"PGD {FLAGS.pgd_steps} steps x {FLAGS.pgd_prompts} prompts (layer {layer})", jax_pgd, torch_pgd_s, pgd_compile


def main(_):
  import torch

  m = registry.load_model(FLAGS.model)
  path, _ = registry.resolve(FLAGS.model)
  tm = _torch_model(path)
  ps = data.load_prompts("advbench")[: max(FLAGS.prompts, FLAGS.pgd_prompts)]
  ids = jnp.asarray(judges.refusal_token_ids(m.tokenizer))
  rows = [bench_sweep(m, tm, ps, ids), bench_pgd(m, tm, ps, ids)]
  dev = jax.devices()[0]
  print(f"\nmodel={FLAGS.model} device={dev.platform}:{dev.device_kind} jax={jax.__version__} "
        f"torch={torch.__version__} threads={torch.get_num_threads()} dtype=float32")
  print(f"{'workload':<62}{'lvs_jax s':>11}{'torch s':>11}{'ratio':>8}{'compile s':>11}")
  for name, j, t, c in rows:
    print(f"{name:<62}{j:>11.2f}{t:>11.2f}{t / j:>8.2f}{c:>11.1f}")


if __name__ == "__main__":
  app.run(main)
