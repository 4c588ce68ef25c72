"""Checkpoint-trajectory analysis on a tiny model's SFT-baseline run: every checkpoint evaluated once per
distinct weights (behavior, GCG, geometry, KL-admissible carriers, LVS, drift), resumable without recomputing,
the main writes the section."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from test_r2d2 import _main
from test_training_experiments import jax_cache, tiny_chat_model  # noqa: F401 (fixtures)

from lvs_jax.attacks import test_cases
from lvs_jax.core import cli
from lvs_jax.io import checkpoints, registry
from lvs_jax.trajectory import audit, latent, measures
from lvs_jax.trajectory import section as traj_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(runs, steps=()):
  c = cli.config_module(os.path.join(ROOT, "experiments", "configs", "trajectory.py")).get_config("smoke")
  c.runs, c.steps = tuple(runs), tuple(steps)
  return c


def _with_sources(cfg, sources):
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.transfer.sources = sources
  return c


@pytest.mark.slow
def test_trajectory_evaluates_each_distinct_checkpoint_once_resumes_and_writes_the_section(
    tmp_path, tiny_chat_model, jax_cache, monkeypatch):  # noqa: F811
  run = tmp_path / "sft"
  r = _main("r2d2.py:smoke_sft", run, tiny_chat_model, jax_cache)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert checkpoints.committed_steps(run / "checkpoints") == [0, 2, 4]
  with pytest.raises(FileNotFoundError, match="nowhere"):
    audit.parse_runs([str(tmp_path / "nowhere")])
  with pytest.raises(ValueError, match=r"steps \[3\] are not committed"):
    audit.run_steps(str(run), [0, 3])

  # The same run under two labels: 6 rows, 3 distinct weights, each evaluated once.
  wd = tmp_path / "traj"
  cfg = _config([f"a={run}", f"b={run}"])
  rows, cells = audit.run(cfg, str(wd))
  assert [(x["run"], x["step"]) for x in rows] == [(a, s) for a in "ab" for s in (0, 2, 4)]
  models = sorted(os.listdir(wd / "trajectory" / "models"))
  assert len(models) == 3 == len({x["digest"] for x in rows})
  for x in rows:
    assert x["refusal/harmful"]["n"] == 3 and x["refusal/harmless"]["n"] == 2 and x["asr/gcg@1"]["n"] == 2
    assert 0.0 <= x["refusal/harmful"]["low"] <= x["refusal/harmful"]["rate"] <= x["refusal/harmful"]["high"] <= 1.0
    assert x["seconds_per_step"] > 0
  assert rows[0]["digest"] != rows[2]["digest"]  # training moved the weights
  for x in rows:  # geometry over the behavioral pool (3 harmful + 2 harmless), drift relative to step 0
    pool = x["geometry/pool"]
    assert pool["n"] + pool["excluded"] == 5 and pool["n_refused"] + pool["n_complied"] == pool["n"]
    assert pool["estimable"] == (min(pool["n_harmful"], pool["n_harmless"], pool["n_refused"], pool["n_complied"]) > 0)
    assert (x["coupling/peak"]["value"] is not None) == pool["estimable"]  # None when no refusal carrier
    assert x["drift/angle"]["n"] == 16 and (x["drift/angle"]["value"] == 0.0) == (x["step"] == 0)
    adm = x["kl_admissible/harmfulness"]  # per-layer ablation KL of the pool's carriers, when they exist
    assert (adm["value"] is not None) == pool["estimable"]
    assert adm["value"] is None or (adm["n"] == 2 and adm["k"] == len(adm["layers"]) and adm["value"] == adm["k"] / 2)
    assert set(x["lvs/model"]) >= {"value", "low", "high", "n", "n_refused", "n_prompts", "measured"}
    assert x["lvs/model"]["n"] == x["lvs/model"]["n_refused"] and x["lvs/model"]["n_prompts"] == 3  # refused only
    assert [k for k in x if k.startswith("lvs/layer@")] == ["lvs/layer@0", "lvs/layer@1"]
  assert rows[0]["drift/probe_auc"] == rows[3]["drift/probe_auc"]  # both runs' step 0: one probe, one AUC
  assert not rows[0]["drift/alarm"]["fired"]
  # The trajectory's LVS of a@2 equals the LVS audit's own (lvs_jax.lvs.audit.run, a fresh workdir: recomputed).
  from lvs_jax.lvs import audit as lvs_audit

  prompts, targets, _ = latent.lvs_prompts(cfg.lvs, set())
  lvs_audit.run(registry.load_model(f"{run}@2"), prompts, targets, cfg.lvs, str(tmp_path / "direct"))
  direct = json.loads((tmp_path / "direct" / "lvs" / "summary.json").read_text())
  assert direct["measured"] and direct["n_attacked"] == rows[1]["lvs/model"]["n_refused"] == 3
  assert direct["lvs"][0] != direct["lvs"][1]  # a layer breaks more easily than the other: not all 0 or all 1
  for i, layer in enumerate(cfg.lvs.layers):
    got = rows[1][f"lvs/layer@{layer}"]
    assert (got["value"], got["low"], got["high"]) == (direct["lvs"][i], direct["lvs_low"][i], direct["lvs_high"][i])
  m, gap = rows[1]["lvs/model"], rows[1]["lvs/audit_gap"]
  assert (m["value"], m["low"], m["high"]) == (direct["model_lvs"], direct["model_lvs_low"], direct["model_lvs_high"])
  assert (gap["value"], gap["low"], gap["high"]) == (direct["audit_gap"], direct["audit_gap_low"],
                                                    direct["audit_gap_high"])
  extra = measures.run_level(rows, [], cfg, str(wd))
  assert {(c["run"], c["x"]) for c in extra["correlations"] if c["y"] == "fresh GCG ASR"} == {
    (a, m) for a in "ab" for m in ("coupling/peak", "coupling/mean", "drift/angle", "lvs/model")}
  assert all(c["n"] <= 3 for c in extra["correlations"])
  # Re-run: everything is reused (same rows, no new model directories, no stale artefacts moved aside); the LVS
  # attack, the ablation-KL sweep and the carriers' activations are not computed again.
  from lvs_jax.geometry import carriers, causal
  from lvs_jax.lvs import attack as lvs_attack

  def boom(*a, **k):
    raise AssertionError("recomputed on resume")

  for mod, name in ((lvs_attack, "pgd_attack"), (lvs_attack, "generate_under_delta"),
                    (causal, "ablation_sweep_prompts"), (carriers, "collect_inst_post")):
    monkeypatch.setattr(mod, name, boom)
  again, cells_again = audit.run(cfg, str(wd))
  monkeypatch.undo()
  strip = lambda rs: [{k: v for k, v in x.items() if not k.endswith("_seconds")} for x in rs]  # noqa: E731
  assert strip(again) == strip(rows) and cells_again == cells
  assert sorted(os.listdir(wd / "trajectory" / "models")) == models
  assert not [f for m in models for f in os.listdir(wd / "trajectory" / "models" / m) if ".stale-" in f]

  # The transfer matrix: every source's cases against every checkpoint; its diagonal is the fresh ASR, and
  # the batched evaluation over all sources equals one evaluation per cell.
  labels = [f"{a}@{s}" for a in "ab" for s in (0, 2, 4)]
  assert [(c["source"], f"{c['run']}@{c['step']}") for c in cells] == [(f"gcg@{s}", t) for t in labels for s in labels]
  for c in cells:
    if c["source"] == f"gcg@{c['run']}@{c['step']}":
      assert c["k"] == rows[labels.index(c["source"][4:])]["asr/gcg@1"]["k"]
  sources = audit.transfer_sources(rows, cfg, str(wd))
  model = registry.load_model(f"{run}@2")
  batched = audit.transfer_cells(model, sources, cfg.eval)
  for label, cases in sources:
    single = test_cases.evaluate(model, cases, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    assert batched[label]["success"] == single["success"], label
  with pytest.raises(ValueError, match=r"\['c@0'\] are not evaluated"):
    audit.transfer_sources(rows, _with_sources(cfg, ("c@0",)), str(wd))

  sec = traj_section.section(rows, cfg, cells, measures.run_level(rows, cells, cfg, str(wd)))
  assert [f.name for f in sec.figures] == ["refusal_harmful", "asr_gcg_s1", "refusal_harmless", "coupling_peak",
                                           "coupling_mean", "drift_angle", "drift_probe_auc", "lvs_model",
                                           "lvs_audit_gap", "lvs_layers", "kl_admissible", "kl_admissible_rank",
                                           "coupling_admissible", "transfer"]
  tables = {t.name: t for t in sec.tables}
  assert "correlation" in tables and len(tables["kl_admissible"].rows) == 6 * 2  # per checkpoint and family
  assert len(sec.tables[0].rows) == 6 and sec.summary["a@4/refusal/harmful"] == rows[2]["refusal/harmful"]["rate"]
  assert len(tables["transfer"].rows) == 36

  # The main, on the same workdir: resumes and writes the report section.
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax_cache)
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "trajectory.py"),
         f"--config={os.path.join(ROOT, 'experiments', 'configs', 'trajectory.py')}:smoke", f"--workdir={wd}",
         f"--config.runs=('a={run}', 'b={run}')", "--config.steps=(0, 4)", "--config.geometry.enabled=False",
         "--config.drift.enabled=False"]  # the switches; both measures ran in-process above
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  report = json.loads((wd / "report.json").read_text())
  assert len(report["sections"]["trajectory"]["tables"]["trajectory"]["rows"]) == 4
  assert len(report["sections"]["trajectory"]["tables"]["transfer"]["rows"]) == 4 * 4
  assert (wd / "report.html").exists()
  assert "coupling_peak" not in json.dumps(report["sections"]["trajectory"]["figures"])


def test_transfer_sources_are_each_source_checkpoints_gcg_and_autodan_cases_then_files(tmp_path):
  cfg = _config(["x"])
  cfg.attack.methods = ("gcg", "autodan")
  rows = [dict(run="r", step=s, digest=f"{s:016d}abc") for s in (0, 5)]
  for r in rows:
    d = tmp_path / "trajectory" / "models" / r["digest"][:16] / "attack" / "test_cases"
    for method, sub in (("gcg", f"gcg_s{max(cfg.attack.gcg_budgets)}"), ("autodan", "autodan")):
      test_cases.save(str(d / sub), [test_cases.TestCase("b0", "Do X", f"{method} case @{r['step']}")])
  ext = tmp_path / "jbb"
  test_cases.save(str(ext), [test_cases.TestCase("b1", "Do Y", "an external case")])
  c = _with_sources(cfg, ("r@5",))
  c.transfer.external = (str(ext),)
  got = [(label, [x.test_case for x in cases]) for label, cases in audit.transfer_sources(rows, c, str(tmp_path))]
  assert got == [("gcg@r@5", ["gcg case @5"]), ("autodan@r@5", ["autodan case @5"]), ("file:jbb", ["an external case"])]
  c.attack.methods = ("gcg",)
  c.transfer.sources = ()
  assert [label for label, _ in audit.transfer_sources(rows, c, str(tmp_path))] == ["gcg@r@0", "gcg@r@5", "file:jbb"]
