r"""Embedding drift of frozen-embedding safety probes (harmful vs harmless), and the fix.

Full study on the default model (15-25 minutes on a 2-core CPU; embeddings are cached under
workdir/drift/embeddings, so a re-run takes a few minutes):
  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/drift

Into an audit's workdir, to add the "drift" section to its report:
  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/audit

Smoke run (16 + 16 train and 8 + 8 test prompts, 3 layers, 2 poolings; what the test suite runs):
  python experiments/drift.py --config=experiments/configs/drift.py:smoke --workdir=/tmp/drift_smoke

Embedding drift tested fairly (issue 16; lvs_jax/drift/fair.py): held-out tasks at the paper's difficulty, the
paper's plain probe next to ours, both sigma conventions, worst-case directions, metrics at collapse (~10 minutes;
resumes from workdir/drift_fair/). Only that study, or with the rest (--config.fair.enabled=True):
  python experiments/drift.py --config=experiments/configs/drift.py:fair --workdir=/tmp/drift_fair

Overrides: --config.sweep.convention=coord --config.probe.main=mlp
  --config.real.sources='("perturb:0.1","smollm2-135m-aligned")' (any checkpoint with the same tokenizer)
"""

from lvs_jax.drift import audit as drift_audit
from lvs_jax.drift import fair


def get_config(arg: str | None = None):
  c = drift_audit.default_config()
  c.model = "smollm2-135m-instruct"  # a registered name, a .gguf file or an HF checkpoint directory
  c.dtype = "float32"
  c.fair = fair.default_config()  # enabled=True adds the "drift_fair" section; only=True skips the rest
  if arg == "smoke":
    drift_audit.make_smoke(c)
  elif arg == "fair":
    c.fair.update(enabled=True, only=True)
  elif arg == "fair_smoke":
    c.fair.update(enabled=True, only=True)
    fair.make_smoke(c.fair)
    c.update(batch_size=8)
    c.data.update(n_harmful_train=16, val_fraction=0.25)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'smoke', 'fair' or 'fair_smoke'")
  return c
