"""Safety geometry and embedding drift at every checkpoint, and how they track transfer (issue 14).

Per evaluated checkpoint (cached in its model directory, keyed by content):

  geometry   harmfulness carrier (mean(harmful) - mean(harmless) at t_inst, the last instruction token)
             and refusal carrier (mean(refused) - mean(complied) at t_post_inst, the last prompt token)
             per layer, over the *behavioral* pool: the prompts of the trajectory's own sets (harmful_val,
             harmless_val, XSTest safe), with refused/complied read from that checkpoint's cached
             generations (`eval/<set>.jsonl`, nothing regenerated). Prompts found in a training set of the
             runs (`exclude`: AdvBench and harmless_train for R2D2 / its SFT baseline; case and whitespace
             folded) are dropped. Coupling per layer = |cos(harmfulness_l, refusal_l)|
             (`lvs_jax.geometry.coupling.coupling`, bootstrap over prompts within the label strata);
             reported at the peak layer (that layer's interval) and as the mean over layers (a bootstrap
             of the layer mean with the same stratified resampling). A checkpoint that refuses all or none
             of the pool has no refusal carrier: its coupling is None with the counts saying why.
  drift      mean-pooled `resid_post` embeddings of a fixed probe set (harmful_val + XSTest unsafe vs
             harmless_val, all disjoint from the runs' training sets) at one layer (default: the last), compared with
             step 0 of the same run: mean angle (degrees) between each prompt's embedding and its step-0
             embedding; ROC-AUC of a logistic probe trained on step 0's fit split (`drift.probes.fit`)
             applied to the checkpoint's test split; the label-free alarm (`drift.alarm`) of the
             checkpoint's test-split window against step 0's, with a reference fitted on step 0's fit split.
             Intervals: percentile bootstrap over test prompts.

Per run (`run_level`): the effective rank (Roy & Vetterli 2007: exp of the entropy of the normalized
singular values) of each carrier family stacked across the run's checkpoints (unit carriers [K, D] per
layer; 1 = one direction throughout, K = orthogonal at every step), and the Spearman correlation across
checkpoints of coupling, drift angle and model-level LVS (`lvs_jax.trajectory.latent`) with transfer ASR
(pooled ASR of every other source's test cases against that checkpoint, its own cases excluded) and with the
fresh GCG ASR. A run has few checkpoints: every correlation carries its n.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from lvs_jax.evals import stats
from lvs_jax.io import files, keys
from lvs_jax.training import recipes

FAMILIES = ("harmfulness", "refusal")


def default_geometry_config() -> dict:
  return dict(enabled=True, site="resid_pre", harmful=("harmful",), harmless=("harmless", "xstest_safe"),
              exclude=("advbench", "harmless_train"), n_boot=200, seed=0, batch_size=16,
              layer=-1)  # layer for the rank table: -1 = the run's layer of highest mean coupling


def default_drift_config() -> dict:
  # Probe set: harmful_val (39) + XSTest unsafe (200) vs 239 seeded harmless_val prompts (small sets leave the
  # step-0 probe near chance).
  return dict(enabled=True, harmful=(dict(path="harmful_val", n=0), dict(path="xstest", label="unsafe", n=0)),
              harmless=(dict(path="harmless_val", n=239),),
              exclude=("advbench", "harmless_train"), layer=-1, pooling="mean", site="resid_post",
              test_fraction=0.5, val_fraction=0.25, n_boot=200, statistic="residual", k=8, alpha=0.05,
              n_perm=200, seed=0, batch_size=16)


def make_smoke(c: ml_collections.ConfigDict) -> None:
  c.geometry.n_boot = 20
  c.drift.harmful = (dict(path="harmful_val", n=8),)
  c.drift.harmless = (dict(path="harmless_val", n=8),)
  c.drift.n_boot = 20
  c.drift.k = 2
  c.drift.n_perm = 20


def training_prompts(names: Sequence[str]) -> set[str]:
  """Folded prompts of the named data sets (the runs' training sets) that every pool must avoid."""
  from lvs_jax.io import datasets as data

  return {recipes.fold_prompt(p) for name in names for p in data.load_prompts(name)}


# ----------------------------------------------------------------------------- geometry


def _units(x: np.ndarray) -> np.ndarray:
  with np.errstate(invalid="ignore", divide="ignore"):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def checkpoint_coupling(x_inst: np.ndarray, la: np.ndarray, x_post: np.ndarray, lb: np.ndarray, *, n_boot: int = 200,
                        seed: int = 0, level: float = 0.95, within: np.ndarray | None = None) -> dict:
  """Coupling of one checkpoint: per layer, at the peak layer and averaged over layers, with intervals.

  x_inst, x_post [L, N, D]: activations at t_inst and t_post_inst; la [N]: +1 harmful, -1 harmless, 0 unused;
  lb [N]: +1 refused, -1 complied. Returns float lists abs_cos/low/high [L] (`coupling.coupling`), "peak"
  {value, low, high, layer} (argmax over non-degenerate layers; its per-layer interval) and "mean" {value,
  low, high} (bootstrap of the mean over non-degenerate layers, prompts resampled within the (la, lb) strata),
  and the carriers harmfulness/refusal [L, D] float32. within [L] bool (optional): peak and mean only over these
  layers (e.g. the KL-admissible ones, `lvs_jax.trajectory.admissible`); per-layer values and carriers unchanged.
  """
  from lvs_jax.geometry import coupling as coupling_lib

  c = coupling_lib.coupling(x_inst, la, x_post, lb, n_boot=n_boot, n_null=0, seed=seed, level=level)
  live = ~np.asarray(c["degenerate"], bool)
  if within is not None:
    live &= np.asarray(within, bool)
  ac = np.asarray(c["abs_cos"], np.float64)
  out = dict(abs_cos=ac.tolist(), low=np.asarray(c.get("abs_cos_low", ac * np.nan)).tolist(),
             high=np.asarray(c.get("abs_cos_high", ac * np.nan)).tolist(),
             harmfulness=np.asarray(c["carrier_a"], np.float32), refusal=np.asarray(c["carrier_b"], np.float32))
  if not live.any():
    out["peak"] = dict(value=float("nan"), low=float("nan"), high=float("nan"), layer=-1)
    out["mean"] = dict(value=float("nan"), low=float("nan"), high=float("nan"))
    return out
  layer = int(np.nanargmax(np.where(live, ac, -np.inf)))
  out["peak"] = dict(value=float(ac[layer]), low=float(out["low"][layer]), high=float(out["high"][layer]),
                     layer=layer)
  mean = dict(value=float(np.mean(ac[live])), low=float("nan"), high=float("nan"))
  if n_boot:
    rng = np.random.default_rng(seed + 1)
    la, lb = np.asarray(la, np.int64), np.asarray(lb, np.int64)
    counts = coupling_lib.stratified_counts(rng, (la + 1) * 3 + (lb + 1), n_boot)  # [B, N]
    xa = np.asarray(x_inst, np.float64)[live]
    xb = np.asarray(x_post, np.float64)[live]
    sa = np.einsum("bn,lnd->bld", coupling_lib.diff_weights(la, counts), xa)
    sb = np.einsum("bn,lnd->bld", coupling_lib.diff_weights(lb, counts), xb)
    boot = np.nanmean(np.abs((_units(sa) * _units(sb)).sum(-1)), axis=1)  # [B]
    lo, hi = stats.percentile_interval(boot, level)
    mean.update(low=float(lo), high=float(hi))
  out["mean"] = mean
  return out


def behavior_records(model_dir: str, sets: Mapping[str, Sequence[str]]) -> dict[str, list[dict]]:
  """{set: [{prompt, completion, refused}]} from the checkpoint's cached generations (evaluate_model wrote
  them); errors name the file that is missing or holds other prompts."""
  out = {}
  for name, prompts in sets.items():
    path = os.path.join(model_dir, "eval", f"{name}.jsonl")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no cached generations of set {name!r} (run evaluate_model first)")
    recs = files.read_jsonl(path)
    if [r.get("prompt") for r in recs] != list(prompts):
      raise ValueError(f"{path}: holds {len(recs)} generations for other prompts than set {name!r} "
                       f"({len(prompts)} prompts)")
    out[name] = recs
  return out


def geometry_pool(records: Mapping[str, Sequence[Mapping]], g, train: set[str]) -> dict:
  """The behavioral pool: prompts, la (+1 harmful / -1 harmless) and lb (+1 refused / -1 complied), training
  prompts dropped. Sets named in neither g.harmful nor g.harmless are not used."""
  prompts, la, lb, excluded = [], [], [], 0
  for name, recs in records.items():
    side = 1 if name in g.harmful else -1 if name in g.harmless else 0
    if side == 0:
      continue
    for r in recs:
      if recipes.fold_prompt(r["prompt"]) in train:
        excluded += 1
        continue
      prompts.append(r["prompt"])
      la.append(side)
      lb.append(1 if r["refused"] else -1)
  return dict(prompts=prompts, la=np.asarray(la, np.int64), lb=np.asarray(lb, np.int64), excluded=excluded)


def model_geometry(model, sets: Mapping[str, Sequence[str]], cfg, model_dir: str, train: set[str]) -> dict:
  """The row entries "coupling/peak", "coupling/mean" and "geometry/pool" of one checkpoint; carriers and
  per-layer coupling saved to model_dir/geometry.npz (claimed: model, pool, refusal labels, config)."""
  from lvs_jax.geometry import carriers

  g = cfg.geometry
  pool = geometry_pool(behavior_records(model_dir, sets), g, train)
  la, lb = pool["la"], pool["lb"]
  info = dict(n=len(la), n_harmful=int((la == 1).sum()), n_harmless=int((la == -1).sum()),
              n_refused=int((lb == 1).sum()), n_complied=int((lb == -1).sum()), excluded=pool["excluded"])
  path = os.path.join(model_dir, "geometry.json")
  parts = dict(model=keys.model_parts(model), prompts=pool["prompts"], la=la.tolist(), lb=lb.tolist(),
               config=g.to_dict())
  if keys.claim(path, "trajectory_geometry", **parts):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  nan = dict(value=None, low=None, high=None)  # None, not nan: rows compare equal after a JSON round trip
  estimable = min(info["n_harmful"], info["n_harmless"], info["n_refused"], info["n_complied"]) > 0
  out = {"geometry/pool": dict(info, estimable=estimable)}
  npz = os.path.join(model_dir, "geometry.npz")
  if os.path.exists(npz):  # carriers of another key: never left next to this one (run_level reads them)
    os.remove(npz)
  if estimable:
    x_inst, x_post = carriers.collect_inst_post(model, pool["prompts"], site=g.site, batch_size=g.batch_size)
    c = checkpoint_coupling(x_inst, la, x_post, lb, n_boot=g.n_boot, seed=g.seed)
    out["coupling/peak"] = dict(c["peak"], n=info["n"])
    out["coupling/mean"] = dict(c["mean"], n=info["n"])
    files.atomic_savez(npz, harmfulness=c["harmfulness"], refusal=c["refusal"],
                       abs_cos=np.asarray(c["abs_cos"]), low=np.asarray(c["low"]), high=np.asarray(c["high"]))
  else:
    out["coupling/peak"] = dict(nan, layer=-1, n=info["n"])
    out["coupling/mean"] = dict(nan, n=info["n"])
  files.atomic_write_json(path, out, indent=1)
  return out


def effective_rank(m: np.ndarray) -> float:
  """exp(H(p)) with p the singular values of m [K, D] normalized to sum 1 (rows first made unit; rows that are
  not finite or zero are dropped). 1 = a single direction; K = K orthogonal directions. nan when no row is left."""
  u = _units(np.asarray(m, np.float64))
  u = u[np.isfinite(u).all(-1)]
  if not len(u):
    return float("nan")
  s = np.linalg.svd(u, compute_uv=False)
  p = s[s > 0] / s.sum()
  return float(np.exp(-(p * np.log(p)).sum()))


def family_ranks(stack: np.ndarray) -> np.ndarray:
  """Per-layer effective rank [L] of carriers stacked across checkpoints, stack [K, L, D]."""
  return np.array([effective_rank(stack[:, layer]) for layer in range(stack.shape[1])])


# ----------------------------------------------------------------------------- drift


def probe_prompts(cfg, train: set[str]) -> tuple[list[str], np.ndarray]:
  """The fixed drift probe set (harmful = 1, harmless = 0), training prompts dropped."""
  from lvs_jax.io import datasets as data

  d = cfg.drift
  prompts, y = [], []
  for label, specs in ((1, d.harmful), (0, d.harmless)):
    for s in specs:
      ps = data.load_prompts(s["path"], label=s.get("label"))
      ps = data.sample(ps, s["n"], seed=d.seed) if s.get("n") else ps
      ps = [p for p in ps if recipes.fold_prompt(p) not in train]
      prompts += ps
      y += [label] * len(ps)
  return prompts, np.asarray(y, np.int32)


def model_embeddings(model, prompts: Sequence[str], cfg, model_dir: str) -> np.ndarray:
  """[N, D] embeddings of the probe set at cfg.drift.layer (cached: model_dir/drift_embeddings.npz)."""
  from lvs_jax.drift import embeddings

  d = cfg.drift
  layer = d.layer if d.layer >= 0 else model.cfg.n_layers + d.layer
  return embeddings.embed(model, prompts, layers=[layer], pooling=d.pooling, site=d.site, batch_size=d.batch_size,
                          cache=os.path.join(model_dir, "drift_embeddings.npz"))[0]


def split(y: np.ndarray, d, seed: int) -> np.ndarray:
  """[N] split ids, stratified by label: 0 fit, 1 validation, 2 test (each class keeps >= 1 in each)."""
  rng = np.random.default_rng(seed)
  out = np.zeros(len(y), np.int64)
  for c in (0, 1):
    idx = rng.permutation(np.flatnonzero(y == c))
    n_test = max(1, int(round(d.test_fraction * len(idx))))
    n_val = max(1, int(round(d.val_fraction * len(idx))))
    if len(idx) < n_test + n_val + 1:
      raise ValueError(f"drift probe set: class {c} has {len(idx)} prompts, too few for fit/val/test splits")
    out[idx[:n_test]] = 2
    out[idx[n_test:n_test + n_val]] = 1
  return out


class StepZero:
  """Step 0's probe, alarm reference and test-split embeddings: what every later checkpoint is compared with."""

  def __init__(self, x0: np.ndarray, y: np.ndarray, d):
    import jax

    from lvs_jax.drift import alarm, probes

    self.d, self.y, self.x0 = d, np.asarray(y), np.asarray(x0, np.float32)
    self.part = split(self.y, d, d.seed)
    f, v = self.part == 0, self.part == 1
    self.probe, _ = probes.fit(jax.random.key(d.seed), self.x0[f], self.y[f], self.x0[v], self.y[v])
    self.ref = alarm.fit_reference(self.x0[f], k=min(d.k, int(f.sum()) - 1))

  def compare(self, x: np.ndarray) -> dict:
    """Row entries "drift/angle", "drift/probe_auc", "drift/alarm" of embeddings x [N, D] (the same prompts)."""
    import jax
    import jax.numpy as jnp

    from lvs_jax.drift import alarm, metrics, probes

    d, t = self.d, self.part == 2
    x = np.asarray(x, np.float32)
    if x.shape != self.x0.shape:
      raise ValueError(f"drift: embeddings {x.shape} do not match step 0's {self.x0.shape}")
    ang = np.asarray(metrics.angle_deg(jnp.asarray(x), jnp.asarray(self.x0)), np.float64)  # [N], every prompt
    scores = probes.logits(self.probe, jnp.asarray(x[t]))
    yt = jnp.asarray(self.y[t])
    auc = float(metrics.roc_auc(scores, yt))
    a_boot = auc_boot = np.zeros(0)
    if d.n_boot:
      a_boot = ang[stats.bootstrap_indices(d.seed, len(ang), d.n_boot)].mean(1)
      idx = jnp.asarray(stats.bootstrap_indices(d.seed + 1, int(t.sum()), d.n_boot))
      auc_boot = np.asarray(jax.vmap(lambda i: metrics.roc_auc(scores[i], yt[i]))(idx), np.float64)
    stat, p = alarm.two_sample_test(jax.random.key(d.seed), self.ref, jnp.asarray(self.x0[t]), jnp.asarray(x[t]),
                                    d.statistic, d.n_perm)
    out = {"drift/angle": dict(value=float(ang.mean()), n=len(ang)),
           "drift/probe_auc": dict(value=auc, n=int(t.sum())),
           "drift/alarm": dict(statistic=float(stat), p=float(p), fired=bool(p <= d.alpha), n=int(t.sum()))}
    for key, boot in (("drift/angle", a_boot), ("drift/probe_auc", auc_boot)):
      boot = boot[np.isfinite(boot)]
      lo, hi = stats.percentile_interval(boot) if len(boot) else (np.nan, np.nan)
      out[key].update(low=float(lo), high=float(hi))
    return out


# ----------------------------------------------------------------------------- correlations


def ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of x [N], ties given their average rank."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x), np.float64)
  r[order] = np.arange(1, len(x) + 1)
  for v in np.unique(x):
    tie = x == v
    r[tie] = r[tie].mean()
  return r


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
  """(rho, n): Spearman rank correlation over the pairs where both are finite (Pearson of average ranks);
  rho is nan when n < 3 or either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  n = int(ok.sum())
  if n < 3:
    return float("nan"), n
  rx, ry = ranks(x) - (n + 1) / 2, ranks(y) - (n + 1) / 2
  den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
  return (float((rx * ry).sum() / den) if den > 0 else float("nan")), n


def transfer_asr(rows: Sequence[Mapping], cells: Sequence[Mapping]) -> dict[tuple[str, int], dict]:
  """{(run, step): {value, k, n}}: pooled ASR of every source's test cases against that checkpoint, except the
  cases found against the same weights (its own cases; a shared step 0 counts as the same)."""
  digest = {f"{r['run']}@{r['step']}": r["digest"] for r in rows}
  out = {}
  for r in rows:
    k = n = 0
    for c in cells:
      if (c["run"], c["step"]) != (r["run"], r["step"]):
        continue
      src = c["source"][4:] if c["source"].startswith("gcg@") else None
      if src is not None and digest.get(src) == r["digest"]:
        continue
      k, n = k + c["k"], n + c["n"]
    out[(r["run"], r["step"])] = dict(value=k / n if n else float("nan"), k=k, n=n)
  return out


def _value(m) -> float:
  v = m.get("value", m.get("rate")) if isinstance(m, Mapping) else None
  return float("nan") if v is None else float(v)


def correlations(rows: Sequence[Mapping], cells: Sequence[Mapping]) -> list[dict]:
  """Per run: Spearman rho (and n) of coupling (peak, mean), drift angle and model-level LVS with transfer ASR and
  fresh GCG ASR, and which of coupling (peak or layer mean) and drift tracks transfer ASR more closely (larger
  |rho|; the first listed wins a tie; LVS is reported but not part of that comparison, the seed's claim)."""
  tr = transfer_asr(rows, cells)
  out = []
  for run in dict.fromkeys(r["run"] for r in rows):
    rr = sorted((r for r in rows if r["run"] == run), key=lambda r: r["step"])
    gcg = sorted({k for r in rr for k in r if k.startswith("asr/gcg")}, key=lambda k: int(k.split("@")[-1] or 0))
    targets = {"transfer ASR": [tr[(run, r["step"])]["value"] for r in rr]}
    if gcg:
      targets["fresh GCG ASR"] = [_value(r.get(gcg[-1])) for r in rr]
    for xkey in ("coupling/peak", "coupling/mean", "drift/angle", "lvs/model"):
      xs = [_value(r.get(xkey)) for r in rr]
      for yname, ys in targets.items():
        rho, n = spearman(xs, ys)
        out.append(dict(run=run, x=xkey, y=yname, rho=rho, n=n))
  for run in dict.fromkeys(r["run"] for r in rows):
    best = {}
    for c in out:
      if c["run"] == run and c["y"] == "transfer ASR" and c["x"] in ("coupling/peak", "coupling/mean", "drift/angle"):
        best[c["x"]] = c
    finite = {k: v for k, v in best.items() if np.isfinite(v["rho"])}
    if finite:
      k = max(finite, key=lambda k: abs(finite[k]["rho"]))
      for c in out:
        if c["run"] == run:
          c["better_for_transfer"] = k
  return out


def run_level(rows: Sequence[Mapping], cells: Sequence[Mapping], cfg, workdir: str) -> dict:
  """{"ranks": [per run and family: per-layer effective rank, chosen layer, value there], "correlations": [...]};
  written to workdir/trajectory/run_level.json. Reads the carriers saved by `model_geometry`."""
  rank_rows = []
  if cfg.geometry.enabled:
    for run in dict.fromkeys(r["run"] for r in rows):
      digests = list(dict.fromkeys(r["digest"] for r in sorted(rows, key=lambda r: r["step"])
                                   if r["run"] == run and np.isfinite(_value(r.get("coupling/peak")))))
      stacks, couplings = {f: [] for f in FAMILIES}, []
      for dg in digests:
        p = os.path.join(workdir, "trajectory", "models", dg[:16], "geometry.npz")
        if not os.path.exists(p):  # no refusal carrier at this checkpoint (refused all or none)
          continue
        with np.load(p, allow_pickle=False) as z:
          for f in FAMILIES:
            stacks[f].append(z[f])
          couplings.append(z["abs_cos"])
      if not couplings:
        continue
      if cfg.geometry.layer >= 0:
        layer = int(cfg.geometry.layer)
      else:
        layer = int(np.nanargmax(np.nanmean(np.where(np.isfinite(couplings), couplings, np.nan), 0)))
      for f in FAMILIES:
        per_layer = family_ranks(np.stack(stacks[f]))
        rank_rows.append(dict(run=run, family=f, k=len(stacks[f]), layer=layer, rank=float(per_layer[layer]),
                              mean_over_layers=float(np.nanmean(per_layer)), per_layer=per_layer.tolist()))
  out = dict(ranks=rank_rows, correlations=correlations(rows, cells))
  files.atomic_write_json(os.path.join(workdir, "trajectory", "run_level.json"), out, indent=1)
  return out
