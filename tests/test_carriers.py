"""Carriers: t_inst / t_post_inst on every supported chat template (left padding), planted-direction
recovery, float64 accumulation, matched controls, ablation orthogonality, selection, save/load."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.evals import activations
from lvs_jax.geometry import carriers, causal, coupling
from tests import helpers

# ----------------------------------------------------------------------------- chat templates

# The chat templates as shipped in each model family's tokenizer_config.json.
SMOLLM2 = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
  "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2 = (
  "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}"
  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
  "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
  "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
  "{{ bos_token }}{% for message in messages %}"
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
  "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
  "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
  "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# name -> (template, specials, bos, eos, pad, pre-tokenizer, post-instruction text)
FORMATS = {
  "smollm2": (SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
              "<|endoftext|>", "byte_level", "<|im_end|>\n<|im_start|>assistant\n"),
  "qwen2": (QWEN2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
            "byte_level", "<|im_end|>\n<|im_start|>assistant\n"),
  "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "byte_level",
             "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
  "mistral": (MISTRAL, ["<unk>", "<s>", "</s>"], "<s>", "</s>", "</s>", "metaspace", " [/INST]"),
}

WORDS = ("How", "the", "bake", "bread", "user", "assistant", "INST", "system", "make", "home")


def _tiny_tokenizer(fmt):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from lvs_jax.io.hf import wrap_tokenizer

  template, specials, bos, eos, pad, kind, _ = FORMATS[fmt]
  if kind == "byte_level":
    space, chars = "Ġ", sorted(pre_tokenizers.ByteLevel.alphabet())
  else:  # SentencePiece-style: "▁" marks a word start, unknown characters map to <unk>
    space, chars = "▁", ["▁"] + [chr(c) for c in range(33, 127)] + ["\n"]
  vocab = list(specials) + [c for c in chars if c not in specials]
  merges = []
  for w in WORDS:  # multi-character tokens, so spans are not all single characters
    w = space + w
    for k in range(2, len(w) + 1):
      if w[:k] not in vocab:
        merges.append((w[:k - 1], w[k - 1]))
        vocab.append(w[:k])
  tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                            unk_token="<unk>" if "<unk>" in vocab else None))
  if kind == "byte_level":
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
  else:
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  tk.add_special_tokens(specials)
  hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad)
  return wrap_tokenizer(hf, chat_template=template)


PROMPTS = ["How do I bake bread at home?", "Hi", "Tell me how to make a system prompt for an assistant, please."]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_instruction_positions_on_each_chat_template_with_left_padding(fmt):
  tok = _tiny_tokenizer(fmt)
  post = FORMATS[fmt][-1]
  tokens, mask, t_start, t_inst, t_post = activations.prompt_positions(tok, PROMPTS)
  assert (mask.sum(1) < tokens.shape[1]).all()  # every row is left-padded (T is a multiple of 16)
  for b, p in enumerate(PROMPTS):
    n_pad = tokens.shape[1] - mask[b].sum()
    assert mask[b, :n_pad].sum() == 0 and t_start[b] >= n_pad
    assert t_post[b] == tokens.shape[1] - 1  # the last prompt token is the last slot
    # The instruction tokens are exactly the prompt ...
    assert tok.decode(tokens[b, t_start[b]:t_inst[b] + 1].tolist(), skip_special_tokens=False).strip() == p
    # ... and everything after t_inst is the template's post-instruction text.
    suffix = tok.decode(tokens[b, t_inst[b] + 1:t_post[b] + 1].tolist(), skip_special_tokens=False)
    assert suffix.strip(" ") == post.strip(" "), (fmt, suffix)
    # t_inst is the token holding the prompt's last character: the text up to it ends with the prompt.
    upto = tok.decode(tokens[b, n_pad:t_inst[b] + 1].tolist(), skip_special_tokens=False)
    assert upto.endswith(p)
    assert tok.format_chat(p).endswith(post)


# ----------------------------------------------------------------------------- planted carriers


def _unit(rng, d):
  x = rng.normal(size=d)
  return x / np.linalg.norm(x)


def _planted(cosines, d=256, n=600, noise=0.15, seed=0):
  """Pool of 2n prompts: n harmful (+3 u_h at t_inst), n harmless; a random half refuses (+3 u_r at
  t_post), with cos(u_h, u_r) = cosines[l] at layer l. Returns (x_inst, x_post, harm labels, refusal labels)."""
  rng = np.random.default_rng(seed)
  L = len(cosines)
  uh = np.stack([_unit(rng, d) for _ in range(L)])
  ur = []
  for layer, c in enumerate(cosines):
    w = _unit(rng, d)
    w -= (w @ uh[layer]) * uh[layer]
    w /= np.linalg.norm(w)
    ur.append(c * uh[layer] + np.sqrt(1 - c * c) * w)
  ur = np.stack(ur)
  harm = np.r_[np.ones(n), -np.ones(n)].astype(int)
  refused = rng.permutation(np.r_[np.ones(n), -np.ones(n)].astype(int))
  base = rng.normal(size=(L, 1, d)) * 5  # a shared offset the difference must cancel
  x_inst = base + noise * rng.normal(size=(L, 2 * n, d)) + 3 * (harm == 1)[None, :, None] * uh[:, None]
  x_post = base + noise * rng.normal(size=(L, 2 * n, d)) + 3 * (refused == 1)[None, :, None] * ur[:, None]
  return x_inst.astype(np.float32), x_post.astype(np.float32), harm, refused, uh, ur


def test_carriers_and_coupling_recover_planted_cosine():
  planted = np.array([0.0, 0.3, 0.6, 0.95])
  x_inst, x_post, harm, refused, uh, ur = _planted(planted)
  ch = carriers.carrier_from_activations(carriers.HARMFULNESS, x_inst[:, harm == 1], x_inst[:, harm == -1])
  cr = carriers.carrier_from_activations(carriers.REFUSAL, x_post[:, refused == 1], x_post[:, refused == -1])
  assert ch.pooling == "last_instruction" and cr.pooling == "last" and ch.vectors.shape == (4, 256)
  np.testing.assert_allclose(coupling.cosine(ch.unit, uh), 1.0, atol=5e-3)
  np.testing.assert_allclose(coupling.cosine(cr.unit, ur), 1.0, atol=5e-3)
  np.testing.assert_allclose(np.abs(coupling.per_layer_cosine(ch.vectors, cr.vectors)), planted, atol=0.02)
  res = coupling.coupling(x_inst, harm, x_post, refused, n_boot=200, n_null=200, seed=1)
  np.testing.assert_allclose(res["abs_cos"], planted, atol=0.02)
  np.testing.assert_allclose(np.diag(res["cross"]), res["abs_cos"], atol=1e-12)
  inside = (res["abs_cos_low"] - 0.01 <= planted) & (planted <= res["abs_cos_high"] + 0.01)
  assert inside.all(), (res["abs_cos_low"], res["abs_cos_high"])
  assert (res["p_value"][1:] < 0.02).all()  # planted coupling stands far above random splits
  assert res["p_value"][0] > 0.02  # no coupling planted at layer 0
  assert (res["null_mean"] < 0.15).all()


def test_subspace_principal_angles_recover_planted_angles():
  rng = np.random.default_rng(0)
  d, n = 40, 500
  q, _ = np.linalg.qr(rng.normal(size=(d, 4)))
  u1, u2, w1, w2 = q.T
  angles = np.radians([20.0, 60.0])
  v1 = np.cos(angles[0]) * u1 + np.sin(angles[0]) * w1
  v2 = np.cos(angles[1]) * u2 + np.sin(angles[1]) * w2
  np.testing.assert_allclose(np.degrees(coupling.principal_angles(np.stack([u1, u2]), 3 * np.stack([v1, v2]))),
                             [20.0, 60.0], atol=1e-6)

  def acts(a, b):  # per prompt: mean 3 along a, spread 2 along b, small noise
    pos = (3 + rng.normal(size=(n, 1))) * a + 2 * rng.normal(size=(n, 1)) * b + 0.05 * rng.normal(size=(n, d))
    neg = 0.05 * rng.normal(size=(n, d))
    return np.concatenate([pos, neg])[None].astype(np.float32)

  labels = np.r_[np.ones(n), -np.ones(n)].astype(int)
  res = coupling.subspace_coupling(acts(u1, u2), labels, acts(v1, v2), labels, k=2, n_boot=20, n_null=20)
  np.testing.assert_allclose(res["angles_deg"][0], [20.0, 60.0], atol=2.0)
  np.testing.assert_allclose(res["overlap"][0], np.mean(np.cos(angles) ** 2), atol=0.02)
  assert res["overlap_low"][0] <= res["overlap"][0] <= res["overlap_high"][0]


def test_means_accumulate_in_float64():
  x = np.full((1, 100_000, 2), 1.0 + 2 ** -20, np.float32)
  x[0, ::2] = 1e4  # large and small values: a float32 running sum loses the small ones
  want = (1e4 * 50_000 + (1.0 + 2 ** -20) * 50_000) / 100_000
  got = carriers.mean_activations(x, chunk=7)
  assert got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_matched_controls_have_exactly_the_carrier_norm():
  v = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32) * np.arange(1, 6)[:, None]
  c = causal.matched_controls(jax.random.key(0), v, 7)
  assert c.shape == (7, 5, 32) and c.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(c.astype(np.float64), axis=-1),
                             np.broadcast_to(np.linalg.norm(v.astype(np.float64), axis=-1), (7, 5)), rtol=1e-6)
  cos = coupling.cosine(c, v[None])
  assert np.abs(cos).max() < 0.8 and np.abs(c[0] - c[1]).max() > 0  # random, distinct seeds


# ----------------------------------------------------------------------------- ablation


@functools.partial(jax.jit, static_argnames=("cfg",))
def _captured(params, toks, cfg, edit):
  return model_lib.forward(params, toks, cfg, edit=edit, capture=edit_lib.SITES).captured


def test_ablation_leaves_the_residual_orthogonal_where_applied():
  cfg, params = helpers.tiny("llama")
  rng = np.random.default_rng(0)
  vec = rng.normal(size=(cfg.n_layers, cfg.d_model)).astype(np.float32)
  car = carriers.Carrier("refusal", vec, "last", meta={"selection": {"layer": 1}})
  B, T = 2, 9
  toks = jnp.asarray(rng.integers(3, cfg.vocab_size, (B, T)), jnp.int32)
  positions = np.zeros((1, T), np.float32)
  positions[0, [2, 5, 8]] = 1
  on, off = positions[0] == 1, positions[0] == 0
  plain = np.asarray(model_lib.forward(params, toks, cfg, capture=("resid_pre",)).captured["resid_pre"][0])
  for per_layer in (False, True):  # each layer's own carrier, or the selected layer's everywhere
    captured = _captured(params, toks, cfg, carriers.ablation_edit(car, per_layer=per_layer, positions=positions))
    for layer in range(cfg.n_layers):
      u = car.unit[layer] if per_layer else car.unit[1]
      for s in edit_lib.SITES:
        h = np.asarray(captured[s][layer], np.float64)  # [B, T, D]
        scale = np.linalg.norm(h, axis=-1).max()
        assert np.abs((h @ u)[:, on]).max() < 1e-5 * scale, (per_layer, layer, s)
    # Positions outside the mask are untouched where nothing upstream was edited (layer 0, resid_pre).
    h0 = np.asarray(captured["resid_pre"][0])
    np.testing.assert_array_equal(h0[:, off], plain[:, off])
    assert np.abs(h0[:, off] @ car.unit[0 if per_layer else 1]).max() > 1e-3


# ----------------------------------------------------------------------------- selection, persistence


def test_select_layer_applies_refusal_direction_filters():
  scores = dict(layers=np.arange(10),
                ablation_refusal=np.array([-1.0, -5, -4, -3, -2, -6, -1, -1, -9, -9]),
                ablation_kl=np.array([0.01, 0.5, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01]),
                steering_refusal=np.array([1.0, 1, 1, 1, 1, -0.5, 1, 1, 1, 1]),
                harmful_refusal=2.0, harmless_refusal=-3.0)
  sel = carriers.select_layer(scores, n_layers=10)
  # 1: KL too high; 5: does not induce refusal; 8, 9: last 20%; best of the rest: layer 2 (-4).
  assert sel["layer"] == 2
  reasons = {c["layer"]: c["discarded"] for c in sel["candidates"]}
  assert "KL" in reasons[1] and "steering" in reasons[5] and "layer" in reasons[8] and reasons[2] is None
  scores["steering_refusal"][:] = -1.0  # nothing induces refusal: relax the steering filter first
  assert carriers.select_layer(scores, n_layers=10)["layer"] is None
  assert carriers.fallback_layer(scores, n_layers=10) == (5, "no_steering_filter")
  scores["ablation_kl"][:] = 1.0 + np.arange(10)[::-1] / 10  # ... then the KL filter: least disruptive unpruned
  assert carriers.fallback_layer(scores, n_layers=10) == (7, "min_kl")


def test_zero_carriers_are_never_selected():
  """At resid_pre of layer 0 the last prompt token is one template token for every prompt: the carrier
  there is exactly 0, ablating it changes nothing (so it passes the KL filter), and it must not win."""
  scores = dict(layers=np.arange(6), ablation_refusal=np.array([3.0, -1, -2, -1, -1, -1]),
                ablation_kl=np.array([0.001, 0.5, 0.6, 0.7, 0.8, 0.9]),
                steering_refusal=np.array([-4.0, -3, -3, -3, -3, -3]),
                norms=np.array([1e-5, 5.0, 6.0, 7.0, 8.0, 9.0]), scale=np.full(6, 1.0))
  sel = carriers.select_layer(scores, n_layers=6)
  assert sel["layer"] is None and "zero carrier" in sel["candidates"][0]["discarded"]
  assert carriers.fallback_layer(scores, n_layers=6) == (1, "min_kl")  # not layer 0's "no_steering_filter"
  del scores["norms"]
  assert carriers.fallback_layer(scores, n_layers=6) == (0, "no_steering_filter")


def test_one_zero_carrier_rule_relative_to_the_activation_norm():
  """carriers.zero_carrier is the one definition: selection and coupling flag the same layers. A carrier of
  1e-5 of the activation norm is zero, one of 1e-3 is not (the old selection rule, 1e-6 of the largest
  candidate's norm, kept the 1e-5 one when the largest carrier was about the activation norm)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 40, 16)).astype(np.float32)
  scale = carriers.activation_scale(x)
  np.testing.assert_allclose(scale, np.linalg.norm(x, axis=-1).mean(-1), rtol=1e-6)
  direction = np.ones(16) / 4.0
  car = np.stack([1e-5 * scale[0] * direction, 1e-3 * scale[1] * direction, 1.0 * scale[2] * direction])
  assert carriers.zero_carrier(np.linalg.norm(car, axis=-1), scale).tolist() == [True, False, False]
  assert coupling.degenerate_layers(car, x).tolist() == [True, False, False]
  c = carriers.Carrier("c", car.astype(np.float32), "last", meta=dict(activation_scale=scale.tolist()))
  scores = dict(layers=np.arange(3), ablation_refusal=np.array([-5.0, -1.0, -1.0]), ablation_kl=np.zeros(3),
                steering_refusal=np.ones(3), **carriers.zero_check_scores(c, np.arange(3)))
  sel = carriers.select_layer(scores, n_layers=10)
  assert sel["layer"] == 1 and "zero carrier" in sel["candidates"][0]["discarded"]
  # carrier_from_activations records the scale the rule needs.
  made = carriers.carrier_from_activations("refusal", x[:, :20], x[:, 20:])
  np.testing.assert_allclose(made.activation_scale, scale, rtol=1e-6)


def test_carriers_save_and_load_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  cs = {n: carriers.Carrier(n, rng.normal(size=(3, 8)).astype(np.float32), carriers.POOLING[n], n_pos=4, n_neg=5,
                            meta=dict(selection=dict(layer=1, score=float("nan")), sets=["a", "b"]))
        for n in (carriers.HARMFULNESS, carriers.REFUSAL)}
  npz, js = carriers.save_carriers(tmp_path / "carriers", cs)
  assert npz.endswith(".npz") and js.endswith(".json")
  back = carriers.load_carriers(tmp_path / "carriers.npz")
  for n, c in cs.items():
    np.testing.assert_array_equal(back[n].vectors, c.vectors)
    assert (back[n].pooling, back[n].n_pos, back[n].n_neg, back[n].selected_layer) == (c.pooling, 4, 5, 1)
    assert back[n].meta["selection"]["score"] is None  # nan -> null: strict JSON
  with np.load(npz, allow_pickle=False) as z:
    assert sorted(z.files) == sorted(cs)


def test_one_pass_collection_and_streamed_carrier_match_activations_collect():
  from lvs_jax.core.tokenizer import LoadedModel

  tok = _tiny_tokenizer("smollm2")
  cfg, params = helpers.tiny("llama", vocab_size=len(tok.hf), max_position=512)
  m = LoadedModel(cfg=cfg, params=params, tokenizer=tok)
  pos, neg = PROMPTS, ["Hello there", "How is the bread?", "Tell me about the system."]
  x_inst, x_post = carriers.collect_inst_post(m, pos, batch_size=3)
  np.testing.assert_allclose(x_inst, activations.collect(m, pos, pooling="last_instruction", site="resid_pre",
                                                         batch_size=3), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_post, activations.collect(m, pos, pooling="last", site="resid_pre", batch_size=3),
                             rtol=1e-5, atol=1e-5)
  c = carriers.compute_carrier(m, carriers.REFUSAL_HH, pos, neg, batch_size=3)
  want = carriers.diff_in_means(x_post, carriers.collect_inst_post(m, neg, batch_size=3)[1])
  assert (c.n_pos, c.n_neg, c.pooling) == (3, 3, "last")
  np.testing.assert_allclose(c.vectors, want, rtol=1e-5, atol=1e-5)
