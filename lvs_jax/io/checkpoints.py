"""Checkpoints that survive a crash, and trajectories over them (orbax CheckpointManager underneath).

Layout of a checkpoint directory:

  <dir>/<step>/state/...            the TrainState, orbax StandardSave (restored into an abstract target)
  <dir>/<step>/metadata/...         orbax JsonSave: config, data hash, step, time (`read_metadata`)
  <dir>/<step>/lvs_commit.json      our commit record: size and sha256 of every other file of the step
  <dir>.rejected/<step>.<time>/     where invalid step directories are moved (never deleted)

A save is committed in two phases. orbax writes the step into a temporary directory and renames it
into place when complete (its own atomic commit); then `lvs_commit.json` is written to a temporary
file, fsynced and renamed into the step directory. A step is **committed** iff that record exists
and every file it lists is present with the recorded size and sha256. So a process killed at any
moment, SIGKILL during a save included, leaves either a committed step or one of
  - an orbax temporary directory (`<step>.orbax-checkpoint-tmp-*`): killed while orbax wrote;
  - a step without `lvs_commit.json`: killed between orbax's rename and the commit record;
and a step whose files were later truncated, deleted or altered fails the checksum. None of these
is ever loaded: `Checkpointer.restore_latest` walks the steps from the newest, reports each invalid
one with the reason (`log`, default a logging warning), moves it to `<dir>.rejected/` so the run can
save that step again, and restores the newest committed one. orbax errors while reading a committed
step are not damage: they stop the run with the cause (`CheckpointRestoreError`) and leave the step in
place, since skipping it would silently restart the run from an older step.

Trajectories: `list_checkpoints` gives every step with its status, and `trajectory` applies a metric
function to each committed checkpoint and writes one table (JSONL rows as they finish, so an
interrupted pass resumes, plus a CSV).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from lvs_jax.io import files

COMMIT_FILE = "lvs_commit.json"
STATE_ITEM = "state"
META_ITEM = "metadata"
_TMP_RE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class CheckpointMismatchError(ValueError):
  """A committed checkpoint was written by a run with a different config or data than this one."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint that passed verification could not be restored (not damage: memory, versions, target)."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """One step directory. status: "committed", "uncommitted" (no commit record: killed mid-save),
  "partial" (an orbax temporary directory) or "corrupt" (files differ from the commit record)."""

  step: int
  path: str
  status: str
  reason: str = ""

  @property
  def ok(self) -> bool:
    return self.status == "committed"


# --- Commit records ------------------------------------------------------------------------------


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for f in names:
      rel = os.path.relpath(os.path.join(root, f), step_dir)
      if rel != COMMIT_FILE and not rel.startswith(COMMIT_FILE + "."):
        out.append(rel.replace(os.sep, "/"))
  return sorted(out)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _fsync_dir(path: str) -> None:
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_commit(step_dir: str, step: int) -> None:
  """Records size and sha256 of every file of a finished orbax step, atomically (the commit point)."""
  listed = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
            for rel in _files(step_dir)}
  rec = dict(step=int(step), time=time.time(), files=listed)
  tmp = os.path.join(step_dir, f"{COMMIT_FILE}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(rec, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, COMMIT_FILE))
  _fsync_dir(step_dir)


def verify(step_dir: str, step: int | None = None) -> tuple[str, str]:
  """(status, reason) of one step directory; status "committed" when everything checks out."""
  rec_path = os.path.join(step_dir, COMMIT_FILE)
  if not os.path.exists(rec_path):
    return "uncommitted", f"no {COMMIT_FILE}: the save did not finish (process killed during the save?)"
  try:
    with open(rec_path) as f:
      rec = json.load(f)
    listed = rec["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return "corrupt", f"unreadable {COMMIT_FILE} ({type(e).__name__}: {e})"
  if step is not None and rec.get("step") != step:
    return "corrupt", f"{COMMIT_FILE} is for step {rec.get('step')}, not {step}"
  if not listed:
    return "corrupt", f"{COMMIT_FILE} lists no files"
  for rel, (size, digest) in sorted(listed.items()):
    p = os.path.join(step_dir, rel)
    if not os.path.exists(p):
      return "corrupt", f"file {rel} is missing"
    if os.path.getsize(p) != size:
      return "corrupt", f"file {rel} has {os.path.getsize(p)} bytes, the commit record says {size} (truncated?)"
    if _sha256(p) != digest:
      return "corrupt", f"file {rel} does not match its sha256 in the commit record (modified or damaged)"
  return "committed", ""


def list_checkpoints(directory: str | os.PathLike, *, check: bool = True) -> list[CheckpointInfo]:
  """Every step directory under `directory`, sorted by step (partial orbax saves included).

  check=False skips the checksums (status is then "committed" whenever the commit record exists).
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if not os.path.isdir(path):
      continue
    if name.isdigit():
      step = int(name)
      if check:
        status, reason = verify(path, step)
      elif os.path.exists(os.path.join(path, COMMIT_FILE)):
        status, reason = "committed", ""
      else:
        status, reason = "uncommitted", f"no {COMMIT_FILE}"
      out.append(CheckpointInfo(step, path, status, reason))
    elif m := _TMP_RE.match(name):
      out.append(CheckpointInfo(int(m.group(1)), path, "partial",
                                "orbax temporary directory: the process died while writing this step"))
  return sorted(out, key=lambda c: (c.step, c.status != "committed"))


def committed_steps(directory: str | os.PathLike) -> list[int]:
  return [c.step for c in list_checkpoints(directory) if c.ok]


def abstract_like(tree):
  """`jax.ShapeDtypeStruct`s (with shardings) of a concrete pytree: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --- The manager wrapper -------------------------------------------------------------------------


class Checkpointer:
  """Saves a TrainState every `save_every` steps (all kept when keep is None) with metadata.

  metadata: JSON-able dict stored with every step (config, data hash, model ...); `step` and `time`
  are added. read_only: never saves or moves anything (for analysis of a finished run).
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1, keep: int | None = None,
               metadata: Mapping[str, Any] | None = None, read_only: bool = False,
               log: Callable[[str], None] | None = None):
    if save_every <= 0:
      raise ValueError(f"save_every must be positive, got {save_every}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every, self.keep, self.read_only = int(save_every), keep, read_only
    self.metadata = dict(metadata or {})
    self.log = log or logging.warning
    self._mngr: ocp.CheckpointManager | None = None
    if not read_only and jax.process_index() == 0:  # one writer; orbax coordinates the processes' shards
      os.makedirs(self.directory, exist_ok=True)

  @property
  def rejected_dir(self) -> str:
    return self.directory + ".rejected"

  def _manager(self) -> ocp.CheckpointManager:
    if self._mngr is None:
      opts = ocp.CheckpointManagerOptions(
        save_interval_steps=1, max_to_keep=self.keep, create=not self.read_only, read_only=self.read_only,
        enable_async_checkpointing=False,
      )
      self._mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=(STATE_ITEM, META_ITEM))
    return self._mngr

  def _reject(self, info: CheckpointInfo) -> None:
    msg = f"checkpoint step {info.step} at {info.path} is {info.status}: {info.reason}; skipping it"
    if self.read_only:
      self.log(msg)
      return
    os.makedirs(self.rejected_dir, exist_ok=True)
    dest = os.path.join(self.rejected_dir, f"{os.path.basename(info.path)}.{time.strftime('%Y%m%d-%H%M%S')}")
    while os.path.exists(dest):
      dest += "_"
    shutil.move(info.path, dest)
    self.log(f"{msg} (moved to {dest})")
    if self._mngr is not None:
      self._mngr.reload()

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return committed_steps(self.directory)

  def save(self, state, *, force: bool = False) -> bool:
    """Saves `state` at step int(state.step) when due (or forced); returns whether it saved."""
    if self.read_only:
      raise ValueError(f"{self.directory}: read-only Checkpointer cannot save")
    step = int(state.step)
    if not force and step % self.save_every:
      return False
    path = os.path.join(self.directory, str(step))
    if os.path.exists(path):
      status, reason = verify(path, step)
      if status == "committed":
        return False
      self._reject(CheckpointInfo(step, path, status, reason))
    meta = dict(self.metadata, step=step, time=time.time())
    mngr = self._manager()
    mngr.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                                META_ITEM: ocp.args.JsonSave(meta)}), force=True)
    mngr.wait_until_finished()
    from lvs_jax.core import distributed

    if distributed.is_writer():  # one writer of the commit record; the other processes wait for it
      write_commit(path, step)
    distributed.barrier(f"lvs_checkpoint_commit_{step}")
    return True

  def restore(self, step: int, abstract_state, *, verified: bool = False) -> tuple[Any, dict]:
    """(state, metadata) of a committed step; raises ValueError naming the problem when it is not.

    verified: the caller has just checked the step (skips a second pass of checksums).
    """
    path = os.path.join(self.directory, str(step))
    if not verified:
      status, reason = verify(path, step) if os.path.isdir(path) else ("missing", "no such step directory")
      if status != "committed":
        raise ValueError(f"checkpoint step {step} at {path} is {status}: {reason}")
    r = self._manager().restore(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardRestore(abstract_state), META_ITEM: ocp.args.JsonRestore()}))
    state, meta = r[STATE_ITEM], dict(r[META_ITEM])
    got = int(jax.device_get(state.step)) if hasattr(state, "step") else step
    if got != step:
      raise ValueError(f"checkpoint step {step} at {path} holds a state at step {got}")
    return state, meta

  def restore_latest(self, abstract_state, *, expect: Mapping[str, Any] | None = None) -> tuple[Any, dict] | None:
    """(state, metadata) of the newest committed step, or None when there is none.

    Invalid steps newer than it are reported and moved aside (see module docstring). expect: metadata
    values that must match (e.g. data_hash); a committed step that differs raises
    CheckpointMismatchError, since resuming it would not reproduce this run.
    """
    # Checksums from the newest step down, stopping at the first good one (not every step of a long run).
    for info in sorted(list_checkpoints(self.directory, check=False), key=lambda c: c.step, reverse=True):
      if info.ok:
        info = dataclasses.replace(info, **dict(zip(("status", "reason"), verify(info.path, info.step))))
      if not info.ok:
        self._reject(info)
        continue
      # The step passed its checksums: from here on a failure (out of memory, an orbax version that cannot
      # read the files, a target of the wrong shape) is not damage to skip. Moving the step aside would make
      # the run silently restart from an older step or from step 0, so stop and name the cause instead.
      try:
        meta = read_metadata(self.directory, info.step)
      except Exception as e:
        raise CheckpointRestoreError(
          f"{info.path}: the checkpoint passed verification but its metadata could not be read "
          f"({type(e).__name__}: {e}); it was left in place. Fix the cause, or move the step aside by hand "
          "to resume from an older one") from e
      # Checked before restoring: a step of another run is an error to report, not damage to skip.
      for k, v in (expect or {}).items():
        if meta.get(k) != v:
          raise CheckpointMismatchError(
            f"{info.path}: metadata {k!r} is {meta.get(k)!r}, this run has {v!r}; the workdir belongs to a "
            "different run (use a fresh --workdir, or restore the original config and data)")
      try:
        return self.restore(info.step, abstract_state, verified=True)
      except Exception as e:
        raise CheckpointRestoreError(
          f"{info.path}: the checkpoint passed verification but restoring it failed ({type(e).__name__}: {e}); "
          "it was left in place. Fix the cause (memory, orbax version, restore target), or move the step aside by "
          "hand to resume from an older one") from e
    return None


def read_metadata(directory: str | os.PathLike, step: int) -> dict:
  """The metadata dict saved with a committed step (without restoring the state)."""
  path = os.path.join(os.fspath(directory), str(step), META_ITEM)
  return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path))


# --- Trajectories --------------------------------------------------------------------------------


def trajectory(directory: str | os.PathLike, abstract_state, metric_fn: Callable[[int, Any], Mapping[str, Any]],
               out_path: str | os.PathLike, *, steps: Sequence[int] | None = None,
               log: Callable[[str], None] | None = print) -> list[dict]:
  """Applies `metric_fn(step, state) -> {name: value}` to every committed checkpoint, oldest first.

  Writes one table: rows {"step", **metrics} are appended to `out_path` + ".jsonl" as each finishes
  (a rerun skips steps already there) and the whole table is written to `out_path` (CSV) at the
  end. Invalid steps are reported and skipped, never loaded. steps: restrict to these steps.
  Returns the rows sorted by step.
  """
  out_path = os.fspath(out_path)
  jsonl = out_path + ".jsonl"
  done: dict[int, dict] = {int(r["step"]): r for r in files.read_jsonl(jsonl, log=log)}
  ckpt = Checkpointer(directory, read_only=True, log=log)
  infos = list_checkpoints(directory)
  wanted = None if steps is None else set(int(s) for s in steps)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  for info in infos:
    if wanted is not None and info.step not in wanted:
      continue
    if not info.ok:
      if log:
        log(f"trajectory: checkpoint step {info.step} at {info.path} is {info.status}: {info.reason}; skipping it")
      continue
    if info.step in done:
      continue
    state, _ = ckpt.restore(info.step, abstract_state, verified=True)
    row = {"step": info.step, **dict(metric_fn(info.step, state))}
    done[info.step] = row
    files.append_jsonl(jsonl, [row])
  rows = [done[s] for s in sorted(done) if wanted is None or s in wanted]
  columns = list(dict.fromkeys(k for r in rows for k in r))
  buf = io.StringIO(newline="")
  w = csv.writer(buf)
  w.writerow(columns)
  for r in rows:
    w.writerow([r.get(c, "") for c in columns])
  files.atomic_write_text(out_path, buf.getvalue())
  return rows
