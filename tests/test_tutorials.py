"""The tutorials execute, top to bottom, on the embedded model (so they cannot rot), and are committed
executed (`scripts/execute_tutorials.py`), so a reader on the web sees their plots and tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    """A kernel spec for this interpreter (the venv's), found through JUPYTER_PATH: nothing installed
    user-wide, and no other `python` on PATH can be picked up."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "dreamlens-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dreamlens tests", "language": "python",
    }))
    return root


def execute(name: str, tmp_path: Path, jupyter_path: Path, monkeypatch) -> list:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # one torch thread, as scripts/execute_tutorials.py runs them: on a busy CPU, threads that wait by
    # spinning cost several times the notebook's own work
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="dreamlens-tests", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def _count(outputs: list, mime: str, needle: str = "") -> int:
    return sum(1 for o in outputs if needle in str(o.get("data", {}).get(mime, "")) and mime in o.get("data", {}))


def _check_report(path: Path) -> None:
    text = path.read_text()
    assert "Pareto frontier" in text
    assert "CircuitsVis.render(" in text and "<script src" not in text


@pytest.mark.integration
def test_tutorial_1_dream_a_neuron(tmp_path, jupyter_path, monkeypatch):
    outputs = execute("01_dream_a_neuron.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert _count(outputs, "image/png") >= 3  # the three plots, shown inline
    assert _count(outputs, "text/html", "dreamlens-view") >= 1  # the circuitsvis attribution
    _check_report(tmp_path / "dreams" / "tutorial1" / "report.html")


@pytest.mark.integration
def test_tutorial_2_dream_an_sae_latent(tmp_path, jupyter_path, monkeypatch):
    outputs = execute("02_dream_an_sae_latent.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert _count(outputs, "image/png") >= 1
    assert _count(outputs, "text/html", "dreamlens-view") >= 2
    _check_report(tmp_path / "dreams" / "tutorial2" / "report.html")


@pytest.mark.integration
def test_tutorial_3_dreams_vs_dataset(tmp_path, jupyter_path, monkeypatch):
    outputs = execute("03_dreams_vs_dataset.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert _count(outputs, "image/png") >= 1  # the comparison figure
    assert _count(outputs, "text/html", "dreamlens-view") >= 2
    report = tmp_path / "dreams" / "tutorial3" / "report.html"
    _check_report(report)
    assert "Top dataset examples" in report.read_text()


@pytest.mark.integration
def test_tutorial_4_modes(tmp_path, jupyter_path, monkeypatch):
    outputs = execute("04_modes_of_a_polysemantic_feature.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert _count(outputs, "image/png") >= 1  # the modes' frontiers
    report = tmp_path / "dreams" / "tutorial4" / "modes.html"
    assert report.is_file()
    assert "Nearest dataset examples" in report.read_text()


@pytest.mark.parametrize("name", sorted(p.name for p in TUTORIALS.glob("*.ipynb")))
def test_committed_notebook_is_executed(name):
    """Every code cell ran, once, in order, without an error: the outputs belong to the code shown."""
    cells = [c for c in json.loads((TUTORIALS / name).read_text())["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{name}: execution counts {counts}; run scripts/execute_tutorials.py"
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: an error output ({errors[0].get('ename')}: {errors[0].get('evalue')})"
    assert any(c.get("outputs") for c in cells), f"{name} has no outputs"
    assert any("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", [])), f"{name} shows no figure"


@pytest.mark.parametrize("name", sorted(p.name for p in TUTORIALS.glob("*.ipynb")))
def test_committed_notebook_shows_a_view_and_no_scratch_path(name):
    """A reader on the web sees one circuitsvis view (the others are trimmed: each inlines a 1.3 MB script),
    and no path of the scratch folder the notebook was executed in."""
    outputs = [o for c in json.loads((TUTORIALS / name).read_text())["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", [])]
    views = [o for o in outputs if "CircuitsVis.render(" in "".join(o.get("data", {}).get("text/html", ""))]
    assert len(views) == 1, f"{name}: {len(views)} circuitsvis views kept; run scripts/execute_tutorials.py"
    text = " ".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "/tmp" not in text and "/home/" not in text and "/root/" not in text, f"{name} prints an absolute path"
