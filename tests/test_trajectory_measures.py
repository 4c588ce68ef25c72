"""Geometry, drift and correlation measures of the trajectory analysis on synthetic checkpoints with planted
structure (lvs_jax/trajectory/measures.py): each test recovers what was planted."""

import ml_collections
import numpy as np
import pytest

from lvs_jax.trajectory import measures


def _orth(rng, d, k):
  q, _ = np.linalg.qr(rng.normal(size=(d, k)))
  return q.T  # [k, d] orthonormal rows


def _checkpoint(rng, cos_per_layer, n=40, d=24, noise=0.02):
  """Activations of one synthetic checkpoint: the harmfulness carrier is h at every layer; the refusal carrier
  at layer l is cos_l h + sin_l h_perp. Refusal labels cut across harmfulness (some harmless refused, some
  harmful complied), so the two contrasts use different prompt groups."""
  h, hp = _orth(np.random.default_rng(0), d, 2)
  la = np.where(np.arange(n) < n // 2, 1, -1)
  lb = np.where((np.arange(n) % 4) < 2, 1, -1)  # half refused, in both strata
  L = len(cos_per_layer)
  x_inst = noise * rng.normal(size=(L, n, d)) + 0.5 * la[None, :, None] * h
  r = np.array([c * h + np.sqrt(1 - c * c) * hp for c in cos_per_layer])  # [L, d]
  x_post = noise * rng.normal(size=(L, n, d)) + 0.5 * lb[None, :, None] * r[:, None, :]
  return x_inst, la, x_post, lb


def test_coupling_rising_then_falling_is_recovered_at_its_peak_layer_with_intervals():
  planted = [0.1, 0.5, 0.9, 0.6, 0.2]  # coupling at the peak layer (1), per checkpoint
  rng = np.random.default_rng(1)
  got = []
  for c in planted:
    per_layer = [0.5 * c, c, 0.25 * c]
    res = measures.checkpoint_coupling(*_checkpoint(rng, per_layer), n_boot=100, seed=0)
    assert res["peak"]["layer"] == 1
    assert res["peak"]["value"] == pytest.approx(c, abs=0.03)
    assert res["peak"]["low"] <= res["peak"]["value"] <= res["peak"]["high"]
    assert res["mean"]["value"] == pytest.approx(np.mean(per_layer), abs=0.03)
    assert res["mean"]["low"] <= res["mean"]["value"] <= res["mean"]["high"]
    assert res["harmfulness"].shape == res["refusal"].shape == (3, 24)
    got.append(res["peak"]["value"])
  assert np.argmax(got) == 2 and np.all(np.diff(got[:3]) > 0) and np.all(np.diff(got[2:]) < 0)


def test_coupling_within_a_layer_subset_reads_peak_and_mean_over_those_layers_only():
  per_layer = [0.45, 0.9, 0.2]
  x = _checkpoint(np.random.default_rng(6), per_layer)
  full = measures.checkpoint_coupling(*x, n_boot=50)
  sub = measures.checkpoint_coupling(*x, n_boot=50, within=np.array([True, False, True]))
  assert full["peak"]["layer"] == 1 and sub["peak"]["layer"] == 0
  assert sub["peak"]["value"] == pytest.approx(0.45, abs=0.03) and sub["peak"]["low"] == full["low"][0]
  assert sub["mean"]["value"] == pytest.approx(np.mean([0.45, 0.2]), abs=0.03)
  assert sub["mean"]["low"] <= sub["mean"]["value"] <= sub["mean"]["high"] < full["mean"]["low"]
  assert sub["abs_cos"] == full["abs_cos"]  # per-layer values and carriers do not depend on the subset
  np.testing.assert_array_equal(sub["refusal"], full["refusal"])
  none = measures.checkpoint_coupling(*x, n_boot=50, within=np.zeros(3, bool))
  assert none["peak"]["layer"] == -1 and np.isnan(none["mean"]["value"])


def test_coupling_mean_interval_narrows_with_less_noise():
  rng = np.random.default_rng(2)
  wide = measures.checkpoint_coupling(*_checkpoint(rng, [0.5, 0.5], noise=0.3), n_boot=100)
  tight = measures.checkpoint_coupling(*_checkpoint(rng, [0.5, 0.5], noise=0.01), n_boot=100)
  assert tight["mean"]["high"] - tight["mean"]["low"] < 0.5 * (wide["mean"]["high"] - wide["mean"]["low"])


def test_effective_rank_recovers_a_planted_rank_change():
  rng = np.random.default_rng(3)
  d = 32
  e = _orth(rng, d, 3)
  scales = rng.uniform(0.5, 3.0, size=6)
  one = scales[:, None] * e[0]  # one direction at every checkpoint, any norm
  two = np.stack([e[0]] * 3 + [e[1]] * 3)  # the carrier turns once, half-way
  three = np.stack([e[0], e[1], e[2]] * 2)
  assert measures.effective_rank(one) == pytest.approx(1.0, abs=1e-6)
  assert measures.effective_rank(two) == pytest.approx(2.0, abs=1e-6)
  assert measures.effective_rank(three) == pytest.approx(3.0, abs=1e-6)
  noisy = one + 0.005 * rng.normal(size=one.shape)
  assert 1.0 < measures.effective_rank(noisy) < 1.5  # small noise: a little above 1 (s, not s^2, enters H)
  stack = np.stack([one, two, three], axis=1)  # [K, L, D]
  np.testing.assert_allclose(measures.family_ranks(stack), [1.0, 2.0, 3.0], atol=1e-6)
  assert np.isnan(measures.effective_rank(np.zeros((3, d))))  # no direction at all


def test_spearman_on_known_inputs():
  assert measures.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == (pytest.approx(0.8), 5)  # 1 - 6*4/(5*24)
  assert measures.spearman([1, 2, 3, 4], [10, 20, 30, 1e6])[0] == pytest.approx(1.0)  # ranks, not values
  assert measures.spearman([1, 2, 3, 4], [4, 3, 2, 1])[0] == pytest.approx(-1.0)
  assert measures.spearman([1, 2, 2, 3], [1, 2, 3, 4])[0] == pytest.approx(4.5 / np.sqrt(22.5))  # tied ranks
  rho, n = measures.spearman([1, np.nan, 2, 3, 4], [1, 5, 2, 4, 3])
  assert n == 4 and rho == pytest.approx(0.8)
  assert np.isnan(measures.spearman([1, 2], [2, 1])[0]) and np.isnan(measures.spearman([1, 1, 1], [1, 2, 3])[0])
  np.testing.assert_array_equal(measures.ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def _drift_cfg(**kw):
  d = measures.default_drift_config()
  d.update(n_boot=50, k=4, n_perm=100, **kw)
  return ml_collections.ConfigDict(d)


def _embeddings(rng, n=400, d=16):
  y = (np.arange(n) < n // 2).astype(np.int32)
  mu = np.zeros(d)
  mu[0] = 2.0
  x = rng.normal(size=(n, d)) + 4.0 * np.eye(d)[1] + np.where(y[:, None] == 1, mu, -mu)
  return x.astype(np.float32), y


def test_drift_at_step_zero_is_zero_and_a_planted_rotation_is_measured():
  rng = np.random.default_rng(4)
  x0, y = _embeddings(rng)
  ref = measures.StepZero(x0, y, _drift_cfg())
  at0 = ref.compare(x0)
  assert at0["drift/angle"]["value"] == 0.0 and at0["drift/angle"]["high"] == 0.0
  assert at0["drift/probe_auc"]["value"] > 0.9  # the step-0 probe on its own held-out split
  assert not at0["drift/alarm"]["fired"]
  # Scaling moves no direction: angle 0, AUC unchanged.
  scaled = ref.compare(3.0 * x0)
  assert scaled["drift/angle"]["value"] == pytest.approx(0.0, abs=1e-3)
  assert scaled["drift/probe_auc"]["value"] == pytest.approx(at0["drift/probe_auc"]["value"])
  # Every embedding rotated by exactly 30 degrees (towards a direction orthogonal to it).
  u = x0 / np.linalg.norm(x0, axis=1, keepdims=True)
  w = rng.normal(size=x0.shape)
  w -= (w * u).sum(1, keepdims=True) * u
  w /= np.linalg.norm(w, axis=1, keepdims=True)
  th = np.radians(30.0)
  rot = ref.compare((np.cos(th) * u + np.sin(th) * w).astype(np.float32))
  assert rot["drift/angle"]["value"] == pytest.approx(30.0, abs=0.05)
  # The class direction swapped for another: the step-0 probe falls to chance, the alarm fires.
  swapped = x0.copy()
  swapped[:, [0, 5]] = swapped[:, [5, 0]]
  sw = ref.compare(swapped)
  assert sw["drift/probe_auc"]["value"] < 0.75 < at0["drift/probe_auc"]["value"]
  assert sw["drift/angle"]["value"] > 5.0 and sw["drift/alarm"]["fired"]
  with pytest.raises(ValueError, match="do not match step 0"):
    ref.compare(x0[:10])


def test_split_is_stratified_and_refuses_tiny_classes():
  y = np.array([0] * 8 + [1] * 8)
  part = measures.split(y, _drift_cfg(), 0)
  for c in (0, 1):
    assert np.bincount(part[y == c], minlength=3).tolist() == [2, 2, 4]
  with pytest.raises(ValueError, match="class 1 has 2 prompts"):
    measures.split(np.array([0] * 8 + [1] * 2), _drift_cfg(), 0)


def test_transfer_asr_excludes_own_cases_and_correlations_name_the_better_summary():
  rows = [dict(run="r", step=s, digest=dg, **{"coupling/peak": dict(value=cp), "drift/angle": dict(value=an),
                                                "asr/gcg@1": dict(rate=g)})
          for s, dg, cp, an, g in ((0, "d0", 0.9, 0.0, 0.1), (1, "d1", 0.7, 5.0, 0.2), (2, "d2", 0.8, 9.0, 0.4),
                                   (3, "d3", 0.2, 12.0, 0.3))]
  rows.append(dict(run="q", step=0, digest="d0"))  # another run sharing step 0's weights
  asr = {0: 0.1, 1: 0.2, 2: 0.5, 3: 0.6}
  cells = []
  for src in ("gcg@r@0", "gcg@q@0", "gcg@r@2", "file:jbb"):
    for r in rows:
      own = src[4:] == f"{r['run']}@{r['step']}" or (src == "gcg@q@0" and r["digest"] == "d0") or \
          (src == "gcg@r@0" and r["digest"] == "d0")
      k = 10 if own else int(round(asr.get(r["step"], 0.0) * 10))
      cells.append(dict(source=src, run=r["run"], step=r["step"], k=k, n=10))
  tr = measures.transfer_asr(rows, cells)
  assert tr[("r", 0)] == dict(value=pytest.approx(0.1), k=2, n=20)  # gcg@r@0 and gcg@q@0 are its own
  assert tr[("r", 2)]["n"] == 30 and tr[("r", 2)]["value"] == pytest.approx(0.5)
  assert tr[("q", 0)]["n"] == 20
  corr = {(c["x"], c["y"]): c for c in measures.correlations(rows, cells) if c["run"] == "r"}
  assert corr[("drift/angle", "transfer ASR")]["rho"] == pytest.approx(1.0)
  assert corr[("coupling/peak", "transfer ASR")]["rho"] == pytest.approx(-0.8)
  assert corr[("drift/angle", "fresh GCG ASR")]["n"] == 4
  assert corr[("drift/angle", "transfer ASR")]["better_for_transfer"] == "drift/angle"


def test_run_level_ranks_each_family_at_the_peak_coupling_layer_and_skips_checkpoints_without_carriers(tmp_path):
  rng = np.random.default_rng(5)
  e = _orth(rng, 8, 3)
  rows = []
  for step in range(4):
    dg = f"{step:016d}"
    d = tmp_path / "trajectory" / "models" / dg
    d.mkdir(parents=True)
    # Layer 1 couples most; harmfulness is one direction throughout, refusal turns half-way (rank 2).
    harm = np.stack([e[0], e[0]])
    ref = np.stack([e[1], e[1] if step < 2 else e[2]])
    np.savez(d / "geometry.npz", harmfulness=harm, refusal=ref, abs_cos=np.array([0.1, 0.5]))
    rows.append(dict(run="r", step=step, digest=dg, **{"coupling/peak": dict(value=0.5)}))
  np.savez(tmp_path / "trajectory" / "models" / f"{3:016d}" / "geometry.npz", harmfulness=np.stack([e[2], e[2]]),
           refusal=np.stack([e[0], e[0]]), abs_cos=np.array([0.9, 0.1]))  # stale: its row has no carrier
  rows[3]["coupling/peak"] = dict(value=None)
  cfg = ml_collections.ConfigDict(dict(geometry=measures.default_geometry_config()))
  out = measures.run_level(rows, [], cfg, str(tmp_path))
  got = {r["family"]: r for r in out["ranks"]}
  assert got["harmfulness"]["layer"] == 1 and got["harmfulness"]["k"] == 3
  assert got["harmfulness"]["rank"] == pytest.approx(1.0, abs=1e-6)
  p = np.array([np.sqrt(2), 1.0]) / (1 + np.sqrt(2))  # singular values of [e1, e1, e2]: sqrt(2), 1
  assert got["refusal"]["rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))  # ~1.98: two directions
  assert (tmp_path / "trajectory" / "run_level.json").exists()
