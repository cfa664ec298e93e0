"""Find and document readable latents of the embedded SAE, from held-out text it was not trained on.

    python scripts/embedded_sae_latents.py --explore /tmp/latents.txt   # candidates, to read by eye
    python scripts/embedded_sae_latents.py                              # write dreamlens/data/sae/latents.md

The second form lists `dreamlens.sae.EMBEDDED_SAE_LATENTS` (chosen by reading the first form's report)
with their top contexts. Contexts are scored as dreamlens scores prompts: token 0, then 63 tokens of one
held-out document.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
from pathlib import Path

import torch

WINDOW = 63


@torch.no_grad()
def top_activations(model, sae, windows: torch.Tensor, n_top: int = 24, batch: int = 32):
    """Per latent: its `n_top` largest activations over all windows (one per window), with (window,
    position), and how often it fires (fraction of tokens)."""
    hook = sae.cfg.metadata.hook_name
    layer = int(hook.split(".")[1])
    d_sae = sae.cfg.d_sae
    best_val = torch.full((n_top, d_sae), -1.0)
    best_win = torch.zeros((n_top, d_sae), dtype=torch.long)
    best_pos = torch.zeros((n_top, d_sae), dtype=torch.long)
    fired = torch.zeros(d_sae)
    n_tokens = 0
    for start in range(0, len(windows), batch):
        chunk = windows[start : start + batch]
        _, cache = model.run_with_cache(chunk, names_filter=hook, stop_at_layer=layer + 1)
        f = sae.encode(cache[hook][:, 1:])  # [b, pos, d_sae], BOS excluded
        fired += (f > 0).sum((0, 1)).float()
        n_tokens += f.shape[0] * f.shape[1]
        val, pos = f.max(1)  # one candidate per window: its max position
        win = torch.arange(start, start + len(chunk)).unsqueeze(1).expand_as(val)
        all_val = torch.cat([best_val, val])
        all_win = torch.cat([best_win, win])
        all_pos = torch.cat([best_pos, pos + 1])  # +1: position in the window, BOS included
        top = all_val.topk(n_top, dim=0).indices
        best_val = all_val.gather(0, top)
        best_win = all_win.gather(0, top)
        best_pos = all_pos.gather(0, top)
    return best_val, best_win, best_pos, fired / n_tokens


def context(model, window: torch.Tensor, pos: int, before: int = 14, after: int = 3) -> str:
    """The text around `pos`, the activating token in [[double brackets]]."""
    from dreamlens.models import decode

    lo = max(1, pos - before)
    left = decode(model, window[lo:pos])
    tok = decode(model, window[pos : pos + 1])
    right = decode(model, window[pos + 1 : pos + 1 + after])
    return (left + "[[" + tok + "]]" + right).replace("\n", "\\n")


def explore(model, windows, vals, wins, poss, freq, out: Path, n_show: int = 8) -> None:
    """A report of latents that fire now and then (1 in 20,000 to 1 in 50 tokens), most consistent
    first: those whose top activations sit on few distinct tokens are usually the easiest to name."""
    lines = []
    d_sae = vals.shape[1]
    for i in range(d_sae):
        if not 5e-5 <= freq[i] <= 2e-2 or vals[n_show - 1, i] <= 0:
            continue
        toks = [int(windows[wins[j, i], poss[j, i]]) for j in range(n_show)]
        distinct = len(set(toks))
        lines.append((distinct, i))
    lines.sort()
    with out.open("w") as fh:
        for distinct, i in lines:
            fh.write(f"=== latent {i}  freq {freq[i]:.2e}  max {vals[0, i]:.2f}  distinct tokens {distinct}\n")
            for j in range(n_show):
                fh.write(f"  {vals[j, i]:7.2f}  {context(model, windows[wins[j, i]], int(poss[j, i]))}\n")
    print(f"{len(lines)} candidate latents written to {out}")


def write_markdown(model, sae, windows, vals, wins, poss, freq, latents: dict[int, str], out: Path) -> None:
    hook = sae.cfg.metadata.hook_name
    parts = [
        "# Readable latents of the embedded SAE\n",
        f"TopK SAE on `{hook}` of SmolLM2-135M ({sae.cfg.d_sae} latents, k={sae.cfg.k}). Each latent is "
        "listed with its firing rate and its three top contexts in held-out text "
        f"({len(windows)} contexts of token 0 then {WINDOW} tokens, from documents the SAE was not trained "
        "on); the activating token is in [[double brackets]]. Written by "
        "`scripts/embedded_sae_latents.py`; the same list is `dreamlens.sae.EMBEDDED_SAE_LATENTS`.\n",
        "Dream one with `dreamlens.SAELatent(dreamlens.load_sae(), index)` (or the string form "
        "`sae:embedded[index]`).\n",
    ]
    for i, desc in latents.items():
        parts.append(f"## Latent {i}: {desc}\n")
        parts.append(f"Fires on {freq[i]:.3%} of held-out tokens; top activation {vals[0, i]:.2f}.\n")
        for j in range(3):
            parts.append(f"{j + 1}. ({vals[j, i]:.2f}) `{context(model, windows[wins[j, i]], int(poss[j, i]))}`")
        parts.append("")
    out.write_text("\n".join(parts) + "\n")
    print(f"wrote {out}")


def main(argv=None) -> None:
    import dreamlens
    from dreamlens.corpus import token_windows
    from dreamlens.sae import EMBEDDED_SAE_LATENTS, embedded_sae_dir, embedded_sae_documents, load_sae

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--explore", type=Path, help="write a report of candidate latents here instead")
    p.add_argument("--out", type=Path, default=embedded_sae_dir() / "latents.md")
    p.add_argument("--sae", default=None, help="another SAE folder (default: the embedded SAE)")
    p.add_argument("--max-windows", type=int, default=None, help="scan only this many contexts (quick checks)")
    args = p.parse_args(argv)

    model = dreamlens.load_model()
    sae = load_sae(args.sae)
    windows = torch.stack(list(token_windows(model, embedded_sae_documents("heldout"), WINDOW)))
    windows = windows[: args.max_windows]
    vals, wins, poss, freq = top_activations(model, sae, windows)
    if args.explore:
        explore(model, windows, vals, wins, poss, freq, args.explore)
    else:
        if not EMBEDDED_SAE_LATENTS:
            raise SystemExit("dreamlens.sae.EMBEDDED_SAE_LATENTS is empty: choose latents with --explore first")
        write_markdown(model, sae, windows, vals, wins, poss, freq, EMBEDDED_SAE_LATENTS, args.out)


if __name__ == "__main__":
    main()
