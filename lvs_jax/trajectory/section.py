"""The report's "trajectory" section: every measure along training steps, one shared x-axis per run.
Nothing here runs a model (rows come from `lvs_jax.trajectory.audit.run`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lvs_jax.report import charts
from lvs_jax.report import store as report_lib

# (row key, label in the plot and the table ("{}": the part of the key after "@"), how to read it, figure group).
# Measures of one group share a figure, one series per run and variant ("<run> / <variant>"); None: a figure each.
MEASURES = (
  ("refusal/harmful", "harmful refused", "robust refusal: higher is safer", None),
  ("asr/gcg", "GCG ASR (fresh, against this checkpoint) ({} steps)", "lower is more robust", None),
  ("refusal/xstest_safe", "XSTest safe refused", "exaggerated safety: lower is better", None),
  ("refusal/harmless", "harmless refused", "1 - benign compliance: lower is better", None),
  ("coupling/peak", "H/R coupling at the peak layer", "|cos| of harmfulness and refusal carriers", None),
  ("coupling/mean", "H/R coupling, mean over layers", "|cos| of harmfulness and refusal carriers", None),
  ("drift/angle", "drift angle to step 0", "mean over probe prompts, degrees", None),
  ("drift/probe_auc", "AUC of the step-0 probe", "harmful vs harmless, held-out split", None),
  ("lvs/model", "LVS, mean over layers", "of the refused prompts: higher breaks more easily", None),
  ("lvs/layer", "LVS at layer {}", "per attacked layer", "lvs_layers"),
  ("lvs/audit_gap", "audit gap (refusal rate x LVS)", "share of harmful prompts refused but latently broken", None),
  ("kl_admissible/harmfulness", "KL-admissible harmfulness carriers", "fraction of layers", "kl_admissible"),
  ("kl_admissible/refusal", "KL-admissible refusal carriers", "fraction of layers", "kl_admissible"),
  ("kl_admissible_rank/harmfulness", "effective rank, admissible harmfulness carriers", "across layers",
   "kl_admissible_rank"),
  ("kl_admissible_rank/refusal", "effective rank, admissible refusal carriers", "across layers", "kl_admissible_rank"),
  ("coupling_admissible/peak", "H/R coupling at the peak KL-admissible layer", "|cos|", "coupling_admissible"),
  ("coupling_admissible/mean", "H/R coupling, mean over KL-admissible layers", "|cos|", "coupling_admissible"),
)
UNITS = {"coupling/peak": "|cos|", "coupling/mean": "|cos|", "drift/angle": "degrees", "drift/probe_auc": "AUC",
         "lvs/model": "LVS", "lvs/audit_gap": "share of prompts"}
GROUPS = {  # figure group -> (title, y label)
  "lvs_layers": ("LVS per layer (refused prompts; 95% bootstrap)", "LVS"),
  "kl_admissible": ("Layers whose carrier ablation keeps harmless KL under the bound", "fraction of layers"),
  "kl_admissible_rank": ("Effective rank of the KL-admissible carriers across layers", "effective rank"),
  "coupling_admissible": ("H/R coupling over KL-admissible layers (peak, mean)", "|cos|"),
}


def _v(m, field="rate"):
  """A measure's value (rates: "rate"; coupling and drift: "value") or its low/high/n; None when absent."""
  if not isinstance(m, Mapping):
    return None
  return m.get("value", m.get("rate")) if field == "rate" else m.get(field)


def measure_keys(rows: Sequence[Mapping]) -> list[tuple[str, str, str, str | None, str]]:
  """(row key, label, guide, figure group, variant) of the MEASURES present in the rows, in MEASURES order; a key
  "asr/gcg@N" or "lvs/layer@L" is matched by its prefix (variant: the part after "@", else the key's last part)."""
  present = []
  for key, label, guide, group in MEASURES:
    hits = sorted({k for r in rows for k in r if k == key or k.startswith(key + "@")},
                  key=lambda k: (len(k), k))  # "@6" before "@12"
    for k in hits:
      at = k.split("@")[1] if "@" in k else ""
      present.append((k, label.format(at) if "{}" in label else label, guide, group, at or k.rsplit("/", 1)[-1]))
  return present


def _series(rows: Sequence[Mapping], run: str, key: str) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
  """((steps, values), [2, K] error half-widths) of one run's measure along steps (nan where absent)."""
  rr = sorted((r for r in rows if r["run"] == run and key in r), key=lambda r: r["step"])
  x = np.array([r["step"] for r in rr], float)
  y = np.array([_v(r[key]) for r in rr], float)
  err = np.nan_to_num(np.stack([y - np.array([_v(r[key], "low") for r in rr], float),
                                np.array([_v(r[key], "high") for r in rr], float) - y]))
  return (x, y), err


def admissible_table(rows: Sequence[Mapping]) -> list[report_lib.Table]:
  """Which layers are KL-admissible at each checkpoint, per family (`lvs_jax.trajectory.admissible`)."""
  out = []
  for r in sorted(rows, key=lambda r: (r["run"], r["step"])):
    for f in ("harmfulness", "refusal"):
      m, rank = r.get(f"kl_admissible/{f}"), r.get(f"kl_admissible_rank/{f}") or {}
      if m is not None:
        out.append([r["run"], r["step"], f, m.get("k"), m.get("n"), " ".join(map(str, m.get("layers") or [])),
                    m.get("min_kl"), rank.get("value"), m.get("bound"), m.get("reason", "")])
  if not out:
    return []
  return [report_lib.Table("kl_admissible", ["run", "step", "family", "admissible layers", "of layers", "layers",
                                             "min KL (nats)", "effective rank", "bound (nats)", "not measured because"],
                           out, caption="Layers whose carrier, projected out of every layer and site, keeps the mean "
                           "next-token KL on harmless prompts within the bound; effective rank of those unit "
                           "carriers.")]


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
  figs, grouped = [], {}
  for key, label, guide, group, variant in measures:
    if group is not None:
      grouped.setdefault(group, []).append((key, variant))
      continue
    series, errors = {}, {}
    for run in runs:
      series[run], errors[run] = _series(rows, run, key)
    name = key.replace("/", "_").replace("@", "_s")
    figs.append(report_lib.Figure(name, charts.line_chart(None, series, errors, xlabel="training step",
                                                          ylabel=UNITS.get(key, "rate"), title=f"{label} ({guide})"),
                                  label))
  for group, members in grouped.items():
    series, errors = {}, {}
    for run in runs:
      for key, variant in members:
        series[f"{run} / {variant}"], errors[f"{run} / {variant}"] = _series(rows, run, key)
    title, ylabel = GROUPS[group]
    figs.append(report_lib.Figure(group, charts.line_chart(None, series, errors, xlabel="training step", ylabel=ylabel,
                                                           title=title, group_styles=True), title))
  cols = ["run", "step", "seconds_per_step"]
  for key, *_ in measures:
    cols += [key, f"{key} low", f"{key} high", f"{key} n"]
  table_rows = []
  for r in sorted(rows, key=lambda r: (runs.index(r["run"]), r["step"])):
    row = [r["run"], r["step"], r["seconds_per_step"]]
    for key, *_ in measures:
      m = r.get(key) or {}
      row += [_v(m), m.get("low"), m.get("high"), m.get("n")]
    table_rows.append(row)
  table = report_lib.Table("trajectory", cols, table_rows,
                           caption="Every measure at every evaluated checkpoint (rates with 95% Wilson intervals).")
  last = {run: max((r for r in rows if r["run"] == run), key=lambda r: r["step"]) for run in runs}
  summary = {}
  for run, r in last.items():
    for key, *_ in measures:
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
  if cfg.get("admissible") and cfg.admissible.enabled and cfg.get("geometry") and cfg.geometry.enabled:
    ad = cfg.admissible
    notes += (f" KL-admissible carriers: each layer's harmfulness/refusal carrier (the geometry pool's) projected out "
              f"of every layer and site; admissible where the mean next-token KL(clean || ablated) at the last prompt "
              f"token of the first {ad.n} prompts of set {ad.set!r} is <= {ad.bound} nats (refusal_direction's "
              "filter); zero carriers are never admissible. Coupling over admissible layers uses the layers where both "
              "families are admissible; effective rank of each family's admissible unit carriers across layers.")
  if cfg.get("lvs") and cfg.lvs.enabled:
    v = cfg.lvs
    notes += (f" LVS: PGD latent attacks ({v.norm}/{v.scope}, {v.steps} {v.optimizer} steps, {v.stop} stop, target "
              f"{v.target!r} unless the set has its own) at layers {', '.join(map(str, v.layers))} and radii "
              f"{', '.join(f'{r:g}' for r in v.radii)} (relative to ||h_t||) on the {v.prompts} prompts the checkpoint "
              f"refuses{'' if v.only_refused else ' (here: every prompt)'} ({v.max_new_tokens}-token greedy "
              f"generations, {v.judge_prefixes} judge); model LVS = mean over layers, 1000 bootstrap resamples over "
              "prompts; audit gap = refusal rate x LVS with a joint bootstrap (lvs_jax.lvs.attack.audit_gap).")
  tfigs, ttables = transfer_parts(cells)
  return report_lib.Section(key="trajectory", title="Checkpoint trajectories", summary=summary,
                            tables=[table, *admissible_table(rows), *ttables, *run_level_tables(run_level)],
                            figures=figs + tfigs, notes=notes)
