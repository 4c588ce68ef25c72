"""Coupling statistics (weights, resampling, nulls, principal angles) and the causal sweep kernels."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.geometry import carriers, causal, coupling
from lvs_jax.lvs import sweeps
from tests import helpers

IDS = jnp.array([5, 7])


def test_diff_weights_reproduce_diff_in_means_with_multiplicities():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 10, 4))
  labels = np.array([1, 1, 1, -1, -1, 0, 0, -1, 1, -1])
  w = coupling.diff_weights(labels)
  got = coupling._weighted(x, w[None])[0]
  want = carriers.diff_in_means(x[:, labels == 1], x[:, labels == -1])
  np.testing.assert_allclose(got, want, atol=1e-12)
  counts = np.array([2, 0, 1, 1, 3, 5, 5, 0, 1, 1], float)
  rep = np.repeat(np.arange(10), counts.astype(int))
  want = carriers.diff_in_means(x[:, rep[labels[rep] == 1]], x[:, rep[labels[rep] == -1]])
  np.testing.assert_allclose(coupling._weighted(x, coupling.diff_weights(labels, counts)[None])[0], want, atol=1e-12)


def test_resampling_keeps_strata_and_splits_cancel_the_group_difference():
  rng = np.random.default_rng(0)
  strata = np.array([0, 0, 0, 1, 1, 2])
  c = coupling.stratified_counts(rng, strata, 50)
  np.testing.assert_array_equal(c[:, :3].sum(1), 3)
  np.testing.assert_array_equal(c[:, 3:5].sum(1), 2)
  np.testing.assert_array_equal(c[:, 5], 1)
  labels = np.array([1] * 6 + [-1] * 4 + [0] * 3)
  s = coupling.split_labels(rng, labels, 20)
  assert (s[:, -3:] == 0).all()
  assert ((s[:, :6] == 1).sum(1) == 3).all() and ((s[:, 6:10] == 1).sum(1) == 2).all()
  # A pure group effect (every positive shifted by the same vector) vanishes from split carriers.
  x = np.zeros((1, 13, 5))
  x[0, :6] += 10.0
  split_carriers = coupling._weighted(x, coupling.diff_weights(s))
  np.testing.assert_allclose(split_carriers, 0.0, atol=1e-12)


def test_cross_cosine_and_principal_angles_basics():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 16)), rng.normal(size=(3, 16))
  c = coupling.cross_cosine(a, b)
  assert c.shape == (4, 3)
  np.testing.assert_allclose(c[2, 1], a[2] @ b[1] / np.linalg.norm(a[2]) / np.linalg.norm(b[1]))
  np.testing.assert_allclose(coupling.principal_angles(a[:2], np.array([[2.0, 1], [0, 1]]) @ a[:2]), 0, atol=1e-6)
  assert coupling.overlap(a[:2], a[:2]) == pytest.approx(1.0)
  # Random k-dim subspaces of a large space overlap by about k / D.
  d, k = 400, 5
  ov = [coupling.overlap(rng.normal(size=(k, d)), rng.normal(size=(k, d))) for _ in range(20)]
  assert abs(np.mean(ov) - k / d) < 0.01


def test_coupling_rejects_bad_labels():
  x = np.zeros((2, 4, 3))
  with pytest.raises(ValueError, match="at least one positive"):
    coupling.coupling(x, np.array([1, 1, 0, 0]), x, np.array([1, -1, 1, -1]))
  with pytest.raises(ValueError, match=r"\+1"):
    coupling.coupling(x, np.array([2, 1, -1, 0]), x, np.array([1, -1, 1, -1]))


# ----------------------------------------------------------------------------- causal kernels


def _batch(cfg, seed=0, B=3, tp=10, tt=4):
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, cfg.vocab_size, (B, tp + tt)).astype(np.int32)
  pm = np.ones((B, tp), np.int32)
  pm[1, :3] = 0  # left padding
  tm = np.ones((B, tt), np.int32)
  tm[2, 2:] = 0
  mask = np.concatenate([pm, tm], 1)
  return sweeps.SweepBatch(jnp.asarray(toks), jnp.asarray(mask),
                           jnp.asarray(np.concatenate([pm, np.zeros_like(tm)], 1)), jnp.asarray(tm), tp)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _metrics(params, cfg, batch, edit):
  out = model_lib.forward(params, batch.tokens, cfg, attention_mask=batch.mask, edit=edit,
                          logits_positions=sweeps.readout_positions(batch))
  return sweeps.metrics_from_logits(out.logits, batch, IDS)


def test_add_sweep_matches_manual_edits_and_zero_is_clean():
  cfg, params = helpers.tiny("llama")
  batch = _batch(cfg)
  vecs = jax.random.normal(jax.random.key(1), (2, cfg.n_layers, cfg.d_model))
  coefs = jnp.array([0.0, -1.5, 2.0])
  res = causal.add_sweep(params, cfg, batch, jnp.array([0, 2]), coefs, vecs, IDS)
  assert res["refusal_score"].shape == (2, 3, 2, 3)
  np.testing.assert_allclose(res["refusal_delta"][:, 0], 0.0, atol=1e-5)
  np.testing.assert_allclose(res["kl"][:, 0], 0.0, atol=1e-6)
  for li, layer in enumerate([0, 2]):
    for ci in (1, 2):
      for v in range(2):
        e = edit_lib.add_vector(cfg.n_layers, layer, coefs[ci] * vecs[v, layer], positions=batch.prompt_mask)
        want = _metrics(params, cfg, batch, e)
        np.testing.assert_allclose(res["refusal_score"][li, ci, v], want["refusal_score"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(res["target_logprob"][li, ci, v], want["target_logprob"], rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(res["refusal_delta"][:, 1:])).max() > 1e-3  # the edits do something


def test_ablation_sweep_matches_manual_ablation():
  cfg, params = helpers.tiny("llama")
  batch = _batch(cfg)
  dirs = jax.random.normal(jax.random.key(2), (3, cfg.d_model)) * 4.0
  res = causal.ablation_sweep(params, cfg, batch, dirs, IDS, chunk=2)
  assert res["refusal_score"].shape == (3, 3)
  for d in range(3):
    want = _metrics(params, cfg, batch, edit_lib.ablate_directions(cfg.n_layers, dirs[d]))
    np.testing.assert_allclose(res["refusal_score"][d], want["refusal_score"], rtol=1e-4, atol=1e-4)
  assert (np.asarray(res["kl"]) >= -1e-6).all()


def test_effect_vs_controls_and_paired_difference():
  rng = np.random.default_rng(0)
  n = 200
  baseline = (rng.random(n) < 0.1).astype(float)
  treated = np.maximum(baseline, rng.random(n) < 0.6)
  controls = np.stack([np.maximum(baseline, rng.random(n) < 0.15) for _ in range(4)])
  e = causal.effect_vs_controls(treated, controls, baseline, n_boot=500)
  assert e["effect_low"] < e["effect"] < e["effect_high"]
  assert e["effect"] == pytest.approx(treated.mean() - controls.mean())
  assert e["effect_low"] > 0.3 and e["exceeds_all_controls"]
  assert e["delta"] == pytest.approx(treated.mean() - baseline.mean())
  assert e["control_delta_low"] <= e["control_delta"] <= e["control_delta_high"]
  same = causal.paired_difference(treated, treated)
  assert same["diff"] == 0 and same["low"] == 0 and same["high"] == 0


def test_degenerate_layers_give_nan_not_noise():
  # Layer 0 at t_post_inst: every prompt has the same template token, so the carrier is float noise.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 40, 16)).astype(np.float32)
  x[0] = x[0, :1] + 1e-7 * rng.normal(size=(40, 16)).astype(np.float32)
  labels = np.r_[np.ones(20), -np.ones(20)].astype(int)
  res = coupling.coupling(x, labels, x, labels, n_boot=10, n_null=10)
  assert res["degenerate"].tolist() == [True, False]
  assert np.isnan(res["abs_cos"][0]) and np.isnan(res["cross"][0]).all() and np.isnan(res["cross"][:, 0]).all()
  assert res["abs_cos"][1] == pytest.approx(1.0)
  sub = coupling.subspace_coupling(x, labels, x, labels, k=2, n_boot=3, n_null=3)
  assert np.isnan(sub["overlap"][0]) and sub["overlap"][1] == pytest.approx(1.0)
