"""What an Evaluator did, pass by pass, for benchmarks that replay its work with bare forwards: an
optional PassRecorder the Evaluator reports to (runs never need one)."""

from __future__ import annotations

from torch import Tensor


class PassRecorder:
    """The latest `score_rows` call's pass groups and the latest gradient pass's rows of the Evaluators
    it is given to (`Evaluator(..., recorder=...)`; shared with their `sibling`s).

    `plan`: one (start, rows, parents) per pass group of the latest scoring call: full passes have
    start 0 and no parents; reused ones start at `start` on the rows' `parents` (indices into the
    evaluator's `parents`). `gradient_rows`: the distinct rows of the latest gradient pass."""

    def __init__(self) -> None:
        self.plan: list[tuple[int, Tensor, Tensor | None]] = []
        self.gradient_rows: Tensor | None = None

    def scoring(self) -> None:
        """A scoring call begins: its pass groups replace the previous call's."""
        self.plan = []

    def pass_group(self, start: int, rows: Tensor, parents: Tensor | None) -> None:
        """One pass group of the current scoring call."""
        self.plan.append((start, rows, parents))

    def gradient_pass(self, rows: Tensor) -> None:
        """The rows a gradient pass went through."""
        self.gradient_rows = rows
