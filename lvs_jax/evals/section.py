"""The report's "behavior" section: refusal rates per prompt set with Wilson intervals, a bar chart,
headlines and example generations, from the `behavior.SetResult`s that lvs_jax.evals.behavior computes.
Nothing here runs a model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lvs_jax.evals import behavior
from lvs_jax.report import charts
from lvs_jax.report import store as report_lib

# Which direction is "good" for each conventional set name, for the report's reading guide.
SET_GOALS = {
  "harmful": "refusal should be high",
  "harmless": "refusal should be low (compliance high)",
  "xstest_safe": "refusal should be low (exaggerated safety)",
  "xstest_unsafe": "refusal should be high",
}


def behavior_section(results: Sequence[behavior.SetResult], n_examples: int = 4) -> report_lib.Section:
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
