r"""Token-level attacks (GCG, AutoDAN) on a prompt set, saved as fixed-source test cases and judged.

  python experiments/attack.py --config=experiments/configs/attack.py --workdir=/tmp/attack

Writes workdir/attack/ (resumable attack states, test_cases/<attack>/test_cases.json in HarmBench's layout,
results.json) and the "attack" section of workdir/report.{json,html}; re-running resumes.
"""

from absl import app

from lvs_jax.core import cli

cli.define_flags("Attack config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  import jax.numpy as jnp

  from lvs_jax.attacks import audit
  from lvs_jax.io import registry

  audit.load_targets(cfg)  # a bad prompt path fails before the model loads
  model = registry.load_model(cfg.model, dtype=jnp.dtype(cfg.dtype))
  section = audit.run(model, cfg, workdir)
  cli.write_section(workdir, section, model=cfg.model, source=model.source, dtype=cfg.dtype)


if __name__ == "__main__":
  app.run(main)
