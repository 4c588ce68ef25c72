"""The fair drift study (issue 16) on a model: what runs, resumably. The analysis is `lvs_jax.drift.fair`, the
report section `lvs_jax.drift.fair_section`, the defaults experiments/configs/drift.py (`fair_config`).

`run` embeds the probes' fit/validation prompts and every held-out task (`lvs_jax.drift.tasks`) at one fixed layer
and pooling, computes the clean metrics of every task, the full study on the headline task (the one closest to the
paper's clean AUC) and, with `separability.source`, the other-model stage (real drift and separability), and writes
workdir/drift_fair/:

  embeddings/<tag>_<pooling>_L<layer>.npz   `embeddings.embed` caches (keyed by the weights digest)
  task_<name>_clean.json, task_<head>_full.json, other_model.json
                                            each stage's results, with a `.key.json` next to it (`io.keys.claim`:
                                            the model's weights digest, the other model's, the prompts, the seed and
                                            the fair config); reused only when that key matches, else moved aside
  results.json                              everything `fair_section.section` renders
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lvs_jax.drift import embeddings, fair, metrics, probes
from lvs_jax.drift import families as drift
from lvs_jax.drift import study as drift_eval
from lvs_jax.drift import tasks as drift_tasks
from lvs_jax.io import files, keys
from lvs_jax.report import store as report_lib


def cached(out_dir: str, name: str, parts: Mapping, compute: Callable[[], dict]):
  """compute() -> JSON-able results, reused from out_dir/<name>.json when its content key (`keys.claim` of kind
  "drift_fair" over `parts`) matches; a result with another key is moved aside and recomputed."""
  path = os.path.join(out_dir, f"{name}.json")
  if keys.claim(path, "drift_fair", **parts):
    logging.info("fair: reusing %s", path)
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  value = report_lib.to_jsonable(compute(), name)
  files.atomic_write_json(path, value)  # process 0 only
  return value


def real_drift(probe_set: dict, x_test, y_test, x_test_b, anchors_a, anchors_b, cfg, name: str) -> dict:
  """The probes on the task embedded by another model (same prompts), and Procrustes from the fit anchors."""
  row = dict(source=name, angle=float(jnp.mean(metrics.angle_deg(jnp.asarray(x_test), jnp.asarray(x_test_b)))))
  for p, probe in probe_set.items():
    c = drift_eval.evaluate(probe, x_test, y_test, cfg.silent_threshold)
    m = fair.collapse_metrics(probes.predict_proba(probe, jnp.asarray(x_test)), probes.predict_proba(probe, x_test_b),
                         y_test, probes.logits(probe, jnp.asarray(x_test_b)), cfg.silent_threshold)
    row.update({f"{p}_auc_clean": c["auc"], **{f"{p}_{k}": v for k, v in m.items()}})
  ra = cfg.reanchor
  ns = [n for n in ra.n_anchors if n <= len(anchors_a)]
  fixed = drift_eval.reanchor_scores(jax.random.key(0), probe_set["paper"], anchors_a, anchors_b, x_test_b, y_test,
                                     ns, repeats=ra.repeats, identity_prior=ra.identity_prior)
  row["paper_auc_reanchored"] = float(fixed["auc"][-1]) if ns else float("nan")
  row["paper_bacc_reanchored"] = float(fixed["balanced_accuracy"][-1]) if ns else float("nan")
  return row


def _embedder(model, everything, layer, fc, cfg, emb_dir):
  """emb(model, tag) -> unit embeddings [N, D] of `everything` (cached under emb_dir by the weights digest)."""
  def emb(m, tag):
    x = embeddings.embed(m, everything, layers=[layer], pooling=fc.pooling, site=cfg.site, chat=cfg.chat,
                         batch_size=cfg.batch_size, cache=os.path.join(emb_dir, f"{tag}_{fc.pooling}_L{layer}.npz"),
                         progress=True)[0]
    return np.asarray(drift.unit(jnp.asarray(x)))

  return emb


def _clean_row(t, c) -> dict:
  """The "tasks" table's row of task t from its clean results c."""
  return dict(task=t.name, description=t.description, n_pos=t.n_pos, n_neg=t.n_neg, paper_auc=c["paper"]["auc"][0],
              paper_auc_low=c["paper"]["auc"][1], paper_auc_high=c["paper"]["auc"][2],
              hardened_auc=c["hardened"]["auc"][0], hardened_auc_low=c["hardened"]["auc"][1],
              hardened_auc_high=c["hardened"]["auc"][2])


def _other_model(model, emb, x, rows, tk, t, parts, out_dir, cfg, name, key, fit) -> dict:
  """The other-model stage: the headline task and the probes' anchors embedded by `fc.separability.source` ->
  {real: [row], separability: [rows per task and metric]} (cached; the source's weights digest in the key)."""
  from lvs_jax.io import registry

  fc = cfg.fair
  src = fc.separability.source
  (p_fit, _), x_fit, y_fit, x_val, y_val = fit
  other = registry.load_model(src, dtype=model.params.embed.dtype)
  xb = emb(other, src.replace("/", "_").replace(":", "_"))
  other_parts = keys.model_parts(other)
  del other

  def compute():
    pr, _ = fair._probe_set(key, x_fit, y_fit, x_val, y_val, fc, 0)
    n_pool = min(fc.reanchor.n_pool, len(p_fit))
    rr = [real_drift(pr, x[rows(t.prompts)], t.labels, xb[rows(t.prompts)], x_fit[:n_pool], xb[rows(p_fit)][:n_pool],
                     fc, src)]
    ss = []
    for tn, tt in tk.items():
      r = fair.separability_change(x[rows(tt.prompts)], xb[rows(tt.prompts)], tt.labels, (name, src),
                                   fc.separability.n_boot, cfg.seed)
      ss += [dict(task=tn, **row) for row in r]
    return dict(real=rr, separability=ss)

  return cached(out_dir, "other_model", dict(parts, other=other_parts, source=src, headline=t.name), compute)


def _setup(cfg, name, layer, n_fit, n_val, t) -> dict:
  fc = cfg.fair
  return dict(model=name, layer=layer, pooling=fc.pooling, site=cfg.site, chat=cfg.chat, seeds=fc.seeds,
              repeats=fc.repeats, n_fit=n_fit, n_val=n_val, headline_task=t.name, headline_description=t.description,
              collapse_auc=fc.collapse_auc, silent_threshold=fc.silent_threshold, target_auc=fc.target_auc,
              paper=fc.paper.to_dict(), hardened=fc.hardened.to_dict(), n_random=fc.n_random, alarm=fc.alarm.to_dict(),
              separability_source=fc.separability.source)


def run(model, cfg, workdir: str, model_name: str = "") -> report_lib.Section:
  """The fair study on `model` (config: the drift config, section cfg.fair); writes workdir/drift_fair/ (module
  docstring) and returns the "drift_fair" report section."""
  from lvs_jax.drift import audit as drift_audit
  from lvs_jax.drift import fair_section

  fc = cfg.fair
  out_dir = os.path.join(workdir, "drift_fair")
  emb_dir = os.path.join(out_dir, "embeddings")
  files.makedirs(emb_dir)
  sets = drift_audit.prompt_sets(cfg)
  (p_fit, y_fit), (p_val, y_val) = sets["fit"], sets["val"]
  tk = drift_tasks.build_tasks(p_fit + p_val, tuple(fc.tasks), fc.n_per_class, cfg.seed)
  everything = list(dict.fromkeys(p_fit + p_val + [p for t in tk.values() for p in t.prompts]))
  where = {p: i for i, p in enumerate(everything)}
  layer = fc.layer % model.cfg.n_layers
  name = model_name or model.name or "model"
  # What every stage's result depends on besides its own prompts: the weights (not the name: another checkpoint
  # with the same name must not reuse them), the embedding, the probes' prompts, the seed and the study's knobs.
  parts = dict(model=keys.model_parts(model), name=name, layer=layer, site=cfg.site, chat=cfg.chat, seed=cfg.seed,
               fit=[p_fit, y_fit], val=[p_val, y_val], config=fc.to_dict())
  emb = _embedder(model, everything, layer, fc, cfg, emb_dir)
  x = emb(model, "model")
  rows = lambda ps: np.array([where[p] for p in ps])  # noqa: E731
  x_fit, x_val = x[rows(p_fit)], x[rows(p_val)]
  key = jax.random.key(cfg.seed)
  results, clean_rows = {}, []
  # Clean AUC of every task first (cheap), then the full study on the headline task.
  for t in tk.values():
    results[t.name] = cached(out_dir, f"task_{t.name}_clean", dict(parts, prompts=t.prompts, full=False),
                             lambda t=t: fair.analyze(key, x_fit, y_fit, x_val, y_val, x[rows(t.prompts)], t.labels,
                                                      fc, full=False))
    clean_rows.append(_clean_row(t, results[t.name]["clean"]))
  head = min(clean_rows, key=lambda r: abs(r["paper_auc"] - fc.target_auc))["task"]
  logging.info("fair: headline task %s (clean paper-probe AUC %.3f)", head, results[head]["clean"]["paper"]["auc"][0])
  t = tk[head]
  full = cached(out_dir, f"task_{head}_full", dict(parts, prompts=t.prompts, full=True),
                lambda: fair.analyze(key, x_fit, y_fit, x_val, y_val, x[rows(t.prompts)], t.labels, fc, full=True))
  z = dict(real=[], separability=[])
  if fc.separability.source:
    z = _other_model(model, emb, x, rows, tk, t, dict(parts, prompts=everything), out_dir, cfg, name, key,
                     ((p_fit, y_fit), x_fit, y_fit, x_val, y_val))
  res = dict(setup=_setup(cfg, name, layer, len(p_fit), len(p_val), t), tasks=clean_rows, other_tasks=results,
             full=full, real=z["real"], separability=z["separability"])
  res = report_lib.to_jsonable(res, "drift_fair results")
  res["notes"] = fair_section.notes(res)
  files.atomic_write_json(os.path.join(out_dir, "results.json"), res, indent=1)  # process 0 only
  return fair_section.section(res)
