"""Prompt-file formats: one reader per public format, each returning a `PromptSet`.

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

`read(path, fmt, field, functional_category)` dispatches on a format name; `detect_format(path)` names
the format from the extension. `datasets.load_prompts` finds the file, calls these and applies the filters.
Files ending in `.gz` are read decompressed (the format comes from the name before `.gz`).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import overload

from lvs_jax.core.tokenizer import PromptError

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


# --- Loading ------------------------------------------------------------------------------------


def as_tuple(x: str | Sequence[str] | None) -> tuple[str, ...] | None:
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


def detect_format(path: pathlib.Path) -> str:
  """The format named by the file extension (.json .jsonl .csv .txt, each optionally .gz)."""
  suffix = (path.with_suffix("") if path.suffix.lower() == ".gz" else path).suffix.lower()
  fmt = _EXTENSIONS.get(suffix)
  if fmt is None:
    raise ValueError(
      f"{path}: unknown prompt file format {suffix!r}; known extensions "
      f"{sorted(_EXTENSIONS)} (optionally .gz), or pass format= one of {FORMATS}"
    )
  return fmt


def read(path: pathlib.Path, fmt: str, field: str | None, functional_category: tuple[str, ...] | None) -> PromptSet:
  """All rows of the prompt file `path` in format `fmt` (one of FORMATS; "csv" also detects the CSV
  flavor from the header). Filters other than HarmBench's FunctionalCategory are the caller's."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown prompt file format {fmt!r}; expected one of {FORMATS}")
  if functional_category is not None and fmt not in ("csv", "harmbench"):
    raise ValueError(f"{path}: functional_category filters HarmBench CSV files only (format {fmt})")
  if fmt in ("json", "jailbreakbench"):
    ps = _load_json(path, field)
    if fmt == "jailbreakbench" and ps.behaviors is None:
      raise ValueError(f"{path}: not a JailbreakBench artifact (expected an object with 'parameters' and 'jailbreaks')")
    return ps
  if fmt == "jsonl":
    return _load_jsonl(path, field)
  if fmt == "text":
    if field is not None:
      raise ValueError(f"{path}: a text file has no field {field!r}")
    return _load_text(path)
  return _load_csv(path, fmt, field, functional_category)
