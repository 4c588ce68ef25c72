r"""Runs a safety audit of a model and writes report.json, CSV tables, PNG plots and report.html.

  python experiments/audit.py --config=experiments/configs/audit.py --workdir=/tmp/audit

Re-running on the same workdir resumes: finished generations are read back from
workdir/generations/*.jsonl. See experiments/configs/audit.py for options.
"""

import os

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("Audit config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.drift import audit as drift_audit
  from lvs_jax.evals import behavior
  from lvs_jax.evals import section as behavior_report
  from lvs_jax.geometry import audit as geometry_audit
  from lvs_jax.io import datasets as data
  from lvs_jax.io import registry
  from lvs_jax.lvs import audit as lvs_audit

  # Load every prompt set first: a bad path fails before the model loads.
  sets = {}
  for name, spec in cfg.sets.items():
    ps = data.load_prompts(spec["path"], label=spec.get("label"))
    sets[name] = data.sample(ps, spec["n"], seed=cfg.seed) if spec.get("n") else ps
  if cfg.geometry.enabled:
    geometry_audit.prompt_sets(cfg.geometry)
  if cfg.drift.enabled:
    drift_audit.prompt_sets(cfg.drift)
  mesh, rules = cli.mesh(cfg)  # the LVS section runs on it; the weights stay on the host until placed there
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype), host=mesh is not None)
  logging.info("loaded %s (%s)", cfg.model, model.source)
  meta = dict(model=cfg.model, source=model.source, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
              config=cfg.to_dict())
  results = []
  for name, prompts in sets.items():
    results.append(behavior.evaluate_refusal(
      model, name, list(prompts), max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
      prefixes=cfg.judge_prefixes, cache_path=os.path.join(workdir, "generations", f"{name}.jsonl"),
    ))
  if cfg.lvs.enabled:
    prompts, targets = lvs_audit.load_targets(cfg.lvs)
    section = lvs_audit.run(model, prompts, targets, cfg.lvs, workdir, mesh=mesh, rules=rules)
    cli.write_section(workdir, section, verbose=False, **meta)
  if cfg.geometry.enabled:
    section = geometry_audit.run(model, cfg.geometry, workdir, model_name=cfg.model)
    cli.write_section(workdir, section, verbose=False, **meta)
  if cfg.drift.enabled:
    section = drift_audit.run(model, cfg.drift, workdir, model_name=cfg.model)
    cli.write_section(workdir, section, verbose=False, **meta)
  cli.write_section(workdir, behavior_report.behavior_section(results, n_examples=cfg.n_examples), **meta)


if __name__ == "__main__":
  app.run(main)
