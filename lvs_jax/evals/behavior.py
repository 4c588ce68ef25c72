"""Behavioral safety evaluation: generate, judge, and summarize refusal on prompt sets.

The behavioral section of an audit asks, per prompt set, how often the model refuses:
  harmful prompts          refusal rate (higher is safer)
  harmless prompts         compliance = 1 - refusal rate (higher is more useful)
  XSTest safe prompts      refusal rate = exaggerated safety (lower is better)
  XSTest unsafe prompts    refusal rate (higher is safer)

Each rate comes with a 95% Wilson score interval, and each set also gets the mean logit refusal
score (Arditi et al. 2024: log-odds of a refusal-start token at the last prompt position), which
needs no generation. Generations are appended to a JSONL file per set as each batch finishes, so an
interrupted run resumes where it stopped. The report section that shows the rates is
lvs_jax.evals.section.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lvs_jax.core import batching
from lvs_jax.core import edit as edit_lib
from lvs_jax.core import generate as gen
from lvs_jax.core import model as model_lib
from lvs_jax.core.tokenizer import LoadedModel, PromptError
from lvs_jax.evals import judges, stats
from lvs_jax.io import files, keys


@dataclasses.dataclass
class SetResult:
  """Refusal statistics of one prompt set. records: [{prompt, completion, refused}] in prompt order."""

  name: str
  records: list[dict]
  refusal_score: float = math.nan  # mean logit refusal score (nats)

  @property
  def n(self) -> int:
    return len(self.records)

  @property
  def n_refused(self) -> int:
    return int(sum(r["refused"] for r in self.records))

  @property
  def refusal_rate(self) -> float:
    return self.n_refused / self.n if self.n else math.nan

  @property
  def interval(self) -> tuple[float, float]:
    return stats.wilson_interval(self.n_refused, self.n)


def generation_key(model: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int, prefixes,
                   edit: edit_lib.Edit | None = None) -> dict:
  """The parts that decide a generations file (`io.keys`): model, prompts, generation and judge settings."""
  return dict(model=keys.model_parts(model), prompts=list(prompts), edit=keys.edit_parts(edit),
              config=dict(max_new_tokens=int(max_new_tokens), prefixes=prefixes, chat=True, decoding="greedy"))


@functools.partial(jax.jit, static_argnames=("cfg",))
def last_token_refusal(params, cfg, tokens, mask, edit, refusal_ids) -> jax.Array:
  """Logit refusal score [B] (nats; `judges.refusal_score`) at the last slot of left-padded prompts
  tokens, mask [B, T] under `edit` (a traced argument: one compilation per edit structure and shape)."""
  last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)
  logits = model_lib.forward(params, tokens, cfg, attention_mask=mask, edit=edit, logits_positions=last).logits
  return judges.refusal_score(logits[:, 0], refusal_ids)


def refusal_scores(
  model: LoadedModel, prompts: Sequence[str], refusal_ids=None, *, batch_size: int = 16,
  edit: edit_lib.Edit | None = None, chat: bool = True,
) -> np.ndarray:
  """Logit refusal score [N] (nats) of each prompt at its last (chat-formatted) prompt token, under
  `edit`. refusal_ids: the refusal-start tokens (default `judges.refusal_token_ids`)."""
  tok = model.tokenizer
  ids = jnp.asarray(judges.refusal_token_ids(tok) if refusal_ids is None else refusal_ids)
  texts = [tok.format_chat(p) if chat else p for p in prompts]
  out = []
  for chunk, n in batching.pad_batches(texts, batch_size):
    tokens, mask = tok.batch(chunk, pad_to_multiple=16)
    out.append(np.asarray(last_token_refusal(model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(mask), edit,
                                             ids))[:n])
  return np.concatenate(out)


def evaluate_refusal(
  model: LoadedModel,
  name: str,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 64,
  batch_size: int = 16,
  prefixes: str | Sequence[str] = "jailbreakbench",
  edit: edit_lib.Edit | None = None,
  cache_path: str | None = None,
  progress: bool = True,
) -> SetResult:
  """Greedy-generates a completion for every prompt, judges refusal by substring, scores logits.

  cache_path: a JSONL file of finished records; existing rows are reused and new rows appended after
  every batch, so a killed run loses one batch at most. The file is keyed (`io.keys`, kind
  "generations") by the model, the prompts, max_new_tokens, the judge and the edit: a file written
  by anything else is moved aside and regenerated, never reused.
  """
  prompts = list(prompts)
  if not prompts:
    raise PromptError(f"evaluate_refusal({name!r}): empty prompt set")
  records = []
  if cache_path and keys.claim(cache_path, "generations", **generation_key(
      model, prompts, max_new_tokens=max_new_tokens, prefixes=prefixes, edit=edit)):
    records = files.read_jsonl(cache_path)
  for i, r in enumerate(records):
    if i >= len(prompts) or r.get("prompt") != prompts[i]:
      raise ValueError(
        f"{cache_path}: row {i} is for a different prompt set than {name!r}; "
        "use a fresh workdir or delete the file"
      )
  if cache_path:
    files.makedirs(os.path.dirname(cache_path) or ".")
  todo = range(len(records), len(prompts), batch_size)
  for b0 in tqdm(todo, desc=f"{name}: generate", disable=not progress or not todo):
    chunk = prompts[b0:b0 + batch_size]
    g = gen.generate(model, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size, edit=edit)
    refused = judges.judge_refusals(g.completions, prefixes=prefixes)
    new = [
      dict(prompt=p, completion=c, refused=bool(r)) for p, c, r in zip(chunk, g.completions, refused)
    ]
    records.extend(new)
    if cache_path:
      files.append_jsonl(cache_path, new)
  scores = refusal_scores(model, prompts, batch_size=batch_size, edit=edit)
  for r, s in zip(records, scores):
    r["refusal_score"] = float(s)
  return SetResult(name=name, records=records, refusal_score=float(np.mean(scores)))
