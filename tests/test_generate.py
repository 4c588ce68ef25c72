"""Decoding kernel: KV-cache greedy == full recompute, EOS stopping, sampling, edits during decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import generate as gen
from lvs_jax.core import model as model_lib


def _prompts(cfg, seed=0):
  rng = np.random.RandomState(seed)
  toks = rng.randint(3, cfg.vocab_size, (3, 12)).astype(np.int32)
  mask = np.ones_like(toks)
  mask[1, :5] = 0
  mask[2, :9] = 0
  return np.where(mask == 1, toks, 0), mask


def _greedy_by_recompute(params, cfg, toks, mask, n, edit=None):
  """Reference: append argmax and rerun the whole sequence, n times."""
  toks, mask = jnp.asarray(toks), jnp.asarray(mask)
  out = []
  for _ in range(n):
    logits = model_lib.forward(params, toks, cfg, attention_mask=mask, edit=edit).logits[:, -1]
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    out.append(nxt)
    toks = jnp.concatenate([toks, nxt[:, None]], 1)
    mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], 1)
  return np.stack([np.asarray(o) for o in out], 1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_kv_cache_equals_recompute(arch):
  cfg, params = tiny(arch)
  toks, mask = _prompts(cfg)
  got, lengths = gen.generate_tokens(params, jnp.asarray(toks), jnp.asarray(mask), cfg, max_new_tokens=10,
                                     eos_ids=(cfg.vocab_size + 1,))
  ref = _greedy_by_recompute(params, cfg, toks, mask, 10)
  np.testing.assert_array_equal(np.asarray(got), ref)
  np.testing.assert_array_equal(np.asarray(lengths), [10, 10, 10])


def test_eos_stops_each_row_and_pads_after():
  cfg, params = tiny("llama")
  toks, mask = _prompts(cfg)
  ref = _greedy_by_recompute(params, cfg, toks, mask, 10)
  eos = int(ref[0, 3])  # row 0 hits it at step 3 (or earlier, if the token repeats)
  first = [int(np.argmax(r == eos)) if (r == eos).any() else None for r in ref]
  got, lengths = gen.generate_tokens(params, jnp.asarray(toks), jnp.asarray(mask), cfg, max_new_tokens=10,
                                     eos_ids=(eos,), pad_id=-1)
  got, lengths = np.asarray(got), np.asarray(lengths)
  for r in range(3):
    if first[r] is None:
      assert lengths[r] == 10
      np.testing.assert_array_equal(got[r], ref[r])
    else:
      k = first[r]
      assert lengths[r] == k + 1
      np.testing.assert_array_equal(got[r, : k + 1], ref[r, : k + 1])
      assert (got[r, k + 1:] == -1).all()


def test_ablation_edit_applies_during_decoding():
  cfg, params = tiny("llama")
  toks, mask = _prompts(cfg)
  d = jax.random.normal(jax.random.key(0), (cfg.d_model,))
  e = edit_lib.ablate_directions(cfg.n_layers, d)
  got, _ = gen.generate_tokens(params, jnp.asarray(toks), jnp.asarray(mask), cfg, max_new_tokens=8,
                               eos_ids=(-5,), edit=e)
  ref = _greedy_by_recompute(params, cfg, toks, mask, 8, edit=e)
  np.testing.assert_array_equal(np.asarray(got), ref)
  plain = _greedy_by_recompute(params, cfg, toks, mask, 8)
  assert (plain != ref).any(), "the ablation should change some tokens on this model"


def test_sampling_is_seeded_and_top_p_restricts_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  s = np.asarray(gen.sample_logits(logits, keys, 1.0, 0.7))
  assert set(np.unique(s)) == {0, 1}  # 0.5 + 0.3 >= 0.7: nucleus is {0, 1}
  np.testing.assert_allclose((s == 0).mean(), 0.5 / 0.8, atol=0.03)
  s_full = np.asarray(gen.sample_logits(logits, keys, 1.0, 1.0))
  np.testing.assert_allclose(np.bincount(s_full, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  s2 = np.asarray(gen.sample_logits(logits, keys, 1.0, 0.7))
  np.testing.assert_array_equal(s, s2)
  cold = np.asarray(gen.sample_logits(logits, keys, 1e-4, 1.0))
  assert (cold == 0).all()


def test_sampled_generation_runs_and_differs_by_seed():
  cfg, params = tiny("llama")
  toks, mask = _prompts(cfg)
  kw = dict(max_new_tokens=12, eos_ids=(-5,), greedy=False, temperature=1.5, top_p=0.95)
  a, _ = gen.generate_tokens(params, jnp.asarray(toks), jnp.asarray(mask), cfg, key=jax.random.key(1), **kw)
  b, _ = gen.generate_tokens(params, jnp.asarray(toks), jnp.asarray(mask), cfg, key=jax.random.key(1), **kw)
  c, _ = gen.generate_tokens(params, jnp.asarray(toks), jnp.asarray(mask), cfg, key=jax.random.key(2), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).any()


def test_completion_ids_drop_the_final_eos_only():
  out = np.array([[5, 2, 0, 0], [7, 8, 9, 4], [2, 0, 0, 0]])
  assert gen.completion_ids(out, np.array([2, 4, 1]), (2,)) == [[5], [7, 8, 9, 4], []]


def test_generate_compiles_once_for_any_prompt_count(monkeypatch):
  """3 and then 5 prompts with batch_size 4: every batch is padded to 4 rows, so one compilation serves
  both calls (before, 3 prompts compiled a batch of 3 and the 5-prompt call a batch of 4)."""
  from lvs_jax.core.tokenizer import LoadedModel
  from tests import helpers
  from tests.test_carriers import _tiny_tokenizer

  tok = _tiny_tokenizer("smollm2")
  cfg, params = helpers.tiny("llama", vocab_size=len(tok.hf), max_position=256)
  model = LoadedModel(cfg=cfg, params=params, tokenizer=tok)
  traces = []
  forward = model_lib.forward
  monkeypatch.setattr(model_lib, "forward", lambda *a, **k: traces.append(1) or forward(*a, **k))
  gen.generate_tokens.clear_cache()
  prompts = ["How to bake bread", "the home", "make the bread", "user system", "How the home"]
  few = gen.generate(model, prompts[:3], max_new_tokens=3, batch_size=4)
  n = len(traces)
  assert n == 2  # one trace: the prefill call and the decoding loop's body
  many = gen.generate(model, prompts, max_new_tokens=3, batch_size=4)
  assert len(traces) == n, "a second compilation"
  assert few.completions == many.completions[:3]
  assert len(many.completions) == 5 and len(many.tokens) == 5
