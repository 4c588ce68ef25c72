r"""Safety audit of a model: behavior, and optionally latent vulnerability, safety geometry, embedding drift.

Full audit of the default model (about 5 minutes on a 2-core CPU):
  python experiments/audit.py --config=experiments/configs/audit.py --workdir=/tmp/audit

Smoke run (2 prompts a set, 8 tokens; what the test suite runs):
  python experiments/audit.py --config=experiments/configs/audit.py:smoke --workdir=/tmp/audit_smoke

Overrides: --config.model=/path/to/model.gguf --config.max_new_tokens=128 --config.dtype=bfloat16
With the latent-vulnerability section: --config.lvs.enabled=True
With the safety-geometry section: --config.geometry.enabled=True
With the embedding-drift section: --config.drift.enabled=True
"""

import os

import ml_collections

from lvs_jax.core import cli

# The sections' defaults live in their own experiments' config files (one copy of each).
_HERE = os.path.dirname(os.path.abspath(__file__))
lvs_config, geometry_config, drift_config = (cli.config_module(os.path.join(_HERE, f"{name}.py"))
                                             for name in ("lvs", "geometry", "drift"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-instruct"  # a registered name, a .gguf file or an HF checkpoint directory
  c.dtype = "float32"  # float32 on CPU; bfloat16 on accelerators
  c.matmul_precision = "auto"  # cli.setup: "highest" for float32 (no TF32 on GPUs), else "default"
  # Device mesh (lvs_jax.core.cli.mesh): None = one device as before; "auto" = every device (of every
  # process under --distributed) on the data axis; "D" or "DxM" (data x model). The LVS sweep and PGD
  # cells then run sharded, weights placed by mesh_rules: "replicated" | "fsdp" | "tensor".
  c.mesh = ml_collections.config_dict.placeholder(str)
  c.mesh_rules = "fsdp"
  c.max_new_tokens = 64
  c.batch_size = 16
  c.seed = 0
  c.judge_prefixes = "jailbreakbench"  # lvs_jax.evals.judges prefix list: jailbreakbench | harmbench | both
  c.n_examples = 4  # example generations per set in the report
  # Prompt sets: name -> (set, options). A bundled set name (lvs_jax/prompts/README.md) or a path to your own file.
  c.sets = ml_collections.ConfigDict()
  c.sets.harmful = dict(path="harmful_val", n=0)  # n=0: all rows
  c.sets.harmless = dict(path="harmless_val", n=100)
  c.sets.xstest_safe = dict(path="xstest", label="safe", n=0)
  c.sets.xstest_unsafe = dict(path="xstest", label="unsafe", n=0)
  # Latent vulnerability section (experiments/lvs.py runs it alone): off by default, it takes
  # 10-20 CPU minutes. Enable with --config.lvs.enabled=True.
  c.lvs = lvs_config.section_config()
  c.lvs.enabled = False
  # Safety-geometry section (experiments/geometry.py runs it alone): off by default, it takes about
  # an hour of CPU. Enable with --config.geometry.enabled=True.
  c.geometry = geometry_config.section_config()
  c.geometry.enabled = False
  # Embedding-drift section (experiments/drift.py runs it alone): off by default, it takes 15-25
  # CPU minutes. Enable with --config.drift.enabled=True.
  c.drift = drift_config.section_config()
  c.drift.enabled = False
  if arg == "smoke":
    lvs_config.make_smoke(c.lvs)
    geometry_config.make_smoke(c.geometry)
    drift_config.make_smoke(c.drift)
    c.max_new_tokens = 8
    c.batch_size = 2
    for name in c.sets:
      c.sets[name]["n"] = 2
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
