r"""Safety geometry: harmfulness and refusal carriers, their coupling, causal sweeps against matched
random controls, and the four behavioral diagnostics (lvs_jax/geometry/audit.py runs it,
lvs_jax/geometry/section.py shows it).

  python experiments/geometry.py --config=experiments/configs/geometry.py --workdir=/tmp/geometry

Writes workdir/geometry/ (generations, activations, carriers.{npz,json}, coupling, sweeps, one JSON
per generation cell, diagnostics, summary.json) and the "geometry" section of
workdir/report.{json,html} with its CSV tables and PNG figures; re-running resumes.
"""

from absl import app, logging

from lvs_jax.core import cli

cli.define_flags("Geometry config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.geometry import audit as geometry_audit
  from lvs_jax.io import registry

  geometry_audit.prompt_sets(cfg)  # a bad path or an empty set fails before the model loads
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  logging.info("loaded %s (%s)", cfg.model, model.source)
  section = geometry_audit.run(model, cfg, workdir, model_name=cfg.model)
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype)


if __name__ == "__main__":
  app.run(main)
