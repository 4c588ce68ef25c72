"""Collecting residual-stream activations of prompt sets at chosen token positions.

Token positions of a chat-formatted prompt (names from the refusal-geometry literature):
  t_inst       the last token of the user's instruction, before the chat template's
               post-instruction tokens (e.g. SmolLM2's "<|im_end|>\\n<|im_start|>assistant\\n")
  t_post_inst  the last prompt token (the end of the template), where generation starts

Pooling: "last" (t_post_inst), "last_instruction" (t_inst), "mean" (mean over the instruction's
own tokens, t_inst_start..t_inst; not over the system prompt and template tokens, whose
attention-sink norms are an order of magnitude larger and would swamp the average). Positions are
found from the tokenizer's character offsets, so they are right for any chat template and for
left-padded batches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lvs_jax.core import batching
from lvs_jax.core import edit as edit_lib
from lvs_jax.core import model as model_lib
from lvs_jax.core.tokenizer import PromptError, Tokenizer

POOLINGS = ("last", "last_instruction", "mean")


def instruction_span(tokenizer: Tokenizer, formatted: str, instruction: str) -> tuple[int, int]:
  """(first, last) token indices of `instruction` in the unpadded token sequence of `formatted`.

  The instruction is located as its last occurrence in the formatted text (after any system
  prompt); first = the token holding its first character, last = the last token that starts
  before its final character ends.
  """
  begin = formatted.rfind(instruction)
  if begin < 0 or not instruction:
    raise PromptError(f"instruction {instruction[:60]!r} not found in its chat-formatted prompt")
  end = begin + len(instruction)
  enc = tokenizer.hf(formatted, add_special_tokens=False, return_offsets_mapping=True)
  offsets = enc["offset_mapping"]
  first = min(i for i, (s, e) in enumerate(offsets) if e > begin)
  last = max(i for i, (s, _) in enumerate(offsets) if s < end)
  return first, last


def prompt_positions(
  tokenizer: Tokenizer, prompts: Sequence[str], chat: bool = True, pad_to_multiple: int = 16
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Left-padded batch and positions for user prompts.

  Returns (tokens [N, T], mask [N, T], t_inst_start [N], t_inst [N], t_post_inst [N]); positions
  index the padded T axis. Without chat formatting the instruction is the whole prompt.
  """
  formatted = [tokenizer.format_chat(p) if chat else p for p in prompts]
  tokens, mask = tokenizer.batch(formatted, pad_to_multiple=pad_to_multiple)
  T = tokens.shape[1]
  lengths = mask.sum(1)
  t_post = np.full(len(prompts), T - 1, np.int32)
  if chat:
    spans = np.array([instruction_span(tokenizer, f, p) for f, p in zip(formatted, prompts)], np.int32)
    t_start, t_inst = (T - lengths + spans[:, 0]).astype(np.int32), (T - lengths + spans[:, 1]).astype(np.int32)
  else:
    t_start, t_inst = (T - lengths).astype(np.int32), t_post.copy()
  return tokens, mask, t_start, t_inst, t_post


@functools.partial(jax.jit, static_argnames=("cfg", "site", "pooling"))
def _pooled(params, tokens, mask, t_start, t_inst, cfg, site, pooling, edit):
  B, T = tokens.shape
  if pooling == "mean":
    out = model_lib.forward(params, tokens, cfg, attention_mask=mask, edit=edit, capture=(site,),
                            logits_positions=jnp.full((B, 1), T - 1, jnp.int32))
    h = out.captured[site].astype(jnp.float32)  # [L, B, T, D]
    t = jnp.arange(T)[None]
    w = ((t >= t_start[:, None]) & (t <= t_inst[:, None])).astype(jnp.float32)[None, :, :, None]
    return (h * w).sum(2) / w.sum(2)
  pos = jnp.full((B, 1), T - 1, jnp.int32) if pooling == "last" else t_inst[:, None]
  out = model_lib.forward(params, tokens, cfg, attention_mask=mask, edit=edit, capture=(site,),
                          capture_positions=pos, logits_positions=jnp.full((B, 1), T - 1, jnp.int32))
  return out.captured[site][:, :, 0].astype(jnp.float32)  # [L, B, D]


def collect(
  model,
  prompts: Sequence[str],
  *,
  pooling: str = "last",
  site: str = "resid_post",
  layers: Sequence[int] | None = None,
  batch_size: int = 16,
  chat: bool = True,
  edit: edit_lib.Edit | None = None,
  progress: bool = False,
) -> np.ndarray:
  """Pooled activations [L', N, D] float32 of `site` at `layers` (default all) for user prompts.

  model: a LoadedModel. pooling: one of POOLINGS (see module docstring). Batches are padded to a
  fixed size so one compilation serves them all.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
  prompts = list(prompts)
  if not prompts:
    raise PromptError("collect(): empty prompt set")
  out = []
  for chunk, n in tqdm(list(batching.pad_batches(prompts, batch_size)), desc="activations", disable=not progress):
    tokens, mask, t_start, t_inst, _ = prompt_positions(model.tokenizer, chunk, chat=chat)
    h = _pooled(model.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(t_start), jnp.asarray(t_inst),
                model.cfg, site, pooling, edit)
    h = np.asarray(h)[:, :n]
    out.append(h if layers is None else h[np.asarray(layers)])
  return np.concatenate(out, axis=1)
