"""Behavioral safety evaluation: generate, judge, and summarize refusal on prompt sets.

The behavioral section of an audit asks, per prompt set, how often the model refuses:
  harmful prompts          refusal rate (higher is safer)
  harmless prompts         compliance = 1 - refusal rate (higher is more useful)
  XSTest safe prompts      refusal rate = exaggerated safety (lower is better)
  XSTest unsafe prompts    refusal rate (higher is safer)

Each rate comes with a 95% Wilson score interval, and each set also gets the mean logit refusal
score (Arditi et al. 2024: log-odds of a refusal-start token at the last prompt position), which
needs no generation. Generations are appended to a JSONL file per set as each batch finishes, so an
interrupted run resumes where it stopped.
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
from lvs_jax.report import charts
from lvs_jax.report import store as report_lib


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
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
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


# Which direction is "good" for each conventional set name, for the report's reading guide.
SET_GOALS = {
  "harmful": "refusal should be high",
  "harmless": "refusal should be low (compliance high)",
  "xstest_safe": "refusal should be low (exaggerated safety)",
  "xstest_unsafe": "refusal should be high",
}


def behavior_section(results: Sequence[SetResult], n_examples: int = 4) -> report_lib.Section:
  """The audit report's behavioral section: a rate table with intervals, a bar chart, examples."""
  rows, summary, examples = [], {}, []
  for r in results:
    lo, hi = r.interval
    rows.append([r.name, r.n, r.n_refused, r.refusal_rate, lo, hi, r.refusal_score, SET_GOALS.get(r.name, "")])
    summary[f"refusal_rate/{r.name}"] = r.refusal_rate
    if r.name == "harmless":
      summary["compliance_rate/harmless"] = 1 - r.refusal_rate
    for rec in r.records[:n_examples]:
      examples.append(dict(set=r.name, prompt=rec["prompt"], completion=rec["completion"],
                           refused=rec["refused"]))
  table = report_lib.Table(
    "refusal_rates",
    ["set", "n", "refused", "refusal_rate", "ci95_low", "ci95_high", "mean_refusal_score", "goal"],
    rows, caption="Greedy generations judged by substring refusal prefixes; 95% Wilson intervals. "
    "mean_refusal_score: log-odds (nats) of a refusal-start token at the last prompt position.",
  )
  headlines = []
  for r in results:
    lo, hi = r.interval
    if r.name == "harmful":
      headlines.append(report_lib.Headline("Refusal on harmful prompts", r.refusal_rate, lo, hi,
                                           f"higher is safer (n={r.n})", "rate"))
    elif r.name == "harmless":
      headlines.append(report_lib.Headline("Compliance on harmless prompts", 1 - r.refusal_rate, 1 - hi, 1 - lo,
                                           f"higher is more useful (n={r.n})", "rate"))
    elif r.name == "xstest_safe":
      headlines.append(report_lib.Headline("XSTest over-refusal", r.refusal_rate, lo, hi,
                                           f"safe prompts refused; lower is better (n={r.n})", "rate"))
  rates = [r.refusal_rate for r in results]
  err = np.array([[r.refusal_rate - r.interval[0] for r in results], [r.interval[1] - r.refusal_rate for r in results]])
  fig = charts.bar_chart([r.name for r in results], rates, errors=err, title="Refusal rate by prompt set",
                             ylabel="refusal rate")
  return report_lib.Section(
    key="behavior", title="Behavioral safety", summary=summary, tables=[table],
    figures=[report_lib.Figure("refusal_rates", fig, "Refusal rate with 95% Wilson intervals")],
    examples=examples, headlines=headlines,
    notes="Refusal is judged by case-insensitive substring match against refusal prefixes "
    "(lvs_jax.evals.judges); such judges over-count refusals that merely mention e.g. 'I cannot', and miss "
    "refusals phrased otherwise. Every generation is in tables/ and generations/*.jsonl.",
  )
