"""The tokenizer a GGUF file describes, built from its metadata with the `tokenizers` library (no torch).

A GGUF has no `tokenizer.json`: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), token
types (`token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), merges, scores, the
special token ids and the chat template as metadata. `tokenizer_from_metadata` rebuilds the fast
tokenizer from those fields, the same way transformers' GGUF path does (`integrations/gguf`
`convert_gguf_tokenizer`), so token ids are identical -- but without transformers' GGUF reader, which
imports torch. Two tokenizer families, named by `tokenizer.ggml.model`:

  gpt2   byte-level BPE (Llama-3, SmolLM2, Qwen2, Mistral-Nemo): BPE over the byte alphabet, the
         pre-tokenizer regex named by `tokenizer.ggml.pre` (GPT-2's regex when unnamed).
  llama  SentencePiece BPE (Llama-2, Mistral-7B-v0.1): "▁" word markers (Metaspace), byte fallback
         (<0xNN> tokens), merges from the file or rebuilt from the scores.

Control tokens (type 3) become special added tokens (never split, dropped by
`decode(skip_special_tokens=True)`); user-defined tokens (type 4) become plain added tokens.
The result is wrapped in `transformers.PreTrainedTokenizerFast` (chat templates, save_pretrained),
which needs only `tokenizers` and jinja2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer split patterns of llama.cpp's `tokenizer.ggml.pre` names (those transformers knows too).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, str] = {
  "llama3": _LLAMA3, "llama-v3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3,
  "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2,
}

# Special-token attributes of the wrapper <- GGUF id keys.
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


class TokenizerMetadataError(ValueError):
  """The GGUF tokenizer metadata is missing or describes a tokenizer we cannot build."""


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level(meta: Mapping[str, Any]) -> RustTokenizer:
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, t in enumerate(meta["tokens"]):
    # Tokens written outside the byte alphabet (rare) are respelled byte by byte, as transformers does.
    key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
    vocab.setdefault(key, i)
  merges = [tuple(m.split(" ", 1)) for m in meta.get("merges") or ()]
  tk = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  split = PRE_TOKENIZER_SPLITS.get(meta.get("pre") or "")
  if split is None:
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  else:
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  return tk


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
  """SentencePiece merges implied by a vocabulary: every split of a token into two vocabulary pieces,
  best-scored merged token first (ties: longer left piece first), as transformers' `generate_merges`."""
  vocab = {t: i for i, t in enumerate(tokens)}
  out = []
  for t, score in zip(tokens, scores):
    local = [(t[:k], t[k:], score) for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
    out.extend(local)
  out.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=True)
  return [(a, b) for a, b, _ in out]


def _sentencepiece(meta: Mapping[str, Any]) -> RustTokenizer:
  tokens = list(meta["tokens"])
  vocab = {t: i for i, t in enumerate(tokens)}
  if meta.get("merges"):
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  elif meta.get("scores") is not None:
    merges = merges_from_scores(tokens, meta["scores"])
  else:
    raise TokenizerMetadataError("a SentencePiece ('llama') tokenizer needs tokenizer.ggml.merges or .scores")
  unk = meta.get("unknown_token_id")
  tk = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                unk_token=None if unk is None else tokens[int(unk)]))
  prefix = meta.get("add_space_prefix", True)
  tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                              split=False)
  seq = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    seq.append(decoders.Strip(content=" ", left=1))
  tk.decoder = decoders.Sequence(seq)
  return tk


BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def tokenizer_from_metadata(meta: Mapping[str, Any], where: str = "<gguf>"):
  """A `transformers.PreTrainedTokenizerFast` from GGUF tokenizer fields (keys without the
  "tokenizer.ggml." prefix: model, pre, tokens, token_type, merges, scores, bos/eos/unknown/padding
  _token_id, add_bos_token, add_eos_token, add_space_prefix; plus chat_template)."""
  from transformers import PreTrainedTokenizerFast

  kind = meta.get("model")
  if kind not in BUILDERS:
    raise TokenizerMetadataError(
      f"{where}: cannot build a tokenizer for tokenizer.ggml.model={kind!r}; supported: {sorted(BUILDERS)}")
  tokens = meta.get("tokens")
  if not tokens:
    raise TokenizerMetadataError(f"{where}: no tokenizer metadata (tokenizer.ggml.tokens)")
  tk = BUILDERS[kind](meta)
  types = list(meta.get("token_type") or ())
  alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
  # A control token outside the byte alphabet in a byte-level vocabulary is a llama.cpp mislabel (it
  # would grow the vocabulary past the model's): skipped, as transformers does.
  control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
             if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
  tk.add_special_tokens(control)
  user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
  tk.add_tokens(user)

  special = {}
  for attr, key in _SPECIAL_IDS.items():
    i = meta.get(key)
    if i is not None and 0 <= int(i) < len(tokens):
      special[attr] = tokens[int(i)]
  add_bos = bool(meta.get("add_bos_token", kind == "llama"))
  add_eos = bool(meta.get("add_eos_token", False))
  if (add_bos and "bos_token" in special) or (add_eos and "eos_token" in special):
    single, pieces = ["$A"], []
    if add_bos and "bos_token" in special:
      single.insert(0, special["bos_token"])
      pieces.append((special["bos_token"], int(meta["bos_token_id"])))
    if add_eos and "eos_token" in special:
      single.append(special["eos_token"])
      pieces.append((special["eos_token"], int(meta["eos_token_id"])))
    tk.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=pieces)
  return PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=meta.get("chat_template"), **special)


def read_tokenizer_metadata(gf) -> dict[str, Any]:
  """The tokenizer fields of an opened `lvs_jax.io.gguf.GGUFFile`, keyed as `tokenizer_from_metadata` wants."""
  out = {}
  for key in ("model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id", "eos_token_id",
              "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token", "add_space_prefix"):
    if gf.has(f"tokenizer.ggml.{key}"):
      out[key] = gf.get(f"tokenizer.ggml.{key}")
  if gf.has("tokenizer.chat_template"):
    out["chat_template"] = gf.get("tokenizer.chat_template")
  return out
