"""Embedding drift tested fairly (issue 16): the paper's probe on a task at the paper's difficulty, both sigma
conventions, worst-case directions, and the metrics at collapse.

The drift kit's main study (`lvs_jax.drift.study`) raises the margin at every step: an easy task (clean ROC-AUC
0.999), the best of 30 layers x 3 poolings, a tuned, early-stopped, temperature-calibrated probe, and random drift
directions. This module removes each of those advantages:

  tasks       held-out tasks whose clean AUC lands near the paper's 0.85 (`lvs_jax.drift.tasks`)
  probes      "paper": plain logistic regression on one fixed embedding (one layer, one pooling), one l2,
              a fixed number of full-batch steps, no early stopping, no class weights, no standardization
              and no calibration (temperature exactly 1); "hardened": the kit's probe (standardized inputs,
              l2 chosen on validation, early stopping, temperature scaling) on the same embedding
  conventions isotropic drift under both sigma conventions of `lvs_jax.drift.families`: "norm" (noise of total
              norm sigma: sigma = 0.02 turns a vector by ~1.15 degrees) and "coord" (per-coordinate std sigma,
              the literal normalize(u + sigma eps): ~25.6 degrees at D = 576); every point carries its
              *measured* mean angle and the closed form atan(s sqrt(D - 1))
  worst case  directional drift x' = ||x|| normalize(u + sigma v) along the probe's normal (-w: harmful rows
              move toward the safe side), along the class-mean difference (-dmu), along the direction that
              lowers the AUC most at that sigma (`worst_auc_direction`, found by gradient descent on a smooth
              AUC), next to `n_random` random directions (their mean and their worst)
  collapse    AUC, mean-confidence drop (relative to clean) and silent-failure share (errors with confidence
              > 0.8) at sigma = 0.02 and where the AUC first falls below `collapse_auc` (~0.5), per seed;
              a seed refits both probes on a bootstrap resample of the training prompts and redraws the drift
  predictor   the kit's binormal model of a linear probe's scores, extended to both conventions:
              AUC(sigma) = Phi(gap / sqrt(s_1^2 + s_0^2 + 2 s^2)), s = `families.noise_scale(sigma, D, conv)`,
              gap and s_c the class means / stds of the unit rows along the probe's normal
  alarm       the kit's label-free alarm (`lvs_jax.drift.alarm`) on windows of the test prompts, per drift
  re-anchor   Procrustes (`families.fit_procrustes`) from anchors embedded before and after the drift
  separability  the task's prompts embedded by two models (our instruct model vs the aligned anchor):
              Fisher ratio, cosine silhouette and linear margin with paired bootstrap intervals

`analyze` is the study on arrays (tested on planted data); `lvs_jax.drift.fair_audit.run` embeds the prompts with
a model and writes workdir/drift_fair/ (embeddings and per-task results cached by content keys, so a restart
resumes); `lvs_jax.drift.fair_section` renders what it wrote. Default configs: experiments/configs/drift.py
(`fair_config`, `make_fair_smoke`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lvs_jax.drift import alarm as drift_alarm
from lvs_jax.drift import families as drift
from lvs_jax.drift import metrics, probes
from lvs_jax.drift import study as drift_eval
from lvs_jax.evals import stats

CONVENTIONS = drift.CONVENTIONS
PROBES = ("paper", "hardened")
DIRECTIONS = ("probe_normal", "class_mean", "auc_worst", "random_mean", "random_worst")
PAPER_SIGMA = 0.02


# --- Probes ------------------------------------------------------------------------------------------


def paper_probe_config(cfg) -> probes.ProbeConfig:
  """Plain logistic regression: no standardization, no class weights, no early stopping, no calibration."""
  return probes.ProbeConfig(kind="logreg", lr=cfg.lr, max_steps=cfg.max_steps, patience=0, class_weight="none",
                            normalize=True, standardize=False, calibrate=False)


def fit_paper(key, x, y, cfg) -> tuple[probes.Probe, dict]:
  """The paper's probe on x [N, D], y [N]: one fit at l2 = cfg.l2 on all of x (no validation split is used)."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  return probes.fit(key, x, y, x, y, paper_probe_config(cfg), cfg.l2)


def fit_hardened(key, x_fit, y_fit, x_val, y_val, cfg) -> tuple[probes.Probe, dict]:
  """The kit's probe: standardized, l2 chosen on the validation split, early-stopped, temperature-calibrated."""
  pc = probes.ProbeConfig(kind="logreg", lr=cfg.lr, max_steps=cfg.max_steps, patience=cfg.patience)
  return probes.fit_select(key, jnp.asarray(x_fit), jnp.asarray(y_fit), jnp.asarray(x_val), jnp.asarray(y_val), pc,
                           tuple(cfg.l2s))


def probe_normal(probe: probes.Probe) -> jax.Array:
  """The unit normal [D] of a logistic probe's decision boundary on unit rows (w / std; +: toward class 1)."""
  if probe.kind != "logreg":
    raise ValueError(f"probe_normal needs a logistic probe, got kind={probe.kind!r}")
  return drift.unit(probe.params["w"] / probe.std)


def class_mean_direction(x, y) -> jax.Array:
  """unit(mean of class-1 unit rows - mean of class-0 unit rows) [D]."""
  u = drift.unit(jnp.asarray(x, jnp.float32))
  w1 = jnp.asarray(y).astype(jnp.float32)
  return drift.unit((w1 @ u) / jnp.sum(w1) - ((1 - w1) @ u) / jnp.sum(1 - w1))


# --- Worst-case directional drift ------------------------------------------------------------------------


def _smooth_auc(f, y, tau):
  pos = jnp.asarray(y).astype(jnp.float32)
  pair = pos[:, None] * (1 - pos)[None, :]
  return jnp.sum(jax.nn.sigmoid((f[:, None] - f[None, :]) / tau) * pair) / jnp.sum(pair)


@functools.partial(jax.jit, static_argnames=("steps",))
def worst_auc_direction(probe: probes.Probe, x, y, sigma, steps: int = 150, lr: float = 0.05) -> jax.Array:
  """The unit direction v [D] along which directional drift at `sigma` lowers the probe's AUC on x [N, D], y [N]
  the most (a local optimum): Adam on a sigmoid-smoothed AUC (temperature 5% of the clean score std) over v on
  the sphere, started from the first-order solution.

  First order: renormalization gives f(u + sigma v) ~ f(u) + sigma (w.v - s(u) u.v) with s(u) = w.u, so the
  rank-changing part is -sigma s(u) u.v and the gap of mean scores shrinks fastest along
  g = mean_{y=1}(s u) - mean_{y=0}(s u) (s centered on the clean mean score).
  """
  u = drift.unit(jnp.asarray(x, jnp.float32))
  w = probe.params["w"] / probe.std
  s = u @ w
  s = s - jnp.mean(s)
  pos = jnp.asarray(y).astype(jnp.float32)
  g = ((pos * s) @ u) / jnp.sum(pos) - (((1 - pos) * s) @ u) / jnp.sum(1 - pos)
  tau = 0.05 * jnp.std(probes.logits(probe, u)) + 1e-6

  def loss(v):
    return _smooth_auc(probes.logits(probe, drift.directional(u, sigma, v)), y, tau)

  opt = optax.adam(lr)
  v0 = drift.unit(g)

  def step(carry, _):
    v, st = carry
    grad = jax.grad(loss)(v)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes float and int32 step counts
      upd, st = opt.update(grad, st, v)
    return (drift.unit(optax.apply_updates(v, upd)), st), loss(v)

  (v, _), trace = jax.lax.scan(step, (v0, opt.init(v0)), None, length=steps)
  # keep the start when the ascent made it worse (the smoothed AUC is only a surrogate)
  return jnp.where(loss(v) <= trace[0], v, v0)


@jax.jit
def _directional_metrics(probe, x, y, sigmas, dirs, thr):
  """metrics [S, K] of the probe on x drifted along each of dirs [S, K, D] (per-sigma directions) at sigmas [S]."""
  def one(sigma, v):
    xd = drift.directional(x, sigma, v)
    f = probes.logits(probe, xd)
    m = metrics.classification_metrics(jax.nn.sigmoid(f), y, thr, scores=f)
    m["angle"] = jnp.mean(metrics.angle_deg(x, xd))
    return m

  return jax.lax.map(lambda a: jax.vmap(one, (None, 0))(*a), (sigmas, dirs))


def directional_sweep(key, probe, x, y, sigmas, *, n_random: int = 100, steps: int = 150,
                      silent_threshold: float = 0.8) -> dict[str, dict[str, np.ndarray]]:
  """Directional drift of `probe` on x [N, D], y [N] along the named directions and `n_random` random ones ->
  {direction: {metric: [S]}} for DIRECTIONS; random_mean is the mean over the random directions and random_worst
  the random direction with the lowest AUC at each sigma (its metrics)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
  sig = jnp.asarray(sigmas, jnp.float32)
  d = x.shape[1]
  named = jnp.stack([-probe_normal(probe), -class_mean_direction(x, y)])
  worst = jax.vmap(lambda s: worst_auc_direction(probe, x, y, s, steps))(sig)  # [S, D]
  rand = jax.vmap(lambda k: drift.random_direction(k, d))(jax.random.split(key, n_random))
  dirs = jnp.concatenate([jnp.broadcast_to(named, (len(sigmas),) + named.shape), worst[:, None],
                          jnp.broadcast_to(rand, (len(sigmas),) + rand.shape)], 1)
  m = {k: np.asarray(v, np.float64) for k, v in _directional_metrics(probe, x, y, sig, dirs,
                                                                      jnp.float32(silent_threshold)).items()}
  out = {name: {k: v[:, i] for k, v in m.items()} for i, name in enumerate(("probe_normal", "class_mean",
                                                                             "auc_worst"))}
  r = {k: v[:, 3:] for k, v in m.items()}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    out["random_mean"] = {k: np.nanmean(v, 1) for k, v in r.items()}
  j = np.argmin(r["auc"], 1)
  out["random_worst"] = {k: v[np.arange(len(j)), j] for k, v in r.items()}
  return out


# --- Conventions, collapse, prediction ---------------------------------------------------------------------


def measured_angles(key, x, sigmas, convention: str) -> np.ndarray:
  """Mean angle (degrees) between x [N, D] and its isotropic drift at each sigma [S] under `convention`."""
  x = jnp.asarray(x, jnp.float32)
  f = jax.jit(jax.vmap(lambda s: jnp.mean(metrics.angle_deg(x, drift.isotropic(key, x, s, convention)))))
  return np.asarray(f(jnp.asarray(sigmas, jnp.float32)), np.float64)


def collapse_metrics(p_clean, p_drift, y, scores_drift=None, threshold: float = 0.8) -> dict[str, float]:
  """The paper's three numbers for one drifted prediction set: p_clean, p_drift [N] = P(y = 1) before and after
  the drift -> {auc (of scores_drift, default p_drift), balanced_accuracy, confidence (mean max(p, 1 - p) after),
  confidence_drop (1 - confidence after / before: the paper's "-14%" is 0.14), error_rate, silent_share (share
  of the errors made with confidence > threshold; nan without errors)}."""
  p_clean, p_drift = jnp.asarray(p_clean, jnp.float32), jnp.asarray(p_drift, jnp.float32)
  y = jnp.asarray(y)
  c0, c1 = metrics.mean_confidence(p_clean), metrics.mean_confidence(p_drift)
  return dict(auc=float(metrics.roc_auc(p_drift if scores_drift is None else scores_drift, y)),
              balanced_accuracy=float(metrics.balanced_accuracy(p_drift, y)), confidence=float(c1),
              confidence_drop=float(1.0 - c1 / c0), error_rate=float(1.0 - metrics.accuracy(p_drift, y)),
              silent_share=float(metrics.silent_failure_rate(p_drift, y, threshold)))


def _isotropic_draws(probe, x, y, sigma, key, repeats, convention, threshold):
  """collapse_metrics pooled (means) over `repeats` isotropic draws at sigma, plus the mean angle."""
  x = jnp.asarray(x, jnp.float32)
  p0 = probes.predict_proba(probe, x)
  rows = []
  for k in jax.random.split(key, repeats):
    xd = drift.isotropic(k, x, sigma, convention)
    f = probes.logits(probe, xd)
    r = collapse_metrics(p0, jax.nn.sigmoid(f), y, f, threshold)
    r["angle"] = float(jnp.mean(metrics.angle_deg(x, xd)))
    rows.append(r)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def binormal_auc(probe: probes.Probe, x, y, sigmas, convention: str) -> np.ndarray:
  """The binormal prediction of a logistic probe's AUC [S] under isotropic drift at sigmas (module docstring);
  at sigma = 0 it is the clean binormal AUC."""
  from jax.scipy.stats import norm

  w = np.asarray(probe_normal(probe), np.float64)
  u = np.asarray(drift.unit(jnp.asarray(x, jnp.float32)), np.float64)
  proj, yb = u @ w, np.asarray(y).astype(bool)
  gap, var = proj[yb].mean() - proj[~yb].mean(), proj[yb].var() + proj[~yb].var()
  s = np.asarray([drift.noise_scale(float(sg), u.shape[1], convention) for sg in sigmas], np.float64)
  return np.asarray(norm.cdf(gap / np.sqrt(var + 2 * s ** 2)), np.float64)


# --- The alarm on a given drift ----------------------------------------------------------------------------


def coord_factor(convention: str, d: int) -> float:
  """The per-coordinate std of the isotropic family per unit sigma under `convention` (`drift.noise_scale`): a
  norm-convention sweep is a coord-convention sweep at sigma * this, so both share one compilation."""
  return float(drift.noise_scale(1.0, d, convention))


@functools.partial(jax.jit, static_argnames=("statistics", "window", "n_perm"))
def _fire(ref, pool, sigmas, keys, direction, alpha, is_dir, factor, statistics, window, n_perm):
  p = pool.shape[0]

  def one(sigma, kk):
    kp, kd, kt = jax.random.split(kk, 3)
    perm = jax.random.permutation(kp, p)
    xr, xn = pool[perm[:window]], pool[perm[window:2 * window]]
    xn = jnp.where(is_dir, drift.directional(xn, sigma, direction), drift.isotropic(kd, xn, sigma * factor, "coord"))
    return jnp.stack([drift_alarm.two_sample_test(kt, ref, xr, xn, st, n_perm)[1] <= alpha for st in statistics])

  return jax.lax.map(lambda a: jnp.mean(jax.vmap(one, (None, 0))(*a).astype(jnp.float32), 0), (sigmas, keys))


def fire_rate(key, ref, pool, sigmas, *, mode: str, convention: str = "norm", direction=None, cfg) -> dict:
  """Share of windows on which the alarm fires per statistic and sigma -> {statistic: [S]}; incoming windows of
  pool [P, D] drifted isotropically (mode "isotropic", under `convention`) or along `direction` [D]."""
  pool = jnp.asarray(pool, jnp.float32)
  if pool.shape[0] < 2 * cfg.window:
    raise ValueError(f"alarm windows of {cfg.window} need a pool of >= {2 * cfg.window} rows, got {pool.shape[0]}")
  keys = jnp.broadcast_to(jax.random.split(key, cfg.n_windows), (len(sigmas), cfg.n_windows))
  v = jnp.zeros(pool.shape[1], jnp.float32) if direction is None else jnp.asarray(direction, jnp.float32)
  if mode not in ("isotropic", "directional"):
    raise ValueError(f"unknown alarm drift mode {mode!r}; expected 'isotropic' or 'directional'")
  out = np.asarray(_fire(ref, pool, jnp.asarray(sigmas, jnp.float32), keys, v, jnp.float32(cfg.alpha),
                         jnp.asarray(mode == "directional"), jnp.float32(coord_factor(convention, pool.shape[1])),
                         tuple(cfg.statistics), cfg.window, cfg.n_perm), np.float64)
  return {st: out[:, i] for i, st in enumerate(cfg.statistics)}


# --- Separability ------------------------------------------------------------------------------------------


SEPARABILITY = ("fisher_ratio", "silhouette_cosine", "linear_margin")


def _sep(x, y):
  x = drift.unit(jnp.asarray(x, jnp.float32))
  y = jnp.asarray(y).astype(jnp.int32)
  return np.array([float(metrics.fisher_ratio(x, y)), float(metrics.silhouette(x, y, "cosine")),
                   float(metrics.linear_margin(x, y)[0])])


def separability_change(x_a, x_b, y, names: tuple[str, str], n_boot: int = 50, seed: int = 0) -> list[dict]:
  """Fisher ratio, cosine silhouette and linear margin of the same prompts embedded by two models, x_a [N, D_a]
  and x_b [N, D_b] (unit rows), with the relative change (b - a) / |a| and its 95% paired bootstrap interval
  (resampling prompts within each class) -> one row per metric."""
  y = np.asarray(y)
  a, b = _sep(x_a, y), _sep(x_b, y)
  rng = np.random.default_rng(seed)
  idx1, idx0 = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
  rel = []
  for _ in range(n_boot):
    i = np.concatenate([rng.choice(idx1, idx1.size), rng.choice(idx0, idx0.size)])
    sa, sb = _sep(x_a[i], y[i]), _sep(x_b[i], y[i])
    rel.append((sb - sa) / np.abs(sa))
  rel = np.asarray(rel).reshape(n_boot, len(SEPARABILITY))
  rows = []
  for j, m in enumerate(SEPARABILITY):
    lo, hi = (np.quantile(rel[:, j], [0.025, 0.975]) if n_boot else (np.nan, np.nan))
    rows.append({"metric": m, names[0]: a[j], names[1]: b[j], "relative_change": (b[j] - a[j]) / abs(a[j]),
                 "low": float(lo), "high": float(hi)})
  return rows


# --- The study on arrays ----------------------------------------------------------------------------------


def _probe_set(key, x_fit, y_fit, x_val, y_val, cfg, seed):
  """Both probes fitted on a bootstrap resample of the fit rows (seed-specific)."""
  rng = np.random.default_rng(seed)
  i = rng.choice(len(y_fit), len(y_fit))
  kp, kh = jax.random.split(jax.random.fold_in(key, seed))
  paper, pinfo = fit_paper(kp, x_fit[i], y_fit[i], cfg.paper)
  hard, hinfo = fit_hardened(kh, x_fit[i], y_fit[i], x_val, y_val, cfg.hardened)
  return {"paper": paper, "hardened": hard}, {"paper": pinfo, "hardened": hinfo}


def analyze(key, x_fit, y_fit, x_val, y_val, x_test, y_test, cfg, full: bool = True) -> dict:
  """The fair study of one task on unit embeddings -> a results dict (JSON-able after `report.to_jsonable`).

  x_fit [N, D], y_fit: the probes' training rows (anchors for re-anchoring: x_fit[:n_pool]); x_val, y_val: the
  hardened probe's validation split; x_test, y_test: the held-out task. full: also the directional, alarm and
  re-anchoring parts (else clean metrics and the isotropic sweeps only).
  """
  x_fit, x_val, x_test = (np.asarray(drift.unit(jnp.asarray(a, jnp.float32))) for a in (x_fit, x_val, x_test))
  y_fit, y_val, y_test = (np.asarray(a, np.int32) for a in (y_fit, y_val, y_test))
  sigmas = np.asarray(cfg.sigmas, np.float64)
  d = x_test.shape[1]
  thr = cfg.silent_threshold
  res = dict(sigma=sigmas, dim=d, n_pos=int(y_test.sum()), n_neg=int((1 - y_test).sum()), clean={}, sweeps={},
             points=[], directional={}, angles={})
  per_seed = []
  for seed in range(cfg.seeds):
    pr, info = _probe_set(key, x_fit, y_fit, x_val, y_val, cfg, seed)
    kseed = jax.random.fold_in(jax.random.fold_in(key, 1000), seed)
    entry = dict(probes=pr, info=info, clean={p: drift_eval.evaluate(pr[p], x_test, y_test, thr) for p in pr})
    for p in PROBES:
      for ci, conv in enumerate(CONVENTIONS):
        kc = jax.random.fold_in(kseed, ci)
        # as a "coord" sweep at sigma * coord_factor: one compilation serves both conventions
        sw = drift_eval.sweep_family(pr[p], x_test, y_test, "isotropic", sigmas * coord_factor(conv, d), kc,
                                     repeats=cfg.repeats, convention="coord", silent_threshold=thr)
        sw["sigma"] = sigmas
        sw["predicted_auc"] = binormal_auc(pr[p], x_test, y_test, sigmas, conv)
        cs = drift_eval.crossing(sigmas, sw["auc"], cfg.collapse_auc)
        entry[(p, conv)] = sw
        for point, sg in (("sigma=0.02", PAPER_SIGMA), ("collapse", cs)):
          if not math.isfinite(sg):
            row = dict(auc=float("nan"), balanced_accuracy=float("nan"), confidence=float("nan"),
                       confidence_drop=float("nan"), error_rate=float("nan"), silent_share=float("nan"),
                       angle=float("nan"))
          else:
            row = _isotropic_draws(pr[p], x_test, y_test, sg, jax.random.fold_in(kc, 7), cfg.repeats, conv, thr)
          res["points"].append(dict(seed=seed, probe=p, drift=f"isotropic/{conv}", point=point, sigma=sg, **row))
      if full:
        entry[(p, "directional")] = directional_sweep(jax.random.fold_in(kseed, 9), pr[p], x_test, y_test, sigmas,
                                                      n_random=cfg.n_random, steps=cfg.worst_steps,
                                                      silent_threshold=thr)
    per_seed.append(entry)
    logging.info("fair: seed %d done (clean AUC paper %.3f, hardened %.3f)", seed, entry["clean"]["paper"]["auc"],
                 entry["clean"]["hardened"]["auc"])
  # Aggregates over seeds: clean metrics, sweeps (mean, low, high per sigma).
  for p in PROBES:
    res["clean"][p] = {m: stats.t_interval([e["clean"][p][m] for e in per_seed]) for m in per_seed[0]["clean"][p]}
    res["clean"][p]["temperature"] = stats.t_interval([float(e["info"][p]["temperature"]) for e in per_seed])
    for conv in CONVENTIONS:
      res["sweeps"][f"{p}/{conv}"] = _agg([e[(p, conv)] for e in per_seed],
                                          ("auc", "balanced_accuracy", "confidence", "silent_failure_rate", "angle",
                                           "predicted_auc"))
    if full:
      for name in DIRECTIONS:
        res["directional"][f"{p}/{name}"] = _agg([e[(p, "directional")][name] for e in per_seed],
                                                 ("auc", "balanced_accuracy", "confidence", "silent_failure_rate",
                                                  "angle"))
  for conv in CONVENTIONS:
    res["angles"][conv] = dict(measured=res["sweeps"][f"paper/{conv}"]["angle"][0],
                               closed_form=np.asarray(drift.expected_angle_deg(sigmas, d, "isotropic", conv),
                                                      np.float64))
  res["summary"] = _summary(res, cfg)
  if full:
    res.update(_alarm_and_reanchor(key, per_seed[0]["probes"]["paper"], x_fit, x_test, y_test, res, cfg))
  return res


def _agg(dicts: Sequence[dict], names) -> dict[str, list[np.ndarray]]:
  """{name: [mean [S], low [S], high [S]]} over seeds."""
  out = {}
  for n in names:
    v = np.stack([np.asarray(d[n], np.float64) for d in dicts])
    ci = np.array([stats.t_interval(v[:, i]) for i in range(v.shape[1])])
    out[n] = [ci[:, 0], ci[:, 1], ci[:, 2]]
  return out


def _summary(res, cfg) -> list[dict]:
  """Per (probe, drift, point): the metrics' means and intervals over seeds."""
  rows = []
  keys = sorted({(r["probe"], r["drift"], r["point"]) for r in res["points"]})
  for p, dr, pt in keys:
    rs = [r for r in res["points"] if (r["probe"], r["drift"], r["point"]) == (p, dr, pt)]
    row = dict(probe=p, drift=dr, point=pt, n_seeds=len(rs))
    for m in ("sigma", "angle", "auc", "balanced_accuracy", "confidence_drop", "silent_share", "error_rate"):
      row[m], row[f"{m}_low"], row[f"{m}_high"] = stats.t_interval([r[m] for r in rs])
    rows.append(row)
  return rows


def _alarm_and_reanchor(key, probe, x_fit, x_test, y_test, res, cfg) -> dict:
  """The alarm's fire rate and its 90% detection angle per drift, and Procrustes re-anchoring at sigma = 0.02,
  at collapse and at the balanced-accuracy collapse along the probe normal (seed 0's paper probe)."""
  sigmas = res["sigma"]
  al, ra = cfg.alarm, cfg.reanchor
  ref = drift_alarm.fit_reference(jnp.asarray(x_fit), k=al.k)
  ka, kr = jax.random.split(jax.random.fold_in(key, 2000))
  v = -probe_normal(probe)
  drifts = {f"isotropic/{c}": dict(mode="isotropic", convention=c) for c in CONVENTIONS}
  drifts["directional/probe_normal"] = dict(mode="directional", direction=v)
  alarm, detect, reanchor = {}, [], []
  x_test_j = jnp.asarray(x_test)
  n_pool = min(ra.n_pool, len(x_fit))
  anchors_a = jnp.asarray(x_fit[:n_pool])
  ns = [n for n in ra.n_anchors if n <= n_pool]
  clean = drift_eval.evaluate(probe, x_test, y_test, cfg.silent_threshold)
  for i, (name, kw) in enumerate(drifts.items()):
    fr = fire_rate(jax.random.fold_in(ka, i), ref, x_test, sigmas, cfg=al, **kw)
    alarm[name] = fr
    if name.startswith("isotropic"):
      curve = res["sweeps"][f"paper/{name.split('/')[1]}"]
      angle = curve["angle"][0]
      collapse = drift_eval.crossing(sigmas, curve["auc"][0], cfg.collapse_auc)
    else:
      curve = res["directional"]["paper/probe_normal"]
      angle = curve["angle"][0]
      bacc = curve["balanced_accuracy"][0]
      collapse = drift_eval.crossing(sigmas, bacc, 0.5 + (bacc[0] - 0.5) / 2)
    row = dict(drift=name, collapse_sigma=collapse, collapse_angle=drift_eval.interp_log(sigmas, angle, collapse),
               collapse_kind="balanced accuracy halfway to 0.5" if name.startswith("directional") else
               f"AUC < {cfg.collapse_auc}")
    for st, f in fr.items():
      ds = drift_eval.crossing(sigmas, f, al.power, below=False)
      row[f"detect_sigma_{st}"], row[f"detect_angle_{st}"] = ds, drift_eval.interp_log(sigmas, angle, ds)
      row[f"fire_at_0.02_{st}"] = drift_eval.interp_log(sigmas, f, PAPER_SIGMA)
      row[f"fire_at_collapse_{st}"] = drift_eval.interp_log(sigmas, f, collapse)
    detect.append(row)
    points = [("sigma=0.02", PAPER_SIGMA)] if name.startswith("isotropic") else []
    points.append(("collapse", collapse))
    for j, (pt, sg) in enumerate(points):
      if not math.isfinite(sg):
        continue
      k1, k2, k3 = jax.random.split(jax.random.fold_in(kr, 10 * i + j), 3)
      if kw["mode"] == "isotropic":
        test_b = drift.isotropic(k2, x_test_j, sg, kw["convention"])
        anchors_b = drift.isotropic(k3, anchors_a, sg, kw["convention"])
      else:
        test_b, anchors_b = drift.directional(x_test_j, sg, v), drift.directional(anchors_a, sg, v)
      fixed = drift_eval.reanchor_scores(k1, probe, anchors_a, anchors_b, test_b, y_test, ns, repeats=ra.repeats,
                                         identity_prior=ra.identity_prior)
      drifted = drift_eval.evaluate(probe, test_b, y_test, cfg.silent_threshold)
      angle_b = float(jnp.mean(metrics.angle_deg(x_test_j, test_b)))
      for r in drift_eval.reanchor_rows(name, sg, angle_b, ns, clean, drifted, fixed):
        reanchor.append(dict(point=pt, **r))
  return dict(alarm=alarm, detect=detect, reanchor=reanchor)
