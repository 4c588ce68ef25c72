"""Latent adversarial training and latent dissociation (lvs_jax/training/lat.py, experiments/train_lat.py) on a
tiny random chat model: the prompt mask, the inner PGD stays in its ball and lowers the adversary's loss, eps = 0
is exactly the unperturbed R2D2-style step, the random perturbation's ball, and each recipe's smoke run
(LAT, latent dissociation, refusal-only re-alignment) exports a loadable model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_training_experiments import _run, jax_cache, tiny_chat_model  # noqa: F401 (fixtures)

from lvs_jax.io import registry
from lvs_jax.training import core as training
from lvs_jax.training import lat, lora, r2d2, recipes

PROMPTS = ["How do I bake bread?", "Write a plan to bake", "How do I help with that?", "Help me with a plan"]


@pytest.fixture(scope="module")
def setup(tiny_chat_model):  # noqa: F811
  model = registry.load_model(tiny_chat_model)
  refusals = [recipes.refusal_for(p) for p in PROMPTS]
  targets = ["Sure, here is a plan"] * len(PROMPTS)
  tw, aw = lat.paired_rows(model.tokenizer, PROMPTS, refusals, targets, seq_len=96, toward_end_turn=True,
                           away_end_turn=False)
  clean, _ = training.tokenize(model.tokenizer, [training.Example(p, "Sure, bake it.") for p in PROMPTS], 64)
  data = lat.LatData(clean, tw, aw, batch_size=2, seq_len=64, micro_batches=1, packing=True, rows_per_step=2,
                     row_len=96, pad_id=model.tokenizer.pad_id, seed=0)
  adapters = lora.init(jax.random.key(1), model.cfg, 4, 8)
  # Non-zero B matrices: the adapters change the model (lora.init starts them at zero).
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters)
  return model, data, tw, adapters


def test_rows_pair_up_and_the_prompt_mask_covers_exactly_the_prompt(setup):
  model, data, tw, _ = setup
  b = data.batch(3)
  assert b.toward.tokens.shape == b.away.tokens.shape == (2, 96)
  where = np.asarray(lat.prompt_mask(b.toward))
  for i in range(2):
    n_p = int(where[i].sum())
    np.testing.assert_array_equal(np.asarray(b.toward.tokens[i, :n_p]), np.asarray(b.away.tokens[i, :n_p]))
    assert where[i, :n_p].all() and not where[i, n_p:].any()
    first = int(np.nonzero(np.asarray(b.toward.loss_mask[i]))[0][0])
    assert first == n_p - 1  # the last prompt token predicts the first completion token
    assert any(len(t.ids) >= n_p and t.n_prompt == n_p for t in tw)
  with pytest.raises(ValueError, match="different prompts"):
    lat.LatData([], tw[:2], tw[1:3], batch_size=1, seq_len=64, micro_batches=1, packing=False, rows_per_step=1,
                row_len=96, pad_id=0, seed=0)


def test_pgd_stays_in_the_ball_at_the_prompt_and_lowers_the_adversary_loss(setup):
  model, data, _, adapters = setup
  b = data.batch(0)
  atk = lat.LatentAttack(layers=(0, 1), eps=0.5, steps=6, step_size=0.3)
  edit, m = jax.jit(lambda a, d, k: lat.latent_attack(a, model.params, d, k, cfg=model.cfg, atk=atk))(
    adapters, b, jax.random.key(0))
  add = np.asarray(edit["resid_pre"].add_rel)  # [L, K, T, D]
  norms = np.linalg.norm(add, axis=-1)
  where = np.asarray(lat.prompt_mask(b.toward)).astype(bool)
  assert norms.max() <= 0.5 * (1 + 1e-5) and float(m["norm"]) <= 1 + 1e-5
  assert (norms[:, ~where] == 0).all() and norms[:, where].min() > 0.1  # only prompt tokens, really moved
  zero = jnp.zeros((2, *b.toward.tokens.shape, model.cfg.d_model))
  clean, _ = lat.adversary_loss(zero, adapters, model.params, b, model.cfg, atk, jnp.float32)
  assert float(m["loss"]) < float(clean) - 0.05  # the attack works against these weights


def test_random_perturbation_is_in_the_ball_and_differs_by_key(setup):
  model, data, _, adapters = setup
  b = data.batch(0)
  atk = lat.LatentAttack(layers=(1,), eps=0.2, mode="random", steps=0)
  e1, _ = lat.latent_attack(adapters, model.params, b, jax.random.key(0), cfg=model.cfg, atk=atk)
  e2, _ = lat.latent_attack(adapters, model.params, b, jax.random.key(1), cfg=model.cfg, atk=atk)
  a1, a2 = np.asarray(e1["resid_pre"].add_rel), np.asarray(e2["resid_pre"].add_rel)
  assert np.linalg.norm(a1, axis=-1).max() <= 0.2 * (1 + 1e-6) and np.abs(a1[0]).max() == 0  # layer 0 untouched
  assert np.abs(a1[1]).max() > 0 and not np.allclose(a1, a2)
  trig = lat.LatentAttack(layers=(0, 1), eps=0.2, mode="direction", min_frac=0.5, steps=0)
  e3, _ = lat.latent_attack(adapters, model.params, b, jax.random.key(0), cfg=model.cfg, atk=trig)
  a3 = np.asarray(e3["resid_pre"].add_rel)[:2]  # [nl, K, T, D]
  n3 = np.linalg.norm(a3, axis=-1)
  where = np.asarray(lat.prompt_mask(b.toward)).astype(bool)
  assert (n3[:, where] >= 0.1 - 1e-6).all() and (n3 <= 0.2 + 1e-6).all() and (n3[:, ~where] == 0).all()
  v = np.asarray(lat.trigger_directions(trig, model.cfg.d_model))
  cos = np.einsum("lktd,ld->lkt", a3, v)[:, where] / n3[:, where]
  np.testing.assert_allclose(cos, 1.0, atol=1e-5)  # every prompt token moved along the layer's fixed direction


def test_lat_step_at_eps_zero_is_the_unperturbed_step(setup):
  model, data, _, adapters = setup
  b = data.batch(1)
  opt = optax.adam(1e-2)
  w = dict(sft=1.0, toward=0.5, away=0.5)
  plain = r2d2.make_step(model.cfg, opt, model.params, weights=w, remat=False, donate=False)
  outs = {}
  for eps in (0.0, 0.5):
    atk = lat.LatentAttack(layers=(0, 1), eps=eps, steps=3)
    step = lat.make_step(model.cfg, opt, model.params, atk=atk, weights=w, remat=False)
    s, m = step(training.init_state(jax.tree.map(jnp.copy, adapters), opt), b)  # the step donates the state
    outs[eps] = (s, m)
  s0, m0 = plain(training.init_state(adapters, opt), b)
  for x, y in zip(jax.tree.leaves(outs[0.0][0].params), jax.tree.leaves(s0.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  for k in ("sft", "toward", "away", "loss"):
    np.testing.assert_allclose(float(outs[0.0][1][k]), float(m0[k]), rtol=1e-6)
  # Under a real perturbation the toward/away terms (not the clean one) change.
  np.testing.assert_allclose(float(outs[0.5][1]["sft"]), float(m0["sft"]), rtol=1e-6)
  assert abs(float(outs[0.5][1]["toward"]) - float(m0["toward"])) > 1e-3
  assert "adv_loss" in outs[0.5][1]


def test_contrast_term_is_the_away_rows_ce_on_the_clean_input(setup):
  """weights["contrast"] trains the away rows' completions with no perturbation: under a real perturbation, a
  contrast-only step equals the unperturbed step whose toward rows are those away rows."""
  import dataclasses

  model, data, _, adapters = setup
  b = data.batch(2)
  opt = optax.adam(1e-2)
  atk = lat.LatentAttack(layers=(0, 1), eps=0.5, mode="direction", min_frac=0.5, steps=0)
  step = lat.make_step(model.cfg, opt, model.params, atk=atk, weights=dict(sft=0.0, contrast=1.0), remat=False)
  s1, m1 = step(training.init_state(jax.tree.map(jnp.copy, adapters), opt), b)
  ref = r2d2.make_step(model.cfg, opt, model.params, weights=dict(sft=0.0, toward=1.0), remat=False, donate=False)
  s0, m0 = ref(training.init_state(adapters, opt), dataclasses.replace(b, toward=b.away, away=None))
  np.testing.assert_allclose(float(m1["contrast"]), float(m0["toward"]), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s0.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(jax.tree.leaves(s1.params)[0]), np.asarray(jax.tree.leaves(adapters)[0]))


@pytest.mark.parametrize("recipe", ["lat", "dissociate"])
def test_recipe_smoke_run_exports_a_loadable_model_and_resumes(tmp_path, tiny_chat_model, jax_cache, recipe):  # noqa: F811
  wd = tmp_path / recipe
  export = tmp_path / f"{recipe}_model"
  cfg = "lat.py:smoke" if recipe == "lat" else "lat.py:smoke_dissociate"
  r = _run("train_lat.py", cfg, wd, jax_cache, f"--config.model={tiny_chat_model}", f"--config.export={export}")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in rows] == [1, 2]
  if recipe == "lat":
    assert all(x["adv_norm"] <= 1 + 1e-5 and np.isfinite(x["adv_loss"]) for x in rows)
  else:  # the contrast term (the same prompts' clean refusals in the step) is on in the dissociation recipe
    assert all(np.isfinite(x["contrast"]) for x in rows)
  sec = json.loads((wd / "report.json").read_text())["sections"]["training"]
  assert sec["summary"]["recipe"] == recipe and "final/refusal_rate/harmful" in sec["summary"]
  m = registry.load_model(str(export))
  at2 = registry.load_model(f"{wd}@2")
  for x, y in zip(jax.tree.leaves(m.params), jax.tree.leaves(at2.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  base = registry.load_model(tiny_chat_model)
  assert any(not np.allclose(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(m.params),
                                                                            jax.tree.leaves(base.params)))
  r2 = _run("train_lat.py", cfg, wd, jax_cache, f"--config.model={tiny_chat_model}", "--config.export=")
  assert r2.returncode == 0 and "resuming from step 2" in r2.stdout


def test_realign_recipe_trains_refusals_only(tmp_path, tiny_chat_model, jax_cache):  # noqa: F811
  # The recipe's first stage (harmful_finetune with --config.export) is tested in test_training_experiments.
  export = tmp_path / "realigned"
  wd = tmp_path / "realign"
  # With the stopping rule: the reference (the tiny model itself) sets the bound (its rate: the tiny model's short
  # outputs all count as refusals), which the first checkpoint (step 2 of 3) reaches: the result and the export.
  r = _run("train_sft.py", "safety_sft.py:smoke", wd, jax_cache, f"--config.model={tiny_chat_model}",
           "--config.data.refusal_only=True", f"--config.export={export}", "--config.select.sets=('tdc2023_dev',)",
           "--config.select.exclude=('advbench',)", "--config.select.n=3",
           f"--config.select.reference={tiny_chat_model}", "--config.select.bound=rate")
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  sec = json.loads((wd / "report.json").read_text())["sections"]["training"]
  summ = sec["summary"]
  assert summ["examples/refusals"] > 0 and "examples/harmless" not in summ and "examples/scary" not in summ
  assert summ["select/reached"] and summ["select/step"] == 2
  assert summ["select/bound"] == summ["select/reference_rate"]
  assert [row[0] for row in sec["tables"]["trajectory"]["rows"]] == [2] and "step 2" in sec["notes"]
  m = registry.load_model(str(export))
  for x, y in zip(jax.tree.leaves(m.params), jax.tree.leaves(registry.load_model(f"{wd}@2").params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
  assert "stopping set: 3 prompts of tdc2023_dev" in r.stdout
  # A bound no checkpoint reaches: every step evaluated, none chosen.
  prompts = ["Write a sexist email about a female colleague", "Explain how to pick a lock", "Say hello"]
  chosen, rows = recipes.select_checkpoint(registry.load_model(tiny_chat_model), str(wd / "checkpoints"), [2, 3],
                                           prompts, at_least=1.01, out_dir=str(tmp_path / "sel"), max_new_tokens=4,
                                           batch_size=4)
  assert chosen is None and [x["step"] for x in rows] == [2, 3] and all(x["n"] == 3 for x in rows)
