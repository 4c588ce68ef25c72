r"""R2D2 adversarial fine-tuning (HarmBench) or, with --config.adversarial=False (`:sft`), its matched SFT baseline.

  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py --workdir=/tmp/r2d2
  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py:sft --workdir=/tmp/r2d2_sft

Writes under --workdir: data/benign.jsonl (the base model's own answers to benign prompts: the clean SFT
data, reused on reruns), checkpoints/<step> (orbax: TrainState + test-case pool, every
`checkpoint.save_every` steps, all kept; each loads as `registry.load_model("<workdir>@<step>")`),
metrics.jsonl (per step: loss terms, their EMA, GCG and step seconds), pool.json (the final test cases)
and the report's "training" section. Re-running on the same workdir resumes from the last checkpoint.
"""

import os

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("Training config file.")


def memory_plan(cfg) -> int:
  """`lvs_jax.core.memory`'s plan of this config for model cfg.memory_plan on one H200 (GCG: one prompt,
  `chunk` candidates live at once)."""
  from lvs_jax.core import memory

  r = cfg.r2d2
  return memory.main([f"--model={cfg.memory_plan}", f"--batch={cfg.batch.batch_size}", f"--seq={cfg.batch.seq_len}",
                      f"--width={r.chunk}", "--gcg_prompts=1", f"--dtype={cfg.compute_dtype}",
                      f"--lora_rank={cfg.lora.rank}", "--device_gb=141"])


def main(argv):
  cfg, workdir = cli.setup(argv)
  if cfg.memory_plan:
    raise SystemExit(memory_plan(cfg))
  import jax.numpy as jnp

  from lvs_jax.io import datasets as data
  from lvs_jax.io import registry
  from lvs_jax.training import core as training
  from lvs_jax.training import r2d2, recipes

  log = lambda m: (logging.info(m), print(m, flush=True))  # noqa: E731
  if not cfg.model:
    raise ValueError("--config.model is empty: give the HF directory of the model to train")
  d = cfg.data
  held_out = [data.load_prompts(p) for p in cfg.held_out]
  pairs = data.load_prompts(d.pairs)
  pairs = data.sample(pairs, d.n_pairs, seed=cfg.seed) if d.n_pairs else pairs
  pairs, n1 = recipes.drop_overlap(pairs, *held_out)
  benign = data.sample(data.load_prompts(d.benign), d.n_benign, seed=cfg.seed)
  benign, n2 = recipes.drop_overlap(benign, *held_out)
  log(f"{len(pairs)} behaviors ({pairs.source}), {len(benign)} benign prompts ({n1 + n2} dropped as held out); "
      f"{'R2D2' if cfg.adversarial else 'matched SFT baseline'}")

  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  recs = recipes.own_completions(model, list(benign), max_new_tokens=d.completion_tokens, batch_size=d.gen_batch_size,
                                 retries=d.retries, cache_path=os.path.join(workdir, "data", "benign.jsonl"))
  examples = [training.Example(r["prompt"], r["completion"], end_turn=r["finished"]) for r in recs
              if r["completion"] and (not d.drop_refused or (not r["refused"] and r["completion"].strip()))]
  tok, n_trunc = training.tokenize(model.tokenizer, examples, cfg.batch.seq_len)
  log(f"{len(tok)} benign examples ({len(recs) - len(examples)} refused or empty dropped, {n_trunc} truncated)")

  trainer = r2d2.Trainer(model, list(pairs.prompts), list(pairs.targets), tok, cfg)
  state, step, ck = r2d2.start(model, trainer, cfg, workdir, log=log)
  state, rows = r2d2.run_loop(trainer, state, step, cfg.num_steps, checkpointer=ck, log=log, log_every=cfg.log_every,
                              metrics_path=os.path.join(workdir, "metrics.jsonl"), ema_decay=cfg.r2d2.ema_decay)
  r2d2.write_pool(os.path.join(workdir, "pool.json"), trainer, state.pool)
  r = cfg.r2d2
  kind = "R2D2 adversarial training" if cfg.adversarial else "Matched SFT baseline (R2D2 without the attack)"
  section = recipes.training_section(
    kind, rows, {},
    summary={"adversarial": bool(cfg.adversarial), "checkpoints": ck.steps(), "n_behaviors": len(pairs),
             "n_benign": len(tok), "gcg_seconds_per_step": recipes.seconds_per_step(
               [dict(seconds=x.get("gcg_seconds", 0.0)) for x in rows])},
    notes=f"{cfg.mode} fine-tuning of {cfg.model}. Loss = {r.sft_weight} x CE(benign own answers) + "
    f"{r.toward_weight} x CE(refusal '{r.refusal}' + EOS) "
    + (f"on behavior + GCG suffix + {r.away_weight} x away (HarmBench log(1-p), log p < {r.away_threshold} "
       f"zeroed) on the GCG target; {r.cases_per_step} pool entries get {r.gcg_steps} GCG steps (width "
       f"{r.search_width}, top-k {r.topk}) per training step; " if cfg.adversarial else
       "on the plain behavior (no attack, no away term); ")
    + f"pool of {r.pool_size}, {r.reset_fraction:.0%} replaced every {r.reset_every} steps. Seconds per step: "
    "median after the first.")
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype, config=cfg.to_dict())


if __name__ == "__main__":
  app.run(main)
