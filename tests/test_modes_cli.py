"""Modes outside the algorithm: the side-by-side report (columns, best texts, attributions, nearest
dataset examples), the saved folder, and the CLI (`dream --modes K`, `report` of a modes folder)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import assert_one_error_line, run_cli
from markupsafe import escape

import dreamlens as dl
from dreamlens.analysis.patterns import nearest_examples
from dreamlens.analysis.scan import ScanResult
from dreamlens.errors import NotAResultError, OutputError, ResultError
from dreamlens.modes.result import Modes
from dreamlens.modes.settings import ModeSettings
from dreamlens.viz.errors import ReportError
from dreamlens.viz.report import build_modes_report, write_modes_report

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
SMALL = dict(length=4, population=2, children=4, topk=16, iters=3, seed=0)
CLI_SMALL = ["--method", "epo", "--length", "4", "--population", "2", "--children", "4", "--topk", "16", "--iters", "3",
             "--seed", "0"]
LIMIT = 20.0  # the tiny model is random: its xe is ~10.8 nats/token, above the default limit of 6
DOCS = [
    "The cat sat on the mat and the dog ran to the park with the birds.",
    "Rivers carry water from the mountains to the sea, and towns stand on their banks.",
    "In 1812 the war began, and the young nation found itself fighting a much larger power at sea.",
]


def escaped(text: str) -> str:
    """A prompt as the report shows it: its repr, HTML-escaped."""
    return str(escape(repr(text)))


@pytest.fixture(scope="module")
def modes(tiny_model) -> Modes:
    found = dl.dream(tiny_model, OBJ, "epo", modes=2, mode_settings=ModeSettings(limit=LIMIT), progress=False, **SMALL)
    assert isinstance(found, Modes) and len(found) == 2
    assert all(found.best(i) is not None for i in range(2))  # every mode has a prompt at the limit
    return found


@pytest.fixture(scope="module")
def scan(tiny_model) -> ScanResult:
    return dl.scan(tiny_model, [OBJ], DOCS, tokens=36, window=6, top_k=5, per_document=2, cache=False, progress=False)


def columns(page: str) -> list[str]:
    """Each mode's column of the page, in order."""
    grid = page[page.index('<div class="modes"'):]
    return grid.split('<div class="mode">')[1:]


# ---------------------------------------------------------------------------------------------
# The report


def test_report_shows_the_modes_side_by_side(modes):
    page = build_modes_report(modes)
    assert re.search(r'<div class="modes" style="--modes: 2">', page) and "display: grid" in page
    cols = columns(page)
    assert len(cols) == len(modes) == 2
    for i, col in enumerate(cols):
        best = modes.best(i)
        assert best is not None
        assert f"<h2>Mode {i + 1}</h2>" in col
        assert escaped(best["text"]) in col  # its best prompt at the limit, in its own column
        assert f"best at xe &lt;= {LIMIT:g}" in col
        assert f"found</th><td>{modes.found[i]} of 2" in col
        assert f"{len(modes.banned[i])} tokens" in col
        assert "Pareto frontier" in col and col.count('src="data:image/png;base64,') == 1
        for t in modes.dreams[i].frontier["text"]:
            assert escaped(t) in col
        assert "Not computed (no model given)" in col
    assert "Nearest dataset examples" not in page  # no scan given
    assert "CircuitsVis" not in page and len(page) < 600_000


def test_report_with_model_attributions_and_nearest_examples(tiny_model, modes, scan, tmp_path):
    path = write_modes_report(tmp_path / "modes.html", modes, model=tiny_model, scan=scan, max_attributions=2,
                              n_gradient=2, n_random=2, k_examples=3)
    page = path.read_text()
    cols = columns(page)
    assert len(cols) == 2 and "var CircuitsVis=" in page
    near = nearest_examples(tiny_model, modes, scan, k=3)
    for i, col in enumerate(cols):
        assert 1 <= col.count('class="dreamlens-view"') <= 2  # the mode's own attributions, in its column
        assert "Nearest dataset examples" in col
        assert len(near[i]) == 3
        for t in near[i]["text"]:
            assert escaped(t) in col
        # the key tokens are decoded with a model at hand
        if modes.key_tokens[i]:
            assert escaped(dl.decode(tiny_model, [modes.key_tokens[i][0]])) in col
    # offline: no script, style or image from anywhere else
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I) and not re.search(r"<link\b", page, re.I)
    assert not re.search(r"\b(src|href)\s*=\s*['\"]?(https?:)?//", page, re.I)


def test_nearest_examples_need_the_model(modes, scan):
    page = build_modes_report(modes, scan=scan)
    assert "they need the model" in page and "Nearest dataset examples</h3>" not in page


def test_report_bad_inputs(modes):
    with pytest.raises(NotAResultError, match="needs Modes"):
        build_modes_report(modes.dreams[0])  # type: ignore[arg-type]
    with pytest.raises(ReportError, match="hold no dream"):
        build_modes_report(Modes(OBJ, [], [], [], []))
    with pytest.raises(ReportError, match="one list per mode"):
        build_modes_report(modes, attributions=[[]])


def test_exported_with_the_other_report_names():
    assert dl.build_modes_report is build_modes_report and dl.write_modes_report is write_modes_report
    assert dl.viz.build_modes_report is build_modes_report


# ---------------------------------------------------------------------------------------------
# The saved folder


def test_save_and_load_round_trip(modes, tmp_path):
    folder = modes.save(tmp_path / "modes")
    assert (folder / "modes.json").is_file() and (folder / "mode_1" / "result.json").is_file()
    back = Modes.load(folder)
    assert (back.objective, back.found, back.key_tokens, back.banned, back.limit) == (
        modes.objective, modes.found, modes.key_tokens, modes.banned, modes.limit)
    assert back.to_frame().equals(modes.to_frame())
    for a, b in zip(back, modes, strict=True):
        assert a.history.drop(columns=["ids"]).equals(b.history.drop(columns=["ids"]))
    with pytest.raises(OutputError, match="already holds modes"):
        modes.save(folder)
    modes.save(folder, overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    with pytest.raises(OutputError, match="other files"):
        modes.save(tmp_path / "other")
    with pytest.raises(ResultError, match="no modes.json"):
        Modes.load(tmp_path / "other")


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.parametrize(("argv", "needles"), [
    (["--modes", "0"], ["--modes", "must be at least 1"]),
    (["--modes", "two"], ["--modes", "expected an integer"]),
    (["--modes", "2", "--mode-limit", "0"], ["--mode-limit", "positive"]),
    (["--modes", "2", "--resume", "somewhere"], ["--modes cannot resume"]),
    (["--modes", "2", "--checkpoint-every", "2", "--out", "somewhere"], ["--checkpoint-every", "--modes"]),
    (["--mode-limit", "5"], ["--mode-limit applies only with --modes"]),
    (["--mode-scan-tokens", "500"], ["--mode-scan-tokens applies only with --modes"]),
])
def test_cli_argument_errors(capsys, tiny_cli, argv, needles):
    rc, _, err = run_cli(capsys, "dream", OBJ, *argv)
    assert_one_error_line(rc, err, *needles)
    assert tiny_cli == []  # refused before any model loads


def test_cli_out_protection(modes, tmp_path, capsys, tiny_cli):
    held = modes.save(tmp_path / "held")
    rc, _, err = run_cli(capsys, "dream", OBJ, "--modes", "2", "--out", held)
    assert_one_error_line(rc, err, str(held), "--force")
    dl.DreamResult.load(held / "mode_1").save(tmp_path / "dream")
    rc, _, err = run_cli(capsys, "dream", OBJ, "--modes", "2", "--out", tmp_path / "dream", "--force")
    assert_one_error_line(rc, err, "holds a dream result", "folder of their own")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("kept")
    rc, _, err = run_cli(capsys, "dream", OBJ, "--modes", "2", "--out", tmp_path / "other")
    assert_one_error_line(rc, err, "other files")
    assert tiny_cli == [] and (tmp_path / "other" / "notes.txt").read_text() == "kept"


def test_cli_dreams_prints_and_saves_modes(tiny_model, tmp_path, capsys, tiny_cli, modes):
    out = tmp_path / "modes"
    argv = ["dream", OBJ, "--modes", "2", "--mode-limit", str(LIMIT), "--mode-scan-tokens", "0", *CLI_SMALL, "--out", out]
    rc, text, err = run_cli(capsys, *argv)
    assert rc == 0, err
    saved = Modes.load(out)
    assert len(saved) == 2 and saved.limit == LIMIT
    assert saved.to_frame()[["found", "text"]].equals(modes.to_frame()[["found", "text"]])  # same seed, same modes
    heads = re.findall(r"^=== mode (\d) of 2 \(found (\d)\w\w, start random; key tokens: (.*); dreamed without (\d+) "
                       r"tokens\) ===$", text, re.M)
    assert [(int(h[0]), int(h[1]), int(h[3])) for h in heads] == [
        (i + 1, saved.found[i], len(saved.banned[i])) for i in range(2)]
    for i, h in enumerate(heads):
        for t in saved.key_tokens[i]:
            assert repr(dl.decode(tiny_model, [t])) in h[2]
    assert text.count("Pareto frontier (") == 2 and f"saved to {out}" in text
    for i in range(2):
        best = saved.best(i)
        assert best is not None and repr(best["text"]) in text
    rc, _, err = run_cli(capsys, *argv)  # modes already there
    assert_one_error_line(rc, err, "--force")
    rc, _, err = run_cli(capsys, *argv, "--force")
    assert rc == 0, err


def test_cli_modes_start_from_a_scan_saved_with_them(tmp_path, capsys, tiny_cli):
    out = tmp_path / "modes"
    argv = ["dream", OBJ, "--modes", "2", "--mode-limit", str(LIMIT), *CLI_SMALL, "--out", out]
    rc, text, err = run_cli(capsys, *argv, "--mode-scan-tokens", "600")
    assert rc == 0, err
    saved = Modes.load(out)
    later = saved.starts[saved.found.index(2)]
    assert saved.starts[saved.found.index(1)] == "random" and later.startswith("example "), saved.starts
    scan = ScanResult.load(out / "scan")
    assert scan.meta["window"] == 4 and scan.objectives == [OBJ] and f"start {later};" in text
    rank = int(later.split()[1])
    example = [int(t) for t in scan.top(0)["ids"].iloc[rank]][-4:]
    start = list(saved[saved.found.index(2)].config["init_ids"])
    kept = [a == b for a, b in zip(example, start)]
    assert sum(kept) == 4 - int(later.split("(")[1].split()[0]) if "replaced" in later else all(kept)
    rc, _, err = run_cli(capsys, "report", out, "--out", tmp_path / "page.html", "--attributions", "0")
    assert rc == 0, err  # the report finds the saved scan by itself
    assert (tmp_path / "page.html").read_text().count("Nearest dataset examples</h3>") == 2
    # modes dreamed again without a scan replace these: the old scan goes with them (it is not theirs)
    rc, _, err = run_cli(capsys, *argv, "--mode-scan-tokens", "0", "--force")
    assert rc == 0, err
    assert not (out / "scan").exists() and Modes.load(out).starts == ["random", "random"]


def test_cli_report_of_a_modes_folder(modes, scan, tmp_path, capsys, tiny_cli):
    folder = modes.save(tmp_path / "modes")
    out = tmp_path / "out" / "page.html"
    rc, text, err = run_cli(capsys, "report", folder, "--out", out, "--attributions", "0")
    assert rc == 0, err
    assert len(columns(out.read_text())) == 2 and tiny_cli == []  # no model loaded
    for i in (1, 2):
        assert (tmp_path / "out" / f"page_mode_{i}_frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in text and "2 modes" in text
    rc, _, err = run_cli(capsys, "report", folder, "--out", out, "--attributions", "0")
    assert_one_error_line(rc, err, "--force")
    scan_dir = scan.save(tmp_path / "scan")
    rc, _, err = run_cli(capsys, "report", folder, "--out", out, "--force", "--attributions", "0", "--scan", scan_dir)
    assert rc == 0, err
    assert len(tiny_cli) == 1  # the nearest examples need the model
    page = out.read_text()
    assert page.count("Nearest dataset examples</h3>") == 2
    meta = json.loads((folder / "modes.json").read_text())
    meta["version"] = 999
    (folder / "modes.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "report", folder, "--out", tmp_path / "x.html")
    assert_one_error_line(rc, err, "RESULT_DIR", "999")
