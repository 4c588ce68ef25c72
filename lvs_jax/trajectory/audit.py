"""Checkpoint-trajectory analysis: evaluate every chosen checkpoint of one or more training runs.

A run is the workdir of `experiments/train_r2d2.py` (R2D2 or its matched SFT baseline),
`experiments/train_sft.py` or `experiments/harmful_finetune.py`; each committed step loads as the model
"<workdir>@<step>" (`lvs_jax.io.registry`). At every checkpoint, today:

  behavior   greedy refusal rate (substring judge, 95% Wilson interval) on each configured set: held-out
             harmful prompts (robust refusal), harmless prompts (1 - refusal = benign compliance) and
             XSTest safe prompts (exaggerated safety), cached per checkpoint;
  gcg        GCG (and, with "autodan" in cfg.attack.methods, AutoDAN) test cases found *against that
             checkpoint* (fresh attack, small budget; resumable) and their attack success (greedy generation
             not a refusal), with a Wilson interval; the sources of the sparse transfer matrix;
  seconds    the run's median seconds per training step (its metrics.jsonl);
  geometry   carriers and coupling, drift from step 0 (`lvs_jax.trajectory.measures`), KL-admissible carriers
             (`lvs_jax.trajectory.admissible`, needs cfg.geometry);
  lvs        the LVS audit on the prompts that checkpoint refuses (`lvs_jax.trajectory.latent`; cfg.lvs, an LVS
             section config of experiments/configs/lvs.py: experiments/configs/trajectory.py sets one, a config
             without `lvs` skips it).

Layout under the workdir: `trajectory/models/<digest>/` per distinct set of weights (a run's step 0 is
its base model: two runs from one start share it), holding `eval/<set>.jsonl` (keyed generations) and
`attack/` (GCG states, test cases, results; the directory is claimed by a content key of the model's
weights and the attack config, so another model's attack is moved aside, never reused), `lvs/` (keyed PGD cells),
`geometry.json`, `admissible.json` and `admissible_kl.npz` (keyed);
`trajectory/rows.json` (one row per run and step) and the report's "trajectory" section with the
measures along steps on one x-axis and a CSV table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging

from lvs_jax.attacks import audit as attack_audit
from lvs_jax.attacks import test_cases as tc_lib
from lvs_jax.evals import stats
from lvs_jax.io import checkpoints, files, keys
from lvs_jax.training import core as training
from lvs_jax.trajectory import admissible, latent, measures


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.runs = ()  # workdirs of training runs; "label=path" names a run (default: the directory's name)
  c.steps = ()  # steps to evaluate in every run; () = every committed step
  c.sets = dict(
    harmful=dict(path="harmful_val", n=0),  # held-out harmful: refusal = robust refusal
    harmless=dict(path="harmless_val", n=100),  # benign utility: 1 - refusal
    xstest_safe=dict(path="xstest", label="safe", n=100),  # exaggerated safety: refusal on safe prompts
  )
  c.eval = dict(max_new_tokens=64, batch_size=16, prefixes="jailbreakbench")
  c.attack = attack_audit.default_config()  # a fresh GCG against every checkpoint
  c.attack.methods = ("gcg",)
  c.attack.n_prompts = 8
  c.attack.batch_prompts = 8
  c.attack.gcg_budgets = (10,)
  c.attack.gcg.search_width = 64
  c.attack.gcg.topk = 64
  c.attack.eval.max_new_tokens = 64
  # The sparse transfer matrix: test cases found against each source checkpoint ("run@step"; () = every
  # evaluated checkpoint) and external files (JailbreakBench artifacts, HarmBench test_cases.json), each
  # evaluated against every evaluated checkpoint.
  c.transfer = dict(enabled=True, sources=(), external=())
  c.geometry = measures.default_geometry_config()  # carriers + coupling per checkpoint (lvs_jax.trajectory.measures)
  c.drift = measures.default_drift_config()  # embedding drift relative to each run's step 0
  c.admissible = admissible.default_config()  # KL-admissible carriers (lvs_jax.trajectory.admissible; with geometry)
  return c


def make_smoke(c: ml_collections.ConfigDict) -> None:
  c.sets = dict(harmful=dict(path="harmful_val", n=3), harmless=dict(path="harmless_val", n=2))
  c.eval = dict(max_new_tokens=4, batch_size=4, prefixes="jailbreakbench")
  attack_audit.make_smoke(c.attack)
  c.attack.methods = ("gcg",)
  c.attack.gcg_budgets = (1,)
  measures.make_smoke(c)
  admissible.make_smoke(c)


def parse_runs(runs: Sequence[str]) -> list[tuple[str, str]]:
  """[(label, workdir)] from "label=path" or "path" entries; errors name the path that is not a run."""
  out = []
  for r in runs:
    label, sep, path = r.partition("=")
    if not sep:
      label, path = os.path.basename(os.path.normpath(r)), r
    ck = os.path.join(path, "checkpoints")
    if not os.path.isdir(ck):
      raise FileNotFoundError(f"trajectory run {r!r}: {ck} does not exist (expected the workdir of a training run)")
    out.append((label, path))
  if not out:
    raise ValueError("trajectory: --config.runs is empty; give the workdirs of one or more training runs")
  if len({label for label, _ in out}) != len(out):
    raise ValueError(f"trajectory: run labels must differ, got {[label for label, _ in out]}")
  return out


def run_steps(path: str, wanted: Sequence[int]) -> list[int]:
  """The steps of run `path` to evaluate: `wanted` (each must be committed) or every committed step."""
  have = checkpoints.committed_steps(os.path.join(path, "checkpoints"))
  if not wanted:
    return have
  missing = [s for s in wanted if s not in have]
  if missing:
    raise ValueError(f"{path}: steps {missing} are not committed checkpoints (committed: {have})")
  return [int(s) for s in wanted]


def load_sets(sets: Mapping[str, Mapping], seed: int = 0) -> dict[str, list[str]]:
  from lvs_jax.io import datasets as data

  out = {}
  for name, s in sets.items():
    ps = data.load_prompts(s["path"], label=s.get("label"))
    out[name] = list(data.sample(ps, s["n"], seed=seed) if s.get("n") else ps)
  return out


def seconds_per_step(path: str) -> float:
  """Median wall seconds per training step of a run (metrics.jsonl; the first, compiling, step excluded)."""
  from lvs_jax.training import recipes

  metrics = os.path.join(path, "metrics.jsonl")
  return recipes.seconds_per_step(training.read_metrics(metrics) if os.path.exists(metrics) else [])


def evaluate_model(model, sets: Mapping[str, Sequence[str]], cfg, model_dir: str) -> dict:
  """Behavior on every set and a fresh GCG attack against `model` (cached under model_dir)."""
  from lvs_jax.training import recipes

  e = cfg.eval
  t0 = time.time()
  results = recipes.evaluate(model, sets, os.path.join(model_dir, "eval"), max_new_tokens=e.max_new_tokens,
                             batch_size=e.batch_size, prefixes=e.prefixes)
  out = {f"refusal/{r.name}": stats.rate(r.n_refused, r.n) for r in results}
  out["eval_seconds"] = time.time() - t0
  attack_dir = os.path.join(model_dir, "attack")
  keys.claim(attack_dir, "trajectory_attack", model=keys.model_parts(model), config=cfg.attack.to_dict())
  t0 = time.time()
  attack_audit.run(model, cfg.attack, model_dir)  # resumable: GCG states under model_dir/attack/gcg
  with open(os.path.join(attack_dir, "results.json"), encoding="utf-8") as f:
    res = json.load(f)
  for key, r in res.items():
    out[f"asr/{key}"] = stats.rate(int(np.sum(r["success"])), int(r["n"]))
  out["attack_seconds"] = time.time() - t0
  return out


def run(cfg, workdir: str, load_model=None) -> tuple[list[dict], list[dict]]:
  """(rows, transfer cells). One row per (run, step): {"run", "step", "digest", "seconds_per_step", measure:
  {rate, low, high, k, n}}; cells: see `run_transfer` ([] when cfg.transfer.enabled is False).
  `load_model(name)` defaults to `lvs_jax.io.registry.load_model` in cfg.dtype."""
  import jax.numpy as jnp

  from lvs_jax.io import registry

  load_model = load_model or (lambda name: registry.load_model(name, dtype=jnp.dtype(cfg.dtype)))
  runs = parse_runs(cfg.runs)
  plan = [(label, path, step) for label, path in runs for step in run_steps(path, cfg.steps)]
  sets = load_sets(cfg.sets, cfg.get("seed", 0))
  root = os.path.join(workdir, "trajectory")
  files.makedirs(os.path.join(root, "models"))
  done: dict[str, dict] = {}  # weights digest -> measures (step 0 of two runs from one start: one evaluation)
  geo_train = measures.training_prompts(cfg.geometry.exclude) if cfg.geometry.enabled else set()
  probe = measures.probe_prompts(cfg, measures.training_prompts(cfg.drift.exclude)) if cfg.drift.enabled else None
  adm = cfg.geometry.enabled and cfg.get("admissible") is not None and cfg.admissible.enabled
  if cfg.get("admissible") is not None and cfg.admissible.enabled and not cfg.geometry.enabled:
    logging.warning("trajectory: KL-admissible carriers skipped: they need cfg.geometry (disabled)")
  lvs_cfg = cfg.lvs if cfg.get("lvs") is not None and cfg.lvs.enabled else None
  lvs_set = latent.lvs_prompts(lvs_cfg, measures.training_prompts(lvs_cfg.get("exclude", ()))) if lvs_cfg else None
  emb: dict[str, np.ndarray] = {}  # weights digest -> drift embeddings [N, D]
  rows = []
  for label, path, step in plan:
    model = load_model(f"{path}@{step}")
    digest = keys.model_parts(model)["weights"]
    model_dir = os.path.join(root, "models", digest[:16])
    if digest not in done:
      logging.info("trajectory: evaluating %s@%d (weights %s)", label, step, digest[:12])
      done[digest] = evaluate_model(model, sets, cfg, model_dir)
      if cfg.geometry.enabled:
        done[digest].update(measures.model_geometry(model, sets, cfg, model_dir, geo_train))
      if adm:
        t0 = time.time()
        done[digest].update(admissible.model_admissible(model, sets, cfg, model_dir, geo_train))
        done[digest]["admissible_seconds"] = time.time() - t0
      if lvs_cfg:
        t0 = time.time()
        done[digest].update(latent.model_lvs(model, *lvs_set, lvs_cfg, model_dir))
        done[digest]["lvs_seconds"] = time.time() - t0
      if probe:
        emb[digest] = measures.model_embeddings(model, probe[0], cfg, model_dir)
    rows.append(dict(run=label, path=os.path.abspath(path), step=step, digest=digest,
                     seconds_per_step=seconds_per_step(path), **done[digest]))
    files.atomic_write_json(os.path.join(root, "rows.json"), rows, indent=1)
  if probe:
    add_drift(rows, runs, probe, emb, cfg, root, load_model)
    files.atomic_write_json(os.path.join(root, "rows.json"), rows, indent=1)
  cells = run_transfer(cfg, workdir, rows, load_model) if cfg.transfer.enabled else []
  return rows, cells


def add_drift(rows: list[dict], runs, probe: tuple[list[str], np.ndarray], emb: dict, cfg, root: str,
              load_model) -> None:
  """Adds "drift/angle", "drift/probe_auc" and "drift/alarm" to every row, relative to step 0 of its run
  (step 0 is embedded even when it is not among the evaluated steps; it must be committed)."""
  for label, path in runs:
    rr = [r for r in rows if r["run"] == label]
    zero = next((r["digest"] for r in rr if r["step"] == 0), None)
    if zero is None:
      if 0 not in checkpoints.committed_steps(os.path.join(path, "checkpoints")):
        raise ValueError(f"{path}: drift is measured relative to step 0, which is not a committed checkpoint")
      model = load_model(f"{path}@0")
      zero = keys.model_parts(model)["weights"]
      if zero not in emb:
        emb[zero] = measures.model_embeddings(model, probe[0], cfg, os.path.join(root, "models", zero[:16]))
    ref = measures.StepZero(emb[zero], probe[1], cfg.drift)
    for r in rr:
      r.update(ref.compare(emb[r["digest"]]))


# ----------------------------------------------------------------------------- sparse transfer matrix


def _gcg_cases_dir(model_dir: str, cfg) -> str:
  return os.path.join(model_dir, "attack", "test_cases", f"gcg_s{max(cfg.attack.gcg_budgets)}")


def _autodan_cases_dir(model_dir: str) -> str:
  return os.path.join(model_dir, "attack", "test_cases", "autodan")


def transfer_sources(rows: Sequence[Mapping], cfg, workdir: str) -> list[tuple[str, list]]:
  """[(label, test cases)]: the GCG cases ("gcg@run@step") and, when cfg.attack.methods has "autodan", the
  AutoDAN cases ("autodan@run@step") found against each chosen source checkpoint, then the external files.
  Errors name a source that is not an evaluated checkpoint."""
  by_label = {f"{r['run']}@{r['step']}": r for r in rows}
  wanted = list(cfg.transfer.sources) or list(by_label)
  missing = [w for w in wanted if w not in by_label]
  if missing:
    raise ValueError(f"transfer sources {missing} are not evaluated checkpoints (have: {sorted(by_label)})")
  out = []
  for label in wanted:
    model_dir = os.path.join(workdir, "trajectory", "models", by_label[label]["digest"][:16])
    if "gcg" in cfg.attack.methods:
      out.append((f"gcg@{label}", tc_lib.load(_gcg_cases_dir(model_dir, cfg))))
    if "autodan" in cfg.attack.methods:
      out.append((f"autodan@{label}", tc_lib.load(_autodan_cases_dir(model_dir))))
  for path in cfg.transfer.external:
    out.append((f"file:{os.path.basename(os.path.normpath(path))}", tc_lib.load(path)))
  return out


def transfer_cells(model, sources: Sequence[tuple[str, Sequence]], ev) -> dict[str, dict]:
  """{source label: success rate with Wilson interval (+ per-case success)} of every source's test cases
  against `model`, in one batched generation over all sources' cases (== one call per source)."""
  cases = [c for _, cs in sources for c in cs]
  res = tc_lib.evaluate(model, cases, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size,
                        prefixes=ev.prefixes)
  out, i = {}, 0
  for label, cs in sources:
    succ = [bool(x) for x in res["success"][i:i + len(cs)]]
    out[label] = dict(stats.rate(sum(succ), len(succ)), success=succ)
    i += len(cs)
  return out


def run_transfer(cfg, workdir: str, rows: Sequence[Mapping], load_model) -> list[dict]:
  """One cell per (source, evaluated checkpoint): {"source", "run", "step", rate, low, high, k, n}. Cells of
  one target are cached in its model directory, keyed by the model, every source's test cases and the
  judge, so a new source recomputes that target's row (never a stale cell)."""
  sources = transfer_sources(rows, cfg, workdir)
  cells, seen = [], {}
  for r in rows:
    if r["digest"] not in seen:
      model = load_model(f"{r['path']}@{r['step']}")
      path = os.path.join(workdir, "trajectory", "models", r["digest"][:16], "transfer.json")
      parts = dict(model=keys.model_parts(model), sources=[(lb, [c.test_case for c in cs]) for lb, cs in sources],
                   eval=dict(cfg.eval))
      if keys.claim(path, "transfer", **parts):
        with open(path, encoding="utf-8") as f:
          seen[r["digest"]] = json.load(f)
      else:
        seen[r["digest"]] = transfer_cells(model, sources, cfg.eval)
        files.atomic_write_json(path, seen[r["digest"]], indent=1)
    for label, _ in sources:
      c = seen[r["digest"]][label]
      cells.append(dict(source=label, run=r["run"], step=r["step"], **{k: c[k] for k in ("rate", "low", "high",
                                                                                        "k", "n")}))
  files.atomic_write_json(os.path.join(workdir, "trajectory", "transfer.json"), cells, indent=1)
  return cells
