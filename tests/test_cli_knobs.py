"""The command line fits the configs: a flag for every config field (each method's defaults in its help),
one name for the budget, flags that cannot be confused, `--version`, an example in every subcommand's help,
`dream` without --out saving to a folder it prints, `report FOLDER` writing FOLDER/report.html, and a block
number out of range named as such."""

from __future__ import annotations

import dataclasses
import shlex

import pytest
from conftest import assert_one_error_line, run_cli

import dreamlens as dl
from dreamlens import cli
from dreamlens.cli.dream import default_out
from dreamlens.cli.knobs import HELP, SKIPPED, knob_options, knobs
from dreamlens.optim.methods import METHODS, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

OBJ = "blocks.1.mlp.hook_post[3]"
TINY = ["--method", "epo", "--iters", "1", "--length", "4", "--population", "2", "--children", "2", "--topk", "8"]


def subparser(name: str):
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")  # argparse keeps its subparsers there
    return action.choices[name]


def help_of(name: str) -> str:
    return " ".join(subparser(name).format_help().split())  # one line: argparse wraps at any width


def test_every_config_field_has_a_flag_or_a_reason():
    for _, cls in METHODS.values():
        for f in dataclasses.fields(cls):
            assert f.name in HELP or f.name in SKIPPED, f"{cls.__name__}.{f.name} has neither a help line nor a reason"
    assert not set(HELP) & set(SKIPPED)


def test_the_parser_is_built_without_torch():
    import subprocess
    import sys

    code = "import sys; from dreamlens.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr  # --help and --version stay instant


@pytest.mark.parametrize("command", ["dream", "sweep"])
def test_help_shows_every_knob_with_each_methods_default(command):
    text = help_of(command)
    for k in knobs():
        if command == "sweep" and k.name == "checkpoint_every":
            assert k.flag not in text  # the sweep's store is its checkpoint
            continue
        assert k.flag in text, k.flag
    # the real defaults, per method (EPO's 512 is not GCG's 256; ADAPT has no topk but its own widths)
    assert "top-k tokens of the negative gradient (default: epo 512, gcg 256)" in text
    assert "(default: adapt 32, epo 32, gcg 512)" in text  # --children
    assert "(default: adapt 300, epo 300, gcg 500)" in text  # --iters
    assert "--beams N partial prompts of the beam search, then the members of the mutation phase (default: adapt 4)" in text
    assert "(default: adapt 0.03, epo 0.1)" in text and "(default: adapt 128)" in text and "(default: gcg 1)" in text
    assert "default 512)" not in text.split("--topk N")[0]  # no method's default stated as everyone's


def test_flags_become_the_methods_config():
    parser = cli.build_parser()
    args = parser.parse_args(["dream", OBJ, "--method", "adapt", "--beams", "3", "--shift-share", "0.1", "--lineage",
                              "--no-reuse-prefix", "--topk-max", "256", "--temp-min", "2", "--iters", "7"])
    options = knob_options(args, "adapt")
    assert options == {"beams": 3, "shift_share": 0.1, "lineage": True, "reuse_prefix": False, "topk_max": 256,
                       "temp_min": 2.0, "iters": 7}
    cfg = make_config("adapt", **options)
    assert (cfg.beams, cfg.shift_share, cfg.lineage, cfg.reuse_prefix, cfg.topk_max) == (3, 0.1, True, False, 256)
    args = parser.parse_args(["dream", OBJ, "--method", "gcg", "--lam", "0.5", "--topk", "64", "--init-text", "a b"])
    assert knob_options(args, "gcg") == {"lam": 0.5, "topk": 64, "init_text": "a b"}
    assert knob_options(parser.parse_args(["dream", OBJ]), "adapt") == {}  # no flag: the method's defaults


@pytest.mark.parametrize(("argv", "needles"), [
    (["--method", "adapt", "--topk", "64"], ["--topk is not an option of adapt", "epo, gcg", "--method epo"]),
    (["--method", "gcg", "--beams", "2"], ["--beams is not an option of gcg", "adapt"]),
    (["--method", "epo", "--lam", "0.5"], ["--lam is not an option of epo", "gcg"]),
])
def test_a_flag_of_another_method_is_refused_before_the_model_loads(capsys, tiny_cli, argv, needles):
    assert_one_error_line(*run_cli(capsys, "dream", OBJ, *argv)[::2], *needles)
    assert tiny_cli == []


def test_one_name_for_the_budget():
    parser = cli.build_parser()
    for command, rest in (("dream", [OBJ]), ("demo", []), ("sweep", [OBJ, "--out", "x"])):
        assert "--budget N" in help_of(command), command
        assert parser.parse_args([command, *rest, "--budget", "500"]).budget == 500
    assert "--max-token-forwards" not in help_of("dream")  # the old name: a hidden alias
    assert parser.parse_args(["dream", OBJ, "--max-token-forwards", "700"]).budget == 700


def test_the_budget_reaches_the_dream(tmp_path, capsys, tiny_cli):
    rc, _, err = run_cli(capsys, "dream", OBJ, *TINY, "--iters", "50", "--budget", "300", "--out", tmp_path / "d")
    assert rc == 0, err
    r = dl.DreamResult.load(tmp_path / "d")
    assert r.config["max_token_forwards"] == 300 and r.stopped == "budget"


@pytest.mark.parametrize("command", [["scan", OBJ, "--out", "x"], ["sweep", OBJ, "--out", "x"]])
def test_the_examples_kept_are_not_the_gradients_top_k(capsys, command):
    parser = cli.build_parser()
    assert parser.parse_args([*command, "--top-examples", "3"]).top_k == 3
    assert "--top-examples N" in help_of(command[0]) and "--top-k" not in help_of(command[0])
    rc, _, err = run_cli(capsys, *command, "--top-k", "3")
    assert_one_error_line(rc, err, "--top-k is now --top-examples", "--topk")


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.strip() == f"dreamlens {dl.__version__}"


def test_every_subcommand_shows_an_example_that_parses():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    names = [*action.choices, "export neuronpedia"]
    for name in names:
        sub = subparser(name.split()[0])
        if name == "export neuronpedia":
            sub = next(a for a in sub._actions if a.dest == "format").choices["neuronpedia"]
        epilog = sub.epilog or ""
        assert epilog.startswith("example"), name
        lines = [line.strip() for line in epilog.splitlines()[1:] if line.strip()]
        assert lines, name
        for line in lines:
            argv = shlex.split(line)
            assert argv[0] == "dreamlens" and " ".join(argv[1:]).startswith(name), line
            parser.parse_args(argv[1:])  # SystemExit on a bad example


def test_default_out_is_named_after_the_objective_and_never_taken(tmp_path):
    assert default_out(OBJ, tmp_path) == str(tmp_path / "blocks.1.mlp.hook_post-3")
    assert default_out('logit[" Paris"]', tmp_path) == str(tmp_path / "logit-Paris")
    (tmp_path / "blocks.1.mlp.hook_post-3").mkdir()
    assert default_out(OBJ, tmp_path) == str(tmp_path / "blocks.1.mlp.hook_post-3-2")


def test_dream_without_out_saves_to_a_folder_it_prints(tmp_path, monkeypatch, capsys, tiny_cli):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "dream", OBJ, *TINY)
    assert rc == 0, err
    assert "saving to dreams/blocks.1.mlp.hook_post-3 (--out FOLDER to choose)" in out
    assert "saved to dreams/blocks.1.mlp.hook_post-3" in out
    assert dl.DreamResult.load(tmp_path / "dreams" / "blocks.1.mlp.hook_post-3").objective == OBJ
    rc, out, err = run_cli(capsys, "dream", OBJ, *TINY)  # a second dream never replaces the first
    assert rc == 0, err
    assert "saving to dreams/blocks.1.mlp.hook_post-3-2" in out
    assert (tmp_path / "dreams" / "blocks.1.mlp.hook_post-3-2" / "result.json").is_file()


def test_a_resumed_dream_goes_on_in_its_folder(tmp_path, monkeypatch, capsys, tiny_cli):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "dream", OBJ, *TINY, "--out", "d")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "dream", OBJ, *TINY, "--iters", "3", "--resume", "d")  # the same config, more iters
    assert rc == 0, err
    assert "saving to" not in out and "saved to d " in out
    assert dl.DreamResult.load(tmp_path / "d").iterations == 3 and not (tmp_path / "dreams").exists()


def test_report_folder_writes_its_page_into_the_folder(tmp_path, capsys, tiny_cli):
    rc, _, err = run_cli(capsys, "dream", OBJ, *TINY, "--out", tmp_path / "d")
    assert rc == 0, err
    for _ in range(2):  # made again, the page is replaced
        rc, out, err = run_cli(capsys, "report", tmp_path / "d", "--attributions", "0")
        assert rc == 0, err
        assert f"wrote {tmp_path / 'd' / 'report.html'}" in out
    assert "Dream report" in (tmp_path / "d" / "report.html").read_text()
    assert dl.DreamResult.load(tmp_path / "d").objective == OBJ  # still a result folder
    rc, _, err = run_cli(capsys, "dream", OBJ, *TINY, "--out", tmp_path / "d", "--force")  # and still replaceable
    assert rc == 0, err


def test_a_block_out_of_range_names_the_models_blocks(tiny_model, capsys, tiny_cli):
    with pytest.raises(dl.ObjectiveError, match=r"the model has 2 blocks \(0\.\.1\); the last one's is 'blocks\.1\.mlp\.hook_post'"):
        dl.objective("blocks.99.mlp.hook_post[0]").validate(tiny_model)
    with pytest.raises(dl.ObjectiveError, match="did you mean 'blocks.1.mlp.hook_post'"):  # another fault: the hint
        dl.objective("blocks.1.mlp.hook_pots[0]").validate(tiny_model)
    with pytest.raises(dl.ObjectiveError, match="did you mean"):  # a block in range, the rest wrong
        dl.objective("blocks.9.mlp.hook_pots[0]").validate(tiny_model)
    rc, _, err = run_cli(capsys, "dream", "blocks.99.mlp.hook_post[0]", *TINY, "--out", "unused")
    assert_one_error_line(rc, err, "the model has 2 blocks (0..1)")
