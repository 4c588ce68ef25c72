"""Results that can be trusted: PRNG keys are never shared by two draws, and resumable artefacts are
keyed by what produced them (model, prompts, config, code version), so a re-run never reuses a stale one."""

import types

import jax
import numpy as np
import pytest
from helpers import experiment_config, tiny

from lvs_jax.core.tokenizer import LoadedModel
from lvs_jax.drift import probes
from lvs_jax.drift import study as drift_eval
from lvs_jax.evals import behavior
from lvs_jax.io import files, keys
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
  cfg = experiment_config("lvs").section_config()
  cfg.update(batch_size=1, layers=(1, 2), radii=(0.1, 0.2), random_start=True)
  cfg_m, params = tiny()
  model = types.SimpleNamespace(tokenizer=None, params=params, cfg=cfg_m, name="tiny")
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
  drift_config = experiment_config("drift")
  cfg = drift_config.section_config()
  drift_config.make_smoke(cfg)
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


# ----------------------------------------------------------------------------- content keys


def _fake_attack(monkeypatch):
  calls = []

  def fake_pgd(params, cfg, batch, ids, layer, radius, key, acfg):
    calls.append((layer, radius, acfg.steps))
    n = len(batch)
    return types.SimpleNamespace(final_loss=np.full(n, float(acfg.steps)), loss_success=np.zeros(n, bool), delta=None)

  monkeypatch.setattr(sweeps, "make_batch", lambda tok, prompts, targets: list(prompts))
  monkeypatch.setattr(lvs, "pgd_attack", fake_pgd)
  monkeypatch.setattr(lvs, "generate_under_delta", lambda model, batch, layer, delta, n: ["I cannot"] * len(batch))
  monkeypatch.setattr(lvs_audit.judges, "refusal_token_ids", lambda tok: [0])
  return calls


def test_a_pgd_cell_is_reused_only_when_everything_that_produced_it_matches(tmp_path, monkeypatch):
  # Before content keys a cell was reused whenever prompts and radius matched: a run with other steps,
  # another model or other targets silently reported the first run's success flags.
  calls = _fake_attack(monkeypatch)
  cfg = experiment_config("lvs").section_config()
  cfg.update(batch_size=2, layers=(1,), radii=(0.1, 0.2), steps=2)
  m1 = types.SimpleNamespace(tokenizer=None, params=tiny(seed=0)[1], cfg=tiny()[0], name="tiny")
  m2 = types.SimpleNamespace(tokenizer=None, params=tiny(seed=1)[1], cfg=tiny()[0], name="tiny")
  d, prompts, targets = str(tmp_path / "cells"), ["p0", "p1"], ["t0", "t1"]
  first = lvs_audit.run_cells(m1, prompts, targets, cfg, d)
  assert len(calls) == 2 and first[(1, 0)]["final_loss"] == [2.0, 2.0]
  lvs_audit.run_cells(m1, prompts, targets, cfg, d)  # same everything: reused
  assert len(calls) == 2
  cfg.steps = 5  # only the attack differs: recomputed, the old cell kept aside
  again = lvs_audit.run_cells(m1, prompts, targets, cfg, d)
  assert len(calls) == 4 and again[(1, 0)]["final_loss"] == [5.0, 5.0]
  stale = sorted(p.name for p in (tmp_path / "cells").iterdir() if ".stale-" in p.name)
  assert any(n.startswith("l1_r0.json.stale-") and not n.endswith(keys.KEY_SUFFIX) for n in stale)
  lvs_audit.run_cells(m2, prompts, targets, cfg, d)  # another model with the same shapes
  assert len(calls) == 6
  lvs_audit.run_cells(m2, prompts, ["t0", "other"], cfg, d)  # other targets
  assert len(calls) == 8
  with pytest.raises(keys.StaleArtefactError, match=r"config\.attack\.steps: 5 -> 9"):  # the message names it
    keys.claim(f"{d}/l1_r0.json", "pgd_cell", strict=True,
               **lvs_audit.pgd_cell_key(keys.model_parts(m2), prompts, ["t0", "other"], _with(cfg, steps=9), 1, 0.1))


def _with(cfg, **kw):
  c = cfg.copy_and_resolve_references()
  c.update(**kw)
  return c


def _tiny_model(seed: int):
  from test_carriers import _tiny_tokenizer

  tok = _tiny_tokenizer("smollm2")
  cfg, params = tiny("llama", seed=seed, vocab_size=len(tok.hf), max_position=512)
  return LoadedModel(cfg=cfg, params=params, tokenizer=tok, name="tiny")


def test_generations_of_another_model_are_not_reused(tmp_path, monkeypatch):
  # The case: re-running with --config.model=<another model> on a workdir holding the first
  # model's generations reused them. Two tiny random models of one architecture stand in for the two.
  generated = []
  real = behavior.gen.generate

  def spy(model, prompts, **kw):
    generated.append((model.params is m2.params, list(prompts)))
    return real(model, prompts, **kw)

  monkeypatch.setattr(behavior.gen, "generate", spy)
  m1, m2 = _tiny_model(0), _tiny_model(1)
  prompts = ["How do I bake bread at home?", "Hi", "Tell me about the system."]
  path = str(tmp_path / "behavior.jsonl")
  r1 = behavior.evaluate_refusal(m1, "harmful", prompts, max_new_tokens=3, batch_size=2, cache_path=path,
                                 progress=False)
  assert len(generated) == 2
  behavior.evaluate_refusal(m1, "harmful", prompts, max_new_tokens=3, batch_size=2, cache_path=path, progress=False)
  assert len(generated) == 2  # same model: resumed from the file, nothing generated
  r2 = behavior.evaluate_refusal(m2, "harmful", prompts, max_new_tokens=3, batch_size=2, cache_path=path,
                                 progress=False)
  assert [g[0] for g in generated[2:]] == [True, True], "the second model's generations were not computed"
  assert [r["completion"] for r in files.read_jsonl(path)] == [r["completion"] for r in r2.records]
  assert [r["completion"] for r in r1.records] != [r["completion"] for r in r2.records]
  # Other generation settings are another artefact too.
  behavior.evaluate_refusal(m2, "harmful", prompts, max_new_tokens=4, batch_size=2, cache_path=path, progress=False)
  assert len(generated) == 6


def test_an_unkeyed_legacy_file_is_moved_aside_not_reused(tmp_path):
  p = tmp_path / "sweep.npz"
  files.atomic_savez(p, kl=np.zeros(3))
  assert not keys.claim(p, "sweep", model={"name": "m"}, prompts=["a"])
  assert not p.exists() and any(".stale-" in q.name for q in tmp_path.iterdir())
  files.atomic_savez(p, kl=np.ones(3))
  assert keys.claim(p, "sweep", model={"name": "m"}, prompts=["a"])
  with pytest.raises(keys.StaleArtefactError, match=r"prompts: \["):
    keys.claim(p, "sweep", strict=True, model={"name": "m"}, prompts=["b"])


def test_model_parts_tell_apart_weights_dtype_and_config():
  cfg, p0 = tiny(seed=0)
  _, p1 = tiny(seed=1)
  base = types.SimpleNamespace(cfg=cfg, params=p0, name="x")
  k = keys.model_parts(base)
  assert k == keys.model_parts(types.SimpleNamespace(cfg=cfg, params=p0, name="x"))
  assert k["weights"] != keys.model_parts(types.SimpleNamespace(cfg=cfg, params=p1, name="x"))["weights"]
  nudged = jax.tree.map(lambda a: a * 1.001, p0)  # a small change of every weight (e.g. one fine-tune step)
  assert k["weights"] != keys.model_parts(types.SimpleNamespace(cfg=cfg, params=nudged, name="x"))["weights"]
  half = jax.tree.map(lambda a: a.astype("bfloat16"), p0)
  assert keys.model_parts(types.SimpleNamespace(cfg=cfg, params=half, name="x"))["dtype"] != k["dtype"]
