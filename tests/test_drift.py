"""Drift families (angles, sigma = 0, vmap), weight perturbation, Procrustes re-anchoring, the alarm.

Data are drawn with numpy and the drift functions run jitted, so the file compiles a handful of
functions instead of hundreds of eager ops.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.drift import alarm as drift_alarm
from lvs_jax.drift import families as drift
from lvs_jax.drift import metrics, probes
from lvs_jax.drift import study as drift_eval

D = 576
apply = jax.jit(drift.apply_drift)  # sigma traced: one compilation per family and shape
angle = jax.jit(metrics.angle_deg)


def _x(n=512, d=D, seed=0):
  """Anisotropic embeddings: a shared offset (a narrow cone, as LLM residuals are) plus noise."""
  rng = np.random.default_rng(seed)
  v = rng.normal(size=d)
  return jnp.asarray(3.0 * (2.0 * v / np.linalg.norm(v) + 1.5 * rng.normal(size=(n, d)) / math.sqrt(d)), jnp.float32)


def _low_rank(n=400, d=128, r=8, seed=0):
  """Embeddings near an r-dimensional affine subspace (as real ones are), plus a little noise."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(d, r)))[0]
  v = rng.normal(size=d)
  x = 2.0 * v / np.linalg.norm(v) + rng.normal(size=(n, r)) @ basis.T / math.sqrt(r) + 0.02 * rng.normal(size=(n, d))
  return jnp.asarray(x, jnp.float32)


def test_sigma_zero_reproduces_clean_metrics_exactly():
  x = np.array(_x(200, 64))
  y = np.arange(200) % 2
  x[:, 0] += 0.3 * y
  x, y = jnp.asarray(x), jnp.asarray(y, jnp.int32)
  probe, _ = probes.fit(jax.random.key(0), x[:120], y[:120], x[120:], y[120:], probes.ProbeConfig(max_steps=50))
  clean = metrics.classification_metrics(probes.predict_proba(probe, x[120:]), y[120:])
  for family in drift.FAMILIES:
    dr = drift.make_drift(family, jax.random.key(1), 64, k=8)
    xd = apply(dr, jax.random.key(2), x[120:], 0.0)
    assert bool(jnp.all(xd == x[120:])), family
    got = metrics.classification_metrics(probes.predict_proba(probe, xd), y[120:])
    for k in clean:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(clean[k]), err_msg=f"{family} {k}")


def test_vmap_over_sigma_equals_loop():
  x = _x(80, 64)
  sigmas = jnp.array([0.0, 0.01, 0.1, 1.0])
  for family in drift.FAMILIES:
    dr = drift.make_drift(family, jax.random.key(6), 64, k=8)
    batched = jax.jit(jax.vmap(drift.apply_drift, (None, None, None, 0)))(dr, jax.random.key(7), x, sigmas)
    for i, s in enumerate(sigmas):
      np.testing.assert_allclose(batched[i], apply(dr, jax.random.key(7), x, s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("convention", drift.CONVENTIONS)
def test_isotropic_angle_matches_the_stated_relation(convention):
  x = _x()
  dr = drift.make_drift("isotropic", jax.random.key(0), D, convention=convention)
  for sigma in ([0.002, 0.02, 0.2, 1.0] if convention == "norm" else [1e-4, 1e-3, 0.02]):
    xd = apply(dr, jax.random.key(3), x, sigma)
    ang = angle(x, xd)
    want = float(drift.expected_angle_deg(sigma, D, "isotropic", convention))
    assert float(jnp.mean(ang)) == pytest.approx(want, rel=0.01), sigma
    assert float(jnp.max(jnp.abs(ang / want - 1))) < 0.15  # concentration: spread ~ 1/sqrt(2D)
    np.testing.assert_allclose(jnp.linalg.norm(xd, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)
  # The headline convention: sigma = 0.02 is ~1.15 degrees with the "norm" scale, ~25.6 with "coord".
  assert float(drift.expected_angle_deg(0.02, D, "isotropic", "norm")) == pytest.approx(1.145, abs=0.01)
  assert float(drift.expected_angle_deg(0.02, D, "isotropic", "coord")) == pytest.approx(25.6, abs=0.1)
  assert float(drift.sigma_for_angle(drift.expected_angle_deg(0.3, D, "isotropic", convention), D, "isotropic",
                                     convention)) == pytest.approx(0.3, rel=1e-4)


def test_directional_angle_is_exact():
  x = _x(64)
  dr = drift.make_drift("directional", jax.random.key(4), D)
  v = dr.direction
  cos_a = np.asarray(drift.unit(x) @ v, np.float64)
  for sigma in (0.01, 0.1, 1.0):
    want = np.degrees(np.arctan2(sigma * np.sqrt(1 - cos_a ** 2), 1 + sigma * cos_a))
    np.testing.assert_allclose(angle(x, apply(dr, None, x, sigma)), want, rtol=1e-3, atol=1e-4)
  xo = x - (x @ v)[:, None] * v  # orthogonal to the direction: exactly atan(sigma)
  np.testing.assert_allclose(angle(xo, apply(dr, None, xo, 0.3)), math.degrees(math.atan(0.3)), rtol=1e-4)


def test_subspace_rotation_angles_and_orthogonality():
  x = _x(64)
  dr = drift.make_drift("subspace", jax.random.key(5), D, k=33)
  q = np.asarray(dr.basis, np.float64)
  c = np.asarray(drift.unit(x), np.float64) @ q
  inside = jnp.asarray(c[:, :32] @ q[:, :32].T, jnp.float32)  # in the rotated planes (the odd axis is fixed)
  c2 = np.sum(c[:, :32] ** 2, 1)
  for sigma in (0.02, 0.5, 3.0):
    theta = math.atan(sigma)
    np.testing.assert_allclose(angle(inside, apply(dr, None, inside, sigma)), math.degrees(theta), rtol=1e-3)
    xd = apply(dr, None, x, sigma)
    want = np.degrees(np.arccos(1 - c2 * (1 - math.cos(theta))))
    np.testing.assert_allclose(angle(x, xd), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(jnp.linalg.norm(xd, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)


def test_bad_family_and_convention():
  with pytest.raises(ValueError, match="unknown drift family"):
    drift.make_drift("gaussian", jax.random.key(0), 8)
  with pytest.raises(ValueError, match="unknown convention"):
    drift.make_drift("isotropic", jax.random.key(0), 8, convention="paper")


def test_perturb_weights_has_the_stated_relative_size():
  rng = np.random.default_rng(0)
  params = {"embed": jnp.asarray(rng.normal(size=(50, 16)), jnp.float32),  # a matrix: perturbed as a whole
            "layers": {"w": jnp.asarray(rng.normal(size=(3, 16, 4, 8)) * np.arange(1.0, 4.0)[:, None, None, None],
                                        jnp.float32),  # stacked: per layer slice
                       "norm": jnp.ones((3, 16))},  # vectors untouched
            "final_norm": jnp.asarray(rng.normal(size=16), jnp.float32)}
  rho = 0.05
  new = drift.perturb_weights(jax.random.key(0), params, rho)
  dw = np.asarray(new["layers"]["w"] - params["layers"]["w"]).reshape(3, -1)
  rel = np.linalg.norm(dw, axis=1) / np.linalg.norm(np.asarray(params["layers"]["w"]).reshape(3, -1), axis=1)
  np.testing.assert_allclose(rel, rho, rtol=0.05)
  rel_embed = np.linalg.norm(np.asarray(new["embed"] - params["embed"])) / np.linalg.norm(np.asarray(params["embed"]))
  assert rel_embed == pytest.approx(rho, rel=0.05)
  np.testing.assert_array_equal(new["layers"]["norm"], params["layers"]["norm"])
  np.testing.assert_array_equal(new["final_norm"], params["final_norm"])


def test_procrustes_recovers_a_planted_rotation_exactly():
  d = 24
  rng = np.random.default_rng(1)
  rot = jnp.asarray(np.linalg.qr(rng.normal(size=(d, d)))[0], jnp.float32)  # a random orthogonal matrix
  src = jnp.asarray(rng.normal(size=(200, d)), jnp.float32)
  dst = src @ rot + 0.7  # rotation and translation
  a = drift.fit_procrustes(src, dst, center=True)
  np.testing.assert_allclose(a.rotation, rot, atol=2e-5)
  new = jnp.asarray(rng.normal(size=(10, d)), jnp.float32)
  np.testing.assert_allclose(drift.apply_alignment(a, new), new @ rot + 0.7, atol=1e-4)
  b = drift.fit_procrustes(src, src @ rot, center=False)  # no translation, no centering: exact with n >= D
  np.testing.assert_allclose(b.rotation, rot, atol=2e-5)
  # Weights: dropping anchors by weight 0 equals fitting on the rest.
  w = jnp.asarray(np.arange(200) < 120, jnp.float32)
  c1 = drift.fit_procrustes(src, dst + 0.1 * src[:, ::-1], weights=w)
  c2 = drift.fit_procrustes(src[:120], (dst + 0.1 * src[:, ::-1])[:120])
  np.testing.assert_allclose(c1.rotation, c2.rotation, atol=1e-5)


def test_procrustes_with_few_anchors_undoes_a_subspace_rotation():
  x = _low_rank()
  dr = drift.make_drift("subspace", jax.random.key(8), 128, k=32)
  moved = apply(dr, None, x, 1.0)  # 45 degrees inside a 32-dimensional subspace
  before = float(jnp.mean(angle(x[64:], moved[64:])))
  plain = drift.fit_procrustes(moved[:64], x[:64])  # 64 anchors < D = 128: free on the unspanned directions
  a = drift.fit_procrustes(moved[:64], x[:64], identity_prior=1e-3)  # the identity there
  after = float(jnp.mean(angle(x[64:], drift.apply_alignment(a, moved[64:]))))
  assert after < 0.1 * before, (before, after)
  assert float(jnp.mean(angle(x[64:], drift.apply_alignment(plain, moved[64:])))) > after


@pytest.mark.parametrize("statistic", drift_alarm.STATISTICS)
def test_alarm_false_alarm_rate_is_at_most_nominal_and_it_detects_drift(statistic):
  """6 data seeds x 40 windows of 32 vs 32, permutation p-values (99 permutations); the incoming
  window undrifted (false alarms) or drifted by sigma = 0.5 along one direction (~27 degrees: power)."""
  alpha, seeds, windows, m = 0.1, 6, 40, 32
  test = jax.jit(jax.vmap(lambda ref, k, a, b: drift_alarm.two_sample_test(k, ref, a, b, statistic, 99)[1] <= alpha,
                          (None, 0, 0, 0)))
  rng = np.random.default_rng(12345)  # not a data seed: the direction must not be the data's own offset
  v = rng.normal(size=64)
  v /= np.linalg.norm(v)
  far, power = [], []
  for seed in range(seeds):
    x = np.asarray(_x(264, 64, seed=seed))
    ref = drift_alarm.fit_reference(jnp.asarray(x[:200]), k=8)  # fitted on data disjoint from the windows
    idx = np.stack([rng.permutation(64) for _ in range(windows)]) + 200
    xr, xn = x[idx[:, :m]], x[idx[:, m:]]
    un = xn / np.linalg.norm(xn, axis=-1, keepdims=True) + 0.5 * v  # directional drift (norms are irrelevant)
    keys = jax.random.split(jax.random.key(seed), windows)
    far.append(np.asarray(test(ref, keys, jnp.asarray(xr), jnp.asarray(xn))))
    power.append(np.asarray(test(ref, keys, jnp.asarray(xr), jnp.asarray(un, jnp.float32))))
  se = math.sqrt(alpha * (1 - alpha) / (seeds * windows))
  assert np.mean(far) <= alpha + 2 * se, np.mean(far)  # undrifted windows: at most the nominal rate
  assert np.mean(power) >= 0.9, np.mean(power)  # a clear drift is caught
  assert bool(drift_alarm.alarm(jax.random.key(0), ref, jnp.asarray(xr[0]), jnp.asarray(un[0], jnp.float32),
                                statistic, alpha, 99)) == bool(power[-1][0])


def test_crossing_and_recovery():
  s = [0.0, 0.01, 0.1, 1.0]
  assert drift_eval.crossing(s, [0.9, 0.9, 0.9, 0.5], 0.7) == pytest.approx(10 ** -0.5)  # halfway in log sigma
  assert drift_eval.crossing(s, [0.9, 0.5, 0.5, 0.5], 0.7) == pytest.approx(0.005)  # linear from sigma = 0
  assert math.isnan(drift_eval.crossing(s, [0.9] * 4, 0.7))
  assert drift_eval.crossing(s, [0.0, 0.2, 0.95, 1.0], 0.9, below=False) == pytest.approx(0.1, rel=0.2)
  assert drift_eval.cliff_threshold(0.9) == pytest.approx(0.7)
  assert drift_eval.recovery(0.9, 0.6, 0.85) == pytest.approx(5 / 6)
  assert math.isnan(drift_eval.recovery(0.9, 0.9, 0.9))
