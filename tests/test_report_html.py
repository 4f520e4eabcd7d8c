"""The HTML report: one self-contained page, loaded in headless Chromium (Debian's package,
installed by ``./dev.sh test``); it renders and every figure is there and decoded."""

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

import pixelrefine as pr
from pixelrefine.cli import main
from pixelrefine.io import read_tables
from pixelrefine.merge import merge_results
from pixelrefine.report_html import FIGURES, html_report

CHECK = """<script>
window.addEventListener('load', function () {
  var figures = Array.prototype.map.call(document.querySelectorAll('figure'), function (f) {
    var img = f.querySelector('img');
    return {id: f.id, complete: img ? img.complete : false,
            width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0,
            caption: f.querySelector('figcaption') ? f.querySelector('figcaption').textContent : ''};
  });
  var pre = document.createElement('pre');
  pre.id = 'render-check';
  pre.textContent = JSON.stringify({figures: figures, images: document.images.length,
                                    tables: document.querySelectorAll('table').length,
                                    external: document.querySelectorAll('[src^="http"], link[href]').length});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-headless-shell", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to check the HTML report: run the tests with "
                "./dev.sh test, which installs Debian's chromium (apt-get install chromium)")


def render(page, tmp_path):
    """Load a copy of ``page`` with a check script in headless Chromium; the DOM's verdict
    and a screenshot."""
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"),
                       encoding="utf-8")
    common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(common + ["--dump-dom", checked.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'<pre id="render-check">(.*?)</pre>', dom.stdout, re.S)
    assert match, "the page did not finish loading in Chromium:\n" + dom.stdout[:2000]
    shot = subprocess.run(common + ["--window-size=1200,2400", f"--screenshot={tmp_path / 'shot.png'}",
                                    page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0, shot.stderr[-2000:]
    return json.loads(html.unescape(match.group(1))), (tmp_path / "shot.png")


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    pr.write_shoeboxes(d / "s.h5", pr.simulate(6, seed=12, max_reflections=150))
    pr.write_results(d / "r.h5", pr.refine(pr.read_shoeboxes(d / "s.h5"), n_threads=2))
    return d


def test_report_html_renders_in_chromium_with_every_figure(refined, tmp_path):
    d = refined
    r = CliRunner().invoke(main, ["report", str(d / "r.h5"), "--html", str(tmp_path / "report.html")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "Recovery" not in r.output  # the text report is printed too
    page = tmp_path / "report.html"
    text = page.read_text(encoding="utf-8")
    assert "src=\"http" not in text and "<link" not in text  # self-contained
    verdict, shot = render(page, tmp_path)
    ids = [f["id"] for f in verdict["figures"]]
    assert ids == list(FIGURES), ids          # all six, with /truth and a P 1 merge
    assert verdict["images"] == len(FIGURES) and verdict["external"] == 0
    for figure in verdict["figures"]:
        assert figure["complete"] and figure["width"] > 300 and figure["height"] > 150, figure
        assert figure["caption"], figure
    assert verdict["tables"] >= 3
    assert shot.stat().st_size > 20_000       # a real picture, not a blank page


def test_report_without_truth_or_merge_has_the_rest(refined, tmp_path):
    d = refined
    results = pr.read_results(d / "r.h5")
    tables = read_tables(d / "s.h5")
    tables.truth = None
    page = tmp_path / "bare.html"
    page.write_text(html_report(results, tables, merge=None, merge_note="no space group"),
                    encoding="utf-8")
    verdict, _ = render(page, tmp_path)
    assert [f["id"] for f in verdict["figures"]] == ["per-image", "r0", "wilson", "chi2-shell"]
    assert all(f["width"] > 300 for f in verdict["figures"])
    assert "Not merged: no space group" in page.read_text(encoding="utf-8")
    merged = merge_results(results, tables, n_shells=3)
    assert "merge-shells" in html_report(results, tables, merge=merged)
    assert np.isfinite(merged.overall["i_over_sigma"])
