"""The report's "drift" section: what the embedding-drift study shows (tables, figures, the closing
note in words, summary and headlines), from the results dict `lvs_jax.drift.audit.run` builds with
`lvs_jax.drift.study`. Nothing here fits a probe or draws a drift."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from lvs_jax.drift import study
from lvs_jax.report import charts
from lvs_jax.report import store as report_lib


def _fmt(v, digits=3):
  return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"


def notes(res: Mapping) -> str:
  """The closing note: the study's numbers in words, including whether the paper's collapse reproduces."""
  s, clean, main = res["setup"], res["clean"], res["setup"]["probe"]
  lines = [
    f"Model {s['model']}; probe input: layer {s['layer']} {s['site']}, {s['pooling']} pooling, chat template "
    f"{'on' if s['chat'] else 'off'} (best validation ROC-AUC {s['val_auc']:.3f} over "
    f"{len(res['layer_selection']['poolings'])} poolings x {len(res['layer_selection']['layers'])} layers, on a "
    f"validation split of the training prompts). Fit {s['n_fit']}, validation {s['n_val']}, test "
    f"{s['n_test_harmful']} harmful vs {s['n_test_harmless']} harmless.",
    "Clean test ROC-AUC: " + ", ".join(f"{p} {m['auc']:.3f}" for p, m in clean.items()) + ".",
    "sigma is the norm convention (noise of norm sigma on the unit sphere; sigma = 0.02 turns a vector by "
    "~1.15 degrees; the per-coordinate convention's sigma is this one divided by sqrt(D)). Angles are measured.",
  ]
  for r in res["cliffs"]:
    if r["probe"] != main:
      continue
    det = ", ".join(f"{k[len('detect_sigma_'):]} {_fmt(v)}" for k, v in r.items() if k.startswith("detect_sigma_"))
    if math.isfinite(r["cliff_sigma"] if r["cliff_sigma"] is not None else float("nan")):
      auc_part = (f"AUC cliff (AUC < {r['threshold']:.3f}) at sigma {_fmt(r['cliff_sigma'])} = "
                  f"{_fmt(r['cliff_angle_deg'])} degrees, where accuracy is {_fmt(r['accuracy_at_cliff'])}, mean "
                  f"confidence {_fmt(r['confidence_at_cliff'])} (relative drop {100 * r['confidence_drop']:.1f}%) and "
                  f"the silent-failure rate {_fmt(r['silent_failure_rate_at_cliff'])}")
    else:
      auc_part = f"no AUC cliff up to sigma {_fmt(max(res['families'][r['family']]['sigma']))}"
    lines.append(
      f"{r['family']}: {auc_part}; balanced-accuracy cliff (halfway to 0.5) at sigma {_fmt(r['bacc_cliff_sigma'])} = "
      f"{_fmt(r['bacc_cliff_angle_deg'])} degrees (confidence {_fmt(r['confidence_at_bacc_cliff'])}, silent-failure "
      f"rate {_fmt(r['silent_failure_rate_at_bacc_cliff'])}). Alarm reaches 90% detection at sigma: {det}.")
  fam = res["families"].get("isotropic")
  if fam:
    auc02 = study.interp_log(fam["sigma"], fam["probes"][main]["auc"], 0.02)
    sf02 = study.interp_log(fam["sigma"], fam["probes"][main]["silent_failure_rate"], 0.02)
    ang02 = study.interp_log(fam["sigma"], fam["angle"], 0.02)
    collapsed = auc02 <= 0.55
    lines.append(
      f"Paper check (isotropic, sigma = 0.02 ~ {ang02:.2f} degrees): ROC-AUC {clean[main]['auc']:.3f} -> {auc02:.3f}, "
      f"silent-failure rate {sf02:.2f}. The paper's collapse (0.85 -> 0.50 at sigma = 0.02) "
      + ("reproduces at this sigma." if collapsed else "does NOT reproduce at this sigma; see the cliff above for "
         "where (and whether) it happens on this model."))
  mg = res.get("margin") or {}
  if mg and mg.get("gap_deg") is not None and math.isfinite(mg.get("gap_deg", float("nan"))):
    d_noise = math.degrees(0.02 / math.sqrt(mg.get("dim", 576))) if "dim" in mg else None
    lines.append(
      f"Why: along the {main} probe's direction the class means are {mg['gap_deg']:.3g} degrees apart with a "
      f"within-class spread of {mg['spread_deg']:.3g} degrees; isotropic noise of norm sigma adds only sigma / sqrt(D) "
      f"along any one direction" + (f" ({d_noise:.3g} degrees at sigma = 0.02)" if d_noise else "")
      + f". A binormal model of the scores predicts the isotropic cliff at sigma {_fmt(mg['predicted_cliff_sigma'])}. "
      "A collapse at sigma = 0.02 needs classes separated by a few hundredths of a degree along the probe "
      "direction, i.e. a probe that relies on directions in which the embeddings barely vary.")
  far = res["alarm"]["false_alarm_rate"]
  lines.append(f"Alarm false-alarm rate on undrifted windows of {s['window']} (nominal alpha {s['alpha']}): "
               + ", ".join(f"{k} {v:.3f}" for k, v in far.items()) + ".")
  best = {}
  for r in res["reanchor"]:
    best[(r["source"], r["magnitude"])] = r
  if best:
    lines.append("Re-anchoring (Procrustes from the most anchors; AUC and balanced accuracy drifted -> re-anchored): "
                 + "; ".join(f"{src} @ {_fmt(mag)} ({_fmt(r['angle_deg'])} deg): AUC {_fmt(r['auc_drifted'])} -> "
                             f"{_fmt(r['auc_reanchored'])}, bacc {_fmt(r['bacc_drifted'])} -> "
                             f"{_fmt(r['bacc_reanchored'])} with {r['n_anchors']} anchors"
                             for (src, mag), r in best.items()) + ".")
  for r in res.get("real", []):
    alarms = ", ".join(f"{k[len('alarm_'):]} {v:.2f}" for k, v in r.items() if k.startswith("alarm_"))
    lines.append(f"Real drift {r['source']}: mean angle {r['angle_deg']:.2f} degrees (equivalent sigma "
                 f"{r['equivalent_sigma']:.3g}); {main} AUC {r[main + '_auc']:.3f}, balanced accuracy "
                 f"{r[main + '_balanced_accuracy']:.3f}, confidence {r[main + '_confidence']:.3f}, silent-failure rate "
                 f"{_fmt(r[main + '_silent_failure_rate'])}; alarm fire rate {alarms}.")
  if f"{main}_aug" in clean:
    lines.append(f"Noise augmentation baseline: {main} trained with isotropic noise at sigma {s['augment_sigma']:.3g}; "
                 f"clean AUC {clean[main + '_aug']['auc']:.3f} (vs {clean[main]['auc']:.3f}); cliffs in the table.")
  return "\n".join(lines)


def _selection_part(res: Mapping, tables: list, figures: list) -> None:
  """Validation ROC-AUC per (pooling, layer): the table and its heat map."""
  sel = res["layer_selection"]
  tables.append(report_lib.Table("layer_selection", ["pooling"] + [f"L{i}" for i in sel["layers"]],
                                 [[p] + list(r) for p, r in zip(sel["poolings"], sel["val_auc"])],
                                 caption="Validation ROC-AUC of a logistic probe per layer and pooling "
                                 "(validation split carved from the training prompts)."))
  figures.append(report_lib.Figure("layer_selection", charts.heatmap(
    np.asarray(sel["val_auc"], float), [str(i) for i in sel["layers"]], sel["poolings"],
    title="Validation ROC-AUC by layer and pooling", cbar_label="ROC-AUC", annotate=False),
    "Probe validation ROC-AUC per (pooling, layer); the best cell is used below."))


def _sweep_tables(res: Mapping, tables: list) -> None:
  """One table per family: probe metrics and alarm fire rate per sigma."""
  shown = ("auc", "auc_std", "balanced_accuracy", "confidence", "silent_failure_rate", "accuracy", "ece")
  for name, f in res["families"].items():
    cols = ["sigma", "angle_deg"] + [f"{p}_{m}" for p in f["probes"] for m in shown]
    cols += [f"alarm_{st}" for st in f["alarm"]]
    rows = []
    for i, sg in enumerate(f["sigma"]):
      row = [sg, f["angle"][i]]
      for p in f["probes"]:
        row += [f["probes"][p][m][i] for m in shown]
      row += [f["alarm"][st][i] for st in f["alarm"]]
      rows.append(row)
    tables.append(report_lib.Table(f"sweep_{name}", cols, rows, caption=f"{name} drift: probe metrics (means "
                                   f"over {res['setup']['repeats']} draws) and alarm fire rate per sigma (norm "
                                   "convention)."))


def _curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str,
            logx: bool = True, hline: float | None = None, xmin: float | None = None):
  """One line per series {"<group> / <variant>": (x, y)}, each with its own x: one color per group,
  one line style per variant."""
  return charts.line_chart(None, series, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx, hline=hline,
                           xmin=xmin, group_styles=True)


def _auc_figures(res: Mapping, figures: list) -> None:
  """ROC-AUC against sigma and against the measured angle (real drift on the angle axis too)."""
  s, fam = res["setup"], res["families"]
  for xkey, xlabel, fname in (("sigma", "sigma (norm convention)", "auc_vs_sigma"),
                              ("angle", "mean angular drift (degrees)", "auc_vs_angle")):
    series = {}
    for name, f in fam.items():
      for p in f["probes"]:
        if p == s["probe"] or name == "isotropic":  # every probe on the paper's family; the main one elsewhere
          series[f"{name} / {p}"] = (f[xkey], f["probes"][p]["auc"])
    real = sorted(res.get("real", []) if xkey == "angle" else [], key=lambda r: r["angle_deg"])
    if real:  # real drift on the same angle axis
      series[f"real drift / {s['probe']}"] = ([r["angle_deg"] for r in real], [r[f"{s['probe']}_auc"] for r in real])
    figures.append(report_lib.Figure(fname, _curves(series, xlabel, "ROC-AUC", "Probe ROC-AUC under drift", hline=0.5,
                                                    xmin=1e-3 if xkey == "sigma" else 0.05),
                                     f"ROC-AUC against {xlabel}: every probe under isotropic drift, the main probe "
                                     "under the other families and under real drift (changed weights)."))


def _failure_figures(res: Mapping, figures: list) -> None:
  """Accuracy vs confidence, silent failures and the alarm's fire rate against the angle."""
  s, main = res["setup"], res["setup"]["probe"]
  series_c, series_s, series_a = {}, {}, {}
  for name, f in res["families"].items():
    series_c[f"{name} / balanced accuracy"] = (f["angle"], f["probes"][main]["balanced_accuracy"])
    series_c[f"{name} / mean confidence"] = (f["angle"], f["probes"][main]["confidence"])
    series_s[name] = (f["angle"], f["probes"][main]["silent_failure_rate"])
    for st, pw in f["alarm"].items():
      series_a[f"{name} / {st}"] = (f["angle"], pw)
  deg = "mean angular drift (degrees)"
  figures.append(report_lib.Figure("confidence", _curves(series_c, deg, "", f"Accuracy vs confidence ({main} probe)",
                                                         xmin=0.05, hline=0.5),
                                   "Balanced accuracy (solid) falls while the mean confidence max(p, 1-p) (dashed) "
                                   "barely moves: the failure is silent."))
  figures.append(report_lib.Figure("silent_failures", _curves(
    series_s, deg, f"share of errors with confidence > {s['silent_threshold']}", f"Silent failures ({main} probe)",
    xmin=0.05), "Share of misclassifications made with high confidence."))
  figures.append(report_lib.Figure("alarm_power", _curves(series_a, deg, "fire rate", "Label-free drift alarm",
                                                          hline=s["alpha"], xmin=0.05),
                                   f"Share of incoming windows of {s['window']} on which the alarm fires "
                                   f"(alpha = {s['alpha']}); at zero drift this is the false-alarm rate."))


def _reanchor_part(res: Mapping, tables: list, figures: list) -> None:
  """The re-anchoring table, and balanced accuracy vs anchors for every drift that cost accuracy."""
  ra = res["reanchor"]
  if not ra:
    return
  tables.append(report_lib.Table("reanchor", list(ra[0].keys()), [list(r.values()) for r in ra],
                                 caption="Orthogonal Procrustes re-anchoring from n anchor prompts embedded by "
                                 "both versions: ROC-AUC and the share of lost AUC recovered."))
  series = {}
  for r in ra:
    if r["bacc_clean"] - r["bacc_drifted"] < 0.02 and r["auc_clean"] - r["auc_drifted"] < 0.02:
      continue  # this drift cost nothing: nothing to recover
    name = f"{r['source']} @ {_fmt(r['magnitude'])} ({_fmt(r['angle_deg'], 2)} deg)"
    series.setdefault(name, ([0], [r["bacc_drifted"]]))  # 0 anchors: the drifted probe
    series[name][0].append(r["n_anchors"])
    series[name][1].append(r["bacc_reanchored"])
  if series:
    figures.append(report_lib.Figure("reanchor", _curves(
      series, "anchors (0: not re-anchored)", "balanced accuracy", "Re-anchoring (Procrustes)", logx=False,
      hline=res["clean"][res["setup"]["probe"]]["balanced_accuracy"]), "Balanced accuracy of the main probe after "
      "Procrustes re-anchoring vs the number of anchor prompts, for every drift that cost accuracy (line: clean)."))


def _summary_and_headlines(res: Mapping) -> tuple[dict, list]:
  s, cl, main = res["setup"], res["cliffs"], res["setup"]["probe"]
  summary = {"layer": s["layer"], "pooling": s["pooling"], "clean_auc": res["clean"][main]["auc"]}
  for r in cl:
    if r["probe"] == main:
      summary[f"cliff_sigma/{r['family']}"] = r["cliff_sigma"]
      summary[f"cliff_angle_deg/{r['family']}"] = r["cliff_angle_deg"]
      summary[f"silent_rate_at_cliff/{r['family']}"] = r["silent_failure_rate_at_cliff"]
      summary[f"bacc_cliff_sigma/{r['family']}"] = r["bacc_cliff_sigma"]
  for st, v in res["alarm"]["false_alarm_rate"].items():
    summary[f"false_alarm_rate/{st}"] = v
  headlines = [report_lib.Headline("Drift probe clean ROC-AUC", res["clean"][main]["auc"], guide=(
    f"frozen-embedding probe, layer {s['layer']} ({s['pooling']})"))]
  iso = next((r for r in cl if r["probe"] == main and r["family"] == "isotropic"), None)
  if iso is not None:
    angle = iso["cliff_angle_deg"]
    headlines.append(report_lib.Headline(
      "Drift cliff (isotropic)", iso["cliff_sigma"], guide=(
        f"sigma where AUC falls half-way to 0.5 ({_fmt(angle, 3)} deg); larger is more robust")))
  return summary, headlines


def drift_section(res: Mapping) -> report_lib.Section:
  """The "drift" section of the report from the results dict `lvs_jax.drift.audit.run` builds."""
  tables, figures = [], []
  _selection_part(res, tables, figures)
  _sweep_tables(res, tables)
  _auc_figures(res, figures)
  _failure_figures(res, figures)
  cl = res["cliffs"]
  tables.append(report_lib.Table("cliffs", list(cl[0].keys()), [list(r.values()) for r in cl],
                                 caption="Per family and probe: the cliff sigma (AUC first below the threshold), "
                                 "its angle, metrics at the cliff, and the alarm's detection sigma."))
  _reanchor_part(res, tables, figures)
  if res.get("real"):
    rr = res["real"]
    tables.append(report_lib.Table("real_drift", list(rr[0].keys()), [list(r.values()) for r in rr],
                                   caption="Real drift: the probe trained on the model's embeddings evaluated on "
                                   "the same prompts embedded by a changed model."))
  if res.get("separability"):
    sp = res["separability"]
    tables.append(report_lib.Table("separability", list(sp[0].keys()), [list(r.values()) for r in sp],
                                   caption=res.get("separability_caption", "")))
  summary, headlines = _summary_and_headlines(res)
  return report_lib.Section(key="drift", title="Embedding drift: frozen-embedding safety probes",
                            summary=summary, tables=tables, figures=figures, notes=res.get("notes", ""),
                            headlines=headlines)
