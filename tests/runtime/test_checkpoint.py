"""Atomic checkpoints: a crash mid-write keeps the previous checkpoint; bad files are clear errors."""

from __future__ import annotations

import pytest
import torch

from regate_fx.runtime.checkpoint import TMP_SUFFIX, atomic_write, load_checkpoint, save_checkpoint


def test_round_trip(tmp_path):
    state = {"step": 7, "w": torch.arange(5.0), "nested": {"a": [1, 2]}}
    save_checkpoint(tmp_path / "sub" / "ckpt.pt", state)
    back = load_checkpoint(tmp_path / "sub" / "ckpt.pt")
    assert back["step"] == 7 and back["nested"] == {"a": [1, 2]} and torch.equal(back["w"], state["w"])


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def dies_half_way(f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert load_checkpoint(path) == {"step": 1}
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}"))  # no leftover temporary file


def test_missing_truncated_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable regate_fx checkpoint"):
        load_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])
