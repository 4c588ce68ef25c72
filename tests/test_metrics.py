"""Probe and separability metrics against scikit-learn and hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, silhouette_score

from lvs_jax.drift import metrics


@pytest.mark.parametrize("n,decimals", [(7, 0), (200, 1), (1000, 2), (3001, 8)])
def test_roc_auc_matches_sklearn_with_ties(n, decimals):
  rng = np.random.default_rng(n)
  for _ in range(5):
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = np.round(rng.normal(size=n) + 0.7 * y, decimals).astype(np.float32)  # many ties at low precision
    got = float(metrics.roc_auc(jnp.asarray(s), jnp.asarray(y)))
    assert abs(got - roc_auc_score(y, s)) <= 1e-6


def test_roc_auc_edge_cases_and_vmap():
  assert np.isnan(metrics.roc_auc(jnp.ones(4), jnp.zeros(4, jnp.int32)))
  assert float(metrics.roc_auc(jnp.ones(4), jnp.array([0, 1, 0, 1]))) == 0.5  # all tied
  assert float(metrics.roc_auc(jnp.arange(4.0), jnp.array([0, 0, 1, 1]))) == 1.0
  s = jax.random.normal(jax.random.key(0), (3, 50))
  y = (jnp.arange(50) % 2).astype(jnp.int32)
  batched = jax.jit(jax.vmap(metrics.roc_auc, (0, None)))(s, y)
  np.testing.assert_allclose(batched, [roc_auc_score(np.asarray(y), np.asarray(r)) for r in s], atol=1e-6)


def test_confidence_silent_failures_and_ece_by_hand():
  p = jnp.array([0.95, 0.6, 0.1, 0.85, 0.3, 0.55])
  y = jnp.array([1, 0, 0, 0, 1, 1])
  # predictions 1 1 0 1 0 1 -> correct, wrong (conf .6), correct, wrong (conf .85), wrong (conf .7), correct
  assert float(metrics.accuracy(p, y)) == pytest.approx(0.5)
  assert float(metrics.silent_failure_rate(p, y)) == pytest.approx(1 / 3)
  assert float(metrics.silent_failure_rate(p, y, threshold=0.65)) == pytest.approx(2 / 3)
  assert np.isnan(metrics.silent_failure_rate(jnp.array([0.9]), jnp.array([1])))
  m = metrics.classification_metrics(p, y)
  assert float(m["silent_share"]) == pytest.approx(1 / 6)
  assert float(m["error_confidence"]) == pytest.approx((0.6 + 0.85 + 0.7) / 3)
  conf = np.maximum(np.asarray(p), 1 - np.asarray(p))
  ok = (np.asarray(p) > 0.5) == np.asarray(y).astype(bool)
  bins = np.minimum((conf * 15).astype(int), 14)
  ece = sum(abs(ok[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(conf)
  assert float(m["ece"]) == pytest.approx(ece, abs=1e-6)


def test_angle_deg():
  x = jnp.array([[1.0, 0.0, 0.0]] * 4)
  t = jnp.radians(jnp.array([0.0, 1e-3, 1.0, 120.0]))
  y = jnp.stack([jnp.cos(t), jnp.sin(t), jnp.zeros(4)], 1) * 3.0
  np.testing.assert_allclose(metrics.angle_deg(x, y), [0.0, 1e-3, 1.0, 120.0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_matches_sklearn(metric):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 8)).astype(np.float32)
  y = rng.integers(0, 2, 120)
  x[y == 1, 0] += 2.0
  got = float(metrics.silhouette(jnp.asarray(x), jnp.asarray(y), metric))
  assert got == pytest.approx(silhouette_score(x, y, metric=metric), abs=1e-4)


def test_fisher_ratios_and_margin_on_planted_structure():
  rng = np.random.default_rng(2)
  n, d, gap = 4000, 4, 3.0
  y = rng.integers(0, 2, n)
  x = rng.normal(size=(n, d)).astype(np.float32)
  x[:, 0] += gap * (y - 0.5)
  # Along the true discriminant e_0 the classes are gap apart with unit within-class std: d'^2 = gap^2.
  assert float(metrics.fisher_ratio(jnp.asarray(x), jnp.asarray(y), shrinkage=0.0)) == pytest.approx(gap ** 2, rel=0.05)
  assert float(metrics.fisher_trace_ratio(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(
    0.25 * gap ** 2 / d, rel=0.05)
  # Separable in 2-D with margin exactly g along x_0 (the other coordinate is uninformative).
  g = 0.5
  y2 = np.arange(200) % 2
  x2 = np.stack([np.where(y2 == 1, g, -g) * (1 + rng.uniform(0, 1, 200)), rng.uniform(-1, 1, 200)], 1)
  x2[:2, 0] = [-g, g]
  margin, acc = metrics.linear_margin(jnp.asarray(x2, jnp.float32), jnp.asarray(y2), quantile=0.0, steps=2000)
  assert float(acc) == 1.0 and float(margin) == pytest.approx(g, rel=0.1)


def test_compare_separability_sees_the_worse_model():
  rng = np.random.default_rng(3)
  y = np.arange(300) % 2
  base = rng.normal(size=(300, 16)) + np.where(y[:, None] == 1, 1.5, -1.5) * np.eye(16)[0]
  worse = rng.normal(size=(300, 16)) + np.where(y[:, None] == 1, 0.5, -0.5) * np.eye(16)[0]
  rows = metrics.compare_separability(base + 5.0, y, worse + 5.0, y, names=("base", "instruct"))
  by = {r["metric"]: r for r in rows}
  assert set(by) >= {"fisher_ratio", "silhouette_cosine", "linear_margin"}
  for k in ("fisher_ratio", "fisher_trace_ratio", "silhouette_cosine", "silhouette_euclidean", "linear_margin"):
    assert by[k]["instruct"] < by[k]["base"] and by[k]["relative_change"] < 0, k
