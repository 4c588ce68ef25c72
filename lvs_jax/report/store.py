"""One mergeable, re-renderable report per `--workdir`: report.json, CSV tables, PNG figures, report.html.

Several experiments write into the same workdir over time (`experiments/audit.py` the behavioral
section, `experiments/lvs.py` later an "lvs" section, ...). Each adds a `Section`; the report keeps
every other section and replaces one with the same key. Layout under the workdir:

  report.json                        {"meta": {...}, "sections": {key: record}}  (the source of truth)
  tables/<section>_<table>.csv       one CSV per table (header row = columns)
  figures/<section>_<figure>.png     one PNG per figure
  report.html                        rendered from report.json by `Report.render_html`; self-contained

A section record in report.json is
  {"title": str, "summary": {name: value}, "tables": {name: {"columns", "rows", "caption", "csv"}},
   "figures": {name: "figures/<section>_<name>.png"}, "figure_captions": {name: str},
   "examples": [dict, ...], "notes": str, "updated": ISO-8601 UTC time}
with paths relative to the workdir (POSIX separators).

Non-finite floats (nan, +inf, -inf) are written to report.json as `null`, so the file is strict
JSON that any reader (jq, JavaScript, pandas) accepts; the cost is that nan and inf are not told
apart there. The CSV tables keep them as "nan", "inf", "-inf" (which `float()` and pandas parse).
The HTML and `print_summary` render null and non-finite values as "n/a".

Writes are atomic (temp file in the same directory, then `os.replace`), and the read-modify-write of
report.json holds an advisory lock (`fcntl.flock` on `<workdir>/.report.lock`, where available), so
two experiments finishing at once on one workdir do not drop each other's sections.

This module holds the data side (the report records, load/merge, JSON and CSV); `report.html`
renders report.html and the summary card, and `report.charts` draws the figures (`bar_chart`,
`line_chart`, `heatmap`): pass them to `Figure(...)` and `Report.add_section` saves them as PNG and
closes them.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure as mpl_figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lvs_jax.io import files  # noqa: E402
from lvs_jax.io.files import to_jsonable  # noqa: E402

try:
  import fcntl
except ImportError:  # not POSIX: no cross-process lock, the atomic replace still holds.
  fcntl = None

# Sections render (HTML, print_summary) in this order, then any others sorted by key.
PREFERRED_ORDER: tuple[str, ...] = ("behavior", "lvs", "drift", "geometry", "training")

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
TABLES_DIR = "tables"
FIGURES_DIR = "figures"
FIGURE_DPI = 120

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Scalar = str | int | float | bool | None


class ReportError(ValueError):
  """report.json exists but cannot be used (not JSON, or not a report). The message names the file."""


# --- Contents ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Table:
  """A table: `rows[i][j]` is the value of column `columns[j]`; cells are str/int/float/bool/None.

  numpy scalars are accepted and stored as Python scalars. Written to
  `tables/<section>_<name>.csv` and kept (as JSON) in report.json.
  """

  name: str
  columns: list[str]
  rows: list[list[Any] | tuple[Any, ...]]
  caption: str = ""


@dataclasses.dataclass
class Figure:
  """A figure: a matplotlib Figure (saved as PNG at FIGURE_DPI, then closed) or a path to a PNG file.

  Saved to `figures/<section>_<name>.png`.
  """

  name: str
  figure: mpl_figure.Figure | str | os.PathLike
  caption: str = ""


@dataclasses.dataclass
class Headline:
  """One number of the report's summary card: the value with its interval and how to read it.

  kind: "rate" (a fraction in [0, 1], shown as a percentage), "score" (shown as a number) or
  "text" (value is a string, no interval). low, high: the interval (same units), or None.
  guide: one line that tells a reader which way is good ("higher is safer").
  """

  label: str
  value: Any
  low: float | None = None
  high: float | None = None
  guide: str = ""
  kind: str = "score"


@dataclasses.dataclass
class Section:
  """One experiment's part of the report.

  Attributes:
    key: identifier, also the file-name prefix and the HTML anchor ("behavior", "lvs", ...).
    title: human-readable heading.
    summary: headline numbers {name: value}; state units in the name or the notes (e.g.
      "refusal_rate" is a fraction in [0, 1], "drift_cos" a cosine).
    tables, figures: see `Table`, `Figure`; names must be unique within the section.
    examples: rows shown in collapsible blocks, e.g. {"prompt", "completion", "refused"}.
    notes: free text (method, caveats), shown as preformatted text.
    headlines: the section's numbers for the summary card at the top of report.html.
  """

  key: str
  title: str
  summary: dict[str, Scalar] = dataclasses.field(default_factory=dict)
  tables: list[Table] = dataclasses.field(default_factory=list)
  figures: list[Figure] = dataclasses.field(default_factory=list)
  examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  notes: str = ""
  headlines: list[Headline] = dataclasses.field(default_factory=list)


# --- JSON conversion -----------------------------------------------------------------------------


# to_jsonable: one copy, in lvs_jax.io.files (imported above).


def _json_dumps(obj: Any) -> str:
  # allow_nan=False: a stray nan that escaped to_jsonable is a bug, not a "NaN" token in the file.
  return json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


# --- Files ------------------------------------------------------------------------------------


_atomic_write = files.atomic_write_bytes  # temp file next to the target, fsync, rename


@contextlib.contextmanager
def _locked(workdir: Path) -> Iterator[None]:
  """Holds an exclusive advisory lock on the workdir's report for a read-modify-write."""
  workdir.mkdir(parents=True, exist_ok=True)
  if fcntl is None:
    yield
    return
  with open(workdir / ".report.lock", "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _csv_cell(v: Any) -> str:
  """CSV text of a table cell: None -> "", floats as the shortest round-trip repr ("nan", "inf")."""
  if isinstance(v, np.generic):
    v = v.item()
  if v is None:
    return ""
  if isinstance(v, float):
    return repr(v)
  return str(v)


def _table_csv(table: Table) -> bytes:
  buf = io.StringIO()
  w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
  w.writerow([str(c) for c in table.columns])
  for row in table.rows:
    w.writerow([_csv_cell(v) for v in row])
  return buf.getvalue().encode("utf-8")


def _png_bytes(fig: mpl_figure.Figure | str | os.PathLike, where: str) -> bytes:
  """PNG bytes of a matplotlib Figure (which is then closed) or of a PNG file."""
  if isinstance(fig, mpl_figure.Figure):
    buf = io.BytesIO()
    try:
      # Software=None keeps matplotlib's URL out of the file and the bytes reproducible.
      fig.savefig(buf, format="png", dpi=FIGURE_DPI, bbox_inches="tight", metadata={"Software": None})
    finally:
      plt.close(fig)
    return buf.getvalue()
  data = Path(fig).read_bytes()
  if not data.startswith(PNG_MAGIC):
    raise ValueError(f"{where}: {fig} is not a PNG file")
  return data


def git_commit(path: str | os.PathLike | None = None) -> str | None:
  """HEAD of the git checkout containing `path` (default: this package), "+dirty" if it has
  uncommitted changes or untracked, non-ignored files; None outside git or without a git binary."""
  cwd = Path(path) if path is not None else Path(__file__).resolve().parent
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                          timeout=10, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip())
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("+dirty" if dirty else "") if head else None


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- Report ------------------------------------------------------------------------------------


def _empty_report() -> dict[str, Any]:
  return {"meta": {}, "sections": {}}


def load_report(workdir: str | os.PathLike) -> dict[str, Any]:
  """Reads `<workdir>/report.json` -> {"meta": dict, "sections": {key: record}}.

  Raises FileNotFoundError if it does not exist and ReportError (naming the file) if it is not valid
  JSON or not a report.
  """
  path = Path(workdir) / REPORT_JSON
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise FileNotFoundError(f"no report at {path}") from None
  except UnicodeDecodeError as e:
    raise ReportError(f"{path}: corrupt report (not UTF-8: {e}); fix or delete it") from e
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ReportError(f"{path}: corrupt report (invalid JSON: {e.msg} at line {e.lineno} column {e.colno}); "
                      "fix or delete it") from e
  if not (isinstance(data, dict) and isinstance(data.get("sections", {}), dict)
          and isinstance(data.get("meta", {}), dict)):
    raise ReportError(f"{path}: not a report (expected an object with 'meta' and 'sections' objects)")
  data.setdefault("meta", {})
  data.setdefault("sections", {})
  return data


def ordered_keys(sections: Mapping[str, Any]) -> list[str]:
  """Section keys in PREFERRED_ORDER first, then the rest sorted."""
  first = [k for k in PREFERRED_ORDER if k in sections]
  return first + sorted(k for k in sections if k not in PREFERRED_ORDER)


class Report:
  """The report of one workdir. Holds no state but the path: every call re-reads report.json."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = Path(workdir)

  @property
  def json_path(self) -> Path:
    return self.workdir / REPORT_JSON

  @property
  def html_path(self) -> Path:
    return self.workdir / REPORT_HTML

  def load(self) -> dict[str, Any]:
    """The current report.json contents; an empty report if there is none yet."""
    try:
      return load_report(self.workdir)
    except FileNotFoundError:
      return _empty_report()

  def _update(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    with _locked(self.workdir):
      data = self.load()
      fn(data)
      _atomic_write(self.json_path, _json_dumps(data).encode("utf-8"))
    return data

  def set_meta(self, **kv: Any) -> dict[str, Any]:
    """Merges `kv` (model, source, dtype, ...) into the report's meta; returns the new meta.

    Also sets `date` (now, UTC), `lvs_jax_version` and `git_commit` (when in a git checkout) unless
    given. A value of None removes that key.
    """
    from lvs_jax import __version__

    new = to_jsonable(kv, "meta")  # the caller's keys first: they lead the HTML header
    for k, v in (("date", _now()), ("lvs_jax_version", __version__), ("git_commit", git_commit())):
      if v is not None and k not in new:
        new[k] = v

    def fn(data):
      data["meta"].update(new)
      for k in [k for k, v in data["meta"].items() if v is None]:
        del data["meta"][k]

    return self._update(fn)["meta"]

  def add_section(self, section: Section) -> dict[str, Any]:
    """Writes the section's CSVs and PNGs and puts its record into report.json (replacing a section
    with the same key, keeping all others). Returns the record. Figures are closed after saving.

    Files of a replaced section that the new version no longer has are deleted.
    """
    key = _check_name(section.key, "section key")
    planned = _planned_paths(section)
    with _locked(self.workdir):
      data = self.load()  # before writing anything: a corrupt report.json stops here, untouched
      owned = {p: k for k, s in data["sections"].items() if k != key for p in _record_paths(s)}
      clash = [p for p in planned if p in owned]
      if clash:
        raise ValueError(f"section {key!r}: {clash[0]} already belongs to section {owned[clash[0]]!r}")
      rec = self._write_files(section)
      old = data["sections"].get(key)
      data["sections"][key] = rec
      _atomic_write(self.json_path, _json_dumps(data).encode("utf-8"))
      if old:
        for p in set(_record_paths(old)) - set(_record_paths(rec)):
          with contextlib.suppress(OSError):
            (self.workdir / p).unlink()
    return rec

  def _write_files(self, section: Section) -> dict[str, Any]:
    key = section.key
    # Everything that can reject the section is checked before the first file is written.
    tables: dict[str, Any] = {}
    for t in section.tables:
      where = f"section {key!r}, table {t.name!r}"
      columns = [str(c) for c in t.columns]
      for i, row in enumerate(t.rows):
        if len(row) != len(columns):
          raise ValueError(f"{where}: row {i} has {len(row)} cells, expected {len(columns)} ({columns})")
      tables[t.name] = {"columns": columns, "rows": to_jsonable(list(t.rows), where), "caption": t.caption,
                        "csv": f"{TABLES_DIR}/{key}_{t.name}.csv"}
    rec = {
      "title": section.title,
      "summary": to_jsonable(dict(section.summary), f"section {key!r} summary"),
      "tables": tables,
      "figures": {f.name: f"{FIGURES_DIR}/{key}_{f.name}.png" for f in section.figures},
      "figure_captions": {f.name: f.caption for f in section.figures},
      "examples": to_jsonable(list(section.examples), f"section {key!r} examples"),
      "notes": section.notes,
      "headlines": to_jsonable([dataclasses.asdict(h) for h in section.headlines], f"section {key!r} headlines"),
      "updated": _now(),
    }
    for t in section.tables:
      _atomic_write(self.workdir / tables[t.name]["csv"], _table_csv(t))
    for f in section.figures:
      png = _png_bytes(f.figure, f"section {key!r}, figure {f.name!r}")
      _atomic_write(self.workdir / rec["figures"][f.name], png)
    return rec

  def render_html(self) -> Path:
    """Writes report.html (self-contained: inline CSS, PNGs as base64 data URIs, no scripts or
    external URLs) from report.json and returns its path."""
    from lvs_jax.report import html as html_lib  # html imports this module: import at call time

    html_text = html_lib.render_html(self.load(), self.workdir)
    _atomic_write(self.html_path, html_text.encode("utf-8"))
    return self.html_path


def _check_name(name: str, what: str) -> str:
  if not isinstance(name, str) or not _NAME_RE.match(name):
    raise ValueError(f"{what}: {name!r} must match {_NAME_RE.pattern} (it becomes a file name)")
  return name


def _planned_paths(section: Section) -> list[str]:
  """Workdir-relative files `add_section` will write for `section`; validates names on the way."""
  tables = [_check_name(t.name, f"section {section.key!r}, table") for t in section.tables]
  figures = [_check_name(f.name, f"section {section.key!r}, figure") for f in section.figures]
  for kind, names in (("table", tables), ("figure", figures)):
    dup = {n for n in names if names.count(n) > 1}
    if dup:
      raise ValueError(f"section {section.key!r}: duplicate {kind} name(s) {sorted(dup)}")
  return ([f"{TABLES_DIR}/{section.key}_{n}.csv" for n in tables]
          + [f"{FIGURES_DIR}/{section.key}_{n}.png" for n in figures])


def _record_paths(rec: Mapping[str, Any]) -> list[str]:
  """Workdir-relative files a section record owns."""
  tabs = [t["csv"] for t in rec.get("tables", {}).values() if isinstance(t, dict) and "csv" in t]
  return tabs + [p for p in rec.get("figures", {}).values() if isinstance(p, str)]


# --- Formatting ----------------------------------------------------------------------------------


def format_value(v: Any) -> str:
  """Display text of a value: floats to 4 significant digits, None/nan/inf as "n/a"."""
  if isinstance(v, np.generic):
    v = v.item()
  if v is None:
    return "n/a"
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, float):
    return f"{v:.4g}" if math.isfinite(v) else "n/a"
  if isinstance(v, (list, dict)):
    return json.dumps(v, ensure_ascii=False)
  return str(v)


def _is_number(v: Any) -> bool:
  return v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))


def print_summary(report: Mapping[str, Any] | str | os.PathLike) -> str:
  """Compact plain text of every section's summary (a report dict, or a workdir to load it from)."""
  if not isinstance(report, Mapping):
    report = load_report(report)
  sections = report.get("sections", {})
  lines = []
  for key in ordered_keys(sections):
    s = sections[key]
    lines.append(f"[{key}] {s.get('title', '')}".rstrip())
    summary = s.get("summary", {})
    width = max((len(k) for k in summary), default=0)
    lines += [f"  {k:<{width}}  {format_value(v)}" for k, v in summary.items()]
  return "\n".join(lines)
