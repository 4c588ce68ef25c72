"""Files that survive a kill: atomic writes, append-only JSONL with torn-line repair, strict JSON values.

  atomic_write_bytes / _text / _json   temp file in the same directory, fsync, `os.replace` over the
                                       target: a reader sees the old file or the new one, never half
  atomic_savez(path, **arrays)         the same for a .npz (no pickles: `allow_pickle=False` to read)
  append_jsonl(path, rows)             one JSON object per line, appended and flushed per call
  read_jsonl(path)                     the rows before the first torn line; by default the file is cut
                                       back to them, so rows appended later are not hidden behind it
  to_jsonable(x)                       numpy/jax values, tuples, paths -> strict-JSON Python (nan -> None)
  makedirs(path)                       os.makedirs(exist_ok=True) on the writer process only

A process killed while appending leaves at most one incomplete last line. Readers elsewhere used to
stop there and leave it in place, so the next run appended its rows after the fragment and every
later read stopped at the same place: the new rows were computed again on each resume. `read_jsonl`
truncates the fragment (repair=True), which is what makes append-and-resume converge.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def to_jsonable(x: Any, where: str = "value") -> Any:
  """Converts `x` to strict-JSON-able Python: numpy/jax scalars and arrays become Python values,
  tuples lists, Paths strings, and non-finite floats None. Raises TypeError (naming `where`) otherwise.
  """
  if x is None or isinstance(x, (bool, str)):
    return x
  if isinstance(x, int):
    return int(x)
  if isinstance(x, float):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.generic):
    return to_jsonable(x.item(), where)
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
  if isinstance(x, np.ndarray) or hasattr(x, "__array__"):  # jax.Array without importing jax
    return to_jsonable(np.asarray(x).tolist(), where)
  raise TypeError(f"{where}: cannot store {type(x).__name__} as JSON")


def _tmp_path(path: str) -> str:
  d, name = os.path.split(path)
  return os.path.join(d, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def _atomic(path: str | os.PathLike):
  """Yields a temp path next to `path`; on success fsyncs and renames it over `path`, else removes it."""
  path = os.fspath(path)
  from lvs_jax.core import distributed

  if not distributed.is_writer():  # one writer: under jax.distributed only process 0 writes the workdir
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the caller's bytes go to a private scratch file
      yield os.path.join(d, os.path.basename(path))
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = _tmp_path(path)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def makedirs(path: str | os.PathLike) -> None:
  """`os.makedirs(path, exist_ok=True)` on the one writer process (process 0 under jax.distributed; always
  on one process): the others never create anything in the workdir (the writes above make their own
  directories, so a later read on another process waits for the writer, not for this)."""
  from lvs_jax.core import distributed

  if distributed.is_writer():
    os.makedirs(os.fspath(path), exist_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (the file's mode honours the umask)."""
  with _atomic(path) as tmp:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
      f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> None:
  """`to_jsonable(obj)` as strict JSON (a nan that escaped conversion is an error, not a NaN token)."""
  text = json.dumps(to_jsonable(obj, os.fspath(path)), indent=indent, ensure_ascii=False, allow_nan=False)
  atomic_write_text(path, text + "\n")


def atomic_savez(path: str | os.PathLike, **arrays) -> None:
  """np.savez to `path` (which should end in .npz) atomically."""
  with _atomic(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of an .npz file (never unpickles)."""
  with np.load(os.fspath(path), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def append_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> None:
  """Appends one strict-JSON line per row and flushes (a kill loses at most the line being written)."""
  path = os.fspath(path)
  text = "".join(json.dumps(to_jsonable(r, path), ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
  from lvs_jax.core import distributed

  if not text or not distributed.is_writer():  # one writer: process 0
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as f:
    f.write(text)
    f.flush()


def read_jsonl(path: str | os.PathLike, *, repair: bool = True, log=print) -> list[dict]:
  """The rows of a JSONL file ([] when it does not exist), up to the first line that is not a complete
  JSON object (a write cut by a kill). repair: cut the file back to the good rows, so that rows
  appended afterwards are readable. log: told about a torn line (None: silent)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return []
  rows, good_end = [], 0
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  for i, line in enumerate(data.splitlines(keepends=True)):
    end = pos + len(line)
    if line.strip():
      try:
        row = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError):
        row = None
      if not isinstance(row, dict):
        if log:
          log(f"{path}: line {i + 1} is incomplete (a write cut by a kill?); dropping it and every line after it")
        if repair:
          with open(path, "rb+") as f:
            f.truncate(good_end)
        return rows
      rows.append(row)
    good_end = pos = end
  if repair and data and not data.endswith(b"\n"):  # a complete last row cut before its newline
    with open(path, "ab") as f:
      f.write(b"\n")
  return rows
