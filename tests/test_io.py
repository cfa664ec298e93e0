"""Atomic writes and digests: the bytes land whole or not at all, and a file's digest is its bytes' digest."""

from __future__ import annotations

import pandas as pd
import pytest

from dreamlens import io


def test_atomic_write_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    assert io.atomic_write(path, b"\x00new\xff") == path
    assert path.read_bytes() == b"\x00new\xff"
    io.atomic_write_text(path, "caf\u00e9\n")
    assert path.read_bytes() == "caf\u00e9\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        io.atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(FileNotFoundError):
        io.atomic_write(tmp_path / "no" / "such" / "folder.txt", b"x")


def test_digests_and_parquet(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "d").write_bytes(data)
    assert io.digest_file(tmp_path / "d") == io.digest(data) and len(io.digest(data)) == 32
    assert io.digest(data) != io.digest(data[:-1])
    frame = pd.DataFrame({"a": [1, 2], "ids": [[1, 2], [3]]})
    d = io.write_parquet(frame, tmp_path / "f.parquet")
    assert d == io.digest_file(tmp_path / "f.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f.parquet").assign(ids=lambda f: f["ids"].map(list)), frame)
