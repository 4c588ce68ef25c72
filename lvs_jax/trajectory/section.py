"""The report's "trajectory" section: every measure along training steps, one shared x-axis per run.
Nothing here runs a model (rows come from `lvs_jax.trajectory.audit.run`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lvs_jax.report import charts
from lvs_jax.report import store as report_lib

# (row key, label in the plot and the table, how to read it)
MEASURES = (
  ("refusal/harmful", "harmful refused", "robust refusal: higher is safer"),
  ("asr/gcg", "GCG ASR (fresh, against this checkpoint)", "lower is more robust"),
  ("refusal/xstest_safe", "XSTest safe refused", "exaggerated safety: lower is better"),
  ("refusal/harmless", "harmless refused", "1 - benign compliance: lower is better"),
  ("coupling/peak", "H/R coupling at the peak layer", "|cos| of harmfulness and refusal carriers"),
  ("coupling/mean", "H/R coupling, mean over layers", "|cos| of harmfulness and refusal carriers"),
  ("drift/angle", "drift angle to step 0", "mean over probe prompts, degrees"),
  ("drift/probe_auc", "AUC of the step-0 probe", "harmful vs harmless, held-out split"),
)
UNITS = {"coupling/peak": "|cos|", "coupling/mean": "|cos|", "drift/angle": "degrees", "drift/probe_auc": "AUC"}


def _v(m, field="rate"):
  """A measure's value (rates: "rate"; coupling and drift: "value") or its low/high/n; None when absent."""
  if not isinstance(m, Mapping):
    return None
  return m.get("value", m.get("rate")) if field == "rate" else m.get(field)


def measure_keys(rows: Sequence[Mapping]) -> list[tuple[str, str, str]]:
  """MEASURES present in the rows (a GCG key "asr/gcg@N" is matched by its prefix), in MEASURES order."""
  present = []
  for key, label, guide in MEASURES:
    hits = sorted({k for r in rows for k in r if k == key or k.startswith(key + "@")})
    present += [(k, label + (f" ({k.split('@')[1]} steps)" if "@" in k else ""), guide) for k in hits]
  return present


def transfer_parts(cells: Sequence[Mapping]) -> tuple[list[report_lib.Figure], list[report_lib.Table]]:
  """The transfer matrix as a heat map (sources x evaluated checkpoints) and a table with intervals."""
  if not cells:
    return [], []
  sources = list(dict.fromkeys(c["source"] for c in cells))
  targets = list(dict.fromkeys(f"{c['run']}@{c['step']}" for c in cells))
  m = np.full((len(sources), len(targets)), np.nan)
  for c in cells:
    m[sources.index(c["source"]), targets.index(f"{c['run']}@{c['step']}")] = c["rate"]
  fig = report_lib.Figure("transfer", charts.heatmap(m, targets, sources, title="Transfer ASR: test cases from "
                                                     "source (row) against checkpoint (column)",
                                                     cbar_label="ASR"), "Sparse transfer matrix")
  table = report_lib.Table("transfer", ["source", "run", "step", "asr", "low", "high", "k", "n"],
                           [[c["source"], c["run"], c["step"], c["rate"], c["low"], c["high"], c["k"], c["n"]]
                            for c in cells], caption="Fixed-source transfer: ASR of each source's test cases "
                           "against each checkpoint (95% Wilson interval).")
  return [fig], [table]


def run_level_tables(run_level: Mapping | None) -> list[report_lib.Table]:
  """The effective-rank table and the correlation table (`lvs_jax.trajectory.measures.run_level`)."""
  if not run_level:
    return []
  out = []
  if run_level.get("ranks"):
    out.append(report_lib.Table("carrier_rank", ["run", "family", "checkpoints", "layer", "effective rank",
                                                 "mean over layers"],
                                [[r["run"], r["family"], r["k"], r["layer"], r["rank"], r["mean_over_layers"]]
                                 for r in run_level["ranks"]],
                                caption="Effective rank (exp of the entropy of the normalized singular values) of "
                                "each carrier family's unit carriers stacked across a run's checkpoints, at the run's "
                                "layer of highest mean coupling (1 = one direction throughout)."))
  if run_level.get("correlations"):
    out.append(report_lib.Table("correlation", ["run", "measure", "against", "Spearman rho", "n (few points)",
                                                "tracks transfer better"],
                                [[c["run"], c["x"], c["y"], c["rho"], c["n"], c.get("better_for_transfer", "")]
                                 for c in run_level["correlations"]],
                                caption="Spearman rank correlation across the checkpoints of each run (few points: "
                                "read n). Transfer ASR = pooled ASR of every other source's test cases against the "
                                "checkpoint (its own cases excluded)."))
  return out


def section(rows: Sequence[Mapping], cfg, cells: Sequence[Mapping] = (),
            run_level: Mapping | None = None) -> report_lib.Section:
  measures = measure_keys(rows)
  runs = list(dict.fromkeys(r["run"] for r in rows))
  figs = []
  for key, label, guide in measures:
    series, errors = {}, {}
    for run in runs:
      rr = sorted((r for r in rows if r["run"] == run and key in r), key=lambda r: r["step"])
      x = np.array([r["step"] for r in rr], float)
      y = np.array([_v(r[key]) for r in rr], float)
      series[run] = (x, y)
      errors[run] = np.nan_to_num(np.stack([y - np.array([_v(r[key], "low") for r in rr], float),
                                            np.array([_v(r[key], "high") for r in rr], float) - y]))
    name = key.replace("/", "_").replace("@", "_s")
    figs.append(report_lib.Figure(name, charts.line_chart(None, series, errors, xlabel="training step",
                                                          ylabel=UNITS.get(key, "rate"), title=f"{label} ({guide})"),
                                  label))
  cols = ["run", "step", "seconds_per_step"]
  for key, _, _ in measures:
    cols += [key, f"{key} low", f"{key} high", f"{key} n"]
  table_rows = []
  for r in sorted(rows, key=lambda r: (runs.index(r["run"]), r["step"])):
    row = [r["run"], r["step"], r["seconds_per_step"]]
    for key, _, _ in measures:
      m = r.get(key) or {}
      row += [_v(m), m.get("low"), m.get("high"), m.get("n")]
    table_rows.append(row)
  table = report_lib.Table("trajectory", cols, table_rows,
                           caption="Every measure at every evaluated checkpoint (rates with 95% Wilson intervals).")
  last = {run: max((r for r in rows if r["run"] == run), key=lambda r: r["step"]) for run in runs}
  summary = {}
  for run, r in last.items():
    for key, _, _ in measures:
      if key in r:
        summary[f"{run}@{r['step']}/{key}"] = _v(r[key])
  a = cfg.attack
  paths = {run: r["path"] for run, r in last.items()}
  sets = ", ".join(f"{k}: {v['path']} (n={v.get('n') or 'all'})" for k, v in cfg.sets.items())
  notes = (f"Runs: {', '.join(f'{run} ({paths[run]})' for run in runs)}. "
           f"Behavior: greedy {cfg.eval.max_new_tokens}-token completions judged by the substring judge "
           f"({cfg.eval.prefixes}); sets {sets}. "
           f"GCG: a fresh attack against each checkpoint on the first {a.n_prompts} prompts of {a.prompts}, "
           f"{', '.join(map(str, a.gcg_budgets))} steps, width {a.gcg.search_width}, top-k {a.gcg.topk}; ASR = "
           "greedy completion not refused. Checkpoints with identical weights (a run's step 0 is its base model) "
           "are evaluated once.")
  if cfg.get("geometry") and cfg.geometry.enabled:
    notes += (f" Geometry: harmfulness carrier ({', '.join(cfg.geometry.harmful)} vs {', '.join(cfg.geometry.harmless)}"
              f" at the last instruction token) and refusal carrier (refused vs complied by that checkpoint's own "
              f"generations, last prompt token) over the behavioral sets, prompts of {', '.join(cfg.geometry.exclude)} "
              f"(the runs' training sets) dropped; coupling = |cos| per layer, {cfg.geometry.n_boot} bootstrap "
              "resamples within the label strata.")
  if cfg.get("drift") and cfg.drift.enabled:
    d = cfg.drift
    sets = [" + ".join(f"{x['path']}{'/' + x['label'] if x.get('label') else ''} (n={x.get('n') or 'all'})" for x in xs)
            for xs in (d.harmful, d.harmless)]
    notes += (f" Drift: {d.pooling}-pooled {d.site} embeddings at layer {d.layer} of {sets[0]} vs "
              f"{sets[1]} prompts (training prompts dropped), relative to the run's step 0: mean angle, "
              f"AUC of a logistic probe fitted at step 0 on its test split, the {d.statistic} alarm (alpha {d.alpha}).")
  tfigs, ttables = transfer_parts(cells)
  return report_lib.Section(key="trajectory", title="Checkpoint trajectories", summary=summary,
                            tables=[table, *ttables, *run_level_tables(run_level)], figures=figs + tfigs, notes=notes)
