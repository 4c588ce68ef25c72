"""report.html in a real browser (headless Chromium through selenium and Debian's chromedriver):
the page loads without console errors, every embedded image decodes, the summary card comes first and
the configuration sits in a collapsed block at the end, and the screenshot is not blank.

Skipped, with the reason, where Chromium, chromedriver or selenium is absent (.ci/run installs them).
"""

import os
import shutil

import matplotlib.image
import numpy as np
import pytest

from lvs_jax.evals import behavior
from lvs_jax.evals import section as behavior_report
from lvs_jax.report import store as report_lib

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
  if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium test needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
                "chromium-driver)")
  webdriver = pytest.importorskip("selenium.webdriver", reason="headless Chromium test needs selenium (test extra)")
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1200,1600"):
    opts.add_argument(a)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
  yield driver
  driver.quit()


def _write_report(workdir) -> str:
  results = [
    behavior.SetResult("harmful", [dict(prompt=f"h{i}", completion="I cannot help", refused=i < 9) for i in range(10)]),
    behavior.SetResult("harmless", [dict(prompt=f"b{i}", completion="Sure!", refused=i == 0) for i in range(20)]),
    behavior.SetResult("xstest_safe", [dict(prompt=f"x{i}", completion="Ok", refused=i < 2) for i in range(10)]),
  ]
  rep = report_lib.Report(workdir)
  rep.set_meta(model="tiny-test-model", dtype="float32", config={"sets": {"harmful": {"n": 10}}, "seed": 0})
  rep.add_section(behavior_report.behavior_section(results))
  return str(rep.render_html())


def test_report_renders_in_headless_chromium(browser, tmp_path):
  html_path = _write_report(tmp_path)
  browser.get("file://" + os.path.abspath(html_path))
  errors = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
  assert not errors, errors
  images = browser.execute_script(
    "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
  assert images, "the report has no images"
  for alt, complete, w, h in images:
    assert complete and w > 0 and h > 0, f"image {alt!r} did not load ({w}x{h})"
  # The summary card is the first section, with the three behavioral headlines and their intervals.
  first = browser.execute_script("return document.querySelector('section').id;")
  assert first == "summary"
  card = browser.execute_script("return document.getElementById('summary').innerText;")
  assert "Refusal on harmful prompts" in card and "90.0%" in card
  assert "Compliance on harmless prompts" in card and "95.0%" in card
  assert "XSTest over-refusal" in card and "20.0%" in card
  # The configuration is in a collapsed block after every section.
  run = browser.execute_script(
    "const d = document.querySelector('#run details'); return [d.open, document.body.lastElementChild.id];")
  assert run == [False, "run"]
  shot = tmp_path / "shot.png"
  assert browser.save_screenshot(str(shot))
  pixels = matplotlib.image.imread(str(shot))[..., :3]
  assert pixels.shape[0] > 100 and pixels.shape[1] > 100
  assert float(np.std(pixels)) > 0.05, "the screenshot is blank"
  assert (pixels.reshape(-1, 3).std(0) > 0).all()
