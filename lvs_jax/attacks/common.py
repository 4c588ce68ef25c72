"""What the token-level attacks (GCG, AutoDAN) share: the prompt layout around the optimized string,
the in-context retokenization filter, banned tokens, the target loss, and the refusal check.

Layout of one attacked prompt (token ids; `{optim_str}` is where the attack string goes, inside the
user message of the chat template, as nanoGCG and HarmBench place it):

    before        the template up to the attack string     (run once: its KV cache is reused)
    suffix        the n optimized tokens                    [n]
    after         the rest of the template (end of turn, assistant header)
    target        the continuation whose cross-entropy is the loss ("Sure, here is ...")

The split is found *in context*: the whole formatted prompt (with the initial attack string) is
tokenized once and the tokens covering the attack string's characters become the suffix, so a token
that straddles the boundary (" !" carrying the separating space) belongs to the suffix, and
before + suffix + after is exactly how the tokenizer reads the full text.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lvs_jax.core import generate as generate_lib
from lvs_jax.core import model as model_lib
from lvs_jax.evals import judges

PLACEHOLDER = "{optim_str}"


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """One behavior's prompt split around the attack string (see module docstring); ids are lists of ints."""

  behavior: str
  before_ids: list[int]
  suffix_ids: list[int]
  after_ids: list[int]
  target_ids: list[int]
  before_text: str
  after_text: str
  message_head: str = ""
  message_tail: str = ""

  def test_case(self, suffix_text: str) -> str:
    """The user message with `suffix_text` (the decoded suffix tokens) as the attack string: what a
    later run sends as the prompt (HarmBench's test case)."""
    return self.message_head + suffix_text + self.message_tail

  def prompt_ids(self, suffix: Sequence[int] | None = None) -> list[int]:
    """before + suffix + after (the generation prompt, no target)."""
    s = self.suffix_ids if suffix is None else [int(t) for t in suffix]
    return self.before_ids + s + self.after_ids


def encode_many(tok, texts: Sequence[str]) -> list[list[int]]:
  """Token ids of formatted texts (no special tokens added), batched through the fast tokenizer when
  there is one."""
  hf = getattr(tok, "hf", None)
  if hf is not None and callable(hf):
    return [list(x) for x in hf(list(texts), add_special_tokens=False)["input_ids"]]
  return [tok.encode(t) for t in texts]


def decode_many(tok, ids: Sequence[Sequence[int]]) -> list[str]:
  """Texts of id rows, special tokens kept (so decode -> encode can give them back)."""
  hf = getattr(tok, "hf", None)
  if hf is not None and hasattr(hf, "batch_decode"):
    return list(hf.batch_decode([list(map(int, r)) for r in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False))
  return [tok.decode(list(map(int, r)), skip_special_tokens=False) for r in ids]


def format_user_message(tok, message: str, system: str | None = None) -> str:
  """The chat-formatted prompt of one user message (the message itself for template-less models)."""
  return tok.format_chat(message, system=system)


def split_prompt(tok, behavior: str, optim_str: str, target: str, *, message: str = "{behavior} {optim_str}",
                 system: str | None = None) -> PromptLayout:
  """Formats `message` (with `{behavior}` and the `{optim_str}` placeholder) in the chat template and
  splits its tokens in context into before / suffix / after; the target is tokenized on its own
  (nanoGCG: no space added before it).

  Raises ValueError when the tokenizer does not give the text back (decode(encode(text)) != text),
  when the template drops the placeholder, or when the attack string encodes to no tokens.
  """
  if PLACEHOLDER not in message:
    raise ValueError(f"message template {message!r} has no {PLACEHOLDER} placeholder")
  msg = message.replace("{behavior}", behavior)
  formatted = format_user_message(tok, msg, system)
  at = formatted.find(PLACEHOLDER)
  if at < 0:
    raise ValueError(f"the chat template dropped the {PLACEHOLDER} placeholder: {formatted!r}")
  text = formatted.replace(PLACEHOLDER, optim_str, 1)
  ids = encode_many(tok, [text])[0]
  back = decode_many(tok, [ids])[0]
  if back != text:
    raise ValueError(f"the tokenizer does not give the prompt back (decode(encode(text)) != text): "
                     f"{text!r} -> {back!r}")
  a, b = at, at + len(optim_str)
  ends = [len(s) for s in decode_many(tok, [ids[: i + 1] for i in range(len(ids))])]
  i0 = next(i for i, e in enumerate(ends) if e > a)
  i1 = next(i for i, e in enumerate(ends) if e >= b)
  if i1 < i0:
    raise ValueError(f"attack string {optim_str!r} encodes to no tokens in context")
  before, suffix, after = ids[:i0], ids[i0:i1 + 1], ids[i1 + 1:]
  before_text = text[: ends[i0 - 1]] if i0 > 0 else ""
  after_text = text[ends[i1]:]
  pre, post = msg.split(PLACEHOLDER, 1)
  m0 = at - len(pre)
  if formatted[m0:at] != pre or len(before_text) < m0:
    raise ValueError(f"the chat template rewrites the user message or the attack string merges with it: {formatted!r}")
  head = text[m0:len(before_text)]
  tail = text[ends[i1]: at + len(optim_str) + len(post)]
  return PromptLayout(behavior, before, suffix, after, encode_many(tok, [target])[0], before_text, after_text,
                      head, tail)


def retokenizes_in_context(tok, layouts: Sequence[PromptLayout], candidates: np.ndarray) -> np.ndarray:
  """The retokenization filter, in context: candidate c of prompt p survives only if
  encode(before_text + decode(c) + after_text) == before_ids + c + after_ids.

  candidates: [P, W, n] (one attack per prompt) or [W, n] (one suffix shared by every prompt: it must
  survive in every context). Returns bool [P, W] or [W].

  Checking decode -> encode of the suffix *alone* (nanoGCG issue #24) lets through candidates that
  merge with the neighbouring text ("bomb" + "ing" -> "bombing") or that a space before them changes,
  so the optimized ids are not what the model reads when the attack string is used as text.
  """
  cands = np.asarray(candidates)
  shared = cands.ndim == 2
  if shared:
    cands = np.broadcast_to(cands[None], (len(layouts), *cands.shape))
  P, W, _ = cands.shape
  ok = np.zeros((P, W), bool)
  for p, lay in enumerate(layouts):
    texts = decode_many(tok, cands[p])
    full = encode_many(tok, [lay.before_text + t + lay.after_text for t in texts])
    want_head, want_tail = lay.before_ids, lay.after_ids
    for w in range(W):
      ids = full[w]
      c = cands[p, w].tolist()
      ok[p, w] = ids == want_head + c + want_tail
  return ok.all(0) if shared else ok


def banned_tokens(tok, vocab_size: int, allow_non_ascii: bool = False) -> np.ndarray:
  """bool [V]: tokens an attack may not place (nanoGCG / HarmBench `get_nonascii_toks`): tokens whose
  text is not printable ASCII (unless allow_non_ascii), empty tokens, every special / added token,
  and ids beyond the tokenizer's vocabulary (padding rows of the embedding)."""
  banned = np.zeros(vocab_size, bool)
  hf = getattr(tok, "hf", None)
  n_tok = len(hf) if hf is not None and hasattr(hf, "__len__") else vocab_size
  n = min(n_tok, vocab_size)
  banned[n:] = True
  texts = decode_many(tok, [[i] for i in range(n)])
  for i, s in enumerate(texts):
    if s == "" or (not allow_non_ascii and not (s.isascii() and s.isprintable())):
      banned[i] = True
  specials = set(getattr(tok, "eos_ids", ()))
  if hf is not None:
    specials |= set(getattr(hf, "all_special_ids", []) or [])
    added = getattr(hf, "added_tokens_decoder", None)
    if added:
      specials |= set(int(i) for i in added)
  for i in specials:
    if 0 <= i < vocab_size:
      banned[i] = True
  return banned


def target_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                mellowmax_alpha: float | None = None) -> jax.Array:
  """Per-row loss of the target tokens -> [B] (float32).

  logits: [B, T, V] at the positions that predict the target; labels [B, T] int; weights [B, T] 0/1.
  mellowmax_alpha None: mean cross-entropy over the target tokens (nats/token; GCG, HarmBench,
  nanoGCG's default). A float a: nanoGCG's `use_mellowmax`, (1/a) (logsumexp(-a z) - log T) over the
  target tokens' raw logits z.
  """
  logits = logits.astype(jnp.float32)
  w = weights.astype(jnp.float32)
  n = jnp.maximum(w.sum(-1), 1.0)
  picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if mellowmax_alpha is None:
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return (nll * w).sum(-1) / n
  a = jnp.float32(mellowmax_alpha)
  lse = jax.nn.logsumexp(-a * picked, axis=-1, where=w > 0)
  return (lse - jnp.log(n)) / a


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded (tokens [B, T] int32, mask [B, T] int32), T rounded up to `multiple`."""
  t = max(len(r) for r in rows)
  t = -(-t // multiple) * multiple
  toks = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    if len(r):
      toks[i, t - len(r):] = r
      mask[i, t - len(r):] = 1
  return toks, mask


def greedy_completions(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                       multiple: int = 16) -> list[str]:
  """Greedy completions of already tokenized prompts (one compiled call for the batch)."""
  tok = model.tokenizer
  toks, mask = left_pad(prompt_ids, tok.pad_id, multiple)
  out, lengths = generate_lib.generate_tokens(
    model.params, jnp.asarray(toks), jnp.asarray(mask), model.cfg, max_new_tokens=max_new_tokens,
    eos_ids=tuple(tok.eos_ids), pad_id=tok.pad_id)
  return generate_lib.decode_completions(tok, out, lengths)


def refused(completions: Sequence[str], prefixes="harmbench") -> np.ndarray:
  """HarmBench's early-stopping refusal check (`check_refusal_completions`): a refusal phrase anywhere
  (lower-cased substring); an empty completion counts as a refusal. bool [N]."""
  return judges.judge_refusals(list(completions), prefixes=prefixes, mode="substring")


def forward_target_losses(params, cfg, tokens: jax.Array, mask: jax.Array, tgt_pos: jax.Array, labels: jax.Array,
                          weights: jax.Array, mellowmax_alpha: float | None = None) -> jax.Array:
  """Target loss [B] of full left-padded sequences (prompt + target) [B, T], no cache; tgt_pos [B, Tt]
  are the positions whose logits predict the target tokens `labels` [B, Tt]."""
  out = model_lib.forward(params, tokens, cfg, attention_mask=mask, logits_positions=tgt_pos)
  return target_loss(out.logits, labels, weights, mellowmax_alpha)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "mellowmax_alpha"))
def sequence_losses(params, cfg, tokens: jax.Array, mask: jax.Array, tgt_pos: jax.Array, labels: jax.Array,
                    weights: jax.Array, *, chunk: int, mellowmax_alpha: float | None = None) -> jax.Array:
  """`forward_target_losses` of N rows [N, T] in chunks of `chunk` rows under `lax.map` -> [N]
  (N a multiple of chunk). For attacks whose whole prompt changes (AutoDAN), so no prefix is shared."""
  N, T = tokens.shape
  xs = jax.tree.map(lambda x: x.reshape(N // chunk, chunk, *x.shape[1:]), (tokens, mask, tgt_pos, labels, weights))
  out = jax.lax.map(lambda a: forward_target_losses(params, cfg, *a, mellowmax_alpha=mellowmax_alpha), xs)
  return out.reshape(N)


def pack_sequences(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], pad_id: int,
                   chunk: int, multiple: int = 64) -> tuple[np.ndarray, ...]:
  """Rows prompt + target, left-padded to a multiple of `multiple` tokens and to a multiple of `chunk` rows
  (extra rows repeat the last one) -> (tokens, mask, tgt_pos, labels, weights) for `sequence_losses`."""
  rows = [list(p) + list(t) for p, t in zip(prompt_ids, target_ids)]
  n = len(rows)
  n_pad = -(-n // chunk) * chunk
  rows = rows + [rows[-1]] * (n_pad - n)
  tgts = list(target_ids) + [target_ids[-1]] * (n_pad - n)
  toks, mask = left_pad(rows, pad_id, multiple)
  T = toks.shape[1]
  Tt = max(len(t) for t in tgts)
  pos = np.zeros((n_pad, Tt), np.int32)
  labels = np.zeros((n_pad, Tt), np.int32)
  weights = np.zeros((n_pad, Tt), np.float32)
  for i, t in enumerate(tgts):
    k = len(t)
    pos[i, :k] = np.arange(T - k - 1, T - 1)
    labels[i, :k] = t
    weights[i, :k] = 1.0
  return toks, mask, pos, labels, weights
