"""Cost of one EPO iteration at the paper's sizes (8 members x 32 children, 12 tokens, top-512) on the
embedded model: what prefix reuse and deduplication save, and how close an iteration comes to the
model's raw work.

Each timed iteration runs twice from the same state, alternately first: with reuse and dedup (the
default Evaluator), and without them (every child and every gradient row forwarded in full). Both
compute their own gradient; the children drawn from the first are evaluated by both, so the two
selections can be compared. The trajectory follows the default. After `--warmup` untimed iterations
(which also fill the dedup cache as a real run would), medians over `--iters` timed iterations:

  reuse_ratio     iteration with reuse+dedup / the same iteration without (target <= 0.6)
  needed_ratio    iteration with reuse+dedup / raw model work for the tokens it actually needed: bare
                  forwards of the new positions on the parents' KV cache, plus a bare forward/backward
                  over the distinct gradient rows (target <= 1.10)
  overhead_ratio  iteration (default) / raw model work for all tokens: a plain forward over all
                  children plus a forward/backward over the population (issue 4; target <= 1.10);
                  overhead_ratio_full is the same for the iteration without reuse and dedup
  selections_identical  whether both variants chose the same members every time
  direct_term_iteration_ratio  iteration with the exact one-hot gradient / the same iteration with the
                  gradient before 2026-11-30 (no direct term of xe): the gradient pass timed both ways,
                  alternately

    python benchmarks/epo_cost.py [--quick] [--iters N] [--warmup N] [--threads T]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, same code path (under a minute)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 3, quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--objective", default="blocks.6.mlp.hook_post[100]")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    timed = args.iters or (1 if args.quick else 3)
    warm = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    import dreamlens as dl
    from dreamlens import scoring
    from dreamlens.optim import epo, loop, members
    from dreamlens.scoring import gradients

    quick, full = dict(length=8, population=4, children=8, topk=64), dict(length=12, population=8, children=32, topk=512)
    size = quick if args.quick else full
    cfg = dl.EPOConfig(**size, seed=0)
    t0 = time.perf_counter()
    model = dl.load_model()
    print(f"model loaded in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} threads; sizes {size}")
    objs, _, layout, banned = loop.prepare(model, args.objective, cfg)
    M, C, L = cfg.population, cfg.children, cfg.length
    GRAD_COST = scoring.GRADIENT_COST
    topk = min(cfg.topk, int((~banned).sum()))
    lams = torch.tensor(cfg.penalties(), dtype=torch.float64)
    owner = torch.zeros(M, dtype=torch.long)
    owner_kids = torch.zeros(M * C, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)

    with scoring.fast_weights(model):
        recorder = scoring.PassRecorder()  # what the default evaluator computed, for raw_needed
        fast = scoring.Evaluator(model, objs, layout, scoring.Batching(batch_size=cfg.batch_size), recorder=recorder)
        pop = members.random_prompts(model, M, layout, members.allowed_tokens(banned), gen)[None]  # [1, M, L]
        f0, x0, _ = fast.evaluate(pop[0], owner, 0)
        pop_f, pop_xe = f0[None], x0[None]

        grad_s: dict[bool, list[float]] = {True: [], False: []}  # by variant: is it the default evaluator?
        grad_rows: dict[bool, list[int]] = {True: [], False: []}

        def iteration(ev: scoring.Evaluator, g: torch.Generator, it: int, children: torch.Tensor | None):
            """One EPO iteration (the loop body of `epo`) from the current state; returns its time,
            its children and the selected indices."""
            start = time.perf_counter()
            n_grad = ev.compute.n_gradient
            grad = ev.gradients(pop[0], owner, lams)
            grad_s[ev is fast].append(time.perf_counter() - start)
            grad_rows[ev is fast].append(ev.compute.n_gradient - n_grad)
            kids = epo.propose_children(pop, grad, banned, topk, C, [g])
            if children is not None:
                kids = children  # the same children for both variants
            cf, cx, _ = ev.evaluate(kids.view(-1, L), owner_kids, it)
            pf, px = torch.cat([pop_f[0], cf]), torch.cat([pop_xe[0], cx])
            best = members.select_members(pf, px, lams)
            return time.perf_counter() - start, kids, best, pf, px

        def raw_all(kids: torch.Tensor) -> float:
            """A plain forward over all children plus a forward/backward over the population."""
            start = time.perf_counter()
            with torch.no_grad():
                for i in range(0, kids.shape[1], cfg.batch_size):
                    model(layout.assemble(kids[0, i : i + cfg.batch_size]))
            fwd_bwd(pop[0])
            return time.perf_counter() - start

        def fwd_bwd(rows: torch.Tensor) -> None:
            tokens = layout.assemble(rows)
            leaf = model.embed(tokens).detach().requires_grad_(True)
            logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda act, hook: leaf)])
            torch.autograd.grad(logits[..., :1].sum(), leaf)

        def raw_needed(ev: scoring.Evaluator) -> float:
            """Bare forwards of what the default evaluator computed: new positions on the parents' KV
            cache (full rows in full), plus a forward/backward over its distinct gradient rows."""
            Cache, Entry = scoring.kv_classes()
            parents = ev.parents
            start_t = time.perf_counter()
            with torch.no_grad():
                for start, rows, par in recorder.plan:
                    if not len(rows):
                        continue
                    n_per = ev.batcher.rows(layout.seq_len - start)
                    for i in range(0, len(rows), n_per):
                        tokens = layout.assemble(rows[i : i + n_per])
                        if start == 0:
                            model(tokens)
                            continue
                        p = par[i : i + n_per]
                        cache = Cache(
                            entries=[
                                Entry(past_keys=k[p, :start], past_values=v[p, :start], frozen=True)
                                for k, v in zip(parents.keys, parents.values)
                            ],
                            previous_attention_mask=torch.ones((len(p), start), dtype=torch.int),
                            frozen=True,
                        )
                        new = tokens[:, start:]
                        model(new, past_kv_cache=cache, attention_mask=torch.ones_like(new))
            assert recorder.gradient_rows is not None
            fwd_bwd(recorder.gradient_rows)
            return time.perf_counter() - start_t

        def direct_term_times() -> tuple[float, float]:
            """The default gradient pass over the population, with the xe's direct term (the exact
            gradient) and without it (the gradient dreamlens had before 2026-11-30), timed alternately."""
            out = {}
            for direct_on in (True, False) if len(direct) % 2 == 0 else (False, True):
                saved = gradients.add_selection_term  # looked up by gradients.gradient_pass
                if not direct_on:
                    gradients.add_selection_term = lambda *a, **k: None
                try:
                    start = time.perf_counter()
                    fast.gradients(pop[0], owner, lams)
                    out[direct_on] = time.perf_counter() - start
                finally:
                    gradients.add_selection_term = saved
            return out[True], out[False]

        direct: list[tuple[float, float]] = []
        # untimed warm-up: the first passes of a process are slow, and the dedup cache fills as in a run
        for it in range(1, warm + 1):
            _, kids, best, pf, px = iteration(fast, gen, it, None)
            pool = torch.cat([pop[0], kids[0]])
            pop[0], pop_f[0], pop_xe[0] = pool[best], pf[best], px[best]
        plain = scoring.Evaluator(
            model, objs, layout, scoring.Batching(batch_size=cfg.batch_size, reuse_prefix=False, dedup=False)
        )
        iteration(plain, torch.Generator().manual_seed(1), 0, None)  # warm the plain path too

        t_fast, t_plain, r_all, r_needed, same, work = [], [], [], [], [], []
        for j, it in enumerate(range(warm + 1, warm + timed + 1)):
            # The children, drawn once (untimed) so that both variants evaluate exactly the same ones.
            state = gen.get_state()
            kids = epo.propose_children(pop, fast.gradients(pop[0], owner, lams), banned, topk, C, [gen])
            runs = {}
            for name in (("fast", "plain") if j % 2 == 0 else ("plain", "fast")):
                g = torch.Generator()
                g.set_state(state)
                ev = fast if name == "fast" else plain
                before = ev.compute.token_forwards, ev.compute.saved_token_forwards, len(ev.cache)
                runs[name] = iteration(ev, g, it, kids)
                if name == "fast":
                    c = ev.compute
                    work.append((c.token_forwards - before[0], c.saved_token_forwards - before[1], len(ev.cache) - before[2]))
            (tf, _, best_f, pf, px), (tp, _, best_p, _, _) = runs["fast"], runs["plain"]
            g_with, g_without = direct_term_times()
            direct.append((g_with, g_without))
            needed = raw_needed(fast)
            everything = raw_all(kids)
            t_fast.append(tf)
            t_plain.append(tp)
            r_needed.append(needed)
            r_all.append(everything)
            same.append(bool(torch.equal(best_f, best_p)))
            print(
                f"iteration {it}: with reuse+dedup {tf:.2f}s (gradient pass {grad_s[True][-1]:.2f}s over "
                f"{grad_rows[True][-1]} distinct rows), without {tp:.2f}s (gradient pass {grad_s[False][-1]:.2f}s); "
                f"ratio {tf / tp:.3f}; raw needed "
                f"{needed:.2f}s, raw all {everything:.2f}s; {work[-1][2]} new distinct of {M * C} children; "
                f"same selection: {same[-1]}",
                flush=True,
            )
            pool = torch.cat([pop[0], kids[0]])
            pop[0], pop_f[0], pop_xe[0] = pool[best_f], pf[best_f], px[best_f]

    med = statistics.median
    reuse_ratio = med(a / b for a, b in zip(t_fast, t_plain))
    print(f"gradient_pass_s with the exact gradient: {med(d[0] for d in direct):.3f}; without the direct term "
          f"(before 2026-11-30): {med(d[1] for d in direct):.3f}")
    print(f"direct_term_iteration_ratio: {med(t / (t - a + b) for t, (a, b) in zip(t_fast, direct)):.3f} "
          "(iteration with the exact gradient / the same iteration with the old one)")
    print(f"iteration_s_with: {med(t_fast):.3f}")
    print(f"iteration_s_without: {med(t_plain):.3f}")
    with_reuse, not_recomputed = med(w[0] for w in work), med(w[1] for w in work)
    without = (GRAD_COST * M + M * C) * layout.seq_len
    print(f"token_forwards_with: {with_reuse:.0f} (not recomputed thanks to reuse: {not_recomputed:.0f}); without: {without}")
    print(f"needed_ratio: {med(a / b for a, b in zip(t_fast, r_needed)):.3f}")
    print(f"overhead_ratio: {med(a / b for a, b in zip(t_fast, r_all)):.3f}")
    print(f"overhead_ratio_full: {med(a / b for a, b in zip(t_plain, r_all)):.3f}")
    print(f"selections_identical: {all(same)}")
    print(f"reuse_ratio: {reuse_ratio:.3f}")


if __name__ == "__main__":
    main()
