"""The sounder geometry protocol (issue 14): within-stratum refusal carriers, a carrier pool disjoint from
the training sets, the norm- and layer-matched comparison, anisotropic controls and z-scores."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.geometry import audit as geo_audit
from lvs_jax.geometry import carriers, causal, coupling
from lvs_jax.geometry import section as geo_section
from lvs_jax.lvs import sweeps
from tests import helpers

# ----------------------------------------------------------------------------- stratified refusal carriers


def _strata_pool(seed=0, n=400, D=64, L=2, p_refuse_harmful=0.85, p_refuse_harmless=0.15):
  """Harmful / harmless prompts along h; refused harmful prompts also along r1, refused harmless along r2."""
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.normal(size=(D, 3)))[0].T  # orthonormal h, r1, r2
  h, r1, r2 = q
  harmful = np.r_[np.ones(n), -np.ones(n)].astype(np.int64)
  refused = np.r_[rng.random(n) < p_refuse_harmful, rng.random(n) < p_refuse_harmless]
  x = 0.3 * rng.normal(size=(L, 2 * n, D))
  x += 4.0 * (harmful == 1)[None, :, None] * h
  x += 1.0 * ((harmful == 1) & refused)[None, :, None] * r1
  x += 1.0 * ((harmful == -1) & refused)[None, :, None] * r2
  return x.astype(np.float32), harmful, refused, h, r1, r2


def test_stratified_carriers_recover_planted_within_stratum_directions():
  x, harmful, refused, h, r1, r2 = _strata_pool()
  st = carriers.stratified_refusal_labels(refused, harmful, min_count=8)
  assert set(st) == {carriers.REFUSAL_WITHIN_HARMFUL, carriers.REFUSAL_WITHIN_HARMLESS}
  inh, inl = st[carriers.REFUSAL_WITHIN_HARMFUL], st[carriers.REFUSAL_WITHIN_HARMLESS]
  assert inh["n_refused"] + inh["n_complied"] == 400 and inh["n_refused"] == int(refused[:400].sum())
  assert (inh["labels"][400:] == 0).all() and (inl["labels"][:400] == 0).all()
  assert inh["estimable"] and inl["estimable"]
  pooled = carriers.diff_in_means(x[:, refused], x[:, ~refused])
  within_h = carriers.diff_in_means(x[:, inh["labels"] == 1], x[:, inh["labels"] == -1])
  within_l = carriers.diff_in_means(x[:, inl["labels"] == 1], x[:, inl["labels"] == -1])
  # The pooled "refusal" carrier is mostly the harmfulness direction; the strata recover the planted ones.
  assert (coupling.cosine(pooled, h) > 0.9).all()
  assert (np.abs(coupling.cosine(pooled, r1)) < 0.35).all()
  assert (coupling.cosine(within_h, r1) > 0.9).all()
  assert (coupling.cosine(within_l, r2) > 0.9).all()
  assert (np.abs(coupling.cosine(within_h, h)) < 0.15).all()
  # Coupling with the harmfulness carrier: high for the pooled carrier, ~0 within the strata.
  res = coupling.stratified_coupling(x, harmful, x, st, pooled=pooled, n_boot=40, n_null=40, seed=0)
  pooled_c = coupling.coupling(x, harmful, x, np.where(refused, 1, -1), n_boot=0, n_null=0)
  assert (pooled_c["abs_cos"] > 0.9).all()
  for name in st:
    c = res[name]["coupling"]
    assert (c["abs_cos"] < 0.15).all() and (c["abs_cos_high"] < 0.3).all(), name
    assert res[name]["cos_pooled"].shape == (2,)
  np.testing.assert_allclose(coupling.cosine(res[carriers.REFUSAL_WITHIN_HARMFUL]["coupling"]["carrier_b"], r1),
                             coupling.cosine(within_h, r1), atol=1e-6)


def test_stratum_with_too_few_on_one_side_is_not_estimable_and_reports_counts():
  x, harmful, refused, *_ = _strata_pool(n=100, p_refuse_harmful=1.0, p_refuse_harmless=0.1)
  st = carriers.stratified_refusal_labels(refused, harmful, min_count=5)
  inh = st[carriers.REFUSAL_WITHIN_HARMFUL]
  assert (inh["n_refused"], inh["n_complied"], inh["estimable"]) == (100, 0, False)
  inl = st[carriers.REFUSAL_WITHIN_HARMLESS]
  assert inl["n_refused"] == int(refused[100:].sum()) and inl["estimable"] == (inl["n_refused"] >= 5)
  st2 = carriers.stratified_refusal_labels(refused, harmful, min_count=inl["n_refused"] + 1)
  assert not st2[carriers.REFUSAL_WITHIN_HARMLESS]["estimable"]
  res = coupling.stratified_coupling(x, harmful, x, st2, n_boot=5, n_null=5)
  assert all(r["coupling"] is None for r in res.values())
  assert res[carriers.REFUSAL_WITHIN_HARMFUL]["n_refused"] == 100
  # The section shows the counts, not numbers, for a stratum that is not estimable.
  p = geo_section._Parts()
  geo_section._strata_part(p, res, 2)
  rows = p.tables[0].rows
  assert [r[5].startswith("not estimable") for r in rows] == [True, True]
  assert rows[0][3:5] == [100, 0]
  with pytest.raises(ValueError, match="strata"):
    carriers.stratified_refusal_labels(refused, harmful[:-1], 1)


def test_pool_strata_follow_the_sets_and_xstest_labels():
  sets = dict(harmful=["a", "b"], harmless=["c"], extras=["d", "e", "f"], extras_strata=[1, -1, 0])
  np.testing.assert_array_equal(geo_audit.pool_strata(sets), [1, 1, -1, 1, -1, 0])


# ----------------------------------------------------------------------------- disjoint carrier pool


def _cfg(tmp_path, **kw):
  def f(name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return str(p)

  harmful = f("harmful.txt", [f"harmful prompt {i}" for i in range(20)])
  harmless = f("harmless.txt", [f"harmless prompt {i}" for i in range(40)])
  train_h = f("train_h.txt", ["  HARMFUL prompt 1", "harmful   prompt 3", "harmful prompt 5", "not in the pool"])
  train_l = f("train_l.txt", ["Harmless Prompt 0"])
  c = dict(seed=0, harmful=harmful, n_harmful=6, harmless=harmless, n_harmless=0, refusal_extra=(),
           n_refusal_extra=0, val_harmful=harmful, val_harmless=harmless, n_val=2, eval_harmful=harmful, n_eval=2,
           diagnostics=False, exclude_training=(train_h, train_l))
  c.update(kw)
  return types.SimpleNamespace(**c), train_h, train_l


def test_carrier_pool_is_disjoint_from_the_training_sets(tmp_path):
  cfg, train_h, train_l = _cfg(tmp_path)
  sets = geo_audit.prompt_sets(cfg)
  norm = lambda p: " ".join(p.split()).casefold()
  train = {norm(p) for p in open(train_h).read().splitlines() + open(train_l).read().splitlines()}
  for name in ("harmful", "harmless", "val_harmful", "val_harmless", "eval_harmful", "eval_harmless"):
    assert not {norm(p) for p in sets[name]} & train, name
  assert len(sets["harmful"]) == 6
  ov = sets["training_overlap"]
  assert ov["excluded"] == [train_h, train_l]
  assert ov["dropped"]["harmful"] == 3 and ov["dropped"]["harmless"] == 1
  # The filter is what removes them: without exclusions they can be drawn.
  cfg2, *_ = _cfg(tmp_path, exclude_training=(), n_harmful=17, n_val=2, n_eval=1)
  s2 = geo_audit.prompt_sets(cfg2)
  drawn = s2["harmful"] + s2["val_harmful"] + s2["eval_harmful"]
  assert len(set(drawn)) == 20 and s2["training_overlap"]["dropped"] == {"harmful": 0, "harmless": 0,
                                                                          "val_harmful": 0, "val_eval_harmless": 0,
                                                                          "eval_harmful": 0}
  # The section says which sets were excluded and how many prompts were dropped.
  notes = geo_section._notes("m", {}, dict(by_set={}), dict(pool_size=0, pool_refused=0),
                             types.SimpleNamespace(max_new_tokens=4, n_val=2, eval_harmful="x"), ov)
  assert train_h in notes and "'harmful': 3" in notes


def test_a_pool_swallowed_by_the_training_sets_fails_naming_them(tmp_path):
  cfg, train_h, _ = _cfg(tmp_path)
  cfg.exclude_training = (cfg.harmful,)
  with pytest.raises(ValueError, match="'harmful' is empty.*20 of its prompts"):
    geo_audit.prompt_sets(cfg)


def test_default_config_excludes_the_safety_sft_sets():
  from experiments.configs import geometry as geo_cfg

  c = geo_cfg.get_config()
  assert set(c.exclude_training) == {"harmful_train", "harmless_train", "safe_but_scary"}
  train = geo_audit.training_prompts(["harmful_train"])["harmful_train"]
  from lvs_jax.io import datasets as data

  kept, dropped = geo_audit.drop_training(data.load_prompts(c.harmful), {"harmful_train": train})
  assert dropped > 0 and len(kept) >= c.n_harmful + c.n_eval  # room for the pool and the held-out eval set


# ----------------------------------------------------------------------------- matched comparison


def test_matched_vectors_equalize_carriers_of_very_different_norms():
  rng = np.random.default_rng(0)
  L, D = 3, 16
  w = rng.normal(size=(L, D))  # a linear "effect" readout per layer: effect(v) = w_l . v
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  u1, wh = unit(rng.normal(size=(L, D))), unit(w)
  # Another unit direction with the same effect: the same component along w, a different orthogonal part.
  alpha = (u1 * wh).sum(-1, keepdims=True)
  perp = rng.normal(size=(L, D))
  perp = unit(perp - (perp * wh).sum(-1, keepdims=True) * wh)
  u2 = alpha * wh + np.sqrt(1 - alpha ** 2) * perp
  assert (np.abs((u1 * u2).sum(-1)) < 0.9).all()  # different directions
  a, b = 50.0 * u1, 0.05 * u2
  scale = np.array([2.0, 10.0, 30.0])
  own = lambda v: (w * v).sum(-1)
  assert np.all(np.abs(own(a)) > 100 * np.abs(own(b)) * 0.9)  # very different at their own norms
  ma, mb = carriers.matched_vectors(a, scale, 0.25), carriers.matched_vectors(b, scale, 0.25)
  np.testing.assert_allclose(np.linalg.norm(ma, axis=-1), 0.25 * scale, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(mb, axis=-1), 0.25 * scale, rtol=1e-6)
  np.testing.assert_allclose(own(ma), own(mb), rtol=1e-4)
  # A zero carrier gives a zero row, not nan.
  z = carriers.matched_vectors(np.r_[a[:2], np.zeros((1, D))], scale, 0.25)
  assert np.isfinite(z).all() and not z[2].any()


def test_matched_sweep_of_two_norms_of_one_direction_gives_equal_effects():
  cfg, params = helpers.tiny("llama")
  rng = np.random.default_rng(1)
  tp, tt = 8, 3
  toks = rng.integers(3, cfg.vocab_size, (2, tp + tt)).astype(np.int32)
  pm, tm = np.ones((2, tp), np.int32), np.ones((2, tt), np.int32)
  batch = sweeps.SweepBatch(jnp.asarray(toks), jnp.asarray(np.concatenate([pm, tm], 1)),
                            jnp.asarray(np.concatenate([pm, np.zeros_like(tm)], 1)), jnp.asarray(tm), tp)
  u = rng.normal(size=(cfg.n_layers, cfg.d_model))
  big, small = 40.0 * u, 0.01 * u
  scale = np.full(cfg.n_layers, 3.0)
  vecs = np.stack([big, small, carriers.matched_vectors(big, scale, 0.5), carriers.matched_vectors(small, scale, 0.5)])
  res = causal.add_sweep(params, cfg, batch, jnp.array([0, 1]), jnp.array([1.0]), jnp.asarray(vecs, jnp.float32),
                         jnp.array([5, 7]))
  d = np.asarray(res["refusal_delta"])[:, 0]  # [nL, nV, B]
  assert np.abs(d[:, 0] - d[:, 1]).max() > 1e-2  # own norms: different effects
  np.testing.assert_allclose(d[:, 2], d[:, 3], atol=1e-5)  # matched: equal


# ----------------------------------------------------------------------------- controls and z-scores


def test_anisotropic_controls_follow_the_planted_covariance():
  rng = np.random.default_rng(0)
  L, N, D = 2, 3000, 32
  u = np.linalg.qr(rng.normal(size=(D, 2)))[0].T  # a different top eigenvector per layer
  x = rng.normal(size=(L, N, D)) + 5.0 * rng.normal(size=(L, N, 1)) * u[:, None, :] + 7.0  # Sigma = 25 uu^T + I
  vec = rng.normal(size=(L, D)) * np.array([[3.0], [0.5]])
  ctrl = causal.anisotropic_controls(jax.random.key(0), x, vec, 500)
  assert ctrl.shape == (500, L, D) and ctrl.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(ctrl, axis=-1), np.broadcast_to(np.linalg.norm(vec, axis=-1), (500, L)),
                             rtol=1e-5)
  iso = causal.matched_controls(jax.random.key(0), vec, 500)
  for layer in range(L):
    cu = ctrl[:, layer] / np.linalg.norm(ctrl[:, layer], axis=-1, keepdims=True)
    share = (cu @ u[layer]) ** 2
    # Expected E[(u.x)^2 / |x|^2] ~ 25 / (25 + 32) = 0.44 vs 1 / D = 0.03 for isotropic directions.
    assert 0.3 < share.mean() < 0.6
    iu = iso[:, layer] / np.linalg.norm(iso[:, layer], axis=-1, keepdims=True)
    assert (iu @ u[layer]).__pow__(2).mean() < 0.08
    top = np.linalg.eigh(cu.T @ cu)[1][:, -1]
    assert abs(top @ u[layer]) > 0.95
    assert abs(top @ u[1 - layer]) < 0.2  # each layer its own covariance
  # Deterministic in the key; another key, other draws.
  np.testing.assert_array_equal(ctrl, causal.anisotropic_controls(jax.random.key(0), x, vec, 500))
  assert not np.allclose(ctrl, causal.anisotropic_controls(jax.random.key(1), x, vec, 500))


def test_anisotropic_controls_center_within_groups():
  rng = np.random.default_rng(1)
  N, D = 2000, 32
  u = np.eye(D)[0]
  g = np.where(rng.random(N) < 0.5, 1, -1)
  x = (rng.normal(size=(N, D)) + 10.0 * g[:, None] * u)[None]  # the group difference is along u
  vec = np.ones((1, D))
  pooled = causal.anisotropic_controls(jax.random.key(0), x, vec, 300)[:, 0]
  within = causal.anisotropic_controls(jax.random.key(0), x, vec, 300, groups=g)[:, 0]
  share = lambda c: (((c / np.linalg.norm(c, axis=-1, keepdims=True)) @ u) ** 2).mean()
  assert share(pooled) > 0.4  # the between-group direction dominates the total covariance
  assert share(within) < 0.1  # within groups the data are isotropic: ~1 / D
  with pytest.raises(ValueError, match="groups"):
    causal.anisotropic_controls(jax.random.key(0), x, vec, 3, groups=g[:-1])


def test_z_score_against_the_control_distribution():
  assert causal.z_score(0.9, [0.1, 0.2, 0.3, 0.4]) == pytest.approx((0.9 - 0.25) / np.std([0.1, 0.2, 0.3, 0.4], ddof=1))
  assert np.isnan(causal.z_score(0.9, [0.1])) and np.isnan(causal.z_score(0.9, [0.2, 0.2]))
  rng = np.random.default_rng(0)
  N, K = 50, 8
  offsets = np.linspace(-0.1, 0.1, K)
  controls = rng.normal(size=(1, N)) * 0.01 + offsets[:, None]
  treated = controls.mean(0) + 0.5  # planted effect 0.5 over the controls' mean
  e = causal.effect_vs_controls(treated, controls, n_boot=50)
  assert e["effect"] == pytest.approx(0.5)
  assert e["control_std"] == pytest.approx(np.std(controls.mean(-1), ddof=1))
  assert e["z"] == pytest.approx(0.5 / np.std(offsets, ddof=1), rel=1e-6)
  assert causal.effect_vs_controls(controls.mean(0), controls, n_boot=10)["z"] == pytest.approx(0.0, abs=1e-9)


def test_cell_effects_report_anisotropic_controls_and_z():
  K = 3
  cfg = types.SimpleNamespace(n_controls=K, ablate=False, gen_harmful_coefficients=(-1.0,),
                              gen_harmless_coefficients=(), n_boot_effects=20, seed=0,
                              control_kinds=("isotropic", "anisotropic"))
  cell = lambda refused: dict(refused=list(map(bool, refused)), refusal_score=[float(r) for r in refused],
                              completions=["a long enough answer right here"] * 4, spec={"layer": 2})
  c = {("harmful", "baseline"): cell([1, 1, 1, 1]), ("harmless", "baseline"): cell([0, 0, 0, 0]),
       ("harmful", "add-1_h"): cell([0, 0, 0, 0])}
  for k, pattern in enumerate(([1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0])):
    c[("harmful", f"add-1_h_control{k}")] = cell(pattern)
    c[("harmful", f"add-1_h_acontrol{k}")] = cell([0, 0, 0, 0] if k else [0, 0, 0, 1])
  (row,) = geo_audit.cell_effects(c, {"h": None}, cfg)
  iso_means = np.array([0.0, 0.25, 0.5])
  assert row["rate"]["z"] == pytest.approx((1.0 - iso_means.mean()) / iso_means.std(ddof=1))
  aniso_means = np.array([0.75, 1.0, 1.0])
  assert row["rate_aniso"]["control_mean"] == pytest.approx(aniso_means.mean())
  assert row["rate_aniso"]["z"] == pytest.approx((1.0 - aniso_means.mean()) / aniso_means.std(ddof=1))
  specs = geo_audit.cell_specs({"h": types.SimpleNamespace(selected_layer=1)}, types.SimpleNamespace(
    n_controls=2, ablate=True, control_kinds=("isotropic", "anisotropic"), gen_harmful_coefficients=(-1.0,),
    gen_harmless_coefficients=()), {"h": 3})
  names = {s["name"] for s in specs}
  assert {"ablate_h_acontrol0", "ablate_h_acontrol1", "add-1_h_acontrol1", "ablate_control1"} <= names


def test_sweep_vector_layout_and_the_matched_table():
  L, D, K = 4, 8, 2
  rng = np.random.default_rng(0)
  cs = {n: carriers.Carrier(n, rng.normal(size=(L, D)).astype(np.float32) * s, "last")
        for n, s in ((carriers.HARMFULNESS, 5.0), (carriers.REFUSAL, 0.1))}
  x = rng.normal(size=(L, 30, D)).astype(np.float32)
  labels = {carriers.HARMFULNESS: np.r_[np.ones(15), -np.ones(15)].astype(np.int64)}
  labels[carriers.REFUSAL] = labels[carriers.HARMFULNESS]
  cfg = types.SimpleNamespace(n_controls=K, seed=0, control_kinds=("isotropic", "anisotropic"), matched_rel_norm=0.3)
  controls = geo_audit.all_controls(cs, {n: x for n in cs}, labels, cfg)
  matched = geo_audit.matched_set(cs, x, labels, cfg)
  vecs, names, bounds = geo_audit.sweep_vectors(cs, controls, matched)
  assert names == ["carriers", "isotropic", "anisotropic", "matched", "matched_isotropic", "matched_anisotropic"]
  assert bounds.tolist() == [[0, 2], [2, 6], [6, 10], [10, 12], [12, 14], [14, 16]] and vecs.shape == (16, L, D)
  # Own-norm controls carry each carrier's norm; matched vectors and their controls one common norm.
  np.testing.assert_allclose(np.linalg.norm(vecs[6:8], axis=-1), np.broadcast_to(cs[carriers.HARMFULNESS].norms,
                                                                                  (2, L)), rtol=1e-5)
  common = 0.3 * carriers.activation_scale(x)
  np.testing.assert_allclose(np.linalg.norm(vecs[10:], axis=-1), np.broadcast_to(common, (6, L)), rtol=1e-5)
  # The matched table reads the blocks: a planted refusal score equal to the vector index.
  B = 3
  rs = np.broadcast_to(np.arange(16.0)[None, None, :, None], (2, 1, 16, B)).copy()
  res = dict(layers=np.array([0, 2]), coefficients=np.array([-1.0]), refusal_score=rs, kl=np.zeros_like(rs),
             clean_refusal_score=np.zeros(B), block_names=np.asarray(names), block_bounds=bounds)
  p = geo_section._Parts()
  geo_section._matched_part(p, sorted(cs), {"harmful": res}, cfg)
  rows = {(r[1], r[2]): r for r in p.tables[0].rows}
  assert rows[(carriers.HARMFULNESS, 0)][4] == 10.0 and rows[(carriers.REFUSAL, 0)][4] == 11.0
  assert rows[(carriers.HARMFULNESS, 0)][5] == pytest.approx(10.0 - 12.5)  # vs matched isotropic controls (12, 13)
  assert rows[(f"{carriers.REFUSAL} - {carriers.HARMFULNESS}", 2)][4] == pytest.approx(1.0)
  assert p.summary[f"matched/{carriers.REFUSAL}_minus_harmfulness/layer2"] == pytest.approx(1.0)


def test_stratified_coupling_step_caches_by_content(tmp_path):
  x, harmful, refused, h, r1, r2 = _strata_pool(n=100)
  sets = dict(harmful=[f"h{i}" for i in range(100)], harmless=[f"l{i}" for i in range(100)], extras=[],
              extras_strata=[])
  model = types.SimpleNamespace(params={"w": np.ones(3, np.float32)}, cfg=types.SimpleNamespace(n_layers=2),
                                name="fake")
  cs = {carriers.REFUSAL: carriers.carrier_from_activations(carriers.REFUSAL, x[:, refused], x[:, ~refused])}
  cfg = types.SimpleNamespace(seed=0, n_boot=20, n_null=20, min_stratum=5)
  run = lambda c: geo_audit.run_stratified_coupling(model, sets, x, x, {carriers.HARMFULNESS: harmful},
                                                    dict(refused=refused), cs, c, str(tmp_path))
  first = run(cfg)
  stamp = (tmp_path / "coupling_strata.npz").stat().st_mtime_ns
  again = run(cfg)
  assert (tmp_path / "coupling_strata.npz").stat().st_mtime_ns == stamp  # loaded, not recomputed
  for name in first:
    assert first[name]["estimable"] and again[name]["estimable"]
    np.testing.assert_array_equal(first[name]["coupling"]["abs_cos_high"], again[name]["coupling"]["abs_cos_high"])
    np.testing.assert_allclose(first[name]["cos_pooled"], again[name]["cos_pooled"])
  assert (coupling.cosine(cs[carriers.REFUSAL].vectors, h) > 0.9).all()
  # A new setting is a new key: recomputed, never the old cache.
  strict = run(types.SimpleNamespace(seed=0, n_boot=20, n_null=20, min_stratum=1000))
  assert all(r["coupling"] is None and not r["estimable"] for r in strict.values())
  assert (tmp_path / "coupling_strata.npz").stat().st_mtime_ns != stamp
