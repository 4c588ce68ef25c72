"""What every experiment main shares: the --config / --workdir / --distributed flags, start-up, and
writing a section into the workdir's report.

  from lvs_jax.core import cli
  cli.define_flags("LVS config file.")

  def main(argv):
    cfg, workdir = cli.setup(argv)
    ...
    cli.write_section(workdir, section, model=cfg.model, ...)
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags


def define_flags(config_help: str = "Experiment config file.") -> None:
  """Defines --workdir (required), --distributed and --config (a Python config file, locked)."""
  flags.DEFINE_string("workdir", None, "Directory for everything the run writes; re-running resumes.", required=True)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs; or LVS_DISTRIBUTED=1).")
  config_flags.DEFINE_config_file("config", None, config_help, lock_config=True)


class _OwnLogsOnly(logging.Filter):
  """Passes warnings and errors from anywhere, and INFO/DEBUG only from lvs_jax and experiments/."""

  def __init__(self, roots: tuple[str, ...]):
    super().__init__()
    self.roots = roots

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.pathname.startswith(self.roots)


def quiet_third_party_logs() -> None:
  """Drops third-party INFO lines (orbax's checkpoint internals, jax's backend probing) from the absl
  log, keeping ours and every warning; `--verbosity=1` (or higher) keeps everything."""
  if flags.FLAGS.verbosity >= 1:
    return
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the lvs_jax package
  roots = (here, os.path.join(os.path.dirname(here), "experiments"), os.path.abspath(sys.argv[0]))
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OwnLogsOnly) for f in handler.filters):
    handler.addFilter(_OwnLogsOnly(roots))


PRECISIONS = ("default", "high", "highest")


def matmul_precision(cfg) -> str:
  """The matmul precision a run uses: config field `matmul_precision` ("default" | "high" | "highest"),
  or, when it is absent or "auto", "highest" for float32 runs (`dtype`, default float32) and "default"
  otherwise. On GPUs "default" runs float32 matmuls in TF32 (~1e-3 relative error), which does not
  match our float32 parity tolerances; bfloat16 runs gain nothing from "highest"."""
  get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
  p = get("matmul_precision", None) or "auto"
  if p == "auto":
    return "highest" if str(get("dtype", "float32") or "float32") == "float32" else "default"
  if p not in PRECISIONS:
    raise ValueError(f"config.matmul_precision={p!r}: expected 'auto' or one of {PRECISIONS}")
  return p


def setup(argv):
  """Offline hub, quiet third-party logs, optional jax.distributed, matmul precision set from the config
  (`matmul_precision`), the workdir created. Returns (config, workdir)."""
  del argv
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  quiet_third_party_logs()
  import jax

  from lvs_jax.core import distributed

  f = flags.FLAGS
  # Multi-process when asked, or when the cluster says so (Slurm with several tasks, LVS_COORDINATOR).
  distributed.initialize(force=bool(f.distributed or os.environ.get("LVS_DISTRIBUTED")))
  jax.config.update("jax_default_matmul_precision", matmul_precision(f.config))
  if distributed.is_writer():  # one writer: process 0 owns the workdir
    os.makedirs(f.workdir, exist_ok=True)
  distributed.barrier("lvs_workdir")
  return f.config, f.workdir


def mesh(cfg):
  """(mesh, rules) the config asks for: fields `mesh` (None / "" = one device and no mesh, as before;
  "auto" = every device, of every process under jax.distributed, on "data"; "D" or "DxM") and
  `mesh_rules` ("replicated" | "fsdp" | "tensor", default "fsdp"; see `lvs_jax.core.sharding`).
  Call after `setup` (the mesh spans every process's devices). Returns (None, None) without a mesh."""
  from lvs_jax.core import sharding

  get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
  m = sharding.mesh_from_spec(get("mesh", None))
  if m is None:
    return None, None
  return m, sharding.rules_table(get("mesh_rules", None) or "fsdp")


def config_module(path: str):
  """A config file (experiments/configs/<name>.py) as a module, loaded by path as --config loads it, so
  that one config can build on another's defaults (experiments/ is not an installed package).
  Raises FileNotFoundError naming the path."""
  import importlib.util

  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  name = "lvs_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_section(workdir: str, section, verbose: bool = True, **meta) -> None:
  """Adds `section` to workdir/report.json (keeping other experiments' sections), re-renders
  report.html and (verbose) prints the summary of every section."""
  import jax

  from lvs_jax.report import store as report_lib

  if jax.process_index() != 0:  # one writer: under jax.distributed only process 0 writes the report
    return
  rep = report_lib.Report(workdir)
  rep.set_meta(backend=jax.default_backend(), **meta)
  rep.add_section(section)
  html = rep.render_html()
  if verbose:
    print(report_lib.print_summary(rep.load()))
    print(f"report: {html}")
