"""Latent vulnerability at every checkpoint (issue 14): the LVS audit of `lvs_jax.lvs.audit`, per distinct weights.

At each checkpoint, as `lvs_jax.lvs.audit.run` does (without its random-direction sweep): greedy generations of
the attacked set (cfg.lvs.prompts, default harmful_val, with its targets or cfg.lvs.target) judged for refusal
with cfg.lvs.max_new_tokens, the judge that also decides attack success; PGD latent attacks per (layer, radius)
cell on the prompts that checkpoint refuses (`lvs.audit.run_cells`; every prompt when only_refused is False);
LVS per layer and the model-level LVS (mean over layers) with percentile bootstrap intervals over prompts
(`lvs.audit.summarize` -> `lvs.attack.bootstrap_lvs`); the audit gap R x LVS with its joint bootstrap
(`lvs.attack.audit_gap`). Prompts of the runs' training sets (cfg.lvs.exclude) are dropped first.

Files under model_dir/lvs/ (the per-weights directory): behavior.jsonl (keyed generations), cells/l{L}_r{i}.json
(each keyed by model, prompts, targets, cell, attack, generation and judge: a rerun computes nothing it has),
summary.json. A checkpoint that refuses nothing has LVS "not measured" (None) and audit gap 0.

Row entries: "lvs/model" {value, low, high, n (attacked), n_refused, n_prompts, excluded, measured}, "lvs/audit_gap"
{value, low, high, n (prompts)}, and "lvs/layer@<l>" {value, low, high, n} for each attacked layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lvs_jax.io import files


def lvs_prompts(c, train: set[str]) -> tuple[list[str], list[str], int]:
  """(prompts, targets, n dropped): `lvs.audit.load_targets` minus the folded `train` prompts."""
  from lvs_jax.lvs import audit as lvs_audit
  from lvs_jax.training import recipes

  prompts, targets = lvs_audit.load_targets(c)
  keep = [i for i, p in enumerate(prompts) if recipes.fold_prompt(p) not in train]
  return [prompts[i] for i in keep], [targets[i] for i in keep], len(prompts) - len(keep)


def model_lvs(model, prompts: Sequence[str], targets: Sequence[str], excluded: int, c, model_dir: str) -> dict:
  """The row entries of one checkpoint (see module docstring); c: the LVS config (experiments/configs/lvs.py);
  excluded: how many training prompts `lvs_prompts` dropped (recorded in "lvs/model")."""
  from lvs_jax.lvs import audit as lvs_audit

  prompts, targets = list(prompts), list(targets)
  summary = lvs_audit.measure(model, prompts, targets, c, os.path.join(model_dir, "lvs"), progress=False)
  flags, layers = summary.pop("refused_flags"), list(c.layers)
  gap = (summary["audit_gap"], summary["audit_gap_low"], summary["audit_gap_high"])
  n = int(summary["n_attacked"])
  out = {"lvs/model": dict(value=summary["model_lvs"], low=summary["model_lvs_low"], high=summary["model_lvs_high"],
                           n=n, n_refused=int(flags.sum()), n_prompts=len(prompts), excluded=excluded,
                           measured=bool(summary["measured"])),
         "lvs/audit_gap": dict(value=gap[0], low=gap[1], high=gap[2], n=len(prompts))}
  for i, layer in enumerate(layers):
    out[f"lvs/layer@{layer}"] = dict(value=summary["lvs"][i], low=summary["lvs_low"][i], high=summary["lvs_high"][i],
                                     n=n)
  return files.to_jsonable(out)  # nan (not measured) -> None: rows compare equal after a JSON round trip
