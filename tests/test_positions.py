"""Every position-id layout users pass (issue 7): none, (B, T), (1, T), (3, B, T) M-RoPE, packed rows.

Each is exact against the oracle, and at rho = 1 equal to the dense model called with
use_cache=False. Every token axis of every input is marked dynamic (dim 1 of (1, T), dim 2 of
(3, B, T)): before, an unmarked one specialised the sequence length and the graph was refused
with a misleading `seq_specialized: ... use at least 2 tokens`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regate_fx
from regate_fx import SparsifyConfig
from regate_fx.capture import token_axes
from tests.helpers import assert_close, assert_grads_close, check_against_oracle, grads, make_batch, random_keep
from tests.mm_models import BY_NAME as MM
from tests.models import BY_NAME

LLAMA = BY_NAME["llama"]


def _dense_equals_keep_all(smodel, model, batch):
    """rho = 1: the sparse step equals the dense model called with use_cache=False."""
    keep = (batch["attention_mask"].bool() if "attention_mask" in batch
            else torch.ones(batch["input_ids"].shape, dtype=torch.bool))
    model.zero_grad(set_to_none=True)
    out = smodel(**batch, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    dense = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=-100).masked_fill(~keep, -100)  # padding predicts nothing
    loss = F.cross_entropy(dense.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    loss.backward()
    assert_close(out.logits.detach()[keep], dense.detach()[keep], "logits", atol=1e-5, rtol=1e-5)  # real tokens
    assert_close(out.loss.detach(), loss.detach(), "loss", atol=1e-6, rtol=1e-6)
    assert_grads_close(g_sparse, grads(model), atol=1e-5, rtol=1e-5)
    model.zero_grad(set_to_none=True)


def test_token_axes_of_every_layout():
    b, t = 3, 7
    assert token_axes(torch.zeros(b, t, dtype=torch.long), b, t) == ([0], [1])  # ids, (B, T) positions
    assert token_axes(torch.zeros(1, t, dtype=torch.long), b, t) == ([], [1])  # (1, T) positions
    assert token_axes(torch.zeros(3, b, t, dtype=torch.long), b, t) == ([1], [2])  # M-RoPE, B == 3
    assert token_axes(torch.zeros(4, b, t, dtype=torch.long), b, t) == ([1], [2])  # text + M-RoPE rows
    assert token_axes(torch.zeros(b, t, 32), b, t) == ([0], [1])  # inputs_embeds
    assert token_axes(torch.zeros(b, 1, t, t), b, t) == ([0], [2, 3])  # 4-D mask
    assert token_axes(torch.zeros(b, 1, t, 5), b, t) == ([0], [2])  # cross-attention mask
    assert token_axes(torch.zeros(b, 3, 16, 16), b, t) == ([0], [])  # pixel_values


@pytest.fixture(scope="module")
def llama():
    model = LLAMA("sdpa")
    return model, regate_fx.sparsify(model, SparsifyConfig(return_logits=True), backend="eager")


def test_no_position_ids(llama):
    model, smodel = llama
    batch = make_batch(LLAMA, 2, 12, pad="right", seed=1, positions=False)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))
    _dense_equals_keep_all(smodel, model, batch)


def test_position_ids_1_by_t_shared_by_the_batch(llama):
    """(1, T) position ids with a batch of 2 (they used to specialise T: `seq_specialized`)."""
    model, smodel = llama
    batch = make_batch(LLAMA, 2, 12, seed=1, positions=False)
    batch["position_ids"] = torch.arange(12)[None] + 3  # (1, T), offset so that they matter
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=2))
    _dense_equals_keep_all(smodel, model, batch)
    assert smodel.regate_report.refused == []


def _packed(seed: int = 0) -> dict:
    """Rows of several documents, as DataCollatorWithFlattening / TRL padding_free build them:
    position ids restart at each document, no attention_mask, the first label of a document -100."""
    g = torch.Generator().manual_seed(seed)
    docs = [[5, 7, 4], [9, 7]]
    ids = torch.randint(3, 90, (2, 16), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in docs])  # (2, 16)
    labels = ids.masked_fill(pos == 0, -100)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def test_packed_rows_are_exact_per_document(llama):
    """Each packed document's kept tokens see only kept tokens of the same document."""
    model, smodel = llama
    batch = _packed()
    for seed in (1, 2):
        check_against_oracle(smodel, model, batch, random_keep({"attention_mask": torch.ones(2, 16)}, 0.5, seed=seed))
    _dense_equals_keep_all(smodel, model, batch)


def test_packed_rows_oracle_is_not_the_unpacked_model(llama):
    """The packed result differs from attending across documents (what use_cache=True gives)."""
    model, smodel = llama
    batch = _packed()
    keep = torch.ones(2, 16, dtype=torch.bool)
    packed = smodel(**batch, keep_mask=keep).logits
    across = model(input_ids=batch["input_ids"], attention_mask=torch.ones(2, 16, dtype=torch.long),
                   position_ids=batch["position_ids"], use_cache=False).logits
    assert (packed[0, 5:] - across[0, 5:]).abs().max() > 1e-3  # the second document differs


@pytest.mark.parametrize("capture", ["model", "decoder"])
def test_mrope_3_b_t_position_ids(capture):
    """Qwen2-VL's language model called with (3, B, T) M-RoPE position ids (text only)."""
    fam = MM["qwen2_vl"]
    model = fam("sdpa")
    smodel = regate_fx.sparsify(model, SparsifyConfig(capture=capture, return_logits=True), backend="eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    # distinct temporal / height / width rows, as M-RoPE gives visual tokens
    pos = torch.stack([am.cumsum(1) - 1, (am.cumsum(1) - 1) // 2, (am.cumsum(1) - 1) % 5]).clamp(min=0)  # (3, B, T)
    batch = {"input_ids": ids, "attention_mask": am, "position_ids": pos, "labels": ids.masked_fill(am == 0, -100)}
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=1))
    _dense_equals_keep_all(smodel, model, batch)
    assert smodel.regate_report.refused == []


def test_a_specialised_length_names_its_cause():
    """When something does fix the sequence length (here an op broadcasting against a (1, 12, 1)
    buffer), the refusal says so instead of asking for 'at least 2 tokens'."""
    from regate_fx import KeepMaskError

    class FixedLength(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.register_buffer("w", torch.ones(1, 12, 1))

        def forward(self, input_ids, attention_mask=None, **kw):
            embeds = self.lm.get_input_embeddings()(input_ids) * self.w  # (B, 12, D): T must be 12
            return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, **kw)

    smodel = regate_fx.sparsify(FixedLength(LLAMA("sdpa")), backend="eager")
    batch = make_batch(LLAMA, 2, 12, seed=1)
    with pytest.raises(KeepMaskError) as info:
        smodel(**batch, keep_mask=random_keep(batch, 0.5))
    msg = str(info.value)
    assert "seq_specialized: the sequence length was specialised to 12" in msg
    assert "not marked dynamic, or an op that needs a fixed length" in msg and "at least 2 tokens" not in msg
