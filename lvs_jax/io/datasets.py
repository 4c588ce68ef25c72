"""Prompt sets: load the public harmful/harmless prompt formats by path, sample and split them.

`load_prompts(path, ...)` is the single entry point. It returns a `PromptSet`: the prompt strings
plus, where the format has them, attack targets and per-prompt labels, all aligned by row. A
`PromptSet` behaves as a sequence of prompt strings (`len`, iteration, `ps[i]` -> str), so it can be
passed wherever a list of prompts is expected; slicing, `sample` and `split` keep targets and
labels aligned.

Formats (detected from the extension, then from the columns / JSON shape; or named with `format=`):

| format    | file                                  | prompt              | target  | label               |
|-----------|---------------------------------------|---------------------|---------|---------------------|
| json      | list of {instruction, category}       | instruction*        | target* | category*           |
|           | (refusal-direction splits)            |                     |         |                     |
| json      | list of strings (TDC 2023 behaviors)  | the string          | -       | -                   |
| jsonl     | one JSON object per line              | prompt*             | target* | category*           |
| advbench  | CSV `goal,target` (AdvBench)          | goal                | target  | -                   |
| harmbench | CSV `Behavior,FunctionalCategory,...` | Behavior (+context) | -       | SemanticCategory    |
| xstest    | CSV `id,prompt,type,label,...`        | prompt              | -       | label (safe/unsafe) |
| csv       | any other CSV                         | prompt*             | target* | category*           |
| text      | .txt, one prompt per line             | the line            | -       | -                   |
| strongreject | CSV `category,source,forbidden_prompt` | forbidden_prompt  | -       | category            |
| jailbreakbench | JSON {parameters, jailbreaks: [...]} | prompt (the attack) | -     | category; behavior = goal |

JailbreakBench attack artifacts: rows whose `prompt` is null (attacks that produced nothing) are
skipped and counted in the PromptSet's `source`; `behaviors` holds each row's `goal`, so a
published jailbreak can be re-run against any model and scored per behavior.

(*) `field=` names the prompt field; by default the first of prompt / instruction / goal / behavior
present is used (case-insensitive). Targets come from a "target" field and labels from "category"
or "label" when present. HarmBench contextual behaviors are prompted as HarmBench does,
f"{ContextString}\\n\\n---\\n\\n{Behavior}".

The public sets the defaults need ship with the package (`BUNDLED`, lvs_jax/prompts/README.md has
sources, row counts and licences): `load_prompts("advbench")` loads one by name. A path loads a
user's own file; a bare file name is also looked up in `$LVS_DATA_DIR`. Files ending in `.gz` are
read decompressed (the format comes from the name before `.gz`).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import TypeVar, overload

import numpy as np

from lvs_jax.core.tokenizer import PromptError

DATA_ENV_VAR = "LVS_DATA_DIR"

FORMATS = ("json", "jsonl", "csv", "advbench", "harmbench", "xstest", "strongreject", "jailbreakbench", "text")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".txt": "text"}
_PROMPT_FIELDS = ("prompt", "instruction", "goal", "behavior")
_TARGET_FIELDS = ("target",)
_LABEL_FIELDS = ("category", "label")


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """N prompts, with optional per-prompt attack targets and labels, and where they came from.

  prompts: [N] prompt strings (user messages, not chat-formatted).
  targets: [N] attack target strings ("Sure, here is ...") or None.
  labels: [N] per-prompt labels (category, XSTest safe/unsafe, HarmBench semantic category; None
    entries where a row has none) or None when the format has no labels.
  source: path of the file and the filters applied.
  behaviors: [N] the behavior each prompt attacks, when the prompt is an attack (JailbreakBench
    artifacts: the row's goal) or None.
  """

  prompts: list[str]
  targets: list[str] | None = None
  labels: list[str | None] | None = None
  source: str = ""
  behaviors: list[str] | None = None

  def __post_init__(self):
    for name in ("targets", "labels", "behaviors"):
      col = getattr(self, name)
      if col is not None and len(col) != len(self.prompts):
        raise ValueError(f"{name} has {len(col)} entries for {len(self.prompts)} prompts")

  def __len__(self) -> int:
    return len(self.prompts)

  def __iter__(self) -> Iterator[str]:
    return iter(self.prompts)

  @overload
  def __getitem__(self, i: int) -> str: ...
  @overload
  def __getitem__(self, i: slice) -> PromptSet: ...
  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.take(range(len(self))[i])
    return self.prompts[i]

  def take(self, indices: Sequence[int]) -> PromptSet:
    """The rows at `indices`, in that order, targets and labels kept aligned."""
    idx = [int(i) for i in indices]
    pick = lambda col: None if col is None else [col[i] for i in idx]
    return PromptSet([self.prompts[i] for i in idx], pick(self.targets), pick(self.labels), self.source,
                     pick(self.behaviors))


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


def _as_tuple(x: str | Sequence[str] | None) -> tuple[str, ...] | None:
  if x is None:
    return None
  return (x,) if isinstance(x, str) else tuple(x)


def _find_field(
  path,
  available: Sequence[str],
  requested: str | None,
  defaults: Sequence[str],
  what: str,
  required: bool = True,
) -> str | None:
  """The column of `available` that is `requested` (exact) or the first default (any case)."""
  if requested is not None:
    if requested in available:
      return requested
    raise ValueError(f"{path}: no {what} column {requested!r}; columns are {list(available)}")
  lower = {a.lower(): a for a in available}
  for d in defaults:
    if d in lower:
      return lower[d]
  if required:
    raise ValueError(
      f"{path}: no {what} column; expected one of {list(defaults)}, columns are {list(available)}"
    )
  return None


def _require(path, available: Sequence[str], expected: Sequence[str], fmt: str) -> None:
  missing = [c for c in expected if c not in available]
  if missing:
    raise ValueError(
      f"{path}: {fmt} format expects columns {list(expected)}, got {list(available)} (missing {missing})"
    )


def _records(path, rows: list[dict], field: str | None, fmt: str) -> PromptSet:
  """Generic list-of-dicts -> PromptSet (prompt / target / label fields found by name)."""
  if not rows:
    return PromptSet([])
  keys = list(dict.fromkeys(k for r in rows for k in r))
  pf = _find_field(path, keys, field, _PROMPT_FIELDS, "prompt")
  tf = _find_field(path, keys, None, _TARGET_FIELDS, "target", required=False)
  lf = _find_field(path, keys, None, _LABEL_FIELDS, "label", required=False)
  prompts = []
  for i, r in enumerate(rows):
    v = r.get(pf)
    if not isinstance(v, str):
      raise ValueError(f"{path}: {fmt} row {i} has no string {pf!r} (got {v!r})")
    prompts.append(v)
  targets = None if tf is None else [r.get(tf) for r in rows]
  labels = None if lf is None else [None if r.get(lf) is None else str(r.get(lf)) for r in rows]
  if labels is not None and all(x is None for x in labels):
    labels = None  # e.g. the refusal-direction harmful splits: every category is null
  return PromptSet(prompts, targets, labels)


def _open_text(path: pathlib.Path):
  """A text handle on `path`, decompressed when the name ends in .gz."""
  if path.suffix.lower() == ".gz":
    return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
  return path.open(encoding="utf-8-sig", newline="")


def _read_text(path: pathlib.Path) -> str:
  with _open_text(path) as f:
    return f.read()


def _load_jailbreakbench(path: pathlib.Path, data: dict) -> PromptSet:
  """A JailbreakBench attack artifact: {"parameters": {...}, "jailbreaks": [{index, goal, behavior,
  category, prompt, response, jailbroken, ...}]}. The attack prompt is the prompt, the goal the behavior."""
  rows = data.get("jailbreaks")
  if not isinstance(rows, list):
    raise ValueError(f"{path}: a JailbreakBench artifact needs a 'jailbreaks' list, got {type(rows).__name__}")
  kept = [r for r in rows if isinstance(r, dict) and isinstance(r.get("prompt"), str)]
  skipped = len(rows) - len(kept)
  if not kept:
    raise PromptError(f"{path}: none of the {len(rows)} jailbreaks has a prompt (all null)")
  for i, r in enumerate(kept):
    if not isinstance(r.get("goal"), str):
      raise ValueError(f"{path}: jailbreak with index {r.get('index', i)} has no string 'goal'")
  method = (data.get("parameters") or {}).get("method", "?")
  note = f" [JailbreakBench {method}: {len(kept)} prompts, {skipped} rows with a null prompt skipped]"
  return PromptSet([r["prompt"] for r in kept], None, [r.get("category") for r in kept], note,
                   [r["goal"] for r in kept])


def _load_json(path: pathlib.Path, field: str | None) -> PromptSet:
  try:
    data = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path}: not valid JSON ({e}); for one JSON object per line use a .jsonl name or format='jsonl'"
    ) from e
  if isinstance(data, dict) and "jailbreaks" in data and "parameters" in data:
    return _load_jailbreakbench(path, data)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of strings or of objects (or a JailbreakBench artifact "
                     f"with 'parameters' and 'jailbreaks'), got {type(data).__name__}")
  if all(isinstance(x, str) for x in data):
    if field is not None:
      raise ValueError(f"{path}: a JSON list of strings has no field {field!r}")
    return PromptSet(list(data))
  if all(isinstance(x, dict) for x in data):
    return _records(path, data, field, "json")
  raise ValueError(f"{path}: expected a JSON list of strings or of objects, got mixed element types")


def _load_jsonl(path: pathlib.Path, field: str | None) -> PromptSet:
  rows = []
  with _open_text(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
      rows.append(row)
  return _records(path, rows, field, "jsonl")


def _read_csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
  with _open_text(path) as f:
    reader = csv.DictReader(f)
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def _csv_flavor(columns: Sequence[str]) -> str:
  if "Behavior" in columns and "FunctionalCategory" in columns:
    return "harmbench"
  if "goal" in columns and "target" in columns:
    return "advbench"
  if "prompt" in columns and "label" in columns and "type" in columns:
    return "xstest"
  if "forbidden_prompt" in columns and "category" in columns:
    return "strongreject"
  return "csv"


def _load_csv(
  path: pathlib.Path, fmt: str, field: str | None, functional_category: tuple[str, ...] | None
) -> PromptSet:
  columns, rows = _read_csv(path)
  if fmt == "csv":
    fmt = _csv_flavor(columns)
  if functional_category is not None and fmt != "harmbench":
    raise ValueError(f"{path}: functional_category filters HarmBench files only (this is {fmt})")
  if fmt == "advbench":
    col = field or "goal"
    _require(path, columns, [col, "target"], "advbench")
    return PromptSet([r[col] for r in rows], [r["target"] for r in rows])
  if fmt == "harmbench":
    col = field or "Behavior"
    _require(path, columns, [col, "FunctionalCategory", "SemanticCategory", "ContextString"], "harmbench")
    if functional_category is not None:
      rows = [r for r in rows if r["FunctionalCategory"] in functional_category]
    prompts = []
    for r in rows:
      context = (r["ContextString"] or "").strip()
      behavior = r[col]
      prompts.append(f"{context}\n\n---\n\n{behavior}" if context else behavior)
    return PromptSet(prompts, None, [r["SemanticCategory"] for r in rows])
  if fmt == "strongreject":
    col = field or "forbidden_prompt"
    _require(path, columns, [col, "category"], "strongreject")
    return PromptSet([r[col] for r in rows], None, [r["category"] for r in rows])
  if fmt == "xstest":
    col = field or "prompt"
    _require(path, columns, [col, "label"], "xstest")
    return PromptSet([r[col] for r in rows], None, [r["label"] for r in rows])
  return _records(path, rows, field, "csv")


def _load_text(path: pathlib.Path) -> PromptSet:
  lines = _read_text(path).splitlines()
  return PromptSet([ln.strip() for ln in lines if ln.strip()])


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
  format: one of FORMATS; None detects it from the extension (.json .jsonl .csv .txt, each optionally
    .gz) and, for CSV, from the header (HarmBench, AdvBench, XSTest, StrongREJECT columns; else
    generic); a JSON object with 'parameters' and 'jailbreaks' is a JailbreakBench artifact.
  field: the prompt field/column, for JSON objects, JSONL and CSV (defaults: see module docstring).
  label: keep only rows whose label is this / one of these (XSTest "safe" / "unsafe", a category,
    a HarmBench SemanticCategory). Error if the file has no labels.
  functional_category: HarmBench only: keep rows whose FunctionalCategory is this / one of these
    ("standard", "contextual", "copyright"); None keeps all.

  Raises FileNotFoundError (names the path), ValueError (unknown format, missing column: names the
  file, expected and actual columns), PromptError (nothing left: names the file and the filters).
  """
  p = resolve_path(path)
  fmt = format
  if fmt is None:
    suffix = (p.with_suffix("") if p.suffix.lower() == ".gz" else p).suffix.lower()
    fmt = _EXTENSIONS.get(suffix)
    if fmt is None:
      raise ValueError(
        f"{p}: unknown prompt file format {suffix!r}; known extensions "
        f"{sorted(_EXTENSIONS)} (optionally .gz), or pass format= one of {FORMATS}"
      )
  elif fmt not in FORMATS:
    raise ValueError(f"unknown prompt file format {fmt!r}; expected one of {FORMATS}")
  fc = _as_tuple(functional_category)
  if fc is not None and fmt not in ("csv", "harmbench"):
    raise ValueError(f"{p}: functional_category filters HarmBench CSV files only (format {fmt})")

  if fmt in ("json", "jailbreakbench"):
    ps = _load_json(p, field)
    if fmt == "jailbreakbench" and ps.behaviors is None:
      raise ValueError(f"{p}: not a JailbreakBench artifact (expected an object with 'parameters' and 'jailbreaks')")
  elif fmt == "jsonl":
    ps = _load_jsonl(p, field)
  elif fmt == "text":
    if field is not None:
      raise ValueError(f"{p}: a text file has no field {field!r}")
    ps = _load_text(p)
  else:
    ps = _load_csv(p, fmt, field, fc)

  filters = []
  if fc is not None:
    filters.append(f"FunctionalCategory in {list(fc)}")
  wanted = _as_tuple(label)
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
