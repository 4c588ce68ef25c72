"""Behavioral evaluation helpers: Wilson intervals, resumable generation records."""

import json

import pytest

from lvs_jax.evals import behavior


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
