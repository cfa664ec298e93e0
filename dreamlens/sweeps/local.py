"""The local engine: the unfinished chunks of a sweep one after another in this process, on one model,
each stored as soon as it is done (Ctrl-C or SIGTERM keeps every finished chunk)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ..optim.loop import sigterm_as_interrupt
from .chunk import SweepSettings, run_chunk

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from .store import SweepStore


def run_local(
    store: SweepStore, settings: SweepSettings, model: HookedTransformer, *, saes: dict[str, Any] | None = None,
    progress: bool = True,
) -> None:
    """Run and store every unfinished chunk of `store` on `model`; a progress bar counts objectives."""
    todo = store.todo()
    total = len(store.objectives)
    left = sum(len(objs) for _, objs in todo)
    saes = {} if saes is None else saes
    bar = tqdm(total=total, initial=total - left, desc="sweep", unit="obj", dynamic_ncols=True, disable=not progress)
    try:
        with sigterm_as_interrupt():
            for number, objs in todo:
                frames = run_chunk(model, objs, settings, first=number * settings.chunk_size, saes=saes)
                store.write_chunk(number, frames)
                bar.update(len(objs))
    finally:
        bar.close()
