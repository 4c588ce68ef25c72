r"""Checkpoint trajectories (lvs_jax/trajectory/audit.py): per checkpoint, refusal on held-out harmful_val (39),
benign refusal on 100 seeded harmless_val prompts, XSTest safe refusal on 100 seeded safe prompts (greedy 64
tokens, JailbreakBench substring judge), and a fresh GCG attack against that checkpoint: the first 8
harmful_val prompts, 10 steps, width 64, top-k 64 (CPU-sized; HarmBench: 500 steps at width 512). Geometry
(cfg.geometry): harmfulness/refusal carriers and their coupling per layer over the behavioral sets (AdvBench and
harmless_train prompts dropped); drift (cfg.drift): last-layer mean-pooled embeddings of harmful_val + XSTest
unsafe vs 239 harmless_val prompts relative to each run's step 0 (lvs_jax/trajectory/measures.py).

  python experiments/trajectory.py --config=experiments/configs/trajectory.py --workdir=/tmp/traj \
    --config.runs="('r2d2=/tmp/r2d2', 'sft=/tmp/r2d2_sft')" --config.steps="(0, 20, 50, 100)"
Smoke (tests): `:smoke` (3 + 2 prompts, 4 tokens, 1 GCG step at width 16).
"""

from lvs_jax.trajectory import audit


def get_config(arg: str | None = None):
  c = audit.default_config()
  c.dtype = "float32"
  c.matmul_precision = "auto"
  c.seed = 0
  if arg == "smoke":
    audit.make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
