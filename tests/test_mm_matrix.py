"""The multimodal coverage matrix (issue 7): every family of `tests/mm_models.py` through the same
generic tests, or refused with the reason its row names.

For each family and attention implementation:
- images (several per sample where the family takes them), batch 2 with left padding, random
  keep masks that keep every visual and marker token (the runtime protects them): logits at kept
  positions, loss, and every gradient (vision tower and projector included) equal the oracle;
- videos, where the family has them (right padding);
- rho = 1 equals the dense model (use_cache=False).

The default run covers a representative set in sdpa; `-m slow` adds the rest and eager attention.
With REGATE_MATRIX_JSON=path set, the outcomes are written there; `scripts/mm_table.py` turns
that file into the README's supported-models table.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import regate_fx
from regate_fx import RewriteError
from regate_fx.verify import oracle
from tests.helpers import LOSS_ATOL, assert_close, assert_grads_close, check_against_oracle, grads, make_batch, random_keep
from tests.mm_models import MM_FAMILIES, TEXT_FAMILIES, keep_visual, make_mm_batch, model_inputs

RESULTS: dict[str, dict] = {}


def _cases():
    for fam in MM_FAMILIES:
        for attn in fam.attns:
            slow = fam.slow or attn != "sdpa"
            yield pytest.param((fam, attn), id=f"{fam.name}-{attn}", marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module", params=list(_cases()))
def case(request):
    fam, attn = request.param
    model = fam(attn)
    return fam, attn, model, regate_fx.sparsify(model, regate_fx.SparsifyConfig(return_logits=True), backend="eager")


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    path = os.environ.get("REGATE_MATRIX_JSON")
    if path and RESULTS:
        old = json.load(open(path)) if os.path.exists(path) else {}
        for name, row in RESULTS.items():
            merged = old.setdefault(name, {})
            for k, v in row.items():
                merged[k] = sorted(set(merged.get(k, [])) | set(v)) if isinstance(v, list) else v
        with open(path, "w") as f:
            json.dump(old, f, indent=1, sort_keys=True)


def _record(fam, attn: str, what: str, status: str, model=None) -> None:
    row = RESULTS.setdefault(fam.name, {"status": status, "attns": [], "inputs": []})
    if model is not None:
        row["model"] = type(model).__name__
    row["status"] = status if row["status"] == status or status.startswith("refused") else row["status"]
    row["attns"] = sorted(set(row["attns"]) | {attn})
    row["inputs"] = sorted(set(row["inputs"]) | {what})


def _vision_side(model) -> set[str]:
    """Parameters outside the decoder, the LM head and the input embeddings: vision tower, projector."""
    skip = set()
    for m in (model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()):
        skip |= {id(p) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in skip}


GRAD_SCALE = 2e-6  # float32 noise relative to a tensor's largest gradient (a projector sums many large terms)


def _assert_grads(actual: dict, expected: dict) -> None:
    assert_grads_close(actual, expected, scale=GRAD_SCALE)


def _check(fam, attn, model, smodel, batch, keep, what: str) -> None:
    inputs = model_inputs(batch)
    if fam.refusal is not None:
        with pytest.raises(RewriteError) as info:
            smodel(**inputs, keep_mask=keep)
        assert fam.refusal in str(info.value), str(info.value)
        _record(fam, attn, what, f"refused: {fam.refusal}", model)
        return
    model.zero_grad(set_to_none=True)
    out = smodel(**inputs, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    ref_logits, ref_loss = oracle(model, inputs, keep)
    ref_loss.backward()
    g_ref = grads(model)
    model.zero_grad(set_to_none=True)
    for b, ref in enumerate(ref_logits):
        pos = keep[b].nonzero().flatten()
        assert_close(out.logits[b, pos].detach(), ref.detach(), f"logits of sample {b}")
        assert float(out.logits[b, ~keep[b]].detach().abs().sum()) == 0.0, "pruned logits must be zero"
    assert_close(out.loss.detach(), ref_loss.detach(), "loss", atol=LOSS_ATOL, rtol=0)
    _assert_grads(g_sparse, g_ref)
    vision = _vision_side(model)
    assert vision and any(float(g_sparse[n].abs().max()) > 0 for n in vision if n in g_sparse), \
        "no gradient reached the vision tower / projector"
    report = smodel.regate_report
    assert report.refused == [] and report.sparse_graph.tail_on_kept
    assert sum(b.rewritten for b in report.sparse_graph.branches) >= 4
    _record(fam, attn, what, "exact", model)


def test_images_match_oracle(case):
    fam, attn, model, smodel = case
    items = [["image", "image"], ["image"]] if "images" in fam.kinds else [["image"], ["image"]]
    batch = make_mm_batch(fam, model, items, pad="left", seed=1)
    _check(fam, attn, model, smodel, batch, keep_visual(batch, 0.5, seed=2),
           "images" if "images" in fam.kinds else "image")


def test_videos_match_oracle(case):
    fam, attn, model, smodel = case
    if "video" not in fam.kinds:
        pytest.skip(f"{fam.name} takes no video")
    items = [["video"], ["image", "video"]] if "images" in fam.kinds else [["video"], ["video"]]
    batch = make_mm_batch(fam, model, items, pad="right", seed=3)
    _check(fam, attn, model, smodel, batch, keep_visual(batch, 0.4, seed=4), "video")


def test_keep_all_equals_dense_model(case):
    fam, attn, model, smodel = case
    if fam.refusal is not None:
        pytest.skip("refused")
    batch = make_mm_batch(fam, model, [["image"], ["image"]], pad="left", seed=5)
    inputs = model_inputs(batch)
    keep = batch["attention_mask"].bool()
    model.zero_grad(set_to_none=True)
    out = smodel(**inputs, keep_mask=keep)
    out.loss.backward()
    g_sparse = grads(model)
    model.zero_grad(set_to_none=True)
    dense = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    target = F.pad(inputs["labels"][:, 1:], (0, 1), value=-100).masked_fill(~keep, -100)
    loss = F.cross_entropy(dense.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    loss.backward()
    g_dense = grads(model)
    model.zero_grad(set_to_none=True)
    assert_close(out.logits.detach()[keep], dense.detach()[keep], "logits", atol=1e-5, rtol=1e-5)
    assert_close(out.loss.detach(), loss.detach(), "loss", atol=1e-6, rtol=0)
    _assert_grads(g_sparse, g_dense)


# Eager attention, and Llama 4 (17 s alone), under the slow mark (CI time).
@pytest.mark.parametrize("tm,attn", [pytest.param(m, a, id=f"{m.name}-{a}",
                                                  marks=[pytest.mark.slow] if a != "sdpa" or m.name == "llama4" else [])
                                     for m in TEXT_FAMILIES for a in m.attns])
def test_text_families_of_issue_7(tm, attn):
    """OLMo's clip_qkv is an in-place clamp_ inside the attention branch (it was refused as an
    'escaping value'); Llama4's complex RoPE (torch.polar, view_as_complex) is token-wise."""
    model = tm(attn)
    smodel = regate_fx.sparsify(model, backend="eager")
    batch = make_batch(tm, 3, 14, pad="left", seed=3)
    check_against_oracle(smodel, model, batch, random_keep(batch, 0.5, seed=7))
    assert smodel.regate_report.refused == [] and smodel.regate_report.num_rewritten == 4
    _record(tm, attn, "text", "exact", model)


def test_readme_table_lists_the_matrix():
    """The README's table (written by scripts/mm_table.py from a matrix run) has one row per family
    of the matrix, with the outcome the matrix expects: exact, or refused with its reason."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- mm-matrix:begin -->", 1)[1].split("<!-- mm-matrix:end -->", 1)[0]
    rows = {line.split("|")[1].strip(): line.split("|")[5].strip() for line in block.strip().splitlines()[2:]}
    families = [*MM_FAMILIES, *TEXT_FAMILIES]
    assert set(rows) == {f.name for f in families}
    for fam in families:
        refusal = getattr(fam, "refusal", None)
        expected = "exact" if refusal is None else f"refused: {refusal}"
        assert rows[fam.name].startswith(expected), (fam.name, rows[fam.name])
