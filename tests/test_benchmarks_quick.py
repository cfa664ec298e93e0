"""Every benchmark's `--quick` path runs and ends with its headline as `name: value`, so a change that
breaks a benchmark shows in CI, not when someone next measures (select with `-m bench_quick`)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
HEADLINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*: [-+0-9.eEnaif]+$")

pytestmark = [pytest.mark.bench_quick, pytest.mark.integration]


def test_every_benchmark_is_covered():
    assert "fluency.py" in SCRIPTS and len(SCRIPTS) >= 6


# a benchmark's run with a quick path of its own, beside the script's default one
RUNS = [pytest.param(s, [], id=s) for s in SCRIPTS] + [pytest.param("sweep.py", ["--scale"], id="sweep.py --scale")]


@pytest.mark.parametrize("script, extra", RUNS)
def test_quick_path_ends_with_a_headline(script, extra, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [sys.executable, str(ROOT / "benchmarks" / script), *extra, "--quick"]
    if "--out" in subprocess.run([*argv[:2], "--help"], capture_output=True, text=True, env=env, cwd=tmp_path).stdout:
        argv += ["--out", str(tmp_path / "out")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines and HEADLINE.match(lines[-1].strip()), lines[-5:]
