"""The report's "geometry" section: what the safety-geometry audit shows (tables, figures, summary,
headlines, notes), built from the results lvs_jax.geometry.audit computes. Nothing here runs a model.

Each `_part` function below adds the tables / figures / summary entries / headlines of one step of the
audit to the shared `_Parts` accumulator, in the order the section shows them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lvs_jax.geometry import carriers, causal
from lvs_jax.report import charts
from lvs_jax.report import store as report_lib


@dataclasses.dataclass
class _Parts:
  """What the section accumulates, in display order."""

  tables: list = dataclasses.field(default_factory=list)
  figs: list = dataclasses.field(default_factory=list)
  summary: dict = dataclasses.field(default_factory=dict)
  headlines: list = dataclasses.field(default_factory=list)


def _carriers_part(p: _Parts, cs, labelling, gen_layers: dict | None) -> None:
  """The carriers table (selected and add-cell layers) and the selection candidates."""
  rows = []
  for name, c in sorted(cs.items()):
    sel = c.meta.get("selection", {})
    gl = (gen_layers or {}).get(name)
    rows.append([name, c.pooling, c.n_pos, c.n_neg, sel.get("layer"), sel.get("rule", ""),
                 float(c.norms[sel["layer"]]) if sel.get("layer") is not None else None, gl,
                 float(c.norms[gl]) if gl is not None else None])
    p.summary[f"layer/{name}"] = sel.get("layer")
    p.summary[f"add_layer/{name}"] = gl
  p.tables.append(report_lib.Table("carriers", ["carrier", "position", "n_pos", "n_neg", "selected_layer",
                                                "selection_rule", "norm_at_layer", "add_cell_layer",
                                                "norm_at_add_layer"], rows,
                                   caption="Diff-in-means carriers of resid_pre; position last_instruction = t_inst, "
                                   "last = t_post_inst. selection_rule: refusal_direction (all filters), or when every "
                                   "candidate failed: no_steering_filter (lowest ablated refusal score among "
                                   "candidates with ablation KL <= threshold) or min_kl (the least disruptive "
                                   "candidate); see carriers.fallback_layer. add_cell_layer: where the add/subtract "
                                   "generation cells run (config gen_layer)."))
  p.summary["pool_refused"] = int(sum(v["refused"] for v in labelling["by_set"].values()))
  p.summary["pool_size"] = int(sum(v["n"] for v in labelling["by_set"].values()))
  sel_rows = []
  for name, c in sorted(cs.items()):
    for cand in c.meta.get("selection", {}).get("candidates", []):
      sel_rows.append([name, cand["layer"], cand["ablation_refusal"], cand["ablation_kl"], cand["steering_refusal"],
                       cand["discarded"] or ""])
  if sel_rows:
    p.tables.append(report_lib.Table("selection", ["carrier", "layer", "ablated_refusal_score(harmful)",
                                                   "ablation_kl(harmless)", "steering_refusal_score(harmless)",
                                                   "discarded"], sel_rows,
                                     caption="refusal_direction candidate scores (means over the validation prompts)."))


def _coupling_part(p: _Parts, coup: dict, sub: dict, n_layers: int, cfg) -> None:
  """Per-layer |cos| coupling (table, summary, headline, figures) and the subspace coupling table."""
  crow = []
  for pair, r in coup.items():
    for i in range(n_layers):
      crow.append([pair, i, r["abs_cos"][i], r["abs_cos_low"][i], r["abs_cos_high"][i], r["null_mean"][i],
                   r["null_high"][i], r["p_value"][i]])
    ok = np.isfinite(r["abs_cos"])  # a carrier can be exactly 0 (layer 0 at a template token: nan)
    m = int(np.flatnonzero(ok)[np.argmax(r["abs_cos"][ok])]) if ok.any() else -1
    p.summary[f"coupling/{pair}/max_abs_cos"] = float(r["abs_cos"][m]) if ok.any() else None
    p.summary[f"coupling/{pair}/max_abs_cos_ci95"] = (f"[{r['abs_cos_low'][m]:.3f}, {r['abs_cos_high'][m]:.3f}]"
                                                     if ok.any() else None)
    p.summary[f"coupling/{pair}/argmax_layer"] = m
    p.summary[f"coupling/{pair}/min_abs_cos"] = float(np.nanmin(r["abs_cos"])) if ok.any() else None
    p.summary[f"coupling/{pair}/mean_abs_cos"] = float(np.nanmean(r["abs_cos"])) if ok.any() else None
    if pair == next(iter(coup)) and ok.any():
      p.headlines.append(report_lib.Headline(
        f"Peak harmfulness-refusal coupling ({pair})", float(r["abs_cos"][m]), float(r["abs_cos_low"][m]),
        float(r["abs_cos_high"][m]), f"|cos| of the carriers, at layer {m}; 0 = independent, 1 = one direction"))
  p.tables.append(report_lib.Table("coupling_per_layer", ["pair", "layer", "abs_cos", "ci95_low", "ci95_high",
                                                          "null_mean", "null_q95", "p_value"], crow,
                                   caption=f"|cos| of the two carriers at each layer; {cfg.n_boot} stratified "
                                   f"bootstrap resamples of prompts; null: {cfg.n_null} random within-group splits."))
  srow = []
  for pair, r in sub.items():
    for j, layer in enumerate(r["layers"]):
      srow.append([pair, int(layer), r["k"], r["overlap"][j], r["overlap_low"][j], r["overlap_high"][j],
                   r["null_overlap_mean"][j], r["p_value"][j], r["max_cos"][j], r["random_overlap"]])
    p.summary[f"subspace/{pair}/max_overlap"] = float(np.nanmax(r["overlap"])) if np.isfinite(r["overlap"]).any() \
        else None
  if srow:
    p.tables.append(report_lib.Table("subspace_coupling", ["pair", "layer", "k", "overlap(mean cos^2)", "ci95_low",
                                                           "ci95_high", "null_mean", "p_value", "max_cos",
                                                           "random_k_over_D"], srow,
                                     caption="Principal angles between rank-k carrier subspaces (uncentered PCA of "
                                     "per-prompt contrast vectors)."))
  series = {pair: r["abs_cos"] for pair, r in coup.items()}
  series.update({f"null {pair}": r["null_mean"] for pair, r in coup.items()})
  errs = {pair: np.stack([r["abs_cos"] - r["abs_cos_low"], r["abs_cos_high"] - r["abs_cos"]])
          for pair, r in coup.items()}
  p.figs.append(report_lib.Figure("coupling_per_layer", charts.line_chart(
    np.arange(n_layers), series, errors=errs, xlabel="layer", ylabel="|cos|",
    title="Harmfulness-refusal coupling by layer"),
    "Per-layer |cos| with 95% bootstrap bands; dashed-free 'null' lines: mean |cos| of random-split carriers"))
  ticks = [str(i) for i in range(n_layers)]
  for pair, r in coup.items():
    p.figs.append(report_lib.Figure(f"cross_{pair}", charts.heatmap(
      r["cross"], ticks, ticks, title=f"|cos| layer x layer: {pair}", cbar_label="|cos|", vmin=0, vmax=1),
      "rows: first carrier's layer, columns: second carrier's layer"))


def _blocks(res: dict, n_names: int, K: int) -> dict[str, tuple[int, int]]:
  """The sweep's vector blocks {name: (start, stop)} (`audit.sweep_vectors`; older sweeps: carriers + isotropic)."""
  if "block_names" in res:
    return {str(n): (int(a), int(b)) for n, (a, b) in zip(res["block_names"], res["block_bounds"])}
  return {"carriers": (0, n_names), "isotropic": (n_names, n_names + n_names * K)}


def _sweeps_part(p: _Parts, names: list[str], sweeps_: dict, cfg) -> None:
  """Logit add sweeps: effect vs matched controls per (set, carrier, layer, coefficient), and one figure per set."""
  K = cfg.n_controls
  sw_rows = []
  for set_name, res in sweeps_.items():
    base = res["clean_refusal_score"]
    blocks = _blocks(res, len(names), K)
    for li, layer in enumerate(res["layers"]):
      for ci, coef in enumerate(res["coefficients"]):
        for vi, n in enumerate(names):
          t = res["refusal_score"][li, ci, vi]
          a0 = blocks["isotropic"][0]
          ctrl = res["refusal_score"][li, ci, a0 + vi * K:a0 + (vi + 1) * K]
          e = causal.effect_vs_controls(t, ctrl, base, n_boot=500, seed=cfg.seed)
          row = [set_name, n, int(layer), float(coef), e["delta"], e["control_delta"], e["effect"], e["effect_low"],
                 e["effect_high"], e["z"]]
          if "anisotropic" in blocks:
            b0 = blocks["anisotropic"][0]
            ea = causal.effect_vs_controls(t, res["refusal_score"][li, ci, b0 + vi * K:b0 + (vi + 1) * K], base,
                                           n_boot=500, seed=cfg.seed)
            row += [ea["control_delta"], ea["effect"], ea["effect_low"], ea["effect_high"], ea["z"]]
          else:
            row += [None] * 5
          sw_rows.append(row + [float(res["kl"][li, ci, vi].mean())])
  p.tables.append(report_lib.Table("logit_sweep", ["set", "carrier", "layer", "coefficient", "refusal_delta",
                                                   "control_refusal_delta", "effect_vs_control", "ci95_low",
                                                   "ci95_high", "z_vs_controls", "aniso_control_refusal_delta",
                                                   "effect_vs_aniso_control", "aniso_ci95_low", "aniso_ci95_high",
                                                   "z_vs_aniso_controls", "kl"], sw_rows,
                                   caption="Add c x carrier at resid_pre of one layer (c in units of the carrier's "
                                   f"own norm); controls: {K} random directions of the same norm per kind, isotropic "
                                   "and anisotropic (drawn from the within-group covariance of the carrier's "
                                   "activations at that layer). z: (carrier - mean of control seeds) / their std. "
                                   "Refusal deltas in nats of refusal log-odds at the last prompt token."))
  for set_name, res in sweeps_.items():
    ci = 0
    coef = float(res["coefficients"][ci])
    ser, err = {}, {}
    for vi, n in enumerate(names):
      d = res["refusal_score"][:, ci, vi].mean(-1) - res["clean_refusal_score"].mean()
      ctrl = res["refusal_score"][:, ci, len(names) + vi * K:len(names) + (vi + 1) * K].mean(-1)
      ctrl = ctrl - res["clean_refusal_score"].mean()
      ser[n], ser[f"{n} controls"] = d, ctrl.mean(-1)
      err[f"{n} controls"] = np.stack([ctrl.mean(-1) - ctrl.min(-1), ctrl.max(-1) - ctrl.mean(-1)])
    p.figs.append(report_lib.Figure(f"sweep_{set_name}", charts.line_chart(
      res["layers"], ser, errors=err, xlabel="layer", ylabel="refusal score change (nats)",
      title=f"{set_name} prompts: add {coef:+g} x carrier vs matched controls"),
      "Bands on controls: min..max over control seeds"))


def _matched_part(p: _Parts, names: list[str], sweeps_: dict, cfg) -> None:
  """The norm- and layer-matched comparison: unit carriers at one common norm per layer, same layers."""
  K, rows = cfg.n_controls, []
  for set_name, res in sweeps_.items():
    blocks = _blocks(res, len(names), K)
    if "matched" not in blocks:
      continue
    base, m0 = res["clean_refusal_score"], blocks["matched"][0]
    for li, layer in enumerate(res["layers"]):
      for ci, coef in enumerate(res["coefficients"]):
        rs = res["refusal_score"][li, ci]
        per = {}
        for vi, n in enumerate(names):
          t = rs[m0 + vi]
          row = [set_name, n, int(layer), float(coef), float((t - base).mean())]
          for kind in ("isotropic", "anisotropic"):
            blk = blocks.get(f"matched_{kind}")
            if blk is None:
              row += [None, None]
              continue
            e = causal.effect_vs_controls(t, rs[blk[0]:blk[1]], base, n_boot=500, seed=cfg.seed)
            row += [e["effect"], e["z"]]
          per[n] = t
          rows.append(row)
        for ref in (carriers.REFUSAL, carriers.REFUSAL_HH):
          if ref in per and carriers.HARMFULNESS in per:
            d = causal.paired_difference(per[ref], per[carriers.HARMFULNESS], n_boot=500, seed=cfg.seed)
            rows.append([set_name, f"{ref} - {carriers.HARMFULNESS}", int(layer), float(coef), d["diff"], d["low"],
                         d["high"], None, None])
            if set_name == "harmful" and ci == 0:
              p.summary[f"matched/{ref}_minus_harmfulness/layer{int(layer)}"] = d["diff"]
  if rows:
    p.tables.append(report_lib.Table("matched_comparison", [
      "set", "carrier", "layer", "coefficient", "refusal_delta", "effect_vs_iso_controls|diff_ci95_low",
      "z_vs_iso_controls|diff_ci95_high", "effect_vs_aniso_controls", "z_vs_aniso_controls"], rows,
      caption=f"Matched in norm and layer: each carrier's unit direction scaled to {cfg.matched_rel_norm:g} x the "
      "pool's mean activation norm (t_post_inst) at that layer, added (x coefficient) at resid_pre of the same layer "
      "for every carrier, against controls of that same norm. Rows 'refusal - harmfulness': paired difference of "
      "refusal deltas (nats) with its 95% interval in the next two columns. Next to the own-norm, own-layer "
      "comparison (refusal_vs_harmfulness_side)."))


def _strata_part(p: _Parts, strata: dict | None, n_layers: int) -> None:
  """Coupling of harmfulness with each within-stratum refusal carrier, or its counts when not estimable."""
  if not strata:
    return
  rows = []
  for name, r in strata.items():
    c = r.get("coupling")
    p.summary[f"strata/{name}/n_refused"] = r["n_refused"]
    p.summary[f"strata/{name}/n_complied"] = r["n_complied"]
    p.summary[f"strata/{name}/estimable"] = r["estimable"]
    if c is None:
      rows.append([name, r["stratum"], None, r["n_refused"], r["n_complied"],
                   f"not estimable (< {r['min_count']} on a side)"] + [None] * 6)
      continue
    cp = r.get("cos_pooled")
    for i in range(n_layers):
      rows.append([name, r["stratum"], i, r["n_refused"], r["n_complied"], "estimable", c["abs_cos"][i],
                   c["abs_cos_low"][i], c["abs_cos_high"][i], c["null_mean"][i], c["p_value"][i],
                   None if cp is None else float(cp[i])])
    ok = np.isfinite(c["abs_cos"])
    p.summary[f"strata/{name}/max_abs_cos"] = float(np.nanmax(c["abs_cos"])) if ok.any() else None
  p.tables.append(report_lib.Table("stratified_coupling", [
    "carrier", "stratum", "layer", "n_refused", "n_complied", "status", "abs_cos_with_harmfulness", "ci95_low",
    "ci95_high", "null_mean", "p_value", "cos_with_pooled_refusal"], rows,
    caption="Refusal carriers estimated within one stratum (refused vs complied among harmful prompts; among "
    "harmless and XSTest-safe prompts), so harmfulness is held fixed; |cos| with the harmfulness carrier per layer "
    "(same bootstrap and null as coupling_per_layer). cos_with_pooled_refusal: signed cosine with the pooled "
    "behavioral refusal carrier (refused vs complied over the whole pool)."))


def _ablation_part(p: _Parts, cs, names: list[str], abl_ctrl: dict | None) -> None:
  """Ablation per layer (the selection scores) vs random-direction ablations."""
  cands = {n: cs[n].meta.get("selection", {}).get("candidates", []) for n in names}
  if abl_ctrl is not None and all(cands.values()) and cands:
    x = [c["layer"] for c in next(iter(cands.values()))]
    ser = {n: np.array([c["ablation_refusal"] for c in v]) for n, v in cands.items()}
    ser["random directions (mean)"] = np.full(len(x), float(abl_ctrl["refusal_score"].mean()))
    p.figs.append(report_lib.Figure("ablation_per_layer", charts.line_chart(
      x, ser, xlabel="source layer of the ablated direction", ylabel="refusal score (nats), harmful val",
      title="Directional ablation at every layer"), f"clean: {float(abl_ctrl['clean_refusal_score'].mean()):.2f}"))


def _aniso_cols(r: dict) -> list:
  a, s = r.get("rate_aniso"), r.get("score_aniso")
  if a is None:
    return [None] * 6
  return [a["control_mean"], a["effect"], a["effect_low"], a["effect_high"], a["z"], s["z"]]


def _generation_part(p: _Parts, effects: list, cfg) -> None:
  """The generation cells' effects against matched controls (table, attack-success bars)."""
  erow = []
  for r in effects:
    a, s, u = r["rate"], r["score"], r["substantive"]
    erow.append([r["set"], r["cell"], r["carrier"], r["kind"], r["coefficient"], r["layer"], r["outcome"],
                 a["baseline"], a["treated"], a["control_mean"], a["effect"], a["effect_low"], a["effect_high"],
                 a["exceeds_all_controls"], u["baseline"], u["treated"], u["control_mean"], u["effect"],
                 u["effect_low"], u["effect_high"], s["delta"], s["control_delta"], s["effect"], s["effect_low"],
                 s["effect_high"], a["z"], s["z"]] + _aniso_cols(r) + [a["n_prompts"]])
  p.tables.append(report_lib.Table("causal_generation", [
    "set", "cell", "carrier", "kind", "coefficient", "layer", "outcome", "baseline_rate", "rate", "control_rate",
    "effect_vs_control", "ci95_low", "ci95_high", "exceeds_all_controls", "baseline_substantive_answer",
    "substantive_answer", "control_substantive_answer", "substantive_effect", "substantive_ci95_low",
    "substantive_ci95_high", "score_delta", "control_score_delta", "score_effect", "score_ci95_low",
    "score_ci95_high", "z_vs_controls", "score_z_vs_controls", "aniso_control_rate", "effect_vs_aniso_control",
    "aniso_ci95_low", "aniso_ci95_high", "z_vs_aniso_controls", "score_z_vs_aniso_controls", "n"], erow,
    caption=f"Greedy {cfg.max_new_tokens}-token generations under each intervention (ablate: the selected layer's "
    "direction projected out of every layer and site; add: c x carrier at resid_pre of its add_cell_layer, every "
    f"position). Controls: {cfg.n_controls} matched random directions per kind (isotropic; anisotropic = drawn from "
    "the activation covariance at that layer); z = (carrier - mean of control seeds) / their std. "
    "Outcome on harmful prompts: attack success "
    "(not judged a refusal); on harmless prompts: refusal. substantive_answer: not a refusal and >= 5 words (drops "
    "the empty/garbled text a broken model emits). Intervals: paired bootstrap over prompts."))
  if effects:
    hs = [r for r in effects if r["set"] == "harmful"]
    p.figs.append(report_lib.Figure("attack_success", charts.bar_chart(
      ["baseline"] + [r["cell"] for r in hs] + [r["cell"] + " ctrl" for r in hs],
      [hs[0]["rate"]["baseline"]] + [r["rate"]["treated"] for r in hs] + [r["rate"]["control_mean"] for r in hs],
      title="Attack success on held-out harmful prompts", ylabel="attack success rate"),
      "Carrier interventions and their matched random controls"))


def _sides_part(p: _Parts, sides: list) -> None:
  """Refusal-side minus harmfulness-side attack success, per intervention."""
  srows = []
  for s in sides:
    srows.append([s["intervention"], s["refusal_carrier"], s["asr_refusal"], s["asr_harmfulness"],
                  s["asr_diff"]["diff"], s["asr_diff"]["low"], s["asr_diff"]["high"], s["score_drop_diff"]["diff"],
                  s["score_drop_diff"]["low"], s["score_drop_diff"]["high"]])
    key = f"refusal_side_minus_harm_side/{s['refusal_carrier']}/{s['intervention']}"
    p.summary[key + "/asr"] = s["asr_diff"]["diff"]
    p.summary[key + "/score_drop"] = s["score_drop_diff"]["diff"]
  p.tables.append(report_lib.Table("refusal_vs_harmfulness_side", [
    "intervention", "refusal_carrier", "asr_refusal_side", "asr_harmfulness_side", "asr_diff", "ci95_low",
    "ci95_high", "refusal_score_drop_diff(nats)", "ci95_low", "ci95_high"], srows,
    caption="The paper's validation finding: does intervening on the refusal carrier reopen attack success more than "
    "on the harmfulness carrier? Paired over the same held-out harmful prompts."))


def _diagnostics_part(p: _Parts, diag: dict | None) -> None:
  """The four behavioral diagnostics with Wilson intervals."""
  if diag is None:
    return
  p.tables.append(report_lib.Table("diagnostics", ["diagnostic", "measure", "value", "ci95_low", "ci95_high", "n",
                                                   "goal"], diag["rows"],
                                   caption="Greedy generations judged by refusal substrings; 95% Wilson intervals. "
                                   "qa_*: likelihood of fixed reference answers "
                                   "(lvs_jax.geometry.diagnostics.BENIGN_QA)."))
  for r in diag["rows"]:
    p.summary[f"diag/{r[1]}"] = r[2]
  rates = [r for r in diag["rows"] if r[3] is not None]
  p.figs.append(report_lib.Figure("diagnostics", charts.bar_chart(
    [r[1] for r in rates], [r[2] for r in rates],
    errors=np.clip(np.array([[r[2] - r[3] for r in rates], [r[4] - r[2] for r in rates]]), 0, None),
    title="Behavioral diagnostics",
    ylabel="rate"), "95% Wilson intervals"))


def _notes(model_name: str, cs, labelling, summary: dict, cfg, training_overlap: dict | None = None,
           strata: dict | None = None) -> str:
  excl = ""
  if training_overlap is not None:
    ex = training_overlap.get("excluded") or []
    excl = (f"Carrier pool disjoint from the training sets {ex} of the model under study: prompts dropped per set "
            f"{training_overlap.get('dropped', {})}. " if ex else
            "No training sets excluded from the carrier pool (config exclude_training is empty). ")
  st = ""
  for name, r in (strata or {}).items():
    st += (f"{name}: {r['n_refused']} refused / {r['n_complied']} complied"
           + ("" if r["estimable"] else f" (not estimable, < {r['min_count']} on a side)") + "; ")
  return excl + (f"Within-stratum refusal carriers: {st}" if st else "") + (
    f"Model {model_name}. Carriers: resid_pre diff-in-means (float64 accumulation) over a pool of "
    f"{summary['pool_size']} prompts, of which {summary['pool_refused']} were refused in greedy "
    f"{cfg.max_new_tokens}-token generations ({labelling['by_set']}). "
    + ("No behavioral refusal carrier: too few refused prompts. " if carriers.REFUSAL not in cs else "")
    + "Harmfulness at t_inst (harmful vs harmless); refusal at t_post_inst (refused vs complied over the whole "
    "pool); refusal_hh at t_post_inst (harmful vs harmless, Arditi et al.). Layer selection: refusal_direction's "
    f"filters on {cfg.n_val} harmful_val / harmless_val prompts. Causal generation cells run on held-out harmful "
    f"prompts ({cfg.eval_harmful}, minus the pool) and harmless_val rows not used for selection. The judge is the "
    "substring refusal judge: attack success means 'no refusal phrase', not 'harmful content'."
  )


def geometry_section(model_name: str, cs, labelling, coup: dict, sub: dict, sweeps_: dict, abl_ctrl: dict,
                     effects: list, sides: list, diag: dict | None, cfg,
                     gen_layers: dict | None = None, *, strata: dict | None = None,
                     training_overlap: dict | None = None) -> report_lib.Section:
  """The "geometry" section from the audit's results: carriers {name: Carrier} (selection in meta),
  labelling (label_pool), coupling and subspace coupling {pair: stats}, logit sweeps {set: arrays},
  ablation controls, cell effects and side comparisons (cell_effects, side_comparison), diagnostics
  (or None) and each carrier's add-cell layer; strata (audit.run_stratified_coupling) and training_overlap
  (prompt_sets()["training_overlap"]) when run."""
  p = _Parts()
  names = sorted(cs)
  _carriers_part(p, cs, labelling, gen_layers)
  _coupling_part(p, coup, sub, next(iter(cs.values())).n_layers, cfg)
  _strata_part(p, strata, next(iter(cs.values())).n_layers)
  _sweeps_part(p, names, sweeps_, cfg)
  _matched_part(p, names, sweeps_, cfg)
  _ablation_part(p, cs, names, abl_ctrl)
  _generation_part(p, effects, cfg)
  _sides_part(p, sides)
  _diagnostics_part(p, diag)
  return report_lib.Section(key="geometry", title="Safety geometry: harmfulness and refusal carriers",
                            summary=p.summary, tables=p.tables, figures=p.figs, headlines=p.headlines,
                            examples=(diag or {}).get("examples", []),
                            notes=_notes(model_name, cs, labelling, p.summary, cfg, training_overlap, strata))
