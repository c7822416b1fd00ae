"""Every stack's example (examples/stacks/, one per page under docs/stacks/) runs a few steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(module: str, *args: str, tmp_path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"examples.stacks.{module}", *args, "--out", str(tmp_path / module)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_torch_loop_with_accumulation_checkpointing_and_resume(tmp_path):
    first = run("torch_loop", "--steps", "4", "--grad-accum", "2", "--gradient-checkpointing", "--save-every", "2",
                tmp_path=tmp_path)
    assert "step   3" in first and "elided" in first
    again = run("torch_loop", "--steps", "5", "--grad-accum", "2", "--resume", tmp_path=tmp_path)
    assert "step   4" in again and "step   3" not in again  # continued from the checkpoint


def test_trainer(tmp_path):
    out = run("trainer", "--steps", "4", "--grad-accum", "2", tmp_path=tmp_path)
    assert "eval loss (dense)" in out
    assert (tmp_path / "trainer" / "checkpoint-4" / "regate_state.pt").is_file()
    assert (tmp_path / "trainer" / "final" / "config.json").is_file()


def test_trl_sft_with_lora(tmp_path):
    pytest.importorskip("trl")
    assert "kept" in run("trl_sft", "--steps", "3", "--lora", tmp_path=tmp_path)


@pytest.mark.slow  # CI time: LoRA is tests/test_peft.py, and LoRA through TRL is test_trl_sft_with_lora
def test_peft_lora(tmp_path):
    pytest.importorskip("peft")
    assert "adapter reloaded: True" in run("peft_lora", "--steps", "3", tmp_path=tmp_path)


@pytest.mark.slow  # CI time: root FSDP2 on 2 ranks is tests/test_distributed.py::test_fsdp2_of_a_sparsified_model_equals_one_process
def test_accelerate_fsdp2_on_two_processes(tmp_path):
    out = run("accelerate_fsdp", "--steps", "3", "--fsdp2", tmp_path=tmp_path)
    assert "2 ranks" in out and "step   2" in out
