"""Content keys of resumable artefacts: a result is reused only when what produced it is unchanged.

Every resumable artefact (generations JSONL, `sweep.npz`, PGD cells, activations, carriers, coupling,
causal cells, own-completion caches) has a key file next to it, `<artefact>.key.json`, holding the
parts that produced it and their hash:

  kind       which artefact ("generations", "pgd_cell", ...), with its schema version (`SCHEMA`)
  code       lvs_jax.__version__
  model      `model_parts`: name, dtype, architecture config and a digest of the weights (so two
             checkpoints of one architecture, a perturbed copy or a fine-tuned step differ)
  prompts    the prompts (and targets) in order
  config     the config subtree that changes the result (steps, radii, max_new_tokens, judge, ...)

`claim(path, kind, **parts)` is called before an artefact is read or written. The key file is written
before the artefact, so an artefact on disk always has the key of the run that wrote it (a run killed
between the two leaves a key without an artefact, which the next run simply overwrites). When the
artefact exists with another key, or with no key (written before keys existed), it is moved aside to
`<artefact>.stale-<time>` (never deleted) with a warning naming the parts that differ, and the caller
recomputes. With `strict=True` it raises `StaleArtefactError` with that message instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import lvs_jax
from lvs_jax.io import files

KEY_SUFFIX = ".key.json"
# Bump an artefact's version when the code that writes it changes what it means.
SCHEMA = {"generations": 1, "sweep": 1, "pgd_cell": 1, "activations": 1, "carriers": 1, "coupling": 1,
          "causal": 1, "own_completions": 1, "embeddings": 1, "ablation_controls": 1, "diagnostics": 1,
          "drift_fair": 1, "trajectory_attack": 1, "transfer": 1, "trajectory_geometry": 1,
          "trajectory_admissible": 1, "trajectory_ablation_kl": 1}


class StaleArtefactError(RuntimeError):
  """An artefact on disk was produced by something other than what this run would compute."""


def digest(obj: Any) -> str:
  """sha256 hex of the canonical JSON of `obj` (after `files.to_jsonable`)."""
  text = json.dumps(files.to_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def array_digest(tree: Any, sample: int = 4096) -> str:
  """A digest of a pytree of arrays that any change of a whole leaf (or of its scale) changes: per leaf
  its shape, dtype, float64 sum, sum of squares and `sample` evenly strided values. Costs one read of
  the weights, not a copy to the host."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = jnp.asarray(leaf)
    flat = a.reshape(-1)
    stride = max(1, flat.shape[0] // sample) if flat.shape[0] else 1
    f = flat.astype(jnp.float32)
    stats = np.asarray(jax.device_get(jnp.stack([f.sum(), (f * f).sum()]) if flat.shape[0] else jnp.zeros(2)))
    h.update(f"{jax.tree_util.keystr(path)}|{a.shape}|{a.dtype}|".encode())
    h.update(np.asarray(stats, np.float64).tobytes())
    h.update(np.ascontiguousarray(np.asarray(jax.device_get(flat[::stride][:sample]))).tobytes())
  return h.hexdigest()


_LAST_MODEL: list = []  # [(params, parts)] of the last model seen: the digest reads every weight once


def model_parts(model) -> dict:
  """The parts of a LoadedModel that decide what it computes: name, dtype, config, weights digest.
  (The source path is not part of it: the same weights moved to another directory are the same model.)"""
  if _LAST_MODEL and _LAST_MODEL[0][0] is model.params and _LAST_MODEL[0][1]["name"] == _model_name(model):
    return dict(_LAST_MODEL[0][1])
  parts = _model_parts(model)
  _LAST_MODEL[:] = [(model.params, parts)]
  return dict(parts)


def _model_name(model) -> str:
  return getattr(model, "name", "") or os.path.basename(getattr(model, "source", "") or "")


def _model_parts(model) -> dict:
  cfg = model.cfg
  cfg_dict = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))
  leaves = jax.tree.leaves(model.params)
  dtypes = sorted({str(getattr(x, "dtype", type(x).__name__)) for x in leaves})
  return dict(name=_model_name(model), dtype=dtypes, config=cfg_dict, weights=array_digest(model.params))


def edit_parts(edit) -> str | None:
  """A digest of an intervention (a pytree of arrays), or None for no edit."""
  return None if edit is None else array_digest(edit)


def key_of(kind: str, parts: Mapping[str, Any]) -> dict:
  """{"kind", "schema", "code", "parts" (JSON-able), "key" (their digest)}."""
  if kind not in SCHEMA:
    raise ValueError(f"unknown artefact kind {kind!r}; expected one of {sorted(SCHEMA)}")
  rec = dict(kind=kind, schema=SCHEMA[kind], code=lvs_jax.__version__, parts=files.to_jsonable(dict(parts)))
  rec["key"] = digest(rec)
  return rec


def _short(v: Any) -> str:
  s = json.dumps(v, ensure_ascii=False, sort_keys=True)
  return s if len(s) <= 80 else s[:77] + "..."


def differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
  """Human-readable list of what differs between two key records (top-level fields and parts)."""
  if not old:
    return ["no key file (written by an older version, or by hand)"]
  out = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in ("kind", "schema", "code")
         if old.get(k) != new.get(k)]
  po, pn = _flatten(old.get("parts") or {}), _flatten(new.get("parts") or {})
  for k in sorted(set(po) | set(pn)):
    a, b = po.get(k), pn.get(k)
    if a == b:
      continue
    if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
      out.append(f"{k}: {len(a)} items -> {len(b)} items")
    else:
      out.append(f"{k}: {_short(a)} -> {_short(b)}")
  return out


def _flatten(d: Mapping, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1} (dicts only; lists stay values)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and v:
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def read_key(path: str | os.PathLike) -> dict | None:
  p = os.fspath(path) + KEY_SUFFIX
  try:
    with open(p, encoding="utf-8") as f:
      rec = json.load(f)
    return rec if isinstance(rec, dict) else None
  except (OSError, ValueError):
    return None


def matches(path: str | os.PathLike, kind: str, **parts) -> bool:
  """Whether the artefact at `path` exists and was produced by exactly these parts."""
  rec = read_key(path)
  return os.path.exists(os.fspath(path)) and rec is not None and rec.get("key") == key_of(kind, parts)["key"]


def claim(path: str | os.PathLike, kind: str, *, strict: bool = False, **parts) -> bool:
  """Makes `path` safe to resume for an artefact of `kind` produced by `parts` (see module docstring).

  Returns True when an artefact with this key exists (reuse or resume it), False when there is none
  (compute it). A mismatching artefact is moved aside (or, strict, StaleArtefactError is raised).
  """
  path = os.fspath(path)
  new = key_of(kind, parts)
  old = read_key(path)
  exists = os.path.exists(path)
  from lvs_jax.core import distributed

  # One decision for every process (process 0's view): they all reuse or all recompute, in step.
  if distributed.agree(exists and old is not None and old.get("key") == new["key"]):
    return True
  if not distributed.is_writer():  # only process 0 moves stale files and writes keys
    return False
  if exists:
    why = "; ".join(differences(old, new))
    msg = f"{path} was produced by something else than this run ({why})"
    if strict:
      raise StaleArtefactError(msg + "; use a fresh workdir or move the file away")
    dest = f"{path}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(dest):
      dest += "_"
    shutil.move(path, dest)
    if old is not None:
      shutil.move(path + KEY_SUFFIX, dest + KEY_SUFFIX)
    logging.warning("%s; moved it to %s and recomputing", msg, dest)
  files.atomic_write_json(path + KEY_SUFFIX, new, indent=1)
  return False
