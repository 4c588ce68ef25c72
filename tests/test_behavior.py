"""Behavioral evaluation helpers: Wilson intervals, resumable generation records."""

import json

import numpy as np
import pytest

from lvs_jax.evals import behavior


def test_wilson_interval_known_values():
  lo, hi = behavior.wilson_interval(0, 10)
  assert lo == 0.0 and 0.27 < hi < 0.285  # 0.2775 from the closed form
  lo, hi = behavior.wilson_interval(50, 100)
  np.testing.assert_allclose([lo, hi], [0.4038, 0.5962], atol=1e-3)
  assert np.isnan(behavior.wilson_interval(0, 0)[0])


def test_read_jsonl_drops_a_torn_last_line(tmp_path):
  p = tmp_path / "g.jsonl"
  rows = [dict(prompt="a", completion="x", refused=False), dict(prompt="b", completion="y", refused=True)]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "c", "compl')
  assert behavior._read_jsonl(str(p)) == rows


def test_set_result_rates():
  r = behavior.SetResult("harmful", [dict(refused=True), dict(refused=False), dict(refused=True)])
  assert r.n == 3 and r.n_refused == 2
  assert r.refusal_rate == pytest.approx(2 / 3)
  lo, hi = r.interval
  assert lo < 2 / 3 < hi
