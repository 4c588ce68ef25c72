"""Batched, jitted decoding with a KV cache, with an edit applied at every step.

`generate_tokens` is the kernel: prompts [B, T] left-padded, a cache of T + N slots, one prefill
call and a `lax.while_loop` of single-token steps that stops when every row has produced an
end-of-sequence token (or after N tokens). Greedy when temperature == 0, otherwise temperature +
nucleus (top-p) sampling. `generate` is the convenience layer: chat formatting, batching into
fixed shapes (few compilations), decoding back to text.

Edits (see `lvs_jax.core.edit`) act on cache slots: an edit whose slot axis has size 1 applies at every
prompt and generated position; one with a slot axis of size T + N says where exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lvs_jax.core import batching
from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.core.config import ModelConfig
from lvs_jax.core.tokenizer import LoadedModel, PromptError


def sample_logits(
  logits: jax.Array, key: jax.Array, temperature: jax.Array | float, top_p: jax.Array | float
) -> jax.Array:
  """Next tokens [B] from logits [B, V]: nucleus sampling at `temperature` (must be > 0)."""
  logits = logits.astype(jnp.float32) / temperature
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
  keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
  choice = jax.random.categorical(key, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "eos_ids"))
def generate_tokens(
  params: model_lib.Params,
  tokens: jax.Array,
  attention_mask: jax.Array,
  cfg: ModelConfig,
  *,
  max_new_tokens: int,
  eos_ids: tuple[int, ...],
  pad_id: int = 0,
  greedy: bool = True,
  temperature: float | jax.Array = 1.0,
  top_p: float | jax.Array = 1.0,
  key: jax.Array | None = None,
  edit: edit_lib.Edit | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Decodes up to N = max_new_tokens tokens for left-padded prompts.

  tokens, attention_mask: [B, T]. Returns (new_tokens [B, N] int32, padded with pad_id after the
  first end-of-sequence token, which is kept; lengths [B] = tokens up to and including it).
  """
  B, T = tokens.shape
  N = max_new_tokens
  if key is None:
    key = jax.random.key(0)
  eos = jnp.asarray(eos_ids, jnp.int32)
  cache = model_lib.init_cache(cfg, B, T + N, params.embed.dtype)
  last = jnp.full((B, 1), T - 1, jnp.int32)
  out = model_lib.forward(
    params, tokens, cfg, attention_mask=attention_mask, edit=edit, cache=cache, start=0,
    logits_positions=last,
  )

  def pick(logits, key):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, key, temperature, top_p).astype(jnp.int32)

  key, sub = jax.random.split(key)
  first = pick(out.logits[:, 0], sub)
  buf = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos)
  lengths = jnp.where(done, 1, N)

  def cond(state):
    i, _, _, done, _, _ = state
    return (i < N) & ~jnp.all(done)

  def body(state):
    i, cache, buf, done, lengths, key = state
    cur = buf[:, i - 1]
    o = model_lib.forward(
      params, cur[:, None], cfg, attention_mask=jnp.ones((B, 1), jnp.int32), edit=edit,
      cache=cache, start=T + i - 1,
    )
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, pad_id, pick(o.logits[:, 0], sub))
    buf = buf.at[:, i].set(nxt)
    hit = ~done & jnp.isin(nxt, eos)
    lengths = jnp.where(hit, i + 1, lengths)
    return i + 1, o.cache, buf, done | hit, lengths, key

  state = (jnp.int32(1), out.cache, buf, done, lengths, key)
  _, _, buf, _, lengths, _ = jax.lax.while_loop(cond, body, state)
  return buf, lengths


def completion_ids(out, lengths, eos_ids: Sequence[int]) -> list[list[int]]:
  """The token ids of each completion from `generate_tokens`' (new_tokens [B, N], lengths [B]): the
  first lengths[b] tokens, without the final end-of-sequence token when there is one."""
  out, lengths = np.asarray(out), np.asarray(lengths)
  rows = []
  for r in range(out.shape[0]):
    row = out[r, :lengths[r]].tolist()
    if row and row[-1] in eos_ids:
      row = row[:-1]
    rows.append(row)
  return rows


def decode_completions(tokenizer, out, lengths) -> list[str]:
  """Decoded completions [B] from `generate_tokens`' outputs (end-of-sequence token dropped)."""
  return [tokenizer.decode(r) for r in completion_ids(out, lengths, tokenizer.eos_ids)]


@dataclasses.dataclass
class Generations:
  """Prompts as given, as formatted, the decoded completions and their token ids."""

  prompts: list[str]
  formatted: list[str]
  completions: list[str]
  tokens: list[list[int]]


def _check_edit_for_batching(edit: edit_lib.Edit | None) -> None:
  if edit is None:
    return
  for site, se in edit.items():
    for name, leaf in vars(se).items():
      if leaf is None or name in ("ablate_dirs", "add_layers"):
        continue
      b, s = (0, 1) if name == "add_shared" else (1, 2)  # add_shared has no leading layer axis
      if leaf.shape[b] != 1 or leaf.shape[s] != 1:
        raise ValueError(
          f"generate(): edit[{site!r}].{name} has shape {tuple(leaf.shape)}; the batching layer "
          "needs batch and slot axes of size 1 (same edit for every prompt and position). "
          "Use generate_tokens for per-prompt or per-position edits."
        )


def generate(
  model: LoadedModel,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 64,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  edit: edit_lib.Edit | None = None,
  chat: bool = True,
  system: str | None = None,
  batch_size: int = 16,
  progress: bool = False,
) -> Generations:
  """Generates completions for user prompts (chat-formatted with the model's template by default).

  Prompts are processed in batches of exactly `batch_size` rows (the last, and a call with fewer
  prompts, padded by repeating the last prompt: one compilation per prompt-length bucket, whatever
  the number of prompts), left-padded to a multiple of 16 tokens. temperature == 0 is greedy.
  """
  prompts = list(prompts)
  if not prompts:
    raise PromptError("generate(): empty prompt set")
  _check_edit_for_batching(edit)
  tok = model.tokenizer
  formatted = [tok.format_chat(p, system=system) if chat else p for p in prompts]
  max_len = model.cfg.max_position - max_new_tokens
  # Validate every prompt before any compute so a bad one fails fast.
  for i, f in enumerate(formatted):
    n = len(tok.encode(f))
    if n == 0:
      raise PromptError(f"generate(): prompt {i} is empty")
    if n > max_len:
      raise PromptError(
        f"generate(): prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} the "
        f"context of {model.cfg.max_position} allows at most {max_len}"
      )
  key = jax.random.key(seed)
  completions, ids = [], []
  n_batches = -(-len(formatted) // batch_size)
  for chunk, n_real in tqdm(batching.pad_batches(formatted, batch_size, fixed=True), total=n_batches,
                            desc="generate", disable=not progress):
    tokens, mask = tok.batch(chunk, max_len=max_len, pad_to_multiple=16)
    key, sub = jax.random.split(key)
    out, lengths = generate_tokens(
      model.params, jnp.asarray(tokens), jnp.asarray(mask), model.cfg,
      max_new_tokens=max_new_tokens, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
      greedy=temperature == 0.0, temperature=max(temperature, 1e-6), top_p=top_p, key=sub,
      edit=edit,
    )
    rows = completion_ids(out, lengths, tok.eos_ids)[:n_real]
    ids.extend(rows)
    completions.extend(tok.decode(r) for r in rows)
  return Generations(prompts=prompts, formatted=formatted, completions=completions, tokens=ids)
