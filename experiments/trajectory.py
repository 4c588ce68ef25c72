r"""Checkpoint-trajectory analysis at every checkpoint of training runs: behavior, a fresh GCG attack, safety
geometry with KL-admissible carriers, latent vulnerability (LVS, audit gap), drift; the sparse transfer matrix.

  python experiments/trajectory.py --config=experiments/configs/trajectory.py --workdir=/tmp/traj \
    --config.runs="('r2d2=/tmp/r2d2', 'sft=/tmp/r2d2_sft')" --config.steps="(0, 20, 50, 100)"

Writes workdir/trajectory/ (per-checkpoint generations, GCG states and test cases, LVS cells, rows.json) and the
"trajectory" section of workdir/report.{json,html}; re-running resumes (everything keyed by content).
"""

from absl import app

from lvs_jax.core import cli

cli.define_flags("Trajectory config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  from lvs_jax.trajectory import audit
  from lvs_jax.trajectory import section as traj_section

  audit.parse_runs(cfg.runs)  # a bad run path fails before any model loads
  from lvs_jax.trajectory import measures

  rows, cells = audit.run(cfg, workdir)
  extra = measures.run_level(rows, cells, cfg, workdir)  # carrier ranks, correlations with transfer
  cli.write_section(workdir, traj_section.section(rows, cfg, cells, extra), runs=list(cfg.runs), dtype=cfg.dtype)


if __name__ == "__main__":
  app.run(main)
