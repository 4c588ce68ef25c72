"""Report: merging sections, CSV/JSON round trips, non-finite values, self-contained HTML, plots."""

import base64
import csv
import json
import math
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lvs_jax.report import charts
from lvs_jax.report import store as rep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strict_json(path):
  """Parses `path`, failing on the non-standard NaN/Infinity tokens Python's json would accept."""

  def bad(tok):
    raise AssertionError(f"non-standard JSON token {tok} in {path}")

  return json.loads(path.read_text(encoding="utf-8"), parse_constant=bad)


def _behavior(rate=0.9, tables=("rates",)):
  return rep.Section(
    key="behavior", title="Behavioral refusal audit", summary={"refusal_rate": rate, "n_prompts": 64},
    tables=[rep.Table(t, ["split", "rate"], [["harmful", rate], ["harmless", 0.05]]) for t in tables])


def test_replacing_a_section_keeps_the_others(tmp_path):
  r = rep.Report(tmp_path)
  r.add_section(_behavior(0.9, tables=("rates", "old_only")))
  r.add_section(rep.Section("lvs", "Latent vulnerability", summary={"lvs": 1.5},
                            tables=[rep.Table("per_layer", ["layer", "lvs"], [[0, 1.0], [1, 2.0]])]))
  assert (tmp_path / "tables" / "behavior_old_only.csv").exists()

  r.add_section(_behavior(0.5))
  data = rep.load_report(tmp_path)
  assert list(data["sections"]) == ["behavior", "lvs"]
  assert data["sections"]["behavior"]["summary"]["refusal_rate"] == 0.5
  assert set(data["sections"]["behavior"]["tables"]) == {"rates"}
  assert data["sections"]["lvs"]["summary"] == {"lvs": 1.5}
  assert data["sections"]["lvs"]["tables"]["per_layer"]["rows"] == [[0, 1.0], [1, 2.0]]
  assert (tmp_path / "tables" / "lvs_per_layer.csv").exists()
  # The replaced section's table that the new version lacks is gone, not left stale.
  assert not (tmp_path / "tables" / "behavior_old_only.csv").exists()
  # A fresh Report object (a later experiment) merges into the same file.
  rep.Report(tmp_path).add_section(rep.Section("drift", "Embedding drift", summary={"cos": 0.99}))
  assert set(rep.load_report(tmp_path)["sections"]) == {"behavior", "lvs", "drift"}
  assert not list(tmp_path.rglob("*.tmp")), "atomic writes must not leave temp files behind"


def test_concurrent_writers_do_not_drop_sections(tmp_path):
  # Four processes each add five sections to one workdir at the same time; the lock keeps them all.
  code = ("import sys; from lvs_jax.report import store as rep; r = rep.Report(sys.argv[1])\n"
          "for i in range(5): r.add_section(rep.Section(f'p{sys.argv[2]}_{i}', 't', summary={'i': i}))")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(p)]) for p in range(4)]
  assert [p.wait(timeout=120) for p in procs] == [0] * 4
  assert len(rep.load_report(tmp_path)["sections"]) == 20


def test_csv_round_trip(tmp_path):
  rows = [
    ["plain", 1, 0.25, True, None],
    ['has "quotes", and commas', -3, 1e-12, False, "x"],
    ["multi\nline\r\ntext", 0, float("nan"), False, "<script>"],
    ["unicode: é ✓ 中文", np.int64(7), np.float32(0.5), np.bool_(True), float("-inf")],
  ]
  rep.Report(tmp_path).add_section(rep.Section("behavior", "B", tables=[rep.Table("t", list("abcde"), rows)]))
  with open(tmp_path / "tables" / "behavior_t.csv", newline="", encoding="utf-8") as f:
    got = list(csv.reader(f))
  assert got[0] == list("abcde")
  assert got[1:] == [[rep._csv_cell(v) for v in row] for row in rows]
  assert got[3][0] == "multi\nline\r\ntext"
  assert got[3][2] == "nan" and got[4][4] == "-inf" and got[4][1] == "7"
  # Floats are written at full precision: float(cell) gives the value back.
  assert float(got[2][2]) == 1e-12 and float(got[4][2]) == 0.5


def test_json_is_strict_and_nonfinite_become_null(tmp_path):
  r = rep.Report(tmp_path)
  r.set_meta(model="tiny", dtype="float32")
  r.add_section(rep.Section(
    "behavior", "B", summary={"nan": float("nan"), "inf": np.float32("inf"), "n": np.int64(3), "ok": 0.5},
    tables=[rep.Table("t", ["x"], [[float("nan")], [np.float64(2.0)]])],
    examples=[{"prompt": "p", "score": float("-inf"), "refused": np.bool_(False)}]))
  data = _strict_json(tmp_path / "report.json")
  s = data["sections"]["behavior"]
  assert s["summary"] == {"nan": None, "inf": None, "n": 3, "ok": 0.5}
  assert s["tables"]["t"]["rows"] == [[None], [2.0]]
  assert s["examples"] == [{"prompt": "p", "score": None, "refused": False}]
  assert data["meta"]["model"] == "tiny" and "date" in data["meta"] and "lvs_jax_version" in data["meta"]
  assert "n/a" in rep.print_summary(data)
  with pytest.raises(TypeError, match="summary"):
    r.add_section(rep.Section("behavior", "B", summary={"bad": object()}))


def test_html_is_self_contained_and_escaped(tmp_path):
  r = rep.Report(tmp_path)
  r.set_meta(model="tiny <b>model</b>", source="hub")
  fig = charts.bar_chart(["harmful", "harmless"], [0.9, 0.1], errors=[[0.05, 0.02], [0.04, 0.06]],
                      title="refusal")
  # Added in reverse of the preferred order: the HTML must still show behavior, lvs, then others.
  r.add_section(rep.Section("zzz_custom", "Custom", summary={"x": 1}))
  r.add_section(rep.Section("lvs", "LVS", summary={"lvs": 0.123456789}))
  r.add_section(rep.Section(
    "behavior", "Behavior", summary={"rate": float("nan")},
    figures=[rep.Figure("rates", fig, "caption & co")],
    examples=[{"prompt": "say <script>alert('x')</script>", "completion": "I can't & won't\n" * 10,
               "refused": True}],
    notes="</section><script>bad()</script>"))
  out = r.render_html()
  text = out.read_text(encoding="utf-8")

  m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
  assert m, "figure not embedded as a data URI"
  assert base64.b64decode(m.group(1)) == (tmp_path / "figures" / "behavior_rates.png").read_bytes()
  assert "http://" not in text and "https://" not in text
  assert "<script" not in text.lower()
  assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
  assert "&lt;b&gt;model&lt;/b&gt;" in text and "caption &amp; co" in text
  assert "<details" in text and "0.1235" in text and "n/a" in text
  assert text.index('id="sec-behavior"') < text.index('id="sec-lvs"') < text.index('id="sec-zzz_custom"')
  assert not plt.get_fignums(), "add_section must close the figures it saves"


def test_summary_card_first_and_config_collapsed_last(tmp_path):
  r = rep.Report(tmp_path)
  r.set_meta(model="m", config={"deep": {"knob": 12345}})
  r.add_section(rep.Section("lvs", "LVS", headlines=[
    rep.Headline("LVS (mean over layers)", 0.6712, 0.61, 0.72, "0 = unbreakable"),
    rep.Headline("LVS", "not measured", kind="text")]))
  r.add_section(rep.Section("behavior", "Behavior", headlines=[
    rep.Headline("Refusal on harmful prompts", 0.923, 0.797, 0.973, "higher is safer", "rate")]))
  text = r.render_html().read_text(encoding="utf-8")
  card = text[text.index('id="summary"'):text.index("<nav>")]
  # Behavior before LVS (the preferred order), each with its interval and guide.
  assert card.index("Refusal on harmful prompts") < card.index("LVS (mean over layers)")
  assert "92.3%" in card and "[79.7%, 97.3%]" in card and "higher is safer" in card
  assert "0.671" in card and "[0.61, 0.72]" in card and "not measured" in card
  # The config is not above the sections any more: it is in the last, collapsed block.
  assert text.index("12345") > text.index('id="sec-lvs"')
  run = text[text.index('<section id="run">'):]
  assert run.startswith('<section id="run"><details><summary>') and "12345" in run
  assert rep.load_report(tmp_path)["sections"]["behavior"]["headlines"][0]["low"] == 0.797


def test_corrupt_report_gives_clear_error_and_is_not_overwritten(tmp_path):
  bad = '{"meta": {}, "sections": {"behavior": '
  (tmp_path / "report.json").write_text(bad)
  with pytest.raises(rep.ReportError, match=re.escape(str(tmp_path / "report.json"))):
    rep.load_report(tmp_path)
  with pytest.raises(rep.ReportError, match="corrupt"):
    rep.Report(tmp_path).add_section(rep.Section("lvs", "LVS"))
  assert (tmp_path / "report.json").read_text() == bad
  (tmp_path / "report.json").write_text("[1, 2]")
  with pytest.raises(rep.ReportError, match="not a report"):
    rep.load_report(tmp_path)
  with pytest.raises(FileNotFoundError, match="no report"):
    rep.load_report(tmp_path / "empty")


def test_plots_write_png_files(tmp_path):
  figs = [
    rep.Figure("bar", charts.bar_chart(list("abcdefg"), np.linspace(0, 1, 7), errors=np.full(7, 0.05))),
    rep.Figure("line", charts.line_chart([0.1, 1, 10], {"a": [1, 2, 3], "b": [3, float("nan"), 1]},
                                      errors={"a": [0.1, 0.2, 0.1]}, xlabel="eps", ylabel="rate", logx=True)),
    rep.Figure("heat", charts.heatmap(np.arange(12.0).reshape(3, 4), list("wxyz"), ["l0", "l1", "l2"],
                                   title="sweep", cbar_label="refusal")),
  ]
  rec = rep.Report(tmp_path).add_section(rep.Section("geometry", "G", figures=figs))
  assert rec["figures"] == {n: f"figures/geometry_{n}.png" for n in ("bar", "line", "heat")}
  for rel in rec["figures"].values():
    assert (tmp_path / rel).read_bytes().startswith(PNG_MAGIC)
  assert not plt.get_fignums()
  # A PNG file given by path is copied into figures/; a non-PNG is refused.
  rep.Report(tmp_path).add_section(rep.Section("training", "T", figures=[rep.Figure("copy", tmp_path / rel)]))
  assert (tmp_path / "figures" / "training_copy.png").read_bytes() == (tmp_path / rel).read_bytes()
  (tmp_path / "x.txt").write_text("not a png")
  with pytest.raises(ValueError, match="not a PNG"):
    rep.Report(tmp_path).add_section(rep.Section("training", "T",
                                                 figures=[rep.Figure("x", tmp_path / "x.txt")]))


def test_validation_and_formatting(tmp_path):
  r = rep.Report(tmp_path)
  with pytest.raises(ValueError, match="row 1 has 1 cells"):
    r.add_section(rep.Section("behavior", "B", tables=[rep.Table("ok", ["a"], [[1]]),
                                                       rep.Table("t", ["a", "b"], [[1, 2], [3]])]))
  assert not (tmp_path / "tables").exists(), "a rejected section must write nothing"
  with pytest.raises(ValueError, match="file name"):
    r.add_section(rep.Section("../evil", "B"))
  with pytest.raises(ValueError, match="duplicate"):
    r.add_section(rep.Section("behavior", "B", tables=[rep.Table("t", ["a"], []), rep.Table("t", ["a"], [])]))
  # "a_b" + "c" and "a" + "b_c" would share a file; the second section is refused.
  r.add_section(rep.Section("a_b", "AB", tables=[rep.Table("c", ["x"], [[1]])]))
  with pytest.raises(ValueError, match="already belongs"):
    r.add_section(rep.Section("a", "A", tables=[rep.Table("b_c", ["x"], [[2]])]))
  assert [rep.format_value(v) for v in (0.123456, 12345.678, 3, None, float("inf"), True)] == [
    "0.1235", "1.235e+04", "3", "n/a", "n/a", "True"]
  assert math.isnan(float(rep._csv_cell(float("nan"))))
  summary = rep.print_summary(rep.load_report(tmp_path))
  assert summary.splitlines()[0] == "[a_b] AB"
  assert rep.print_summary(tmp_path) == summary


def test_error_bars_tolerate_rounding_outside_points_and_nan_but_not_inverted_intervals():
  from lvs_jax.evals import stats

  lo, hi = stats.wilson_interval(0, 39)  # a rate of 0: its lower bound may miss 0 by ~1e-17
  charts.bar_chart(["a", "b"], [0.0, 1.0], errors=[[0.0 - lo, 1e-17 * -1], [hi - 0.0, 0.0]])
  # A point outside its own percentile-bootstrap interval (|cos| is biased up) and an undefined value both draw.
  charts.line_chart([0, 1, 2], {"c": [0.3, 0.2, float("nan")]},
                    errors={"c": [[-0.05, 0.1, float("nan")], [0.2, 0.1, float("nan")]]})
  with pytest.raises(ValueError, match="half-widths >= 0.*inverted"):
    charts.bar_chart(["a", "b"], [0.5, 0.5], errors=[[0.1, -0.2], [0.1, 0.1]])
