r"""The model zoo and the audit gap (definitions: lvs_jax/lvs/zoo.py, lvs_jax/lvs/attack.py).

  python experiments/audit_gap.py --config=experiments/configs/audit_gap.py --workdir=/tmp/zoo

Per model: refusal with interval, XSTest over-refusal, LVS per layer on a radius grid chosen from a pilot, the
eps* distribution, the audit gap, the harmful fine-tuning ASR curve and the LVS's target sensitivity. Writes
workdir/zoo/ (per-model caches, grid.json, rows.json), workdir/zoo.csv (one row per model) and the "zoo" section of
workdir/report.{json,html}; re-running resumes (every artefact keyed by content, never by a label).
"""

from absl import app

from lvs_jax.core import cli

cli.define_flags("Model-zoo config file.")


def main(argv):
  cfg, workdir = cli.setup(argv)
  from lvs_jax.lvs import zoo, zoo_section

  zoo.validate(cfg)  # a bad setting or a model that is not built fails before any model loads
  zoo.check_models(zoo.parse_models(cfg.models), cfg.skip_missing)
  rows, info = zoo.run(cfg, workdir)
  section = zoo_section.section(rows, info, cfg)
  print(f"zoo table: {zoo_section.write_csv(workdir, section.tables[0])}")
  cli.write_section(workdir, section, models=list(cfg.models), dtype=cfg.dtype)


if __name__ == "__main__":
  app.run(main)
