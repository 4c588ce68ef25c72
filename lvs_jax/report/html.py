"""report.html: the self-contained HTML view of a report dict (see `store` for the report.json layout).

`render_html(report, workdir)` returns the page: title, the summary card (`summary_card`: every
section's headline numbers with intervals and reading guides), contents, the sections (notes, summary,
tables, figures embedded as base64 PNG data URIs, collapsible examples), and a collapsed block with
the run's metadata and configuration. Inline CSS, no scripts, no external URLs. None and non-finite
values render as "n/a" (`store.format_value`). `store.Report.render_html` writes it to the workdir.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lvs_jax.report.store import _is_number, format_value, ordered_keys

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
