"""Probes: fit quality against scikit-learn, early stopping, calibration, class weights, vmaps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lvs_jax.drift import embeddings, metrics, probes

CFG = probes.ProbeConfig(max_steps=150, patience=30)


def _data(n=300, d=24, seed=0, shift=0.6):
  rng = np.random.default_rng(seed)
  y = (rng.uniform(size=n) < 0.5).astype(np.int32)
  x = rng.normal(size=(n, d)).astype(np.float32) + 3.0  # a shared offset, as real embeddings have
  x[:, 0] += shift * (2 * y - 1)
  x[:, 1] += 0.5 * shift * (2 * y - 1)
  return jnp.asarray(x), jnp.asarray(y)


def test_logreg_matches_sklearn_and_is_calibrated():
  x, y = _data(600)
  xt, yt, xv, yv, xe, ye = x[:300], y[:300], x[300:400], y[300:400], x[400:], y[400:]
  # Without early stopping, to convergence: the same convex problem as scikit-learn's with
  # C = 1 / (2 l2 N) on the same (standardized) features.
  l2 = 1e-2
  cfg = probes.ProbeConfig(max_steps=800, patience=0, lr=0.02, calibrate=False, normalize=False)
  probe, _ = probes.fit(jax.random.key(0), xt, yt, xv, yv, cfg, l2)
  prep = lambda a: np.asarray((a - probe.mean) / probe.std)
  sk = LogisticRegression(C=1 / (2 * l2 * 300), class_weight="balanced", max_iter=5000).fit(prep(xt), np.asarray(yt))
  np.testing.assert_allclose(probe.params["w"], sk.coef_[0], atol=2e-3 * np.abs(sk.coef_).max())
  f = probes.logits(probe, xe)
  assert float(metrics.roc_auc(f, ye)) == pytest.approx(roc_auc_score(np.asarray(ye), sk.decision_function(prep(xe))),
                                                        abs=1e-3)
  # With early stopping and temperature scaling: probabilities in [0, 1], calibrated.
  probe, info = probes.fit(jax.random.key(0), xt, yt, xv, yv, CFG, 1e-3)
  p = probes.predict_proba(probe, xe)
  assert p.shape == (200,) and bool(jnp.all((p >= 0) & (p <= 1)))
  assert float(info["val_auc"]) > 0.7 and 0 < int(info["best_step"]) <= CFG.max_steps
  assert float(metrics.expected_calibration_error(p, ye)) < 0.12


def test_early_stopping_keeps_the_best_validation_step():
  # Few samples, many noise features and no penalty: the validation loss turns up; the kept step is its minimum.
  x, y = _data(80, d=200, shift=0.8, seed=1)
  cfg = probes.ProbeConfig(max_steps=300, patience=20, lr=0.05, calibrate=False)
  probe, info = probes.fit(jax.random.key(0), x[:40], y[:40], x[40:], y[40:], cfg, 0.0)
  assert int(info["best_step"]) < 300
  z = (x[40:] / jnp.linalg.norm(x[40:], axis=1, keepdims=True) - probe.mean) / probe.std
  w = probes._weights(y[40:], cfg)
  kept = probes._bce(z @ probe.params["w"] + probe.params["b"], y[40:], w)
  assert float(kept) == pytest.approx(float(info["val_loss"]), rel=1e-5)


def test_temperature_scaling_fixes_overconfident_logits():
  rng = np.random.default_rng(2)
  f = rng.normal(size=4000) * 2.0
  y = (rng.uniform(size=4000) < 1 / (1 + np.exp(-f))).astype(np.int32)  # f is the calibrated logit ...
  t = float(probes.fit_temperature(jnp.asarray(5.0 * f, jnp.float32), jnp.asarray(y)))  # ... scaled up 5x
  assert t == pytest.approx(5.0, rel=0.15)


def test_mlp_fits_what_logreg_cannot():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(600, 6)).astype(np.float32)
  y = ((x[:, 0] * x[:, 1]) > 0).astype(np.int32)  # XOR of two signs
  x, y = jnp.asarray(x + 4.0), jnp.asarray(y)
  cfg = probes.ProbeConfig(kind="mlp", hidden=32, max_steps=300, patience=60, normalize=False)
  mlp, _ = probes.fit(jax.random.key(0), x[:400], y[:400], x[400:500], y[400:500], cfg, 1e-4)
  lin, _ = probes.fit(jax.random.key(0), x[:400], y[:400], x[400:500], y[400:500],
                      probes.ProbeConfig(max_steps=300, normalize=False), 1e-4)
  assert float(metrics.roc_auc(probes.logits(mlp, x[500:]), y[500:])) > 0.9
  assert float(metrics.roc_auc(probes.logits(lin, x[500:]), y[500:])) < 0.7


def test_class_weighting_balances_an_imbalanced_set():
  x, y = _data(400, shift=0.5, seed=4)
  keep = np.flatnonzero((np.asarray(y) == 0) | (np.arange(400) % 8 == 0))  # ~1 positive in 9
  x, y = x[keep], y[keep]
  w = probes._weights(y, CFG)
  yf = y.astype(jnp.float32)
  assert float(jnp.sum(w * yf)) == pytest.approx(float(jnp.sum(w * (1 - yf))), rel=1e-5)
  recall = {}
  for cw in ("balanced", "none"):
    cfg = probes.ProbeConfig(max_steps=150, class_weight=cw, calibrate=False)
    probe, _ = probes.fit(jax.random.key(0), x, y, x, y, cfg, 1e-3)
    pred = probes.predict_proba(probe, x) > 0.5
    recall[cw] = float(jnp.sum((pred & (y == 1)).astype(jnp.float32)) / jnp.sum(yf))
  assert recall["balanced"] > recall["none"]


def test_fit_select_and_per_layer_selection():
  x, y = _data(200)
  probe, info = probes.fit_select(jax.random.key(0), x[:120], y[:120], x[120:], y[120:], CFG, (1e-3, 10.0))
  assert info["l2"] == pytest.approx(1e-3) and info["val_loss_per_l2"].shape == (2,)  # 10 underfits
  assert float(info["val_loss"]) == pytest.approx(float(jnp.min(info["val_loss_per_l2"])))
  # Three "layers": noise, the informative one, noise. Selection finds layer 1.
  noise = jax.random.normal(jax.random.key(1), (200, 24)) + 3.0
  layers = jnp.stack([noise, x, noise[::-1]])
  auc, loss = probes.val_auc_per_layer(jax.random.key(0), layers[:, :120], y[:120], layers[:, 120:], y[120:], CFG)
  assert auc.shape == loss.shape == (3,) and int(jnp.argmax(auc)) == 1


def test_augmentation_shapes_and_external_arrays(tmp_path):
  x, y = _data(10)
  xa, ya = probes.augment_isotropic(jax.random.key(0), x, y, 0.1, copies=3)
  assert xa.shape == (40, 24) and ya.shape == (40,)
  np.testing.assert_array_equal(xa[:10], x)
  np.savez(tmp_path / "e.npz", x=np.asarray(x), y=np.asarray(y))
  xe, ye = embeddings.load_array(tmp_path / "e.npz")
  np.testing.assert_array_equal(xe, np.asarray(x))
  assert ye.dtype == np.int32
  with pytest.raises(ValueError, match="labels must be 0/1"):
    np.savez(tmp_path / "bad.npz", x=np.asarray(x), y=np.arange(10))
    embeddings.load_array(tmp_path / "bad.npz")


def test_temperature_on_a_separable_validation_set_stays_finite():
  f = jnp.concatenate([jnp.linspace(2.0, 6.0, 50), -jnp.linspace(2.0, 6.0, 50)])
  y = jnp.concatenate([jnp.ones(50, jnp.int32), jnp.zeros(50, jnp.int32)])
  t = float(probes.fit_temperature(f, y))  # Platt targets 51/52 and 1/52: not T -> 0
  p = jax.nn.sigmoid(f / t)
  assert 0.2 < t < 5.0 and float(jnp.max(p)) < 0.9999
  assert float(probes.fit_temperature(f, y, smooth=False)) < 0.01  # unsmoothed: the grid's floor
