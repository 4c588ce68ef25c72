"""Behavioral evaluation helpers: Wilson intervals, resumable generation records."""


import pytest

from lvs_jax.evals import behavior


def test_set_result_rates():
  r = behavior.SetResult("harmful", [dict(refused=True), dict(refused=False), dict(refused=True)])
  assert r.n == 3 and r.n_refused == 2
  assert r.refusal_rate == pytest.approx(2 / 3)
  lo, hi = r.interval
  assert lo < 2 / 3 < hi


def test_refusal_scores_compile_once_for_edits_of_one_structure(monkeypatch):
  """The edit is an argument of one jitted kernel, not a constant baked into a new closure per call: two
  different edits of the same structure (and a call with fewer prompts) share one trace."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lvs_jax.core import edit as edit_lib
  from lvs_jax.core import model as model_lib
  from lvs_jax.core.tokenizer import LoadedModel
  from tests import helpers
  from tests.test_carriers import _tiny_tokenizer

  tok = _tiny_tokenizer("smollm2")
  cfg, params = helpers.tiny("llama", vocab_size=len(tok.hf), max_position=256)
  model = LoadedModel(cfg=cfg, params=params, tokenizer=tok)
  prompts = ["How to bake bread", "the home", "make the bread"]
  ids = [5, 7]
  traces = []
  forward = model_lib.forward
  monkeypatch.setattr(model_lib, "forward", lambda *a, **k: traces.append(1) or forward(*a, **k))
  behavior.last_token_refusal.clear_cache()
  e1 = edit_lib.add_vector(cfg.n_layers, 1, jax.random.normal(jax.random.key(0), (cfg.d_model,)))
  e2 = edit_lib.add_vector(cfg.n_layers, 2, jax.random.normal(jax.random.key(1), (cfg.d_model,)))
  s1 = behavior.refusal_scores(model, prompts, ids, edit=e1, batch_size=2)
  s2 = behavior.refusal_scores(model, prompts, ids, edit=e2, batch_size=2)
  assert len(traces) == 1
  assert np.abs(s1 - s2).max() > 1e-4  # the edits are really applied
  # Each score is the refusal log-odds at the last prompt token of the prompt alone under the edit.
  from lvs_jax.evals import judges

  t, m = tok.batch([tok.format_chat(prompts[2])], pad_to_multiple=1)
  logits = forward(params, jnp.asarray(t), cfg, attention_mask=jnp.asarray(m), edit=e2).logits[:, -1]
  np.testing.assert_allclose(s2[2], float(judges.refusal_score(logits, jnp.asarray(ids))[0]), atol=1e-4)
