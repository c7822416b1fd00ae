"""The comparison helper can fail: a sparsified model that silently ran dense is caught. And the
multi-rank helper fails a hung rank instead of hanging."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regate_fx import ReGateOutput
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME


class _SilentlyDense(torch.nn.Module):
    """What a pass that fell back to dense would return: dense logits read at the kept positions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, keep_mask, labels, **inputs):
        logits = self.model(**inputs, use_cache=False).logits  # (B, T, V), every token visible
        target = F.pad(labels[:, 1:], (0, 1), value=-100)
        counted = keep_mask & (target != -100)
        ce = F.cross_entropy(logits.flatten(0, 1), target.clamp(min=0).flatten(), reduction="none")
        token_loss = torch.where(counted, ce.view_as(target), 0.0)
        return ReGateOutput(loss=token_loss.sum() / counted.sum(), logits=logits * keep_mask[..., None],
                            token_loss=token_loss, keep_mask=keep_mask)


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
def test_a_dense_run_fails_the_oracle_comparison(name):
    tm = BY_NAME[name]
    model = tm("sdpa")
    batch = make_batch(tm, 2, 12, pad="right", seed=3)
    with pytest.raises(AssertionError):
        check_against_oracle(_SilentlyDense(model), model, batch, random_keep(batch, 0.5, seed=1))


def test_the_loss_alone_catches_a_dense_run():
    """The loss comparison (absolute tolerance) fails by itself, not only the logits one."""
    from regate_fx import oracle
    from tests.helpers import LOSS_ATOL

    tm = BY_NAME["llama"]
    model = tm("sdpa")
    batch = make_batch(tm, 2, 12, pad="right", seed=3)
    keep = random_keep(batch, 0.5, seed=1)
    dense = _SilentlyDense(model)(keep_mask=keep, **batch)
    _, ref_loss = oracle(model, batch, keep)
    assert float((dense.loss - ref_loss).abs()) > 10 * LOSS_ATOL


def _sleepy_rank(rank: int) -> None:
    import time

    if rank == 1:
        time.sleep(600)  # a rank left waiting (as in a collective nobody else entered)


def test_spawn_ranks_fails_a_hung_rank_instead_of_hanging():
    import time

    from tests.runtime.runtime_helpers import spawn_ranks

    start = time.monotonic()
    # rank 1 is named (rank 0 too when it has not finished starting up on a loaded machine)
    with pytest.raises(AssertionError, match=r"ranks \[(0, )?1\] of 2 still running"):
        spawn_ranks(_sleepy_rank, (), 2, timeout=5)
    assert time.monotonic() - start < 60
