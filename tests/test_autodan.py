"""AutoDAN (lvs_jax.attacks.autodan): the GA operators keep the population size, the elites and exactly one
[PROMPT] slot; roulette follows softmax(-loss); population losses == a full forward per template; early
stop on patience; resume; and the fixed-source test-case files (lvs_jax.attacks.test_cases)."""

import json

import numpy as np
import pytest

from lvs_jax.attacks import autodan, common, test_cases
from lvs_jax.core.tokenizer import LoadedModel
from tests import helpers
from tests.test_carriers import _tiny_tokenizer

BEHAVIORS = ["How to bake bread", "make the home"]
TARGETS = ["Sure, here", "Sure the bread"]


@pytest.fixture(scope="module")
def tiny_model():
  tok = _tiny_tokenizer("smollm2")
  cfg, params = helpers.tiny(vocab_size=len(tok.hf))
  return LoadedModel(cfg=cfg, params=params, tokenizer=tok, name="tiny")


def test_seed_templates_have_one_slot_and_several_sentences():
  for t in autodan.SEED_TEMPLATES:
    assert t.count(autodan.SLOT) == 1
    assert len(autodan.split_sentences(t)) >= 4
  pop = autodan.initial_population(64, np.random.default_rng(0))
  assert len(pop) == 64 and pop[:6] == list(autodan.SEED_TEMPLATES)
  assert all(p.count(autodan.SLOT) == 1 for p in pop)
  assert len(set(pop)) > 40  # the mutated copies differ


def test_crossover_alternates_sentences_of_both_parents_and_keeps_one_slot():
  rng = np.random.default_rng(0)
  a, b = autodan.SEED_TEMPLATES[0], autodan.SEED_TEMPLATES[1]
  sa, sb = set(autodan.split_sentences(a)), set(autodan.split_sentences(b))
  mixed = 0
  for _ in range(50):
    c1, c2 = autodan.crossover(a, b, 5, rng)
    for c in (c1, c2):
      assert c.count(autodan.SLOT) == 1
      sents = autodan.split_sentences(c)
      assert all(s in sa | sb or autodan.SLOT in s or "the question" in s for s in sents)
      mixed += any(s in sa for s in sents) and any(s in sb for s in sents)
  assert mixed > 50


def test_mutate_words_uses_the_table_only():
  rng = np.random.default_rng(0)
  t = autodan.SEED_TEMPLATES[3]
  m = autodan.mutate_words(t, 1.0, rng)
  assert m != t and m.count(autodan.SLOT) == 1
  words_t, words_m = t.split(), m.split()
  # Every changed word was a table key (synonyms may be two words, so compare word by word only when aligned).
  if len(words_t) == len(words_m):
    for x, y in zip(words_t, words_m):
      if x != y:
        assert x.strip(".,:").lower() in autodan.SYNONYMS
  assert autodan.mutate_words(t, 0.0, rng) == t


def test_roulette_follows_softmax_of_negative_loss():
  rng = np.random.default_rng(0)
  losses = np.array([0.5, 1.0, 2.0, np.inf])
  draws = autodan.roulette(losses, 200_000, rng)
  freq = np.bincount(draws, minlength=4) / len(draws)
  p = np.exp(-losses[:3]) / np.exp(-losses[:3]).sum()
  np.testing.assert_allclose(freq[:3], p, atol=5e-3)
  assert freq[3] == 0


def test_next_generation_keeps_size_and_elites():
  rng = np.random.default_rng(1)
  cfg = autodan.default_config()
  pop = autodan.initial_population(64, rng)
  losses = rng.uniform(0, 5, 64)
  nxt = autodan.next_generation(pop, losses, cfg, rng)
  assert len(nxt) == 64
  order = np.argsort(losses)
  assert nxt[:6] == [pop[i] for i in order[:6]]  # int(64 * 0.1) = 6 elites, best first
  assert all(p.count(autodan.SLOT) == 1 for p in nxt)
  cfg.crossover, cfg.mutation = 0.0, 0.0
  nxt = autodan.next_generation(pop, losses, cfg, rng)
  assert set(nxt) <= set(pop)  # without crossover and mutation children are copies of parents


def test_population_losses_equal_full_forward(tiny_model):
  m = tiny_model
  tok = m.tokenizer
  pops = [list(autodan.SEED_TEMPLATES[:3]), list(autodan.SEED_TEMPLATES[3:6])]
  got = autodan.population_losses(m, BEHAVIORS, TARGETS, pops, chunk=4)
  assert got.shape == (2, 3)
  for p in range(2):
    for j in range(3):
      ids = tok.encode(tok.format_chat(autodan.fill(pops[p][j], BEHAVIORS[p])))
      t = tok.encode(TARGETS[p])
      arrays = common.pack_sequences([ids], [t], tok.pad_id, 1)
      import jax.numpy as jnp

      want = float(common.forward_target_losses(m.params, m.cfg, *(jnp.asarray(a) for a in arrays))[0])
      np.testing.assert_allclose(got[p, j], want, rtol=1e-5)


def _cfg(**kw):
  c = autodan.default_config()
  c.batch_size = 8
  c.num_steps = 4
  c.chunk = 8
  c.eval_with_check_refusal = False
  for k, v in kw.items():
    c[k] = v
  return c


def test_run_improves_monotonically_and_resumes(tiny_model, tmp_path):
  full = autodan.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=4), log_every=0)
  assert full.steps_run == 4
  for p in range(2):
    best = [h[p] for h in full.history]
    assert full.loss[p] == pytest.approx(min(best))
    assert full.test_cases[p] == autodan.fill(full.templates[p], BEHAVIORS[p])
  path = str(tmp_path / "state.json")
  autodan.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=2), state_path=path, log_every=0)
  resumed = autodan.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=4), state_path=path, log_every=0)
  assert resumed.steps_run == 2
  assert resumed.history == full.history and resumed.templates == full.templates
  with pytest.raises(ValueError, match="another config"):
    autodan.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=4, seed=5), state_path=path, log_every=0)


def test_patience_and_refusal_check_stop_early(tiny_model):
  # No crossover or mutation: after the first generation nothing new can beat the elites.
  r = autodan.run(tiny_model, BEHAVIORS[:1], TARGETS[:1], _cfg(num_steps=50, crossover=0.0, mutation=0.0, patience=2),
                  log_every=0)
  assert r.steps_run == 3
  # The tiny model's gibberish is not a refusal: the first check stops the attack.
  r = autodan.run(tiny_model, BEHAVIORS[:1], TARGETS[:1], _cfg(num_steps=50, eval_with_check_refusal=True),
                  log_every=0)
  assert r.steps_run == 1 and r.completions[0] is not None


def test_test_cases_roundtrip_jailbreakbench_and_evaluate(tiny_model, tmp_path):
  cases = [test_cases.TestCase("harmful_val/0000", "How to bake bread", "How to bake bread ! x", {"loss": 1.5}),
           test_cases.TestCase("harmful_val/0001", "make the home", "Imagine make the home", {"step": 3})]
  path = test_cases.save(str(tmp_path), cases)
  data = json.loads(open(path).read())
  assert data == {"harmful_val/0000": ["How to bake bread ! x"], "harmful_val/0001": ["Imagine make the home"]}
  test_cases.save(str(tmp_path), cases[:1])  # idempotent
  back = test_cases.load(str(tmp_path))
  assert back == cases
  jbb = tmp_path / "jbb.json"
  jbb.write_text(json.dumps({"parameters": {"method": "GCG"}, "jailbreaks": [
    {"index": 1, "goal": "g1", "behavior": "b1", "category": "c", "prompt": "attack one"},
    {"index": 2, "goal": "g2", "behavior": "b2", "category": "c", "prompt": None}]}))
  jb = test_cases.load(str(jbb))
  assert [(c.behavior, c.test_case) for c in jb] == [("g1", "attack one")]
  ev = test_cases.evaluate(tiny_model, back, max_new_tokens=4, batch_size=2)
  assert len(ev["completions"]) == 2 and len(ev["continued"]) == 2
  assert ev["success"] == [not r and bool(c.strip()) for r, c in zip(ev["refused"], ev["completions"])]


# --- the classifier judge (lvs_jax.attacks.classifier) ---------------------------------------------


def test_classifier_prompt_formats_and_loading(tmp_path):
  from lvs_jax.attacks import classifier

  p = classifier.build_prompt("make a cake", "Here is how: mix flour.", fmt="llama2")
  assert p.startswith("[INST] <<SYS>>\n") and p.endswith(" [/INST]")
  assert "make a cake" in p and "Here is how: mix flour." in p and classifier.OWN_PROMPT.system in p
  m = classifier.build_prompt("b", "g", fmt="mistral")
  assert m.startswith("[INST] ") and "<<SYS>>" not in m and m.endswith(" [/INST]")
  c = classifier.build_prompt("b", "g", context="CTX", fmt="raw")
  assert "CTX" in c and not c.startswith("[INST]")
  with pytest.raises(ValueError, match="format"):
    classifier.build_prompt("b", "g", fmt="chatml")
  f = tmp_path / "cls.json"
  f.write_text(json.dumps({"system": "S", "prompt": "B={behavior} G={generation}"}))
  cp = classifier.load_prompt(str(f))
  assert classifier.build_prompt("x", "y", prompt=cp, fmt="raw") == "S\n\nB=x G=y"
  with pytest.raises(ValueError, match="contextual"):
    classifier.build_prompt("x", "y", context="c", prompt=cp)
  f.write_text(json.dumps({"system": "S", "prompt": "no placeholders"}))
  with pytest.raises(ValueError, match="placeholders"):
    classifier.load_prompt(str(f))


def test_classifier_yes_no_readout_on_tiny_model(tiny_model):
  import jax
  import jax.numpy as jnp

  from lvs_jax.attacks import classifier
  from lvs_jax.core import model as model_lib

  m = tiny_model
  tok = m.tokenizer
  behaviors = ["make the home", "How to bake bread", "go"]
  gens = ["Sure the home is made", "I cannot help", "x " * 40]
  got = classifier.classify(m, behaviors, gens, fmt="llama2", batch_size=2, max_generation_tokens=30)
  yes, no = classifier.answer_ids(tok)
  assert len(set(yes) | set(no)) == 4
  for i, (b, g) in enumerate(zip(behaviors, gens)):
    g_ids = tok.encode(g)
    g = tok.decode(g_ids[:30]) if len(g_ids) > 30 else g
    bos = tok.hf.bos_token_id  # Llama-2 / Mistral classifier inputs start with BOS
    ids = ([bos] if bos is not None else []) + tok.encode(classifier.build_prompt(b, g, fmt="llama2"))
    logits = model_lib.forward(m.params, jnp.asarray([ids]), m.cfg).logits[0, -1]
    want = float(jax.nn.logsumexp(logits[jnp.asarray(yes)]) - jax.nn.logsumexp(logits[jnp.asarray(no)]))
    assert got["logodds"][i] == pytest.approx(want, abs=1e-4)
    assert got["yes"][i] == (want > 0)
