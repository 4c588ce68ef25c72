"""The embedding-drift audit: probe selection, synthetic drift sweeps, the alarm, re-anchoring, real
drift from changed models, separability; returns the report's "drift" section (lvs_jax.drift.study
runs the pieces, lvs_jax.drift.section shows them).

Prompt sets (defaults; all bundled with the package, lvs_jax/prompts; 1 = harmful, 0 = harmless):
  fit / val   harmful_train (260) + a same-size seeded sample of harmless_train, split per class
              into fit (80%) and val (20%): layer/pooling selection, early stopping, calibration
  test        harmful_val (39) + a seeded sample of harmless_val (200)
  anchors     the first n_pool fit prompts (mixed classes; labels unused by re-anchoring)

Files under `workdir/drift/`:
  embeddings/model_<pooling>.npz          every layer of the model for fit + val + test (cached)
  embeddings/<source>_<pooling>_L<l>.npz  a changed model's test + anchor embeddings at the chosen layer
  results.json                            every number of the section
Re-running on the same workdir reuses the embeddings (the sweeps take a few minutes).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lvs_jax.drift import embeddings, metrics, probes
from lvs_jax.drift import families as drift
from lvs_jax.drift import section as drift_section
from lvs_jax.drift import study as drift_eval
from lvs_jax.evals import stats
from lvs_jax.io import datasets as data
from lvs_jax.io import files
from lvs_jax.report import store as report_lib


def prompt_sets(cfg) -> dict:
  """{fit, val, test: (prompts, labels [N] int32)}; fit is shuffled (mixed classes). Raises on a bad
  path or too few prompts, before any model is loaded."""
  d, seed = cfg.data, cfg.seed
  harm = data.load_prompts(d.harmful_train)
  harm = data.sample(harm, d.n_harmful_train, seed) if d.n_harmful_train else harm
  harmless = data.sample(data.load_prompts(d.harmless_train), len(harm), seed)
  parts = [data.split(list(ps), [1.0 - d.val_fraction, d.val_fraction], seed) for ps in (harm, harmless)]
  test_h = data.load_prompts(d.harmful_test)
  test_h = data.sample(test_h, d.n_harmful_test, seed) if d.n_harmful_test else test_h
  test_n = data.sample(data.load_prompts(d.harmless_test), d.n_harmless_test, seed)
  out = {}
  for name, (h, n) in zip(("fit", "val", "test"), ((parts[0][0], parts[1][0]), (parts[0][1], parts[1][1]),
                                                   (list(test_h), list(test_n)))):
    if not h or not n:
      raise ValueError(f"drift audit: the {name} set needs prompts of both classes, got {len(h)} harmful, "
                       f"{len(n)} harmless")
    out[name] = (h + n, np.array([1] * len(h) + [0] * len(n), np.int32))
  perm = np.random.default_rng(seed).permutation(len(out["fit"][0]))  # the anchor pool is fit[:n_pool]
  out["fit"] = ([out["fit"][0][i] for i in perm], out["fit"][1][perm])
  return out


def _unit(x) -> np.ndarray:
  return np.asarray(stats.unit(jnp.asarray(x)))


def select_layer(model, sets, cfg, emb_dir: str) -> tuple[dict, np.ndarray]:
  """Embeds fit + val + test at every candidate layer and pooling; picks the (pooling, layer) with
  the best validation ROC-AUC of a logistic probe (ties: the lower validation loss). Returns
  ({layer, pooling, val_auc, x: unit embeddings [N_fit + N_val + N_test, D] there}, val AUC [P, L])."""
  everything = sets["fit"][0] + sets["val"][0] + sets["test"][0]
  n_fit, n_val = len(sets["fit"][0]), len(sets["val"][0])
  y_fit, y_val = sets["fit"][1], sets["val"][1]
  layers = list(cfg.layers) or list(range(model.cfg.n_layers))
  key = jax.random.key(cfg.seed)
  auc, loss, best = [], [], None
  for pooling in cfg.poolings:
    x = _unit(embeddings.embed(model, everything, layers=layers, pooling=pooling, site=cfg.site, chat=cfg.chat,
                               batch_size=cfg.batch_size, cache=os.path.join(emb_dir, f"model_{pooling}.npz"),
                               progress=True))
    pc = probes.ProbeConfig(max_steps=cfg.probe.max_steps, patience=cfg.probe.patience)
    a, vl = probes.val_auc_per_layer(key, x[:, :n_fit], y_fit, x[:, n_fit:n_fit + n_val], y_val, pc)
    auc.append(np.asarray(a))
    loss.append(np.asarray(vl))
    logging.info("%s: validation AUC per layer %s", pooling, np.round(auc[-1], 3))
    i = int(np.lexsort((loss[-1], -auc[-1]))[0])
    if best is None or (auc[-1][i], -loss[-1][i]) > (best["val_auc"], -best["val_loss"]):
      best = dict(pooling=pooling, layer=layers[i], val_auc=float(auc[-1][i]), val_loss=float(loss[-1][i]), x=x[i])
  logging.info("probe on layer %d, %s pooling (validation AUC %.3f)", best["layer"], best["pooling"], best["val_auc"])
  return best, np.stack(auc)


def changed_model(model, source: str, seed: int):
  """(model B, magnitude) for a real-drift source:
    "perturb:<rho>"            this model, every weight matrix W + rho ||W||_F/sqrt(n) N(0,1); magnitude rho
    "ckpt:<checkpoint dir>@<step>"  a committed step of a fine-tuning run of *this* model (experiments/
                               train_sft.py or harmful_finetune.py; LoRA merged); magnitude = the step
    anything else              a registered name or a checkpoint path (same tokenizer); magnitude NaN
  """
  if source.startswith("perturb:"):
    rho = float(source.split(":", 1)[1])
    params = drift.perturb_weights(jax.random.fold_in(jax.random.key(seed), int(rho * 1e6)), model.params, rho)
    return dataclasses.replace(model, params=params, name=f"{model.name}+{source}@seed{seed}"), rho
  if source.startswith("ckpt:"):
    from lvs_jax.io import checkpoints
    from lvs_jax.training import recipes as sft

    path, sep, step = source[len("ckpt:"):].rpartition("@")
    if not sep or not step.isdigit():
      raise ValueError(f"drift source {source!r}: expected 'ckpt:<checkpoint dir>@<step>'")
    steps = checkpoints.committed_steps(path) if os.path.isdir(path) else []
    if int(step) not in steps:
      raise ValueError(f"drift source {source!r}: no committed step {step} in {path} (committed: {steps})")
    params = sft.checkpoint_params(path, int(step), model)
    return dataclasses.replace(model, params=params, name=f"{model.name}+{source}"), float(step)
  from lvs_jax.io import registry

  return registry.load_model(source, dtype=model.params.embed.dtype), float("nan")


def run(model, cfg, workdir: str, model_name: str = "") -> report_lib.Section:
  """Everything above; writes workdir/drift/ and returns the "drift" section (the caller adds it)."""
  if cfg.get("fair") and cfg.fair.enabled:  # issue 16: the fair test (lvs_jax/drift/fair.py), its own section
    from lvs_jax.drift import fair_audit

    fair_section = fair_audit.run(model, cfg, workdir, model_name)
    if cfg.fair.only:
      return fair_section
    report_lib.Report(workdir).add_section(fair_section)
  d = os.path.join(workdir, "drift")
  emb_dir = os.path.join(d, "embeddings")
  files.makedirs(emb_dir)
  sets = prompt_sets(cfg)
  best, sel = select_layer(model, sets, cfg, emb_dir)
  (p_fit, y_fit), (p_val, y_val), (p_test, y_test) = sets["fit"], sets["val"], sets["test"]
  n_fit, n_val = len(p_fit), len(p_val)
  x = best["x"]
  x_fit, x_val, x_test = x[:n_fit], x[n_fit:n_fit + n_val], x[n_fit + n_val:]
  syn = drift_eval.run_synthetic(jax.random.key(cfg.seed), x_fit, y_fit, x_val, y_val, x_test, y_test, cfg)

  # Real drift: the test prompts and the anchor pool embedded by a changed model.
  n_pool = min(cfg.reanchor.n_pool, n_fit)
  name = model_name or model.name or "model"
  real, sep, sep_caption = [], [], ""
  for i, src in enumerate(cfg.real.sources):
    other, rho = changed_model(model, src, cfg.seed + 1)
    cache = os.path.join(emb_dir, f"{src.replace('/', '_').replace(':', '_')}_{best['pooling']}_L{best['layer']}.npz")
    xb = _unit(embeddings.embed(other, p_test + p_fit[:n_pool], layers=[best["layer"]], pooling=best["pooling"],
                                site=cfg.site, chat=cfg.chat, batch_size=cfg.batch_size, cache=cache)[0])
    del other
    row, rows = drift_eval.run_real(jax.random.fold_in(jax.random.key(cfg.seed), 100 + i), src, rho, x_test, y_test,
                                    xb[:len(p_test)], x_fit[:n_pool], xb[len(p_test):], syn, cfg)
    real.append(row)
    syn["reanchor"] += rows
    if src == cfg.real.separability_source:
      y_sep = np.concatenate([y_test, y_fit[:n_pool]])
      sep = metrics.compare_separability(np.concatenate([x_test, x_fit[:n_pool]]), y_sep, xb, y_sep, names=(name, src))
      sep_caption = (f"Class separability (harmful vs harmless) of the {len(y_sep)} test + anchor prompts at layer "
                     f"{best['layer']}, {best['pooling']} pooling, unit-normalized rows: {name} vs {src}. No base "
                     "(non-instruct) model is available offline, so base vs instruct is not measured; "
                     "metrics.compare_separability takes any two embedding sets.")

  res = dict(
    setup=dict(model=name, source=getattr(model, "source", ""), layer=best["layer"], pooling=best["pooling"],
               chat=cfg.chat, site=cfg.site, n_fit=n_fit, n_val=n_val, n_test_harmful=int(y_test.sum()),
               n_test_harmless=int((1 - y_test).sum()), probe=cfg.probe.main, convention=cfg.sweep.convention,
               repeats=cfg.sweep.repeats, silent_threshold=cfg.sweep.silent_threshold, alpha=cfg.alarm.alpha,
               window=cfg.alarm.window, subspace_k=cfg.sweep.subspace_k, augment_sigma=syn["augment_sigma"],
               val_auc=best["val_auc"], identity_prior=cfg.reanchor.identity_prior),
    layer_selection=dict(poolings=list(cfg.poolings), layers=list(cfg.layers) or list(range(model.cfg.n_layers)),
                         val_auc=sel),
    clean=syn["clean"], probe_info=syn["probe_info"], margin=syn["margin"], families=syn["families"],
    cliffs=syn["cliffs"], reanchor=syn["reanchor"], real=real, separability=sep, separability_caption=sep_caption,
    alarm=dict(false_alarm_rate=syn["alarm"]["false_alarm_rate"]))
  res["notes"] = drift_section.notes(res)
  res = report_lib.to_jsonable(res, "drift results")
  files.atomic_write_json(os.path.join(d, "results.json"), res, indent=1)
  return drift_section.drift_section(res)
