"""The bad-input battery: each mistake raises its own kind of error, whose message names the bad value
and the fix, through the API and through the CLI (exit status 2, one `error:` line, no traceback)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_one_error_line

import dreamlens as dl
from dreamlens import cli, models
from dreamlens.analysis.errors import ScanError
from dreamlens.errors import CorpusError, DreamError, DreamlensError, OutputError, ResultError
from dreamlens.objectives import Direction, ObjectiveError

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
SMALL = dict(length=4, population=2, children=2, topk=8, iters=0)  # checks only: no iteration runs


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def dream(model, objective=OBJ, **kw):
    return dl.dream(model, objective, "epo", progress=False, **{**SMALL, **kw})


# ---------------------------------------------------------------------------------------------
# Objectives and config: API (tiny model) and CLI (tiny model loaded in place of the default)

CASES = [
    # id, objective, options, CLI extra args, error class, what the message must name
    ("unknown hook", "blocks.1.mlp.hook_pots[3]", {}, [], ObjectiveError, ["'blocks.1.mlp.hook_pots'", "did you mean 'blocks.1.mlp.hook_post'"]),
    ("layer out of range", "blocks.7.mlp.hook_post[3]", {}, [], ObjectiveError,
     ["'blocks.7.mlp.hook_post'", "the model has 2 blocks (0..1)", "'blocks.1.mlp.hook_post'"]),
    ("index out of range", "blocks.1.mlp.hook_post[300]", {}, [], ObjectiveError, ["index 300", "use 0..127"]),
    ("missing index", "blocks.1.mlp.hook_post", {}, [], ObjectiveError, ["'blocks.1.mlp.hook_post'", "'blocks.1.mlp.hook_post[0]'"]),
    ("hook needs more indices", "blocks.1.attn.hook_z[1]", {}, [], ObjectiveError, ["needs 2 number(s), got [1]", "blocks.1.attn.hook_z[0,1]"]),
    ("missing SAE", "sae:/no/such/sae[3]", {}, [], ObjectiveError, ["'/no/such/sae'", "load_sae('path/to/folder')"]),
    ("mismatched SAE", "sae:embedded[3]", {}, [], ObjectiveError, ["'blocks.10.hook_resid_post'", "the SAE's cfg.metadata.hook_name", "the model has 2 blocks (0..1)"]),
    ("multi-token logit", 'logit[" Paris is"]', {}, [], ObjectiveError, ["' Paris is' is 2 tokens", "a single token"]),
    ("malformed combination", OBJ + " + * 2", {}, [], ObjectiveError, ["'* 2'", "combine with ' + '"]),
    ("length 0", OBJ, {"length": 0}, ["--length", "0"], DreamError, ["length", "0"]),
    ("length beyond the context", OBJ, {"length": 100}, ["--length", "100"], DreamError, ["length 100", "use length <= 63"]),
    ("population 0", OBJ, {"population": 0}, ["--population", "0"], DreamError, ["population", "0"]),
    ("children 0", OBJ, {"children": 0}, ["--children", "0"], DreamError, ["children", "0"]),
    ("topk 0", OBJ, {"topk": 0}, ["--topk", "0"], DreamError, ["topk", "0"]),
    ("negative penalty", OBJ, {"lam_min": -1.0}, ["--lam-min", "-1"], DreamError, ["lam_min=-1.0", "positive"]),
    ("init_text longer than length", OBJ, {"length": 3, "init_text": "one two three four five six"},
     ["--length", "3", "--init-text", "one two three four five six"], DreamError, ["has 6 tokens but length is 3", "set length=6"]),
    ("constant objective", "blocks.1.hook_resid_post[3]@0", {"prefix": "Hello"}, ["--prefix", "Hello"], DreamError,
     ["'blocks.1.hook_resid_post[3]@0'", "constant", "pick another target"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_api(tiny_model, case):
    _, obj, kw, _, cls, needles = case
    with pytest.raises(cls) as caught:
        dream(tiny_model, obj, **kw)
    assert type(caught.value) is cls and isinstance(caught.value, DreamlensError)
    for n in needles:
        assert n in str(caught.value), (n, str(caught.value))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli(tiny_model, monkeypatch, capsys, tmp_path, case):
    _, obj, _, args, _, needles = case
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: tiny_model)
    base = ["--method", "epo", "--iters", "0", "--population", "2", "--children", "2", "--topk", "8"]
    argv = ["dream", obj, *base, *(args or ["--length", "4"]), "--out", tmp_path / "out"]
    # the flags are the configs' fields: their values are checked by the config, as through the API
    assert_one_error_line(*run_cli(capsys, *argv), *needles)
    assert not (tmp_path / "out").exists()


# Validation that lives in the optimizers' config and setup (dreamlens/optim).
OPTIM_CASES = [
    ("population larger than the vocabulary", {"population": 10**6}, ["population 1000000", "49152"]),
    ("children larger than the vocabulary", {"children": 10**6}, ["children 1000000", "49152"]),
    ("topk larger than the vocabulary", {"topk": 10**6}, ["topk 1000000", "49152"]),
    ("seed that is not an integer", {"seed": 1.5}, ["seed", "1.5", "integer"]),
    ("seed that is a string", {"seed": "a"}, ["seed", "'a'", "integer"]),
]


@pytest.mark.parametrize("case", OPTIM_CASES, ids=[c[0] for c in OPTIM_CASES])
def test_api_optimizer_sizes_and_seed(tiny_model, case):
    _, kw, needles = case
    with pytest.raises(DreamError) as caught:
        dream(tiny_model, **kw)
    for n in needles:
        assert n in str(caught.value), (n, str(caught.value))


def test_cli_topk_larger_than_the_vocabulary(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: tiny_model)
    rc, err = run_cli(capsys, "dream", OBJ, "--method", "epo", "--iters", "0", "--length", "4", "--topk", "1000000")
    assert_one_error_line(rc, err, "topk 1000000", "49152")


@pytest.mark.parametrize("seed", ["1.5", "a"])
def test_cli_seed_that_is_not_an_integer(capsys, seed):
    with pytest.raises(SystemExit) as caught:
        cli.main(["dream", OBJ, "--seed", seed])
    assert_one_error_line(caught.value.code, capsys.readouterr().err, "--seed", f"expected an integer, got '{seed}'")


@pytest.mark.parametrize(
    "vector, needles",
    [
        (torch.ones(10), ["has 10 entries", "give a vector of length 64"]),
        (torch.zeros(64), ["all zeros", "non-zero entry"]),
        (torch.full((64,), float("nan")), ["64 NaN or infinite entries", "finite number"]),
    ],
    ids=["wrong length", "all zeros", "NaN"],
)
def test_direction(tiny_model, monkeypatch, capsys, tmp_path, vector, needles):
    torch.save(vector, tmp_path / "v.pt")
    spec = f"dir:blocks.1.hook_resid_post:{tmp_path / 'v.pt'}"
    with pytest.raises(ObjectiveError) as caught:
        dream(tiny_model, spec)
    for n in needles:
        assert n in str(caught.value)
    with pytest.raises(ObjectiveError, match=needles[0]):
        Direction("blocks.1.hook_resid_post", vector).validate(tiny_model)
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: tiny_model)
    assert_one_error_line(*run_cli(capsys, "dream", spec, "--method", "epo", "--iters", "0"), *needles)


# ---------------------------------------------------------------------------------------------
# Files: outputs, results, corpora


def _result(tiny_model):
    return dream(tiny_model, iters=1)


def test_unwritable_out(tiny_model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"'.*file' is a file; a result is written to a folder"):
        _result(tiny_model).save(tmp_path / "file")
    rc, err = run_cli(capsys, "dream", OBJ, "--out", tmp_path / "file" / "sub")
    assert_one_error_line(rc, err, "cannot write", "file/sub", "choose a writable folder")
    rc, err = run_cli(capsys, "dream", OBJ, "--out", tmp_path / "file")
    assert_one_error_line(rc, err, "is a file", "give a folder")


def test_existing_out_is_never_overwritten(tiny_model, monkeypatch, tmp_path, capsys):
    folder = _result(tiny_model).save(tmp_path / "r")
    with pytest.raises(OutputError, match=r"already holds a dream result; pass overwrite=True"):
        _result(tiny_model).save(folder)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holding other files"):
        _result(tiny_model).save(tmp_path / "other", overwrite=True)
    rc, err = run_cli(capsys, "dream", OBJ, "--out", folder)
    assert_one_error_line(rc, err, str(folder), "--resume", "--force")
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: tiny_model)
    (folder / "report.html").write_text("kept")
    rc, err = run_cli(capsys, "dream", OBJ, "--method", "epo", "--iters", "1", "--length", "4", "--population", "2",
                      "--children", "2", "--out", folder, "--force")
    assert rc == 0, err
    assert (folder / "report.html").read_text() == "kept"  # what else was in the folder stays


@pytest.mark.parametrize("kind", ["not a result", "truncated", "missing"])
def test_resume_and_report_need_a_result(tiny_model, tmp_path, capsys, kind):
    folder = tmp_path / "bad"
    if kind == "not a result":
        folder.mkdir()
        (folder / "notes.txt").write_text("x")
        needles = ["no result.json", "pass the folder given to --out"]
    elif kind == "truncated":
        _result(tiny_model).save(folder)
        data = (folder / "history.parquet").read_bytes()
        (folder / "history.parquet").write_bytes(data[: len(data) // 2])
        needles = ["history.parquet"]
    else:
        needles = ["does not exist"]
    with pytest.raises(ResultError):
        dl.dream(tiny_model, OBJ, "epo", resume=folder, progress=False, **SMALL)
    assert_one_error_line(*run_cli(capsys, "dream", OBJ, "--resume", folder), "--resume", *needles)
    assert_one_error_line(*run_cli(capsys, "report", folder, "--out", tmp_path / "r.html"), "RESULT_DIR", *needles)


@pytest.mark.parametrize(
    "kind, needles",
    [
        ("missing", ["no such", "file or folder", "'sotu', 'wiki'"]),
        ("empty", ["is empty", "UTF-8 text"]),
        ("binary", ["not UTF-8 text", "plain text file"]),
    ],
)
def test_corpus(tiny_model, tmp_path, capsys, kind, needles):
    path = tmp_path / "corpus.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CorpusError) as caught:
        dl.scan(tiny_model, [OBJ], path, tokens=16, window=4, cache=False, progress=False)
    for n in [str(path), *needles]:
        assert n in str(caught.value)
    rc, err = run_cli(capsys, "scan", OBJ, "--corpus", path, "--out", tmp_path / "scan")
    assert_one_error_line(rc, err, str(path), *needles)


def test_existing_scan_and_report_out(tiny_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: tiny_model)
    corpus = tmp_path / "c.txt"
    corpus.write_text("The cat sat on the mat and the dog ran to the park with the birds. " * 4)
    args = ["scan", OBJ, "--corpus", corpus, "--tokens", "16", "--window", "4", "--no-cache", "--out", tmp_path / "s"]
    assert run_cli(capsys, *args)[0] == 0
    assert_one_error_line(*run_cli(capsys, *args), "already holds a scan", "--force")
    assert run_cli(capsys, *args, "--force")[0] == 0
    folder = _result(tiny_model).save(tmp_path / "r")
    (tmp_path / "page.html").write_text("mine")
    rc, err = run_cli(capsys, "report", folder, "--out", tmp_path / "page.html", "--attributions", "0")
    assert_one_error_line(rc, err, "page.html", "already exists", "--force")
    assert (tmp_path / "page.html").read_text() == "mine"


def test_scan_errors_are_dreamlens_errors(tiny_model):
    with pytest.raises(ScanError, match=r"window 100 does not fit .* use window <= 63"):
        dl.scan(tiny_model, [OBJ], ["some text"], window=100, cache=False, progress=False)


def test_every_message_is_one_line():
    assert re.fullmatch(r"a b c", cli._one_line(CorpusError("a\n   b\nc")))


# ---------------------------------------------------------------------------------------------
# One way out: user errors exit 2 in one line, --debug shows them, bugs keep their traceback


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    argv = ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]
    for args in (["--debug", *argv], [argv[0], "--debug", *argv[1:]]):
        with pytest.raises(ResultError, match="does not exist"):
            cli.main(args)
    monkeypatch.setenv("DREAMLENS_DEBUG", "1")
    with pytest.raises(ResultError):
        cli.main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "cmd_info", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["info"])


def test_as_a_process(tmp_path):
    import subprocess
    import sys

    def run(code: str):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    user = run(f"import sys; from dreamlens import cli; sys.exit(cli.main(['report', {str(tmp_path / 'nothing')!r}, '--out', 'r.html']))")
    assert user.returncode == 2 and user.stderr.startswith("error: ") and len(user.stderr.splitlines()) == 1, user.stderr
    bug = run("import sys; from dreamlens import cli; cli.cmd_info = lambda a: 1 / 0; sys.exit(cli.main(['info']))")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ZeroDivisionError" in bug.stderr
    usage = run("import sys; from dreamlens import cli; sys.exit(cli.main(['dream', 'x', '--iters', '-1']))")
    assert usage.returncode == 2 and usage.stderr == "error: iters must be >= 0, got -1\n"
    usage = run("import sys; from dreamlens import cli; sys.exit(cli.main(['dream', 'x', '--iters', 'two']))")
    assert usage.returncode == 2 and usage.stderr == "error: argument --iters: expected an integer, got 'two' (see `dreamlens dream --help`)\n"


def test_an_out_folder_of_other_files_is_refused_before_the_run(tiny_model, monkeypatch, tmp_path, capsys):
    """`DreamResult.save` refuses a folder holding other files; the CLI says so before dreaming, not after."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    loaded = []
    monkeypatch.setattr(models, "load_model", lambda name=None, **k: loaded.append(name) or tiny_model)
    rc, err = run_cli(capsys, "dream", OBJ, "--method", "epo", "--iters", "1", "--length", "4", "--population", "2",
                      "--children", "2", "--out", tmp_path / "other")
    assert_one_error_line(rc, err, "other", "holding other files")
    assert loaded == []  # refused before the model loaded: no dream was computed and then lost
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
