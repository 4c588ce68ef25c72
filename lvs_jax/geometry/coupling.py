"""Coupling of two carriers: per-layer cosine, layer x layer cross-cosine, subspace principal angles,
each with a bootstrap interval over prompts and a null distribution from random prompt splits.

Inputs are per-prompt activations over one prompt pool, with a label per prompt for each carrier:

  xa [L, N, D], la [N]   activations and labels of carrier A (e.g. t_inst, harmful=+1 harmless=-1)
  xb [L, N, D], lb [N]   the same for carrier B (e.g. t_post_inst, refused=+1 complied=-1)

Label +1 / -1 marks the positive / negative group, 0 a prompt the carrier does not use. Carrier =
mean(+1) - mean(-1) per layer (`lvs_jax.geometry.carriers`), computed here as a weighted sum W @ X in
float64 so that thousands of resampled carriers cost one matrix product per chunk.

Bootstrap: prompts are resampled with replacement *within each stratum of (la, lb)*, so both
carriers are recomputed from the same resampled prompts (prompts shared by the two contrasts stay
paired) and every group keeps its size. Intervals are percentile intervals.

Null ("random prompt splits"): each carrier is recomputed from a random split of its own prompts
that is balanced within each group (half of its positives and half of its negatives on either side),
so the group difference cancels and only prompt-to-prompt variation is left; A and B are split
independently. The null |cos| is then the alignment of two noise carriers, which sits far above the
isotropic sqrt(2 / (pi D)) when the activations are anisotropic (residual streams with outlier
dimensions). A plain label permutation would not do: with a strong group effect, the chance
imbalance of positives between the two random halves leaks the real carrier into the null.
p = (1 + #null >= observed) / (1 + n_null).

Subspaces: the rank-k carrier subspace at a layer is spanned by the top-k right singular vectors of
the per-prompt contrast vectors {x_i - mean(neg) : i in pos} u {mean(pos) - x_j : j in neg}, an
uncentered PCA of "per-prompt carriers" (k = 1 recovers the diff-in-means direction when prompts
agree). Principal angles between two subspaces are the arccos of the singular values of Qa Qb^T
(orthonormal bases). `overlap` = mean cos^2 of the principal angles = ||Qa Qb^T||_F^2 / k in [0, 1]
(k / D for random subspaces).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits  # declared in setup.cfg

from lvs_jax.evals.stats import percentile_interval
from lvs_jax.geometry import carriers


def _single_threaded_blas(fn):
  """Runs fn with a 1-thread BLAS: these are many small products and eigendecompositions, where
  OpenBLAS threads only add contention (50x slower on a loaded 2-core machine, measured)."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with threadpool_limits(1, user_api="blas"):
      return fn(*args, **kwargs)

  return wrapped

# ----------------------------------------------------------------------------- cosines


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine along the last axis, float64: [..., D], [..., D] -> [...]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):  # a zero vector (e.g. layer 0 at a fixed token): nan
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def per_layer_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Signed cos(a_l, b_l): [L, D], [L, D] -> [L]."""
  return cosine(a, b)


def cross_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """C[i, j] = cos(a_i, b_j): [L, D], [L', D] -> [L, L'] (signed)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


# ----------------------------------------------------------------------------- subspaces


def orthonormal_basis(x: np.ndarray, k: int | None = None, *, n_iter: int = 12, oversample: int = 20) -> np.ndarray:
  """[n, D] -> [k, D] orthonormal rows spanning the top-k right singular vectors of x (all if k=None).

  Small problems (min(n, D) <= 8 (k + oversample)) use the exact eigendecomposition of the smaller
  Gram matrix; larger ones a randomized range finder with `n_iter` power iterations (Halko,
  Martinsson & Tropp 2011, Alg. 4.4) from a fixed seed -- deterministic, a few ms for a [1000, 576]
  layer where an exact SVD costs 0.2-2 s (it runs ~10^4 times in a bootstrap), and accurate to
  ~(s_{k+p+1} / s_k)^(2 n_iter + 1).
  """
  x = np.asarray(x, np.float64)
  n, d = x.shape
  k = min(n, d) if k is None else k
  if k > min(n, d):
    raise ValueError(f"subspace of rank {k} from a [{n}, {d}] matrix")
  if min(n, d) > 8 * (k + oversample):
    omega = np.random.default_rng(0).normal(size=(d, k + oversample))
    q = np.linalg.qr(x @ omega)[0]
    for _ in range(n_iter):
      q = np.linalg.qr(x.T @ q)[0]
      q = np.linalg.qr(x @ q)[0]
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return vt[:k]
  if n <= d:
    w, v = np.linalg.eigh(x @ x.T)  # ascending
    v = v[:, ::-1][:, :k]
    basis = (x.T @ v).T  # rows = sigma_i * right singular vector i
  else:
    w, v = np.linalg.eigh(x.T @ x)
    basis = v[:, ::-1][:, :k].T
  with np.errstate(invalid="ignore", divide="ignore"):  # rank < k (e.g. identical rows): nan rows
    return basis / np.linalg.norm(basis, axis=-1, keepdims=True)


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Principal angles (radians, ascending) between span(a) [ka, D] and span(b) [kb, D].

  Rows need not be orthonormal (orthonormalized via QR; they must be linearly independent). Returns min(ka, kb) angles.
  """
  qa = np.linalg.qr(np.asarray(a, np.float64).T)[0].T
  qb = np.linalg.qr(np.asarray(b, np.float64).T)[0].T
  s = np.linalg.svd(qa @ qb.T, compute_uv=False)
  return np.arccos(np.clip(s, -1.0, 1.0))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
  """Mean cos^2 of the principal angles between span(a) and span(b), in [0, 1]."""
  return float(np.mean(np.cos(principal_angles(a, b)) ** 2))


def carrier_subspace(pos: np.ndarray, neg: np.ndarray, k: int, weights_pos=None, weights_neg=None) -> np.ndarray:
  """Rank-k carrier subspace [k, D] of one layer from pos [Np, D] and neg [Nn, D] activations.

  weights_*: optional per-prompt multiplicities (bootstrap counts); rows with weight 0 drop out.
  """
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  wp = np.ones(len(pos)) if weights_pos is None else np.asarray(weights_pos, np.float64)
  wn = np.ones(len(neg)) if weights_neg is None else np.asarray(weights_neg, np.float64)
  mp = (wp[:, None] * pos).sum(0) / wp.sum()
  mn = (wn[:, None] * neg).sum(0) / wn.sum()
  rows = np.concatenate([np.sqrt(wp)[:, None] * (pos - mn), np.sqrt(wn)[:, None] * (mp - neg)])
  return orthonormal_basis(rows[np.concatenate([wp, wn]) > 0], k)


# ----------------------------------------------------------------------------- resampling


def _check(x: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x)
  labels = np.asarray(labels).astype(np.int64)
  if x.ndim != 3 or x.shape[1] != labels.shape[0]:
    raise ValueError(f"{name}: activations must be [L, N, D] with N = len(labels); got {x.shape}, {labels.shape}")
  if not set(np.unique(labels).tolist()) <= {-1, 0, 1}:
    raise ValueError(f"{name}: labels must be +1 (positive), -1 (negative) or 0 (unused)")
  if (labels == 1).sum() == 0 or (labels == -1).sum() == 0:
    raise ValueError(f"{name}: needs at least one positive and one negative prompt "
                     f"(got {(labels == 1).sum()} and {(labels == -1).sum()})")
  return x, labels


def diff_weights(labels: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
  """Weights w [..., N] with carrier = sum_n w_n x_n = mean(+1) - mean(-1) (counts = multiplicities)."""
  labels = np.asarray(labels)
  c = np.ones(labels.shape, np.float64) if counts is None else np.asarray(counts, np.float64)
  pos, neg = c * (labels == 1), c * (labels == -1)
  return pos / pos.sum(-1, keepdims=True) - neg / neg.sum(-1, keepdims=True)


def stratified_counts(rng: np.random.Generator, strata: np.ndarray, n_samples: int) -> np.ndarray:
  """[n_samples, N] bootstrap multiplicities: resampling with replacement within each stratum."""
  strata = np.asarray(strata)
  counts = np.zeros((n_samples, len(strata)), np.float64)
  for s in np.unique(strata):
    idx = np.flatnonzero(strata == s)
    counts[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_samples)
  return counts


def split_labels(rng: np.random.Generator, labels: np.ndarray, n_samples: int) -> np.ndarray:
  """[n_samples, N] random within-group splits: each group (+1, -1) is split in half at random, one half
  labelled +1 and the other -1 (an odd group leaves its extra prompt on a random side); unused stay 0."""
  labels = np.asarray(labels)
  out = np.zeros((n_samples, len(labels)), np.int64)
  for g in (1, -1):
    idx = np.flatnonzero(labels == g)
    half = np.where(np.arange(len(idx)) < len(idx) // 2, 1, -1)
    for i in range(n_samples):
      h = half if len(idx) % 2 == 0 or rng.random() < 0.5 else -half[::-1]
      out[i, idx[rng.permutation(len(idx))]] = h
  return out


def _weighted(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """x [L, N, D], w [B, N] -> sum_n w[b, n] x[:, n] = [B, L, D] float64 (one matmul)."""
  L, N, D = x.shape
  flat = np.asarray(x, np.float64).transpose(1, 0, 2).reshape(N, L * D)
  return (w @ flat).reshape(len(w), L, D)


# ----------------------------------------------------------------------------- coupling


@_single_threaded_blas
def coupling(xa: np.ndarray, la: np.ndarray, xb: np.ndarray, lb: np.ndarray, *, n_boot: int = 1000,
             n_null: int = 1000, seed: int = 0, level: float = 0.95, chunk: int = 100) -> dict:
  """Per-layer |cos(A_l, B_l)| and the cross-cosine matrix |cos(A_i, B_j)| with intervals and nulls.

  Returns (float64 arrays):
    abs_cos [L], abs_cos_low [L], abs_cos_high [L]    point estimate and bootstrap interval
    cos [L]                                            signed point estimate
    null_mean [L], null_high [L] (the `level` quantile), p_value [L]
    cross [L, L], cross_low [L, L], cross_high [L, L]  |cos(A_i, B_j)| and its interval
    null_cross_mean [L, L]
    carrier_a [L, D], carrier_b [L, D]; n_boot, n_null
  """
  xa, la = _check(xa, la, "carrier A")
  xb, lb = _check(xb, lb, "carrier B")
  if la.shape != lb.shape:
    raise ValueError("both carriers' labels must index the same prompt pool")
  rng = np.random.default_rng(seed)
  a = _weighted(xa, diff_weights(la)[None])[0]
  b = _weighted(xb, diff_weights(lb)[None])[0]
  dead = degenerate_layers(a, xa) | degenerate_layers(b, xb)
  out = dict(carrier_a=a, carrier_b=b, cos=per_layer_cosine(a, b), cross=np.abs(cross_cosine(a, b)), degenerate=dead)
  out["abs_cos"] = np.abs(out["cos"])
  strata = (la + 1) * 3 + (lb + 1)

  def stats(wa, wb):
    sa, sb = _weighted(xa, wa), _weighted(xb, wb)  # [B, L, D]
    with np.errstate(invalid="ignore", divide="ignore"):
      na = sa / np.linalg.norm(sa, axis=-1, keepdims=True)
      nb = sb / np.linalg.norm(sb, axis=-1, keepdims=True)
    return np.abs((na * nb).sum(-1)), np.abs(np.einsum("bid,bjd->bij", na, nb))

  boot, boot_x, null, null_x = [], [], [], []
  for i in range(0, n_boot, chunk):
    c = stratified_counts(rng, strata, min(chunk, n_boot - i))
    s, sx = stats(diff_weights(la, c), diff_weights(lb, c))
    boot.append(s)
    boot_x.append(sx)
  for i in range(0, n_null, chunk):
    m = min(chunk, n_null - i)
    s, sx = stats(diff_weights(split_labels(rng, la, m)), diff_weights(split_labels(rng, lb, m)))
    null.append(s)
    null_x.append(sx.mean(0) * m)
  if n_boot:
    boot, boot_x = np.concatenate(boot), np.concatenate(boot_x)
    out["abs_cos_low"], out["abs_cos_high"] = percentile_interval(boot, level)
    out["cross_low"], out["cross_high"] = percentile_interval(boot_x, level)
  if n_null:
    null = np.concatenate(null)
    out["null_mean"] = null.mean(0)
    out["null_high"] = np.quantile(null, level, axis=0)
    out["p_value"] = np.where(np.isnan(out["abs_cos"]), np.nan,
                              ((null >= out["abs_cos"][None]).sum(0) + 1) / (n_null + 1))
    out["null_cross_mean"] = np.sum(null_x, axis=0) / n_null
  for key in ("cos", "abs_cos", "abs_cos_low", "abs_cos_high", "null_mean", "null_high", "p_value"):
    if key in out:
      out[key] = np.where(dead, np.nan, out[key])
  for key in ("cross", "cross_low", "cross_high", "null_cross_mean"):
    if key in out:
      out[key] = np.where(dead[:, None] | dead[None, :], np.nan, out[key])
  out["n_boot"], out["n_null"] = n_boot, n_null
  return out


def degenerate_layers(carrier: np.ndarray, x: np.ndarray) -> np.ndarray:
  """[L] bool: layers where the carrier [L, D] of activations x [L, N, D] is zero
  (`lvs_jax.geometry.carriers.zero_carrier`, the one definition)."""
  return carriers.zero_carrier(np.linalg.norm(np.asarray(carrier, np.float64), axis=-1), carriers.activation_scale(x))


@_single_threaded_blas
def subspace_coupling(xa: np.ndarray, la: np.ndarray, xb: np.ndarray, lb: np.ndarray, k: int = 3, *,
                      layers: Sequence[int] | None = None, n_boot: int = 100, n_null: int = 100, seed: int = 0,
                      level: float = 0.95) -> dict:
  """Rank-k carrier subspaces per layer and their principal angles, with intervals and a null.

  Returns, per layer in `layers` (default all):
    overlap [nL] (mean cos^2 of principal angles), overlap_low/high, null_overlap_mean/high, p_value
    max_cos [nL] (cosine of the smallest principal angle) with max_cos_low/high
    angles_deg [nL, k] point estimates; random_overlap = k / D (the isotropic expectation)
  """
  xa, la = _check(xa, la, "carrier A")
  xb, lb = _check(xb, lb, "carrier B")
  layers = list(range(xa.shape[0])) if layers is None else list(layers)
  rng = np.random.default_rng(seed)
  strata = (la + 1) * 3 + (lb + 1)

  def one(layer, la_, lb_, ca=None, cb=None):
    pa, na = xa[layer][la_ == 1], xa[layer][la_ == -1]
    pb, nb = xb[layer][lb_ == 1], xb[layer][lb_ == -1]
    wa = (None, None) if ca is None else (ca[la_ == 1], ca[la_ == -1])
    wb = (None, None) if cb is None else (cb[lb_ == 1], cb[lb_ == -1])
    qa = carrier_subspace(pa, na, k, *wa)
    qb = carrier_subspace(pb, nb, k, *wb)
    if not (np.isfinite(qa).all() and np.isfinite(qb).all()):
      return np.full(k, np.nan)  # a degenerate layer (all contrast vectors ~0)
    cosines = np.clip(np.linalg.svd(qa @ qb.T, compute_uv=False), 0.0, 1.0)
    return cosines

  a = _weighted(xa[layers], diff_weights(la)[None])[0]
  b = _weighted(xb[layers], diff_weights(lb)[None])[0]
  dead = degenerate_layers(a, xa[layers]) | degenerate_layers(b, xb[layers])
  est = np.array([one(layer, la, lb) if not dd else np.full(k, np.nan) for layer, dd in zip(layers, dead)])
  out = dict(layers=np.asarray(layers), k=k, angles_deg=np.degrees(np.arccos(est)), overlap=(est ** 2).mean(-1),
             max_cos=est[:, 0], random_overlap=k / xa.shape[-1])
  if n_boot:
    counts = stratified_counts(rng, strata, n_boot)
    bs = np.array([[one(layer, la, lb, c, c) if not dd else np.full(k, np.nan) for layer, dd in zip(layers, dead)]
                   for c in counts])  # [B, nL, k]
    out["overlap_low"], out["overlap_high"] = percentile_interval((bs ** 2).mean(-1), level)
    out["max_cos_low"], out["max_cos_high"] = percentile_interval(bs[..., 0], level)
  if n_null:
    pa, pb = split_labels(rng, la, n_null), split_labels(rng, lb, n_null)
    ns = np.array([[one(layer, pa[i], pb[i]) if not dd else np.full(k, np.nan) for layer, dd in zip(layers, dead)]
                   for i in range(n_null)])
    nov = (ns ** 2).mean(-1)
    out["null_overlap_mean"] = nov.mean(0)
    out["null_overlap_high"] = np.quantile(nov, level, axis=0)
    p = ((nov >= out["overlap"][None]).sum(0) + 1) / (n_null + 1)
    out["p_value"] = np.where(np.isnan(out["overlap"]), np.nan, p)
  out["n_boot"], out["n_null"] = n_boot, n_null
  return out


def stratified_coupling(xa: np.ndarray, la: np.ndarray, xb: np.ndarray, strata: dict, *,
                        pooled: np.ndarray | None = None, **kw) -> dict[str, dict]:
  """`coupling` of carrier A with each within-stratum refusal carrier (`carriers.stratified_refusal_labels`).

  xa [L, N, D], la [N]: carrier A (harmfulness); xb [L, N, D]: activations of the refusal carriers;
  strata: {name: {"labels", "n_refused", "n_complied", "estimable", ...}}; pooled [L, D] (optional):
  the pooled behavioral refusal carrier, whose per-layer signed cosine with each stratum's carrier is
  returned as "cos_pooled". kw: `coupling`'s resampling settings.
  Returns {name: dict(the stratum's counts, estimable, coupling=coupling(...) or None when not estimable)}.
  """
  out = {}
  for name, st in strata.items():
    rec = {k: v for k, v in st.items() if k != "labels"}
    rec["coupling"] = None
    if st["estimable"]:
      rec["coupling"] = coupling(xa, la, xb, st["labels"], **kw)
      if pooled is not None:
        rec["cos_pooled"] = per_layer_cosine(rec["coupling"]["carrier_b"], pooled)
    out[name] = rec
  return out
