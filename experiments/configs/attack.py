r"""Token-level attacks: GCG (ASR after 50 / 100 / 250 steps) and AutoDAN on held-out harmful_val (39).

Every default with its source (lvs_jax/attacks/gcg.py `default_config`, autodan.py `default_config`):
  GCG      HarmBench configs/method_configs/GCG_config.yaml: 500 steps, init "! " x 20, search width 512,
           top-k 256 (baselines/gcg), one swap per candidate at evenly spread positions (sample_control),
           non-ASCII and special tokens banned, early stop when loss < 0.05 and a 32-token greedy
           generation is not a refusal (eval_with_check_refusal, checked every 10 steps).
           nanoGCG GCGConfig: buffer_size 0, use_mellowmax False (alpha 1.0), filter_ids True (here in
           context), n_replace 1; its init "x " x 20 and random positions via --config.gcg.positions=random.
  AutoDAN  HarmBench configs/method_configs/AutoDAN_config.yaml: population 64, elites 0.1, crossover 0.5 at
           5 points, mutation 0.01, 100 steps; early stop after 10 generations without a new best (the
           issue) or a passed refusal check. Mutation is offline word-level synonym substitution, not
           HarmBench's Mistral-7B paraphrase (see autodan.py).
  Here     search width 128 instead of 512 (CPU-sized; pass --config.gcg.search_width=512 for the faithful
           width), budgets 50/100/250 steps instead of 500, target "Sure, here is" (harmful_val has no targets;
           HarmBench uses per-behavior targets).

Default run (CPU: hours; GCG resumes between budgets and after a kill):
  python experiments/attack.py --config=experiments/configs/attack.py --workdir=/tmp/attack
On the aligned anchor:
  python experiments/attack.py --config=experiments/configs/attack.py --workdir=/tmp/attack_aligned \
    --config.model=smollm2-135m-aligned
Smoke run (tests; 2 prompts, 2 GCG steps at width 16, 2 AutoDAN generations of 8):
  python experiments/attack.py --config=experiments/configs/attack.py:smoke --workdir=/tmp/attack_smoke
"""

from lvs_jax.attacks import audit


def get_config(arg: str | None = None):
  c = audit.default_config()
  c.model = "smollm2-135m-instruct"
  c.dtype = "float32"
  c.matmul_precision = "auto"  # cli.setup: "highest" for float32 (no TF32 on GPUs), else "default"
  if arg == "smoke":
    audit.make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c
