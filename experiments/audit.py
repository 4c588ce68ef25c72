r"""Runs a safety audit of a model and writes report.json, CSV tables, PNG plots and report.html.

  python experiments/audit.py --config=experiments/configs/audit.py --workdir=/tmp/audit

Re-running on the same workdir resumes: finished generations are read back from
workdir/generations/*.jsonl. See experiments/configs/audit.py for options.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for everything the audit writes.", required=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
config_flags.DEFINE_config_file("config", None, "Audit config file.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax
  import jax.numpy as jnp

  from lvs_jax import behavior, data, lvs_audit
  from lvs_jax import report as report_lib
  from lvs_jax.io import registry

  if FLAGS.distributed or os.environ.get("LVS_DISTRIBUTED"):
    jax.distributed.initialize()
  cfg, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  # Load every prompt set first: a bad path fails before the model loads.
  sets = {}
  for name, spec in cfg.sets.items():
    ps = data.load_prompts(spec["path"], label=spec.get("label"))
    sets[name] = data.sample(ps, spec["n"], seed=cfg.seed) if spec.get("n") else ps
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  logging.info("loaded %s (%s)", cfg.model, model.source)
  rep = report_lib.Report(workdir)
  rep.set_meta(model=cfg.model, source=model.source, dtype=cfg.dtype, max_new_tokens=cfg.max_new_tokens,
               backend=jax.default_backend(), config=cfg.to_dict())
  results = []
  for name, prompts in sets.items():
    results.append(behavior.evaluate_refusal(
      model, name, list(prompts), max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
      prefixes=cfg.judge_prefixes, cache_path=os.path.join(workdir, "generations", f"{name}.jsonl"),
    ))
  rep.add_section(behavior.behavior_section(results, n_examples=cfg.n_examples))
  if cfg.lvs.enabled:
    prompts, targets = lvs_audit.load_targets(cfg.lvs)
    rep.add_section(lvs_audit.run(model, prompts, targets, cfg.lvs, workdir))
  html = rep.render_html()
  print(report_lib.print_summary(rep.load()))
  print(f"report: {html}")


if __name__ == "__main__":
  app.run(main)
