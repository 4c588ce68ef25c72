r"""R2D2 adversarial fine-tuning (HarmBench) and its matched SFT baseline, from one start.

CPU (SmolLM2-135M-Instruct, LoRA; two trajectories, checkpoints every 10 steps to 100, all kept; measured
~14 s/step for R2D2 on 2 CPU cores, so ~25 min per R2D2 run plus ~4 min of benign answers):
  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py --workdir=/tmp/r2d2
  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py:sft --workdir=/tmp/r2d2_sft
Each checkpoint is a model: `registry.load_model("/tmp/r2d2@30")` (and --config.model=/tmp/r2d2@30 in
every experiment).

GPU recipe, Mistral-7B-v0.1 with HarmBench's GCG/pool/loss settings in bf16 (HF directory given), on one
H200. Its memory plan (`lvs_jax.core.memory`, from `jax.eval_shape`), printed by --config.memory_plan=mistral-7b:
  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py:mistral7b --workdir=/tmp/plan \
    --config.memory_plan=mistral-7b
  (= python -m lvs_jax.core.memory --model=mistral-7b --batch=8 --seq=1024 --width=128 --gcg_prompts=1
     --dtype=bfloat16 --lora_rank=64 --device_gb=141)
says LoRA fits one H200 (r2d2 step ~25 GB, GCG ~68 GB in chunks of 128 candidates, plus the 14.5 GB merged
bf16 copy the inner attack runs on) while full fine-tuning (float32
master weights + AdamW + grads, ~138 GB) does not; HarmBench fine-tunes all weights on several GPUs, which
this trainer does not shard yet, so the recipe is LoRA (rank 64). Launch:
  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py:mistral7b --workdir=/runs/r2d2_m7b \
    --config.model=/path/to/Mistral-7B-v0.1
  python experiments/train_r2d2.py --config=experiments/configs/r2d2.py:mistral7b_sft --workdir=/runs/sft_m7b \
    --config.model=/path/to/Mistral-7B-v0.1

Smoke (the tests): `:smoke` with --config.model=<tiny HF dir>.

HarmBench constants come from centerforaisafety/HarmBench `adversarial_training/adv_training.py`
(NUM_GCG_STEPS, GCG_SEARCH_WIDTH, GCG_TOPK, NUM_TEST_CASES_TO_UPDATE_PER_STEP, RESET_EVERY, the
"! " x U[15, 20] suffix init, the refusal "Sorry, I can't do that." + EOS, the loss weights and
`log_1_minus_p_loss` with threshold -5 in its utils) and its alignment-handbook recipe
`adversarial_training/alignment-handbook/recipes/` (Zephyr/Mistral-7B SFT: bf16, lr 2e-5, UltraChat);
we could not re-read those files in this environment, so the values are as issue 13 quotes them.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-instruct"
  c.dtype = "float32"
  c.matmul_precision = "auto"
  c.seed = 0
  c.adversarial = True  # False: the matched SFT baseline (no inner attack, no away term; refusal on the plain behavior)
  c.mode = "lora"
  c.lora = dict(rank=16, alpha=32, modules="q,k,v,o,gate,up,down")
  c.optim = dict(lr=2e-4, warmup_steps=5, end_fraction=0.1, weight_decay=0.0, clip_norm=1.0)
  c.num_steps = 100  # the paper's checkpoints 50/100 (250/500 are beyond a 2-core CPU: ~14 s/step R2D2)
  c.batch = dict(batch_size=4, micro_batches=1, seq_len=128, packing=True)  # the benign (clean SFT) batch
  c.compute_dtype = "float32"
  c.remat = True
  c.log_every = 5
  c.checkpoint = dict(save_every=10, keep=0)  # steps 0, 10, ..., 100 (incl. the paper's 50 and 100), all kept
  c.memory_plan = ""  # a `lvs_jax.core.memory` model name (e.g. "mistral-7b"): print this config's plan and exit
  c.r2d2 = dict(
    gcg_steps=1,  # HarmBench NUM_GCG_STEPS = 5 (CPU: 1)
    search_width=32,  # HarmBench GCG_SEARCH_WIDTH = 512 (CPU: 32)
    topk=64,  # HarmBench GCG_TOPK = 256 (CPU: 64)
    cases_per_step=2,  # HarmBench NUM_TEST_CASES_TO_UPDATE_PER_STEP = 8 (CPU: 2)
    pool_size=40,  # test cases in the pool (our choice for the CPU run; HarmBench's is larger)
    reset_every=50,  # HarmBench RESET_EVERY = 50
    reset_fraction=0.2,  # HarmBench: 20% of the pool replaced at each reset
    suffix_bangs=(15, 20),  # HarmBench: suffix init "! " x U[15, 20]
    max_suffix=48,  # suffix token slots stored per pool entry (checkpoint shape)
    message="{behavior} {optim_str}",  # HarmBench GCG: behavior, a space, the suffix
    refusal="Sorry, I can't do that.",  # HarmBench toward target (+ EOS)
    sft_weight=1.0, away_weight=0.5, toward_weight=0.5,  # HarmBench loss weights
    away_threshold=-5.0,  # HarmBench log_1_minus_p_loss: tokens with log p < -5 contribute 0
    allow_non_ascii=False, filter_ids=True,
    chunk=32,  # candidates per compiled chunk of the candidate-loss pass
    prompt_len=96, rest_len=64, row_len=160,  # fixed GCG prefix / suffix+target slots and train-row length:
    pad_multiple=32,  # one compiled shape each; a longer prompt is rounded up to pad_multiple instead
    ema_decay=0.9,  # EMA of the logged losses
  )
  # Training behaviors: AdvBench (goal, target) pairs; held-out sets never overlap them.
  c.data = dict(pairs="advbench", n_pairs=0,
                benign="harmless_train", n_benign=256, completion_tokens=64, gen_batch_size=16, retries=2,
                drop_refused=True)  # benign answers that are refusals or blank are not clean SFT data
  c.held_out = ("harmful_val", "harmless_val", "xstest")
  if arg in ("sft", "smoke_sft", "mistral7b_sft"):
    c.adversarial = False
    arg = {"sft": "", "smoke_sft": "smoke", "mistral7b_sft": "mistral7b"}[arg]
  if arg == "smoke":
    c.num_steps = 4
    c.batch = dict(batch_size=2, micro_batches=1, seq_len=256, packing=True)  # the tiny BPE spends many tokens
    c.checkpoint.save_every = 2
    c.log_every = 1
    c.r2d2.update(gcg_steps=1, search_width=8, topk=8, cases_per_step=2, pool_size=5, reset_every=2, chunk=8,
                  suffix_bangs=(2, 3), max_suffix=8, prompt_len=192, rest_len=96, row_len=320)
    c.data.update(n_pairs=8, n_benign=4, completion_tokens=8, gen_batch_size=4, retries=0,
                  drop_refused=False)  # a random tiny model answers blanks or refusal phrases
  elif arg == "mistral7b":
    c.model = ""  # --config.model=/path/to/Mistral-7B-v0.1 (HF directory)
    c.dtype = "bfloat16"
    c.compute_dtype = "bfloat16"
    c.mode = "lora"  # HarmBench fine-tunes all weights (multi-GPU); one H200 fits LoRA only (docstring)
    c.lora = dict(rank=64, alpha=128, modules="q,k,v,o,gate,up,down")
    c.optim = dict(lr=1e-4, warmup_steps=10, end_fraction=0.1, weight_decay=0.0, clip_norm=1.0)  # handbook: 2e-5 full
    c.num_steps = 500
    c.batch = dict(batch_size=8, micro_batches=1, seq_len=1024, packing=True)
    c.checkpoint.save_every = 50  # includes the paper's 50/100/250/500
    c.r2d2.update(gcg_steps=5, search_width=512, topk=256, cases_per_step=8, pool_size=400, chunk=128,
                  prompt_len=128, rest_len=96, row_len=256)
    c.data.update(n_benign=4000, completion_tokens=256)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'sft', 'smoke', 'smoke_sft', 'mistral7b' "
                     "or 'mistral7b_sft'")
  return c
