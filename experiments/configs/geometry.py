r"""Safety geometry: carriers, coupling, causal sweeps vs matched controls, four behavioral diagnostics.

Default (sized for a 2-core CPU, about an hour on SmolLM2-135M-Instruct):
  python experiments/geometry.py --config=experiments/configs/geometry.py --workdir=/tmp/geometry
On the safety-tuned anchor:
  python experiments/geometry.py --config=experiments/configs/geometry.py --workdir=/tmp/geometry_aligned \
    --config.model=smollm2-135m-aligned
Smoke run (tests): --config=experiments/configs/geometry.py:smoke
"""

from lvs_jax.geometry import audit as geometry_audit


def get_config(arg: str | None = None):
  c = geometry_audit.default_config()
  c.model = "smollm2-135m-instruct"
  c.dtype = "float32"
  if arg == "smoke":
    geometry_audit.make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
