"""The report's "drift_fair" section (issue 16): what `lvs_jax.drift.fair_audit.run` measured, in tables, figures
and a closing note. Rendering only; every number comes from the results dict `fair_audit.run` writes
(workdir/drift_fair/results.json), so a section can be re-rendered from that file alone:

  section(json.load(open("<workdir>/drift_fair/results.json")))
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

from lvs_jax.drift import study
from lvs_jax.report import store as report_lib

CONVENTIONS = ("norm", "coord")
PROBES = ("paper", "hardened")
CONV_NAME = {"norm": "total-norm sigma", "coord": "per-coordinate sigma"}


def _f(v, digits=3) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return f"{v:.{digits}g}"


def _finite(v) -> bool:
  """Whether v is a finite number (results.json stores nan as null)."""
  return v is not None and math.isfinite(v)


def _ci(mean, low, high, digits=3, pct=False) -> str:
  """mean [low, high]; pct: as percentages with one decimal."""
  def f(v):
    return f"{100 * v:.1f}%" if pct else _f(v, digits)

  if mean is None or not math.isfinite(mean):
    return "n/a"
  if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
    return f(mean)
  return f"{f(mean)} [{f(low)}, {f(high)}]"


def _m(row, name, digits=3, pct=False) -> str:
  """row[name] with its interval row[name_low], row[name_high]."""
  return _ci(row[name], row[f"{name}_low"], row[f"{name}_high"], digits, pct)


def _row(summary, probe, drift, point):
  return next((r for r in summary if (r["probe"], r["drift"], r["point"]) == (probe, drift, point)), None)


def notes(res: Mapping) -> str:
  """The closing note: the headline answers in words, with intervals over seeds."""
  full = res["full"]
  return "\n".join(_setup_lines(res) + _isotropic_lines(res["setup"], full) + _directional_lines(res["setup"], full)
                   + _alarm_lines(full) + _reanchor_lines(full) + _other_model_lines(res))


def _setup_lines(res: Mapping) -> list[str]:
  """The task, the model and embedding, the seeds, every task's clean AUC and both probes."""
  s, c = res["setup"], res["full"]["clean"]
  return [
    f"Task {s['headline_task']}: {s['headline_description']}; held out from the probes' training prompts "
    f"(harmful_train vs harmless_train, {s['n_fit']} fit + {s['n_val']} validation). Model {s['model']}, fixed "
    f"embedding: layer {s['layer']} {s['site']}, {s['pooling']} pooling, no layer search. Intervals: 95% t-intervals "
    f"over {s['seeds']} seeds (a seed refits both probes on a bootstrap resample of the training prompts and redraws "
    f"every drift; {s['repeats']} drift draws per point).",
    "Clean ROC-AUC per task (paper probe | hardened probe): " + "; ".join(
      f"{t['task']} {_ci(t['paper_auc'], t['paper_auc_low'], t['paper_auc_high'])} | "
      f"{_ci(t['hardened_auc'], t['hardened_auc_low'], t['hardened_auc_high'])}" for t in res["tasks"]) +
    f". The headline task is the one closest to the paper's {s['target_auc']}.",
    f"Paper probe: plain logistic regression (l2 {s['paper']['l2']}, {s['paper']['max_steps']} full-batch steps, no "
    f"standardization, no class weights, no early stopping, temperature {_f(c['paper']['temperature'][0])}); hardened "
    f"probe: the kit's (standardized, l2 chosen on validation, early stopping, temperature "
    f"{_f(c['hardened']['temperature'][0])}). Clean confidence: paper {_f(c['paper']['confidence'][0])}, hardened "
    f"{_f(c['hardened']['confidence'][0])}.",
  ]


def _isotropic_lines(s: Mapping, full: Mapping) -> list[str]:
  """Per convention and probe: the metrics at sigma = 0.02 and at collapse."""
  sm, sig, c, lines = full["summary"], full["sigma"], full["clean"], []
  for conv in CONVENTIONS:
    for p in PROBES:
      a = _row(sm, p, f"isotropic/{conv}", "sigma=0.02")
      b = _row(sm, p, f"isotropic/{conv}", "collapse")
      if a is None:
        continue
      pred = full["sweeps"][f"{p}/{conv}"]["predicted_auc"][0]
      closed = study.interp_log(sig, full["angles"][conv]["closed_form"], 0.02)
      txt = (f"{CONV_NAME[conv]}, {p} probe: sigma = 0.02 turns embeddings by {_f(a['angle'])} degrees (closed form "
             f"{_f(closed)}); ROC-AUC {_f(c[p]['auc'][0])} -> "
             f"{_m(a, 'auc')} (binormal prediction {_f(study.interp_log(sig, pred, 0.02))}), balanced accuracy "
             f"{_m(a, 'balanced_accuracy')}, confidence drop {_m(a, 'confidence_drop', 2, True)}, silent share of "
             f"errors {_m(a, 'silent_share', 2, True)}.")
      if b is not None and _finite(b["sigma"]):
        txt += (f" AUC ~0.5 (< {s['collapse_auc']}) only at sigma {_m(b, 'sigma')} = {_m(b, 'angle')} degrees: "
                f"balanced accuracy {_m(b, 'balanced_accuracy')}, confidence drop {_m(b, 'confidence_drop', 2, True)}, "
                f"silent share {_m(b, 'silent_share', 2, True)}.")
      else:
        txt += f" The AUC never falls below {s['collapse_auc']} on the grid (up to sigma {_f(max(sig))})."
      lines.append(txt)
  return lines


def _directional_lines(s: Mapping, full: Mapping) -> list[str]:
  """Per probe: where directional drift along each named direction halves the balanced accuracy's margin."""
  d, lines = full.get("directional", {}), []
  if d:
    for p in PROBES:
      parts = []
      for name in ("probe_normal", "class_mean", "auc_worst", "random_worst"):
        cur = d.get(f"{p}/{name}")
        if not cur:
          continue
        bacc, auc, ang, sil = (np.asarray(cur[k][0], float) for k in ("balanced_accuracy", "auc", "angle",
                                                                         "silent_failure_rate"))
        lvl = 0.5 + (bacc[0] - 0.5) / 2
        i = np.flatnonzero(bacc < lvl)
        j = np.flatnonzero(auc < s["collapse_auc"])
        silent = _ci(sil[i[0]], None, None, pct=True) if i.size else "n/a"
        parts.append(f"{name}: balanced accuracy halfway to chance at {_f(ang[i[0]]) if i.size else 'n/a'} deg "
                     f"(silent share of errors there {silent}), AUC < "
                     f"{s['collapse_auc']} at {_f(ang[j[0]]) if j.size else 'never'}" + (" deg" if j.size else ""))
      lines.append(f"Directional drift, {p} probe (first grid point past the level; random_worst = the worst of "
                   f"{s['n_random']} random directions): " + "; ".join(parts) + ".")
  return lines


def _alarm_lines(full: Mapping) -> list[str]:
  """Per drift: the alarm's 90% detection angle against the collapse angle."""
  lines = []
  for r in full.get("detect", []):
    det = {k[len("detect_angle_"):]: v for k, v in r.items() if k.startswith("detect_angle_")}
    best = min((v for v in det.values() if _finite(v)), default=float("nan"))
    before = _finite(best) and _finite(r["collapse_angle"]) and best < r["collapse_angle"]
    lines.append(f"Alarm, {r['drift']}: 90% detection at " + ", ".join(f"{k} {_f(v)}" for k, v in det.items())
                 + f" degrees vs collapse ({r['collapse_kind']}) at {_f(r['collapse_angle'])} degrees: the alarm "
                 + ("fires before the collapse." if before else "does NOT fire before the collapse.")
                 + " Fire rate at sigma = 0.02: " + ", ".join(f"{k[len('fire_at_0.02_'):]} {_f(v, 2)}"
                                                               for k, v in r.items() if k.startswith("fire_at_0.02_"))
                 + ".")
  return lines


def _reanchor_lines(full: Mapping) -> list[str]:
  """Procrustes re-anchoring with the most anchors, per drift and point."""
  best = {}
  for r in full.get("reanchor", []):
    best[(r["source"], r["point"])] = r  # the most anchors (rows are in increasing n)
  if not best:
    return []
  return ["Procrustes re-anchoring (paper probe, most anchors): " + "; ".join(
      f"{src} at {pt} ({_f(r['angle_deg'])} deg): AUC {_f(r['auc_clean'])} -> {_f(r['auc_drifted'])} -> "
      f"{_f(r['auc_reanchored'])}, balanced accuracy {_f(r['bacc_clean'])} -> {_f(r['bacc_drifted'])} -> "
      f"{_f(r['bacc_reanchored'])} ({r['n_anchors']} anchors)" for (src, pt), r in best.items()) + "."]


def _other_model_lines(res: Mapping) -> list[str]:
  """Real drift to the other model and the separability change on the headline task."""
  s, lines = res["setup"], []
  for r in res.get("real", []):
    lines.append(f"Real drift {s['model']} -> {r['source']} on the headline task: mean angle {_f(r['angle'])} degrees;"
                 f" paper probe AUC {_f(r['paper_auc_clean'])} -> {_f(r['paper_auc'])} (re-anchored "
                 f"{_f(r['paper_auc_reanchored'])}), balanced accuracy {_f(r['paper_balanced_accuracy'])}, "
                 f"confidence drop {_ci(r['paper_confidence_drop'], None, None, pct=True)}, silent share "
                 f"{_ci(r['paper_silent_share'], None, None, pct=True)}; hardened AUC {_f(r['hardened_auc_clean'])} -> "
                 f"{_f(r['hardened_auc'])}.")
  sep = [r for r in res.get("separability", []) if r["task"] == s["headline_task"]]
  if sep:
    lines.append(f"Separability {s['model']} vs {s['separability_source']} on {s['headline_task']} (relative change, "
                 "95% paired bootstrap interval; the aligned anchor is our safety-SFT of the instruct model, not a "
                 "base model): " + ", ".join(f"{r['metric']} {_ci(r['relative_change'], r['low'], r['high'], 2, True)}"
                                             for r in sep) + ".")
  return lines


def _plot(series, xlabel, ylabel, title, marks=(), hline=None, logx=False):
  fig, ax = plt.subplots(figsize=(6.8, 4.2))
  for i, (name, (x, y, lo, hi, style)) in enumerate(series.items()):
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = x > 0 if logx else np.isfinite(x)
    color = f"C{i % 10}" if style.get("color") is None else style["color"]
    ax.plot(x[keep], y[keep], linestyle=style.get("ls", "-"), color=color, marker="o", markersize=2, linewidth=1.2,
            label=name)
    if lo is not None:
      ax.fill_between(x[keep], np.asarray(lo, float)[keep], np.asarray(hi, float)[keep], color=color, alpha=0.15)
  for x, y, label in marks:
    ax.plot([x], [y], marker="*", markersize=10, color="k")
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
  if hline is not None:
    ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def section(res: Mapping) -> report_lib.Section:
  """The "drift_fair" section from `fair_audit.run`'s results dict."""
  s, full = res["setup"], res["full"]
  summary, headlines = _summary(s, full)
  return report_lib.Section(key="drift_fair", title="Embedding drift, tested fairly (paper's task difficulty, probe "
                            "and conventions)", summary=summary, tables=_task_tables(res) + _study_tables(res),
                            figures=_figures(s, full), notes=res.get("notes", ""), headlines=headlines)


def _task_tables(res: Mapping) -> list[report_lib.Table]:
  """Every task's clean AUC and its metrics at the two points; the isotropic sweeps under both conventions."""
  s, full = res["setup"], res["full"]
  sig = list(full["sigma"])
  tables = []
  tables.append(report_lib.Table("tasks", list(res["tasks"][0].keys()), [list(r.values()) for r in res["tasks"]],
                                 caption="Clean ROC-AUC of both probes per held-out task (mean and 95% interval over "
                                 "seeds); the headline task is the one closest to the paper's 0.85."))
  other = []
  for t, r in res.get("other_tasks", {}).items():
    for row in r["summary"]:
      other.append([t] + [row[k] for k in ("probe", "drift", "point", "sigma", "angle", "auc", "auc_low", "auc_high",
                                            "confidence_drop", "silent_share")])
  if other:
    tables.append(report_lib.Table("tasks_at_points", ["task", "probe", "drift", "point", "sigma", "angle_deg", "auc",
                                                       "auc_low", "auc_high", "confidence_drop", "silent_share"], other,
                                   caption="Every task: metrics at sigma = 0.02 and where the AUC first falls below "
                                   f"{s['collapse_auc']}, under both conventions (means over seeds)."))
  for conv in CONVENTIONS:
    cols, rows = ["sigma", "angle_measured_deg", "angle_closed_form_deg"], []
    for p in PROBES:
      cols += [f"{p}_{m}" for m in ("auc", "auc_low", "auc_high", "auc_binormal", "balanced_accuracy", "confidence",
                                    "silent_failure_rate")]
    for i, sg in enumerate(sig):
      row = [sg, full["angles"][conv]["measured"][i], full["angles"][conv]["closed_form"][i]]
      for p in PROBES:
        w = full["sweeps"][f"{p}/{conv}"]
        row += [w["auc"][0][i], w["auc"][1][i], w["auc"][2][i], w["predicted_auc"][0][i], w["balanced_accuracy"][0][i],
                w["confidence"][0][i], w["silent_failure_rate"][0][i]]
      rows.append(row)
    tables.append(report_lib.Table(f"sweep_{conv}", cols, rows, caption=(
      f"Isotropic drift, {CONV_NAME[conv]}: measured mean angle next to sigma, the closed form, both probes' AUC "
      "(mean and 95% interval over seeds), the binormal prediction, balanced accuracy, mean confidence and the "
      "share of errors with confidence > 0.8.")))
  return tables


def _study_tables(res: Mapping) -> list[report_lib.Table]:
  """The headline task's points, directional drift, alarm, re-anchoring, real drift and separability."""
  s, full = res["setup"], res["full"]
  sig = list(full["sigma"])
  sm = full["summary"]
  tables = [report_lib.Table("points", list(sm[0].keys()), [list(r.values()) for r in sm], caption=(
    "The paper's numbers at sigma = 0.02 and at collapse (AUC first below the collapse level), per probe and "
    "convention: mean and 95% interval over seeds. confidence_drop is relative (0.14 = the paper's -14%); "
    "silent_share is the share of errors made with confidence > 0.8."))]
  if full.get("directional"):
    rows = []
    for name, cur in full["directional"].items():
      p, d = name.split("/")
      for i, sg in enumerate(sig):
        ms = ("angle", "auc", "balanced_accuracy", "confidence", "silent_failure_rate")
        rows.append([p, d, sg] + [cur[m][0][i] for m in ms] + [cur["auc"][1][i], cur["auc"][2][i]])
    tables.append(report_lib.Table("directional", ["probe", "direction", "sigma", "angle_deg", "auc",
                                                   "balanced_accuracy", "confidence", "silent_failure_rate", "auc_low",
                                                   "auc_high"], rows, caption=(
      "Directional drift normalize(u + sigma v) along the probe's normal (toward the safe side), the class-mean "
      f"difference, the AUC-worst direction at each sigma, and {s['n_random']} random directions (mean; worst).")))
  if full.get("detect"):
    dt = full["detect"]
    tables.append(report_lib.Table("alarm", list(dt[0].keys()), [list(r.values()) for r in dt], caption=(
      "The label-free alarm per drift: the angle where it fires on 90% of windows, vs the collapse angle.")))
  if full.get("reanchor"):
    ra = full["reanchor"]
    tables.append(report_lib.Table("reanchor", list(ra[0].keys()), [list(r.values()) for r in ra], caption=(
      "Procrustes re-anchoring of the paper probe from n anchor prompts embedded before and after the drift.")))
  for name in ("real", "separability"):
    if res.get(name):
      rr = res[name]
      tables.append(report_lib.Table(name, list(rr[0].keys()), [list(r.values()) for r in rr], caption=(
        "Real drift: the probes on the headline task embedded by the other model." if name == "real" else
        f"Separability {s['model']} vs {s['separability_source']} per task, relative change with 95% paired bootstrap "
        "interval (the aligned anchor is a safety-SFT of the instruct model; no base model is available offline).")))
  return tables


def _figures(s: Mapping, full: Mapping) -> list[report_lib.Figure]:
  """AUC against the measured angle (both conventions and probes, the binormal prediction dashed), directional
  drift per direction, the alarm's fire rate."""
  sig = list(full["sigma"])
  series, marks, figures = {}, [], []
  for conv in CONVENTIONS:
    ang = full["angles"][conv]["measured"]
    for k, p in enumerate(PROBES):
      w = full["sweeps"][f"{p}/{conv}"]
      color = f"C{2 * CONVENTIONS.index(conv) + k}"
      series[f"{p} / {conv}"] = (ang, w["auc"][0], w["auc"][1], w["auc"][2], dict(color=color))
      series[f"{p} / {conv} (binormal)"] = (ang, w["predicted_auc"][0], None, None, dict(color=color, ls="--"))
      i = sig.index(0.02) if 0.02 in sig else None
      if i is not None and p == "paper":
        marks.append((ang[i], w["auc"][0][i], f"sigma=0.02 ({conv})"))
  figures.append(report_lib.Figure("auc_vs_angle", _plot(series, "measured mean angle (degrees)", "ROC-AUC",
                                                         f"Isotropic drift, {s['headline_task']}", marks, hline=0.5),
                                   "ROC-AUC against the measured mean angle under both sigma conventions (shaded: 95% "
                                   "interval over seeds; dashed: binormal prediction; stars: sigma = 0.02)."))
  if full.get("directional"):
    for metric in ("auc", "balanced_accuracy"):
      series = {}
      for name in ("probe_normal", "class_mean", "auc_worst", "random_mean", "random_worst"):
        cur = full["directional"].get(f"paper/{name}")
        if cur:
          series[name] = (cur["angle"][0], cur[metric][0], cur[metric][1], cur[metric][2], {})
      figures.append(report_lib.Figure(f"directional_{metric}", _plot(
        series, "measured mean angle (degrees)", metric, f"Directional drift, paper probe: {metric}", hline=0.5,
        logx=True), f"Paper probe, directional drift: {metric} against the measured angle per direction."))
  if full.get("alarm"):
    series = {}
    for dname, fr in full["alarm"].items():
      ang = (full["angles"][dname.split("/")[1]]["measured"] if dname.startswith("isotropic") else
             full["directional"]["paper/probe_normal"]["angle"][0])
      for st, v in fr.items():
        series[f"{dname} / {st}"] = (ang, v, None, None, {})
    figures.append(report_lib.Figure("alarm", _plot(series, "measured mean angle (degrees)", "fire rate",
                                                    "Label-free alarm", hline=s["alarm"]["alpha"], logx=True),
                                     "Share of windows on which the alarm fires, per drift and statistic."))
  return figures


def _summary(s: Mapping, full: Mapping) -> tuple[dict, list[report_lib.Headline]]:
  """The section's summary numbers and headlines (the paper probe's AUC at sigma = 0.02 per convention)."""
  sm = full["summary"]
  summary = {"headline_task": s["headline_task"], "clean_auc_paper": full["clean"]["paper"]["auc"][0],
             "clean_auc_hardened": full["clean"]["hardened"]["auc"][0]}
  for r in sm:
    if r["point"] == "sigma=0.02":
      summary[f"auc_at_0.02/{r['probe']}/{r['drift']}"] = r["auc"]
      summary[f"angle_at_0.02/{r['drift']}"] = r["angle"]
  headlines = []
  for conv in CONVENTIONS:
    a = _row(sm, "paper", f"isotropic/{conv}", "sigma=0.02")
    if a:
      headlines.append(report_lib.Headline(f"Paper probe AUC at sigma 0.02 ({conv})", a["auc"], a["auc_low"],
                                           a["auc_high"], guide=f"{s['headline_task']}, {_f(a['angle'])} deg; clean "
                                           f"{_f(full['clean']['paper']['auc'][0])}; 0.5 = collapse"))
  return summary, headlines
