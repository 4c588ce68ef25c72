r"""Safety geometry: carriers, coupling, causal sweeps vs matched controls, four behavioral diagnostics.

Default (sized for a 2-core CPU, about an hour on SmolLM2-135M-Instruct):
  python experiments/geometry.py --config=experiments/configs/geometry.py --workdir=/tmp/geometry
On the safety-tuned anchor:
  python experiments/geometry.py --config=experiments/configs/geometry.py --workdir=/tmp/geometry_aligned \
    --config.model=smollm2-135m-aligned
Smoke run (tests): --config=experiments/configs/geometry.py:smoke
"""

import ml_collections

from lvs_jax.geometry import audit as geometry_audit
from lvs_jax.geometry import carriers, diagnostics


def section_config() -> ml_collections.ConfigDict:
  """Every knob of the geometry section, sized for a 2-core CPU (about an hour on SmolLM2-135M);
  experiments/configs/audit.py embeds it as `geometry`."""
  c = ml_collections.ConfigDict()
  c.enabled = True  # read by experiments/audit.py, which includes this section when True
  c.seed = 0
  c.site = "resid_pre"
  # Which carriers to build (refusal is skipped when too few prompts are refused).
  c.carriers = geometry_audit.CARRIER_NAMES
  c.batch_size = 16
  c.max_new_tokens = 32  # labelling, causal cells and diagnostics generations
  c.judge_prefixes = "jailbreakbench"
  # Carrier pool, disjoint from every training set of the model under study: pool, val and eval prompts
  # found in these sets are dropped (case/whitespace-insensitively, recipes.drop_overlap) and the section
  # says how many. Default: the safety SFT sets that made smollm2-135m-aligned (experiments/configs/
  # safety_sft.py: harmful_train; a seeded sample of harmless_train, excluded whole; safe_but_scary).
  c.exclude_training = ("harmful_train", "harmless_train", "safe_but_scary")
  c.harmful = "advbench"  # 403 of its 520 rows are not in harmful_train
  c.n_harmful = 260  # 0 = all (then nothing is left for eval_harmful, also AdvBench)
  c.harmless = "harmless_val"
  c.n_harmless = 0  # 0 = as many as harmful prompts
  c.refusal_extra = ("xstest",)  # labelled only for the refusal carrier
  c.n_refusal_extra = 0  # per file; 0 = all
  c.min_refused = 8  # fewer refused (or complied) pool prompts: no behavioral refusal carrier
  c.min_stratum = 8  # within-stratum refusal carriers: fewer refused or complied prompts -> not estimable
  # Coupling.
  c.n_boot = 1000
  c.n_null = 1000
  c.subspace_k = 3
  c.subspace_layer_stride = 3  # principal angles at every 3rd layer (randomized SVDs: ~0.05 s each, 10^4 of them)
  c.subspace_n_boot = 50
  c.subspace_n_null = 50
  # Selection (refusal_direction's filters).
  c.select = True
  c.val_harmful = "harmful_val"
  c.val_harmless = "harmless_val"
  c.n_val = 16
  c.kl_threshold = 0.1
  c.induce_refusal_threshold = 0.0
  c.prune_layer_fraction = 0.2
  c.candidate_layer_stride = 1  # evaluate every layer's carrier as a candidate (the ablation-per-layer curve)
  c.default_layer_fraction = 0.5  # layer used when select=False
  # Logit sweeps: signed coefficients in units of each carrier's own norm (c = 1: the raw carrier).
  c.n_controls = 8  # matched random directions per carrier and control kind (seeds); z-scores need >= 2
  # isotropic: uniform directions; anisotropic: drawn from the activation covariance at that layer
  c.control_kinds = ("isotropic", "anisotropic")
  # Norm- and layer-matched comparison: every carrier's unit direction at this fraction of the pool's mean
  # activation norm (t_post_inst) at each sweep layer, times the sweep coefficients.
  c.matched_rel_norm = 0.25
  c.sweep_layer_stride = 3
  c.sweep_prompts = 16
  c.harmful_coefficients = (-1.0, -2.0)  # subtract on harmful prompts (does refusal drop?)
  c.harmless_coefficients = (1.0, 2.0)  # add on harmless prompts (is refusal induced?)
  c.sweep_chunk = 8
  # Generation cells at each carrier's selected layer.
  c.eval_harmful = "advbench"
  c.n_eval = 24
  # Layer of the add cells: "sweep" = for each carrier, the sweep layer where subtracting it (the first
  # harmful coefficient) lowers the refusal score most relative to its matched controls (each carrier
  # at its own best layer, chosen on the validation prompts); "selected" = the ablation-selected layer.
  c.gen_layer = "sweep"
  c.gen_harmful_coefficients = (-1.0,)
  c.gen_harmless_coefficients = (1.0,)
  c.ablate = True  # directional ablation cells (every layer and site)
  # Diagnostics.
  c.diagnostics = True
  c.diag_harmful = "harmful_val"
  c.diag_n_harmful = 0
  c.diag_xstest = "xstest"
  c.diag_n_xstest = 0
  c.diag_harmless = "harmless_val"
  c.diag_n_harmless = 100
  c.diag_templates = tuple(diagnostics.ADVERSARIAL_TEMPLATES)
  c.diag_qa_items = 0  # first n of diagnostics.BENIGN_QA (0 = all 48)
  c.n_boot_effects = 2000
  return c


def make_smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to well under a minute of compute: 4+4 pool prompts, 2 layers, 4 tokens."""
  c.carriers = (carriers.HARMFULNESS, carriers.REFUSAL)
  c.n_harmful = 4
  c.n_harmless = 4
  c.n_refusal_extra = 4
  c.min_refused = 1
  c.min_stratum = 1
  c.batch_size = 4
  c.max_new_tokens = 4
  c.n_boot = c.n_null = 20
  c.subspace_k = 2
  c.subspace_n_boot = c.subspace_n_null = 3
  c.n_val = 2
  c.candidate_layer_stride = 15
  c.n_controls = 1
  c.sweep_layer_stride = 15
  c.sweep_prompts = 2
  c.harmful_coefficients = (-1.0,)
  c.harmless_coefficients = (1.0,)
  c.n_eval = 2
  c.diag_n_harmful = 2
  c.diag_n_xstest = 2
  c.diag_n_harmless = 2
  c.diag_templates = ("prefix_injection",)
  c.diag_qa_items = 4
  c.n_boot_effects = 100


def get_config(arg: str | None = None):
  c = section_config()
  c.model = "smollm2-135m-instruct"
  c.dtype = "float32"
  c.matmul_precision = "auto"  # cli.setup: "highest" for float32 (no TF32 on GPUs), else "default"
  if arg == "smoke":
    make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
