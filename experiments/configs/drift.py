r"""Embedding drift of frozen-embedding safety probes (harmful vs harmless), and the fix.

Full study on the default model (15-25 minutes on a 2-core CPU; embeddings are cached under
workdir/drift/embeddings, so a re-run takes a few minutes):
  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/drift

Into an audit's workdir, to add the "drift" section to its report:
  python experiments/drift.py --config=experiments/configs/drift.py --workdir=/tmp/audit

Smoke run (16 + 16 train and 8 + 8 test prompts, 3 layers, 2 poolings; what the test suite runs):
  python experiments/drift.py --config=experiments/configs/drift.py:smoke --workdir=/tmp/drift_smoke

Embedding drift tested fairly (issue 16; lvs_jax/drift/fair.py, run by fair_audit.py): held-out tasks at the
paper's difficulty, the paper's plain probe next to ours, both sigma conventions, worst-case directions, metrics at
collapse (~10 minutes; resumes from workdir/drift_fair/). Only that study, or with the rest
(--config.fair.enabled=True):
  python experiments/drift.py --config=experiments/configs/drift.py:fair --workdir=/tmp/drift_fair

Overrides: --config.sweep.convention=coord --config.probe.main=mlp
  --config.real.sources='("perturb:0.1","smollm2-135m-aligned")' (any checkpoint with the same tokenizer)
"""

import ml_collections
import numpy as np

from lvs_jax.drift import fair
from lvs_jax.drift import study as drift_eval
from lvs_jax.drift import tasks as drift_tasks


def section_config() -> ml_collections.ConfigDict:
  """Every knob of the drift section (about 15-25 minutes on a 2-core CPU with SmolLM2-135M);
  experiments/configs/audit.py embeds it as `drift`."""
  c = ml_collections.ConfigDict()
  c.enabled = True  # read by experiments/audit.py, which includes this section when True
  c.seed = 0
  c.batch_size = 16
  c.chat = True  # apply the chat template before embedding
  c.site = "resid_post"
  c.poolings = ("last", "last_instruction", "mean")
  c.layers = ()  # candidate layers for the probe; () = all
  c.data = ml_collections.ConfigDict(dict(
    harmful_train="harmful_train", harmless_train="harmless_train", n_harmful_train=0,
    harmful_test="harmful_val", harmless_test="harmless_val", n_harmful_test=0, n_harmless_test=200,
    val_fraction=0.2))
  c.probe = ml_collections.ConfigDict(dict(
    main="logreg", mlp=True, hidden=64, lr=1e-2, max_steps=400, patience=40, l2s=(1e-4, 1e-3, 1e-2, 1e-1)))
  c.sweep = ml_collections.ConfigDict(dict(
    # 0, a log grid from 1e-3 (0.06 degrees) to 10^0.5 (72 degrees), and the paper's 0.02 and 0.028.
    sigmas=tuple(sorted({0.0, 0.02, 0.028, *(float(s) for s in np.round(np.logspace(-3, 0.5, 22), 6))})),
    families=drift_eval.SWEEP_FAMILIES, repeats=8, subspace_k=64, convention="norm", silent_threshold=0.8,
    cliff_auc=0.0))  # 0: the cliff is where AUC falls halfway from clean to 0.5
  c.alarm = ml_collections.ConfigDict(dict(
    statistics=("residual", "mean", "mmd"), alpha=0.05, window=64, n_windows=100, n_perm=200, k=16, power=0.9))
  c.reanchor = ml_collections.ConfigDict(dict(
    n_anchors=(8, 16, 32, 64, 128, 256), n_pool=256, repeats=4, identity_prior=1e-4, cliff_multiples=(1.0, 3.0)))
  c.augment = ml_collections.ConfigDict(dict(sigma=0.0, copies=4))  # sigma 0: the main probe's isotropic cliff
  # Real drift sources: "perturb:<rho>" (this model with every weight matrix W + rho ||W||_F/sqrt(n) N(0,1)),
  # "ckpt:<run>/checkpoints@<step>" (consecutive checkpoints of a fine-tuning run of this model), or a
  # registered name / path of another checkpoint with the same tokenizer (e.g. smollm2-135m-aligned).
  c.real = ml_collections.ConfigDict(dict(
    sources=("perturb:0.005", "perturb:0.01", "perturb:0.02", "perturb:0.05", "perturb:0.1", "perturb:0.2"),
    separability_source="perturb:0.05"))
  return c


def make_smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to about a minute: 16 + 16 train and 8 + 8 test prompts, 3 layers, 2 poolings."""
  c.poolings = ("last", "mean")
  c.layers = (3, 15, 28)
  c.batch_size = 8
  c.data.update(n_harmful_train=16, n_harmful_test=8, n_harmless_test=8, val_fraction=0.25)
  c.probe.update(mlp=False, max_steps=40, patience=10, l2s=(1e-3, 1e-2))
  c.sweep.update(sigmas=(0.0, 0.01, 0.1, 1.0, 3.0), repeats=2, subspace_k=8)
  c.alarm.update(window=8, n_windows=8, n_perm=20, k=4)
  c.reanchor.update(n_anchors=(4, 8), n_pool=8, repeats=2, cliff_multiples=(1.0,))
  c.real.update(sources=("perturb:0.05",), separability_source="perturb:0.05")


def fair_config() -> ml_collections.ConfigDict:
  """The fair study's knobs (issue 16; `lvs_jax.drift.fair`, run by `lvs_jax.drift.fair_audit`; ~10 minutes on 2
  CPU cores); get_config embeds it as `fair`."""
  c = ml_collections.ConfigDict()
  c.enabled = False
  c.only = False  # True: run only this study (not the rest of the drift audit)
  c.layer = -1  # the fixed embedding: resid_post of this layer (-1: the last), no layer search
  c.pooling = "mean"
  c.tasks = drift_tasks.TASKS
  c.n_per_class = 250
  c.target_auc = 0.85  # the headline task is the one whose clean paper-probe AUC is closest to this
  c.seeds = 5
  c.repeats = 8  # drift draws per sigma and seed
  c.sigmas = tuple(sorted({0.0, fair.PAPER_SIGMA, *(float(s) for s in np.round(np.logspace(-4, 1.5, 23), 6))}))
  c.paper = ml_collections.ConfigDict(dict(l2=1e-3, lr=1e-2, max_steps=1000))
  c.hardened = ml_collections.ConfigDict(dict(lr=1e-2, max_steps=400, patience=40, l2s=(1e-4, 1e-3, 1e-2, 1e-1)))
  c.collapse_auc = 0.55  # "AUC ~ 0.5": the first sigma where the mean AUC falls below this
  c.silent_threshold = 0.8
  c.n_random = 100
  c.worst_steps = 150
  c.alarm = ml_collections.ConfigDict(dict(statistics=("residual", "mean", "mmd"), alpha=0.05, window=64,
                                           n_windows=100, n_perm=200, k=16, power=0.9))
  c.reanchor = ml_collections.ConfigDict(dict(n_anchors=(16, 64, 256), n_pool=256, repeats=4, identity_prior=1e-4))
  c.separability = ml_collections.ConfigDict(dict(source="smollm2-135m-aligned", n_boot=50))
  return c


def make_fair_smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks a fair-study config (`fair_config`) to seconds (planted data or a tiny run)."""
  c.update(tasks=("xstest",), n_per_class=24, seeds=2, repeats=2, n_random=8, worst_steps=20,
           sigmas=(0.0, 0.002, fair.PAPER_SIGMA, 0.2, 2.0, 20.0))
  c.paper.update(max_steps=100)
  c.hardened.update(max_steps=60, patience=10, l2s=(1e-3, 1e-2))
  c.alarm.update(window=8, n_windows=8, n_perm=20, k=4)
  c.reanchor.update(n_anchors=(8,), n_pool=16, repeats=2)
  c.separability.update(n_boot=4)


def get_config(arg: str | None = None):
  c = section_config()
  c.model = "smollm2-135m-instruct"  # a registered name, a .gguf file or an HF checkpoint directory
  c.dtype = "float32"
  c.matmul_precision = "auto"  # cli.setup: "highest" for float32 (no TF32 on GPUs), else "default"
  c.fair = fair_config()  # enabled=True adds the "drift_fair" section; only=True skips the rest
  if arg == "smoke":
    make_smoke(c)
  elif arg == "fair":
    c.fair.update(enabled=True, only=True)
  elif arg == "fair_smoke":
    c.fair.update(enabled=True, only=True)
    make_fair_smoke(c.fair)
    c.update(batch_size=8)
    c.data.update(n_harmful_train=16, val_fraction=0.25)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'smoke', 'fair' or 'fair_smoke'")
  return c
