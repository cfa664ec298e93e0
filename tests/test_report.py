"""The report page: content, escaping, no external URLs, the CLI, bad input, and a real headless browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from markupsafe import escape

from dreamlens import cli
from dreamlens.analysis.attribution import Attribution
from dreamlens.models import encode
from dreamlens.results import DreamResult
from dreamlens.viz.report import build_report, write_report

OBJ = "blocks.1.mlp.hook_post[3]"
HOSTILE = "<script>alert(1)</script>"


def make_result(model) -> DreamResult:
    texts = [" The cat sat", " A dog ran", " Birds fly high", " <script>alert"]
    ids = [encode(model, t)[:3] for t in texts]
    assert all(len(i) == 3 for i in ids)
    rng = np.random.default_rng(0)
    n = 24
    pick = rng.integers(0, len(ids), n)
    return DreamResult(
        objective=OBJ, method="epo", config={"length": 3, "population": 2}, ids=np.array([ids[i] for i in pick]),
        activation=rng.normal(size=n) + np.arange(n) * 0.05, xe=rng.uniform(2, 9, n), iteration=np.repeat(np.arange(6), 4),
        text=[texts[i] if i < 3 else HOSTILE for i in pick], iterations=5, bos_token_id=0, model_name="tiny-llama",
    )


def hostile_attribution() -> Attribution:
    toks = [HOSTILE, "<img src=x onerror=alert(2)>", " cat", "&amp;"]
    L = len(toks)
    return Attribution(
        objective=OBJ, text="".join(toks), ids=np.arange(L), tokens=toks, value=1.0, xe=3.0,
        alt_ids=np.zeros((L, 2), dtype=np.int64), alt_tokens=[["</script>", " dog"]] * L,
        alt_values=np.tile([0.25, -1.0], (L, 1)), alt_xe=np.ones((L, 2)), n_gradient=1,
    )


@pytest.fixture(scope="module")
def result(tiny_model):
    return make_result(tiny_model)


@pytest.fixture(scope="module")
def page(tiny_model, result, tmp_path_factory):
    from dreamlens.analysis.attribution import attribute_frontier

    attrs = attribute_frontier(tiny_model, result, max_prompts=2, n_gradient=2, n_random=2) + [hostile_attribution()]
    path = tmp_path_factory.mktemp("report") / "report.html"
    write_report(path, result, attributions=attrs)
    return path, attrs


def test_report_content(page, result):
    path, attrs = page
    text = path.read_text()
    for heading in ("Objective and run", "Pareto frontier", "Plots", "Token attribution"):
        assert heading in text
    assert text.count('src="data:image/png;base64,') == 3
    assert json.dumps(attrs[0].tokens[0].strip()).strip('"') in text
    for t in result.frontier["text"]:
        assert str(escape(repr(t))) in text  # shown exactly, escaped


def test_report_has_no_external_urls_for_scripts_or_styles(page):
    text = page[0].read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.search(r"<link\b", text, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", text, re.I)
    assert not re.search(r"\b(src|href)\s*=\s*['\"]?(https?:)?//", text, re.I)
    assert "unpkg.com" not in text
    # inside the views' documents too (circuitsvis's own script keeps its source-map comment: DevTools alone reads it)
    for doc in _frames(text):
        assert not re.search(r"<script[^>]*\bsrc\s*=", doc, re.I) and "unpkg.com" not in doc


def test_hostile_strings_never_become_markup(page):
    text = page[0].read_text()
    docs = _frames(text)
    assert len(docs) == len(page[1])  # one view (an iframe's document) per attribution
    ours = "".join([re.sub(r'srcdoc="[^"]*"', "", text)] + [_without_library(d) for d in docs])
    i = ours.find("<script>alert")
    assert i < 0, ours[i - 300 : i + 50]
    assert "<img src=x" not in ours
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in ours  # in the frontier table, as text


def test_report_without_model_skips_attributions(result):
    text = build_report(result)
    assert "Not computed" in text and "CircuitsVis" not in text and len(text) < 400_000


def test_report_with_dataset_comparison(tiny_model, result):
    from dreamlens.analysis.scan import scan as run_scan

    docs = ["The cat sat on the mat and the dog ran to the park with the birds.",
            "Rivers carry water from the mountains to the sea, and towns stand on their banks."]
    scan = run_scan(tiny_model, [OBJ], docs, tokens=24, window=6, top_k=4, per_document=2, cache=False, progress=False)
    text = build_report(result, scan=scan)
    assert "Dreams and max-activating dataset examples" in text and "Top dataset examples" in text
    assert text.count('src="data:image/png;base64,') == 4


def test_cli_writes_report_and_pngs(result, tmp_path, capsys):
    folder = result.save(tmp_path / "dream")
    out = tmp_path / "out" / "report.html"
    assert cli.main(["report", str(folder), "--out", str(out), "--attributions", "0"]) == 0
    assert out.is_file() and "Pareto frontier" in out.read_text()
    for name in ("frontier", "evolution", "thresholds"):
        assert (tmp_path / "out" / f"report_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_cli_bad_result_folders(result, tmp_path, capsys):
    out = str(tmp_path / "r.html")
    assert cli.main(["report", str(tmp_path / "missing"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty"), "--out", out]) == 2
    assert "no result.json" in capsys.readouterr().err
    folder = result.save(tmp_path / "old")
    meta = json.loads((folder / "result.json").read_text())
    meta["version"] = 999
    (folder / "result.json").write_text(json.dumps(meta))
    assert cli.main(["report", str(folder), "--out", out, "--attributions", "0"]) == 2
    assert "version 999" in capsys.readouterr().err
    assert cli.main(["report", str(result.save(tmp_path / "ok")), "--scan", str(tmp_path / "noscan"), "--out", out,
                     "--attributions", "0"]) == 2
    assert "scan" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def _frames(page: str) -> list[str]:
    """The documents of the page's circuitsvis views (each an iframe's srcdoc), unescaped."""
    return [html.unescape(d) for d in re.findall(r'<iframe class="dreamlens-view"[^>]*srcdoc="([^"]*)"', page)]


def _without_library(doc: str) -> str:
    """A view's document minus circuitsvis's inlined library (minified code, not ours)."""
    start = doc.find("var CircuitsVis=")
    return doc[:start] + doc[doc.find("CircuitsVis.render(", start):]


# ---------------------------------------------------------------------------------------------
# A real browser: the page loads offline with no console message and shows the tokens.


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no chromium on this machine (`make test` installs Debian's chromium when apt-get is allowed)")


def load_in_browser(path, tmp_path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message (Chromium logs them to stderr)."""
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom", path.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def test_report_in_headless_chromium(page, tmp_path):
    path, attrs = page
    dom, console = load_in_browser(path, tmp_path)
    assert console == [], console
    # every view's frame was fitted to its drawn tokens, which got their hover texts (set from inside the frame)
    assert dom.count('data-titled="1"') == len(attrs)
    # each view's own document, loaded alone, shows its tokens as text
    for k, (a, doc) in enumerate(zip(attrs, _frames(path.read_text()))):
        view = tmp_path / f"view{k}.html"
        view.write_text(doc, encoding="utf-8")
        inner, console = load_in_browser(view, tmp_path)
        assert console == [], console
        assert inner.count('class="colored-tokens"') == 1 and 'data-titled="1"' in inner
        tokens = re.findall(r'<span style="display: inline-block;[^"]*">(.*?)</span>', inner)
        shown = [t.replace("&nbsp;", " ") for t in tokens]  # the DOM as serialized: text escaped
        if a is attrs[-1]:  # the hostile tokens are shown as text; none became an element
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in tokens and "&amp;amp;" in tokens
            assert not re.search(r'<img[^>]*src="x"', inner) and "&lt;img src=x onerror=alert(2)&gt;" in shown
        else:
            for t in a.tokens:
                assert html.escape(t, quote=False) in shown
        assert re.search(r'title="[^"]*drop to best swap', inner)


def test_single_attribution_page_in_headless_chromium(tmp_path):
    path = hostile_attribution().save_html(tmp_path / "a.html")
    dom, console = load_in_browser(path, tmp_path)
    assert console == [], console
    assert 'data-titled="1"' in dom and "<img" not in dom
