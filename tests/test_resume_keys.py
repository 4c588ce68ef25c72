"""Results that can be trusted: PRNG keys are never shared by two draws, and resumable artefacts are
keyed by what produced them (model, prompts, config, code version), so a re-run never reuses a stale one."""

import types

import jax
import numpy as np

from lvs_jax.drift import probes
from lvs_jax.drift import study as drift_eval
from lvs_jax.lvs import attack as lvs
from lvs_jax.lvs import audit as lvs_audit
from lvs_jax.lvs import sweeps


def _bits(key) -> tuple:
  return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


# ----------------------------------------------------------------------------- PRNG keys


def test_lvs_cells_draw_a_fresh_key_for_every_batch(tmp_path, monkeypatch):
  # Two prompts in batches of one: the random start of batch 2 must not repeat batch 1's.
  seen = []

  def fake_pgd(params, cfg, batch, ids, layer, radius, key, acfg):
    seen.append((layer, radius, _bits(key)))
    n = len(batch)
    return types.SimpleNamespace(final_loss=np.zeros(n), loss_success=np.zeros(n, bool), delta=None)

  monkeypatch.setattr(sweeps, "make_batch", lambda tok, prompts, targets: list(prompts))
  monkeypatch.setattr(lvs, "pgd_attack", fake_pgd)
  monkeypatch.setattr(lvs, "generate_under_delta", lambda model, batch, layer, delta, n: ["ok"] * len(batch))
  monkeypatch.setattr(lvs_audit.judges, "refusal_token_ids", lambda tok: [0])
  cfg = lvs_audit.default_config()
  cfg.update(batch_size=1, layers=(1, 2), radii=(0.1, 0.2), random_start=True)
  model = types.SimpleNamespace(tokenizer=None, params=None, cfg=None)
  lvs_audit.run_cells(model, ["p0", "p1"], ["t0", "t1"], cfg, str(tmp_path / "cells"))
  assert len(seen) == 2 * 2 * 2  # layers x radii x batches
  assert len({k for _, _, k in seen}) == len(seen), "a PRNG key was reused across batches or cells"


def test_drift_study_never_feeds_one_key_to_two_draws(monkeypatch):
  # The augmentation noise vs the augmented probe's init, and the drift basis vs the re-anchoring anchor
  # draws, shared a key: the "independent" draws were correlated.
  used = {}

  def spy(name, fn, at=0):
    def wrapped(*a, **k):
      used.setdefault(name, []).append(_bits(a[at]))
      return fn(*a, **k)
    return wrapped

  monkeypatch.setattr(probes, "augment_isotropic", spy("augment_noise", probes.augment_isotropic))
  monkeypatch.setattr(probes, "fit_select", spy("probe_init", probes.fit_select))
  monkeypatch.setattr(drift_eval.drift, "make_drift", spy("drift_basis", drift_eval.drift.make_drift, at=1))
  monkeypatch.setattr(drift_eval, "reanchor_scores", spy("anchor_draws", drift_eval.reanchor_scores))
  monkeypatch.setattr(drift_eval, "alarm_power", spy("alarm_windows", drift_eval.alarm_power))
  from lvs_jax.drift import audit as drift_audit

  cfg = drift_audit.default_config()
  drift_audit.make_smoke(cfg)
  cfg.sweep.update(families=("isotropic",), sigmas=(0.0, 0.1, 1.0, 3.0))
  cfg.augment.update(sigma=0.5, copies=1)
  rng = np.random.default_rng(0)
  d = 8
  mu = np.zeros(d)
  mu[0] = 2.0

  def sample(n):
    y = np.arange(n) % 2
    return (rng.normal(size=(n, d)) + np.where(y[:, None] == 1, mu, -mu)).astype(np.float32), y.astype(np.int32)

  (xf, yf), (xv, yv), (xt, yt) = sample(24), sample(12), sample(16)
  res = drift_eval.run_synthetic(jax.random.key(0), xf, yf, xv, yv, xt, yt, cfg)
  assert res["reanchor"], "the test needs a re-anchoring row (a finite cliff)"
  assert not set(used["augment_noise"]) & set(used["probe_init"]), "augmentation noise and probe init share a key"
  assert not set(used["drift_basis"]) & set(used["anchor_draws"]), "drift basis and anchor draws share a key"
  syn = dict(res, probes=res["probes"])
  drift_eval.run_real(jax.random.key(1), "src", 0.1, xt, yt, xt + 0.1, xf[:8], xf[:8] + 0.1, syn, cfg)
  assert not set(used["alarm_windows"][-1:]) & set(used["anchor_draws"][-1:]), "alarm and anchors share a key"
