"""Prompt sets: load the public harmful/harmless prompt formats by path, sample and split them.

`load_prompts(path, ...)` is the single entry point. It returns a `PromptSet`: the prompt strings
plus, where the format has them, attack targets and per-prompt labels, all aligned by row. A
`PromptSet` behaves as a sequence of prompt strings (`len`, iteration, `ps[i]` -> str), so it can be
passed wherever a list of prompts is expected; slicing, `sample` and `split` keep targets and
labels aligned.

Formats, the columns each reads and how fields are chosen: see `lvs_jax.io.formats`.

The public sets the defaults need ship with the package (`BUNDLED`, lvs_jax/prompts/README.md has
sources, row counts and licences): `load_prompts("advbench")` loads one by name. A path loads a
user's own file; a bare file name is also looked up in `$LVS_DATA_DIR`. Files ending in `.gz` are
read decompressed (the format comes from the name before `.gz`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from lvs_jax.core.tokenizer import PromptError
from lvs_jax.io import formats
from lvs_jax.io.formats import PromptSet

DATA_ENV_VAR = "LVS_DATA_DIR"


# --- Where the data are -------------------------------------------------------------------------

# Sets shipped with the package (lvs_jax/prompts/, sources and licences in its README.md and NOTICE):
# name -> file. `load_prompts("harmful_val")` and `load_prompts("harmful_val")` both find them.
BUNDLED: dict[str, str] = {
  "harmful_train": "harmful_train.json",
  "harmful_val": "harmful_val.json",
  "harmless_train": "harmless_train.json.gz",
  "harmless_val": "harmless_val.json.gz",
  "advbench": "advbench.csv",
  "harmbench_val": "harmbench_val.csv",
  "xstest": "xstest_prompts.csv",
  "malicious_instruct": "malicious_instruct.txt",
  "tdc2023_dev": "tdc2023_dev_behaviors.json",
  "safe_but_scary": "safe_but_scary.txt",
}
# Row counts of the bundled files (the data README's table; a test checks both).
BUNDLED_ROWS: dict[str, int] = {
  "harmful_train": 260, "harmful_val": 39, "harmless_train": 18793, "harmless_val": 6264, "advbench": 520,
  "harmbench_val": 80, "xstest": 450, "malicious_instruct": 100, "tdc2023_dev": 50, "safe_but_scary": 91,
}


def bundled_dir() -> pathlib.Path:
  """The package's prompt-data directory (lvs_jax/prompts)."""
  return pathlib.Path(__file__).resolve().parent.parent / "prompts"


def _bundled(name: str) -> pathlib.Path | None:
  """The bundled file for a set name ("harmful_val") or its file name (with or without ".gz")."""
  d = bundled_dir()
  fname = BUNDLED.get(name)
  if fname is None:
    fname = next((f for f in BUNDLED.values() if name in (f, f.removesuffix(".gz"))), None)
  return None if fname is None else d / fname


def resolve_path(path: str | os.PathLike) -> pathlib.Path:
  """Where a prompt set is: `path` if it exists; else, for a bare name, `$LVS_DATA_DIR/<name>` (users'
  own copies) and then the bundled set of that name (`BUNDLED`: "harmful_val" or "harmful_val").

  Raises FileNotFoundError naming the path, where it looked and the bundled names.
  """
  p = pathlib.Path(path).expanduser()
  if p.exists():
    return p
  looked = [str(p.resolve())]
  if not p.is_absolute():
    env = os.environ.get(DATA_ENV_VAR)
    if env:
      for q in (pathlib.Path(env).expanduser() / p, pathlib.Path(env).expanduser() / f"{p}.gz"):
        looked.append(str(q))
        if q.exists():
          return q
    q = _bundled(str(path))
    if q is not None:
      return q
  raise FileNotFoundError(f"prompt file {str(path)!r} not found; looked at: " + "; ".join(looked)
                          + f"; bundled sets: {', '.join(BUNDLED)}")


# --- Loading ------------------------------------------------------------------------------------


def load_prompts(
  path: str | os.PathLike,
  *,
  format: str | None = None,
  field: str | None = None,
  label: str | Sequence[str] | None = None,
  functional_category: str | Sequence[str] | None = None,
) -> PromptSet:
  """Load a prompt file -> PromptSet.

  path: a file path (optionally .gz), a bundled set name ("harmful_val", see `BUNDLED`), or a bare
    file name looked up in $LVS_DATA_DIR and then among the bundled files (see `resolve_path`).
  format: one of `formats.FORMATS`; None detects it from the extension (.json .jsonl .csv .txt, each optionally
    .gz) and, for CSV, from the header (HarmBench, AdvBench, XSTest, StrongREJECT columns; else
    generic); a JSON object with 'parameters' and 'jailbreaks' is a JailbreakBench artifact.
  field: the prompt field/column, for JSON objects, JSONL and CSV (defaults: see `lvs_jax.io.formats`).
  label: keep only rows whose label is this / one of these (XSTest "safe" / "unsafe", a category,
    a HarmBench SemanticCategory). Error if the file has no labels.
  functional_category: HarmBench only: keep rows whose FunctionalCategory is this / one of these
    ("standard", "contextual", "copyright"); None keeps all.

  Raises FileNotFoundError (names the path), ValueError (unknown format, missing column: names the
  file, expected and actual columns), PromptError (nothing left: names the file and the filters).
  """
  p = resolve_path(path)
  fc = formats.as_tuple(functional_category)
  ps = formats.read(p, format or formats.detect_format(p), field, fc)

  filters = []
  if fc is not None:
    filters.append(f"FunctionalCategory in {list(fc)}")
  wanted = formats.as_tuple(label)
  if wanted is not None:
    if ps.labels is None:
      raise ValueError(f"{p}: label={label!r} given, but this file has no labels")
    ps = ps.take([i for i, x in enumerate(ps.labels) if x in wanted])
    filters.append(f"label in {list(wanted)}")
  source = str(p) + ps.source + (f" [{'; '.join(filters)}]" if filters else "")
  if len(ps) == 0:
    raise PromptError(f"no prompts in {source}" + ("" if filters else " (the file is empty)"))
  return dataclasses.replace(ps, source=source)


# --- Sampling and splitting ---------------------------------------------------------------------

P = TypeVar("P", PromptSet, list)


def _permutation(n: int, seed: int) -> np.ndarray:
  """A permutation of range(n) that depends only on (n, seed): the same on every platform and
  numpy version (sort by a SplitMix64 hash of (seed, index)), unlike a Generator's stream."""
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise TypeError(f"seed must be an int, got {type(seed).__name__}")

  def mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))

  with np.errstate(over="ignore"):
    s = mix(np.array([int(seed) % 2**64], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    keys = mix(np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + s)
  return np.argsort(keys, kind="stable")


def _take(prompts: P, idx: np.ndarray) -> P:
  if isinstance(prompts, PromptSet):
    return prompts.take(idx)
  return [prompts[int(i)] for i in idx]


def _check_prompts(prompts) -> None:
  if isinstance(prompts, str) or not isinstance(prompts, (PromptSet, Sequence)):
    raise TypeError(f"expected a PromptSet or a list of prompts, got {type(prompts).__name__}")


def sample(prompts: P, n: int, seed: int, allow_fewer: bool = False) -> P:
  """n prompts drawn without replacement, deterministically from `seed`, in random order.

  prompts: a PromptSet (targets and labels stay aligned) or a list; returns the same type.
  n > len(prompts) raises ValueError unless allow_fewer, which returns all of them (shuffled).
  The result is the first chunk of `split(prompts, [n], seed)`.
  """
  _check_prompts(prompts)
  if n < 0:
    raise ValueError(f"cannot sample {n} prompts")
  if n > len(prompts) and not allow_fewer:
    raise ValueError(
      f"cannot sample {n} prompts from {len(prompts)} without replacement "
      "(pass allow_fewer=True to take them all)"
    )
  return _take(prompts, _permutation(len(prompts), seed)[: min(n, len(prompts))])


def split(prompts: P, sizes: int | float | Sequence[int] | Sequence[float], seed: int) -> tuple[P, ...]:
  """Disjoint random parts of `prompts` -> tuple of the same type as `prompts`.

  sizes: counts (ints) or fractions (floats in [0, 1]); a single number n gives (n, rest).
    Counts must sum to <= N. Fractions are floored per part, except that when they sum to 1 the
    last part takes the remainder, so every prompt lands in exactly one part.
  One seeded shuffle, cut in order: part k is the same for any later parts, and part 0 with count
  n equals `sample(prompts, n, seed)`.
  """
  _check_prompts(prompts)
  n_total = len(prompts)
  single = isinstance(sizes, (int, float, np.integer, np.floating)) and not isinstance(sizes, bool)
  if single:
    sizes = [sizes, (n_total - sizes) if _is_int(sizes) else 1.0 - sizes]
  sizes = list(sizes)
  if not sizes:
    raise ValueError("split needs at least one size")
  if all(_is_int(s) for s in sizes):
    counts = [int(s) for s in sizes]
    if min(counts) < 0 or sum(counts) > n_total:
      raise ValueError(f"split sizes {counts} do not fit {n_total} prompts")
  elif all(isinstance(s, (float, np.floating)) for s in sizes):
    fr = [float(s) for s in sizes]
    if min(fr) < 0 or sum(fr) > 1 + 1e-9:
      raise ValueError(f"split fractions {fr} must be >= 0 and sum to <= 1")
    counts = [int(np.floor(f * n_total + 1e-9)) for f in fr]
    if abs(sum(fr) - 1) <= 1e-9:
      counts[-1] = n_total - sum(counts[:-1])
  else:
    raise ValueError(f"split sizes must be all ints or all floats, got {sizes}")
  perm = _permutation(n_total, seed)
  bounds = np.cumsum([0] + counts)
  return tuple(_take(prompts, perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
