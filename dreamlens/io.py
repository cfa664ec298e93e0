"""Atomic file writes and content digests: the one implementation every module that saves files uses.
A write goes to a temporary sibling first and is renamed into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

_DIGEST_SIZE = 16  # bytes of blake2b: 32 hex digits
_READ_CHUNK = 1 << 24


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: into a temporary file in the same folder (which must exist),
    then renamed over `path`. On any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write` of a text (no newline translation: the bytes are `text.encode(encoding)`)."""
    return atomic_write(path, text.encode(encoding))


def digest(data: bytes) -> str:
    """The checksum of `data`: blake2b, 16 bytes, as 32 hex digits."""
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).hexdigest()


def digest_file(path: str | os.PathLike) -> str:
    """`digest` of a file's bytes, read in chunks (a multi-GB weights file is never held in memory)."""
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(frame: pd.DataFrame, path: str | os.PathLike) -> str:
    """Write `frame` (without its index) as Parquet to `path` atomically; returns the file's `digest`."""
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    data = buf.getvalue()
    atomic_write(path, data)
    return digest(data)
