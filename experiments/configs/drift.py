r"""Embedding drift of frozen-embedding safety probes (harmful vs harmless), and the fix.

Full study on the default model (15-25 minutes on a 2-core CPU; embeddings are cached under
workdir/drift/embeddings, so a re-run takes a few minutes):
  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/drift

Into an audit's workdir, to add the "drift" section to its report:
  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/audit

Smoke run (16 + 16 train and 8 + 8 test prompts, 3 layers, 2 poolings; what the test suite runs):
  python experiments/drift.py --config=experiments/configs/drift.py:smoke --workdir=/tmp/drift_smoke

Overrides: --config.sweep.convention=coord --config.probe.main=mlp
  --config.real.sources='("perturb:0.1","smollm2-135m-aligned")' (any checkpoint with the same tokenizer)
"""

from lvs_jax.drift import audit as drift_audit


def get_config(arg: str | None = None):
  c = drift_audit.default_config()
  c.model = "smollm2-135m-instruct"  # a registered name, a .gguf file or an HF checkpoint directory
  c.dtype = "float32"
  if arg == "smoke":
    drift_audit.make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
