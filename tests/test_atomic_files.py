"""fgs_common.atomic_files: whole files or none, one temporary-name convention that the client's resume sweeps."""

from __future__ import annotations

import os
import shutil

import pytest

from fgs_client.dataset_writer import remove_temporary_files
from fgs_common.atomic_files import (
    atomic_directory,
    atomic_path,
    atomic_writer,
    is_temporary_name,
    temporary_name,
    write_atomic,
)


def test_write_atomic_writes_bytes_and_text_and_replaces(tmp_path):
    target = tmp_path / "deep" / "er" / "file.bin"
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_atomic(target, "grüße\n")
    assert target.read_bytes() == "grüße\n".encode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "manifest.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_writer(target, "w", encoding="utf-8") as handle:
            handle.write("new, half")
            # until the block ends, readers still see the old file whole
            assert target.read_text() == "old\n"
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_atomic_path_takes_a_copy(tmp_path):
    source = tmp_path / "real.jpg"
    source.write_bytes(b"jpeg bytes")
    os.utime(source, (1_000_000, 1_000_000))
    dest = tmp_path / "out" / "real.jpg"
    with atomic_path(dest) as temporary:
        assert is_temporary_name(temporary.name) and temporary.parent == dest.parent
        shutil.copy2(source, temporary)
    assert dest.read_bytes() == b"jpeg bytes"
    assert dest.stat().st_mtime == 1_000_000
    assert [p.name for p in dest.parent.iterdir()] == ["real.jpg"]


def test_atomic_writer_refuses_modes_that_do_not_write_a_new_file(tmp_path):
    with pytest.raises(ValueError, match="'ab'"):
        with atomic_writer(tmp_path / "x", "ab"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_the_resume_sweep_recognises_every_temporary_name(tmp_path):
    """What an interrupted write of any fgs writer leaves is swept; finished files and dotfiles stay."""
    name = temporary_name("fgs_c0_j00000_001.png")
    assert name.startswith(".fgs_c0_j00000_001.png.tmp-") and str(os.getpid()) in name
    assert temporary_name("a.png") != temporary_name("a.png")  # two threads of one process never collide
    (tmp_path / name).write_bytes(b"half")
    (tmp_path / ".manifest.csv.tmp-4242").write_bytes(b"half")  # the pre-helper convention, still swept
    (tmp_path / "fgs_c0_j00000_000.png").write_bytes(b"whole")
    (tmp_path / ".hidden").write_bytes(b"the user's")
    assert remove_temporary_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "fgs_c0_j00000_000.png"]
    assert not is_temporary_name("model.tmp-1.png") and not is_temporary_name(".hidden")


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "classifiers" / "abc"
    with pytest.raises(KeyError):
        with atomic_directory(target) as staging:
            (staging / "archive.pt").write_bytes(b"a")
            raise KeyError("interrupted")
    assert list((tmp_path / "classifiers").iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "archive.pt").write_bytes(b"a")
        (staging / "spec.json").write_bytes(b"{}")
    assert sorted(p.name for p in target.iterdir()) == ["archive.pt", "spec.json"]


def test_atomic_directory_keeps_the_copy_that_won_a_race(tmp_path):
    target = tmp_path / "tiny"
    with atomic_directory(target) as staging:
        (staging / "ours.json").write_text("ours")
        target.mkdir()  # another process finishes first
        (target / "theirs.json").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
