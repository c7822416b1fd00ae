"""In-place ops (issue 7): inside a branch they are replayed with it; on a side input they refuse.

OLMo's `query_states.clamp_(...)` (clip_qkv) is inside its attention branch: replayed on kept
tokens (exact, tests/test_mm_matrix.py::test_text_families_of_issue_7). A side input (a mask, a
bias) changed in place after it is computed would be gathered before the change: refused.
"""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput

import regate_fx
from regate_fx import RewriteError
from tests.toy import ToyLM, build_mask


class BiasAddedInPlace(ToyLM):
    """An ALiBi-like bias added in place to the float mask after it is built."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        t = input_ids.shape[1]
        mask = torch.zeros(input_ids.shape[0], 1, t, t).masked_fill(~build_mask("causal_padding", attention_mask, t),
                                                                     float("-inf"))
        dist = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs().float()  # (T, T)
        mask.add_(-0.1 * dist)  # in place, after it is computed
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return CausalLMOutput(logits=self.head(self.norm(x)))


def test_side_input_changed_in_place_is_refused():
    smodel = regate_fx.sparsify(BiasAddedInPlace(), backend="eager")
    ids = torch.randint(0, 64, (2, 10))
    am = torch.ones(2, 10, dtype=torch.long)
    keep = torch.rand(2, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[:, 0] = True
    with pytest.raises(RewriteError, match=r"modified in place by 'add_"):
        smodel(input_ids=ids, attention_mask=am, labels=ids, keep_mask=keep)
