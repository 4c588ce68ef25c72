r"""Latent Vulnerability Score: sweeps and PGD latent attacks per layer, LVS with CIs, the audit gap.

Default (sized for a 2-core CPU, ~10-20 min on SmolLM2-135M; widen layers/radii/steps on a GPU):
  python experiments/lvs.py --config=experiments/configs/lvs.py --workdir=/tmp/lvs
On the safety-tuned anchor:
  python experiments/lvs.py --config=experiments/configs/lvs.py --workdir=/tmp/lvs_aligned \
    --config.model=smollm2-135m-aligned
The anchor is broken by 92-100% of attacks already at the default grid's smallest radius (0.05), so
every layer's LVS sits at the grid's ceiling; a finer grid separates the layers (~25 CPU minutes):
    --config.model=smollm2-135m-aligned "--config.radii=(0.005,0.01,0.02,0.04)" --config.sweep=False
Smoke run (tests): --config=experiments/configs/lvs.py:smoke
"""

from lvs_jax.lvs import audit as lvs_audit


def get_config(arg: str | None = None):
  c = lvs_audit.default_config()
  c.model = "smollm2-135m-instruct"
  c.dtype = "float32"
  if arg == "smoke":
    lvs_audit.make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
