"""The cache of scored prompts: each prompt's values for every objective and its xe, keyed by its
token ids, so that no prompt is forwarded twice."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


class ScoreCache:
    """Scored prompts keyed by their ids, so no prompt is evaluated twice (bounded, least recent out)."""

    def __init__(self, max_size: int = 2_000_000):
        self.max_size = max_size
        self._d: OrderedDict[bytes, tuple[np.ndarray, float]] = OrderedDict()

    @staticmethod
    def key(ids: Sequence[int] | Tensor) -> bytes:
        if isinstance(ids, Tensor):
            return ids.to(torch.int64).cpu().numpy().tobytes()
        if isinstance(ids, np.ndarray):
            return np.ascontiguousarray(ids, dtype=np.int64).tobytes()
        return torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes()

    def get(self, key: bytes) -> tuple[np.ndarray, float] | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: bytes, value: tuple[np.ndarray, float]) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        if len(self._d) > self.max_size:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: bytes) -> bool:
        return key in self._d
