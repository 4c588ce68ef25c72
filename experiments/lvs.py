r"""Latent Vulnerability Score and the audit gap (see lvs_jax/lvs.py for the definitions).

  python experiments/lvs.py --config=experiments/configs/lvs.py --workdir=/tmp/lvs

Writes workdir/lvs/ (behavior.jsonl, sweep.npz, one JSON per finished (layer, radius) cell,
summary.json) and the "lvs" section of workdir/report.{json,html}; re-running resumes.
"""

import os

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for everything the run writes.", required=True)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
config_flags.DEFINE_config_file("config", None, "LVS config file.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax
  import jax.numpy as jnp

  from lvs_jax import lvs_audit
  from lvs_jax import report as report_lib
  from lvs_jax.io import registry

  if FLAGS.distributed or os.environ.get("LVS_DISTRIBUTED"):
    jax.distributed.initialize()
  cfg, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  prompts, targets = lvs_audit.load_targets(cfg)
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  section = lvs_audit.run(model, prompts, targets, cfg, workdir)
  rep = report_lib.Report(workdir)
  rep.set_meta(model=cfg.model, source=model.source, dtype=cfg.dtype, backend=jax.default_backend())
  rep.add_section(section)
  html = rep.render_html()
  print(report_lib.print_summary(rep.load()))
  print(f"report: {html}")


if __name__ == "__main__":
  app.run(main)
