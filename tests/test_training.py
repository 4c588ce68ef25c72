"""Training core: completion-only loss masking, packing, gradient accumulation, data order, schedule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny

from lvs_jax.core import model as model_lib
from lvs_jax.training import core as training
from lvs_jax.training import lora


@dataclasses.dataclass
class _Hf:
  vocab: dict

  def get_vocab(self):
    return self.vocab


@dataclasses.dataclass
class FakeTokenizer:
  """Character-level stand-in for lvs_jax.core.tokenizer.Tokenizer (ids 5..94), end-of-turn id 2."""

  chat_template: str = "<|im_start|>...<|im_end|>"
  eos_ids: tuple = (2,)
  hf: _Hf = dataclasses.field(default_factory=lambda: _Hf({"<|im_end|>": 2}))

  def format_chat(self, prompt, system=None):
    return f"[{system or 'sys'}|{prompt}]>"

  def encode(self, text):
    return [5 + ord(c) % 90 for c in text]


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  words = ["kill", "bread", "python", "the", "a", "how", "bake", "sorry", "cannot", "sure"]
  text = lambda k: " ".join(rng.choice(words, rng.integers(1, k)))
  return [training.Example(text(4), text(5)) for _ in range(n)]


def test_tokenize_puts_completion_and_end_of_turn_after_the_templated_prompt():
  tok = FakeTokenizer()
  ex = training.Example("how", "ok")
  (t,), truncated = training.tokenize(tok, [ex], max_len=64)
  p = tok.encode(tok.format_chat("how"))
  assert t.n_prompt == len(p) and t.ids.tolist() == p + tok.encode("ok") + [2] and truncated == 0
  (t,), truncated = training.tokenize(tok, [training.Example("how", "a long completion")], max_len=len(p) + 3)
  assert len(t.ids) == len(p) + 3 and truncated == 1
  with pytest.raises(ValueError, match="no room"):
    training.tokenize(tok, [ex], max_len=len(p))


def test_loss_mask_covers_exactly_the_completion_targets():
  a = training.Tokenized(np.arange(10, 17, dtype=np.int32), n_prompt=4)  # 3 completion tokens
  b = training.Tokenized(np.arange(20, 25, dtype=np.int32), n_prompt=2)  # 3 completion tokens
  arr = training.pack_rows([[a], [a, b]], seq_len=16, pad_id=0)
  # Position t predicts token t+1; targets 14, 15, 16 are the completion of `a`.
  assert arr["loss_mask"][0].tolist() == [0, 0, 0, 1, 1, 1] + [0] * 10
  assert arr["targets"][0, 3:6].tolist() == [14, 15, 16]
  assert arr["loss_mask"][1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1] + [0] * 5
  assert arr["targets"][1, 8:11].tolist() == [22, 23, 24]
  assert arr["segment_ids"][1].tolist() == [1] * 7 + [2] * 5 + [0] * 4
  assert arr["positions"][1, 7:12].tolist() == [0, 1, 2, 3, 4]


def test_loss_ignores_prompt_tokens():
  cfg, params = tiny()
  exs, _ = training.tokenize(FakeTokenizer(), _examples(4), max_len=48)
  ds = training.Dataset(exs, batch_size=4, seq_len=48, pad_id=0)
  mb = jax.tree.map(lambda x: jnp.asarray(x[0]), ds.batch(0))
  grad = jax.jit(jax.value_and_grad(lambda p, b: training.loss_sums(p, None, b, cfg)[0]))
  loss, g = grad(params, mb)
  # The same number from the plain forward: mean NLL over completion tokens (and end-of-turn) only.
  logits = model_lib.forward(params, mb.tokens, cfg, attention_mask=mb.segment_ids > 0).logits
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  want = 0.0
  for i, e in enumerate(exs):
    r = ds.row_indices(0).index([i])
    for t in range(e.n_prompt - 1, len(e.ids) - 1):
      want -= float(logp[r, t, e.ids[t + 1]])
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # Scrambling every target outside the completion changes neither the loss nor its gradient.
  rnd = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, mb.targets.shape), jnp.int32)
  scrambled = dataclasses.replace(mb, targets=jnp.where(mb.loss_mask > 0, mb.targets, rnd))
  loss2, g2 = grad(params, scrambled)
  assert float(loss2) == float(loss)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_packed_rows_attend_within_each_example_only():
  cfg, params = tiny()
  a = training.Tokenized(np.arange(10, 19, dtype=np.int32), 3)
  b = training.Tokenized(np.arange(30, 36, dtype=np.int32), 2)
  arr = {k: jnp.asarray(v) for k, v in training.pack_rows([[a, b], [b]], 16, 0).items()}
  logits = training.forward_train(params, arr["tokens"], arr["segment_ids"], arr["positions"], cfg, remat=False)
  alone = model_lib.forward(params, jnp.asarray(b.ids)[None], cfg).logits[0]
  np.testing.assert_allclose(np.asarray(logits[0, 9:15]), np.asarray(alone), atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits[1, :6]), np.asarray(alone), atol=1e-5)


def test_gradient_accumulation_equals_one_big_batch():
  cfg, params = tiny()
  exs, _ = training.tokenize(FakeTokenizer(), _examples(8, seed=1), max_len=48)
  big = training.Dataset(exs, batch_size=8, seq_len=48, pad_id=0, seed=3)
  acc = training.Dataset(exs, batch_size=2, seq_len=48, pad_id=0, seed=3, micro_batches=4)
  assert big.row_indices(0) == acc.row_indices(0)
  opt = optax.sgd(1.0)  # params move by exactly -grad: compares the gradients themselves
  step = training.make_train_step(cfg, opt, params, donate=False, remat=False)
  state = training.init_state(lora.init(jax.random.key(0), cfg, 4, 8), opt)
  s1, m1 = step(state, big.batch(0))
  s2, m2 = step(state, acc.batch(0))
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
  assert float(m1["tokens"]) == float(m2["tokens"])
  for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_data_order_is_a_pure_function_of_seed_and_step():
  exs = [training.Tokenized(np.arange(3 + i % 5, dtype=np.int32), 2) for i in range(10)]
  ds = training.Dataset(exs, batch_size=3, seq_len=16, pad_id=0, seed=7)
  late = ds.row_indices(5)
  fresh = training.Dataset(exs, batch_size=3, seq_len=16, pad_id=0, seed=7)
  assert fresh.row_indices(5) == late  # no dependence on which steps were asked before
  first_epoch = [r[0] for s in range(4) for r in ds.row_indices(s)][:10]
  assert sorted(first_epoch) == list(range(10))
  other = training.Dataset(exs, batch_size=3, seq_len=16, pad_id=0, seed=8)
  assert other.row_indices(0) != ds.row_indices(0) and other.fingerprint() != ds.fingerprint()
  packed = training.Dataset(exs, batch_size=2, seq_len=16, pad_id=0, seed=7, packing=True)
  for s in range(6):
    for row in packed.row_indices(s):
      assert sum(len(exs[i].ids) for i in row) <= 16
  assert packed.batch(4).tokens.shape == (1, 2, 16)
  assert [i for s in range(3) for r in packed.row_indices(s) for i in r][:10] == list(
    packed._order(0))  # packing keeps the epoch's order


def test_schedule_warmup_then_cosine():
  sched = training.make_schedule(1e-3, total_steps=100, warmup_steps=10, end_fraction=0.1)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)
  assert float(sched(50)) < float(sched(20))


def test_bf16_compute_keeps_float32_master_weights():
  cfg, params = tiny()
  exs, _ = training.tokenize(FakeTokenizer(), _examples(4), max_len=48)
  batch = training.Dataset(exs, batch_size=4, seq_len=48, pad_id=0).batch(0)
  opt = training.make_optimizer(1e-3)
  f32 = training.make_train_step(cfg, opt, params, donate=False, remat=False)
  bf16 = training.make_train_step(cfg, opt, params, compute_dtype=jnp.bfloat16, donate=False, remat=False)
  state = training.init_state(lora.init(jax.random.key(0), cfg, 4, 8), opt)
  (_, m32), (s16, m16) = f32(state, batch), bf16(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
