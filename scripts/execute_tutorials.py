"""Execute every notebook in tutorials/ in place, so the committed notebooks show their outputs.

Deterministic (fixed seeds in the notebooks, one torch thread, no hub access), small (long text outputs
cut, figures as PNG, only the first circuitsvis view of each notebook kept: each inlines a 1.3 MB script),
run with this interpreter's kernel in a scratch folder (the notebooks print paths relative to it). Usage: `.venv/bin/python scripts/execute_tutorials.py [NAME ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
MAX_TEXT = 4000  # characters kept of one text output (a progress bar or a long table)
MAX_HTML = 200_000  # a larger HTML output (circuitsvis inlines its 1.3 MB script), after the first, becomes a note


def _kernel(root: Path) -> str:
    """A kernel spec for this interpreter, found through JUPYTER_PATH (nothing installed user-wide)."""
    spec = root / "kernels" / "dreamlens-tutorials"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (dreamlens)", "language": "python",
    }))
    os.environ["JUPYTER_PATH"] = str(root)
    return spec.name


def _trim(nb: nbformat.NotebookNode) -> None:
    """Drop progress bars' widget state and cut long text, so the committed file stays small; keep the
    first circuitsvis view (a reader on the web sees one) and replace the others by a note."""
    nb.metadata.pop("widgets", None)
    kept_view = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stderr":
                continue  # progress bars and warnings: noise in a rendered notebook
            data = out.get("data", {})
            data.pop("application/vnd.jupyter.widget-view+json", None)
            if "image/png" in data:
                data.pop("image/svg+xml", None)
            html = data.get("text/html")
            if html is not None and len("".join(html)) > MAX_HTML:
                if not kept_view:
                    kept_view = True
                    data["text/plain"] = "[an interactive circuitsvis view]"  # not its object's repr (an address)
                else:
                    data.pop("text/html")
                    data["text/plain"] = ("[an interactive circuitsvis view, not kept in the committed notebook "
                                          "(its inlined script is 1.3 MB; the first view above is kept): run the cell "
                                          "to see it]")
            if out.output_type == "stream" and len(out.text) > MAX_TEXT:
                out.text = out.text[:MAX_TEXT] + "\n[... output cut ...]\n"
            if out.output_type in ("display_data", "execute_result") and not data:
                continue
            kept.append(out)
        cell.outputs = kept
        cell.metadata.pop("execution", None)


def execute(path: Path, kernel: str, workdir: Path, timeout: int) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=timeout, record_timing=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    _trim(nb)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.validate(nb)
    nbformat.write(nb, path)


def trim_only(paths: list[Path]) -> None:
    """Apply the trimming to notebooks already executed (no kernel)."""
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        _trim(nb)
        nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: every tutorials/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = [TUTORIALS / n for n in args.names] or sorted(TUTORIALS.glob("*.ipynb"))
    os.environ.update(MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                      PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        kernel = _kernel(Path(tmp) / "jupyter")
        for path in paths:
            workdir = Path(tmp) / path.stem  # the notebooks' own outputs (dreams/, reports) stay out of the repo
            workdir.mkdir()
            print(f"executing {path.name} ...", flush=True)
            execute(path, kernel, workdir, args.timeout)
            print(f"  wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
