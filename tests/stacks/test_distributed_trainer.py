"""ReGateTrainer on 2 gloo ranks: DDP stays in sync and equals one process with the ranks' batches
accumulated. (Trainer's fsdp=... needs GPUs: Accelerate enables FSDP only for multi-GPU process
groups and runs a CPU group as DDP; FSDP2 itself is tested on CPU in tests/test_distributed.py.)

The Llama has a vocabulary of 8192: 2.1 MiB of parameters, above DDP's first gradient bucket (1 MiB),
where dynamo's DDP optimizer would split the captured step and the model would run dense (issue 19).
The tiny Qwen2-VL (vision tower, 3-D M-RoPE positions) trains on samples with one image each: its
patches (P_b, D) and grid concatenated by the collator, its visual tokens and markers protected."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import regate_fx
from tests.mm_models import BY_NAME as MM
from tests.runtime.runtime_helpers import exit_rank, file_store, free_port, spawn_ranks, tiny_llama
from tests.stacks.common import QWEN2_VL_PER_SAMPLE, build, protecting_config, qwen2_vl_samples, snapshot, trainer

WORLD = 2
BIG_VOCAB = 8192


def _model(kind: str) -> torch.nn.Module:
    if kind == "qwen2_vl":
        return MM["qwen2_vl"]("sdpa").train()
    return tiny_llama(0, vocab_size=BIG_VOCAB).train() if kind == "llama" else build(kind)


def _trainer(kind: str, out, **kw):
    """`tests.stacks.common.trainer` on `_model(kind)`; Qwen2-VL with its own samples, collator and config."""
    model = _model(kind)
    if kind != "qwen2_vl":
        return trainer(kind, out, model=model, **kw)
    data = qwen2_vl_samples(model, 2 * WORLD * 2)  # 2 steps of 2 samples per rank
    return trainer(kind, out, model=model, data=data, rg=regate_fx.ReGate(protecting_config(model), len(data)),
                   collator=regate_fx.ReGateCollator(pad_token_id=0, per_sample=QWEN2_VL_PER_SAMPLE), **kw)


def _worker(rank: int, init: str, port: int, out: str, kind: str, extra: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)  # Accelerate adopts it
    t, cap = _trainer(kind, os.path.join(out, "run"), max_steps=2, ddp_backend="gloo", **extra)
    t.train()
    model = t.accelerator.unwrap_model(t.model)
    torch.save({"params": snapshot(model), "stats": t.regate.token_stats(),
                "sparse_graphs": sum(1 for g in model.regate_report.graphs if g.sparse),
                "store": t.regate.store.state_dict(), "wrapped": type(t.model_wrapped).__name__},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
    exit_rank()


def _run(tmp_path, kind: str, **extra) -> list[dict]:
    spawn_ranks(_worker, (file_store(tmp_path), free_port(), str(tmp_path), kind, extra), WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(tmp_path, kind: str):
    """One process, the ranks' batches as accumulation steps (accelerate hands rank r the r-th batch
    of each group of WORLD batches, so step s covers the same samples)."""
    t, _ = _trainer(kind, tmp_path / "single", max_steps=2, gradient_accumulation_steps=WORLD)
    t.train()
    return t


# CI time: qwen2_vl in the default run (the MLLM path); Llama's DDP sync also runs in tests/stacks/test_torchrun.py.
@pytest.mark.parametrize("kind", [pytest.param("llama", marks=pytest.mark.slow), "qwen2_vl",
                                  pytest.param("llava", marks=pytest.mark.slow)])
def test_ddp_ranks_stay_in_sync_and_equal_one_process(tmp_path, kind):
    if kind == "llama":
        assert sum(p.numel() * p.element_size() for p in _model(kind).parameters()) > 2 * 2**20
    got = _run(tmp_path, kind)
    assert got[0]["wrapped"] == "DistributedDataParallel"
    assert got[0]["sparse_graphs"] >= 1 and got[1]["sparse_graphs"] >= 1, "ran without its sparse graph"
    single = _single(tmp_path, kind)
    want = snapshot(single.model)
    for k in want:
        torch.testing.assert_close(got[0]["params"][k], got[1]["params"][k], rtol=0, atol=0, msg=k)  # in sync
        torch.testing.assert_close(got[0]["params"][k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert got[0]["stats"] == got[1]["stats"] == single.regate.token_stats() | {"steps": got[0]["stats"]["steps"]}
    assert got[0]["stats"]["tokens_processed"] < got[0]["stats"]["tokens_dense"]  # the steps were sparse
    _assert_same_store(got[0]["store"], got[1]["store"], rtol=0, atol=0)  # update is a collective
    # one process updates once per micro-batch (WORLD per step), a rank once per step with all ranks' tokens
    assert got[0]["store"]["num_updates"] * WORLD == single.regate.store.state_dict()["num_updates"]
    _assert_same_store(got[0]["store"], single.regate.store.state_dict(), rtol=1e-5, atol=1e-6, skip=("num_updates",))


def _assert_same_store(a: dict, b: dict, rtol: float, atol: float, skip: tuple[str, ...] = ()) -> None:
    assert a.keys() == b.keys()
    for k in a.keys() - set(skip):
        if isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, equal_nan=True, msg=f"store {k}")  # NaN: unseen
        else:
            assert a[k] == b[k], (k, a[k], b[k])
