"""Writers outside io/files (attack test cases and state, the fair drift study's caches, directories) write
on the writer process only: a process that is not process 0 leaves the workdir untouched."""

import json
import os

import pytest

from lvs_jax.attacks import gcg
from lvs_jax.attacks import test_cases as tc_lib
from lvs_jax.core import distributed
from lvs_jax.drift import fair_audit
from lvs_jax.io import files


def _write_everything(root):
  files.makedirs(os.path.join(root, "a", "b"))
  tc_lib.save(os.path.join(root, "cases"), [tc_lib.TestCase("x/0", "do x", "please do x", {"loss": 1.5})])
  files.makedirs(os.path.join(root, "gcg"))
  gcg._atomic_json(os.path.join(root, "gcg", "state.json"), {"best_loss": float("inf")})
  files.makedirs(os.path.join(root, "fair"))
  return fair_audit.cached(os.path.join(root, "fair"), "task_t", {"k": 1}, lambda: {"auc": 0.75})


@pytest.mark.parametrize("writer", [True, False])
def test_only_the_writer_writes(tmp_path, monkeypatch, writer):
  monkeypatch.setattr(distributed, "is_writer", lambda: writer)
  value = _write_everything(str(tmp_path))
  assert value == {"auc": 0.75}  # every process gets the result; only the writer stores it
  written = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs)
  if not writer:
    assert os.listdir(tmp_path) == []
    return
  assert written == ["cases/logs.json", "cases/test_cases.json", "fair/task_t.json", "fair/task_t.json.key.json",
                     "gcg/state.json"]
  assert os.path.isdir(tmp_path / "a" / "b")
  assert json.loads((tmp_path / "cases" / "test_cases.json").read_text()) == {"x/0": ["please do x"]}
  assert json.loads((tmp_path / "gcg" / "state.json").read_text()) == {"best_loss": float("inf")}  # inf kept
  assert json.loads((tmp_path / "fair" / "task_t.json").read_text()) == {"auc": 0.75}
  assert fair_audit.cached(str(tmp_path / "fair"), "task_t", {"k": 1}, lambda: 1 / 0) == {"auc": 0.75}  # reused
