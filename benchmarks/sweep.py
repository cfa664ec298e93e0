"""A sweep on three engines: the local engine in this process on one torch thread, then Ray with 1 and with
2 one-thread workers (one local Ray cluster of 2 CPUs on 127.0.0.1, started once and timed apart). Each
engine runs the same sweep into a fresh folder; its wall time includes loading the model (each Ray worker
loads its own) and every chunk's scan (split across the workers and merged on Ray). Also checks that
the three give the same results (dreams exactly, scan statistics within float rounding).

Full run: 64 latents of the embedded SAE (`sae:embedded[0:64]`) on the embedded model, a small budget.
--quick: 8 MLP neurons of the tiny random model (`dreamlens.testing:tiny_model`), the same code path.

Headlines: ray_overhead = Ray with 1 worker / local (the cost of the engine), and last line
ray_speedup_2 = local / Ray with 2 workers.

--scale (issue 26): a sweep at scale, killed once midway and resumed, as a user runs it: `dreamlens sweep
SPEC --ray --workers 2` (a local cluster on 127.0.0.1) in another process, SIGKILLed once half its chunks
are stored, then the same command again. Full: 256 latents of the embedded SAE (of its 4,096) at 1,000
token-forwards each, chunks of 8 (a 16,384-token scan each); --quick: 8 neurons of the tiny model. Reports
objectives per hour (both runs' wall time, the kill and the restart included), the lost work (objectives
stored before the kill and computed again: none expected; the wall time since the last stored chunk,
whose work in flight is redone), the measured token-forwards per objective, an extrapolation to every
latent of the SAE and to N GPUs (its assumptions printed), and the sweep report of all of them (the
resumed run's summary and report.html in --out). Last line objectives_per_hour.

    python benchmarks/sweep.py [--quick] [--latents N] [--budget TOKEN_FORWARDS] [--tokens N] [--chunk-size N]
    python benchmarks/sweep.py --scale [--quick] [--out DIR] [--workers 2] [--kill-at 0.5] [--gpu-tflops T]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch


def same(a: Any, b: Any) -> bool:
    """Same rows and values: frontiers exactly, summaries (less timing) within float rounding."""
    try:
        pd.testing.assert_frame_equal(a.summary.drop(columns=["seconds"]), b.summary.drop(columns=["seconds"]),
                                      check_exact=False, rtol=1e-6)
        pd.testing.assert_frame_equal(a.frontiers, b.frontiers, check_exact=True)
    except AssertionError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny model, 8 objectives (under a minute)")
    ap.add_argument("--latents", type=int, default=None, help="objectives (default 64, quick 8)")
    ap.add_argument("--budget", type=int, default=None, help="token-forwards per objective (default 1000, quick 400)")
    ap.add_argument("--tokens", type=int, default=None, help="corpus tokens scanned per chunk (default 16384, quick 2048)")
    ap.add_argument("--chunk-size", type=int, default=None, help="objectives per chunk (default 8, quick 2)")
    ap.add_argument("--scale", action="store_true", help="the run at scale, killed midway and resumed (default 256 latents)")
    ap.add_argument("--out", default=None, help="--scale: the folder of its sweep and report (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=2, help="--scale: Ray workers (default 2)")
    ap.add_argument("--kill-at", type=float, default=0.5, help="--scale: the share of chunks stored when the driver is killed")
    ap.add_argument("--gpu-tflops", type=float, default=50.0,
                    help="--scale: the sustained TFLOP/s per GPU assumed by the extrapolation (default 50)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.scale:
        scale(args)
        return

    import dreamlens as dl
    from dreamlens.sweeps.ray_engine import cluster

    if args.quick:
        n = args.latents or 8
        spec, model, length, window = f"blocks.1.mlp.hook_post[0:{n}]", "dreamlens.testing:tiny_model", 4, 16
    else:
        n = args.latents or 64
        spec, model, length, window = f"sae:embedded[0:{n}]", None, 8, 24
    kw: dict[str, Any] = dict(
        model=model, max_token_forwards=args.budget or (400 if args.quick else 1000),
        scan=dl.ScanConfig(tokens=args.tokens or (2048 if args.quick else 16384), window=window, top_k=8),
        chunk_size=args.chunk_size or (2 if args.quick else 8), length=length, progress=False,
    )
    print(f"sweep {spec!r}: {n} objectives, {kw}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="dreamlens-bench-sweep-"))
    walls: dict[str, float] = {}
    results: dict[str, Any] = {}
    try:

        def run(name: str, **engine: Any) -> None:
            t0 = time.perf_counter()
            results[name] = dl.sweep(spec, root / name, **kw, **engine)
            walls[name] = time.perf_counter() - t0
            assert results[name].complete, f"{name}: the sweep is incomplete"
            print(f"{name}: {walls[name]:.1f}s, {n / walls[name] * 3600:.0f} objectives/hour", flush=True)

        run("local")
        t0 = time.perf_counter()
        with cluster(None, 2):
            print(f"ray_cluster_start: {time.perf_counter() - t0:.1f}s (not counted below)", flush=True)
            run("ray_1", engine="ray", workers=1)
            run("ray_2", engine="ray", workers=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"same_results: {same(results['local'], results['ray_1']) and same(results['local'], results['ray_2'])}")
    print(f"ray_overhead: {walls['ray_1'] / walls['local']:.3f}")
    print(f"ray_speedup_2: {walls['local'] / walls['ray_2']:.3f}")


# ---------------------------------------------------------------------------------------------
# --scale: killed midway, resumed

CLI = "import sys; from dreamlens.cli import main; sys.exit(main(sys.argv[1:]))"
SAE_LATENTS = 4096  # the embedded SAE's


def digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def stored(folder: Path) -> dict[str, str]:
    """The chunks stored in a sweep folder (a chunk is done when its summary file is): name -> digest of its files."""
    names = sorted(p.name for p in (folder / "summary").glob("chunk-*.parquet")) if (folder / "summary").is_dir() else []
    return {n: "".join(digest(folder / t / n) for t in ("frontiers", "examples", "summary")) for n in names}


def end_processes(procs: list, seconds: float) -> list[str]:
    """Wait up to `seconds` for `procs` (psutil processes) to end; SIGKILL those left (this run started them)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=seconds)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.name())
                p.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def name_of(proc: Any) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def scale(args: argparse.Namespace) -> None:
    import psutil

    import dreamlens as dl
    from dreamlens.viz.sweep_report import write_sweep_report

    if args.quick:
        n = args.latents or 8
        spec, model, length, window = f"blocks.1.mlp.hook_post[0:{n}]", "dreamlens.testing:tiny_model", 4, 16
        budget, tokens, chunk = args.budget or 400, args.tokens or 2048, args.chunk_size or 2
    else:
        n = args.latents or 256
        spec, model, length, window = f"sae:embedded[0:{n}]", None, 8, 24
        budget, tokens, chunk = args.budget or 1000, args.tokens or 16384, args.chunk_size or 8
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dreamlens-bench-scale-"))
    out = root / "sweep"
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists: remove it, or give another --out (the run starts from an empty sweep)")
    root.mkdir(parents=True, exist_ok=True)
    chunks = math.ceil(n / chunk)
    kill_after = min(chunks - 1, max(1, round(args.kill_at * chunks)))
    argv = ["sweep", spec, "--out", str(out), "--budget", str(budget), "--tokens", str(tokens), "--window", str(window),
            "--top-examples", "8", "--chunk-size", str(chunk), "--length", str(length), "--quiet", "--ray", "--workers",
            str(args.workers), *(["--model", model] if model else [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster on 127.0.0.1
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"scale run: {spec!r}, {n} objectives in {chunks} chunks of {chunk}, ADAPT length {length} at {budget} "
          f"token-forwards each, a {tokens}-token scan per chunk, {args.workers} Ray workers; the driver is killed once "
          f"{kill_after} chunks are stored", flush=True)
    print("command: dreamlens " + " ".join(argv), flush=True)

    # 1. the run that is killed
    t0 = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-c", CLI, *argv], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: list = []
    last_store, seen = t0, 0
    try:
        while (count := len(list((out / "summary").glob("chunk-*.parquet"))) if (out / "summary").is_dir() else 0) < kill_after:
            if driver.poll() is not None:
                raise SystemExit(f"error: the sweep ended before it was killed: {driver.stderr.read() if driver.stderr else ''}")
            if count > seen:
                last_store, seen = time.perf_counter(), count
            try:
                tree = psutil.Process(driver.pid).children(recursive=True) or tree
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.2)
        tree = psutil.Process(driver.pid).children(recursive=True) or tree
        driver.kill()
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    killed_at = time.perf_counter()
    before = stored(out)
    t_end = time.perf_counter()
    # the cluster ends with its driver, but Ray's two agents take ~80 s to notice: they are ended here
    agents = [p for p in tree if "Agent" in name_of(p)]
    left = end_processes([p for p in tree if p not in agents], 30)
    waited = time.perf_counter() - t_end
    left += end_processes(agents, 0)
    print(f"killed_run_wall_s: {killed_at - t0:.1f}", flush=True)
    print(f"stored_at_kill: {len(before)} of {chunks} chunks", flush=True)
    print(f"lost_in_flight_s: {killed_at - max(last_store, t0):.1f} (wall time since the last stored chunk: the work of "
          f"the chunks in flight, redone)", flush=True)
    print(f"ray_processes_after_kill: {len(tree)} ({len(tree) - len(left)} ended by themselves within {waited:.0f} s; "
          f"ended here: {', '.join(left) or 'none'})", flush=True)

    # 2. the same command again
    t1 = time.perf_counter()
    again = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, capture_output=True, text=True)
    resumed = time.perf_counter() - t1
    if again.returncode != 0:
        raise SystemExit(f"error: the resumed run failed ({again.returncode}): {again.stderr[-3000:]}")
    after = stored(out)
    recomputed = [k for k, v in before.items() if after.get(k) != v]
    sw = dl.load_sweep(out)
    duplicates = int(sw.summary["index"].duplicated().sum())
    duplicates += sum(int(t[["index", "rank"]].duplicated().sum()) for t in (sw.frontiers, sw.examples))
    done = int(sw.summary["index"].nunique())
    page = write_sweep_report(root / "report.html", sw)
    print(f"resumed_run_wall_s: {resumed:.1f}", flush=True)
    print("resumed run's report:\n  " + "\n  ".join(again.stdout.strip().splitlines()), flush=True)
    print(f"report: {page} ({done} of {n} objectives)", flush=True)

    # 3. figures
    s = sw.summary
    tf = float(s["token_forwards"].mean())
    scan_tf = tokens / chunk  # a chunk's scan is one forward pass over `tokens` tokens, shared by its objectives
    total = killed_at - t0 + resumed
    rate = done / total * 3600
    print(f"complete: {sw.complete and done == n}")
    def objectives(names: list[str]) -> int:
        return sum(len(sw.objectives[int(c[6:11]) * chunk : (int(c[6:11]) + 1) * chunk]) for c in names)

    print(f"recomputed_after_resume: {objectives(recomputed)} (objectives stored before the kill and computed again)")
    print(f"duplicate_rows: {duplicates}")
    print(f"errors: {int((s['stopped'] == 'error').sum())}")
    print(f"beats_dataset: {int(s['beats_dataset'].sum())} of {len(s)}")
    print(f"token_forwards_per_objective: {tf:.0f} (dream; measured) + {scan_tf:.0f} (its share of its chunk's scan)")
    print(f"dream_seconds_per_objective: {float(s['seconds'].mean()):.2f} (on one worker)")
    print(f"objectives_per_hour_resumed: {(done - objectives(list(before))) / resumed * 3600:.0f} (the resumed run alone, "
          "its start included)")
    params = model_params(model)
    flops = (tf + scan_tf) * 2 * params
    print(f"extrapolation: all {SAE_LATENTS} latents at this rate: {SAE_LATENTS / rate:.1f} h on {args.workers} CPU worker(s)")
    print(f"extrapolation: on GPUs, assuming {args.gpu_tflops:g} TFLOP/s sustained per GPU (an assumption, not a "
          f"measurement) and 2 x {params / 1e6:.0f}M FLOPs per token-forward: {SAE_LATENTS} x {tf + scan_tf:.0f} "
          f"token-forwards x {2 * params:.3g} FLOPs = {SAE_LATENTS * flops:.3g} FLOPs, "
          f"{SAE_LATENTS * flops / (args.gpu_tflops * 1e12) / 3600:.3g} GPU-hours: that / N hours on N GPUs")
    print(f"objectives_per_hour: {rate:.0f}")


def model_params(spec: str | None) -> int:
    """The parameters of the model a spec names (loaded here once, for the extrapolation's FLOPs)."""
    from dreamlens.sweeps.chunk import load_model_spec

    net = load_model_spec(spec, device="cpu")
    return sum(p.numel() for p in net.parameters())


if __name__ == "__main__":
    main()
