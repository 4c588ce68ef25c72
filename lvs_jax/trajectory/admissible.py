"""KL-admissible carriers at every checkpoint (issue 14).

A carrier family (harmfulness, refusal: the carriers of `lvs_jax.trajectory.measures.model_geometry`,
recomputed here from the same behavioral pool) is **KL-admissible at layer l** when projecting its layer-l
direction out of every layer and site (refusal_direction's directional ablation,
`lvs_jax.core.edit.ablate_directions`) keeps the mean next-token KL(clean || ablated) at the last prompt
token of harmless prompts at most `bound` nats. The measurement is refusal_direction's KL filter
(`select_direction`), computed by the kernel `lvs_jax.geometry.carriers.candidate_scores` uses for its
"ablation_kl" (`lvs_jax.geometry.causal.ablation_sweep_prompts`): all layers of both families in one
compiled sweep per prompt batch (a chunked `lax.map` over directions), no Python loop of forwards.

Default bound 0.1 nats: refusal_direction's threshold (`carriers.SelectionConfig.kl_threshold`) for the same
quantity, so an admissible layer is one that passes their filter. By Pinsker's inequality a KL of 0.1 nats
moves at most sqrt(0.1 / 2) ~ 0.22 of the next-token probability mass: removing an admissible carrier leaves
harmless behavior nearly intact, so the direction is specific to the concept rather than load-bearing for the
model in general, and coupling read at such layers is not a by-product of general damage. A zero
(degenerate) carrier (`carriers.zero_carrier`, e.g. layer 0 at the last prompt token, one template token for
every prompt) would pass trivially: it is never admissible and its KL is not measured (nan).

Per checkpoint (row entries, cached in the model directory, keyed by content):
  kl_admissible/<family>       value = fraction of layers admissible, k of n layers, the layers, min KL
  kl_admissible_rank/<family>  effective rank (`measures.effective_rank`) of that family's admissible unit
                               carriers stacked across layers [k, D] (None when k = 0)
  coupling_admissible/peak     coupling (`measures.checkpoint_coupling`) restricted to the layers where
  coupling_admissible/mean     both families are admissible: peak layer and layer mean with intervals
The per-layer KL ([L] per family) is kept in `admissible_kl.npz`, keyed without the bound, so a new bound
reuses it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from lvs_jax.io import files, keys
from lvs_jax.trajectory import measures


def default_config() -> dict:
  # set/n: the trajectory's harmless set (harmless_val, disjoint from the runs' training sets), first n prompts.
  return dict(enabled=True, set="harmless", n=32, bound=0.1, batch_size=16, chunk=8)


def make_smoke(c) -> None:
  c.admissible.n = 2
  c.admissible.batch_size = 4


def ablation_kl(model, vectors: Mapping[str, np.ndarray], skip: Mapping[str, np.ndarray], prompts: Sequence[str], *,
                batch_size: int = 16, chunk: int = 8) -> dict[str, np.ndarray]:
  """{family: [L] mean KL(clean || ablated) over `prompts`, nats}: each layer's carrier vectors[f][l] (any norm)
  ablated at every layer and site. Layers where skip[f] [L] is True get nan and cost nothing. Every family's
  directions go through one `causal.ablation_sweep_prompts` call."""
  import jax.numpy as jnp

  from lvs_jax.evals import judges
  from lvs_jax.geometry import causal

  todo = [(f, layer) for f, v in vectors.items() for layer in range(len(v)) if not skip[f][layer]]
  out = {f: np.full(len(v), np.nan) for f, v in vectors.items()}
  if not todo:
    return out
  dirs = np.stack([np.asarray(vectors[f][layer], np.float32) for f, layer in todo])  # [K, D]
  ids = jnp.asarray(judges.refusal_token_ids(model.tokenizer))
  res = causal.ablation_sweep_prompts(model, prompts, dirs, ids, batch_size=batch_size, chunk=chunk)
  for (f, layer), v in zip(todo, np.asarray(res["kl"], np.float64).mean(-1)):
    out[f][layer] = v
  return out


def admissibility(kl: Mapping[str, np.ndarray], vectors: Mapping[str, np.ndarray], bound: float) -> dict[str, dict]:
  """{family: {admissible [L] bool, k, n, fraction, layers, min_kl, rank}} from per-layer KL [L] (nan = not
  measured, never admissible) and carriers [L, D]: admissible where KL <= bound."""
  out = {}
  for f, k in kl.items():
    k = np.asarray(k, np.float64)
    ok = np.isfinite(k) & (k <= bound)
    finite = k[np.isfinite(k)]
    out[f] = dict(admissible=ok, k=int(ok.sum()), n=len(k), fraction=float(ok.mean()) if len(k) else float("nan"),
                  layers=np.flatnonzero(ok).tolist(), min_kl=float(finite.min()) if len(finite) else float("nan"),
                  rank=measures.effective_rank(np.asarray(vectors[f])[ok]) if ok.any() else float("nan"))
  return out


def _kl_cached(model, c: dict, zero: dict, prompts: Sequence[str], a, path: str, parts: dict) -> dict[str, np.ndarray]:
  if keys.claim(path, "trajectory_ablation_kl", **parts):
    return files.load_npz(path)
  kl = ablation_kl(model, {f: c[f] for f in measures.FAMILIES}, zero, prompts, batch_size=a.batch_size,
                   chunk=a.chunk)
  files.atomic_savez(path, **kl)
  return kl


def model_admissible(model, sets: Mapping[str, Sequence[str]], cfg, model_dir: str, train: set[str]) -> dict:
  """The row entries above for one checkpoint (cached: model_dir/admissible.json and admissible_kl.npz). The pool
  is `measures.model_geometry`'s (cfg.geometry, cached generations, `train` prompts dropped); the KL prompts are
  the first cfg.admissible.n of set cfg.admissible.set, `train` prompts dropped."""
  from lvs_jax.geometry import carriers
  from lvs_jax.geometry import coupling as coupling_lib
  from lvs_jax.training import recipes

  g, a = cfg.geometry, cfg.admissible
  if a.set not in sets:
    raise ValueError(f"admissible.set {a.set!r} is not a trajectory set (have {sorted(sets)})")
  kl_prompts = [p for p in sets[a.set] if recipes.fold_prompt(p) not in train][: a.n or None]
  pool = measures.geometry_pool(measures.behavior_records(model_dir, sets), g, train)
  la, lb = pool["la"], pool["lb"]
  model_key = keys.model_parts(model)
  pool_parts = dict(model=model_key, prompts=pool["prompts"], la=la.tolist(), lb=lb.tolist(), site=g.site,
                    kl_prompts=kl_prompts)
  path = os.path.join(model_dir, "admissible.json")
  if keys.claim(path, "trajectory_admissible", **pool_parts, config=dict(a.to_dict(), n_boot=g.n_boot, seed=g.seed)):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  out = {}
  estimable = min((la == 1).sum(), (la == -1).sum(), (lb == 1).sum(), (lb == -1).sum()) > 0
  if not estimable or not kl_prompts:
    why = "no refusal carrier (the pool lacks a label)" if not estimable else f"no prompts in set {a.set!r}"
    for f in measures.FAMILIES:
      out[f"kl_admissible/{f}"] = dict(value=None, k=None, n=None, layers=[], min_kl=None, bound=a.bound, reason=why)
      out[f"kl_admissible_rank/{f}"] = dict(value=None, n=0)
    for s in ("peak", "mean"):
      out[f"coupling_admissible/{s}"] = dict(value=None, low=None, high=None, n=len(la), n_layers=0)
    out = files.to_jsonable(out)
    files.atomic_write_json(path, out, indent=1)
    return out
  x_inst, x_post = carriers.collect_inst_post(model, pool["prompts"], site=g.site, batch_size=g.batch_size)
  c = measures.checkpoint_coupling(x_inst, la, x_post, lb, n_boot=0)  # the carriers [L, D] (model_geometry's)
  zero = {"harmfulness": coupling_lib.degenerate_layers(c["harmfulness"], x_inst),
          "refusal": coupling_lib.degenerate_layers(c["refusal"], x_post)}
  kl = _kl_cached(model, c, zero, kl_prompts, a, os.path.join(model_dir, "admissible_kl.npz"), pool_parts)
  adm = admissibility(kl, c, a.bound)
  for f, s in adm.items():
    out[f"kl_admissible/{f}"] = dict(value=s["fraction"], k=s["k"], n=s["n"], layers=s["layers"], min_kl=s["min_kl"],
                                     bound=a.bound, n_prompts=len(kl_prompts))
    out[f"kl_admissible_rank/{f}"] = dict(value=s["rank"], n=s["k"])
  both = adm["harmfulness"]["admissible"] & adm["refusal"]["admissible"]
  r = measures.checkpoint_coupling(x_inst, la, x_post, lb, n_boot=g.n_boot, seed=g.seed, within=both)
  out["coupling_admissible/peak"] = dict(r["peak"], n=len(la), n_layers=int(both.sum()))
  out["coupling_admissible/mean"] = dict(r["mean"], n=len(la), n_layers=int(both.sum()))
  out = files.to_jsonable(out)  # nan -> None: rows compare equal after a JSON round trip
  files.atomic_write_json(path, out, indent=1)
  return out
