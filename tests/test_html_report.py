"""report.html: one self-contained page with every table of results.md, sortable and filterable; in a
real headless browser (Debian's chromium, installed by .ci/run) it loads without console errors, shows
every table, sorts, filters, and its screenshot is not blank."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.reporting.report import build_report

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = Path(__file__).parents[1] / "results" / "reference"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    md = build_report(FIXTURES, out)
    return out / "report.html", md


def test_html_has_every_table_and_no_external_asset(page):
    path, md = page
    text = path.read_text()
    n_tables = sum(1 for block in md.split("\n\n") if block.startswith("|"))
    assert n_tables > 3 and text.count("<table") == n_tables
    # one file: no link, script or image fetched from anywhere
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text) and "http" not in text.replace("http-equiv", "")
    # the failures and their reasons are there, and every model table row says which model, budget, method
    assert "boom" in text and 'data-model="deit_tiny_cifar10 (cpu, fp32, limit 500, throughput batch 8)"' in text
    assert re.search(r'<tr data-model="[^"]+" data-budget="0.7" data-method="tome">', text)


def test_html_is_byte_reproducible(page, tmp_path):
    path, _ = page
    build_report(FIXTURES, tmp_path)
    assert (tmp_path / "report.html").read_bytes() == path.read_bytes()


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing on CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); CI runs this check")
    return found


def _run(browser: str, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root; a virtual time budget lets the page's script finish before the dump
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_html_report_in_a_headless_browser(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    from harness.reporting.plots import write_plots

    browser = _chromium()
    write_plots(REFERENCE, tmp_path, widths=("double",))
    md = build_report(REFERENCE, tmp_path)
    url = (tmp_path / "report.html").as_uri()
    dom = _run(browser, "--dump-dom", url + "#selftest")
    found = re.search(r'<pre id="selftest">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    n_tables = sum(1 for block in md.split("\n\n") if block.startswith("|"))
    assert check["errors"] == [] and "Uncaught" not in dom.stderr
    assert check["tables"] == check["shown"] == n_tables  # every table there and displayed
    assert check["filtered"] is True and check["sorted"] is True
    # the sort, read back from the page itself: the model table's top-1 column ascends
    table = re.search(r'<table class="model" id="sorted-table" data-sorted-col="(\d+)">(.*?)</table>', dom.stdout, re.S)
    col = int(table.group(1))
    values = [float(re.sub(r"<[^>]+>", "", row[col]).split()[0])
              for row in (re.findall(r"<td>(.*?)</td>", tr) for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(2)))
              if row]
    assert len(values) > 10 and values == sorted(values)
    # the figures are inline and drawn: the screenshot has more than one colour
    shot = tmp_path / "shot.png"
    _run(browser, f"--screenshot={shot}", "--window-size=1280,1600", url)
    pixels = imread(shot)[..., :3]
    assert pixels.shape[0] > 500 and float(np.std(pixels)) > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
