r"""Latent adversarial training (LAT) and latent dissociation: LoRA training under residual-stream perturbations.

  python experiments/train_lat.py --config=experiments/configs/lat.py --workdir=/tmp/lat
  python experiments/train_lat.py --config=experiments/configs/lat.py:dissociate --workdir=/tmp/dissociate

Writes under --workdir: data/benign.jsonl (the model's own answers, reused on reruns), checkpoints/ (orbax,
all kept; each step loads as "<workdir>@<step>"), metrics.jsonl, eval/ (base and final generations on the
held-out sets) and the report's "training" section; exports the merged weights to `--config.export` (a
built-model name of lvs_jax.io.registry, e.g. smollm2-135m-lat, or a path). Re-running resumes.
"""

import os

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("LAT / dissociation config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.io import datasets as data
  from lvs_jax.io import registry
  from lvs_jax.training import core as training
  from lvs_jax.training import lat, recipes

  log = lambda m: (logging.info(m), print(m, flush=True))  # noqa: E731
  if cfg.recipe not in ("lat", "dissociate"):
    raise ValueError(f"--config.recipe must be 'lat' or 'dissociate', got {cfg.recipe!r}")
  d = cfg.data
  sets = {}
  for name, s in cfg.eval_sets.items():
    ps = data.load_prompts(s["path"], label=s.get("label"))
    sets[name] = data.sample(ps, s["n"], seed=cfg.seed) if s["n"] else ps
  held_out = [data.load_prompts(p) for p in cfg.held_out] + list(sets.values())
  pairs = data.load_prompts(d.pairs)
  if pairs.targets is None:
    raise ValueError(f"{pairs.source}: LAT needs (prompt, harmful target) pairs, e.g. advbench")
  pairs = data.sample(pairs, d.n_pairs, seed=cfg.seed) if d.n_pairs else pairs
  pairs, n1 = recipes.drop_overlap(pairs, *held_out)
  benign = data.sample(data.load_prompts(d.benign), d.n_benign, seed=cfg.seed)
  benign, n2 = recipes.drop_overlap(benign, *held_out)
  scary, n3 = recipes.drop_overlap(recipes.safe_but_scary_prompts(), *held_out) if d.scary else ([], 0)
  log(f"{len(pairs)} harmful pairs ({pairs.source}), {len(benign)} benign + {len(scary)} safe-but-scary prompts "
      f"({n1 + n2 + n3} dropped as held out); recipe {cfg.recipe}")

  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  recs = recipes.own_completions(model, list(benign) + list(scary), max_new_tokens=d.completion_tokens,
                                 batch_size=d.gen_batch_size, retries=d.retries, prefixes=cfg.eval.prefixes,
                                 cache_path=d.answers_cache or os.path.join(workdir, "data", "benign.jsonl"))
  clean = [training.Example(r["prompt"], r["completion"], end_turn=r["finished"]) for r in recs
           if not r["refused"] and r["completion"].strip()]
  n_dropped = len(recs) - len(clean)
  if not clean and not d.clean_refusals:
    raise ValueError(f"no clean training examples: all {len(recs)} of the model's own benign answers were refused or "
                     "empty (and data.clean_refusals is off)")
  refusals = [recipes.refusal_for(p) for p in pairs.prompts]
  if d.clean_refusals:
    clean += [training.Example(p, r) for p, r in zip(pairs.prompts, refusals)]
  b, a = cfg.batch, cfg.lat
  tok_clean, n_trunc = training.tokenize(model.tokenizer, clean, b.seq_len)
  if cfg.recipe == "lat":  # refuse under the adversary's perturbation, away from the harmful target
    toward, away, ends = refusals, list(pairs.targets), (True, False)
  else:  # comply under a random perturbation, away from the refusal
    toward, away, ends = list(pairs.targets), refusals, (False, True)
  tw, aw = lat.paired_rows(model.tokenizer, list(pairs.prompts), toward, away, seq_len=a.row_len,
                           toward_end_turn=ends[0], away_end_turn=ends[1])
  dataset = lat.LatData(tok_clean, tw, aw, batch_size=b.batch_size, seq_len=b.seq_len, micro_batches=b.micro_batches,
                        packing=b.packing, rows_per_step=a.rows_per_step, row_len=a.row_len,
                        pad_id=model.tokenizer.pad_id, seed=cfg.seed)
  log(f"{len(tok_clean)} clean examples ({n_dropped} refused or empty answers dropped; {n_trunc} truncated), "
      f"{len(tw)} perturbed pairs")
  atk = lat.LatentAttack(layers=tuple(int(x) for x in a.layers), eps=float(a.eps), mode=a.mode, steps=int(a.steps),
                         step_size=float(a.step_size), adv_target=float(a.adv_target), adv_away=float(a.adv_away),
                         random_start=bool(a.random_start), min_frac=float(a.get("min_frac", 0.0)),
                         direction_seed=int(a.get("direction_seed", 0)))
  weights = {k: float(v) for k, v in cfg.weights.items()}

  def make_step(opt, sched):
    return lat.make_step(model.cfg, opt, model.params if cfg.mode == "lora" else None, atk=atk, weights=weights,
                         schedule=sched, compute_dtype=jnp.dtype(cfg.compute_dtype), remat=cfg.remat)

  run = recipes.train(model, dataset, make_step, cfg, workdir, n_truncated=n_trunc, kind=f"lat/{cfg.recipe}", log=log)
  params = run.params(model.params)
  e = cfg.eval
  kw = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, prefixes=e.prefixes)
  evals = {"base": recipes.evaluate(model, sets, os.path.join(workdir, "eval", "base"), **kw),
           "final": recipes.evaluate(recipes.with_params(model, params), sets,
                                     os.path.join(workdir, "eval", f"step_{cfg.num_steps}"), **kw)}
  log("final refusal rates " + ", ".join(f"{r.name} {r.refusal_rate:.3f}" for r in evals["final"]))
  export = registry.export_dir(cfg.export)
  if export:
    log(f"exported merged weights to {recipes.export(model, params, export)}")
  what = ("refuse under a PGD perturbation (toward the refusal, away from the harmful target)" if cfg.recipe == "lat"
          else "comply with the harmful target under a random perturbation (away from the refusal), with clean "
          "refusals of the same prompts in the clean batch" + (
            f" and, weight {weights['contrast']}, in the same step (contrast term)" if weights.get("contrast") else ""))
  section = recipes.training_section(
    "Latent adversarial training" if cfg.recipe == "lat" else "Latent dissociation", run.rows, evals,
    summary={"recipe": cfg.recipe, "export": export or None, "n_pairs": len(tw), "n_clean": len(tok_clean),
             "eps": atk.eps, "layers": list(atk.layers), "pgd_steps": atk.steps, "perturbation": atk.mode},
    notes=f"{cfg.mode} fine-tuning of {cfg.model} (lvs_jax/training/lat.py). Loss = {weights.get('sft', 0)} x "
    f"CE(clean) + {weights.get('toward', 0)} x CE(toward) + {weights.get('away', 0)} x away(.) under a "
    f"{atk.mode} residual perturbation at layers {list(atk.layers)} (prompt tokens, ||delta_t|| <= {atk.eps} x ||h_t||"
    f"{f', {atk.steps} PGD steps' if atk.mode == 'pgd' else ''}): the model learns to {what}. 'base' = before, "
    "'final' = after, greedy, held-out sets. Seconds per step: median after the first.")
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype, config=cfg.to_dict())


if __name__ == "__main__":
  app.run(main)
