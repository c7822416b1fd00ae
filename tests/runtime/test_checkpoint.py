"""Atomic checkpoints: a crash mid-write keeps the previous checkpoint; bad files are clear errors."""

from __future__ import annotations

import pytest
import torch

from regate_fx.runtime.atomic import (
    TMP_SUFFIX,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)


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


class _Payload:
    """Unpickling this would run code: ``__reduce__`` names a callable and its arguments."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # creates the marker file if ever called


def test_loading_a_crafted_pickle_runs_nothing_and_says_why(tmp_path):
    from regate_fx.runtime.atomic import UnsafeCheckpointError

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "x": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="does not load such files"):
        load_checkpoint(path)
    assert not marker.exists(), "loading ran code from the file"


def test_a_training_checkpoint_loads_with_plain_types_only(tmp_path):
    """What users save (examples/stacks/torch_loop.py, ReGateTrainer): model, optimizer with state,
    ReGate state, RNG states; all of it loads without admitting any other type."""
    import regate_fx
    from tests.runtime.runtime_helpers import tiny_llama

    model = tiny_llama(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(3, 100, (2, 6)), labels=torch.randint(3, 100, (2, 6))).loss.backward()
    opt.step()
    rg = regate_fx.ReGate(regate_fx.ReGateConfig(warmup_steps=0, lam=0.0), num_samples=4)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "regate": rg.state_dict(), "step": 3,
             "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    model.load_state_dict(back["model"])
    opt.load_state_dict(back["optimizer"])
    rg.load_state_dict(back["regate"])
    assert back["step"] == 3 and torch.equal(back["rng"], state["rng"])
