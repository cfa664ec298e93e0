"""Golden runs: fixed-seed EPO (as published and with its options), ADAPT, GCG, a scan and an attribution
on the tiny model give bitwise the results recorded in tests/golden/ (recorded before the package's
modules were reorganized, kept after it: a move of code must not change a single bit).

Bitwise equality holds on the machine kind the files were recorded on (same torch version and CPU
capability); elsewhere floating-point kernels may differ, so there the test checks token ids exactly
and values to 1e-5. Re-record (only after a change that is meant to alter results) with

    DREAMLENS_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dreamlens as dl

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("DREAMLENS_RECORD_GOLDEN") == "1"
OBJ = "blocks.1.mlp.hook_post[3]"
DOCS = [
    "The committee met on Tuesday to discuss the budget for the coming year, and the members agreed "
    "that spending on schools and roads should rise while the army would stay the same size.",
    "Rivers carry water from the mountains to the sea. Along the way they cut valleys, feed farms, "
    "and give cities a reason to exist; many of the oldest towns stand on their banks.",
    "Coffee was first grown in Ethiopia and Yemen. Traders carried it across the Red Sea, and by the "
    "seventeenth century coffee houses had opened in London, Paris and Vienna.",
]
EPO = dict(length=5, population=3, children=6, topk=32, iters=5, restart_every=3, seed=1)


def _cpu() -> str:
    """The processor's family, model and stepping (Linux), else what `platform` knows: two machines with
    the same torch and instruction set can still differ in the last bit (their kernels block by cache)."""
    try:
        pairs = (line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
        fields = {k.strip(): v.strip() for k, v in pairs}
        return " ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    except OSError:
        return platform.processor() or platform.machine()


def _platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu()}


def _tiny_sae(hook: str):
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=64, d_sae=32, k=4, metadata=SAEMetadata(hook_name=hook)))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (8.0 if name.startswith("W_") else 50.0))
    return sae


def _runs(model) -> dict[str, pd.DataFrame]:
    """Every golden run as a DataFrame (what is compared)."""
    out: dict[str, pd.DataFrame] = {}
    meta: list[dict] = []

    def kept(name: str, result):
        for i, r in enumerate(result if isinstance(result, list) else [result]):
            meta.append({"run": f"{name}/{i}", "n_forward": r.n_forward, "n_gradient": r.n_gradient,
                         "token_forwards": r.token_forwards, "iterations": r.iterations, "stopped": r.stopped,
                         "state": json.dumps(r.state, sort_keys=True, default=str)})
        return result

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out["epo"] = kept("epo", dl.epo(model, OBJ, dl.EPOConfig(**EPO), progress=False)).history
        out["epo_options"] = kept("epo_options", dl.epo(
            model, OBJ, dl.EPOConfig(**EPO, init="sample", lm_share=0.5, restart_patience=2), progress=False)).history
        two = kept("epo_two_objectives", dl.epo(model, [OBJ, "blocks.0.mlp.hook_post[5]"],
                                                dl.EPOConfig(**EPO, prefix="Hello", suffix=" world"), progress=False))
        out["epo_two_objectives"] = pd.concat([r.history.assign(objective=i) for i, r in enumerate(two)], ignore_index=True)
        sae = _tiny_sae("blocks.1.hook_resid_post")
        out["epo_sae"] = kept("epo_sae", dl.epo(model, dl.SAELatent(sae, 7, pre_activation=True), dl.EPOConfig(**EPO),
                                                progress=False)).history
        adapt_cfg = dl.ADAPTConfig(length=4, beams=2, beam_lm=2, beam_grad=2, children=4, iters=6, patience=1, seed=1,
                                   lm_share=0.0, shift_share=0.0)  # the gradient's moves only, as recorded
        out["adapt"] = kept("adapt", dl.adapt(model, OBJ, adapt_cfg, progress=False)).history
        out["gcg"] = kept("gcg", dl.gcg(model, "blocks.1.hook_resid_post[7]@max - 0.5*blocks.0.mlp.hook_post[2]",
                            dl.GCGConfig(length=5, children=8, topk=16, iters=5, seed=2), progress=False)).history
    out["run_meta"] = pd.DataFrame(meta)
    g = torch.Generator().manual_seed(1)
    objs = [dl.objective(OBJ), dl.Direction("blocks.1.hook_resid_post", torch.randn(64, generator=g))]
    res = dl.scan(model, objs, DOCS, tokens=90, window=8, top_k=5, per_document=2, batch_size=7, cache=False,
                  progress=False)
    out["scan_stats"] = res.stats.reset_index(drop=True)
    out["scan_examples"] = res.examples.reset_index(drop=True)
    out["scan_sketch"] = res.sketch.to_frame().reset_index(drop=True)
    a = dl.attribute(model, OBJ, " The cat sat on the mat", n_gradient=3, n_random=2, seed=1)
    out["attribution"] = pd.DataFrame({
        "ids": a.ids.tolist(), "tokens": a.tokens, "alt_ids": a.alt_ids.tolist(), "alt_values": a.alt_values.tolist(),
        "alt_xe": a.alt_xe.tolist(), "value": a.value, "xe": a.xe})
    return {k: _plain(v) for k, v in out.items()}


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Array cells as lists, so Parquet round-trips them exactly and comparisons are element-wise."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object and len(df) and isinstance(df[c].iloc[0], np.ndarray):
            df[c] = [v.tolist() for v in df[c]]
    return df


@pytest.fixture(scope="module")
def runs(tiny_model):
    return _runs(tiny_model)


def test_record_or_load(runs):
    if not RECORD:
        pytest.skip("recording is off (DREAMLENS_RECORD_GOLDEN=1 records)")
    GOLDEN.mkdir(exist_ok=True)
    for name, df in runs.items():
        df.to_parquet(GOLDEN / f"{name}.parquet", index=False)
    (GOLDEN / "platform.json").write_text(json.dumps(_platform(), indent=1) + "\n")


@pytest.mark.parametrize("name", ["epo", "epo_options", "epo_two_objectives", "epo_sae", "adapt", "gcg",
                                  "run_meta", "scan_stats", "scan_examples", "scan_sketch", "attribution"])
def test_golden(runs, name):
    want = pd.read_parquet(GOLDEN / f"{name}.parquet")
    got = _plain(pd.read_parquet(_roundtrip(runs[name])))
    want = _plain(want)
    assert len(want) > 0
    bitwise = json.loads((GOLDEN / "platform.json").read_text()) == _platform()
    if bitwise:
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        return
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for c in want.columns:
        if pd.api.types.is_float_dtype(want[c]):
            np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), rtol=1e-5, atol=1e-5, err_msg=c)
        elif c in ("ids", "alt_ids", "text", "tokens", "iteration", "run", "stopped", "iterations"):
            assert got[c].tolist() == want[c].tolist(), c


def _roundtrip(df: pd.DataFrame):
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    buf.seek(0)
    return buf
