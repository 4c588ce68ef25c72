"""The LVS audit: behavioral baseline, perturbation sweep, PGD latent attacks per (layer, radius), LVS
with bootstrap intervals and the audit gap; returns the report section (lvs_jax.lvs.section draws it).
Resumable cell by cell.

Files under `workdir/lvs/`:
  behavior.jsonl          unattacked greedy generations of every prompt (refused or not)
  sweep.npz               the perturbation sweep (layers x magnitudes x directions x prompts)
  cells/l{L}_r{i}.json    one PGD cell: radius, per-prompt loss, success, target match, completion
A killed run re-run on the same workdir loads finished cells and computes only the missing ones.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from lvs_jax.core import batching, sharding
from lvs_jax.evals import behavior, judges
from lvs_jax.io import files, keys
from lvs_jax.lvs import attack as lvs
from lvs_jax.lvs import section as lvs_report
from lvs_jax.lvs import sweeps
from lvs_jax.report import store as report_lib


def load_targets(cfg):
  """(prompts, targets) for the attacked set: the file's own targets (AdvBench) when it has them and
  cfg.target_source is "file", else cfg.target for every prompt (target_source "fixed"). LVS depends
  on this choice (a per-prompt target is a harder objective than a short fixed opening): the section
  says which one it used."""
  from lvs_jax.io import datasets as data

  if getattr(cfg, "target_source", "file") not in ("file", "fixed"):
    raise ValueError(f"lvs.target_source must be 'file' or 'fixed', got {cfg.target_source!r}")
  ps = data.load_prompts(cfg.prompts)
  if cfg.n_prompts:
    ps = ps[: cfg.n_prompts]
  own = ps.targets if getattr(cfg, "target_source", "file") == "file" else None
  return list(ps), list(own or [cfg.target] * len(ps))


def sweep_key(model, prompts, targets, cfg) -> dict:
  """What decides `sweep.npz` (`io.keys`, kind "sweep")."""
  return dict(model=keys.model_parts(model), prompts=list(prompts), targets=list(targets),
              config=dict(seed=cfg.seed, magnitudes=list(cfg.sweep_magnitudes), directions=cfg.sweep_directions))


def pgd_cell_key(model_key: dict, prompts, targets, cfg, layer: int, radius: float) -> dict:
  """What decides one PGD cell (`io.keys`, kind "pgd_cell"): the model (`keys.model_parts`), prompts,
  targets, the cell, every attack setting, the generation that judges success and the judge."""
  attack = {k: cfg[k] for k in ("norm", "scope", "steps", "step_size", "optimizer", "loss", "random_start",
                                "success_loss", "stop", "stop_tokens", "seed", "batch_size")}
  return dict(model=model_key, prompts=list(prompts), targets=list(targets),
              config=dict(layer=int(layer), radius=float(radius), attack=attack, max_new_tokens=cfg.max_new_tokens,
                          judge_prefixes=cfg.judge_prefixes))


def run_sweep(model, prompts, targets, cfg, path: str, mesh=None, params=None) -> dict:
  """The perturbation sweep over every layer (cached in `path`, keyed by `sweep_key`). With a `mesh`
  (`params` on it, see `run`) each batch runs as one global computation, prompts over "data"."""
  if keys.claim(path, "sweep", **sweep_key(model, prompts, targets, cfg)):
    return files.load_npz(path)
  ids = jnp.asarray(judges.refusal_token_ids(model.tokenizer))
  dirs = sweeps.random_directions(jax.random.key(cfg.seed), cfg.sweep_directions, model.cfg.d_model)
  dirs = sweeps.with_negatives(dirs)
  layers = jnp.arange(model.cfg.n_layers)
  mags = jnp.asarray(cfg.sweep_magnitudes, jnp.float32)
  parts = []
  for pr, n in tqdm(list(batching.pad_batches(range(len(prompts)), cfg.batch_size)), desc="lvs sweep", unit="batch"):
    batch = sweeps.make_batch(model.tokenizer, [prompts[i] for i in pr], [targets[i] for i in pr])
    if mesh is None:
      res = sweeps.sweep(model.params, model.cfg, batch, layers, mags, dirs, ids, chunk=cfg.sweep_chunk)
    else:
      res = sharding.sweep(params, model.cfg, batch, layers, mags, dirs, ids, mesh, chunk=cfg.sweep_chunk)
    parts.append({k: np.asarray(v)[..., :n] for k, v in res.items()})
  out = {k: np.concatenate([p[k] for p in parts], axis=-1) for k in parts[0]}
  out["magnitudes"] = np.asarray(mags)
  files.atomic_savez(path, **out)
  return out


def run_cells(model, prompts, targets, cfg, cell_dir: str, mesh=None, params=None) -> dict:
  """PGD + generation for every (layer, radius) cell; returns {(layer, radius_index): record}. With a
  `mesh` (`params` on it, see `run`) attack and generation run with the prompts over "data"."""
  files.makedirs(cell_dir)  # one writer: process 0
  ids = jnp.asarray(judges.refusal_token_ids(model.tokenizer))
  acfg = lvs.AttackConfig(norm=cfg.norm, scope=cfg.scope, relative=True, steps=cfg.steps, step_size=cfg.step_size,
                          optimizer=cfg.optimizer, loss=cfg.loss, random_start=cfg.random_start,
                          success_loss=cfg.success_loss, stop=cfg.stop, stop_tokens=cfg.stop_tokens)
  batches = [(pr[:n], sweeps.make_batch(model.tokenizer, [prompts[i] for i in pr], [targets[i] for i in pr]))
             for pr, n in batching.pad_batches(range(len(prompts)), cfg.batch_size)]
  cells, model_key = {}, keys.model_parts(model)
  todo = [(layer, ri) for layer in cfg.layers for ri in range(len(cfg.radii))]
  for layer, ri in tqdm(todo, desc="lvs cells"):
    path = os.path.join(cell_dir, f"l{layer}_r{ri}.json")
    # Reused only when model, prompts, targets, attack, generation and judge all match (not just
    # prompts and radius): anything else is moved aside and recomputed.
    if keys.claim(path, "pgd_cell", **pgd_cell_key(model_key, prompts, targets, cfg, layer, cfg.radii[ri])):
      with open(path, encoding="utf-8") as f:
        cells[(layer, ri)] = json.load(f)
      continue
    t0 = time.time()
    loss, loss_ok, completions = [], [], []
    cell_key = jax.random.fold_in(jax.random.key(cfg.seed), layer * 1000 + ri)
    for bi, (rows, batch) in enumerate(batches):
      key = jax.random.fold_in(cell_key, bi)  # a fresh random start per batch, not one shared by all
      if mesh is None:
        r = lvs.pgd_attack(model.params, model.cfg, batch, ids, layer, cfg.radii[ri], key, acfg)
        texts = lvs.generate_under_delta(model, batch, layer, r.delta, cfg.max_new_tokens)
      else:
        r = sharding.pgd_attack(params, model.cfg, batch, ids, layer, cfg.radii[ri], key, mesh, acfg)
        texts = sharding.generate_under_delta(model, params, batch, layer, r.delta, cfg.max_new_tokens, mesh)
      loss += np.asarray(r.final_loss)[:len(rows)].tolist()
      loss_ok += np.asarray(r.loss_success)[:len(rows)].tolist()
      completions += texts[:len(rows)]
    judged = lvs.judge_success(completions, targets, prefixes=cfg.judge_prefixes)
    rec = dict(layer=layer, radius=cfg.radii[ri], prompts=list(prompts), final_loss=loss,
               loss_success=[bool(x) for x in loss_ok], success=judged["success"].tolist(),
               target_match=judged["target_match"].tolist(), completions=completions,
               seconds=time.time() - t0)
    files.atomic_write_json(path, rec)
    cells[(layer, ri)] = rec
  return cells


def summarize(cells: dict, layers, radii, n_boot: int = 1000, seed: int = 0) -> dict:
  """LVS per layer with bootstrap CI, from the success flags of every cell ({(layer, radius_index):
  record}). With no prompts attacked (empty cells or empty success lists) every LVS is nan, `measured`
  is False and `reason` says why: "not measured", never 0 with an interval [0, 0]."""
  radii = np.asarray(radii, float)
  n = len(cells[(layers[0], 0)]["success"]) if cells else 0
  flags = lambda key: np.array([[cells[(layer, ri)][key] if n else [] for ri in range(len(radii))]
                                for layer in layers], bool).reshape(len(layers), len(radii), n)
  success = flags("success")  # [nL, nR, N]
  strict = success & flags("target_match") if n else success
  eps_star = lvs.breaking_radius(success, radii)  # [nL, N]
  score, lo, hi = lvs.bootstrap_lvs(eps_star, radii, n_boot=n_boot, seed=seed)
  mean, mean_lo, mean_hi = lvs.bootstrap_lvs(eps_star, radii, n_boot=n_boot, seed=seed, reduce=lambda x: x.mean(-1))
  strict_score = lvs.lvs_score(lvs.breaking_radius(strict, radii), radii)
  curves = lvs.success_curve(eps_star, radii)  # [nL, nR]
  return dict(layers=list(layers), radii=radii.tolist(), eps_star=eps_star, lvs=score, lvs_low=lo, lvs_high=hi,
              lvs_strict=strict_score, curves=curves,
              raw_success=success.mean(-1) if n else np.full(success.shape[:2], np.nan), model_lvs=float(mean),
              model_lvs_low=float(mean_lo), model_lvs_high=float(mean_hi), n_attacked=n, measured=n > 0,
              reason="" if n else lvs_report.NOT_ATTACKED)


def measure(model, prompts, targets, cfg, d: str, mesh=None, params=None, progress: bool = True) -> dict:
  """The LVS measurement under directory d: the unattacked baseline (d/behavior.jsonl), the PGD cells on the
  refused prompts (every prompt when cfg.only_refused is False; d/cells/), `summarize` plus the audit gap with
  its joint bootstrap, written to d/summary.json. Returns the summary with n_refused and refused_flags [N] added
  (None cells when nothing is attacked: `summarize({})`, LVS not measured)."""
  files.makedirs(d)
  base = behavior.evaluate_refusal(model, "lvs_behavior", prompts, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, prefixes=cfg.judge_prefixes,
                                   cache_path=os.path.join(d, "behavior.jsonl"), progress=progress)
  flags = np.array([bool(r["refused"]) for r in base.records])
  logging.info("model refuses %d of %d prompts unattacked", int(flags.sum()), len(prompts))
  attacked = np.flatnonzero(flags) if cfg.only_refused else np.arange(len(prompts))
  if len(attacked):
    cells = run_cells(model, [prompts[i] for i in attacked], [targets[i] for i in attacked], cfg,
                      os.path.join(d, "cells"), mesh, params)
    summary = summarize(cells, cfg.layers, cfg.radii, seed=cfg.seed)
  else:
    summary = summarize({}, list(cfg.layers), cfg.radii)
  eps_refused = summary["eps_star"] if cfg.only_refused else summary["eps_star"][:, flags]
  gap = lvs.audit_gap(flags, eps_refused, cfg.radii, seed=cfg.seed)
  summary.update(audit_gap=gap[0], audit_gap_low=gap[1], audit_gap_high=gap[2])
  files.atomic_write_json(os.path.join(d, "summary.json"), summary)
  return dict(summary, n_refused=int(flags.sum()), refused_flags=flags)


def run(model, prompts, targets, cfg, workdir: str, mesh=None, rules=None) -> report_lib.Section:
  """Everything above, resumable; returns the section (the caller adds it to the report).

  mesh (`cli.mesh(config)`): the sweep and the PGD cells run on it, the weights placed once by `rules`
  (`sharding.on_mesh`: as they are when the loader already put them there, else from host values), so
  under jax.distributed every process takes part in one computation; process 0 writes (`io.files`).
  The cache keys and the unattacked baseline use `model` as given (load it with host=True under a
  mesh: the keys then digest host values, identical on every process)."""
  d = os.path.join(workdir, "lvs")
  files.makedirs(d)
  params = None if mesh is None else sharding.on_mesh(model.params, model.cfg, mesh,
                                                     sharding.REPLICATED if rules is None else rules)
  summary = measure(model, prompts, targets, cfg, d, mesh, params)
  n_sw = cfg.sweep_prompts or len(prompts)
  sweep = (run_sweep(model, prompts[:n_sw], targets[:n_sw], cfg, os.path.join(d, "sweep.npz"), mesh, params)
           if cfg.sweep else None)
  summary.pop("refused_flags")
  n_refused = summary.pop("n_refused")
  if not summary["n_attacked"]:  # the section reports the gap as not measured when nothing was attacked
    for k in ("audit_gap", "audit_gap_low", "audit_gap_high"):
      summary.pop(k)
  return lvs_report.lvs_section(summary, sweep, len(prompts), n_refused, int(summary["n_attacked"]), cfg)
