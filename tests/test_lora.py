"""LoRA: zero-initialized B is the identity, one step moves only B, merge equals the unmerged forward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny, torch_model

from lvs_jax.core import model as model_lib
from lvs_jax.training import core as training
from lvs_jax.training import lora


def _batch(cfg, k=1, b=2, T=12, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, cfg.vocab_size, (k, b, T)).astype(np.int32)
  mask = np.ones((k, b, T), np.float32)
  mask[..., :4] = 0  # a 4-token "prompt"
  return training.Batch(tokens=tok, targets=np.roll(tok, -1, axis=-1), loss_mask=mask,
                        segment_ids=np.ones((k, b, T), np.int32),
                        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (k, b, T)).copy())


def test_shapes_and_modules():
  cfg, params = tiny()
  lp = lora.init(jax.random.key(0), cfg, rank=4, alpha=8)
  assert lp.modules == lora.ALL_MODULES and lp.rank == 4 and lp.scale == 2.0
  assert lp.weights["q"].a.shape == (cfg.n_layers, cfg.d_model, 4)
  assert lp.weights["q"].b.shape == (cfg.n_layers, 4, cfg.n_heads * cfg.head_dim)
  assert lp.weights["o"].a.shape == (cfg.n_layers, cfg.n_heads * cfg.head_dim, 4)
  assert lp.weights["down"].b.shape == (cfg.n_layers, 4, cfg.d_model)
  assert jax.tree.structure(lp) == jax.tree.structure(lora.abstract_lora(cfg, 4, 8))
  assert lora.init(jax.random.key(0), cfg, 2, 2, modules=("v", "q")).modules == ("q", "v")
  with pytest.raises(ValueError, match="unknown"):
    lora.init(jax.random.key(0), cfg, 2, 2, modules=("q", "mlp"))


def test_zero_b_leaves_weights_and_outputs_unchanged():
  cfg, params = tiny()
  lp = lora.init(jax.random.key(1), cfg, rank=4, alpha=16)
  merged = lora.merge(params, lp)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  np.testing.assert_array_equal(np.asarray(model_lib.forward(merged, tokens, cfg).logits),
                                np.asarray(model_lib.forward(params, tokens, cfg).logits))


def test_one_step_from_zero_b_keeps_outputs_at_step_zero_and_moves_only_b():
  cfg, params = tiny()
  lp = lora.init(jax.random.key(1), cfg, rank=4, alpha=8)
  opt = training.make_optimizer(1e-2, weight_decay=0.0)
  state = training.init_state(lp, opt)
  batch = _batch(cfg)
  step = training.make_train_step(cfg, opt, params, donate=False, remat=False)
  new, metrics = step(state, batch)
  # The step's loss (computed with the initial adapters) is the base model's loss: to one float32 rounding, since
  # the two are different compiled programs (bit-equal on one CPU, 1 ulp apart on another without AVX-512).
  mb = jax.tree.map(lambda x: x[0], batch)
  nll, (n, _) = training.loss_sums(params, None, mb, cfg)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), np.asarray(nll / n), rtol=5e-7, atol=0)
  # d loss / d a = 0 when b = 0, so Adam leaves a exactly where it was; b moves.
  for m in lp.modules:
    np.testing.assert_array_equal(np.asarray(new.params.weights[m].a), np.asarray(lp.weights[m].a))
    assert float(jnp.abs(new.params.weights[m].b).max()) > 0
  assert int(new.step) == 1


def _random_lora(cfg, modules=lora.ALL_MODULES, seed=3):
  lp = lora.init(jax.random.key(seed), cfg, rank=3, alpha=6, modules=modules)
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(lp.weights)))
  return lora.LoraParams({m: lora.LoraWeights(w.a, 0.05 * jax.random.normal(next(keys), w.b.shape))
                          for m, w in lp.weights.items()}, lp.scale)


def test_merge_equals_unmerged_forward_in_torch():
  """forward(merge(base, lora)) == a transformers model running W x + s B(A x) with hooks (unmerged)."""
  import torch

  cfg, params = tiny()
  lp = _random_lora(cfg)
  tm = torch_model(params, cfg)
  names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
  for m, w in lp.weights.items():
    a, b = np.asarray(w.a), np.asarray(w.b)
    for i, layer in enumerate(tm.model.layers):
      mod = layer.get_submodule(names[m])
      A, B = torch.tensor(a[i]), torch.tensor(b[i])
      mod.register_forward_hook(lambda _m, inp, out, A=A, B=B: out + lp.scale * (inp[0] @ A) @ B)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11))
  with torch.no_grad():
    want = tm(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model_lib.forward(lora.merge(params, lp), jnp.asarray(tokens, jnp.int32), cfg).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # The same adapters run unmerged inside the training forward give the same logits too.
  seg = np.ones_like(tokens, np.int32)
  pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  inside = training.forward_train(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(seg), jnp.asarray(pos), cfg,
                                  lora=lp)
  np.testing.assert_allclose(np.asarray(inside), want, atol=1e-4, rtol=1e-4)


def test_bf16_lora_update_below_weight_resolution_reaches_the_output():
  """With bfloat16 base weights, an adapter delta below 2^-8 |W| (half a bf16 ulp: merging W + s a @ b in
  bf16 rounds it away exactly) still changes the training forward, and moves the loss as in float32."""
  cfg, params = tiny()
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  lp = lora.init(jax.random.key(0), cfg, rank=2, alpha=2, modules=("q", "v", "up", "down"))
  # b chosen so that every entry of s a @ b is below 2^-9 |W| entrywise (elementwise relative update).
  weights = {}
  for m, w in lp.weights.items():
    W = np.abs(np.asarray(getattr(p16.layers, lora.MODULES[m][0]), np.float32)).reshape(w.a.shape[0], w.a.shape[1], -1)
    delta = np.asarray(w.a) @ np.ones(w.b.shape, np.float32)  # [L, I, O]: rank 1 per layer (two equal rows of b)
    c = float((2.0 ** -9) * np.min(W / np.maximum(np.abs(delta), 1e-30)))
    weights[m] = lora.LoraWeights(w.a, jnp.full(w.b.shape, c / lp.scale, jnp.float32))
  lp = lora.LoraParams(weights, lp.scale)
  for m, w in lp.weights.items():  # the premise: the update is below bf16 resolution of every weight
    W = getattr(p16.layers, lora.MODULES[m][0])
    merged = W + lora.delta(w, lp.scale, W.shape).astype(W.dtype)
    np.testing.assert_array_equal(np.asarray(merged, np.float32), np.asarray(W, np.float32))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  seg = jnp.ones(tokens.shape, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), tokens.shape)
  base = np.asarray(training.forward_train(p16, tokens, seg, pos, cfg, remat=False))
  adapted = np.asarray(training.forward_train(p16, tokens, seg, pos, cfg, remat=False, lora=lp))
  assert np.abs(adapted - base).max() > 0
  # And the loss sees it: with zero-initialized b the bf16 loss is the base loss, with this b it moves.
  batch = jax.tree.map(lambda x: x[0], _batch(cfg))
  nll0, _ = training.loss_sums(lora.init(jax.random.key(0), cfg, 2, 2, modules=("q", "v", "up", "down")), p16, batch,
                               cfg, compute_dtype=jnp.bfloat16, remat=False)
  nll1, _ = training.loss_sums(lp, p16, batch, cfg, compute_dtype=jnp.bfloat16, remat=False)
  assert float(nll1) != float(nll0)


def test_merged_export_round_trips(tmp_path):
  from lvs_jax.io import hf

  cfg, params = tiny()
  merged = lora.merge(params, _random_lora(cfg, modules=("q", "v", "down")))
  hf.save_hf_dir(merged, cfg, path=tmp_path / "m")
  back = hf.load_hf_params(tmp_path / "m", cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_training_reduces_loss_and_full_finetuning_too():
  cfg, params = tiny()
  batch = _batch(cfg, b=2, T=10)
  for trainable in (lora.init(jax.random.key(0), cfg, 4, 8), params):
    opt = training.make_optimizer(optax.constant_schedule(3e-2 if trainable is not params else 3e-3))
    step = training.make_train_step(cfg, opt, params, remat=False)
    state = training.init_state(trainable, opt)
    losses = []
    for _ in range(5):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses
