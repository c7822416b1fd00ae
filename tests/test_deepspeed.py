"""DeepSpeed over a sparsified model on 2 gloo ranks (DeepSpeed's CPU accelerator): ZeRO-1/2 equal one
process with the rewrite; ZeRO-3 equals one process with ``SparsifyConfig(execution="gathered")``,
sparsified before ``deepspeed.initialize`` or after it (on ``engine.module``), and is a clear
refusal naming ``execution='gathered'`` with the rewrite. Skipped unless deepspeed is importable:
``scripts/setup.sh`` installs it (the ``deepspeed`` extra, built with ``DS_BUILD_OPS=0``)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import regate_fx
from tests.helpers import assert_grads_close
from tests.runtime.runtime_helpers import exit_rank, file_store, spawn_ranks
from tests.test_distributed import WORLD, TM, _rank_inputs, _want_mean_of_ranks

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")
LR = 0.1


def _worker(
    rank: int, init: str, out: str, stage: int, execution: str = "rewrite", order: str = "sparsify_first"
) -> None:
    _work(rank, init, out, stage, execution, order)
    exit_rank()  # no interpreter teardown: a thread left joinable there aborts the rank now and then


def _work(rank: int, init: str, out: str, stage: int, execution: str, order: str) -> None:
    import deepspeed

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="0",
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        cfg = regate_fx.SparsifyConfig(execution=execution)
        model = TM("sdpa").train()
        if order == "sparsify_first":
            regate_fx.sparsify(model, cfg, backend="eager")
        config = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
        }
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config
        )
        if order == "initialize_first":
            regate_fx.sparsify(engine.module, cfg, backend="eager")
        batch, keep = _rank_inputs(rank)
        try:
            loss = engine(**batch, keep_mask=keep).loss
        except regate_fx.RewriteError as e:
            torch.save(str(e), os.path.join(out, f"rank{rank}.pt"))
            dist.barrier()  # both ranks refused: leave together
            return
        engine.backward(loss)
        engine.step()
        params = dict(engine.module.named_parameters())
        if stage == 3:  # partitioned: gather the full values to compare
            with deepspeed.zero.GatheredParameters(list(params.values())):
                got = {n: p.detach().clone() for n, p in params.items()}
        else:
            got = {n: p.detach().clone() for n, p in params.items()}
        torch.save(got, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_equal_one_process(tmp_path, stage):
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path), stage), WORLD)
    init = dict(TM("sdpa").named_parameters())
    want = {n: (init[n] - LR * g).detach() for n, g in _want_mean_of_ranks().items()}
    for r in range(WORLD):
        assert_grads_close(torch.load(tmp_path / f"rank{r}.pt"), want)


def _want_after_one_sgd_step():
    init = dict(TM("sdpa").named_parameters())
    return {n: (init[n] - LR * g).detach() for n, g in _want_mean_of_ranks().items()}


@pytest.mark.parametrize("order", ["sparsify_first", pytest.param("initialize_first", marks=pytest.mark.slow)])
def test_zero_3_gathered_equals_one_process(tmp_path, order):
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path), 3, "gathered", order), WORLD)
    want = _want_after_one_sgd_step()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert not isinstance(got, str), got  # not refused
        assert_grads_close(got, want)


@pytest.mark.slow
def test_zero_3_with_the_rewrite_is_a_clear_refusal(tmp_path):
    spawn_ranks(_worker, (file_store(tmp_path), str(tmp_path), 3), WORLD)
    msg = torch.load(tmp_path / "rank0.pt")
    assert "ZeRO stage 3" in msg and "execution='gathered'" in msg


def _trainer_worker(rank: int, init: str, port: int, out: str) -> None:
    import deepspeed

    from tests.stacks.common import snapshot, trainer
    from tests.stacks.test_distributed_trainer import _model

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)  # the Trainer adopts it
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    t, _ = trainer(
        "llama", os.path.join(out, "run"), model=_model("llama"), max_steps=2, ddp_backend="gloo", deepspeed=ds
    )
    regate_fx.sparsify(t.model, regate_fx.SparsifyConfig(execution="auto", return_logits=False, progress=False))
    t.train()
    module = t.accelerator.unwrap_model(t.model)
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        params = snapshot(module)
    torch.save(
        {"params": params, "stats": t.regate.token_stats(), "wrapped": type(t.model_wrapped).__name__},
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
def test_trainer_with_zero_3_equals_one_process(tmp_path):
    """ReGateTrainer(args.deepspeed = ZeRO-3) with execution="auto" on 2 ranks: the same parameters after
    2 steps as one process with the ranks' batches accumulated (as tests/stacks/test_distributed_trainer.py)."""
    from tests.runtime.runtime_helpers import free_port
    from tests.stacks.test_distributed_trainer import _single

    spawn_ranks(_trainer_worker, (file_store(tmp_path), free_port(), str(tmp_path)), WORLD)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert got[0]["wrapped"] == "DeepSpeedEngine"
    single = _single(tmp_path, "llama")
    want = {k: v.detach() for k, v in single.model.state_dict().items()}
    for k in want:
        torch.testing.assert_close(got[0]["params"][k], got[1]["params"][k], rtol=0, atol=0, msg=k)
        torch.testing.assert_close(got[0]["params"][k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    assert got[0]["stats"] == got[1]["stats"] == single.regate.token_stats() | {"steps": got[0]["stats"]["steps"]}
