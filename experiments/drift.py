r"""Embedding drift of frozen-embedding safety probes: sweeps over drift magnitude, the cliff, silent
failures, a label-free alarm, re-anchoring, real drift (lvs_jax/drift/audit.py runs it,
lvs_jax/drift/section.py shows it).

  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/drift

Writes workdir/drift/ (embeddings/*.npz, results.json) and the "drift" section of
workdir/report.{json,html} with its CSV tables and PNG figures; an audit's workdir gets the section
added to its report. Re-running reuses the cached embeddings.
"""

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("Drift config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.drift import audit as drift_audit
  from lvs_jax.io import registry

  drift_audit.prompt_sets(cfg)  # a bad path or an empty set fails before the model loads
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  logging.info("loaded %s (%s)", cfg.model, model.source)
  section = drift_audit.run(model, cfg, workdir, model_name=cfg.model)
  print(section.notes)
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype)


if __name__ == "__main__":
  app.run(main)
