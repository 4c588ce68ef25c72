r"""Safety SFT: refusals for harmful prompts + the model's own helpful answers; builds the aligned anchor.

  python experiments/train_sft.py --config=experiments/configs/safety_sft.py --workdir=/tmp/safety_sft

Writes under --workdir: data/*.jsonl (the model's own completions, reused on reruns), checkpoints/
(orbax, every `checkpoint.save_every` steps, all kept), metrics.jsonl (one row per step), eval/
(generations of the base and the fine-tuned model on the held-out sets) and the report's "training"
section (report.json, report.html, tables/, figures/). Re-running on the same workdir resumes from the
last committed checkpoint. With --config.export (default "registry") the merged weights are written as
an HF directory; "registry" is where `load_model("smollm2-135m-aligned")` looks.
"""

import os

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("Training config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.io import datasets as data
  from lvs_jax.io import registry
  from lvs_jax.training import recipes as sft

  log = lambda m: (logging.info(m), print(m, flush=True))  # noqa: E731

  # Every prompt set first (a bad path fails before the model loads); training data never overlaps them.
  def load(path, n, label=None):
    ps = data.load_prompts(path, label=label)
    return data.sample(ps, n, seed=cfg.seed) if n else ps

  sets = {name: load(s["path"], s["n"], s.get("label")) for name, s in cfg.eval_sets.items()}
  held_out = list(sets.values()) + [data.load_prompts("xstest")]
  d = cfg.data
  harmful, n1 = sft.drop_overlap(load(d.harmful, d.n_harmful), *held_out)
  harmless, scary, n2, n3 = [], [], 0, 0
  if not d.get("refusal_only", False):  # refusal_only: the re-alignment stage of the "realign" dissociated model
    pool = data.load_prompts(d.harmless)
    harmless = data.sample(pool, d.n_harmless, seed=cfg.seed)
    if d.n_harmless_questions:  # appended, so the cached completions of the first part stay valid
      chosen = set(harmless)
      questions = pool.take([i for i, p in enumerate(pool) if p.rstrip().endswith("?") and p not in chosen])
      harmless = data.PromptSet(list(harmless) + list(data.sample(questions, d.n_harmless_questions, seed=cfg.seed)))
    harmless, n2 = sft.drop_overlap(harmless, *held_out)
    scary, n3 = sft.drop_overlap(sft.safe_but_scary_prompts(), *held_out)
    scary = data.sample(scary, d.n_scary, seed=cfg.seed) if d.n_scary else scary
  log(f"training prompts: {len(harmful)} harmful, {len(harmless)} harmless, {len(scary)} safe-but-scary "
      f"({n1 + n2 + n3} dropped as overlapping held-out sets)")
  sel = cfg.get("select") or {}
  stop_set = None
  if sel.get("sets"):  # the stopping set: disjoint from training prompts (this run's and `exclude`) and held-out sets
    pool = data.PromptSet([p for name in sel["sets"] for p in data.load_prompts(name)])
    pool, n4 = sft.drop_overlap(pool, harmful, *held_out, *[data.load_prompts(x) for x in sel["exclude"]])
    if not pool or len(pool) < sel["n"]:
      raise ValueError(f"select.sets={tuple(sel['sets'])}: {len(pool)} prompts left after dropping {n4} that overlap "
                       f"the training, excluded or held-out sets; select.n={sel['n']} asks for more")
    stop_set = data.sample(pool, sel["n"], seed=cfg.seed) if sel["n"] else pool
    log(f"stopping set: {len(stop_set)} prompts of {'+'.join(sel['sets'])} ({n4} overlapping dropped)")

  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  helpful = []
  for name, ps in (("harmless", harmless), ("scary", scary)):
    recs = sft.own_completions(model, list(ps), max_new_tokens=d.completion_tokens, batch_size=d.gen_batch_size,
                               retries=d.retries, prefixes=cfg.eval.prefixes,
                               cache_path=os.path.join(workdir, "data", f"{name}.jsonl"))
    helpful += [dict(r, set=name) for r in recs]
  examples, counts = sft.safety_sft_examples(list(harmful), helpful, refusal_repeat=d.refusal_repeat,
                                             helpful_repeat={"scary": d.scary_repeat})
  log(f"examples: {counts}")

  run = sft.finetune(model, examples, cfg, workdir, log=log)
  params = run.params(model.params)
  e = cfg.eval
  kw = dict(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, prefixes=e.prefixes)
  step, select_rows, select_summary = cfg.num_steps, [], {}
  if stop_set is not None:
    from lvs_jax.evals import stats

    ref = registry.load_model(sel["reference"], dtype=jnp.dtype(cfg.dtype))
    r = sft.evaluate(ref, {"select": list(stop_set)}, os.path.join(workdir, "eval", "select", "reference"), **kw)[0]
    ref_rate = stats.rate(r.n_refused, r.n)
    bound = ref_rate["low"] if sel["bound"] == "low" else ref_rate["rate"]
    log(f"stopping rule: {sel['reference']} refuses {r.n_refused}/{r.n} of the stopping set; bound ({sel['bound']}) "
        f"{bound:.3f}")
    steps = [s for s in run.checkpointer.steps() if 0 < s <= cfg.num_steps]
    chosen, select_rows = sft.select_checkpoint(model, run.checkpointer.directory, steps, stop_set, at_least=bound,
                                                out_dir=os.path.join(workdir, "eval", "select"), log=log, **kw)
    if chosen is None:
      log(f"stopping rule: no checkpoint reached {bound:.3f}; keeping the last step {cfg.num_steps}")
    elif chosen != cfg.num_steps:
      step, params = chosen, sft.checkpoint_params(run.checkpointer.directory, chosen, model)
    select_summary = {"select/reference": sel["reference"], "select/reference_rate": ref_rate["rate"],
                      "select/bound": bound, "select/reached": chosen is not None, "select/step": step}
  evals = {}
  if e.base:
    evals["base"] = sft.evaluate(model, sets, os.path.join(workdir, "eval", "base"), **kw)
  final_dir = os.path.join(workdir, "eval", f"step_{step}")
  final = sft.evaluate(sft.with_params(model, params), sets, final_dir, **kw)
  evals["final"] = final
  rate = {r.name: r.refusal_rate for r in final}
  t = cfg.targets
  met = dict(harmful_refused=rate.get("harmful", 0) >= t.harmful_refused,
             harmless_answered=1 - rate.get("harmless", 1) >= t.harmless_answered,
             xstest_safe_answered=1 - rate.get("xstest_safe", 1) >= t.xstest_safe_answered)
  log(f"final refusal rates {rate}; thresholds met: {met}")

  export = registry.export_dir(cfg.export)
  if export:
    log(f"exported merged weights to {sft.export(model, params, export)}")
  examples_shown = [dict(set=r.name, prompt=x["prompt"], completion=x["completion"], refused=x["refused"])
                    for r in final for x in r.records[:3]]
  section = sft.training_section(
    "Safety SFT (aligned anchor)", run.rows, evals, examples=examples_shown,
    trajectory=[dict(step=r["step"], stopping_set_refusal=r["rate"], ci95_low=r["low"], ci95_high=r["high"])
                for r in select_rows],
    summary={**{f"target_met/{k}": v for k, v in met.items()}, "export": export or None, **select_summary,
             "n_examples": len(examples), **{f"examples/{k}": v for k, v in counts.items()}},
    notes=f"{cfg.mode} fine-tuning of {cfg.model} on refusals (templates in lvs_jax.training.recipes.REFUSALS) "
    "for harmful prompts and the model's own greedy completions (sampled retries when the judge flagged them) for "
    "harmless and safe-but-scary prompts; loss on completion tokens only. 'base' = before, 'final' = after, "
    f"evaluated on held-out sets with {e.max_new_tokens} new tokens, greedy. "
    + (f"Stopping rule: the first checkpoint whose refusal rate on {len(stop_set)} prompts of "
       f"{'+'.join(sel['sets'])} (disjoint from training, {'+'.join(sel['exclude'])} and held-out sets) reaches the "
       f"{sel['bound']} bound of {sel['reference']}'s 95% Wilson interval on them ('final' = step {step}). "
       if stop_set is not None else "") +
    "Seconds per step: median after the first step.")
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype, config=cfg.to_dict())


if __name__ == "__main__":
  app.run(main)
