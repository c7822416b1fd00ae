"""PEFT LoRA: adapters are extra token-wise linears inside the branches; the pass needs nothing
special for them, and only the adapter weights get gradients."""

from __future__ import annotations

import pytest
import torch

import regate_fx
from tests.helpers import check_against_oracle, make_batch, random_keep
from tests.models import BY_NAME

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name,targets", [
    ("llama", ["q_proj", "v_proj", "down_proj"]),
    ("gpt_neox", ["query_key_value", "dense_h_to_4h"]),
    ("llava", ["q_proj", "v_proj"]),
])
def test_lora_model_matches_oracle(name, targets):
    tm = BY_NAME[name]
    model = peft.get_peft_model(tm("sdpa"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             lora_dropout=0.0))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapters change the output
            torch.nn.init.normal_(p, std=0.1)
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 3, 14, pad="left", seed=1)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))
    assert smodel.regate_report.refused == [] and smodel.regate_report.sparse_graph.tail_on_kept
    out = smodel(**batch, keep_mask=random_keep(batch, 0.5, seed=3))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
