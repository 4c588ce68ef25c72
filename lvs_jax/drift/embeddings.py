"""Frozen embeddings for probes: pooled residual-stream activations of a loaded model, or any
external [N, D] array with labels.

`embed(model, prompts, ...)` is `lvs_jax.evals.activations.collect` (batched, jitted; pooling "last" |
"last_instruction" | "mean", chat template on or off, any site and layers) with an optional .npz
cache keyed by the prompts and settings, so re-running an experiment on the same workdir does not
recompute. `load_array(path)` reads embeddings produced elsewhere (any frozen encoder), so the
probe and drift kit runs on them unchanged.

Units: raw activations (not normalized); the drift kit unit-normalizes rows itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from lvs_jax.evals import activations
from lvs_jax.io import files, keys


def cache_key(prompts: Sequence[str], **settings) -> str:
  """A short hash of the prompts (in order) and the settings that determine their embeddings."""
  h = hashlib.sha256(json.dumps([list(prompts), settings], sort_keys=True, default=str).encode("utf-8"))
  return h.hexdigest()[:16]


def embed(model, prompts: Sequence[str], *, layers: Sequence[int] | None = None, pooling: str = "last",
          site: str = "resid_post", chat: bool = True, batch_size: int = 16, cache: str | os.PathLike | None = None,
          progress: bool = False) -> np.ndarray:
  """Pooled activations [L', N, D] float32 of `prompts` at `layers` (default all); see
  `activations.collect`. cache: an .npz path; reused when its key (prompts, model source and name,
  settings) matches, else (re)computed and written."""
  prompts = list(prompts)
  layers_t = None if layers is None else [int(i) for i in layers]
  # The model by its weights (`io.keys.model_parts`), not its name: a perturbed copy or another
  # checkpoint of the same model must not reuse these embeddings.
  key = cache_key(prompts, model=keys.model_parts(model), layers=layers_t, pooling=pooling, site=site, chat=chat,
                  code=keys.key_of("embeddings", {})["key"])
  if cache is not None and os.path.exists(cache):
    with np.load(cache, allow_pickle=False) as z:
      if "key" in z.files and str(z["key"]) == key:
        return z["x"]
  x = activations.collect(model, prompts, pooling=pooling, site=site, layers=layers_t, batch_size=batch_size, chat=chat,
                          progress=progress).astype(np.float32)
  if cache is not None:
    files.atomic_savez(cache, x=x, key=np.asarray(key))
  return x


def load_array(path: str | os.PathLike, x_key: str = "x", y_key: str = "y") -> tuple[np.ndarray, np.ndarray]:
  """External embeddings with labels -> (x [N, D] float32, y [N] int32 in {0, 1}).

  .npz with arrays `x_key` and `y_key`; or .npy of x with a sibling `<stem>.labels.npy`.
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      missing = [k for k in (x_key, y_key) if k not in z]
      if missing:
        raise ValueError(f"{path}: no array(s) {missing}; has {list(z.keys())}")
      x, y = z[x_key], z[y_key]
  elif path.endswith(".npy"):
    x, y = np.load(path), np.load(path[:-4] + ".labels.npy")
  else:
    raise ValueError(f"{path}: expected an .npz (x, y) or an .npy with a .labels.npy next to it")
  x, y = np.asarray(x, np.float32), np.asarray(y)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"{path}: expected x [N, D] and y [N], got {x.shape} and {y.shape}")
  if not np.isin(y, (0, 1)).all():
    raise ValueError(f"{path}: labels must be 0/1, got values {np.unique(y)[:10]}")
  return x, y.astype(np.int32)
