"""Behavioral evaluation helpers: Wilson intervals, resumable generation records."""


import pytest

from lvs_jax.evals import behavior


def test_set_result_rates():
  r = behavior.SetResult("harmful", [dict(refused=True), dict(refused=False), dict(refused=True)])
  assert r.n == 3 and r.n_refused == 2
  assert r.refusal_rate == pytest.approx(2 / 3)
  lo, hi = r.interval
  assert lo < 2 / 3 < hi
