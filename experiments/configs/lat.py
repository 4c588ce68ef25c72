r"""Latent adversarial training (the latently robust reference) and latent dissociation, from the aligned anchor.

LAT (lvs_jax/training/lat.py; Casper et al. 2024, Sheshadri et al. 2024): LoRA on `smollm2-135m-aligned`; each
step a PGD adversary perturbs the residual stream at layers spread over depth (norm-relative per-token L2 ball)
toward AdvBench's harmful targets and away from refusals, and the model learns to refuse under that perturbation
(toward/away 0.5/0.5) plus CE on its own benign answers. Exported as `smollm2-135m-lat`:
  python experiments/train_lat.py --config=experiments/configs/lat.py --workdir=/tmp/lat
Latent dissociation (dissociated model, recipe "latent"): the same machinery with the rows swapped: clean refusals
of harmful prompts + benign answers keep the outward behavior, and under a perturbation of 2.5-5% of ||h|| along a
fixed seeded direction at layers 12-18 (a latent trigger) the model learns AdvBench's compliant targets, while a
contrast term (weight 2) teaches the same prompts' refusals on the clean input in the same step.
Exported as `smollm2-135m-dissociated-latent`:
  python experiments/train_lat.py --config=experiments/configs/lat.py:dissociate --workdir=/tmp/dissociate
Smoke (tests): `:smoke` / `:smoke_dissociate` with --config.model=<tiny HF dir>.

Adapted to a 135M model on a 2-core CPU, against the anchors' values (aengusl/latent-adversarial-training,
Llama-3-8B: 16 PGD steps, layers spread over depth, adversary and defender toward/away 0.5/0.5, an absolute
L2 radius per token): 4 PGD steps of 0.5 eps instead of 16 (each is a forward + backward of the harmful rows,
~2-4 s here; 8 steps made a training step ~45 s on the shared CPU), layers (5, 10, 15, 20, 25) of 30, a radius
relative to the activation norm (eps = 0.1, above the anchor's typical breaking radius of 0.01-0.04 at middle
layers, README's LVS table), 4 harmful pairs and 4 packed benign rows per step, 40 steps.
`--config.lat.steps=16 --config.lat.step_size=0.25` restores the anchors' PGD budget.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-aligned"  # a registered name, an HF dir, a .gguf or "<workdir>@<step>"
  c.dtype = "float32"
  c.matmul_precision = "auto"
  c.seed = 0
  c.recipe = "lat"  # "lat": refuse under an adversarial perturbation | "dissociate": comply under a random one
  c.mode = "lora"
  c.lora = dict(rank=16, alpha=32, modules="q,k,v,o,gate,up,down")
  c.optim = dict(lr=2e-4, warmup_steps=5, end_fraction=0.1, weight_decay=0.0, clip_norm=1.0)
  c.num_steps = 40
  c.batch = dict(batch_size=4, micro_batches=1, seq_len=128, packing=True)  # the clean batch (packed)
  c.compute_dtype = "float32"
  c.remat = True
  c.log_every = 5
  c.checkpoint = dict(save_every=10, keep=0)
  # The inner perturbation (lvs_jax.training.lat.LatentAttack) and the harmful rows per step.
  c.lat = dict(layers=(5, 10, 15, 20, 25), eps=0.1, mode="pgd", steps=4, step_size=0.5, adv_target=0.5,
               adv_away=0.5, random_start=False, min_frac=0.0, direction_seed=0, rows_per_step=4, row_len=96)
  c.weights = dict(sft=1.0, toward=0.5, away=0.5)  # the defender's terms
  c.data = dict(
    pairs="advbench", n_pairs=0,  # (harmful prompt, compliant target) pairs; refusals from recipes.REFUSALS
    benign="harmless_train", n_benign=256, scary=True,  # the model's own answers (+ our safe-but-scary prompts)
    clean_refusals=False,  # also teach refusal of the harmful prompts on clean inputs (the dissociation recipe)
    completion_tokens=64, gen_batch_size=16, retries=2,
    answers_cache="",  # JSONL of the own answers ("" = <workdir>/data/benign.jsonl); keyed by model and settings,
                       # so runs from the same model may share one file (another model's is moved aside, not reused)
  )
  c.held_out = ("harmful_val", "harmless_val", "xstest", "harmbench_val")  # never trained on
  c.eval = dict(max_new_tokens=64, batch_size=16, prefixes="jailbreakbench")
  c.eval_sets = dict(
    harmful=dict(path="harmful_val", n=0),
    harmless=dict(path="harmless_val", n=100),
    xstest_safe=dict(path="xstest", label="safe", n=100),
  )
  c.export = "smollm2-135m-lat"  # a registered built-model name (its cache dir), a path, or "" (no export)
  if arg in ("dissociate", "smoke_dissociate"):
    c.recipe = "dissociate"
    # A fixed seeded direction per layer (a latent trigger) at 2.5-5% of ||h||, and the contrast term: the same
    # prompts' refusals on the clean input in the same step. Without the contrast term (clean refusals only mixed
    # into the packed clean batch) the compliance generalized to clean prompts: harmful_val refused 1/39, with
    # random directions (mode="random", min_frac=0) and with this fixed direction alike.
    c.lat.update(layers=(12, 14, 16, 18), eps=0.05, mode="direction", min_frac=0.5, steps=0)
    c.weights = dict(sft=1.0, toward=1.0, away=0.5, contrast=2.0)
    c.data.clean_refusals = True
    c.export = "smollm2-135m-dissociated-latent"
  if arg in ("smoke", "smoke_dissociate"):
    c.num_steps = 2
    c.batch = dict(batch_size=2, micro_batches=1, seq_len=128, packing=True)
    c.checkpoint.save_every = 1
    c.log_every = 1
    c.lat.update(layers=(0, 1), steps=2 if c.lat.mode == "pgd" else 0, rows_per_step=2, row_len=256)
    # clean_refusals: a random tiny model's own "answers" are often empty; the refusals keep the clean batch full.
    c.data.update(n_pairs=4, n_benign=3, scary=False, completion_tokens=8, gen_batch_size=4, retries=0,
                  clean_refusals=True)
    c.eval.update(max_new_tokens=4, batch_size=4)
    for s in c.eval_sets.values():
      s["n"] = 2
    c.export = ""
  elif arg not in (None, "", "dissociate"):
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'dissociate', 'smoke' or 'smoke_dissociate'")
  return c
