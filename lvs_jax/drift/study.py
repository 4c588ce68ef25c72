"""Drift studies: sweeps of a probe over drift magnitude, the cliff, the alarm's power, re-anchoring.
The loops behind `experiments/drift.py` (lvs_jax.drift.section shows their results), over the kernels in
`lvs_jax.drift.families`, `lvs_jax.drift.alarm`, `lvs_jax.drift.probes` and `lvs_jax.drift.metrics`.

Conventions: embeddings are unit-normalized rows; sigma is the norm convention of `lvs_jax.drift.families`
(sigma = 0.02 turns a vector by ~1.15 degrees); every curve is also given against the measured mean
angle in degrees, so conventions cannot confuse readers. A "repeat" redraws the drift (noise,
direction, subspace) from a new key. Families: those of `lvs_jax.drift.families` plus "subspace_pca", the
subspace rotation confined to the span of the data's top-k principal directions (where a random
k-subspace of a 576-dimensional space barely touches what the probe uses, this one does).

  cliff sigma      the smallest sigma at which the mean ROC-AUC first falls below a threshold
                   (default: halfway from the clean AUC to chance, 0.5 + (AUC_clean - 0.5) / 2),
                   interpolated linearly in log sigma between grid points. ROC-AUC is computed on
                   the logits (calibrated probabilities saturate to ties in float32)
  bacc cliff       the same for the balanced accuracy at threshold 0.5 (halfway from clean to 0.5):
                   a drift that shifts every score alike keeps the AUC and breaks the threshold
  detection sigma  the smallest sigma at which the alarm fires on at least `power` (0.9) of the
                   incoming windows, interpolated the same way
  recovery         (AUC_reanchored - AUC_drifted) / (AUC_clean - AUC_drifted)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.drift import alarm as drift_alarm
from lvs_jax.drift import families as drift
from lvs_jax.drift import metrics, probes
from lvs_jax.evals import stats

METRICS = ("auc", "accuracy", "balanced_accuracy", "confidence", "silent_failure_rate", "silent_share", "ece",
           "error_confidence")


def evaluate(probe: probes.Probe, x, y, silent_threshold: float = 0.8) -> dict[str, float]:
  """Classification metrics of `probe` on x [N, D], y [N] -> {name: float} (see `metrics`; AUC of the logits)."""
  f = probes.logits(probe, jnp.asarray(x))
  m = metrics.classification_metrics(jax.nn.sigmoid(f), jnp.asarray(y), silent_threshold, scores=f)
  return {k: float(v) for k, v in m.items()}


FAMILY_IDS = {"isotropic": 0, "directional": 1, "subspace": 2, "subspace_pca": 3, None: 4}
SWEEP_FAMILIES = ("isotropic", "directional", "subspace", "subspace_pca")


def _drifted(fid, key, x, sigma, k: int, convention: str, pca_basis):
  """`drift.apply_drift(drift.make_drift(family, k1, D, k=k), k2, x, sigma)` with (k1, k2) = split(key),
  for the family with id `fid` (traced: one compilation serves every family; 4 = no drift).
  subspace_pca: the subspace is span(pca_basis [D, k]) (the data's top principal directions), with
  randomly drawn rotation planes inside it."""
  k1, k2 = jax.random.split(key)
  d = x.shape[-1]
  return jax.lax.switch(fid, [
    lambda: drift.isotropic(k2, x, sigma, convention),
    lambda: drift.directional(x, sigma, drift.random_direction(k1, d)),
    lambda: drift.subspace_rotation(x, sigma, drift.random_basis(k1, d, k)),
    lambda: drift.subspace_rotation(x, sigma, pca_basis @ drift.random_basis(k1, k, k)),
    lambda: x,
  ])


def _fid(family) -> int:
  if family not in FAMILY_IDS:
    raise ValueError(f"unknown drift family {family!r}; expected one of {SWEEP_FAMILIES} (or None: no drift)")
  return FAMILY_IDS[family]


def _basis(pca_basis, d: int, k: int):
  return jnp.zeros((d, k), jnp.float32) if pca_basis is None else jnp.asarray(pca_basis, jnp.float32)


@functools.partial(jax.jit, static_argnames=("convention", "k"))
def _sweep(probe, x, y, sigmas, keys, silent_threshold, fid, pca_basis, convention, k):
  def one(sigma, kk):
    xd = _drifted(fid, kk, x, sigma, k, convention, pca_basis)
    f = probes.logits(probe, xd)
    m = metrics.classification_metrics(jax.nn.sigmoid(f), y, silent_threshold, scores=f)
    m["angle"] = jnp.mean(metrics.angle_deg(x, xd))
    return m

  return jax.lax.map(lambda a: jax.vmap(one, (None, 0))(*a), (sigmas, keys))  # {name: [S, R]}


def sweep_family(probe: probes.Probe, x, y, family: str, sigmas: Sequence[float], key: jax.Array, *,
                 repeats: int = 8, k: int = 64, convention: str = "norm", silent_threshold: float = 0.8,
                 common: bool = True, pca_basis=None) -> dict[str, np.ndarray]:
  """Metrics of `probe` on x [N, D], y [N] drifted by `family` at each sigma -> {name: [S]}.

  Means over `repeats` draws of the drift; "<name>_std" their std; "angle" the mean angle (degrees)
  between drifted and clean rows. silent_failure_rate and error_confidence average over the draws
  that have errors (nan where none has). common: the same draws at every sigma (common random
  numbers: smooth curves); else fresh draws per sigma (pooled estimates at repeated sigmas).
  family: one of SWEEP_FAMILIES; "subspace_pca" needs pca_basis [D, k] (`drift.principal_basis`).
  """
  s = len(sigmas)
  keys = jax.random.split(key, repeats)
  keys = jnp.broadcast_to(keys, (s,) + keys.shape) if common else jax.random.split(key, s * repeats).reshape(s, repeats)
  out = _sweep(probe, jnp.asarray(x), jnp.asarray(y), jnp.asarray(sigmas, jnp.float32), keys,
               jnp.float32(silent_threshold), _fid(family), _basis(pca_basis, np.shape(x)[-1], k), convention, k)
  res = {"sigma": np.asarray(sigmas, np.float64)}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-nan rows (no errors at any draw)
    for name, v in out.items():
      v = np.asarray(v, np.float64)
      res[name] = np.nanmean(v, 1)
      res[name + "_std"] = np.nanstd(v, 1)
  return res


def at_sigma(probe: probes.Probe, x, y, family: str, sigma: float, n_grid: int, key: jax.Array, *, repeats: int = 8,
             **kw) -> dict[str, float]:
  """Metrics at one sigma pooled over n_grid * repeats fresh drift draws (reuses the sweep's compilation
  for a grid of n_grid sigmas)."""
  r = sweep_family(probe, x, y, family, [sigma] * n_grid, key, repeats=repeats, common=False, **kw)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return {k: float(np.nanmean(v)) for k, v in r.items() if not k.endswith("_std")}


def crossing(xs: Sequence[float], ys: Sequence[float], level: float, below: bool = True) -> float:
  """The smallest x where ys first crosses `level` (goes below it, or above when below=False),
  interpolated linearly in log x between the grid points around the crossing (linearly in x from
  x = 0). nan when ys never crosses within the grid; xs[0] when ys[0] is already past it."""
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  past = ys < level if below else ys >= level
  idx = np.flatnonzero(past)
  if idx.size == 0:
    return float("nan")
  i = int(idx[0])
  if i == 0:
    return float(xs[0])
  x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
  t = 0.5 if y1 == y0 else float(np.clip((level - y0) / (y1 - y0), 0.0, 1.0))
  if x0 > 0:
    return float(math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0))))
  return float(x0 + t * (x1 - x0))


def cliff_threshold(clean_auc: float, threshold: float | None = None) -> float:
  """The AUC level defining the cliff: `threshold`, or halfway from `clean_auc` to chance."""
  return float(threshold) if threshold else 0.5 + (clean_auc - 0.5) / 2


@functools.partial(jax.jit, static_argnames=("convention", "k", "window", "statistics", "n_perm"))
def _power(ref, pool_ref, pool_new, sigmas, keys, alpha, fid, pca_basis, convention, k, window, statistics, n_perm):
  p = pool_ref.shape[0]

  def one(sigma, kk):
    kp, kd, kt = jax.random.split(kk, 3)
    perm = jax.random.permutation(kp, p)
    xr, xn = pool_ref[perm[:window]], pool_new[perm[window:2 * window]]
    xn = _drifted(fid, kd, xn, sigma, k, convention, pca_basis)
    return jnp.stack([drift_alarm.two_sample_test(kt, ref, xr, xn, st, n_perm)[1] <= alpha for st in statistics])

  return jax.lax.map(lambda a: jnp.mean(jax.vmap(one, (None, 0))(*a).astype(jnp.float32), 0), (sigmas, keys))


def alarm_power(key: jax.Array, ref: drift_alarm.Reference, pool, sigmas: Sequence[float], *,
                family: str | None, pool_new=None, statistics: Sequence[str] = drift_alarm.STATISTICS,
                alpha: float = 0.05, window: int = 64, n_windows: int = 100, n_perm: int = 200, k: int = 64,
                convention: str = "norm", common: bool = True, pca_basis=None) -> dict[str, np.ndarray]:
  """Share of incoming windows on which the alarm fires, per statistic and sigma -> {statistic: [S]}.

  Each window: a random reference window of `window` rows of pool [P, D] and a disjoint incoming
  window of `window` rows of pool_new (default: pool; for real drift, the same prompts embedded by
  the new model), the incoming one drifted by `family` at sigma (family None: not drifted). At
  sigma = 0 (or pool_new = pool, family None) this is the false-alarm rate. Needs P >= 2 window.
  All statistics see the same windows and permutations. common: the same windows at every sigma;
  else fresh ones (e.g. with sigma all 0: S * n_windows windows).
  """
  pool = jnp.asarray(pool)
  pool_new = pool if pool_new is None else jnp.asarray(pool_new)
  if pool.shape[0] < 2 * window:
    raise ValueError(f"alarm windows of {window} need a pool of >= {2 * window} rows, got {pool.shape[0]}")
  s = len(sigmas)
  keys = jax.random.split(key, n_windows)
  keys = jnp.broadcast_to(keys, (s,) + keys.shape) if common else jax.random.split(key, s * n_windows).reshape(
    s, n_windows)
  out = np.asarray(_power(ref, pool, pool_new, jnp.asarray(sigmas, jnp.float32), keys, jnp.float32(alpha),
                          _fid(family), _basis(pca_basis, pool.shape[-1], k), convention, k, window,
                          tuple(statistics), n_perm), np.float64)
  return {st: out[:, i] for i, st in enumerate(statistics)}


@functools.partial(jax.jit, static_argnames=("repeats",))
def _reanchor(probe, anchors_a, anchors_b, test_b, y, key, identity_prior, n, repeats):
  def one(kk):
    chosen = (jnp.argsort(jax.random.permutation(kk, anchors_a.shape[0])) < n).astype(jnp.float32)
    a = drift.fit_procrustes(anchors_b, anchors_a, identity_prior=identity_prior, weights=chosen)
    f = probes.logits(probe, drift.apply_alignment(a, test_b))
    return jnp.stack([metrics.roc_auc(f, y), metrics.balanced_accuracy(jax.nn.sigmoid(f), y)])

  return jnp.mean(jax.vmap(one)(jax.random.split(key, repeats)), 0)


def reanchor_scores(key: jax.Array, probe: probes.Probe, anchors_a, anchors_b, test_b, y_test, n_anchors: Sequence[int],
                    *, repeats: int = 4, identity_prior: float = 1e-4) -> dict[str, np.ndarray]:
  """ROC-AUC and balanced accuracy of `probe` on test_b [N, D] mapped back by Procrustes fitted on n
  random anchors (rows of anchors_a / anchors_b [P, D]: the same prompts embedded by the probe's
  model and by the new one), for each n in n_anchors (<= P) -> {"auc", "balanced_accuracy":
  [len(n_anchors)]}, means over `repeats` anchor draws."""
  args = [jnp.asarray(a) for a in (anchors_a, anchors_b, test_b, y_test)]
  out = []
  for n in n_anchors:
    if n > args[0].shape[0]:
      raise ValueError(f"{n} anchors requested, only {args[0].shape[0]} available")
    out.append(np.asarray(_reanchor(probe, *args, key, jnp.float32(identity_prior), jnp.int32(n), repeats)))
  out = np.asarray(out, np.float64).reshape(len(out), 2)
  return {"auc": out[:, 0], "balanced_accuracy": out[:, 1]}


def recovery(clean: float, drifted: float, fixed: float) -> float:
  """(fixed - drifted) / (clean - drifted): the share of the lost AUC won back (nan if none was lost)."""
  lost = clean - drifted
  return float((fixed - drifted) / lost) if lost > 1e-6 else float("nan")


# --- A whole study -------------------------------------------------------------------------------


def fit_probes(key, x_fit, y_fit, x_val, y_val, cfg) -> tuple[dict, dict]:
  """The study's probes -> ({name: Probe}, {name: info}): "logreg", "mlp" (cfg.probe.mlp) and
  "<main>_aug", the main probe trained with isotropic noise augmentation at cfg.augment.sigma
  (skipped when 0; `run_synthetic` sets it from the clean cliff when cfg.augment.sigma < 0 is not
  used). cfg: the probe section of the experiment config (ml_collections or any attribute object)."""
  out, info = {}, {}
  kinds = ["logreg"] + (["mlp"] if cfg.mlp else [])
  for kind in kinds:
    pc = probes.ProbeConfig(kind=kind, hidden=cfg.hidden, lr=cfg.lr, max_steps=cfg.max_steps, patience=cfg.patience)
    out[kind], info[kind] = probes.fit_select(key, jnp.asarray(x_fit), jnp.asarray(y_fit), jnp.asarray(x_val),
                                              jnp.asarray(y_val), pc, tuple(cfg.l2s))
  return out, info


def isotropic_margin(probe: probes.Probe, x, y, level: float) -> dict[str, float]:
  """Why (and where) isotropic drift breaks a linear probe: a binormal model of its scores.

  For a logistic probe the score is w_u . u + b on unit rows u (w_u = w / std folds the
  standardization in). Project the unit rows onto w_hat = w_u / ||w_u||: class means m_1, m_0 and
  stds s_1, s_0 (in units of the unit sphere, ~ radians). Isotropic noise of norm sigma adds
  N(0, sigma^2 / D) along w_hat (renormalization rescales every score alike, which AUC ignores), so
      AUC(sigma) ~ Phi((m_1 - m_0) / sqrt(s_1^2 + s_0^2 + 2 sigma^2 / D)),
  and the AUC reaches `level` at sigma* = sqrt(D / 2 ((m_1 - m_0)^2 / z^2 - s_1^2 - s_0^2)),
  z = Phi^-1(level). Returns {gap_deg, spread_deg (pooled within-class std), binormal_auc (at sigma
  0), predicted_cliff_sigma, dim}; nan for non-linear probes.
  """
  from jax.scipy.stats import norm

  if probe.kind != "logreg":
    return dict(gap_deg=float("nan"), spread_deg=float("nan"), binormal_auc=float("nan"),
                predicted_cliff_sigma=float("nan"), dim=int(np.shape(x)[-1]))
  w = np.asarray(probe.params["w"] / probe.std, np.float64)
  w /= np.linalg.norm(w)
  u = np.asarray(stats.unit(jnp.asarray(x)), np.float64)
  proj, yb = u @ w, np.asarray(y).astype(bool)
  gap = proj[yb].mean() - proj[~yb].mean()
  var = proj[yb].var() + proj[~yb].var()
  z = float(norm.ppf(level))
  d = u.shape[1]
  inside = gap ** 2 / z ** 2 - var
  return dict(gap_deg=math.degrees(gap), spread_deg=math.degrees(math.sqrt(var / 2)),
              binormal_auc=float(norm.cdf(gap / math.sqrt(var))),
              predicted_cliff_sigma=math.sqrt(d / 2 * inside) if inside > 0 else 0.0, dim=d)


def cliff_row(probe, name: str, fam: str, per: dict, clean: dict, sigmas, angle, power: dict, key, x_test, y_test,
              cfg, kw: dict) -> dict:
  """One row of the cliffs table: probe `name` under family `fam` (its sweep `per`, clean metrics `clean`,
  the alarm's fire rates `power` per statistic): the AUC cliff, metrics at it, the balanced-accuracy cliff,
  the binormal prediction (isotropic) and the alarm's detection sigma. `key` draws the at-cliff drift."""
  sw, al = cfg.sweep, cfg.alarm
  thr = cliff_threshold(clean["auc"], sw.cliff_auc)
  cs = crossing(sigmas, per["auc"], thr)
  at = at_sigma(probe, x_test, y_test, fam, cs, len(sigmas), key, **kw) if math.isfinite(cs) else None
  row = dict(family=fam, probe=name, clean_auc=clean["auc"], threshold=thr, cliff_sigma=cs,
             cliff_angle_deg=at["angle"] if at else float("nan"), collapse_sigma=crossing(sigmas, per["auc"], 0.55))
  for m in ("auc", "accuracy", "confidence", "silent_failure_rate", "silent_share", "error_confidence", "ece"):
    row[f"{m}_at_cliff"] = at[m] if at else float("nan")
  row["confidence_drop"] = 1 - row["confidence_at_cliff"] / clean["confidence"]
  # Threshold failures: balanced accuracy halfway from clean to chance (AUC can stay intact,
  # e.g. under a common shift, while the fixed threshold fails).
  bthr = 0.5 + (clean["balanced_accuracy"] - 0.5) / 2
  bs = crossing(sigmas, per["balanced_accuracy"], bthr)
  row["bacc_cliff_sigma"] = bs
  row["bacc_cliff_angle_deg"] = interp_log(sigmas, angle, bs)
  for m in ("balanced_accuracy", "confidence", "silent_failure_rate"):
    row[f"{m}_at_bacc_cliff"] = interp_log(sigmas, per[m], bs)
  pred = isotropic_margin(probe, x_test, y_test, thr) if fam == "isotropic" else {}
  row["predicted_cliff_sigma"] = pred.get("predicted_cliff_sigma", float("nan"))
  for st in al.statistics:
    ds = crossing(sigmas, power[st], al.power, below=False)
    row[f"detect_sigma_{st}"] = ds
    row[f"detect_angle_deg_{st}"] = interp_log(sigmas, angle, ds)
  return row


def _reanchor_at(fam: str, sg: float, key, probe, clean: dict, pca, anchors_a, x_test, y_test, cfg) -> list[dict]:
  """Re-anchoring rows of the main probe under one draw of family `fam` at sigma `sg`."""
  sw, ra = cfg.sweep, cfg.reanchor
  # One key per draw: drift basis/direction, test noise, anchor noise, the re-anchoring anchor draws.
  k0, k1, k2, k3, k4 = jax.random.split(key, 5)
  basis = pca @ drift.random_basis(k0, sw.subspace_k, sw.subspace_k) if fam == "subspace_pca" else None
  dr = drift.make_drift(fam.removesuffix("_pca"), k1, x_test.shape[1], k=sw.subspace_k, convention=sw.convention,
                        basis=basis)
  test_b, anchors_b = drift.apply_drift(dr, k2, jnp.asarray(x_test), sg), drift.apply_drift(dr, k3, anchors_a, sg)
  ns = [n for n in ra.n_anchors if n <= len(anchors_a)]
  fixed = reanchor_scores(k4, probe, anchors_a, anchors_b, test_b, y_test, ns, repeats=ra.repeats,
                          identity_prior=ra.identity_prior)
  angle_b = float(jnp.mean(metrics.angle_deg(jnp.asarray(x_test), test_b)))
  return reanchor_rows(fam, sg, angle_b, ns, clean, evaluate(probe, test_b, y_test), fixed)


def run_synthetic(key, x_fit, y_fit, x_val, y_val, x_test, y_test, cfg) -> dict:
  """Probes, drift sweeps of every synthetic family, cliffs, the alarm, re-anchoring and the
  noise-augmentation baseline on unit-normalized embeddings -> a results dict (JSON-able after
  `report.to_jsonable`). cfg: the experiment config (sections probe, sweep, alarm, reanchor, augment)."""
  sw, al, ra, au = cfg.sweep, cfg.alarm, cfg.reanchor, cfg.augment
  keys = jax.random.split(key, 8)
  pr, pinfo = fit_probes(keys[0], x_fit, y_fit, x_val, y_val, cfg.probe)
  main = cfg.probe.main
  sigmas = np.asarray(sw.sigmas, np.float64)
  pca = drift.principal_basis(jnp.asarray(x_fit), sw.subspace_k)
  kw = dict(repeats=sw.repeats, k=sw.subspace_k, convention=sw.convention, silent_threshold=sw.silent_threshold,
            pca_basis=pca)
  clean = {p: evaluate(pr[p], x_test, y_test, sw.silent_threshold) for p in pr}
  # The augmentation level: given, or the main probe's isotropic cliff.
  iso = sweep_family(pr[main], x_test, y_test, "isotropic", sigmas, keys[1], **kw)
  aug_sigma = au.sigma or crossing(sigmas, iso["auc"], cliff_threshold(clean[main]["auc"], sw.cliff_auc))
  if au.copies and math.isfinite(aug_sigma):
    k_noise, k_init = jax.random.split(keys[2])  # the augmentation noise and the probe's init: independent
    xa, ya = probes.augment_isotropic(k_noise, jnp.asarray(x_fit), jnp.asarray(y_fit), aug_sigma, au.copies,
                                      sw.convention)
    pc = probes.ProbeConfig(kind=main, hidden=cfg.probe.hidden, lr=cfg.probe.lr, max_steps=cfg.probe.max_steps,
                            patience=cfg.probe.patience)
    pr[f"{main}_aug"], pinfo[f"{main}_aug"] = probes.fit_select(k_init, xa, ya, jnp.asarray(x_val), jnp.asarray(y_val),
                                                                pc, tuple(cfg.probe.l2s))
    clean[f"{main}_aug"] = evaluate(pr[f"{main}_aug"], x_test, y_test, sw.silent_threshold)
  ref = drift_alarm.fit_reference(jnp.asarray(x_fit), k=al.k)
  akw = dict(alpha=al.alpha, window=al.window, n_perm=al.n_perm, k=sw.subspace_k, convention=sw.convention,
             statistics=tuple(al.statistics), n_windows=al.n_windows, pca_basis=pca)
  zeros = np.zeros_like(sigmas)  # same shape as the sweeps: no recompilation; S * n_windows fresh windows
  far = {st: float(np.mean(v)) for st, v in alarm_power(keys[3], ref, x_test, zeros, family=None, common=False,
                                                         **akw).items()}
  families, cliffs, reanchor = {}, [], []
  n_pool = min(ra.n_pool, len(x_fit))
  anchors_a = jnp.asarray(x_fit[:n_pool])
  for fi, fam in enumerate(sw.families):
    fk = jax.random.fold_in(keys[4], fi)
    per = {p: sweep_family(pr[p], x_test, y_test, fam, sigmas, fk, **kw) for p in pr}
    angle = per[main]["angle"]
    power = alarm_power(fk, ref, x_test, sigmas, family=fam, **akw)
    families[fam] = dict(sigma=sigmas, angle=angle, probes={p: {m: per[p][m] for m in METRICS + ("auc_std",)}
                                                             for p in pr}, alarm=power)
    cliffs += [cliff_row(pr[p], p, fam, per[p], clean[p], sigmas, angle, power, jax.random.fold_in(fk, 1), x_test,
                         y_test, cfg, kw) for p in pr]
    row = next(r for r in cliffs if r["family"] == fam and r["probe"] == main)
    cs = row["cliff_sigma"] if math.isfinite(row["cliff_sigma"]) else row["bacc_cliff_sigma"]
    for mult in ra.cliff_multiples if math.isfinite(cs) else ():
      reanchor += _reanchor_at(fam, cs * mult, jax.random.fold_in(fk, 7), pr[main], clean[main], pca, anchors_a,
                               x_test, y_test, cfg)
  margin = isotropic_margin(pr[main], x_test, y_test, cliff_threshold(clean[main]["auc"], sw.cliff_auc))
  return dict(clean=clean, probe_info=pinfo, families=families, cliffs=cliffs, reanchor=reanchor, margin=margin,
              alarm=dict(false_alarm_rate=far, reference=ref), augment_sigma=aug_sigma, probes=pr)


def reanchor_rows(source, magnitude, angle, ns, clean: dict, drifted: dict, fixed: dict) -> list[dict]:
  """Rows of the re-anchoring table: AUC and balanced accuracy clean / drifted / re-anchored, recovery."""
  rows = []
  for i, n in enumerate(ns):
    a, b = float(fixed["auc"][i]), float(fixed["balanced_accuracy"][i])
    rows.append(dict(source=source, magnitude=magnitude, angle_deg=angle, n_anchors=n, auc_clean=clean["auc"],
                     auc_drifted=drifted["auc"], auc_reanchored=a, recovery=recovery(clean["auc"], drifted["auc"], a),
                     bacc_clean=clean["balanced_accuracy"], bacc_drifted=drifted["balanced_accuracy"],
                     bacc_reanchored=b, bacc_recovery=recovery(clean["balanced_accuracy"],
                                                               drifted["balanced_accuracy"], b)))
  return rows


def interp_log(sigmas, values, s):
  """values [S] at sigma s, linear in log sigma over the positive grid (nan for s = nan)."""
  if not math.isfinite(s):
    return float("nan")
  sg, v = np.asarray(sigmas, float), np.asarray(values, float)
  keep = sg > 0
  if s <= 0 or not keep.any():
    return float(v[0])
  return float(np.interp(math.log(s), np.log(sg[keep]), v[keep]))


def run_real(key, name, magnitude, x_test, y_test, x_test_b, anchors_a, anchors_b, syn: dict, cfg) -> tuple[dict, list]:
  """Real drift of one source: the study's probes (from `run_synthetic`'s result `syn`) evaluated on
  x_test_b [N, D] (the test prompts embedded by the changed model), the alarm's fire rate on its
  windows, and re-anchoring from anchors_a / anchors_b [P, D] -> (row, re-anchoring rows)."""
  al, ra, sw = cfg.alarm, cfg.reanchor, cfg.sweep
  main = cfg.probe.main
  angle = float(jnp.mean(metrics.angle_deg(jnp.asarray(x_test), jnp.asarray(x_test_b))))
  row = dict(source=name, magnitude=magnitude, angle_deg=angle, equivalent_sigma=float(drift.equivalent_sigma(angle)))
  for p, probe in syn["probes"].items():
    m = evaluate(probe, x_test_b, y_test, sw.silent_threshold)
    for k in ("auc", "accuracy", "balanced_accuracy", "confidence", "silent_failure_rate"):
      row[f"{p}_{k}"] = m[k]
  zeros = np.zeros(len(sw.sigmas))  # the sweeps' shape: no recompilation
  k_alarm, k_anchor = jax.random.split(key)  # the alarm's windows and the anchor draws: independent
  fired = alarm_power(k_alarm, syn["alarm"]["reference"], x_test, zeros, family=None, pool_new=x_test_b,
                      statistics=tuple(al.statistics), alpha=al.alpha, window=al.window, n_windows=al.n_windows,
                      n_perm=al.n_perm, k=sw.subspace_k, convention=sw.convention, common=False)
  for st, v in fired.items():
    row[f"alarm_{st}"] = float(np.mean(v))
  ns = [n for n in ra.n_anchors if n <= len(anchors_a)]
  fixed = reanchor_scores(k_anchor, syn["probes"][main], anchors_a, anchors_b, x_test_b, y_test, ns, repeats=ra.repeats,
                          identity_prior=ra.identity_prior)
  rows = reanchor_rows(name, magnitude, angle, ns, syn["clean"][main],
                       evaluate(syn["probes"][main], x_test_b, y_test, sw.silent_threshold), fixed)
  row[f"{main}_auc_reanchored"] = float(fixed["auc"][-1]) if ns else float("nan")
  row[f"{main}_bacc_reanchored"] = float(fixed["balanced_accuracy"][-1]) if ns else float("nan")
  return row, rows
