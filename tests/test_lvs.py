"""Perturbation sweeps and projected-gradient latent attacks on a tiny model; LVS statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import generate as gen
from lvs_jax.core import model as model_lib
from lvs_jax.evals import stats
from lvs_jax.lvs import attack as lvs
from lvs_jax.lvs import sweeps

IDS = jnp.array([5, 7])


def _batch(cfg, seed=0, B=3, tp=10, tt=4):
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, cfg.vocab_size, (B, tp + tt)).astype(np.int32)
  pm = np.ones((B, tp), np.int32)
  pm[1, :3] = 0
  tm = np.ones((B, tt), np.int32)
  tm[2, 2:] = 0
  mask = np.concatenate([pm, tm], 1)
  return sweeps.SweepBatch(jnp.asarray(toks), jnp.asarray(mask),
                           jnp.asarray(np.concatenate([pm, np.zeros_like(tm)], 1)), jnp.asarray(tm), tp)


def _edit_metrics(params, cfg, batch, layer, vec_rel, where):
  lm = edit_lib.layer_mask(cfg.n_layers, layer)[:, None, None, None]
  add = lm * vec_rel[None, None, None] * where[None, ..., None]
  out = model_lib.forward(params, batch.tokens, cfg, attention_mask=batch.mask,
                          edit={"resid_pre": edit_lib.SiteEdit(add_rel=add)},
                          logits_positions=sweeps.readout_positions(batch))
  return sweeps.metrics_from_logits(out.logits, batch, IDS)


def test_sweep_equals_python_loop_over_edit_cells_and_traces_once():
  cfg, params = tiny("llama")
  batch = _batch(cfg)
  layers, mags = jnp.array([2, 0, 1]), jnp.array([0.0, 0.2, 0.5])
  dirs = sweeps.with_negatives(sweeps.random_directions(jax.random.key(1), 2, cfg.d_model))
  f = jax.jit(chex.assert_max_traces(sweeps.sweep.__wrapped__, n=1), static_argnames=("cfg", "relative", "last_only",
                                                                                         "chunk"))
  res = f(params, cfg, batch, layers, mags, dirs, IDS, chunk=5)
  res = f(params, cfg, batch, layers, mags * 2, dirs, IDS, chunk=5)  # new values, no retrace
  for li, layer in enumerate(np.asarray(layers)):
    for mi, m in enumerate(np.asarray(mags) * 2):
      for di in range(dirs.shape[0]):
        met = _edit_metrics(params, cfg, batch, int(layer), m * dirs[di], batch.prompt_mask.astype(jnp.float32))
        np.testing.assert_allclose(res["refusal_score"][li, mi, di], met["refusal_score"], atol=1e-4)
        np.testing.assert_allclose(res["target_logprob"][li, mi, di], met["target_logprob"], atol=1e-4)
  np.testing.assert_allclose(res["refusal_delta"][:, 0], 0.0, atol=1e-5)  # magnitude 0 == clean
  np.testing.assert_allclose(res["kl"][:, 0], 0.0, atol=1e-6)
  assert float(res["kl"][:, 2].min()) > 0


def test_sweep_per_layer_directions_and_last_only():
  cfg, params = tiny("llama")
  batch = _batch(cfg)
  per_layer = jax.random.normal(jax.random.key(4), (2, cfg.n_layers, cfg.d_model))
  res = sweeps.sweep(params, cfg, batch, jnp.array([1]), jnp.array([0.3]), per_layer, IDS, last_only=True)
  where = jnp.zeros(batch.prompt_mask.shape).at[:, batch.last].set(1.0)
  for di in range(2):
    u = per_layer[di, 1] / jnp.linalg.norm(per_layer[di, 1])
    met = _edit_metrics(params, cfg, batch, 1, 0.3 * u, where)
    np.testing.assert_allclose(res["refusal_score"][0, 0, di], met["refusal_score"], atol=1e-4)
  with pytest.raises(ValueError, match="directions must be"):
    sweeps.sweep(params, cfg, batch, jnp.array([1]), jnp.array([0.3]), jnp.ones((2, 5, cfg.d_model)), IDS)


def test_next_token_kl_on_planted_distributions():
  p, q = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.25, 0.5])
  want = float(np.sum(p * np.log(p / q)))  # = 0.25 ln 2
  got = sweeps.next_token_kl(jnp.log(jnp.asarray(p, jnp.float32)), jnp.log(jnp.asarray(q, jnp.float32)))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(sweeps.next_token_kl(jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(p)))) == 0.0


def test_delta_edit_stores_one_layer_and_equals_the_full_edit():
  """delta_edit builds O(B S D) (one shared [B, S, D] tensor and an [L] mask), not [L, B, S, D], and the
  model's output under it equals the full per-layer add edit exactly."""
  cfg, params = tiny("llama")
  batch = _batch(cfg)
  B, tp, D = 3, 10, cfg.d_model
  delta = 0.5 * jax.random.normal(jax.random.key(2), (B, tp, D))
  total = tp + 6
  e = lvs.delta_edit(cfg.n_layers, 1, delta, total)
  assert sum(x.size for x in jax.tree.leaves(e)) == B * total * D + cfg.n_layers
  full = jnp.zeros((B, total, D)).at[:, :tp].set(delta)
  ref = {"resid_pre": edit_lib.SiteEdit(add=edit_lib.layer_mask(cfg.n_layers, 1)[:, None, None, None] * full[None])}
  toks, mask = batch.tokens[:, :tp], batch.mask[:, :tp]
  got = model_lib.forward(params, toks, cfg, attention_mask=mask, edit=e).logits
  want = model_lib.forward(params, toks, cfg, attention_mask=mask, edit=ref).logits
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert float(jnp.abs(got - model_lib.forward(params, toks, cfg, attention_mask=mask).logits).max()) > 1e-3


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("scope", ["token", "sequence"])
@pytest.mark.parametrize("relative", [True, False])
def test_attack_delta_stays_inside_the_ball(norm, scope, relative):
  cfg, params = tiny("llama")
  batch = _batch(cfg)
  acfg = lvs.AttackConfig(norm=norm, scope=scope, relative=relative, steps=4, step_size=0.6, success_loss=-1.0,
                          stop="loss")
  eps = 0.3 if relative else 2.0
  r = lvs.pgd_attack(params, cfg, batch, IDS, 1, eps, jax.random.key(0), acfg)
  resid, _ = sweeps.clean_pass(params, cfg, batch, IDS)
  h = resid[1] * batch.prompt_mask[..., None].astype(jnp.float32)
  d = np.asarray(r.delta)
  where = np.asarray(batch.prompt_mask, bool)
  assert np.all(d[~where] == 0)
  hn = np.asarray(h)
  D = cfg.d_model
  # size: the perturbation in the ball's own norm per constraint unit (a prompt token, or a prompt);
  # bound: the radius of that unit's ball in activation units.
  if norm == "l2" and scope == "token":
    size = np.linalg.norm(d, axis=-1)[where]
    bound = eps * (np.linalg.norm(hn, axis=-1)[where] if relative else 1.0)
  elif norm == "l2":
    size = np.sqrt((d ** 2).sum((1, 2)))
    bound = eps * (np.sqrt((hn ** 2).sum((1, 2))) if relative else 1.0)
  elif scope == "token":
    size = np.abs(d).max(-1)[where]
    bound = eps * (np.linalg.norm(hn, axis=-1)[where] / np.sqrt(D) if relative else 1.0)
  else:
    n = where.sum(1)
    size = np.abs(d).max((1, 2))
    bound = eps * (np.sqrt((hn ** 2).sum((1, 2)) / (n * D)) if relative else 1.0)
  assert np.all(size <= bound * (1 + 1e-5) + 1e-7)
  # Steps of 0.6 eps that never stop (success_loss < 0) end on the sphere: every token's (or prompt's)
  # perturbation has exactly the radius, so the projection is active and scaled by the right norm.
  np.testing.assert_allclose(size, bound, rtol=1e-4)


def test_zero_radius_leaves_logits_unchanged():
  cfg, params = tiny("llama")
  batch = _batch(cfg)
  r = lvs.pgd_attack(params, cfg, batch, IDS, 1, 0.0, jax.random.key(0), lvs.AttackConfig(steps=3))
  assert float(jnp.abs(r.delta).max()) == 0.0
  _, clean = sweeps.clean_pass(params, cfg, batch, IDS)
  np.testing.assert_allclose(r.final_loss, clean["target_nll_per_token"], atol=1e-6)


def test_attack_gradient_matches_finite_difference():
  """In float64, so the central difference is accurate enough to test the gradient tightly."""
  with jax.enable_x64(True):
    cfg, params = tiny("llama")
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    batch = _batch(cfg)
    resid, _ = sweeps.clean_pass(params, cfg, batch, IDS)
    ctx = model_lib.context(batch.mask, cfg)
    acfg = lvs.AttackConfig()
    where = batch.prompt_mask[..., None].astype(jnp.float64)

    def loss(delta):
      return lvs.attack_loss(params, cfg, ctx, batch, IDS, resid[1], jnp.int32(1), delta, acfg).sum()

    d0 = jax.random.normal(jax.random.key(3), resid[1].shape, jnp.float64) * 0.05 * where
    g = jax.grad(loss)(d0)
    v = jax.random.normal(jax.random.key(5), d0.shape, jnp.float64) * where
    h = 1e-4
    fd = (loss(d0 + h * v) - loss(d0 - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6)


def test_planted_easy_direction_is_found():
  """At the last layer, adding the target token's unembedding row raises its log-prob by
  construction; the sweep shows it and PGD finds a perturbation that makes the target likely."""
  cfg, params = tiny("llama")
  B, tp = 2, 8
  rng = np.random.RandomState(1)
  target_tok = 11
  toks = np.concatenate([rng.randint(3, cfg.vocab_size, (B, tp)), np.full((B, 1), target_tok)], 1).astype(np.int32)
  batch = sweeps.SweepBatch(jnp.asarray(toks), jnp.ones_like(jnp.asarray(toks)),
                            jnp.asarray(np.concatenate([np.ones((B, tp)), np.zeros((B, 1))], 1).astype(np.int32)),
                            jnp.ones((B, 1), jnp.int32), tp)
  head = params.lm_head[:, target_tok]
  res = sweeps.sweep(params, cfg, batch, jnp.array([cfg.n_layers - 1]), jnp.array([0.0, 0.5, 1.0, 2.0]),
                     head[None], IDS, last_only=True)
  lp = np.asarray(res["target_logprob"][0, :, 0])  # [nM, B]
  assert np.all(np.diff(lp, axis=0) > 0), lp
  # RMSNorm bounds how far one direction can push the logit: NLL saturates near 0.24 on this model.
  acfg = lvs.AttackConfig(steps=40, step_size=0.2, success_loss=0.3, stop="loss")
  r = lvs.pgd_attack(params, cfg, batch, IDS, cfg.n_layers - 1, 3.0, jax.random.key(0), acfg)
  assert bool(r.loss_success.all()), r.final_loss
  assert float(r.final_loss.max()) < 0.3 and float(-lp[0].min()) > 3.0  # clean target NLL is > 3 nats


def _greedy_emits_target(params, cfg, batch, layer, delta) -> np.ndarray:
  """[B] bool: greedy decoding of the prompts with delta added at `layer` (prompt slots only, as the
  LVS audit generates) begins with the batch's target tokens (its real ones)."""
  tp, tt = batch.n_prompt, batch.tokens.shape[1] - batch.n_prompt
  e = lvs.delta_edit(cfg.n_layers, layer, delta[:, :tp], tp + tt)
  out, _ = gen.generate_tokens(params, batch.tokens[:, :tp], batch.mask[:, :tp], cfg, max_new_tokens=tt,
                               eos_ids=(), edit=e)
  tm = np.asarray(batch.target_mask, bool)
  return np.all((np.asarray(out)[:, -tt:] == np.asarray(batch.tokens)[:, tp:]) | ~tm, axis=1)


def test_greedy_stopping_rule_agrees_with_greedy_decoding_where_the_loss_rule_does_not():
  """stop="greedy" stops a prompt iff greedy decoding under the returned delta emits its target; the
  old loss threshold can stop a prompt whose decoding does not (here: a loose threshold stops all)."""
  cfg, params = tiny("llama")
  batch = _batch(cfg, seed=4, B=6, tt=2)
  layer = cfg.n_layers - 1
  loose = lvs.pgd_attack(params, cfg, batch, IDS, layer, 0.5, jax.random.key(0),
                         lvs.AttackConfig(steps=4, success_loss=50.0, stop="loss"))
  emits = _greedy_emits_target(params, cfg, batch, layer, loose.delta)
  assert bool(np.all(loose.loss_success)) and not emits.all(), emits  # stopped, yet not broken
  for eps in (0.5, 4.0):
    r = lvs.pgd_attack(params, cfg, batch, IDS, layer, eps, jax.random.key(0),
                       lvs.AttackConfig(steps=30, step_size=0.2, stop="greedy"))
    emits = _greedy_emits_target(params, cfg, batch, layer, r.delta)
    np.testing.assert_array_equal(np.asarray(r.loss_success), emits)
  assert emits.any(), "the large radius should break some prompt on this planted-free tiny model"


def test_pgd_grid_equals_single_attacks():
  cfg, params = tiny("llama")
  batch = _batch(cfg)
  acfg = lvs.AttackConfig(steps=3, random_start=False)
  grid = lvs.pgd_grid(params, cfg, batch, IDS, jnp.array([0, 2]), jnp.array([0.1, 0.4]), jax.random.key(0), acfg)
  assert grid.delta.shape == (2, 2, *batch.tokens.shape, cfg.d_model)
  for li, layer in enumerate([0, 2]):
    for ri, eps in enumerate([0.1, 0.4]):
      one = lvs.pgd_attack(params, cfg, batch, IDS, layer, eps, jax.random.key(0), acfg)
      np.testing.assert_allclose(grid.final_loss[li, ri], one.final_loss, atol=1e-5)


def test_lvs_statistics():
  radii = np.array([0.1, 0.2, 0.4])
  success = np.array([[True, False, False], [True, True, False], [True, True, True]])  # [nR, N]
  eps = lvs.breaking_radius(success, radii)
  np.testing.assert_array_equal(eps, [0.1, 0.2, 0.4])
  np.testing.assert_allclose(lvs.success_curve(eps, radii), [1 / 3, 2 / 3, 1.0])
  # trapezoid: 0->0.1: (0+1/3)/2*0.1, 0.1->0.2: (1/3+2/3)/2*0.1, 0.2->0.4: (2/3+1)/2*0.2; over the largest
  # possible area 0.4 - 0.1/2. Per prompt: bracket midpoints 0.05, 0.15, 0.3 -> (0.4 - m) / 0.35, averaged.
  expected = ((1 / 3) / 2 * 0.1 + 0.5 * 0.1 + (5 / 3) / 2 * 0.2) / 0.35
  np.testing.assert_allclose(lvs.lvs_score(eps, radii), expected)
  np.testing.assert_allclose(expected, np.mean([(0.4 - m) / 0.35 for m in (0.05, 0.15, 0.3)]))
  assert lvs.lvs_score(np.full(5, np.inf), radii) == 0.0
  np.testing.assert_allclose(lvs.lvs_score(np.full(5, 0.1), radii), 1.0)  # the ceiling is 1 on this grid too
  val, lo, hi = lvs.bootstrap_lvs(np.array([[0.1, 0.2, np.inf, 0.4] * 5, [np.inf] * 20]), radii, n_boot=200)
  assert lo[0] <= val[0] <= hi[0] and hi[0] > lo[0]
  assert val[1] == lo[1] == hi[1] == 0.0
  with pytest.raises(ValueError, match="radii must increase"):
    lvs.breaking_radius(success, radii[::-1])


def test_target_source_picks_the_sets_own_targets_or_the_fixed_opening():
  import ml_collections

  from lvs_jax.lvs import audit as lvs_audit

  c = ml_collections.ConfigDict(dict(prompts="advbench", n_prompts=3, target="Sure, here is", target_source="file"))
  prompts, own = lvs_audit.load_targets(c)
  assert len(prompts) == 3 and own[0].startswith("Sure, here is a script") and len(set(own)) == 3
  c.target_source = "fixed"
  assert lvs_audit.load_targets(c) == (prompts, ["Sure, here is"] * 3)
  c.prompts = "harmful_val"  # no targets of its own: the fixed opening either way
  c.target_source = "file"
  assert lvs_audit.load_targets(c)[1] == ["Sure, here is"] * 3
  c.target_source = "own"
  with pytest.raises(ValueError, match="target_source"):
    lvs_audit.load_targets(c)


def test_audit_gap_is_refusal_times_lvs_with_a_joint_bootstrap():
  radii = np.array([0.1, 0.2, 0.4])
  # 4 of 5 prompts refused; over 2 layers the refused prompts break at the smallest radius, or never.
  refused = np.array([True, False, True, True, True])
  eps = np.array([[0.1, 0.1, np.inf, np.inf], [0.1, 0.1, np.inf, np.inf]])
  gap, lo, hi = lvs.audit_gap(refused, eps, radii, n_boot=400, seed=0)
  assert gap == pytest.approx(0.8 * 0.5)  # R = 0.8, LVS = 0.5 (half break at r_0 -> 1, half never -> 0)
  assert 0.0 <= lo < gap < hi <= 1.0
  # Extremes: everything refused and broken at r_0 -> 1 exactly (every resample too); nothing refused -> 0.
  assert lvs.audit_gap(np.ones(6, bool), np.full((2, 6), 0.1), radii, n_boot=50) == (1.0, 1.0, 1.0)
  assert lvs.audit_gap(np.zeros(6, bool), np.zeros((2, 0)), radii, n_boot=50) == (0.0, 0.0, 0.0)
  # Joint resampling: a planted set whose refused prompts all break gives gap samples == R samples, so the
  # interval is the bootstrap interval of R itself.
  refused = np.array([True] * 6 + [False] * 4)
  g, lo, hi = lvs.audit_gap(refused, np.full((1, 6), 0.1), radii, n_boot=300, seed=3)
  idx = stats.bootstrap_indices(3, 10, 300)
  r_lo, r_hi = stats.percentile_interval(refused[idx].mean(1))
  assert (g, lo, hi) == pytest.approx((0.6, r_lo, r_hi))
