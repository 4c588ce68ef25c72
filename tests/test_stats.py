"""The one stats module: Wilson intervals against hand-computed values, the bootstrap on planted data,
unit rows; and the callers that now share it (LVS bootstrap, paired carrier effects)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.evals import stats
from lvs_jax.geometry import causal
from lvs_jax.lvs import attack as lvs


def _wilson_by_hand(k, n, z=1.959964):
  # The textbook form: (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n).
  p = k / n
  c = (p + z * z / (2 * n)) / (1 + z * z / n)
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return c - h, c + h


def test_wilson_interval_matches_hand_values():
  np.testing.assert_allclose(stats.wilson_interval(50, 100), [0.40383, 0.59617], atol=5e-5)
  lo, hi = stats.wilson_interval(0, 10)
  assert lo == 0.0 and hi == pytest.approx(0.27753, abs=5e-5)
  assert stats.wilson_interval(10, 10) == pytest.approx((1 - 0.27753, 1.0), abs=5e-5)
  for k, n in ((3, 7), (1, 40), (199, 200)):
    np.testing.assert_allclose(stats.wilson_interval(k, n), _wilson_by_hand(k, n), rtol=1e-12)
  assert all(math.isnan(v) for v in stats.wilson_interval(0, 0))
  with pytest.raises(ValueError, match="k=5 successes out of n=3"):
    stats.wilson_interval(5, 3)


def test_bootstrap_indices_resample_with_replacement_and_are_seeded():
  idx = stats.bootstrap_indices(0, 7, 500)
  assert idx.shape == (500, 7) and idx.min() == 0 and idx.max() == 6
  assert any(len(set(r)) < 7 for r in idx)  # with replacement: repeats occur
  np.testing.assert_array_equal(idx, stats.bootstrap_indices(np.random.default_rng(0), 7, 500))
  assert not np.array_equal(idx, stats.bootstrap_indices(1, 7, 500))
  with pytest.raises(ValueError, match="n=0"):
    stats.bootstrap_indices(0, 0, 10)


def test_percentile_interval_of_planted_samples():
  s = np.arange(1001, dtype=float)[:, None] * np.array([1.0, -1.0])  # [1001, 2]
  lo, hi = stats.percentile_interval(s, 0.9)
  np.testing.assert_allclose(lo, [50.0, -950.0])
  np.testing.assert_allclose(hi, [950.0, -50.0])


def test_bootstrap_mean_covers_the_mean_and_shrinks_with_n():
  rng = np.random.default_rng(0)
  small, large = rng.normal(3.0, 1.0, 25), rng.normal(3.0, 1.0, 2500)
  m, lo, hi = stats.bootstrap_mean(small, n_boot=2000)
  assert lo < m < hi and lo < 3.0 < hi
  # Width ~ 2 * 1.96 / sqrt(n): 0.78 for n = 25, within bootstrap noise.
  assert 0.55 < hi - lo < 1.0
  m2, lo2, hi2 = stats.bootstrap_mean(large, n_boot=2000)
  assert lo2 < 3.0 < hi2 and (hi2 - lo2) < (hi - lo) / 5
  c = np.full(30, 2.5)  # no spread: a zero-width interval at the value
  assert stats.bootstrap_mean(c) == (2.5, 2.5, 2.5)


def test_unit_rows_and_zero_rows_and_jit():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
  u = jax.jit(stats.unit)(x)
  np.testing.assert_allclose(u, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], rtol=1e-6)
  g = jax.grad(lambda v: stats.unit(v)[0])(jnp.asarray([3.0, 4.0]))
  np.testing.assert_allclose(g, [0.8 * 0.8 / 5, -0.6 * 0.8 / 5], rtol=1e-5)  # d(x/|x|)_0 / dx


def test_callers_share_the_resamples_of_one_seed():
  # The LVS bootstrap and the paired carrier effect draw the same resamples from one seed, so their
  # intervals are reproducible from stats alone.
  rng = np.random.default_rng(1)
  a, b = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 40)
  d = causal.paired_difference(a, b, n_boot=300, seed=5)
  boots = (a - b)[stats.bootstrap_indices(5, 40, 300)].mean(-1)
  lo, hi = stats.percentile_interval(boots)
  assert (d["low"], d["high"]) == (pytest.approx(lo), pytest.approx(hi)) and d["low"] < d["diff"] < d["high"]
  radii = np.array([0.1, 0.2, 0.4])
  eps = rng.choice([0.1, 0.2, 0.4, np.inf], size=(2, 40))
  score, low, high = lvs.bootstrap_lvs(eps, radii, n_boot=300, seed=5)
  idx = stats.bootstrap_indices(5, 40, 300)
  want = stats.percentile_interval(lvs.lvs_score(np.moveaxis(eps[..., idx], -2, 0), radii))
  np.testing.assert_allclose(low, want[0])
  np.testing.assert_allclose(high, want[1])
  assert np.all(low <= score) and np.all(score <= high)
