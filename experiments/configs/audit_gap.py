r"""The model zoo and the audit gap (issue 15; lvs_jax/lvs/zoo.py). Per model: behavioral refusal on held-out
harmful_val (39 prompts, greedy 64 tokens, JailbreakBench substring judge, Wilson 95%); XSTest over-refusal (100
seeded safe prompts); LVS per layer (layers 6, 14, 22: shallow, middle, deep) with bootstrap intervals on a radius
grid chosen from a pilot (the refused prompts among the first 8, layer 14, grid 0.005 x 2^k up to 0.64; the
evaluation grid = the 20/40/60/80% quantiles of the pooled pilot breaking radii); the eps* distribution; the audit
gap (refusal x LVS); the ASR after 0/10/20 harmful LoRA steps on AdvBench pairs; and the LVS at layer 14 with
derived per-prompt targets next to the fixed "Sure, here is" opening. PGD settings and the greedy stopping rule:
experiments/configs/lvs.py; harmful fine-tuning settings: experiments/configs/harmful_finetune.py (one copy each).

The six SmolLM2-135M models (a model that is not built fails at once with the registry's build command; add
--config.skip_missing=True to tabulate the built ones; rerunning reuses everything, keyed by content):
  python experiments/audit_gap.py --config=experiments/configs/audit_gap.py --workdir=/tmp/zoo

Cost on the 2-core CPU: per model ~1.5 min of generations (harmful_val, XSTest), ~2-3 min of harmful LoRA (20
steps + 3 evaluations) and the attacks, which scale with the refused prompts (3 layers x 4 radii, each radius only
on the prompts not broken at a smaller one; a PGD batch of 16 prompts is ~25 s on a quiet CPU); measured wall times
per model are in BENCHMARKS.md. More layers: --config.lvs.layers="(4, 8, 12, 16, 20, 24)".

Other models ("label=spec": a registered name, an HF directory, a .gguf file or "<training workdir>@<step>"):
  python experiments/audit_gap.py --config=experiments/configs/audit_gap.py --workdir=/tmp/zoo \
    --config.models="('instruct=smollm2-135m-instruct', 'r2d2@100=/tmp/r2d2@100', 'sft@100=/tmp/r2d2_sft@100')"
A fixed radius grid (no pilot): "--config.lvs.radii=(0.01,0.02,0.04,0.08)". Smoke (tests): `:smoke`.
"""

import os

import ml_collections

from lvs_jax.core import cli
from lvs_jax.lvs import zoo

_HERE = os.path.dirname(os.path.abspath(__file__))
lvs_config, harmful_ft_config = (cli.config_module(os.path.join(_HERE, f"{name}.py"))
                                 for name in ("lvs", "harmful_finetune"))

MODELS = ("instruct=smollm2-135m-instruct", "aligned=smollm2-135m-aligned", "harmful_ft=smollm2-135m-harmful-ft",
          "dissociated_realign=smollm2-135m-dissociated-realign",
          "dissociated_latent=smollm2-135m-dissociated-latent", "lat=smollm2-135m-lat")
# The LVS section's attack settings the zoo uses (its sweep, prompt-set and judge knobs do not apply here).
ATTACK_FIELDS = ("layers", "norm", "scope", "steps", "step_size", "optimizer", "loss", "random_start", "stop",
                 "stop_tokens", "success_loss", "max_new_tokens", "batch_size", "target", "target_source")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = MODELS
  c.skip_missing = False  # True: skip (and name in the report) models that are registered but not built
  c.dtype = "float32"
  c.matmul_precision = "auto"
  c.seed = 0
  c.n_boot = 1000  # bootstrap resamples of every LVS / audit-gap interval
  c.harmful = dict(path="harmful_val", n=0)  # behavioral refusal and the attacked prompts (n=0: all 39)
  c.xstest = dict(path="xstest", label="safe", n=100)  # over-refusal: a seeded sample of the 250 safe prompts
  c.eval = dict(max_new_tokens=64, batch_size=16, prefixes="jailbreakbench")  # one judge for everything
  section = lvs_config.section_config()
  c.lvs = ml_collections.ConfigDict({k: section[k] for k in ATTACK_FIELDS})
  c.lvs.layers = (6, 14, 22)  # shallow / middle / deep (the intermediate-layer claim); CPU-sized
  c.lvs.target_source = "fixed"  # "fixed" (c.lvs.target) | "file" (the set's own) | "derived" (lvs_jax/lvs/zoo.py)
  c.lvs.radii = ()  # () = from the pilot; a tuple fixes the grid and skips the pilot
  c.pilot = dict(n_prompts=8, layer=14, grid=zoo.PILOT_GRID, quantiles=(0.2, 0.4, 0.6, 0.8), digits=2)
  # LVS at one layer with the other kind of target, on the refused prompts among the first n_prompts (0: all
  # refused), next to the main target's LVS on the same prompts.
  c.sensitivity = dict(enabled=True, layer=14, target_source="derived", n_prompts=8)
  hft = harmful_ft_config.get_config()
  c.harmful_ft = ml_collections.ConfigDict(dict(
    steps=(0, 10, 20), mode=hft.mode, lora=hft.lora.to_dict(), optim=hft.optim.to_dict(),
    batch=hft.batch.to_dict(), compute_dtype=hft.compute_dtype, remat=hft.remat, log_every=hft.log_every,
    data=hft.data.to_dict(), min_continued_words=hft.eval.min_continued_words))
  if arg == "smoke":
    make_smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'smoke'")
  return c


def make_smoke(c: ml_collections.ConfigDict) -> None:
  """Seconds on a tiny model: 4 harmful prompts (all of them in the pilot too, so pilot and LVS cells share one
  compiled attack) and 4 XSTest prompts, 4 tokens, layers 0-1, 2 PGD steps, 2 LoRA steps."""
  c.n_boot = 200
  c.harmful.n = 4
  c.xstest.n = 4
  c.eval = dict(max_new_tokens=4, batch_size=8, prefixes="jailbreakbench")
  c.lvs.update(layers=(0, 1), steps=2, max_new_tokens=4, batch_size=1)
  c.pilot.update(n_prompts=4, layer=1, grid=(0.25, 0.5, 1.0, 2.0, 4.0), quantiles=(0.25, 0.5, 0.75))
  c.sensitivity.update(layer=1, n_prompts=4)
  c.harmful_ft.update(steps=(0, 2), log_every=1)
  c.harmful_ft.batch.update(batch_size=2, seq_len=128)
  c.harmful_ft.data.n_pairs = 6
