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

Plot helpers (`bar_chart`, `line_chart`, `heatmap`) return matplotlib Figures drawn with the Agg
backend; pass them to `Figure(...)` and `Report.add_section` saves them as PNG and closes them.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import dataclasses
import datetime
import html
import io
import json
import math
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure as mpl_figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

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
  raise TypeError(f"{where}: cannot store {type(x).__name__} in report.json")


def _json_dumps(obj: Any) -> str:
  # allow_nan=False: a stray nan that escaped to_jsonable is a bug, not a "NaN" token in the file.
  return json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


# --- Files ------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
  """Writes `data` to a temp file next to `path`, then renames it over `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
  # os.open with 0o666 honours the umask (tempfile.mkstemp would leave the outputs at 0600).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


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
    html_text = render_html(self.load(), self.workdir)
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


# --- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
 padding:0 1em;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;vertical-align:top}th{background:#f2f2f2;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}caption{caption-side:top;text-align:left;
 font-style:italic;padding-bottom:.3em}
table.kv th{font-weight:normal;font-family:ui-monospace,Menlo,Consolas,monospace}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{font-style:italic;font-size:.92em}
pre{white-space:pre-wrap;word-wrap:break-word;background:#f7f7f7;padding:.5em;margin:.2em 0;
 font-size:.88em}
details{margin:.3em 0}details.example{border:1px solid #ddd;padding:.2em .6em}
summary{cursor:pointer}dl{margin:.3em 0}dt{font-weight:bold;margin-top:.3em}dd{margin-left:1em}
.notes{white-space:pre-wrap}.missing{color:#a00}.muted{color:#777;font-size:.9em}
.card{border:1px solid #ccc;border-radius:6px;padding:.2em 1em .6em;background:#fafafa}
.card h2{margin-top:.4em}.headlines{display:flex;flex-wrap:wrap;gap:.8em}
.headline{flex:1 1 200px;border:1px solid #ddd;border-radius:4px;background:#fff;padding:.5em .7em}
.hl-label{font-size:.85em;color:#555}.hl-value{font-size:1.4em;font-weight:600;margin:.15em 0}
.hl-value .ci{font-size:.6em;font-weight:normal;color:#555}.hl-guide{font-size:.8em;color:#777}
"""

_LONG_TEXT = 80  # example fields longer than this (or multi-line) go in the body, not the summary line


def _esc(x: Any) -> str:
  return html.escape(str(x), quote=True)


def _kv_table(d: Mapping[str, Any], cls: str = "kv") -> str:
  rows = "".join(
    f'<tr><th>{_esc(k)}</th><td{" class=num" if _is_number(v) else ""}>{_esc(format_value(v))}</td></tr>'
    for k, v in d.items())
  return f'<table class="{cls}">{rows}</table>'


def _data_table(name: str, t: Mapping[str, Any]) -> str:
  cap = _esc(t.get("caption") or name)
  head = "".join(f"<th>{_esc(c)}</th>" for c in t.get("columns", []))
  body = "".join(
    "<tr>" + "".join(f'<td{" class=num" if _is_number(v) else ""}>{_esc(format_value(v))}</td>' for v in row)
    + "</tr>" for row in t.get("rows", []))
  return f"<table><caption>{cap}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(workdir: Path, name: str, rel: str, caption: str) -> str:
  try:
    data = (workdir / rel).read_bytes()
  except OSError:
    return f'<p class="missing">missing figure {_esc(name)}: {_esc(rel)}</p>'
  src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
  cap = f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""
  return f'<figure><img src="{src}" alt="{_esc(name)}">{cap}</figure>'


def _example(i: int, ex: Any) -> str:
  if not isinstance(ex, Mapping):
    ex = {"value": ex}
  short, long = [], []
  for k, v in ex.items():
    text = v if isinstance(v, str) else format_value(v)
    (long if (isinstance(v, str) and (len(v) > _LONG_TEXT or "\n" in v)) else short).append((k, text))
  head = " · ".join(f"{_esc(k)}: {_esc(v)}" for k, v in short)
  first_long = next((v for _, v in long), "")
  preview = first_long[:_LONG_TEXT].replace("\n", " ")
  if preview:
    head += (" · " if head else "") + f'<span class="muted">{_esc(preview)}…</span>'
  body = "".join(f"<dt>{_esc(k)}</dt><dd><pre>{_esc(v)}</pre></dd>" for k, v in short + long)
  return f'<details class="example"><summary>#{i} {head}</summary><dl>{body}</dl></details>'


def _headline_value(h: Mapping[str, Any]) -> str:
  v, kind = h.get("value"), h.get("kind", "score")
  if kind == "text" or isinstance(v, str):
    return _esc(format_value(v))
  if not _is_number(v) or v is None or not math.isfinite(float(v)):
    return "n/a"
  fmt = (lambda x: f"{100 * x:.1f}%") if kind == "rate" else (lambda x: f"{x:.3g}")
  out = fmt(float(v))
  lo, hi = h.get("low"), h.get("high")
  if lo is not None and hi is not None:
    out += f' <span class="ci">[{fmt(float(lo))}, {fmt(float(hi))}]</span>'
  return out


def summary_card(report: Mapping[str, Any]) -> str:
  """The card that opens report.html: model, date, and every section's headlines side by side."""
  meta = report.get("meta", {})
  sections = report.get("sections", {})
  cells = []
  for k in ordered_keys(sections):
    for h in sections[k].get("headlines", []) or []:
      cells.append(f'<div class="headline"><div class="hl-label">{_esc(h.get("label", ""))}</div>'
                   f'<div class="hl-value">{_headline_value(h)}</div>'
                   f'<div class="hl-guide">{_esc(h.get("guide", ""))}</div></div>')
  who = " · ".join(_esc(x) for x in (meta.get("model"), meta.get("source"), meta.get("date")) if x)
  body = "".join(cells) if cells else '<p class="muted">no headline numbers yet</p>'
  return (f'<section class="card" id="summary"><h2>Summary</h2><p class="muted">{who}</p>'
          f'<div class="headlines">{body}</div>'
          '<p class="muted">Intervals are 95% (Wilson for rates, bootstrap over prompts otherwise).</p></section>')


def render_html(report: Mapping[str, Any], workdir: str | os.PathLike) -> str:
  """HTML text of a report dict; figures are read from `workdir` and embedded as data URIs.

  Layout: title, the summary card (headline numbers with intervals and reading guides), contents,
  the sections, and at the end a collapsed block with the run's metadata and full configuration.
  """
  workdir = Path(workdir)
  meta = dict(report.get("meta", {}))
  config = meta.pop("config", None)
  sections = report.get("sections", {})
  keys = ordered_keys(sections)
  title = "lvs_jax report" + (f" — {meta['model']}" if meta.get("model") else "")
  out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
         f"<header><h1>{_esc(title)}</h1></header>", summary_card(report)]
  toc = "".join(f'<li><a href="#sec-{_esc(k)}">{_esc(sections[k].get("title") or k)}</a></li>' for k in keys)
  out.append(f'<nav><h2>Contents</h2><ol>{toc}<li><a href="#run">Run metadata and configuration</a></li></ol></nav>')
  for k in keys:
    s = sections[k]
    out.append(f'<section id="sec-{_esc(k)}"><h2>{_esc(s.get("title") or k)}</h2>')
    if s.get("updated"):
      out.append(f'<p class="muted">section "{_esc(k)}", updated {_esc(s["updated"])}</p>')
    if s.get("notes"):
      out.append(f'<p class="notes">{_esc(s["notes"])}</p>')
    if s.get("summary"):
      out.append(f"<h3>Summary</h3>{_kv_table(s['summary'])}")
    for name, t in s.get("tables", {}).items():
      out.append(_data_table(name, t))
    captions = s.get("figure_captions", {})
    for name, rel in s.get("figures", {}).items():
      out.append(_figure(workdir, name, rel, captions.get(name, "")))
    examples = s.get("examples", [])
    if examples:
      out.append(f"<details><summary>Examples ({len(examples)})</summary>")
      out += [_example(i, ex) for i, ex in enumerate(examples)]
      out.append("</details>")
    out.append("</section>")
  out.append('<section id="run"><details><summary>Run metadata and configuration</summary>')
  if meta:
    out.append(_kv_table(meta, "kv meta"))
  if config is not None:
    out.append(f"<pre>{_esc(json.dumps(config, indent=1, ensure_ascii=False))}</pre>")
  out.append("</details></section>")
  out.append("</body></html>")
  return "\n".join(out) + "\n"


# --- Plots -----------------------------------------------------------------------------------


def _yerr(errors: Any, n: int) -> np.ndarray | None:
  """Error bars as matplotlib wants them: [N] symmetric or [2, N] (below, above) half-widths."""
  if errors is None:
    return None
  e = np.asarray(errors, dtype=float)
  if e.shape not in ((n,), (2, n)):
    raise ValueError(f"errors must have shape [{n}] or [2, {n}] (below, above), got {e.shape}")
  return e


def bar_chart(labels: Sequence[str], values: Sequence[float], errors: Any = None, title: str = "",
              ylabel: str = "", ylim: tuple[float, float] | None = (0.0, 1.0)) -> mpl_figure.Figure:
  """Bars with optional error bars; values annotated on the bars.

  Args:
    labels, values: [N].
    errors: None, [N] symmetric half-widths, or [2, N] (below, above) half-widths (e.g. a Wilson
      interval as (rate - lo, hi - rate)); in the units of `values`.
    ylim: y range; the default suits rates in [0, 1]; None autoscales.
  """
  values = np.asarray(values, dtype=float)
  n = len(labels)
  if values.shape != (n,):
    raise ValueError(f"values must have shape [{n}], got {values.shape}")
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * n + 2.0), 3.6))
  bars = ax.bar(np.arange(n), values, yerr=_yerr(errors, n), capsize=3, color="C0")
  ax.bar_label(bars, labels=[f"{v:.3g}" if math.isfinite(v) else "n/a" for v in values], padding=2,
               fontsize=8)
  # Rotate when the labels would not fit side by side (about 9 characters per bar at this width).
  tilt = n > 5 or max(len(str(x)) for x in labels) > 9
  ax.set_xticks(np.arange(n), [str(x) for x in labels], rotation=30 if tilt else 0, ha="right" if tilt else "center")
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return fig


def line_chart(x: Sequence[float], series: Mapping[str, Sequence[float]],
               errors: Mapping[str, Any] | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
               logx: bool = False) -> mpl_figure.Figure:
  """One line per series over a shared x, with optional shaded error bands.

  Args:
    x: [N].
    series: {name: y [N]}.
    errors: {name: [N] symmetric or [2, N] (below, above) half-widths}; series without an entry get
      no band.
    logx: log-scale x axis (e.g. for perturbation magnitudes).
  """
  x = np.asarray(x, dtype=float)
  n = len(x)
  fig, ax = plt.subplots(figsize=(6.0, 3.8))
  for name, y in series.items():
    y = np.asarray(y, dtype=float)
    if y.shape != (n,):
      raise ValueError(f"series {name!r} must have shape [{n}], got {y.shape}")
    (line,) = ax.plot(x, y, marker="o", markersize=3, label=str(name))
    e = _yerr((errors or {}).get(name), n)
    if e is not None:
      lo, hi = (e, e) if e.ndim == 1 else (e[0], e[1])
      ax.fill_between(x, y - lo, y + hi, color=line.get_color(), alpha=0.2, linewidth=0)
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def heatmap(matrix: Any, xlabels: Sequence[str], ylabels: Sequence[str], title: str = "",
            cbar_label: str = "", vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis",
            annotate: bool | None = None) -> mpl_figure.Figure:
  """A [len(ylabels), len(xlabels)] matrix as colored cells (row i at y = ylabels[i], top first).

  Args:
    annotate: write each value in its cell; default when the matrix has at most 20 x 20 cells.
    vmin, vmax: color range; default the data range. nan cells are left blank.
  """
  m = np.asarray(matrix, dtype=float)
  if m.shape != (len(ylabels), len(xlabels)):
    raise ValueError(f"matrix must have shape [{len(ylabels)}, {len(xlabels)}], got {m.shape}")
  rows, cols = m.shape
  size = (min(14.0, max(4.5, 0.5 * cols + 2.5)), min(12.0, max(3.5, 0.4 * rows + 1.5)))  # inches
  fig, ax = plt.subplots(figsize=size)
  im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
  fig.colorbar(im, ax=ax, label=cbar_label)
  ax.set_xticks(np.arange(cols), [str(s) for s in xlabels], rotation=45 if cols > 8 else 0,
                ha="right" if cols > 8 else "center")
  ax.set_yticks(np.arange(rows), [str(s) for s in ylabels])
  ax.set_title(title)
  if annotate if annotate is not None else (rows <= 20 and cols <= 20):
    lo, hi = im.get_clim()
    mid = (lo + hi) / 2
    for i in range(rows):
      for j in range(cols):
        if math.isfinite(m[i, j]):
          ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=7,
                  color="black" if m[i, j] > mid else "white")
  fig.tight_layout()
  return fig
