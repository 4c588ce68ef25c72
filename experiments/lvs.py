r"""Latent Vulnerability Score and the audit gap (definitions: lvs_jax/lvs/attack.py).

  python experiments/lvs.py --config=experiments/configs/lvs.py --workdir=/tmp/lvs

Writes workdir/lvs/ (behavior.jsonl, sweep.npz, one JSON per finished (layer, radius) cell,
summary.json) and the "lvs" section of workdir/report.{json,html}; re-running resumes.

On a device mesh (the sweep and PGD cells sharded; every process of a jax.distributed job takes part):
  python experiments/lvs.py --config=experiments/configs/lvs.py --workdir=/tmp/lvs --config.mesh=auto
"""

from absl import app

from lvs_jax.core import cli

cli.define_flags("LVS config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.io import registry
  from lvs_jax.lvs import audit as lvs_audit

  prompts, targets = lvs_audit.load_targets(cfg)
  mesh, rules = cli.mesh(cfg)
  # Under a mesh the weights stay in host memory here; the audit places them shard by shard.
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype), host=mesh is not None)
  section = lvs_audit.run(model, prompts, targets, cfg, workdir, mesh=mesh, rules=rules)
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype)


if __name__ == "__main__":
  app.run(main)
