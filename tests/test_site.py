"""The course website (issue #18): `seglab docs` builds it offline from nbdev's processed notebooks, and a headless
Chromium reads it like a student would. One build serves every test of this module.

The browser test needs Chromium and its driver (Debian: `apt-get install chromium chromium-driver`, which `.ci/run`
does) and selenium (a dev requirement). Screenshots are written to `<site>/_screenshots/`; set SEGLAB_SITE_OUT to keep
the site (and them) somewhere after the run.
"""
import os
import re
import shutil
from pathlib import Path

import pytest

from seglab.cli import CHAPTERS
from seglab.course import build_site

ROOT = Path(__file__).resolve().parents[1]
CHROMEDRIVER = shutil.which("chromedriver")
EXECUTED = ["00_foundations/06_viz.ipynb"]   # a few seconds; the full build (`seglab docs`) executes every notebook
CELL_TIMEOUT_S = 120   # per cell of the executed notebook: a kernel that stops answering fails the build, not hangs it
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    flags = set(request.config.getoption("--nbdev-flags", default="").split())
    if not (os.environ.get("CI") or "slow" in flags):
        pytest.skip("slow (the site build takes 2-6 minutes): runs in CI (.ci/run sets CI) or with SEGLAB_FLAGS=slow")
    out = Path(os.environ.get("SEGLAB_SITE_OUT") or tmp_path_factory.mktemp("site") / "_site")
    # one notebook executed (its figures must reach the page); a cell that hangs fails in 2 min, after one retry
    info = build_site(out, root=ROOT, execute=EXECUTED, timeout=CELL_TIMEOUT_S)
    print(f"site: {len(info['pages'])} pages in {info['seconds']} s, {len(info['warnings'])} Sphinx warnings, "
          f"executed {info['executed']} -> {out}")
    return info


def present_chapters():
    return [c for c in CHAPTERS if (ROOT / "nbs" / f"{c.notebook}.ipynb").exists()]


def _text(html: str) -> str:
    "Visible prose of a page: scripts, styles and code blocks removed, tags stripped."
    html = re.sub(r"<(script|style|pre|code)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"<[^>]+>", " ", html)


def test_site_has_every_page_and_links_every_chapter(site):
    out = site["out"]
    assert not site["warnings"], "\n".join(site["warnings"][:20])
    index = (out / "index.html").read_text()
    for ch in present_chapters():
        assert (out / f"{ch.notebook}.html").exists(), ch.notebook
        assert f'href="{ch.notebook}.html"' in index, f"index does not link {ch.notebook}"
        assert f"github/seglab-course/seglab/blob/main/nbs/{ch.notebook}.ipynb" in index, f"no Colab badge for {ch.slug}"
    planned = [c for c in CHAPTERS if c not in present_chapters()]
    assert all(c.method in index for c in planned), "the chapter map lists the planned chapters too"
    for nb in sorted((ROOT / "nbs" / "00_foundations").glob("*.ipynb")):
        assert (out / "00_foundations" / f"{nb.stem}.html").exists(), nb.stem
    assert (out / "api" / "seglab.metrics.html").exists() and "confusion_matrix" in (out / "api" / "seglab.metrics.html").read_text()


def test_site_pages_show_no_raw_syntax_and_math_is_marked(site):
    out = site["out"]
    for page in sorted(out.rglob("*.html")):
        rel = page.relative_to(out).as_posix()
        if rel.startswith(("_", "genindex", "search")):
            continue
        html = page.read_text()
        text = _text(html)
        assert "#|" not in text, f"{rel}: nbdev directive shown as prose"
        assert not re.search(r"<pre>(<span[^>]*>)?#\|", html), f"{rel}: nbdev directive left in a code cell"
        assert not re.search(r":::\s*\{?\.?callout", text), f"{rel}: Quarto callout shown as text"
        assert not re.search(r'\{target="_blank"', text), f"{rel}: Quarto link attributes shown as text"
        assert "cdn." not in html and "unpkg.com" not in html and "jsdelivr" not in html, f"{rel}: loads from a CDN"
    assert set(site["executed"]) == set(EXECUTED)
    assert not [v for v in site["executed"].values() if str(v).startswith("failed")], site["executed"]
    viz = (out / "00_foundations" / "06_viz.html").read_text()
    assert re.search(r'<img[^>]+src="\.\./_images/[^"]+\.png"', viz), "the executed notebook's figures are on its page"
    hp = (out / "10_unsupervised" / "11_hp.html").read_text()
    assert 'class="math' in hp and "_static/mathjax/tex-chtml.js" in hp


def _driver(shots: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    if CHROMIUM:
        opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600",
              "--allow-file-access-from-files"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


_VISIBLE_TEXT = """
const c = document.querySelector('main') || document.body;
const copy = c.cloneNode(true);
copy.querySelectorAll('pre, code, script, style, mjx-container, .math, mjx-assistive-mml').forEach(e => e.remove());
return copy.innerText;
"""


@pytest.mark.skipif(not (CHROMEDRIVER and CHROMIUM), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")
def test_site_in_headless_chromium(site):
    pytest.importorskip("selenium")
    from selenium.webdriver.support.ui import WebDriverWait
    out = site["out"]
    shots = out / "_screenshots"
    shots.mkdir(exist_ok=True)
    pages = ["index.html", "10_unsupervised/11_hp.html", "30_semi/31_abd.html", "00_foundations/06_viz.html"]
    driver = _driver(shots)
    try:
        for rel in pages:
            driver.get((out / rel).as_uri())
            WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
            n_math = driver.execute_script("return document.querySelectorAll('.math').length")
            if n_math:   # MathJax typesets asynchronously
                WebDriverWait(driver, 90).until(lambda d: d.execute_script(
                    "return window.MathJax && MathJax.startup && MathJax.startup.promise && "
                    "document.querySelectorAll('mjx-container').length > 0"))
                driver.execute_async_script("MathJax.startup.promise.then(arguments[arguments.length - 1])")
                assert driver.execute_script("return document.querySelectorAll('mjx-container').length") >= n_math * 0.9
            text = driver.execute_script(_VISIBLE_TEXT)
            assert "#| " not in text, f"{rel}: nbdev directive shown as text"
            assert not re.search(r":::\s*\{", text), f"{rel}: Quarto callout shown as text"
            assert not re.search(r"\$[^$\s][^$\n]*\$", text), f"{rel}: unrendered $...$ math: " + \
                str(re.findall(r"\$[^$\s][^$\n]*\$", text)[:3])
            broken = driver.execute_script(
                "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
            n_img = driver.execute_script("return document.images.length")
            assert n_img > 0 and not broken, f"{rel}: images that did not load: {broken}"
            if rel == "00_foundations/06_viz.html":   # executed: figures, not only the Colab badge
                figures = driver.execute_script("return [...document.images].filter(i => i.src.includes('/_images/')"
                                                " && i.naturalWidth > 100).length")
                assert figures >= 1, f"{rel}: no figure from the executed notebook loaded"
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, f"{rel}: console errors: {errors[:5]}"
            driver.save_screenshot(str(shots / (rel.replace("/", "_")[:-5] + ".png")))
            if n_math:   # a second screenshot centred on the first display equation
                driver.execute_script("const m = document.querySelector('mjx-container[display=\"true\"]') || "
                                      "document.querySelector('mjx-container'); m.scrollIntoView({block: 'center'})")
                driver.save_screenshot(str(shots / (rel.replace("/", "_")[:-5] + "_math.png")))
            if rel == "index.html":
                links = driver.execute_script("return [...document.querySelectorAll('main a')].map(a => a.href)")
                for ch in present_chapters():
                    assert any(l.endswith(f"/{ch.notebook}.html") for l in links), f"index does not link {ch.slug}"
    finally:
        driver.quit()
    assert len(list(shots.glob("*.png"))) >= len(pages)
