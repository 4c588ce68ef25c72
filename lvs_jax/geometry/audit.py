"""The safety-geometry audit: carriers, coupling, causal sweeps against matched controls, the four
behavioral diagnostics; returns the report's "geometry" section (lvs_jax.geometry.section draws it).
Resumable step by step.

Prompt sets (defaults; all bundled with the package, lvs_jax/prompts):
  carrier pool     260 AdvBench prompts + an equal-size seeded sample of harmless_val, plus
                   refusal-only extras (XSTest, safe and unsafe): the model's greedy generations on
                   the whole pool label refused / complied for the refusal carriers. Every pool, val and
                   eval prompt that occurs in a training set of the model under study
                   (cfg.exclude_training; default the safety SFT sets harmful_train, harmless_train,
                   safe_but_scary) is dropped first (`recipes.drop_overlap`), so the anchor's carriers are
                   not read on the prompts it was trained to refuse
  selection        n_val prompts of harmful_val and of harmless_val (refusal_direction's choice)
  causal eval      held-out harmful prompts (AdvBench rows not in the pool) and harmless_val rows not
                   used for selection
  diagnostics      harmful_val (+ the adversarial templates), XSTest safe, a harmless_val sample

Stratified refusal carriers: refused vs complied within the harmful stratum and within the harmless /
XSTest-safe stratum, each coupled to the harmfulness carrier (not estimable when a side has fewer
than cfg.min_stratum prompts).

Causal sweeps: logit add sweeps of every carrier (c x carrier, c in units of the carrier's own norm)
and of matched random controls (cfg.control_kinds: isotropic, and anisotropic = drawn from the
activation covariance at that layer; cfg.n_controls seeds each, effects also as z-scores against the
seeds) at every `sweep_layer_stride`-th layer, on the selection prompts; next to them the norm- and
layer-matched comparison: every carrier's unit direction at cfg.matched_rel_norm x the pool's mean
activation norm (t_post_inst) at the same layers, against controls of that norm;
then generation cells on the held-out prompts: directional ablation of each carrier's selected
direction (and of random directions), and c x carrier added at the carrier's best sweep layer
(`gen_layer`), each against matched controls; effects with paired bootstrap intervals.

Files under `workdir/geometry/`:
  generations/pool_*.jsonl      labelling generations (behavior.evaluate_refusal, resumable)
  activations.npz               resid_pre at t_inst and t_post_inst of every pool prompt, every layer
  carriers.{npz,json}           the carriers with their selection metadata (carriers.save_carriers)
  selection_<carrier>.json      per-layer candidate scores
  coupling.npz, coupling.json   coupling statistics
  coupling_strata.{npz,json}    within-stratum refusal carriers' coupling (and counts)
  sweep_<set>.npz               logit add sweeps (layers x coefficients x vectors x prompts)
  ablation_controls.npz         logit ablation of the random control directions
  cells/<set>__<cell>.json      one generation cell (completions, refusal flags, refusal scores)
  diagnostics/*.jsonl           diagnostics generations; diagnostics.json the summary
  summary.json                  the numbers of the report section
A killed run re-run on the same workdir loads every finished file and computes only the rest.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import generate as gen
from lvs_jax.evals import behavior, judges
from lvs_jax.geometry import carriers, causal, coupling, diagnostics
from lvs_jax.geometry import section as geometry_section
from lvs_jax.io import datasets as data
from lvs_jax.io import files, keys
from lvs_jax.report import store as report_lib
from lvs_jax.training import recipes

CARRIER_NAMES = (carriers.HARMFULNESS, carriers.REFUSAL, carriers.REFUSAL_HH)


# ----------------------------------------------------------------------------- helpers


_atomic_json = files.atomic_write_json  # strict JSON (nan -> null), temp file + rename


def _load_json(path: str):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def _scalar(v):
  """0-d arrays (as np.load returns scalars) -> Python scalars; everything else unchanged."""
  return v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v


def training_prompts(names) -> dict[str, list[str]]:
  """{set name: prompts} of the training sets to exclude (bundled names or paths, `data.load_prompts`)."""
  return {name: list(data.load_prompts(name)) for name in names}


def drop_training(prompts: data.PromptSet, training: dict[str, list[str]]) -> tuple[data.PromptSet, int]:
  """`prompts` without any that occur (case/whitespace-insensitively, `recipes.drop_overlap`) in a training
  set -> (kept, number dropped)."""
  if not training:
    return prompts, 0
  return recipes.drop_overlap(prompts, *training.values())


def _take(path: str, n: int, seed: int, *, label=None, exclude=(), training=None, dropped=None,
          name: str = "") -> data.PromptSet:
  ps = data.load_prompts(path, label=label)
  ps, k = drop_training(ps, training or {})
  if dropped is not None:
    dropped[name] = dropped.get(name, 0) + k
  ps, _ = recipes.drop_overlap(ps, exclude)
  if n and n < len(ps):
    ps = data.sample(ps, n, seed=seed)
  return ps


STRATUM_OF_LABEL = {"unsafe": 1, "safe": -1}  # XSTest labels -> pool strata (carriers.STRATA)


def prompt_sets(cfg) -> dict:
  """Every prompt set of the audit (loaded before the model, so a bad path fails fast): {name: [prompts]},
  plus "extras_strata" (int per extra prompt: +1 XSTest unsafe, -1 XSTest safe, 0 unlabelled) and
  "training_overlap" ({"excluded": [set names], "dropped": {set: prompts dropped}}: the pool, val and
  eval prompts removed because a training set of the model under study contains them)."""
  training, dropped = training_prompts(cfg.exclude_training), {}
  kw = dict(training=training, dropped=dropped)
  harmful = list(_take(cfg.harmful, cfg.n_harmful, cfg.seed, name="harmful", **kw))
  harmless = list(_take(cfg.harmless, cfg.n_harmless or len(harmful), cfg.seed, name="harmless", **kw))
  extras, strata = [], []
  for path in cfg.refusal_extra:
    ps = _take(path, cfg.n_refusal_extra, cfg.seed, exclude=harmful + harmless + extras, name="extras", **kw)
    extras += list(ps)
    strata += [STRATUM_OF_LABEL.get(lab, 0) for lab in ps.labels] if ps.labels is not None else [0] * len(ps)
  pool = harmful + harmless + extras
  val_h = list(_take(cfg.val_harmful, cfg.n_val, cfg.seed, exclude=pool, name="val_harmful", **kw))
  hl = list(_take(cfg.val_harmless, cfg.n_val + cfg.n_eval, cfg.seed, exclude=pool, name="val_eval_harmless", **kw))
  eval_harmful = list(_take(cfg.eval_harmful, cfg.n_eval, cfg.seed, exclude=pool + val_h, name="eval_harmful", **kw))
  sets = dict(harmful=harmful, harmless=harmless, extras=extras, val_harmful=val_h, val_harmless=hl[:cfg.n_val],
              eval_harmful=eval_harmful, eval_harmless=hl[cfg.n_val:])
  if cfg.diagnostics:
    sets["diag_harmful"] = list(_take(cfg.diag_harmful, cfg.diag_n_harmful, cfg.seed))
    sets["diag_xstest_safe"] = list(_take(cfg.diag_xstest, cfg.diag_n_xstest, cfg.seed, label="safe"))
    sets["diag_harmless"] = list(_take(cfg.diag_harmless, cfg.diag_n_harmless, cfg.seed + 1))
  for k, v in sets.items():
    if not v and not (k == "extras" and not cfg.refusal_extra):
      raise ValueError(f"geometry audit: prompt set {k!r} is empty (check the config's paths and sizes"
                       + (f"; {dropped.get(k, 0)} of its prompts are in the excluded training sets "
                          f"{list(cfg.exclude_training)}" if dropped.get(k) else "") + ")")
  sets["extras_strata"] = strata
  sets["training_overlap"] = dict(excluded=list(cfg.exclude_training), dropped=dropped)
  return sets


def pool_strata(sets) -> np.ndarray:
  """int [N] stratum of every pool prompt (`carriers.STRATA`): +1 harmful, -1 harmless / XSTest safe."""
  return np.r_[np.ones(len(sets["harmful"])), -np.ones(len(sets["harmless"])),
               np.asarray(sets["extras_strata"], float)].astype(np.int64)


# ----------------------------------------------------------------------------- steps


def _complete_jsonl(model, path: str, prompts: list[str], cfg) -> list[dict] | None:
  """The records of a finished generations file of this model for exactly these prompts (its content key
  matches, `behavior.generation_key`), else None."""
  if not keys.matches(path, "generations", **behavior.generation_key(
      model, prompts, max_new_tokens=cfg.max_new_tokens, prefixes=cfg.judge_prefixes)):
    return None
  rows = files.read_jsonl(path, repair=False, log=None)
  if [r.get("prompt") for r in rows] != prompts:
    return None
  return rows


def label_pool(model, sets, cfg, d: str) -> dict:
  """Greedy generations on the pool, judged -> {"refused": bool [N], "n_refused_by_set": {...}}."""
  refused, by_set = [], {}
  for name in ("harmful", "harmless", "extras"):
    if not sets[name]:
      continue
    path = os.path.join(d, "generations", f"pool_{name}.jsonl")
    records = _complete_jsonl(model, path, sets[name], cfg)
    if records is None:  # generate the missing rows (evaluate_refusal resumes from the file)
      records = behavior.evaluate_refusal(model, f"pool_{name}", sets[name], max_new_tokens=cfg.max_new_tokens,
                                          batch_size=cfg.batch_size, prefixes=cfg.judge_prefixes, cache_path=path,
                                          progress=True).records
    flags = carriers.refusal_labels(records)
    refused.append(flags)
    by_set[name] = dict(n=len(flags), refused=int(flags.sum()))
    logging.info("pool %s: %d of %d refused", name, flags.sum(), len(flags))
  return dict(refused=np.concatenate(refused), by_set=by_set)


def pool_activations(model, sets, cfg, d: str) -> tuple[np.ndarray, np.ndarray]:
  path = os.path.join(d, "activations.npz")
  pool = sets["harmful"] + sets["harmless"] + sets["extras"]
  if keys.claim(path, "activations", model=keys.model_parts(model), prompts=pool,
                config=dict(site=cfg.site, positions=["t_inst", "t_post_inst"], chat=True)):
    z = files.load_npz(path)
    return z["x_inst"], z["x_post"]
  x_inst, x_post = carriers.collect_inst_post(model, pool, site=cfg.site, batch_size=cfg.batch_size)
  files.atomic_savez(path, x_inst=x_inst, x_post=x_post)
  return x_inst, x_post


def pool_labels(sets, refused: np.ndarray) -> dict[str, np.ndarray]:
  """+1 / -1 / 0 labels of every pool prompt for each carrier (see module docstring)."""
  nh, nl, ne = len(sets["harmful"]), len(sets["harmless"]), len(sets["extras"])
  harm = np.r_[np.ones(nh), -np.ones(nl), np.zeros(ne)].astype(np.int64)
  ref = np.where(refused, 1, -1).astype(np.int64)
  return {carriers.HARMFULNESS: harm, carriers.REFUSAL: ref, carriers.REFUSAL_HH: harm.copy()}


def build_carriers(x_inst, x_post, labels, cfg, labelling: dict) -> dict[str, carriers.Carrier]:
  out = {}
  n_ref, n_comp = int((labels[carriers.REFUSAL] == 1).sum()), int((labels[carriers.REFUSAL] == -1).sum())
  for name in cfg.carriers:
    if name not in CARRIER_NAMES:
      raise ValueError(f"unknown carrier {name!r}; expected one of {CARRIER_NAMES}")
    x = x_inst if carriers.POOLING[name] == "last_instruction" else x_post
    lab = labels[name]
    if name == carriers.REFUSAL and min(n_ref, n_comp) < cfg.min_refused:
      logging.warning("only %d refused / %d complied pool prompts (< min_refused=%d): no behavioral refusal carrier",
                      n_ref, n_comp, cfg.min_refused)
      continue
    meta = dict(positives={carriers.HARMFULNESS: "harmful", carriers.REFUSAL: "refused",
                           carriers.REFUSAL_HH: "harmful"}[name],
                negatives={carriers.HARMFULNESS: "harmless", carriers.REFUSAL: "complied",
                           carriers.REFUSAL_HH: "harmless"}[name],
                pool=dict(harmful=cfg.harmful, harmless=cfg.harmless, extras=list(cfg.refusal_extra)),
                judge=cfg.judge_prefixes, max_new_tokens=cfg.max_new_tokens, labelling=labelling["by_set"])
    out[name] = carriers.carrier_from_activations(name, x[:, lab == 1], x[:, lab == -1], site=cfg.site, meta=meta)
  return out


def run_selection(model, cs, sets, cfg, d: str) -> None:
  """Fills cs[name].meta["selection"] (cached per carrier in selection_<name>.json)."""
  n_layers = model.cfg.n_layers
  scfg = carriers.SelectionConfig(cfg.kl_threshold, cfg.induce_refusal_threshold, cfg.prune_layer_fraction)
  for name, c in cs.items():
    path = os.path.join(d, f"selection_{name}.json")
    # Candidate scores belong to this model, this carrier and these validation prompts (content key).
    sel = _load_json(path) if keys.claim(
      path, "carriers", model=keys.model_parts(model), carrier=keys.array_digest(np.asarray(c.vectors)),
      prompts=[sets["val_harmful"], sets["val_harmless"]], config=dict(stride=cfg.candidate_layer_stride)) else None
    fresh = sel is not None and sel.get("n_val") == cfg.n_val and sel.get("stride") == cfg.candidate_layer_stride \
        and sel.get("candidates")
    if not cfg.select:
      sel = dict(layer=int(cfg.default_layer_fraction * n_layers), candidates=[], rule="default_layer_fraction")
    else:
      if fresh:  # candidate scores are cached; the decision is recomputed (cheap, follows the config)
        scores = {key: np.array([c[key] for c in sel["candidates"]])
                  for key in ("layer", "ablation_refusal", "ablation_kl", "steering_refusal")}
        scores["layers"] = scores.pop("layer")
        scores.update(harmful_refusal=sel["harmful_refusal"], harmless_refusal=sel["harmless_refusal"])
        seconds = sel.get("seconds")
      else:
        t0 = time.time()
        scores = carriers.candidate_scores(model, c, sets["val_harmful"], sets["val_harmless"],
                                           layers=range(0, n_layers, cfg.candidate_layer_stride),
                                           batch_size=cfg.batch_size)
        seconds = time.time() - t0
      scores.update(carriers.zero_check_scores(c, scores["layers"]))
      sel = carriers.select_layer(scores, n_layers, scfg)
      sel["rule"] = "refusal_direction"
      if sel["layer"] is None:
        sel["layer"], sel["rule"] = carriers.fallback_layer(scores, n_layers, scfg)
      sel["seconds"] = seconds
    sel.update(n_val=cfg.n_val, stride=cfg.candidate_layer_stride)
    _atomic_json(path, sel)
    c.meta["selection"] = sel
    logging.info("carrier %s: layer %s (%s)", name, sel["layer"], sel["rule"])


def control_vectors(cs, n_controls: int, seed: int) -> dict[str, np.ndarray]:
  """Matched random controls per carrier: [K, L, D], exactly the carrier's norm at every layer."""
  return {name: causal.matched_controls(jax.random.fold_in(jax.random.key(seed), i), c.vectors, n_controls)
          for i, (name, c) in enumerate(sorted(cs.items()))}


CONTROL_KINDS = ("isotropic", "anisotropic")


def all_controls(cs, xs: dict, labels: dict, cfg) -> dict[str, dict[str, np.ndarray]]:
  """{kind: {carrier: [K, L, D]}} for each of cfg.control_kinds, at each carrier's norm. Anisotropic
  controls are drawn from the covariance of the carrier's own activations (its token, every pool
  prompt of its contrast), centered within its groups (`causal.anisotropic_controls`)."""
  bad = set(cfg.control_kinds) - set(CONTROL_KINDS)
  if bad or "isotropic" not in cfg.control_kinds:
    raise ValueError(f"control_kinds must include 'isotropic' and be among {CONTROL_KINDS}, got {cfg.control_kinds}")
  out = {"isotropic": control_vectors(cs, cfg.n_controls, cfg.seed)}
  if "anisotropic" in cfg.control_kinds:
    key = jax.random.key(cfg.seed + 11)
    out["anisotropic"] = {}
    for i, (name, c) in enumerate(sorted(cs.items())):
      used = labels[name] != 0
      out["anisotropic"][name] = causal.anisotropic_controls(jax.random.fold_in(key, i), xs[name][:, used], c.vectors,
                                                             cfg.n_controls, groups=labels[name][used])
  return out


def matched_set(cs, x_post: np.ndarray, labels: dict, cfg) -> dict[str, np.ndarray]:
  """The norm- and layer-matched comparison's vectors: {"carriers": [nC, L, D] (sorted names), and per
  control kind [K, L, D]}, all of norm cfg.matched_rel_norm x the pool's mean activation norm at
  t_post_inst at every layer (`carriers.matched_vectors`)."""
  names = sorted(cs)
  scale = carriers.activation_scale(x_post)
  out = {"carriers": np.stack([carriers.matched_vectors(cs[n].vectors, scale, cfg.matched_rel_norm) for n in names])}
  ref = np.zeros(x_post.shape[::2], np.float32)
  ref[:, 0] = cfg.matched_rel_norm * scale  # any vector of the matched norm: controls take only its norm
  out["isotropic"] = causal.matched_controls(jax.random.key(cfg.seed + 13), ref, cfg.n_controls)
  if "anisotropic" in cfg.control_kinds:
    out["anisotropic"] = causal.anisotropic_controls(jax.random.key(cfg.seed + 17), x_post, ref, cfg.n_controls,
                                                     groups=labels[carriers.HARMFULNESS])
  return out


def sweep_vectors(cs, controls: dict, matched: dict) -> tuple[np.ndarray, list[str], np.ndarray]:
  """[nV, L, D] of every logit-sweep vector and its block layout: blocks in order "carriers" (sorted
  names), "isotropic" (K per carrier, carrier by carrier), "anisotropic" (likewise, when drawn),
  "matched" (one per carrier), "matched_isotropic" (K), "matched_anisotropic" (K, when drawn).
  Returns (vectors, block names, [nBlocks, 2] start/stop)."""
  names = sorted(cs)
  blocks = [("carriers", np.stack([cs[n].vectors for n in names]))]
  for kind in CONTROL_KINDS:
    if kind in controls:
      blocks.append((kind, np.concatenate([controls[kind][n] for n in names])))
  blocks.append(("matched", matched["carriers"]))
  for kind in CONTROL_KINDS:
    if kind in matched:
      blocks.append((f"matched_{kind}", matched[kind]))
  sizes = np.cumsum([0] + [len(b) for _, b in blocks])
  return (np.concatenate([b for _, b in blocks]).astype(np.float32), [k for k, _ in blocks],
          np.stack([sizes[:-1], sizes[1:]], 1))


def run_add_sweeps(model, cs, controls, sets, cfg, d: str, matched: dict | None = None) -> dict:
  """Logit add sweeps on harmful (negative coefficients) and harmless (positive) prompts: every carrier,
  its controls, and the matched comparison's vectors (`sweep_vectors`; `controls` = {kind: {carrier:
  [K, L, D]}}, or {carrier: [K, L, D]} for isotropic controls only)."""
  names = sorted(cs)
  if controls and not isinstance(next(iter(controls.values())), dict):
    controls = {"isotropic": controls}
  if matched is None:
    vecs = np.concatenate([np.stack([cs[n].vectors for n in names])] + [controls["isotropic"][n] for n in names])
    block_names, bounds = ["carriers", "isotropic"], np.array([[0, len(names)], [len(names), len(vecs)]])
  else:
    vecs, block_names, bounds = sweep_vectors(cs, controls, matched)
  layers = np.arange(0, model.cfg.n_layers, cfg.sweep_layer_stride)
  ids = judges.refusal_token_ids(model.tokenizer)
  out = {}
  for set_name, prompts, coefs in (("harmful", sets["val_harmful"], cfg.harmful_coefficients),
                                   ("harmless", sets["val_harmless"], cfg.harmless_coefficients)):
    path = os.path.join(d, f"sweep_{set_name}.npz")
    prompts = prompts[:cfg.sweep_prompts or len(prompts)]
    if keys.claim(path, "causal", model=keys.model_parts(model), prompts=prompts, vectors=keys.array_digest(vecs),
                  config=dict(carriers=names, layers=layers.tolist(), coefficients=list(coefs),
                              n_controls=cfg.n_controls, control_kinds=list(cfg.control_kinds),
                              matched_rel_norm=cfg.matched_rel_norm, blocks=block_names)):
      out[set_name] = files.load_npz(path)
      continue
    t0 = time.time()
    res = causal.add_sweep_prompts(model, prompts, layers, np.asarray(coefs, np.float32), vecs, ids,
                                   batch_size=cfg.batch_size, chunk=cfg.sweep_chunk)
    res = {k: np.asarray(v) for k, v in res.items()}
    res.update(layers=layers, coefficients=np.asarray(coefs, np.float32), carriers=np.asarray(names),
               n_controls=np.asarray(cfg.n_controls), seconds=np.asarray(time.time() - t0),
               block_names=np.asarray(block_names), block_bounds=np.asarray(bounds))
    files.atomic_savez(path, **res)
    out[set_name] = res
  return out


def run_control_ablations(model, sets, cfg, d: str, n: int) -> dict:
  """Logit refusal scores on val_harmful with K random unit directions ablated (the ablation controls)."""
  path = os.path.join(d, "ablation_controls.npz")
  if keys.claim(path, "ablation_controls", model=keys.model_parts(model), prompts=sets["val_harmful"],
                config=dict(n=int(n), seed=cfg.seed)):
    return files.load_npz(path)
  dirs = np.asarray(jax.random.normal(jax.random.key(cfg.seed + 7), (n, model.cfg.d_model)))
  ids = judges.refusal_token_ids(model.tokenizer)
  res = causal.ablation_sweep_prompts(model, sets["val_harmful"], dirs, ids, batch_size=cfg.batch_size)
  res = {k: np.asarray(v) for k, v in res.items()}
  res["directions"] = dirs
  files.atomic_savez(path, **res)
  return res


# --- generation cells


def add_layers(cs, sweep_harmful: dict, cfg) -> dict[str, int]:
  """Layer of each carrier's add cells (see cfg.gen_layer)."""
  if cfg.gen_layer == "selected":
    return {n: c.selected_layer for n, c in cs.items()}
  if cfg.gen_layer != "sweep":
    raise ValueError(f"gen_layer must be 'sweep' or 'selected', got {cfg.gen_layer!r}")
  names, K = [str(n) for n in sweep_harmful["carriers"]], cfg.n_controls
  rs = sweep_harmful["refusal_score"][:, 0]  # [nL, nV, B] at the first harmful coefficient
  out = {}
  for vi, n in enumerate(names):
    effect = rs[:, vi].mean(-1) - rs[:, len(names) + vi * K:len(names) + (vi + 1) * K].mean((-2, -1))
    out[n] = int(sweep_harmful["layers"][int(np.argmin(effect))])
  return out


def cell_specs(cs, cfg, layers: dict[str, int] | None = None) -> list[dict]:
  """Every generation cell: (set, name, kind, carrier, coefficient, control seed, layer)."""
  specs = [dict(set="harmful", name="baseline", kind="none"), dict(set="harmless", name="baseline", kind="none")]
  K, kinds = cfg.n_controls, getattr(cfg, "control_kinds", ("isotropic",))
  if cfg.ablate:
    for name, c in sorted(cs.items()):
      specs.append(dict(set="harmful", name=f"ablate_{name}", kind="ablate", carrier=name, layer=c.selected_layer))
    for k in range(K):
      specs.append(dict(set="harmful", name=f"ablate_control{k}", kind="ablate", carrier=None, seed=k))
    if "anisotropic" in kinds:  # per carrier: drawn from its activations' covariance at its selected layer
      for name, c in sorted(cs.items()):
        for k in range(K):
          specs.append(dict(set="harmful", name=f"ablate_{name}_acontrol{k}", kind="ablate", carrier=None, seed=k,
                            control="anisotropic", control_of=name, layer=c.selected_layer))
  for set_name, coefs in (("harmful", cfg.gen_harmful_coefficients), ("harmless", cfg.gen_harmless_coefficients)):
    for coef in coefs:
      for name, c in sorted(cs.items()):
        layer = c.selected_layer if layers is None else layers[name]
        base = dict(set=set_name, kind="add", carrier=name, coefficient=float(coef), layer=layer)
        specs.append(dict(base, name=f"add{coef:+g}_{name}"))
        for k in range(K):
          specs.append(dict(base, name=f"add{coef:+g}_{name}_control{k}", seed=k))
        if "anisotropic" in kinds:
          for k in range(K):
            specs.append(dict(base, name=f"add{coef:+g}_{name}_acontrol{k}", seed=k, control="anisotropic"))
  return specs


def cell_edit(spec, cs, controls, ablation_dirs, n_layers: int):
  """The edit of one cell; controls = {kind: {carrier: [K, L, D]}} (or {carrier: [K, L, D]}: isotropic only)."""
  if controls and not isinstance(next(iter(controls.values())), dict):
    controls = {"isotropic": controls}
  if spec["kind"] == "none":
    return None
  if spec["kind"] == "ablate":
    if spec.get("control") == "anisotropic":
      d = controls["anisotropic"][spec["control_of"]][spec["seed"], spec["layer"]]
      return edit_lib.ablate_directions(n_layers, jnp.asarray(d))
    if spec.get("carrier") is None:
      return edit_lib.ablate_directions(n_layers, jnp.asarray(ablation_dirs[spec["seed"]]))
    return carriers.ablation_edit(cs[spec["carrier"]], layer=spec["layer"])
  layer = spec["layer"]
  vec = controls[spec.get("control", "isotropic")][spec["carrier"]][spec["seed"], layer] if "seed" in spec \
      else cs[spec["carrier"]].vectors[layer]
  return edit_lib.add_vector(n_layers, layer, spec["coefficient"] * jnp.asarray(vec), site="resid_pre")


def run_cells(model, cs, controls, ablation_dirs, sets, cfg, d: str, layers: dict[str, int] | None = None
              ) -> dict[tuple[str, str], dict]:
  """Generates and judges every cell (cached one JSON per cell) -> {(set, name): record}."""
  cell_dir = os.path.join(d, "cells")
  files.makedirs(cell_dir)
  ids = judges.refusal_token_ids(model.tokenizer)
  out, model_key = {}, keys.model_parts(model)
  for spec in cell_specs(cs, cfg, layers):
    prompts = sets[f"eval_{spec['set']}"]
    path = os.path.join(cell_dir, f"{spec['set']}__{spec['name']}.json")
    e = cell_edit(spec, cs, controls, ablation_dirs, model.cfg.n_layers)
    # Keyed by the edit's content too: a cell of the same name with another carrier is another cell.
    if keys.claim(path, "causal", model=model_key, prompts=prompts, edit=keys.edit_parts(e),
                  config=dict(spec=spec, max_new_tokens=cfg.max_new_tokens, judge_prefixes=cfg.judge_prefixes)):
      out[(spec["set"], spec["name"])] = _load_json(path)
      continue
    t0 = time.time()
    g = gen.generate(model, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, edit=e)
    refused = judges.judge_refusals(g.completions, prefixes=cfg.judge_prefixes)
    scores = behavior.refusal_scores(model, prompts, ids, edit=e, batch_size=cfg.batch_size)
    rec = dict(spec=spec, prompts=prompts, completions=g.completions, refused=refused.tolist(),
               refusal_score=scores.tolist(), seconds=time.time() - t0)
    _atomic_json(path, rec)
    out[(spec["set"], spec["name"])] = rec
  return out


def cell_effects(cells, cs, cfg) -> list[dict]:
  """Effect of each carrier cell against its matched controls and the unedited baseline.

  Outcome per prompt: answered (1 - refused) on harmful prompts (attack success), refused on harmless
  prompts (induced refusal); and the logit refusal score.
  """
  K, rows = cfg.n_controls, []
  aniso = "anisotropic" in getattr(cfg, "control_kinds", ("isotropic",))
  for set_name in ("harmful", "harmless"):
    base = cells[(set_name, "baseline")]
    groups = []
    if set_name == "harmful" and cfg.ablate:
      groups += [(f"ablate_{n}", [f"ablate_control{k}" for k in range(K)], n, "ablate", None) for n in sorted(cs)]
    coefs = cfg.gen_harmful_coefficients if set_name == "harmful" else cfg.gen_harmless_coefficients
    for coef in coefs:
      groups += [(f"add{coef:+g}_{n}", [f"add{coef:+g}_{n}_control{k}" for k in range(K)], n, "add", coef)
                 for n in sorted(cs)]
    for cell, ctrl, carrier, kind, coef in groups:
      t = cells[(set_name, cell)]
      cc = [cells[(set_name, x)] for x in ctrl]
      outcome = (lambda r: 1.0 - np.asarray(r["refused"], float)) if set_name == "harmful" else \
          (lambda r: np.asarray(r["refused"], float))
      e = causal.effect_vs_controls(outcome(t), np.stack([outcome(r) for r in cc]), outcome(base),
                                    n_boot=cfg.n_boot_effects, seed=cfg.seed)
      s = causal.effect_vs_controls(np.asarray(t["refusal_score"]), np.stack([r["refusal_score"] for r in cc]),
                                    np.asarray(base["refusal_score"]), n_boot=cfg.n_boot_effects, seed=cfg.seed)
      sub = lambda r: np.array([not f and diagnostics.word_count(c) >= 5 for f, c in zip(r["refused"],
                                                                                       r["completions"])], float)
      u = causal.effect_vs_controls(sub(t), np.stack([sub(r) for r in cc]), sub(base), n_boot=cfg.n_boot_effects,
                                    seed=cfg.seed)
      row = dict(set=set_name, cell=cell, carrier=carrier, kind=kind, coefficient=coef, layer=t["spec"].get("layer"),
                 outcome="attack_success" if set_name == "harmful" else "refusal", rate=e, score=s, substantive=u,
                 rate_aniso=None, score_aniso=None)
      if aniso:  # the same cell against anisotropic controls (cell names: ..._acontrol{k})
        ac = [cells[(set_name, f"{cell}_acontrol{k}")] for k in range(K)]
        row["rate_aniso"] = causal.effect_vs_controls(outcome(t), np.stack([outcome(r) for r in ac]),
                                                      n_boot=cfg.n_boot_effects, seed=cfg.seed)
        row["score_aniso"] = causal.effect_vs_controls(np.asarray(t["refusal_score"]),
                                                       np.stack([r["refusal_score"] for r in ac]),
                                                       n_boot=cfg.n_boot_effects, seed=cfg.seed)
      rows.append(row)
  return rows


def side_comparison(cells, cs, cfg) -> list[dict]:
  """Refusal-side minus harmfulness-side attack success (paired over prompts), per intervention."""
  out = []
  kinds = (["ablate_{}"] if cfg.ablate else []) + [f"add{c:+g}_" + "{}" for c in cfg.gen_harmful_coefficients]
  for ref in (carriers.REFUSAL, carriers.REFUSAL_HH):
    if ref not in cs or carriers.HARMFULNESS not in cs:
      continue
    for kind in kinds:
      a, b = cells[("harmful", kind.format(ref))], cells[("harmful", kind.format(carriers.HARMFULNESS))]
      ans = lambda r: 1.0 - np.asarray(r["refused"], float)
      d = causal.paired_difference(ans(a), ans(b), n_boot=cfg.n_boot_effects, seed=cfg.seed)
      ds = causal.paired_difference(-np.asarray(a["refusal_score"]), -np.asarray(b["refusal_score"]),
                                    n_boot=cfg.n_boot_effects, seed=cfg.seed)
      out.append(dict(intervention=kind.format("*"), refusal_carrier=ref, asr_refusal=float(ans(a).mean()),
                      asr_harmfulness=float(ans(b).mean()), asr_diff=d, score_drop_diff=ds))
  return out


def run_diagnostics(model, sets, cfg, d: str) -> dict:
  dd = os.path.join(d, "diagnostics")
  kw = dict(cache_dir=dd, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
            prefixes=cfg.judge_prefixes)
  templates = {k: diagnostics.ADVERSARIAL_TEMPLATES[k] for k in cfg.diag_templates}
  rob = diagnostics.robust_refusal(model, sets["diag_harmful"], templates=templates, **kw)
  use = diagnostics.harmful_usefulness(model, sets["diag_harmful"], **kw)
  exa = diagnostics.exaggerated_safety(model, sets["diag_xstest_safe"], **kw)
  items = diagnostics.BENIGN_QA[:cfg.diag_qa_items or len(diagnostics.BENIGN_QA)]
  util = diagnostics.benign_utility(model, sets["diag_harmless"], items=items, **kw)
  rows = diagnostics.diagnostics_table(rob, use, exa, util)
  summary = dict(rows=rows, qa=util["qa"])
  _atomic_json(os.path.join(d, "diagnostics.json"), summary)
  examples = []
  for name, r in list(rob["results"].items()) + [("xstest_safe", exa["result"]), ("harmless", util["result"])]:
    for rec in r.records[:2]:
      examples.append(dict(set=name, prompt=rec["prompt"][-300:], completion=rec["completion"], refused=rec["refused"]))
  summary["examples"] = examples
  return summary


def run_stratified_coupling(model, sets, x_inst, x_post, labels, labelling, cs, cfg, d: str) -> dict:
  """Harmfulness vs the within-stratum refusal carriers (`coupling.stratified_coupling`), cached in
  coupling_strata.npz (keyed by the model, the pool, the stratum labels and the resampling settings) ->
  {name: {counts, estimable, coupling (or None)}}."""
  path = os.path.join(d, "coupling_strata.npz")
  st = carriers.stratified_refusal_labels(labelling["refused"], pool_strata(sets), cfg.min_stratum)
  pooled = cs[carriers.REFUSAL].vectors if carriers.REFUSAL in cs else None
  if keys.claim(path, "coupling", model=keys.model_parts(model),
                prompts=sets["harmful"] + sets["harmless"] + sets["extras"],
                labels={n: v["labels"].tolist() for n, v in sorted(st.items())},
                config=dict(what="strata", seed=cfg.seed, n_boot=cfg.n_boot, n_null=cfg.n_null,
                            min_stratum=cfg.min_stratum, pooled=keys.array_digest(pooled) if pooled is not None
                            else None)):
    z = files.load_npz(path)
    out = {}
    for name, v in st.items():
      rec = {k: vv for k, vv in v.items() if k != "labels"}
      got = {k.split("/", 1)[1]: _scalar(a) for k, a in z.items() if k.startswith(name + "/")}
      rec["cos_pooled"] = got.pop("cos_pooled", None)
      rec["coupling"] = got or None
      out[name] = rec
    return out
  t0 = time.time()
  out = coupling.stratified_coupling(x_inst, labels[carriers.HARMFULNESS], x_post, st, pooled=pooled,
                                     n_boot=cfg.n_boot, n_null=cfg.n_null, seed=cfg.seed)
  logging.info("stratified coupling: %.1f s (%s)", time.time() - t0,
               {n: (r["n_refused"], r["n_complied"], r["estimable"]) for n, r in out.items()})
  arrays = {}
  for name, rec in out.items():
    for k, v in (rec["coupling"] or {}).items():
      if not k.startswith("carrier"):
        arrays[f"{name}/{k}"] = np.asarray(v)
    if rec.get("cos_pooled") is not None:
      arrays[f"{name}/cos_pooled"] = np.asarray(rec["cos_pooled"])
  files.atomic_savez(path, **arrays)
  _atomic_json(os.path.join(d, "coupling_strata.json"),
               {n: {k: v for k, v in r.items() if k != "coupling"} for n, r in out.items()})
  for rec in out.values():
    if rec["coupling"] is not None:
      rec["coupling"] = {k: _scalar(v) for k, v in rec["coupling"].items() if not k.startswith("carrier")}
  return out


# ----------------------------------------------------------------------------- run


def run(model, cfg, workdir: str, model_name: str = "") -> report_lib.Section:
  """Everything above, resumable; returns the section (the caller adds it to the report)."""
  d = os.path.join(workdir, "geometry")
  files.makedirs(d)
  sets = prompt_sets(cfg)
  _atomic_json(os.path.join(d, "prompt_sets.json"), sets)
  labelling = label_pool(model, sets, cfg, d)
  x_inst, x_post = pool_activations(model, sets, cfg, d)
  labels = pool_labels(sets, labelling["refused"])
  cs = build_carriers(x_inst, x_post, labels, cfg, labelling)
  run_selection(model, cs, sets, cfg, d)
  carriers.save_carriers(os.path.join(d, "carriers"), cs)
  # Coupling.
  cpath = os.path.join(d, "coupling.npz")
  pairs = [(carriers.HARMFULNESS, r) for r in (carriers.REFUSAL, carriers.REFUSAL_HH) if r in cs]
  xs = {n: (x_inst if carriers.POOLING[n] == "last_instruction" else x_post) for n in CARRIER_NAMES}
  coup, sub = {}, {}
  sig = (f"v2 seed={cfg.seed} n_boot={cfg.n_boot} n_null={cfg.n_null} k={cfg.subspace_k} "
         f"stride={cfg.subspace_layer_stride} sub={cfg.subspace_n_boot}/{cfg.subspace_n_null} n={x_inst.shape[1]}")
  fresh = keys.claim(cpath, "coupling", model=keys.model_parts(model),
                     prompts=sets["harmful"] + sets["harmless"] + sets["extras"],
                     labels={n: np.asarray(labels[n]).tolist() for n in sorted(labels)})
  cached = files.load_npz(cpath) if fresh else {}
  for a, b in pairs:
    key = f"{a}-{b}"
    if cached.get(f"{key}/signature", np.asarray("")).item() == sig:
      coup[key] = {k.split("/", 1)[1]: v for k, v in cached.items() if k.startswith(key + "/") and
                   not k.endswith("/signature")}
      sub_keys = {k.split("/", 1)[1]: v for k, v in cached.items() if k.startswith("sub:" + key + "/")}
      sub[key] = {k: _scalar(v) for k, v in sub_keys.items()}
      continue
    t0 = time.time()
    coup[key] = coupling.coupling(xs[a], labels[a], xs[b], labels[b], n_boot=cfg.n_boot, n_null=cfg.n_null,
                                  seed=cfg.seed)
    sub[key] = coupling.subspace_coupling(xs[a], labels[a], xs[b], labels[b], k=cfg.subspace_k,
                                          layers=range(0, model.cfg.n_layers, cfg.subspace_layer_stride),
                                          n_boot=cfg.subspace_n_boot, n_null=cfg.subspace_n_null, seed=cfg.seed)
    logging.info("coupling %s: %.1f s", key, time.time() - t0)
    cached[f"{key}/signature"] = np.asarray(sig)
    for k, v in coup[key].items():
      cached[f"{key}/{k}"] = np.asarray(v)
    for k, v in sub[key].items():
      cached[f"sub:{key}/{k}"] = np.asarray(v)
    files.atomic_savez(cpath, **cached)
  coup = {k: {kk: _scalar(vv) for kk, vv in v.items()} for k, v in coup.items()}
  _atomic_json(os.path.join(d, "coupling.json"), {k: {kk: vv for kk, vv in v.items() if not kk.startswith("carrier")}
                                                  for k, v in coup.items()})
  strata = run_stratified_coupling(model, sets, x_inst, x_post, labels, labelling, cs, cfg, d)
  # Causal sweeps.
  xs_c = {n: (x_inst if carriers.POOLING[n] == "last_instruction" else x_post) for n in cs}
  controls = all_controls(cs, xs_c, labels, cfg)
  matched = matched_set(cs, x_post, labels, cfg)
  t0 = time.time()
  sw = run_add_sweeps(model, cs, controls, sets, cfg, d, matched)
  abl_ctrl = run_control_ablations(model, sets, cfg, d, max(cfg.n_controls, 1))
  logging.info("logit sweeps: %.1f s", time.time() - t0)
  t0 = time.time()
  gen_layers = add_layers(cs, sw["harmful"], cfg)
  logging.info("add-cell layers: %s", gen_layers)
  cells = run_cells(model, cs, controls, abl_ctrl["directions"], sets, cfg, d, gen_layers)
  logging.info("generation cells: %.1f s", time.time() - t0)
  effects = cell_effects(cells, cs, cfg)
  sides = side_comparison(cells, cs, cfg)
  t0 = time.time()
  diag = run_diagnostics(model, sets, cfg, d) if cfg.diagnostics else None
  logging.info("diagnostics: %.1f s", time.time() - t0)
  section = geometry_section.geometry_section(model_name or getattr(model, "name", ""), cs, labelling, coup, sub,
                                              sw, abl_ctrl, effects, sides, diag, cfg, gen_layers, strata=strata,
                                              training_overlap=sets["training_overlap"])
  _atomic_json(os.path.join(d, "summary.json"), dict(summary=section.summary, effects=effects, sides=sides))
  return section
