"""The project's one copy of each small statistic: binomial intervals, the bootstrap, unit rows.

  wilson_interval(k, n)            95% Wilson score interval of a rate k/n (refusal rates, ASR)
  bootstrap_indices(rng, n, B)     [B, n] resamples of n items with replacement (prompts)
  percentile_interval(samples)     the (low, high) percentile interval over axis 0 of bootstrap samples
  bootstrap_mean(x)                mean of x [..., N] over its last axis with a percentile bootstrap interval
  unit(x)                          rows of x [..., D] scaled to unit L2 norm (jit/vmap/grad-safe)
  t_quantile(q, df)                Student's t quantile (jax.scipy.stats has no t.ppf; no scipy needed)
  t_interval(samples)              (mean, low, high): the t-interval of the mean of a few per-seed values

Every bootstrap over prompts in the project (LVS per layer, paired carrier effects, carrier coupling)
draws its resamples with `bootstrap_indices` (or stratified counts built the same way) and reads its
interval with `percentile_interval`, so one seed gives one set of resamples and one definition of the
interval.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion k/n (default z: 95%); (nan, nan) when n == 0."""
  if n == 0:
    return (math.nan, math.nan)
  if not 0 <= k <= n:
    raise ValueError(f"wilson_interval: k={k} successes out of n={n}")
  p = k / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, center - half), min(1.0, center + half))


def rate(k: int, n: int) -> dict:
  """{rate, low, high, k, n}: k/n (nan when n == 0) with its 95% Wilson interval, the form every report row uses."""
  lo, hi = wilson_interval(k, n)
  return dict(rate=k / n if n else math.nan, low=lo, high=hi, k=int(k), n=int(n))


def bootstrap_indices(rng: np.random.Generator | int, n: int, n_boot: int) -> np.ndarray:
  """[n_boot, n] int indices: n_boot resamples of n items with replacement. rng: a Generator or a seed."""
  if n <= 0:
    raise ValueError(f"bootstrap_indices: nothing to resample (n={n})")
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  return rng.integers(0, n, size=(n_boot, n))


def percentile_interval(samples, level: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(low, high): the (1 - level)/2 and (1 + level)/2 quantiles of bootstrap `samples` along `axis`."""
  a = (1 - level) / 2
  samples = np.asarray(samples)
  return np.quantile(samples, a, axis=axis), np.quantile(samples, 1 - a, axis=axis)


def bootstrap_mean(x, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high) of x [N] with a percentile bootstrap interval over its N items."""
  x = np.asarray(x, np.float64)
  boots = x[bootstrap_indices(seed, x.shape[-1], n_boot)].mean(-1)
  lo, hi = percentile_interval(boots, level)
  return float(x.mean()), float(lo), float(hi)


def unit(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x [..., D] scaled to unit L2 norm (a zero row stays zero: the norm is floored at eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def t_quantile(q: float, df: float) -> float:
  """The q-quantile of Student's t with df degrees of freedom, q in (0, 1): bisection on the CDF
  1 - I_{df / (df + t^2)}(df / 2, 1 / 2) / 2 (t > 0; `jax.scipy.special.betainc`) to ~1e-6 relative."""
  if not 0 < q < 1 or not df > 0:
    raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0, got q={q}, df={df}")
  if q < 0.5:
    return -t_quantile(1 - q, df)
  tail = lambda x: 0.5 * float(jax.scipy.special.betainc(df / 2, 0.5, df / (df + x * x)))  # P(T > x)
  lo, hi = 0.0, 1.0
  while tail(hi) > 1 - q:
    lo, hi = hi, 2 * hi
  for _ in range(64):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if tail(mid) > 1 - q else (lo, mid)
    if hi - lo <= 1e-7 * hi:
      break
  return (lo + hi) / 2


def t_interval(samples, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high) of per-seed values: the t-interval of the mean (non-finite values dropped; a single value
  has no interval, low = high = nan; no values: all nan)."""
  v = np.asarray(samples, np.float64)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return float("nan"), float("nan"), float("nan")
  m = float(v.mean())
  if v.size == 1:
    return m, float("nan"), float("nan")
  h = float(t_quantile(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
  return m, m - h, m + h
