"""Parity of the functional model with transformers (float32), and invariants of the edit protocol."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import tiny, torch_model

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig, RopeScaling

ARCHS = ["llama", "mistral", "qwen2"]


def _tokens(cfg, b=2, t=24, seed=0):
  return np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, t)).astype(np.int32)


def _torch_logits(tm, tokens, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return tm(torch.tensor(tokens, dtype=torch.long), **kw).logits.numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch):
  cfg, params = tiny(arch)
  toks = _tokens(cfg)  # 24 tokens > mistral's window of 8
  ref = _torch_logits(torch_model(params, cfg), toks)
  got = np.asarray(model_lib.forward(params, jnp.asarray(toks), cfg).logits)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_tied_embeddings_and_llama3_rope_match_transformers():
  rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=16)
  cfg, params = tiny("llama", tie_embeddings=True, rope_scaling=rs, rope_theta=500000.0)
  assert params.lm_head is None
  toks = _tokens(cfg, t=40)
  ref = _torch_logits(torch_model(params, cfg), toks)
  got = np.asarray(model_lib.forward(params, jnp.asarray(toks), cfg).logits)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  # The scaling must matter at this length, or the test proves nothing.
  plain = np.asarray(model_lib.forward(params, jnp.asarray(toks), cfg.__class__(
    **{**cfg.__dict__, "rope_scaling": None})).logits)
  assert np.abs(plain - ref).max() > 1e-3


def test_sliding_window_is_active():
  cfg, params = tiny("mistral")
  toks = jnp.asarray(_tokens(cfg, t=24))
  windowed = model_lib.forward(params, toks, cfg).logits
  full = model_lib.forward(params, toks, ModelConfig(**{**cfg.__dict__, "sliding_window": None})).logits
  np.testing.assert_array_equal(windowed[:, :8], full[:, :8])
  assert np.abs(np.asarray(windowed[:, 8:] - full[:, 8:])).max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_matches_transformers_and_unpadded(arch):
  cfg, params = tiny(arch)
  toks = _tokens(cfg, b=3, t=20, seed=1)
  mask = np.ones_like(toks)
  mask[1, :5] = 0
  mask[2, :11] = 0
  toks = np.where(mask == 1, toks, 0)
  got = np.asarray(model_lib.forward(params, jnp.asarray(toks), cfg, attention_mask=jnp.asarray(mask)).logits)
  ref = _torch_logits(torch_model(params, cfg), toks, mask)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=0)
  for b in range(3):  # padded row == the same prompt alone
    n = int(mask[b].sum())
    alone = model_lib.forward(params, jnp.asarray(toks[b:b + 1, -n:]), cfg).logits
    np.testing.assert_allclose(got[b, -n:], np.asarray(alone[0]), atol=1e-5, rtol=0)


def test_components_match_transformers():
  from transformers.models.llama import modeling_llama as ml

  cfg, params = tiny("llama")
  tm = torch_model(params, cfg)
  x = np.random.RandomState(0).randn(2, 7, cfg.d_model).astype(np.float32)
  with torch.no_grad():
    ref = tm.model.layers[0].input_layernorm(torch.tensor(x)).numpy()
  got = model_lib.rms_norm(jnp.asarray(x), params.layers.attn_norm[0], cfg.rms_eps)
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-6)
  with torch.no_grad():
    ref = tm.model.layers[0].mlp(torch.tensor(x)).numpy()
  lp = jax.tree.map(lambda a: a[0], params.layers)
  got = (jax.nn.silu(x @ lp.w_gate) * (x @ lp.w_up)) @ lp.w_down
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
  # RoPE: apply to random q at arbitrary positions.
  q = np.random.RandomState(1).randn(2, 7, cfg.n_heads, cfg.head_dim).astype(np.float32)
  pos = np.tile(np.arange(3, 10), (2, 1))
  with torch.no_grad():
    cos, sin = tm.model.rotary_emb(torch.tensor(q), torch.tensor(pos))
    ref, _ = ml.apply_rotary_pos_emb(
      torch.tensor(q).transpose(1, 2), torch.tensor(q).transpose(1, 2), cos, sin
    )
  got = model_lib.rope(jnp.asarray(q), jnp.asarray(pos), model_lib.rope_inv_freq(cfg))
  np.testing.assert_allclose(np.asarray(got), ref.transpose(1, 2).numpy(), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_kv_cache_decoding_equals_full_recompute(arch):
  cfg, params = tiny(arch)
  toks = _tokens(cfg, b=2, t=20, seed=2)
  mask = np.ones_like(toks)
  mask[0, :4] = 0
  full = np.asarray(model_lib.forward(params, jnp.asarray(toks), cfg, attention_mask=jnp.asarray(mask)).logits)
  t0 = 12
  cache = model_lib.init_cache(cfg, 2, 20)
  out = model_lib.forward(params, jnp.asarray(toks[:, :t0]), cfg, attention_mask=jnp.asarray(mask[:, :t0]),
                          cache=cache, start=0)
  valid = mask[:, :t0].astype(bool)  # padded queries attend to nothing; their logits are arbitrary
  np.testing.assert_allclose(np.asarray(out.logits)[valid], full[:, :t0][valid], atol=1e-5)
  cache = out.cache
  for t in range(t0, 20):
    out = model_lib.forward(params, jnp.asarray(toks[:, t:t + 1]), cfg,
                            attention_mask=jnp.ones((2, 1), jnp.int32), cache=cache, start=t)
    cache = out.cache
    np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, t], atol=1e-5)


def test_bfloat16_forward_close_to_float32():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  f32 = model_lib.forward(params, toks, cfg).logits
  bf = model_lib.forward(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), toks, cfg).logits
  assert bf.dtype == jnp.float32
  assert float(jnp.abs(bf - f32).max()) < 0.1 * float(jnp.abs(f32).max())


def test_full_size_shapes_without_flops():
  """A Llama-3-8B-shaped forward traced with eval_shape: shapes only, no memory."""
  cfg = ModelConfig(arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                    head_dim=128, d_ff=14336, rope_theta=500000.0, max_position=8192)
  params = model_lib.abstract_params(cfg, jnp.bfloat16)
  toks = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  out = jax.eval_shape(lambda p, t: model_lib.forward(p, t, cfg, capture=("resid_post",)), params, toks)
  assert out.logits.shape == (2, 16, 128256)
  assert out.captured["resid_post"].shape == (32, 2, 16, 4096)
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert 7.9e9 < n < 8.1e9


def test_bad_weights_shapes_error_names_them():
  cfg, params = tiny("llama")
  bad = model_lib.Params(params.embed[:, :10], params.layers, params.final_norm, params.lm_head)
  with pytest.raises(ValueError, match=r"\.embed: expected shape \(97, 64\), got \(97, 10\)"):
    model_lib.check_params(bad, cfg, "tiny")


# ----------------------------------------------------------------------------- edit protocol


def test_identity_edit_reproduces_plain_logits_exactly():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  plain = model_lib.forward(params, toks, cfg).logits
  ident = edit_lib.identity(cfg.n_layers, cfg.d_model)
  edited = model_lib.forward(params, toks, cfg, edit=ident).logits
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(edited))


def test_add_at_layer_equals_layer_axis_add_vmaps_and_differentiates():
  """add_at_layer stores one [B|1, S|1, D] tensor for every layer (no L axis): same logits as the
  equivalent `add` leaf with a layer axis, under vmap (a leading axis on the shared leaf) and grad."""
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  adds = 0.3 * jax.random.normal(jax.random.key(5), (2, 1, toks.shape[1], cfg.d_model))
  f = lambda a: model_lib.forward(params, toks, cfg, edit=edit_lib.add_at_layer(cfg.n_layers, 1, a)).logits
  full = lambda a: edit_lib.layer_mask(cfg.n_layers, 1)[:, None, None, None] * a[None]
  for a, got in zip(adds, jax.vmap(f)(adds)):
    want = model_lib.forward(params, toks, cfg, edit={"resid_pre": edit_lib.SiteEdit(add=full(a))}).logits
    np.testing.assert_array_equal(np.asarray(f(a)), np.asarray(want))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)  # vmapped: batched matmuls
  g = jax.grad(lambda a: f(a).sum())(adds[0])
  assert g.shape == adds[0].shape and float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("site", edit_lib.SITES)
def test_add_edit_equals_manual_edit_of_captured_residual(site):
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  vec = jax.random.normal(jax.random.key(3), (cfg.d_model,))
  layer = 1
  edited = model_lib.forward(params, toks, cfg, edit=edit_lib.add_vector(cfg.n_layers, layer, vec, site),
                             capture=("resid_post",))
  # By hand: take the clean residual, apply the edit, run the remaining layers.
  clean = model_lib.forward(params, toks, cfg, capture=edit_lib.SITES)
  cap = clean.captured
  if site == "resid_pre":
    h = cap["resid_pre"][layer] + vec
    start_layer = layer
  elif site == "resid_post":
    h = cap["resid_post"][layer] + vec
    start_layer = layer + 1
  elif site == "mlp_out":
    h = cap["resid_post"][layer] + vec
    start_layer = layer + 1
  else:  # attn_out: rerun the MLP of this layer on the shifted stream
    h_mid = cap["resid_pre"][layer] + cap["attn_out"][layer] + vec
    lp = jax.tree.map(lambda a: a[layer], params.layers)
    x = model_lib.rms_norm(h_mid, lp.mlp_norm, cfg.rms_eps)
    h = h_mid + (jax.nn.silu(x @ lp.w_gate) * (x @ lp.w_up)) @ lp.w_down
    start_layer = layer + 1
  # Run the remaining layers via a model holding only those layers.
  rest = jax.tree.map(lambda a: a[start_layer:], params.layers)
  sub_cfg = ModelConfig(**{**cfg.__dict__, "n_layers": cfg.n_layers - start_layer})
  sub = model_lib.Params(params.embed, rest, params.final_norm, params.lm_head)
  manual = _run_from_residual(sub, sub_cfg, h)
  np.testing.assert_allclose(np.asarray(edited.logits), np.asarray(manual), atol=1e-5)


def _run_from_residual(params, cfg, h):
  """Logits of the layers in `params` applied to a given residual stream h [B, T, D]."""
  # An add-edit at resid_pre of layer 0 that replaces the embedding: h = emb + (h - emb).
  toks = jnp.zeros(h.shape[:2], jnp.int32)
  emb = params.embed[toks]
  e = {"resid_pre": edit_lib.SiteEdit(add=jnp.zeros((cfg.n_layers, *h.shape)).at[0].set(h - emb))}
  if cfg.n_layers == 0:
    raise ValueError("need at least one layer")
  return model_lib.forward(params, toks, cfg, edit=e).logits


def test_add_edit_equals_torch_forward_pre_hook():
  cfg, params = tiny("llama")
  tm = torch_model(params, cfg)
  toks = _tokens(cfg)
  vec = np.random.RandomState(5).randn(cfg.d_model).astype(np.float32)
  layer = 2

  def hook(module, args):
    return (args[0] + torch.tensor(vec),) + tuple(args[1:])

  handle = tm.model.layers[layer].register_forward_pre_hook(hook)
  try:
    ref = _torch_logits(tm, toks)
  finally:
    handle.remove()
  got = model_lib.forward(params, jnp.asarray(toks), cfg,
                          edit=edit_lib.add_vector(cfg.n_layers, layer, jnp.asarray(vec), "resid_pre")).logits
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4)


def test_ablation_leaves_activations_orthogonal():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  dirs = jax.random.normal(jax.random.key(7), (2, cfg.d_model))
  e = edit_lib.ablate_directions(cfg.n_layers, dirs)
  out = model_lib.forward(params, toks, cfg, edit=e, capture=edit_lib.SITES)
  u = edit_lib.orthonormalize(dirs)
  for site in edit_lib.SITES:
    h = out.captured[site]
    rel = jnp.abs(h @ u.T).max() / jnp.abs(h).max()
    assert float(rel) < 1e-5, site
  clean = model_lib.forward(params, toks, cfg, capture=("resid_post",))
  assert float(jnp.abs(clean.captured["resid_post"] @ u.T).max()) > 1e-2  # the edit did something


def test_ablation_respects_position_mask():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg, t=16))
  d = jax.random.normal(jax.random.key(8), (cfg.d_model,))
  pos = jnp.zeros((1, 16)).at[:, 10:].set(1.0)
  out = model_lib.forward(params, toks, cfg, edit=edit_lib.ablate_directions(cfg.n_layers, d, positions=pos,
                                                                             sites=("resid_pre",)),
                          capture=("resid_pre",))
  u = d / jnp.linalg.norm(d)
  proj = jnp.abs(out.captured["resid_pre"] @ u)  # [L, B, T]
  assert float(proj[:, :, 10:].max()) < 1e-5
  clean = model_lib.forward(params, toks, cfg, capture=("resid_pre",)).captured["resid_pre"]
  np.testing.assert_array_equal(np.asarray(out.captured["resid_pre"][0, :, :10]),
                                np.asarray(clean[0, :, :10]))


def test_relative_add_has_stated_norm():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  v = jax.random.normal(jax.random.key(1), (cfg.d_model,))
  v = 0.25 * v / jnp.linalg.norm(v)
  clean = model_lib.forward(params, toks, cfg, capture=("resid_pre",)).captured["resid_pre"][1]
  e = edit_lib.add_vector(cfg.n_layers, 1, v, "resid_pre", relative=True)
  got = model_lib.forward(params, toks, cfg, edit=e, capture=("resid_pre",)).captured["resid_pre"][1]
  ratio = jnp.linalg.norm(got - clean, axis=-1) / jnp.linalg.norm(clean, axis=-1)
  np.testing.assert_allclose(np.asarray(ratio), 0.25, rtol=1e-5)


def test_vmapped_edits_equal_python_loop_and_trace_once():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg, t=16))
  vecs = jax.random.normal(jax.random.key(2), (6, cfg.d_model))
  layers = jnp.array([0, 1, 2, 0, 1, 2])

  @jax.jit
  @chex.assert_max_traces(n=1)
  def one(layer, vec):
    e = edit_lib.add_vector(cfg.n_layers, layer, vec, "resid_pre")
    return model_lib.forward(params, toks, cfg, edit=e, logits_positions=jnp.full((2, 1), 15)).logits

  swept = jax.jit(jax.vmap(one))(layers, vecs)
  for i in range(6):
    np.testing.assert_allclose(np.asarray(swept[i]), np.asarray(one(layers[i], vecs[i])), atol=1e-5)


def test_edit_is_differentiable():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg, t=8))

  def loss(vec):
    e = edit_lib.add_vector(cfg.n_layers, 1, vec, "resid_post")
    return model_lib.forward(params, toks, cfg, edit=e).logits[:, -1, 3].sum()

  v = jnp.zeros(cfg.d_model)
  g = jax.grad(loss)(v)
  u = jax.random.normal(jax.random.key(0), v.shape)
  eps = 1e-2
  fd = (loss(v + eps * u) - loss(v - eps * u)) / (2 * eps)
  np.testing.assert_allclose(float(g @ u), float(fd), rtol=2e-3)


def test_scan_equals_unrolled_layers():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  full = model_lib.forward(params, toks, cfg, capture=("resid_post",)).captured["resid_post"]
  h = params.embed[toks]
  for i in range(cfg.n_layers):
    lp = jax.tree.map(lambda a, i=i: a[i:i + 1], params.layers)
    sub = model_lib.Params(params.embed, lp, params.final_norm, params.lm_head)
    sub_cfg = ModelConfig(**{**cfg.__dict__, "n_layers": 1})
    e = {"resid_pre": edit_lib.SiteEdit(add=(h - params.embed[toks])[None])}
    h = model_lib.forward(sub, toks, sub_cfg, edit=e, capture=("resid_post",)).captured["resid_post"][0]
    np.testing.assert_allclose(np.asarray(h), np.asarray(full[i]), atol=1e-5)


def test_bad_edit_errors():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  with pytest.raises(ValueError, match="unknown edit site 'resid'"):
    model_lib.forward(params, toks, cfg, edit={"resid": edit_lib.SiteEdit(add=jnp.zeros((3, 1, 1, 64)))})
  with pytest.raises(ValueError, match="leading layer axis of size 3, got shape \\(2, 1, 1, 64\\)"):
    model_lib.forward(params, toks, cfg, edit={"resid_pre": edit_lib.SiteEdit(add=jnp.zeros((2, 1, 1, 64)))})
  with pytest.raises(ValueError, match="unknown capture site"):
    model_lib.forward(params, toks, cfg, capture=("mlp",))


def test_capture_at_chosen_layers_and_positions():
  cfg, params = tiny("llama")
  toks = jnp.asarray(_tokens(cfg))
  full = model_lib.forward(params, toks, cfg, capture=("attn_out", "resid_post")).captured
  pos = jnp.array([[3, 23], [0, 5]])
  got = model_lib.forward(params, toks, cfg, capture=("attn_out", "resid_post"), capture_layers=(2, 0),
                          capture_positions=pos).captured
  for site in ("attn_out", "resid_post"):
    assert got[site].shape == (2, 2, 2, cfg.d_model)
    for li, layer in enumerate((2, 0)):
      for b in range(2):
        np.testing.assert_array_equal(np.asarray(got[site][li, b]), np.asarray(full[site][layer, b, pos[b]]))
  with pytest.raises(ValueError, match="capture_layers \\[5\\] out of range for 3 layers"):
    model_lib.forward(params, toks, cfg, capture=("resid_post",), capture_layers=(5,))
