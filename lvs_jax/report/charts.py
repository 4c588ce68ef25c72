"""Plot helpers for report sections: `bar_chart`, `line_chart`, `heatmap`, `scatter_chart`.

Each returns a matplotlib Figure drawn with the Agg backend (no display needed); pass it to
`store.Figure(...)` and `store.Report.add_section` saves it as PNG and closes it. Non-finite values
are drawn as gaps (lines), "n/a" labels (bars), blank cells (heatmaps) or listed as not drawn (scatter).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure as mpl_figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _yerr(errors: Any, n: int) -> np.ndarray | None:
  """Error bars as matplotlib wants them: [N] symmetric or [2, N] (below, above) half-widths."""
  if errors is None:
    return None
  e = np.asarray(errors, dtype=float)
  if e.shape not in ((n,), (2, n)):
    raise ValueError(f"errors must have shape [{n}] or [2, {n}] (below, above), got {e.shape}")
  if e.ndim == 2 and (e.sum(0) < -1e-9).any():  # below + above = hi - lo
    j = int(np.nanargmin(e.sum(0)))
    raise ValueError(f"error bars must be half-widths >= 0 of an interval lo <= hi; point {j} has hi - lo = "
                     f"{e[:, j].sum():.3g} (an inverted interval?)")
  if e.ndim == 1 and (e < -1e-9).any():
    raise ValueError(f"error bars must be half-widths >= 0, got {np.nanmin(e):.3g}")
  # A one-sided negative half-width is a point outside its own interval: a percentile bootstrap of a biased
  # statistic (|cos|) can exclude the point estimate, and a Wilson bound at 0 or 1 can miss its rate by ~1e-17.
  # Matplotlib rejects negatives, so that side is drawn as 0; NaN (an undefined value) draws no bar.
  return np.nan_to_num(np.maximum(e, 0.0), nan=0.0)


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


def line_chart(x: Sequence[float] | None, series: Mapping[str, Any],
               errors: Mapping[str, Any] | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
               logx: bool = False, *, hline: float | None = None, xmin: float | None = None,
               group_styles: bool = False) -> mpl_figure.Figure:
  """One line per series, with optional shaded error bands.

  Args:
    x: [N] shared by every series, or None when each series brings its own x (see `series`).
    series: {name: y [N]} over the shared x, or (x=None) {name: (x [N_i], y [N_i])}.
    errors: {name: [N] symmetric or [2, N] (below, above) half-widths}; series without an entry get
      no band.
    logx: log-scale x axis (e.g. for perturbation magnitudes); points at x <= 0 are not drawn.
    hline: a dotted grey reference line at this y (e.g. chance, or a clean baseline).
    xmin: points left of xmin are not drawn.
    group_styles: series named "<group> / <variant>" get one color per group and one line style per
      variant (e.g. "isotropic / logreg" and "isotropic / mlp" share a color).
  """
  fig, ax = plt.subplots(figsize=(6.0, 3.8))
  groups, variants, styles = {}, {}, ("-", "--", ":", "-.")
  for name, y in series.items():
    xs, y = (np.asarray(x, dtype=float), np.asarray(y, dtype=float)) if x is not None else \
        (np.asarray(y[0], dtype=float), np.asarray(y[1], dtype=float))
    n = len(xs)
    if y.shape != (n,):
      raise ValueError(f"series {name!r} must have shape [{n}] (its x), got {y.shape}")
    keep = (xs > 0 if logx else np.ones(n, bool)) & (xs >= (-np.inf if xmin is None else xmin))
    style = {}
    if group_styles:
      group, _, variant = str(name).partition(" / ")
      style = dict(color=groups.setdefault(group, f"C{len(groups) % 10}"),
                   linestyle=variants.setdefault(variant, styles[len(variants) % len(styles)]))
    (line,) = ax.plot(xs[keep], y[keep], marker="o", markersize=3, label=str(name), **style)
    e = _yerr((errors or {}).get(name), n)
    if e is not None:
      lo, hi = (e, e) if e.ndim == 1 else (e[0], e[1])
      ax.fill_between(xs[keep], (y - lo)[keep], (y + hi)[keep], color=line.get_color(), alpha=0.2, linewidth=0)
  if hline is not None:
    ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=8 if len(series) <= 6 else 7, ncol=1 if len(series) <= 6 else 2)
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


def scatter_chart(points: Mapping[str, tuple[float, float]], xerr: Mapping[str, Any] | None = None,
                  yerr: Mapping[str, Any] | None = None, xlabel: str = "", ylabel: str = "", title: str = "",
                  xlim: tuple[float, float] | None = (0.0, 1.0),
                  ylim: tuple[float, float] | None = (0.0, 1.0)) -> mpl_figure.Figure:
  """One labelled point per entry, with error bars on both axes (e.g. one model per point).

  Args:
    points: {label: (x, y)}; a point with a non-finite coordinate is not drawn and is named in a note.
    xerr, yerr: {label: [2] (below, above) half-widths, or one symmetric half-width}; labels without an
      entry, and non-finite half-widths, get no bar.
    xlim, ylim: axis ranges; the defaults suit rates and scores in [0, 1]; None autoscales.
  """
  def bar(e):
    if e is None:
      return None
    a = np.asarray(e, dtype=float).reshape(-1)
    if a.size not in (1, 2):
      raise ValueError(f"an error bar is one half-width or (below, above), got {a.size} values")
    return np.clip(np.nan_to_num(a, nan=0.0, posinf=0.0), 0.0, None).reshape(-1, 1)

  fig, ax = plt.subplots(figsize=(6.0, 4.6))
  skipped = []
  for i, (label, (x, y)) in enumerate(points.items()):
    if not (math.isfinite(x) and math.isfinite(y)):
      skipped.append(str(label))
      continue
    ax.errorbar([x], [y], xerr=bar((xerr or {}).get(label)), yerr=bar((yerr or {}).get(label)), fmt="o",
                color=f"C{i % 10}", capsize=3, label=str(label))
    ax.annotate(str(label), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
  if skipped:
    ax.text(0.01, 0.01, "not drawn (not measured): " + ", ".join(skipped), transform=ax.transAxes, fontsize=7,
            color="grey")
  if xlim is not None:
    ax.set_xlim(*xlim)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig
