"""io/files: atomic writes, JSONL append with torn-line repair, strict JSON conversion."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lvs_jax.io import files


def test_read_jsonl_drops_a_torn_last_line_and_repairs_the_file(tmp_path):
  p = tmp_path / "g.jsonl"
  rows = [dict(prompt="a", completion="x", refused=False), dict(prompt="b", completion="y", refused=True)]
  p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "c", "compl')
  msgs = []
  assert files.read_jsonl(p, log=msgs.append) == rows and "line 3 is incomplete" in msgs[0]
  # Rows appended after the repair are readable: without it the fragment hid them on every resume.
  files.append_jsonl(p, [dict(prompt="c", completion="z", refused=False)])
  assert [r["prompt"] for r in files.read_jsonl(p)] == ["a", "b", "c"]
  assert files.read_jsonl(tmp_path / "missing.jsonl") == []


def test_read_jsonl_without_repair_leaves_the_file_and_a_complete_unterminated_row_is_kept(tmp_path):
  p = tmp_path / "g.jsonl"
  p.write_text('{"a": 1}\n{"a": 2')
  assert files.read_jsonl(p, repair=False, log=None) == [{"a": 1}] and p.read_text().endswith('{"a": 2')
  p.write_text('{"a": 1}\n{"a": 2}')  # killed between the row and its newline: the row is whole
  assert files.read_jsonl(p, log=None) == [{"a": 1}, {"a": 2}]
  files.append_jsonl(p, [{"a": 3}])
  assert files.read_jsonl(p, log=None) == [{"a": 1}, {"a": 2}, {"a": 3}]
  p.write_text('{"a": 1}\n[1, 2]\n{"a": 3}\n')  # not an object: treated as damage
  assert files.read_jsonl(p, log=None) == [{"a": 1}]


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path):
  p = tmp_path / "sub" / "x.json"
  files.atomic_write_json(p, dict(a=np.float32(1.5), b=np.arange(3), c=float("nan"), d=(1, 2), e=jnp.ones(2)))
  assert json.loads(p.read_text()) == dict(a=1.5, b=[0, 1, 2], c=None, d=[1, 2], e=[1.0, 1.0])
  z = tmp_path / "a.npz"
  files.atomic_savez(z, x=np.arange(4.0))
  np.testing.assert_array_equal(files.load_npz(z)["x"], np.arange(4.0))
  assert sorted(os.listdir(tmp_path)) == ["a.npz", "sub"] and os.listdir(tmp_path / "sub") == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
  p = tmp_path / "x.json"
  files.atomic_write_json(p, {"v": 1})
  with pytest.raises(TypeError, match="cannot store object"):
    files.atomic_write_json(p, {"v": object()})
  assert json.loads(p.read_text()) == {"v": 1} and os.listdir(tmp_path) == ["x.json"]


def test_to_jsonable_is_the_reports():
  from lvs_jax.report import store

  assert store.to_jsonable is files.to_jsonable
  with pytest.raises(TypeError, match=r"where\['k'\]: cannot store set"):
    files.to_jsonable({"k": {1}}, "where")
