r"""Harmful fine-tuning attack: fine-tune on (harmful prompt, compliant target) pairs, ASR at every checkpoint.

  python experiments/harmful_finetune.py --config=experiments/configs/harmful_finetune.py --workdir=/tmp/harmful_ft

Writes under --workdir: checkpoints/ (orbax, every `checkpoint.save_every` steps, all kept),
metrics.jsonl (one row per step), eval/step_<s>/ (generations at each checkpoint), trajectory.csv
(ASR vs step) and the report's "training" section. Re-running on the same workdir resumes both the
training (last committed checkpoint) and the per-checkpoint evaluation (finished steps are reused).
"""

import os

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("Training config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.io import checkpoints, registry
  from lvs_jax.io import datasets as data
  from lvs_jax.training import core as training
  from lvs_jax.training import recipes as sft

  log = lambda m: (logging.info(m), print(m, flush=True))  # noqa: E731

  sets = {}
  for name, s in cfg.eval_sets.items():
    ps = data.load_prompts(s["path"], label=s.get("label"))
    sets[name] = data.sample(ps, s["n"], seed=cfg.seed) if s["n"] else ps
  pairs = data.load_prompts(cfg.data.pairs)
  pairs = data.sample(pairs, cfg.data.n_pairs, seed=cfg.seed) if cfg.data.n_pairs else pairs
  pairs, dropped = sft.drop_overlap(pairs, *sets.values())
  log(f"{len(pairs)} (prompt, target) pairs from {pairs.source} ({dropped} dropped as overlapping held-out sets)")

  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  run = sft.finetune(model, sft.attack_examples(pairs, end_turn=cfg.data.end_turn), cfg, workdir, log=log)
  e = cfg.eval

  def attack_success(step, state):
    params = training.model_params(state.params, model.params)
    out = {}
    for r in sft.evaluate(sft.with_params(model, params), sets, os.path.join(workdir, "eval", f"step_{step}"),
                          max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, prefixes=e.prefixes):
      m = sft.attack_success(r, e.min_continued_words)
      a, c = m["asr"], m["asr_continued"]
      sfx = f"/{r.name}" if len(sets) > 1 else ""
      out.update({f"asr{sfx}": 1 - r.refusal_rate, f"n{sfx}": r.n, f"ci95_low{sfx}": a["low"],
                  f"ci95_high{sfx}": a["high"], f"asr_continued{sfx}": c["rate"], f"ci95_low_continued{sfx}": c["low"],
                  f"ci95_high_continued{sfx}": c["high"]})
    log(f"step {step}: {out}")
    return out

  traj = checkpoints.trajectory(run.checkpointer.directory, run.abstract_state, attack_success,
                                os.path.join(workdir, "trajectory.csv"), log=log)
  key = "asr" if len(sets) == 1 else f"asr/{next(iter(sets))}"
  ckey = key.replace("asr", "asr_continued")
  first, last = traj[0], traj[-1]
  section = sft.training_section(
    "Harmful fine-tuning attack", run.rows, {}, trajectory=traj,
    summary={"attack_model": cfg.model, f"{key}@step{first['step']}": first[key],
             f"{key}@step{last['step']}": last[key], f"{ckey}@step{first['step']}": first[ckey],
             f"{ckey}@step{last['step']}": last[ckey], "n_pairs": len(pairs)},
    notes=f"{cfg.mode} fine-tuning of {cfg.model} on {len(pairs)} (harmful prompt, target) pairs from "
    f"{cfg.data.pairs}; loss on the target tokens only. ASR = 1 - refusal rate of greedy generations "
    f"({e.max_new_tokens} new tokens) on held-out {', '.join(sets)}, judged by the {e.prefixes} refusal phrases "
    "(a keyword judge: it measures 'did not refuse', not harmfulness); asr_continued also needs >= "
    f"{e.min_continued_words} words after the completion's first sentence or line (more than an echoed 'Sure, "
    f"here is ...' opening). end_turn={cfg.data.end_turn}. Seconds per step: median after the first.")
  export = registry.export_dir(cfg.get("export", ""))
  if export:
    log(f"exported merged weights to {sft.export(model, run.params(model.params), export)}")
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype, config=cfg.to_dict())


if __name__ == "__main__":
  app.run(main)
