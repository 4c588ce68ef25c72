"""Tokenizer and chat-template handling (transformers tokenizers only; no torch).

`Tokenizer` wraps a transformers fast tokenizer built offline (from GGUF metadata or a checkpoint
directory) and adds what lvs_jax needs: chat formatting of user messages, left-padded batches as
numpy arrays, and the set of end-of-sequence ids that stop generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lvs_jax.core.config import ModelConfig


class PromptError(ValueError):
  """A prompt set is empty, or a prompt does not fit the model's context."""


@dataclasses.dataclass
class Tokenizer:
  """A transformers tokenizer plus the pieces of a chat model lvs_jax relies on.

  hf: the transformers tokenizer (PreTrainedTokenizerFast or TokenizersBackend).
  chat_template: the Jinja template (None for base models: prompts are used as-is).
  eos_ids: token ids that end a generation (the tokenizer's eos and, when the template has one,
    its end-of-turn token).
  pad_id: id written into left padding (masked out, never attended to).
  """

  hf: Any
  chat_template: str | None
  eos_ids: tuple[int, ...]
  pad_id: int
  system_prompt: str | None = None

  def format_chat(self, prompt: str | Sequence[dict], system: str | None = None) -> str:
    """One user message (or a full message list) -> the templated prompt string, ready to generate."""
    if self.chat_template is None:
      if not isinstance(prompt, str):
        raise PromptError("model has no chat template: prompts must be plain strings")
      return prompt
    if isinstance(prompt, str):
      messages = [{"role": "user", "content": prompt}]
    else:
      messages = list(prompt)
    system = system if system is not None else self.system_prompt
    if system is not None and messages[0]["role"] != "system":
      messages = [{"role": "system", "content": system}] + messages
    return self.hf.apply_chat_template(
      messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
    )

  def encode(self, text: str) -> list[int]:
    """Token ids of already formatted text; no special tokens are added (templates carry them)."""
    return list(self.hf(text, add_special_tokens=False)["input_ids"])

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def batch(
    self, texts: Sequence[str], max_len: int | None = None, pad_to_multiple: int = 8
  ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (tokens [B, T] int32, attention_mask [B, T] int32) for formatted texts.

    T is rounded up to a multiple of `pad_to_multiple` so that jitted functions see few shapes.
    A text longer than `max_len` tokens raises PromptError naming it.
    """
    if len(texts) == 0:
      raise PromptError("empty prompt set: nothing to tokenize")
    ids = [self.encode(t) for t in texts]
    for i, x in enumerate(ids):
      if len(x) == 0:
        raise PromptError(f"prompt {i} is empty after tokenization")
      if max_len is not None and len(x) > max_len:
        raise PromptError(
          f"prompt {i} has {len(x)} tokens, longer than the context of {max_len} "
          f"(starts {texts[i][:60]!r})"
        )
    t = max(len(x) for x in ids)
    t = -(-t // pad_to_multiple) * pad_to_multiple
    tokens = np.full((len(ids), t), self.pad_id, np.int32)
    mask = np.zeros((len(ids), t), np.int32)
    for i, x in enumerate(ids):
      tokens[i, t - len(x):] = x
      mask[i, t - len(x):] = 1
    return tokens, mask


@dataclasses.dataclass
class LoadedModel:
  """What the loaders return: config, weights, tokenizer, and where they came from."""

  cfg: ModelConfig
  params: Any  # lvs_jax.core.model.Params
  tokenizer: Tokenizer
  source: str = ""
  name: str = ""
